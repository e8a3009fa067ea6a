//! What a configuration's policies mean to the engine, and the refusals
//! that follow: every port has one role (knock and close ports belong to one
//! policy and are never opened), a sequence is not guessable by a scan,
//! rotating ranges and scripts stay within what the engine can keep. Each
//! refusal is `file:line: key: message`, pointing at the value.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use toml::Spanned;

use super::{PolicySet, PortMask};
use crate::config::{
    field, ConfigError, Document, ErrorContext, RawPolicy, RawRotating, RawScript,
};
use crate::flow::{FlowPort, PortRange};

/// Longest sequence accepted; the engine counts stages in a byte.
pub const MAX_SEQUENCE_LEN: usize = 64;

/// Fewest ports a rotating range may hold: fewer would make its sequences
/// guessable.
pub const MIN_ROTATING_PORTS: u32 = 256;

/// Longest time budget a script call may have: longer would stall a worker.
const MAX_SCRIPT_BUDGET: Duration = Duration::from_millis(100);

/// Refuses what the policies of `document` cannot mean.
pub fn check(document: &Document) -> Result<(), ConfigError> {
    let errors = &document.errors;
    let policies = &document.raw.policies;
    if policies.len() > PolicySet::CAPACITY {
        let key = format!("policy[{}]", PolicySet::CAPACITY);
        let message = format!("at most {} policies are supported", PolicySet::CAPACITY);
        return Err(errors.spanned(&policies[PolicySet::CAPACITY].name, key, message));
    }
    // Open ports may be shared; every other role belongs to one policy.
    let mut roles = Roles::default();
    for (i, policy) in policies.iter().enumerate() {
        let open_ports = policy.open_ports.get_ref();
        for (entry, range) in open_ports.iter().enumerate() {
            if let Some(earlier) = open_ports[..entry].iter().find(|r| r.overlaps(*range)) {
                let message = format!("open port {range} overlaps {earlier}, given earlier");
                let key = format!("policy[{i}].open_ports");
                return Err(errors.spanned(&policy.open_ports, key, message));
            }
            for port in range.iter() {
                roles.open.entry(port).or_insert(policy.name.get_ref());
            }
        }
    }
    for (i, policy) in policies.iter().enumerate() {
        let name = policy.name.get_ref().as_str();
        let key = |field: &str| format!("policy[{i}].{field}");
        if let Some(sequence) = &policy.sequence {
            check_sequence(sequence, policy, &roles, errors, &key)?;
            for &port in sequence.get_ref() {
                roles.claimed.insert(port, PortUse::Knock(name));
            }
        }
        if let Some(rotating) = &policy.rotating {
            let ports = check_rotating(rotating.get_ref(), errors, &key)?;
            if let Some((port, conflict)) = roles.in_range(ports) {
                let message =
                    format!("the rotating range {ports} takes port {port}, which is {conflict}");
                return Err(errors.spanned(rotating, key("rotating"), message));
            }
            roles.ranges.push((ports, name));
        }
        if let Some(script) = &policy.script {
            if policy.open_ports.get_ref().len() > PortMask::MAX_PORTS {
                let message = format!(
                    "a script policy opens at most {} ports",
                    PortMask::MAX_PORTS
                );
                return Err(errors.spanned(&policy.open_ports, key("open_ports"), message));
            }
            if let Some(close) = &policy.close_port {
                let message = "a script policy closes with k:revoke(): declare the close port among knock_ports".to_owned();
                return Err(errors.spanned(close, key("close_port"), message));
            }
            let knock_ports = check_script(script.get_ref(), errors, &key)?;
            for port in knock_ports.iter().flat_map(|range| range.iter()) {
                if let Some(conflict) = roles.role_of(port) {
                    let message = format!("knock port {port} is also {conflict}");
                    return Err(errors.spanned(
                        &script.get_ref().knock_ports,
                        key("script.knock_ports"),
                        message,
                    ));
                }
                roles.claimed.insert(port, PortUse::Knock(name));
            }
        }
        if let Some(spa) = &policy.spa {
            if policy.open_ports.get_ref().len() > PortMask::MAX_PORTS {
                let message = format!("an SPA policy opens at most {} ports", PortMask::MAX_PORTS);
                return Err(errors.spanned(&policy.open_ports, key("open_ports"), message));
            }
            let spa = spa.get_ref();
            let port = FlowPort::udp(*spa.port().get_ref());
            if let Some(conflict) = roles.role_of(port) {
                let message = format!("SPA port {port} is also {conflict}");
                return Err(errors.spanned(spa.port(), key("spa.port"), message));
            }
            roles.claimed.insert(port, PortUse::Knock(name));
            // A user's own port is the policy's too; users may share one.
            for (user, context, user_key) in spa.users(errors, &key) {
                let Some(own) = &user.port else {
                    continue;
                };
                let port = FlowPort::udp(*own.get_ref());
                let conflict = match roles.role_of(port) {
                    _ if own.get_ref() == &0 => {
                        Some("port 0, which cannot receive packets".to_owned())
                    }
                    Some(PortUse::Knock(owner)) if owner == name => None,
                    Some(conflict) => Some(format!("also {conflict}")),
                    None => None,
                };
                if let Some(conflict) = conflict {
                    let message = format!("the user's port {port} is {conflict}");
                    return Err(context.spanned(own, field(&user_key, "port"), message));
                }
                roles.claimed.insert(port, PortUse::Knock(name));
            }
        }
        if let Some(close) = &policy.close_port {
            let port = *close.get_ref();
            // Its own knock ports were checked against it above.
            if let Some(conflict) = roles.role_of(port) {
                let message = format!("close port {port} is also {conflict}");
                return Err(errors.spanned(close, key("close_port"), message));
            }
            roles.claimed.insert(port, PortUse::Close(name));
        }
    }
    Ok(())
}

/// A rotating knock's bounds, for a policy or a client profile; its range.
pub(crate) fn check_rotating(
    rotating: &RawRotating,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<PortRange, ConfigError> {
    let length = *rotating.length.get_ref();
    if length == 0 || usize::from(length) > MAX_SEQUENCE_LEN {
        let message = format!("length {length} is outside 1..{MAX_SEQUENCE_LEN}");
        return Err(errors.spanned(&rotating.length, key("rotating.length"), message));
    }
    let ports = rotating.ports(errors, key)?;
    let size = ports.size();
    if size < MIN_ROTATING_PORTS.max(u32::from(length)) {
        let message = format!(
            "the range holds {size} ports; rotating knocks need at least {MIN_ROTATING_PORTS}"
        );
        return Err(errors.spanned(&rotating.ports, key("rotating.ports"), message));
    }
    if rotating.period < Duration::from_secs(1) {
        let message = "period must be at least 1s".to_owned();
        return Err(errors.at(None, key("rotating.period"), &message));
    }
    Ok(ports)
}

/// A script policy's bounds; its knock ports.
fn check_script(
    script: &RawScript,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<Vec<PortRange>, ConfigError> {
    let knock_ports = script.knock_ports.get_ref().clone();
    if knock_ports.is_empty() {
        let message = "knock_ports is empty: give the ports the script decides".to_owned();
        return Err(errors.spanned(&script.knock_ports, key("script.knock_ports"), message));
    }
    if script.budget > MAX_SCRIPT_BUDGET {
        let message = format!(
            "budget {} is longer than {}: a call that long stalls its queue",
            humantime::format_duration(script.budget),
            humantime::format_duration(MAX_SCRIPT_BUDGET)
        );
        return Err(errors.at(None, key("script.budget"), &message));
    }
    let memory_mib = *script.memory_mib.get_ref();
    if !(1..=1024).contains(&memory_mib) {
        let message = format!("memory_mib {memory_mib} is outside 1..1024");
        return Err(errors.spanned(&script.memory_mib, key("script.memory_mib"), message));
    }
    for (value, name, max) in [
        (&script.min_prefix_v4, "script.min_prefix_v4", 32),
        (&script.min_prefix_v6, "script.min_prefix_v6", 128),
    ] {
        if !(1..=max).contains(value.get_ref()) {
            let message = format!("{} is outside 1..{max}", value.get_ref());
            return Err(errors.spanned(value, key(name), message));
        }
    }
    Ok(knock_ports)
}

/// A fixed sequence: not empty, not too long, not guessable by a scan, and
/// every port used by nothing else.
fn check_sequence(
    sequence: &Spanned<Vec<FlowPort>>,
    policy: &RawPolicy,
    roles: &Roles,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let name = policy.name.get_ref();
    let fail = |message: String| Err(errors.spanned(sequence, key("sequence"), message));
    let ports = sequence.get_ref();
    if ports.is_empty() {
        return fail("the sequence is empty: give at least one knock port".to_owned());
    }
    if ports.len() > MAX_SEQUENCE_LEN {
        return fail(format!(
            "the sequence has {} ports; at most {MAX_SEQUENCE_LEN} are supported",
            ports.len()
        ));
    }
    if !policy.allow_weak_sequence && is_consecutive(ports) {
        let list: Vec<String> = ports.iter().map(FlowPort::to_string).collect();
        return fail(format!(
            "the sequence {} is consecutive ports: a port scan in order knocks it by itself; \
             scatter the ports, or set allow_weak_sequence = true",
            list.join(", ")
        ));
    }
    for (step, &port) in ports.iter().enumerate() {
        let conflict = if ports[..step].contains(&port) {
            Some("a port that appears earlier in the same sequence".to_owned())
        } else if let Some(owner) = roles.open.get(&port) {
            Some(PortUse::Open(owner).to_string())
        } else if policy
            .close_port
            .as_ref()
            .is_some_and(|c| *c.get_ref() == port)
        {
            Some(PortUse::Close(name).to_string())
        } else {
            roles.claimed_or_ranged(port).map(|used| used.to_string())
        };
        if let Some(conflict) = conflict {
            return fail(format!("knock port {port} is also {conflict}"));
        }
    }
    Ok(())
}

/// Whether the ports, all of one protocol, step by +1 or by -1 throughout
/// (two or more ports): a scan of that protocol in order knocks them.
fn is_consecutive(sequence: &[FlowPort]) -> bool {
    if sequence.windows(2).any(|w| w[0].proto() != w[1].proto()) {
        return false;
    }
    let steps: Vec<i32> = sequence
        .windows(2)
        .map(|w| i32::from(w[1].number()) - i32::from(w[0].number()))
        .collect();
    !steps.is_empty() && (steps.iter().all(|&d| d == 1) || steps.iter().all(|&d| d == -1))
}

/// The roles given so far, by the policies before the one being checked
/// (open ports: by every policy).
#[derive(Default)]
struct Roles<'a> {
    open: HashMap<FlowPort, &'a str>,
    claimed: HashMap<FlowPort, PortUse<'a>>,
    ranges: Vec<(PortRange, &'a str)>,
}

impl<'a> Roles<'a> {
    fn claimed_or_ranged(&self, port: FlowPort) -> Option<PortUse<'a>> {
        self.claimed.get(&port).copied().or_else(|| {
            self.ranges
                .iter()
                .find(|(range, _)| range.contains(port))
                .map(|(_, owner)| PortUse::Rotating(owner))
        })
    }

    /// What `port` is used for already, if anything.
    fn role_of(&self, port: FlowPort) -> Option<PortUse<'a>> {
        self.open
            .get(&port)
            .map(|owner| PortUse::Open(owner))
            .or_else(|| self.claimed_or_ranged(port))
    }

    /// The lowest port of `range` used already, and its use.
    fn in_range(&self, range: PortRange) -> Option<(FlowPort, PortUse<'a>)> {
        let lowest = |uses: &mut dyn Iterator<Item = (FlowPort, PortUse<'a>)>| {
            uses.filter(|&(port, _)| range.contains(port))
                .min_by_key(|&(port, _)| port)
        };
        lowest(
            &mut self
                .open
                .iter()
                .map(|(&port, owner)| (port, PortUse::Open(owner))),
        )
        .or_else(|| lowest(&mut self.claimed.iter().map(|(&port, &used)| (port, used))))
        .or_else(|| {
            self.ranges
                .iter()
                .find(|(other, _)| other.overlaps(range))
                .map(|(other, owner)| (other.first().max(range.first()), PortUse::Rotating(owner)))
        })
    }
}

/// Where a port is used, to name the conflict in an error.
#[derive(Clone, Copy)]
enum PortUse<'a> {
    Knock(&'a str),
    Close(&'a str),
    Open(&'a str),
    Rotating(&'a str),
}

impl fmt::Display for PortUse<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortUse::Knock(policy) => write!(f, "a knock port of policy \"{policy}\""),
            PortUse::Close(policy) => write!(f, "the close port of policy \"{policy}\""),
            PortUse::Open(policy) => write!(f, "an open port of policy \"{policy}\""),
            PortUse::Rotating(policy) => {
                write!(f, "in the rotating range of policy \"{policy}\"")
            }
        }
    }
}
