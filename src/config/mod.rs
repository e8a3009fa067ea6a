//! The configuration file: what it says. `mod.rs` holds the data (the
//! sections, the policies and their knocks); `file.rs` the TOML as written,
//! in serde shapes that refuse unknown keys, with spans; `sections.rs` the
//! settings beside the policies; `read.rs` the reading, the structure
//! checked (names, one knock per policy, hooks, scope) and the files it
//! names (secrets, scripts) read; `cluster.rs` the `[cluster]` section.
//! What the policies mean, and the refusals
//! that follow from it (a port with two roles, a guessable sequence, a
//! script's bounds), are the engine's (`engine::check`); `crate::loader`
//! runs the whole. Every error names the file, the line and the key, on one
//! line.

mod cluster;
mod file;
mod read;
mod sections;
mod spa;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::flow::{FlowPort, PortRange, Proto};
use crate::rotating::{Rotating, Secret};
pub use cluster::{ClusterConfig, Offline, Scope};
pub(crate) use file::{optional_duration, ErrorContext, RawPolicy, RawRotating, RawScript};
pub use read::{read, Document};
pub use sections::*;
pub(crate) use spa::{field, RawSpa};
pub use spa::{Spa, SpaUser};

/// A configuration, as its file says it: read, its structure checked and
/// the files it names read (see `crate::loader` for the whole check).
#[derive(Debug, Clone)]
pub struct Config {
    pub queue: QueueConfig,
    pub verdict: VerdictConfig,
    pub limits: LimitsConfig,
    pub metrics: MetricsConfig,
    pub control: ControlConfig,
    pub state: StateConfig,
    pub rules: RulesConfig,
    pub hooks: HooksConfig,
    pub cluster: Option<ClusterConfig>,
    pub policies: Vec<Policy>,
}

impl Config {
    /// How long a source stays in the kernel's knocking set after a knock
    /// ([rules] offload): the longest step window in whole seconds, and one
    /// more, so every source with progress in the engine is in it (the
    /// kernel adds it a moment before the engine decides the knock).
    pub fn knocking_window(&self) -> Duration {
        let longest = self.policies.iter().map(|p| p.step_timeout).max();
        Duration::from_secs(longest.unwrap_or_default().as_secs_f64().ceil() as u64 + 1)
    }

    /// The UDP ports whose new flows need a decision, and so the queue
    /// rule sends to the daemon; other UDP traffic never enters the queue.
    pub fn decided_udp_ports(&self) -> Vec<PortRange> {
        let udp = self
            .policies
            .iter()
            .flat_map(Policy::ports)
            .filter(|range| range.proto() == Proto::Udp);
        crate::flow::merge(udp.flat_map(PortRange::iter))
    }

    /// The first setting a running daemon cannot take on without a restart,
    /// if `new` changes one.
    pub fn needs_restart_for(&self, new: &Config) -> Option<&'static str> {
        [
            ("[queue]", self.queue != new.queue),
            (
                "[verdict] (it lives in the firewall rules)",
                self.verdict != new.verdict,
            ),
            (
                "[rules] (it lives in the firewall rules)",
                self.rules != new.rules,
            ),
            ("[limits]", self.limits != new.limits),
            ("[metrics]", self.metrics != new.metrics),
            ("[control]", self.control != new.control),
            ("[state]", self.state != new.state),
            ("[hooks]", self.hooks != new.hooks),
            ("[cluster]", self.cluster != new.cluster),
            (
                "the UDP ports (they live in the firewall rules)",
                self.decided_udp_ports() != new.decided_udp_ports(),
            ),
            (
                "the longest step_timeout, beyond the kernel's knocking set timeout ([rules] offload)",
                self.rules.offload && new.knocking_window() > self.knocking_window(),
            ),
        ]
        .into_iter()
        .find_map(|(section, changed)| changed.then_some(section))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub knock: Knock,
    pub step_timeout: Duration,
    pub open_ports: Vec<PortRange>,
    pub close_port: Option<FlowPort>,
    /// `None`: open until the close knock.
    pub grant_timeout: Option<Duration>,
    pub strict: bool,
    pub hooks: PolicyHooks,
    pub scope: Scope,
    pub offline: Offline,
}

impl Policy {
    /// Every port the policy gives a role: its knock, close and open ports.
    pub fn ports(&self) -> impl Iterator<Item = PortRange> + '_ {
        let knock: Vec<PortRange> = match &self.knock {
            Knock::Fixed(sequence) => sequence.iter().copied().map(PortRange::single).collect(),
            Knock::Rotating(rotating) => vec![rotating.ports],
            Knock::Script(script) => script.knock_ports.clone(),
            Knock::Spa(spa) => std::iter::once(spa.port)
                .chain(spa.users.iter().filter_map(|user| user.port))
                .map(|port| PortRange::single(FlowPort::udp(port)))
                .collect(),
        };
        knock
            .into_iter()
            .chain(self.close_port.map(PortRange::single))
            .chain(self.open_ports.iter().copied())
    }
}

/// Commands run when a grant of the policy opens or ends: argument vectors,
/// no shell, with [`HOOK_PLACEHOLDERS`] filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyHooks {
    pub on_grant: Option<Vec<String>>,
    pub on_revoke: Option<Vec<String>>,
}

/// What a hook's arguments may hold: `{source}` (the address, or the network
/// of a prefix grant), `{prefix}` (its length), `{policy}`, `{ports}`
/// (comma-separated), `{reason}` and `{end}` (Unix time the grant ends, or
/// `never`).
pub const HOOK_PLACEHOLDERS: [&str; 6] = ["source", "prefix", "policy", "ports", "reason", "end"];

/// The ports a policy's knock is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Knock {
    /// The same ports every time.
    Fixed(Vec<FlowPort>),
    /// New ports every period, derived from a shared secret.
    Rotating(Rotating),
    /// Whatever a script decides, on the ports it declares.
    Script(Script),
    /// One encrypted, authenticated datagram per grant, one key per user.
    Spa(Spa),
}

impl Knock {
    /// Ports per sequence.
    pub fn sequence_len(&self) -> usize {
        match self {
            Knock::Fixed(sequence) => sequence.len(),
            Knock::Rotating(rotating) => usize::from(rotating.length),
            // A script's stages have no fixed end; one packet is all of SPA.
            Knock::Script(_) | Knock::Spa(_) => 0,
        }
    }

    /// What a saved grant remembers of the knock, so it comes back only
    /// under the same one: the description, and for a script a digest of
    /// its text.
    pub fn identity(&self) -> String {
        match self {
            Knock::Script(script) => format!("{} sha256:{}", self.describe(), script.digest()),
            _ => self.describe(),
        }
    }

    /// Whether `stage` is progress still to be completed.
    pub fn in_progress(&self, stage: u8) -> bool {
        match self {
            Knock::Script(_) => stage > 0,
            Knock::Spa(_) => false,
            _ => stage > 0 && usize::from(stage) < self.sequence_len(),
        }
    }

    /// The knock for people: `1111 2222` or `rotating: 3 ports of 20000-59999 every 30s`.
    pub fn describe(&self) -> String {
        match self {
            Knock::Fixed(sequence) => {
                let ports: Vec<String> = sequence.iter().map(FlowPort::to_string).collect();
                ports.join(" ")
            }
            Knock::Rotating(r) => format!(
                "rotating: {} ports of {} every {}",
                r.length,
                r.ports,
                humantime::format_duration(r.period)
            ),
            Knock::Script(script) => format!(
                "script {} on {}",
                script.file.display(),
                script.describe_ports()
            ),
            Knock::Spa(spa) => format!("spa on {}", FlowPort::udp(spa.port)),
        }
    }
}

/// A script policy's settings (`[policy.script]`) and its source text;
/// the Luau host (`crate::script`) runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub file: PathBuf,
    /// Read once when the configuration is loaded; every worker compiles
    /// this same text.
    pub source: Arc<str>,
    pub knock_ports: Vec<PortRange>,
    /// The policy's open ports, which grants may name.
    pub open_ports: Vec<PortRange>,
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
    /// The first 8 bytes of the SHA-256 of the text, in hex.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(self.source.as_bytes());
        hash[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `1111 2222 20000-20999`
    pub fn describe_ports(&self) -> String {
        let ranges: Vec<String> = self.knock_ports.iter().map(PortRange::to_string).collect();
        ranges.join(" ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {}{message}", path.display(), Line(*line), Key(key))]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        message: String,
    },
}

struct Line(Option<usize>);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

struct Key<'a>(&'a str);

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            "" => Ok(()),
            key => write!(f, "{key}: "),
        }
    }
}

#[cfg(test)]
mod tests;
