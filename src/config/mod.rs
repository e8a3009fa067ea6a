//! The configuration file: what it says. The TOML is read into serde
//! shapes that refuse unknown keys (`file.rs`), its structure is checked
//! (names, one knock per policy, hooks, scope), and the files it names
//! (secrets, scripts) are read. What the policies mean, and the refusals
//! that follow from it (a port with two roles, a guessable sequence, a
//! script's bounds), are the engine's (`engine::check`); `crate::loader`
//! runs the whole. Every error names the file, the line and the key, on one
//! line.

mod cluster;
mod file;
mod sections;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use crate::flow::{FlowPort, PortRange};
use crate::rotating::{Rotating, Secret};
pub use cluster::{ClusterConfig, Offline, Scope};
pub(crate) use file::{ErrorContext, RawConfig, RawPolicy, RawRotating, RawScript};
pub use sections::*;

/// A validated configuration.
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
    pub open_ports: Vec<FlowPort>,
    pub close_port: Option<FlowPort>,
    /// `None`: open until the close knock.
    pub grant_timeout: Option<Duration>,
    pub strict: bool,
    pub hooks: PolicyHooks,
    pub scope: Scope,
    pub offline: Offline,
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
}

impl Knock {
    /// Ports per sequence.
    pub fn sequence_len(&self) -> usize {
        match self {
            Knock::Fixed(sequence) => sequence.len(),
            Knock::Rotating(rotating) => usize::from(rotating.length),
            // A script's stages have no fixed end.
            Knock::Script(_) => 0,
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
    pub open_ports: Vec<FlowPort>,
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

/// A configuration file read and its structure checked: what the engine
/// checks the meaning of (`engine::check`) before it becomes a [`Config`].
pub struct Document<'a> {
    pub(crate) errors: ErrorContext<'a>,
    pub(crate) raw: RawConfig,
    cluster: Option<ClusterConfig>,
}

/// Reads configuration text from `path` (for error messages and relative
/// file paths), checking its syntax and structure.
pub fn read<'a>(text: &'a str, path: &'a Path) -> Result<Document<'a>, ConfigError> {
    let errors = ErrorContext { text, path };
    let mut raw: RawConfig = errors.deserialize(text)?;
    if raw.policies.is_empty() {
        return Err(errors.at(
            None,
            "policy".into(),
            "no [[policy]] table: there is nothing to open",
        ));
    }
    if u32::from(raw.queue.num) + u32::from(raw.queue.count) > 1 << 16 {
        return Err(errors.at(
            None,
            "queue".into(),
            &format!(
                "queues {}..{} go past 65535",
                raw.queue.num,
                u32::from(raw.queue.num) + u32::from(raw.queue.count) - 1
            ),
        ));
    }
    let cluster = raw
        .cluster
        .take()
        .map(|c| c.validate(&errors))
        .transpose()?;
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, policy) in raw.policies.iter().enumerate() {
        let name = policy.name.get_ref().as_str();
        let key = |field: &str| format!("policy[{i}].{field}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            let message = format!("name \"{name}\" must be letters, digits, '-' or '_'");
            return Err(errors.spanned(&policy.name, key("name"), message));
        }
        if let Some(first) = names.insert(name, i) {
            let message = format!("policy name \"{name}\" is already used by policy[{first}]");
            return Err(errors.spanned(&policy.name, key("name"), message));
        }
        if policy.open_ports.get_ref().is_empty() {
            let message = "open_ports is empty: give at least one port to open".to_owned();
            return Err(errors.spanned(&policy.open_ports, key("open_ports"), message));
        }
        match (&policy.sequence, &policy.rotating, &policy.script) {
            (Some(_), None, None) | (None, Some(_), None) | (None, None, Some(_)) => {}
            (Some(sequence), _, _) => {
                let message =
                    "give one of sequence, [policy.rotating] or [policy.script]".to_owned();
                return Err(errors.spanned(sequence, key("sequence"), message));
            }
            (None, Some(rotating), Some(_)) => {
                let message = "give one of [policy.rotating] or [policy.script]".to_owned();
                return Err(errors.spanned(rotating, key("rotating"), message));
            }
            (None, None, None) => {
                let message =
                    "no knock: give a sequence of ports, a [policy.rotating] or a [policy.script] table".to_owned();
                return Err(errors.spanned(&policy.name, key("sequence"), message));
            }
        }
        for (hook, name) in [
            (&policy.on_grant, "on_grant"),
            (&policy.on_revoke, "on_revoke"),
        ] {
            if let Some(hook) = hook {
                check_hook(hook, name, &errors, &key)?;
            }
        }
        check_scope(policy, cluster.is_some(), &errors, &key)?;
    }
    Ok(Document {
        errors,
        raw,
        cluster,
    })
}

impl Document<'_> {
    /// The configuration, with the files its policies name read: call once
    /// the engine has checked what the policies mean.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let Document {
            errors,
            raw,
            cluster,
        } = self;
        let mut policies = Vec::with_capacity(raw.policies.len());
        for (i, policy) in raw.policies.into_iter().enumerate() {
            let key = |field: &str| format!("policy[{i}].{field}");
            let open_ports = policy.open_ports.into_inner();
            let knock = match (policy.sequence, &policy.rotating, &policy.script) {
                (Some(sequence), _, _) => Knock::Fixed(sequence.into_inner()),
                (None, Some(rotating), _) => {
                    Knock::Rotating(rotating.get_ref().read(&errors, &key)?)
                }
                (None, None, Some(script)) => {
                    Knock::Script(read_script(script.get_ref(), &open_ports, &errors, &key)?)
                }
                (None, None, None) => unreachable!("read() refuses a policy without a knock"),
            };
            policies.push(Policy {
                name: policy.name.into_inner(),
                knock,
                step_timeout: policy.step_timeout,
                open_ports,
                close_port: policy.close_port.map(Spanned::into_inner),
                grant_timeout: policy.grant_timeout,
                strict: policy.strict,
                hooks: PolicyHooks {
                    on_grant: policy.on_grant.map(Spanned::into_inner),
                    on_revoke: policy.on_revoke.map(Spanned::into_inner),
                },
                scope: policy.scope.map(Spanned::into_inner).unwrap_or_default(),
                offline: policy.offline.map(Spanned::into_inner).unwrap_or_default(),
            });
        }
        Ok(Config {
            queue: raw.queue,
            verdict: raw.verdict,
            limits: raw.limits,
            metrics: raw.metrics,
            control: raw.control,
            state: raw.state,
            rules: raw.rules,
            hooks: raw.hooks,
            cluster,
            policies,
        })
    }
}

/// A script policy's settings, with its text and secret read.
fn read_script(
    raw: &RawScript,
    open_ports: &[FlowPort],
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<Script, ConfigError> {
    let secret = raw
        .secret_file
        .as_ref()
        .map(|file| {
            Secret::load(&errors.relative_path(file.get_ref()))
                .map_err(|e| errors.spanned(file, key("script.secret_file"), e.to_string()))
        })
        .transpose()?;
    let file = errors.relative_path(raw.file.get_ref());
    let source = std::fs::read_to_string(&file).map_err(|e| {
        errors.spanned(
            &raw.file,
            key("script.file"),
            format!("{}: {e}", file.display()),
        )
    })?;
    Ok(Script {
        file,
        source: source.into(),
        knock_ports: raw.knock_ports(errors, key)?,
        open_ports: open_ports.to_vec(),
        budget: raw.budget,
        memory_limit: *raw.memory_mib.get_ref() as usize * 1024 * 1024,
        max_grant: raw.max_grant,
        min_prefix_v4: *raw.min_prefix_v4.get_ref(),
        min_prefix_v6: *raw.min_prefix_v6.get_ref(),
        secret,
    })
}

/// A hook's argument vector: a program and its arguments, placeholders
/// among [`HOOK_PLACEHOLDERS`].
fn check_hook(
    hook: &Spanned<Vec<String>>,
    name: &str,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let argv = hook.get_ref();
    let fail = |message: String| Err(errors.spanned(hook, key(name), message));
    if argv.first().is_none_or(|program| program.is_empty()) {
        return fail(
            "give the program and its arguments, such as [\"/usr/sbin/nft\", ...]".to_owned(),
        );
    }
    for arg in argv {
        let mut rest = arg.as_str();
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let word: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if after[word.len()..].starts_with('}')
                && !word.is_empty()
                && !HOOK_PLACEHOLDERS.contains(&word.as_str())
            {
                return fail(format!(
                    "unknown placeholder {{{word}}} (placeholders: {})",
                    HOOK_PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                ));
            }
            rest = after;
        }
    }
    Ok(())
}

/// `scope = "cluster"` needs a `[cluster]`; `offline` is for cluster
/// rotating policies, the only ones that claim windows.
fn check_scope(
    policy: &RawPolicy,
    clustered: bool,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let scope = policy.scope.as_ref();
    let cluster = scope.is_some_and(|s| *s.get_ref() == Scope::Cluster);
    if let (true, false, Some(scope)) = (cluster, clustered, scope) {
        let message = "scope \"cluster\" needs a [cluster] section naming the etcd endpoints";
        return Err(errors.spanned(scope, key("scope"), message.to_owned()));
    }
    if let Some(offline) = &policy.offline {
        if !cluster || policy.rotating.is_none() {
            let message = "offline applies to rotating policies with scope \"cluster\" only";
            return Err(errors.spanned(offline, key("offline"), message.to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
