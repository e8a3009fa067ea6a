//! Script policies: knock logic written in Luau (through `mlua`, built from
//! its vendored sources), sandboxed per worker thread.
//!
//! A script is one more kind of knock beside fixed and rotating: the engine
//! calls it, through [`ScriptVms`], for SYNs to its declared knock ports
//! and for SYNs from sources with progress under it, and keeps every piece
//! of per-source state itself.

mod budget;
mod vm;

use crate::config::{Knock, Script};
use crate::engine::{Policies, PolicyId, PolicyKey, ScriptInput, ScriptOutput, ScriptRunner};
use vm::Vm;
pub use vm::VmError;

/// Compiles `script` and runs its top level in a fresh sandbox, as each
/// worker will.
pub fn check(script: &Script) -> Result<(), VmError> {
    Vm::load(script).map(drop)
}

/// Why a call failed, as the `kind` label of `knockq_script_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The script raised an error.
    Runtime,
    /// The call ran past its time budget.
    Budget,
    /// The VM reached its memory limit.
    Memory,
    /// The answer was out of bounds: a port the policy does not open, a
    /// duration or prefix past its limits, a stage outside 0..255.
    Result,
    /// The script could not be loaded in this worker.
    Load,
}

impl FailureKind {
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Runtime,
        FailureKind::Budget,
        FailureKind::Memory,
        FailureKind::Result,
        FailureKind::Load,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Runtime => "runtime",
            FailureKind::Budget => "budget",
            FailureKind::Memory => "memory",
            FailureKind::Result => "result",
            FailureKind::Load => "load",
        }
    }
}

/// A failed call, for the metrics and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub policy: PolicyKey,
    pub kind: FailureKind,
    /// `file:line: message`, as far as known.
    pub message: String,
}

/// Failures kept between two drains; more are counted, not described.
const MAX_DESCRIBED_FAILURES: usize = 16;

/// The VMs of one thread, one per script policy, made on first use and
/// replaced when a reload changes the script.
#[derive(Default)]
pub struct ScriptVms {
    /// A few at most: found by a look along the list, quicker than a hash.
    vms: Vec<(PolicyKey, Result<Vm, VmError>)>,
    failures: Vec<Failure>,
    /// Failures past [`MAX_DESCRIBED_FAILURES`], by policy and kind.
    undescribed: Vec<(PolicyKey, FailureKind)>,
}

impl ScriptVms {
    pub fn new() -> Self {
        ScriptVms::default()
    }

    /// The failures since the last call, described, and those only counted.
    pub fn take_failures(&mut self) -> (Vec<Failure>, Vec<(PolicyKey, FailureKind)>) {
        (
            std::mem::take(&mut self.failures),
            std::mem::take(&mut self.undescribed),
        )
    }

    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty() || !self.undescribed.is_empty()
    }

    fn fail(&mut self, policy: PolicyKey, error: &VmError, script: &Script) {
        if self.failures.len() >= MAX_DESCRIBED_FAILURES {
            return self.undescribed.push((policy, error.kind));
        }
        let file = script.file.display();
        let message = match error.line {
            // Luau's own messages start with the file and line already.
            Some(_) if error.message.starts_with(&*file.to_string()) => error.message.clone(),
            Some(line) => format!("{file}:{line}: {}", error.message),
            None => format!("{file}: {}", error.message),
        };
        self.failures.push(Failure {
            policy,
            kind: error.kind,
            message,
        });
    }
}

impl ScriptRunner for ScriptVms {
    fn run(
        &mut self,
        policies: &Policies,
        policy: PolicyId,
        input: &ScriptInput,
    ) -> Option<ScriptOutput> {
        let key = policies.key(policy);
        let Knock::Script(script) = &policies.list()[usize::from(policy)].knock else {
            return None;
        };
        let index = match self.vms.iter().position(|(k, _)| *k == key) {
            Some(index) => index,
            None => {
                // A reload replaced scripts: forget the VMs of policies gone.
                self.vms.retain(|&(key, _)| policies.get(key).is_some());
                self.vms.push((key, Vm::load(script)));
                self.vms.len() - 1
            }
        };
        let result = match &self.vms[index].1 {
            Ok(vm) => vm.call(input),
            Err(error) => Err(error.clone()),
        };
        match result {
            Ok(output) => Some(output),
            Err(error) => {
                self.fail(key, &error, script);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
