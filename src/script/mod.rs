//! Script policies: knock logic written in Luau (through `mlua`, built from
//! its vendored sources), sandboxed per worker thread.
//!
//! A script is one more kind of knock beside fixed and rotating: the engine
//! calls it, through [`ScriptVms`], for SYNs to its declared knock ports
//! and for SYNs from sources with progress under it, and keeps every piece
//! of per-source state itself.

mod budget;
mod vm;

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{Policies, PolicyId, PolicyKey, ScriptInput, ScriptOutput, ScriptRunner};
use crate::rotating::Secret;
use vm::Vm;
pub use vm::VmError;

/// A script policy's settings (`[policy.script]`) and its source text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub file: PathBuf,
    /// Read once when the configuration is loaded; every worker compiles
    /// this same text.
    pub source: Arc<str>,
    pub knock_ports: Vec<RangeInclusive<u16>>,
    /// The policy's open ports, which grants may name.
    pub open_ports: Vec<u16>,
    /// Most time one call may take.
    pub budget: Duration,
    /// Most memory one VM may hold, in bytes.
    pub memory_limit: usize,
    /// Longest grant a script may ask for.
    pub max_grant: Duration,
    /// Shortest network prefixes a script may grant.
    pub min_prefix_v4: u8,
    pub min_prefix_v6: u8,
    /// For `knockq.hmac`.
    pub secret: Option<Secret>,
}

impl Script {
    /// Compiles the script and runs its top level in a fresh sandbox, as
    /// each worker will.
    pub fn check(&self) -> Result<(), VmError> {
        Vm::load(self).map(drop)
    }

    /// The first 8 bytes of the SHA-256 of the text, in hex.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(self.source.as_bytes());
        hash[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `1111 2222 20000-20999`
    pub fn describe_ports(&self) -> String {
        let ranges: Vec<String> = self
            .knock_ports
            .iter()
            .map(|range| match range.start() == range.end() {
                true => range.start().to_string(),
                false => format!("{}-{}", range.start(), range.end()),
            })
            .collect();
        ranges.join(" ")
    }
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
        let crate::config::Knock::Script(script) = &policies.list()[usize::from(policy)].knock
        else {
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
