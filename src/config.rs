//! The TOML configuration: serde structs that refuse unknown keys, and the
//! checks that need the whole file. Every error names the file, the line and
//! the key, on one line.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::engine::{PolicySet, PortMask};
use crate::rotating::{Rotating, Secret};
use crate::script::Script;

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

/// Where grants are saved to survive restarts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub dir: PathBuf,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/knockq";

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

/// How commands on grant and revoke run: off the verdict path, a few at a
/// time, each within a time limit, from a bounded queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// Commands running at once at most.
    #[serde(deserialize_with = "hook_concurrency")]
    pub concurrency: usize,
    /// A command still running after this long is killed.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Commands waiting to run at most; more are dropped and counted.
    #[serde(deserialize_with = "hook_queue")]
    pub queue: usize,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            concurrency: 4,
            timeout: Duration::from_secs(10),
            queue: 256,
        }
    }
}

fn hook_concurrency<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        n @ 1..=64 => Ok(n),
        n => Err(serde::de::Error::custom(format!(
            "concurrency {n} is outside 1..64"
        ))),
    }
}

fn hook_queue<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        n @ 1..=65536 => Ok(n),
        n => Err(serde::de::Error::custom(format!(
            "queue {n} is outside 1..65536"
        ))),
    }
}

/// Extra firewall rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Sources accepted ahead of the queue rule: management networks that
    /// must never be locked out.
    pub always_allow: Vec<IpNet>,
    /// Decide in the kernel what needs no engine: sources neither knocking
    /// nor granted are rejected there, granted (source, port) pairs are
    /// accepted there from sets knockq keeps (src/firewall/sets.rs).
    pub offload: bool,
}

/// The Prometheus scrape endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Loopback by default: the metrics say who is knocking how often.
    pub listen: SocketAddr,
}

/// Port of the scrape endpoint unless configured.
pub const DEFAULT_METRICS_PORT: u16 = 9724;

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT)),
        }
    }
}

/// The Unix control socket for status, grants and revokes by hand.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
}

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/knockq/control.sock";

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// First NFQUEUE number.
    pub num: u16,
    /// Number of queues, one worker thread each.
    #[serde(deserialize_with = "queue_count")]
    pub count: u16,
    /// Let SYNs through while no daemon is bound or a queue is full, instead
    /// of dropping them.
    pub fail_open: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            num: 0,
            count: 1,
            fail_open: false,
        }
    }
}

impl QueueConfig {
    pub fn numbers(&self) -> Range<u16> {
        self.num..self.num + self.count
    }

    pub fn last(&self) -> u16 {
        self.num + (self.count - 1)
    }
}

/// `queue 0` or `queues 0-3`.
impl fmt::Display for QueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.count {
            1 => write!(f, "queue {}", self.num),
            _ => write!(f, "queues {}-{}", self.num, self.last()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerdictConfig {
    pub reject_with: RejectWith,
}

/// How the kernel answers a rejected SYN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectWith {
    #[default]
    IcmpHostProhibited,
    IcmpPortUnreachable,
    IcmpAdminProhibited,
    TcpReset,
    Drop,
}

impl RejectWith {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectWith::IcmpHostProhibited => "icmp-host-prohibited",
            RejectWith::IcmpPortUnreachable => "icmp-port-unreachable",
            RejectWith::IcmpAdminProhibited => "icmp-admin-prohibited",
            RejectWith::TcpReset => "tcp-reset",
            RejectWith::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    #[serde(deserialize_with = "source_cap")]
    pub max_sources: usize,
    /// Network grants (a script's `prefix`) in force at most.
    #[serde(deserialize_with = "prefix_grant_cap")]
    pub max_prefix_grants: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sources: 1_000_000,
            max_prefix_grants: 1024,
        }
    }
}

/// Network grants are checked one by one for each SYN to an open port while
/// any exist: keep them few.
fn prefix_grant_cap<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        n @ 1..=65536 => Ok(n),
        n => Err(serde::de::Error::custom(format!("{n} is outside 1..65536"))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub knock: Knock,
    pub step_timeout: Duration,
    pub open_ports: Vec<u16>,
    pub close_port: Option<u16>,
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
    Fixed(Vec<u16>),
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
                let ports: Vec<String> = sequence.iter().map(u16::to_string).collect();
                ports.join(" ")
            }
            Knock::Rotating(r) => format!(
                "rotating: {} ports of {}-{} every {}",
                r.length,
                r.ports.start(),
                r.ports.end(),
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

/// Longest sequence accepted; the engine counts stages in a byte.
pub const MAX_SEQUENCE_LEN: usize = 64;

/// Fewest ports a rotating range may hold: fewer would make its sequences
/// guessable.
pub const MIN_ROTATING_PORTS: u32 = 256;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    queue: QueueConfig,
    #[serde(default)]
    verdict: VerdictConfig,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    control: ControlConfig,
    #[serde(default)]
    state: StateConfig,
    #[serde(default)]
    rules: RulesConfig,
    #[serde(default)]
    hooks: HooksConfig,
    cluster: Option<RawCluster>,
    #[serde(default, rename = "policy")]
    policies: Vec<RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    sequence: Option<Spanned<Vec<Port>>>,
    rotating: Option<Spanned<RawRotating>>,
    script: Option<Spanned<RawScript>>,
    #[serde(default = "default_step_timeout", deserialize_with = "duration")]
    step_timeout: Duration,
    open_ports: Spanned<Vec<Port>>,
    close_port: Option<Spanned<Port>>,
    #[serde(default, deserialize_with = "optional_duration")]
    grant_timeout: Option<Duration>,
    #[serde(default = "default_strict")]
    strict: bool,
    #[serde(default)]
    allow_weak_sequence: bool,
    on_grant: Option<Spanned<Vec<String>>>,
    on_revoke: Option<Spanned<Vec<String>>>,
    scope: Option<Spanned<Scope>>,
    offline: Option<Spanned<Offline>>,
}

/// `[policy.script]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScript {
    file: Spanned<PathBuf>,
    knock_ports: Spanned<Vec<PortOrRange>>,
    #[serde(default = "default_budget", deserialize_with = "duration")]
    budget: Duration,
    #[serde(default = "default_memory_mib")]
    memory_mib: Spanned<u32>,
    #[serde(default = "default_max_grant", deserialize_with = "duration")]
    max_grant: Duration,
    #[serde(default = "default_min_prefix_v4")]
    min_prefix_v4: Spanned<u8>,
    #[serde(default = "default_min_prefix_v6")]
    min_prefix_v6: Spanned<u8>,
    secret_file: Option<Spanned<PathBuf>>,
}

/// A knock port, or a range of them as `"20000-20999"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortOrRange {
    Port(Port),
    Range(String),
}

fn default_budget() -> Duration {
    Duration::from_millis(1)
}

fn default_memory_mib() -> Spanned<u32> {
    Spanned::new(0..0, 16)
}

fn default_max_grant() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_min_prefix_v4() -> Spanned<u8> {
    Spanned::new(0..0, 16)
}

fn default_min_prefix_v6() -> Spanned<u8> {
    Spanned::new(0..0, 48)
}

/// Longest time budget a script call may have: longer would stall a worker.
const MAX_SCRIPT_BUDGET: Duration = Duration::from_millis(100);

impl RawScript {
    /// Checks the settings, reads the script and loads it once in a sandbox.
    fn validate(
        &self,
        open_ports: &[u16],
        errors: &ErrorContext,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Script, ConfigError> {
        let knock_ports = self
            .knock_ports
            .get_ref()
            .iter()
            .map(|entry| match entry {
                PortOrRange::Port(port) => Ok(port.0..=port.0),
                PortOrRange::Range(text) => parse_port_range(text),
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(|message| {
                errors.spanned(&self.knock_ports, key("script.knock_ports"), message)
            })?;
        if knock_ports.is_empty() {
            let message = "knock_ports is empty: give the ports the script decides".to_owned();
            return Err(errors.spanned(&self.knock_ports, key("script.knock_ports"), message));
        }
        if self.budget > MAX_SCRIPT_BUDGET {
            let message = format!(
                "budget {} is longer than {}: a call that long stalls its queue",
                humantime::format_duration(self.budget),
                humantime::format_duration(MAX_SCRIPT_BUDGET)
            );
            return Err(errors.at(None, key("script.budget"), &message));
        }
        let memory_mib = *self.memory_mib.get_ref();
        if !(1..=1024).contains(&memory_mib) {
            let message = format!("memory_mib {memory_mib} is outside 1..1024");
            return Err(errors.spanned(&self.memory_mib, key("script.memory_mib"), message));
        }
        for (value, name, max) in [
            (&self.min_prefix_v4, "script.min_prefix_v4", 32),
            (&self.min_prefix_v6, "script.min_prefix_v6", 128),
        ] {
            if !(1..=max).contains(value.get_ref()) {
                let message = format!("{} is outside 1..{max}", value.get_ref());
                return Err(errors.spanned(value, key(name), message));
            }
        }
        let secret = self
            .secret_file
            .as_ref()
            .map(|file| {
                Secret::load(&errors.relative_path(file.get_ref()))
                    .map_err(|e| errors.spanned(file, key("script.secret_file"), e.to_string()))
            })
            .transpose()?;
        let file = errors.relative_path(self.file.get_ref());
        let source = std::fs::read_to_string(&file).map_err(|e| {
            errors.spanned(
                &self.file,
                key("script.file"),
                format!("{}: {e}", file.display()),
            )
        })?;
        let script = Script {
            file: file.clone(),
            source: source.into(),
            knock_ports,
            open_ports: open_ports.to_vec(),
            budget: self.budget,
            memory_limit: memory_mib as usize * 1024 * 1024,
            max_grant: self.max_grant,
            min_prefix_v4: *self.min_prefix_v4.get_ref(),
            min_prefix_v6: *self.min_prefix_v6.get_ref(),
            secret,
        };
        // The script's own file and line, as the one line of the error.
        script.check().map_err(|e| ConfigError::Invalid {
            path: file,
            line: e.line,
            key: String::new(),
            message: strip_location(&e.message).to_owned(),
        })?;
        Ok(script)
    }
}

/// A Luau message without its leading `file:line: `, which the error
/// prints itself.
fn strip_location(message: &str) -> &str {
    match message.split_once(".lua:") {
        Some((_, rest)) => match rest.split_once(": ") {
            Some((line, text)) if line.chars().all(|c| c.is_ascii_digit()) => text,
            _ => message,
        },
        None => message,
    }
}

/// A hook's argument vector: a program and its arguments, placeholders
/// among [`HOOK_PLACEHOLDERS`].
fn check_hook(
    hook: &Spanned<Vec<String>>,
    name: &str,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<Vec<String>, ConfigError> {
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
    Ok(argv.clone())
}

/// `[policy.rotating]`, also a client profile's `rotating` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRotating {
    secret_file: Spanned<PathBuf>,
    #[serde(default = "default_rotating_length")]
    length: Spanned<u8>,
    #[serde(default = "default_period", deserialize_with = "duration")]
    period: Duration,
    ports: Spanned<String>,
}

fn default_rotating_length() -> Spanned<u8> {
    Spanned::new(0..0, 3)
}

fn default_period() -> Duration {
    Duration::from_secs(30)
}

impl RawRotating {
    /// Checks the settings and reads the secret; a relative `secret_file` is
    /// taken from the configuration file's directory.
    pub(crate) fn validate(
        &self,
        errors: &ErrorContext,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Rotating, ConfigError> {
        let length = *self.length.get_ref();
        if length == 0 || usize::from(length) > MAX_SEQUENCE_LEN {
            let message = format!("length {length} is outside 1..{MAX_SEQUENCE_LEN}");
            return Err(errors.spanned(&self.length, key("rotating.length"), message));
        }
        let ports = parse_port_range(self.ports.get_ref())
            .map_err(|message| errors.spanned(&self.ports, key("rotating.ports"), message))?;
        let size = u32::from(*ports.end() - *ports.start()) + 1;
        if size < MIN_ROTATING_PORTS.max(u32::from(length)) {
            let message = format!(
                "the range holds {size} ports; rotating knocks need at least {MIN_ROTATING_PORTS}"
            );
            return Err(errors.spanned(&self.ports, key("rotating.ports"), message));
        }
        if self.period < Duration::from_secs(1) {
            let message = "period must be at least 1s".to_owned();
            return Err(errors.at(None, key("rotating.period"), &message));
        }
        let file = errors.relative_path(self.secret_file.get_ref());
        let secret = Secret::load(&file).map_err(|e| {
            errors.spanned(
                &self.secret_file,
                key("rotating.secret_file"),
                e.to_string(),
            )
        })?;
        Ok(Rotating {
            secret,
            length,
            period: self.period,
            ports,
        })
    }
}

/// `20000-59999`, both ends included.
fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let invalid = || format!("\"{text}\" is not a port range such as \"20000-59999\"");
    let (first, last) = text.split_once('-').ok_or_else(invalid)?;
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|&p| p > 0);
    let (first, last) = (
        port(first).ok_or_else(invalid)?,
        port(last).ok_or_else(invalid)?,
    );
    if first > last {
        return Err(format!("port range \"{text}\" ends before it starts"));
    }
    Ok(first..=last)
}

fn default_step_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_strict() -> bool {
    true
}

/// A TCP port, 1..=65535.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Port(pub(crate) u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(port) if port > 0 => Ok(Port(port)),
            _ => Err(serde::de::Error::custom(format!(
                "port {n} is outside 1..65535"
            ))),
        }
    }
}

fn queue_count<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = u16::deserialize(d)?;
    if !(1..=64).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "count {n} is outside 1..64"
        )));
    }
    Ok(n)
}

/// The largest `max_sources`: the state table is allocated at start, about
/// 73 bytes per source, so this takes some 7 GB.
const MAX_SOURCES: usize = 100_000_000;

fn source_cap<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        n if n > MAX_SOURCES => Err(serde::de::Error::custom(format!(
            "at most {MAX_SOURCES}: the state table is allocated at start, about 73 bytes per source"
        ))),
        n => Ok(n),
    }
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    match humantime::parse_duration(&text) {
        Ok(d) if d.is_zero() => Err(serde::de::Error::custom(format!(
            "duration \"{text}\" must be longer than zero"
        ))),
        Ok(d) => Ok(d),
        Err(e) => Err(serde::de::Error::custom(format!(
            "invalid duration \"{text}\": {e} (examples: \"10s\", \"500ms\", \"8h\")"
        ))),
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Validates configuration text read from `path` (for error messages and
/// relative secret file paths).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let errors = ErrorContext { text, path };
    validate(errors.deserialize(text)?, &errors)
}

/// `policy[0].sequence[1]`, without the wrapper fields `Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key: k } if k.starts_with("$__") => {}
            Segment::Map { key: k } | Segment::Enum { variant: k } => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
            }
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Unknown => {}
        }
    }
    key
}

/// A TOML file being read: turns byte spans into `file:line: key: message`.
pub(crate) struct ErrorContext<'a> {
    pub(crate) text: &'a str,
    pub(crate) path: &'a Path,
}

impl ErrorContext<'_> {
    /// The file as `T`, refusing unknown keys, with the key of any error.
    pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(
        &self,
        text: &str,
    ) -> Result<T, ConfigError> {
        let document = toml::Deserializer::parse(text)
            .map_err(|e| self.at(e.span(), String::new(), e.message()))?;
        serde_path_to_error::deserialize(document)
            .map_err(|e| self.at(e.inner().span(), key_path(e.path()), e.inner().message()))
    }

    /// `path` as written in the file, relative to the file's directory.
    fn relative_path(&self, path: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    pub(crate) fn at(&self, span: Option<Range<usize>>, key: String, message: &str) -> ConfigError {
        let line = span.map(|span| {
            let start = span.start.min(self.text.len());
            self.text[..start].matches('\n').count() + 1
        });
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            key,
            message: message.to_owned(),
        }
    }

    pub(crate) fn spanned<T>(
        &self,
        value: &Spanned<T>,
        key: String,
        message: String,
    ) -> ConfigError {
        self.at(Some(value.span()), key, &message)
    }
}

/// Whether the ports step by +1 or by -1 throughout (two or more ports).
fn is_consecutive(sequence: &[Port]) -> bool {
    let steps: Vec<i32> = sequence
        .windows(2)
        .map(|w| i32::from(w[1].0) - i32::from(w[0].0))
        .collect();
    !steps.is_empty() && (steps.iter().all(|&d| d == 1) || steps.iter().all(|&d| d == -1))
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

fn in_range<'a>(ranges: &[(RangeInclusive<u16>, &'a str)], port: u16) -> Option<PortUse<'a>> {
    ranges
        .iter()
        .find(|(range, _)| range.contains(&port))
        .map(|(_, owner)| PortUse::Rotating(owner))
}

/// What `port` is used for already, if anything.
fn port_use<'a>(
    open: &HashMap<u16, &'a str>,
    claimed: &HashMap<u16, PortUse<'a>>,
    ranges: &[(RangeInclusive<u16>, &'a str)],
    port: u16,
) -> Option<PortUse<'a>> {
    open.get(&port)
        .map(|owner| PortUse::Open(owner))
        .or_else(|| claimed.get(&port).copied())
        .or_else(|| in_range(ranges, port))
}

/// A fixed sequence: not empty, not too long, not guessable by a scan, and
/// every port used by nothing else.
fn check_sequence(
    sequence: &Spanned<Vec<Port>>,
    policy: &RawPolicy,
    open: &HashMap<u16, &str>,
    claimed: &HashMap<u16, PortUse>,
    ranges: &[(RangeInclusive<u16>, &str)],
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
        let list: Vec<String> = ports.iter().map(|p| p.0.to_string()).collect();
        return fail(format!(
            "the sequence {} is consecutive ports: a port scan in order knocks it by itself; \
             scatter the ports, or set allow_weak_sequence = true",
            list.join(", ")
        ));
    }
    for (step, port) in ports.iter().enumerate() {
        let port = port.0;
        let conflict = if ports[..step].iter().any(|p| p.0 == port) {
            Some("a port that appears earlier in the same sequence".to_owned())
        } else if let Some(owner) = open.get(&port) {
            Some(PortUse::Open(owner).to_string())
        } else if policy
            .close_port
            .as_ref()
            .is_some_and(|c| c.get_ref().0 == port)
        {
            Some(PortUse::Close(name).to_string())
        } else {
            claimed
                .get(&port)
                .copied()
                .or_else(|| in_range(ranges, port))
                .map(|used| used.to_string())
        };
        if let Some(conflict) = conflict {
            return fail(format!("knock port {port} is also {conflict}"));
        }
    }
    Ok(())
}

fn validate(raw: RawConfig, errors: &ErrorContext) -> Result<Config, ConfigError> {
    if raw.policies.is_empty() {
        return Err(errors.at(
            None,
            "policy".into(),
            "no [[policy]] table: there is nothing to open",
        ));
    }
    if raw.policies.len() > PolicySet::CAPACITY {
        let key = format!("policy[{}]", PolicySet::CAPACITY);
        let message = format!("at most {} policies are supported", PolicySet::CAPACITY);
        return Err(errors.spanned(&raw.policies[PolicySet::CAPACITY].name, key, message));
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

    let cluster = raw.cluster.map(|c| c.validate(errors)).transpose()?;

    // Open ports may be shared; knock and close ports belong to one policy
    // and are never opened, so every port has one meaning for the engine.
    let mut open: HashMap<u16, &str> = HashMap::new();
    for policy in &raw.policies {
        for port in policy.open_ports.get_ref() {
            open.entry(port.0).or_insert(policy.name.get_ref());
        }
    }
    let mut claimed: HashMap<u16, PortUse> = HashMap::new();
    let mut ranges: Vec<(RangeInclusive<u16>, &str)> = Vec::new();
    let mut knocks = Vec::with_capacity(raw.policies.len());
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
        let knock = match (&policy.sequence, &policy.rotating, &policy.script) {
            (Some(sequence), None, None) => {
                check_sequence(sequence, policy, &open, &claimed, &ranges, errors, &key)?;
                for port in sequence.get_ref() {
                    claimed.insert(port.0, PortUse::Knock(name));
                }
                Knock::Fixed(sequence.get_ref().iter().map(|p| p.0).collect())
            }
            (None, Some(rotating), None) => {
                let r = rotating.get_ref().validate(errors, &key)?;
                let conflict = open
                    .iter()
                    .filter(|&(port, _)| r.ports.contains(port))
                    .min_by_key(|&(&port, _)| port)
                    .map(|(&port, owner)| (port, PortUse::Open(owner)))
                    .or_else(|| {
                        claimed
                            .iter()
                            .filter(|&(port, _)| r.ports.contains(port))
                            .min_by_key(|&(&port, _)| port)
                            .map(|(&port, &used)| (port, used))
                    })
                    .or_else(|| {
                        ranges
                            .iter()
                            .find(|(other, _)| {
                                other.start() <= r.ports.end() && r.ports.start() <= other.end()
                            })
                            .map(|(other, owner)| {
                                let overlap = *other.start().max(r.ports.start());
                                (overlap, PortUse::Rotating(owner))
                            })
                    });
                if let Some((port, conflict)) = conflict {
                    let message = format!(
                        "the rotating range {}-{} takes port {port}, which is {conflict}",
                        r.ports.start(),
                        r.ports.end()
                    );
                    return Err(errors.spanned(rotating, key("rotating"), message));
                }
                ranges.push((r.ports.clone(), name));
                Knock::Rotating(r)
            }
            (None, None, Some(script)) => {
                let open_ports: Vec<u16> =
                    policy.open_ports.get_ref().iter().map(|p| p.0).collect();
                if open_ports.len() > PortMask::MAX_PORTS {
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
                let s = script.get_ref().validate(&open_ports, errors, &key)?;
                for port in s.knock_ports.iter().flat_map(Clone::clone) {
                    if let Some(conflict) = port_use(&open, &claimed, &ranges, port) {
                        let message = format!("knock port {port} is also {conflict}");
                        return Err(errors.spanned(
                            &script.get_ref().knock_ports,
                            key("script.knock_ports"),
                            message,
                        ));
                    }
                    claimed.insert(port, PortUse::Knock(name));
                }
                Knock::Script(s)
            }
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
        };
        let hooks = PolicyHooks {
            on_grant: policy
                .on_grant
                .as_ref()
                .map(|hook| check_hook(hook, "on_grant", errors, &key))
                .transpose()?,
            on_revoke: policy
                .on_revoke
                .as_ref()
                .map(|hook| check_hook(hook, "on_revoke", errors, &key))
                .transpose()?,
        };
        check_scope(policy, &knock, cluster.is_some(), errors, &key)?;
        if let Some(close) = &policy.close_port {
            let port = close.get_ref().0;
            // Its own knock ports were checked against it above.
            if let Some(conflict) = port_use(&open, &claimed, &ranges, port) {
                let message = format!("close port {port} is also {conflict}");
                return Err(errors.spanned(close, key("close_port"), message));
            }
            claimed.insert(port, PortUse::Close(name));
        }
        knocks.push((knock, hooks));
    }
    drop(claimed);

    let policies = raw
        .policies
        .into_iter()
        .zip(knocks)
        .map(|(raw, (knock, hooks))| Policy {
            name: raw.name.into_inner(),
            knock,
            step_timeout: raw.step_timeout,
            open_ports: raw
                .open_ports
                .into_inner()
                .into_iter()
                .map(|p| p.0)
                .collect(),
            close_port: raw.close_port.map(|p| p.into_inner().0),
            grant_timeout: raw.grant_timeout,
            strict: raw.strict,
            hooks,
            scope: raw.scope.map(Spanned::into_inner).unwrap_or_default(),
            offline: raw.offline.map(Spanned::into_inner).unwrap_or_default(),
        })
        .collect();
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

/// `scope = "cluster"` needs a `[cluster]`; `offline` is for cluster
/// rotating policies, the only ones that claim windows.
fn check_scope(
    policy: &RawPolicy,
    knock: &Knock,
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
        if !cluster || !matches!(knock, Knock::Rotating(_)) {
            let message = "offline applies to rotating policies with scope \"cluster\" only";
            return Err(errors.spanned(offline, key("offline"), message.to_owned()));
        }
    }
    Ok(())
}

mod cluster;
use cluster::RawCluster;
pub use cluster::{ClusterConfig, Offline, Scope};

#[cfg(test)]
mod tests;
