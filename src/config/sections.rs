//! The sections of the file beside the policies: plain settings, each
//! checked for its range as it is read.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::file::duration;

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
