//! The engine's side of script policies: what a script sees of a SYN and
//! what it may answer. The engine stays pure: it hands each call to a
//! [`ScriptRunner`] (the Luau host in `crate::script`, or a plain function
//! in tests) and applies the answer itself, so bounds, eviction, grants and
//! their events work exactly as for fixed and rotating knocks.

use std::net::IpAddr;
use std::time::Duration;

use super::{Policies, PolicyId, PortMask, Timestamp};
use crate::flow::FlowPort;

/// One SYN as a script policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptInput {
    pub src: IpAddr,
    pub port: FlowPort,
    /// The port is one of the policy's declared knock ports (otherwise the
    /// source has progress and sent a SYN elsewhere).
    pub knock_port: bool,
    /// The source's stage under the policy, 0 without progress.
    pub stage: u8,
    /// When the stage last changed, while it is above 0.
    pub last: Option<Timestamp>,
    /// The source holds a grant of this policy (its own or its network's).
    pub granted: bool,
    /// The packet's time on the engine's monotonic clock.
    pub now: Timestamp,
    /// The same moment as Unix time, in milliseconds.
    pub unix_millis: u64,
}

/// What the script decided for one SYN; already checked against the
/// policy's limits by the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptOutput {
    /// The source's new stage: 0 ends its progress.
    pub stage: u8,
    pub action: ScriptAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptAction {
    None,
    Grant(ScriptGrant),
    /// Ends the source's grant under the policy, and that of any network
    /// grant of the policy that holds it.
    Revoke,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptGrant {
    pub ports: PortMask,
    /// `None`: the policy's grant timeout.
    pub duration: Option<Duration>,
    /// Grant the source's network of this prefix length rather than the
    /// address alone.
    pub prefix: Option<u8>,
}

/// Runs the script of a script policy. `None` means the call failed (an
/// error, its time budget, its memory limit, or an answer out of bounds):
/// the packet is rejected and no state changes. The runner records why.
pub trait ScriptRunner {
    fn run(
        &mut self,
        policies: &Policies,
        policy: PolicyId,
        input: &ScriptInput,
    ) -> Option<ScriptOutput>;
}

/// For configurations without script policies; a script policy's SYN is
/// rejected.
pub struct NoScripts;

impl ScriptRunner for NoScripts {
    fn run(&mut self, _: &Policies, _: PolicyId, _: &ScriptInput) -> Option<ScriptOutput> {
        None
    }
}

impl<F: FnMut(PolicyId, &ScriptInput) -> Option<ScriptOutput>> ScriptRunner for F {
    fn run(&mut self, _: &Policies, policy: PolicyId, input: &ScriptInput) -> Option<ScriptOutput> {
        self(policy, input)
    }
}
