//! What the cluster keeps in etcd, and the keys it keeps it under. Pure:
//! the text of keys and values, both ways.
//!
//! - `PREFIX/grants/POLICY/SUBJECT`: a cluster policy's grant for SUBJECT
//!   (`10.0.0.2`, or `10.0.0.0/24` for a network grant), made on the node
//!   named in the value, with a lease for the time it has left. A revoked
//!   grant leaves a tombstone naming the node and the reason, so that a
//!   node that was away learns of it when it reads the prefix again.
//! - `PREFIX/windows/POLICY/WINDOW`: a rotating window claimed by a node,
//!   with a lease for as long as the window is accepted.
//! - `PREFIX/spa/POLICY/DIGEST`: an SPA packet claimed by a node, by the
//!   first 16 bytes of its SHA-256 in hex, with a lease for as long as the
//!   packet could pass the age check.
//! - `PREFIX/nodes/NAME`: the running instance that holds node name NAME,
//!   with a lease it renews: a second instance under the same name sees it
//!   and stays out of the fleet until the name is free.

use std::net::IpAddr;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Scope;
use crate::engine::{grant_ports, GrantError, GrantLeft, GrantRecord, Origin, Policies, PolicyKey};
use crate::flow::PortRange;

/// Values past this size are not read: a grant's record takes a few
/// hundred bytes.
pub const MAX_RECORD_BYTES: usize = 4096;

/// Whom a grant lets in: an address, or a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subject {
    pub src: IpAddr,
    pub prefix: Option<u8>,
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix {
            Some(prefix) => write!(f, "{}/{prefix}", self.src),
            None => write!(f, "{}", self.src),
        }
    }
}

impl std::str::FromStr for Subject {
    type Err = ();

    fn from_str(text: &str) -> Result<Subject, ()> {
        let (src, prefix) = match text.split_once('/') {
            Some((src, prefix)) => (src, Some(prefix.parse().map_err(|_| ())?)),
            None => (text, None),
        };
        Ok(Subject {
            src: src.parse().map_err(|_| ())?,
            prefix,
        })
    }
}

/// A grant's key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Shared {
    Granted {
        node: String,
        /// The policy's open ports it opens.
        ports: Vec<PortRange>,
        /// When it ends, in Unix milliseconds; `None`: at the close knock.
        until: Option<u64>,
        /// When it was written, in Unix milliseconds: the propagation's start.
        at: u64,
        /// The SPA user an SPA grant is for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    Revoked {
        node: String,
        reason: String,
        /// The end of the grant it ended, as that node had it: a grant made
        /// since ends later, and stays.
        until: Option<u64>,
        at: u64,
    },
}

impl Shared {
    pub fn node(&self) -> &str {
        match self {
            Shared::Granted { node, .. } | Shared::Revoked { node, .. } => node,
        }
    }
}

/// A node's name's key's value: which running instance holds the name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeName {
    pub instance: String,
}

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    grants: String,
    windows: String,
    spa: String,
    nodes: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            grants: format!("{prefix}/grants/"),
            windows: format!("{prefix}/windows/"),
            spa: format!("{prefix}/spa/"),
            nodes: format!("{prefix}/nodes/"),
        }
    }

    /// Where every grant is: what a node reads and watches.
    pub fn grants(&self) -> &str {
        &self.grants
    }

    pub fn grant(&self, policy: &str, subject: Subject) -> String {
        format!("{}{policy}/{subject}", self.grants)
    }

    /// Where a node holds its name while it runs.
    pub fn node(&self, name: &str) -> String {
        format!("{}{name}", self.nodes)
    }

    pub fn window(&self, policy: &str, window: u64) -> String {
        format!("{}{policy}/{window}", self.windows)
    }

    pub fn spa_packet(&self, policy: &str, digest: u128) -> String {
        format!("{}{policy}/{digest:032x}", self.spa)
    }

    /// The policy and subject of a grant's key.
    pub fn parse_grant<'k>(&self, key: &'k [u8]) -> Option<(&'k str, Subject)> {
        let key = std::str::from_utf8(key).ok()?;
        let (policy, subject) = key.strip_prefix(&self.grants)?.split_once('/')?;
        Some((policy, subject.parse().ok()?))
    }
}

/// A grant record of another node, as this node takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// This node's own write, or a grant that has ended: nothing to do.
    Nothing,
    /// A grant to adopt, held to the local policy by the engine; its
    /// origin is the caller's to name.
    Grant {
        record: GrantRecord,
        node: String,
        /// When it was written, Unix milliseconds.
        at: u64,
    },
    /// A revocation of the grant of `subject` that ended at `until`.
    Revoke {
        policy: PolicyKey,
        subject: Subject,
        node: String,
        until: Option<u64>,
    },
}

/// Why a record was not applied: the `reason` label of
/// `knockq_cluster_records_refused_total`, and what a person reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub why: String,
}

impl Refusal {
    pub fn new(reason: &'static str, why: String) -> Refusal {
        Refusal { reason, why }
    }

    pub fn grant(error: GrantError) -> Refusal {
        Refusal::new(error.reason(), error.to_string())
    }
}

/// What the record at `key` with `value` is to node `local`, under the
/// policies in force, at Unix time `now` (milliseconds): refused unless it
/// reads as a record of a cluster policy here, with ports among its open
/// ports. Pure: the engine's bounds come when the grant is adopted.
pub fn take(
    keys: &Keys,
    local: &str,
    policies: &Policies,
    key: &[u8],
    value: &[u8],
    now: u64,
) -> Result<Taken, Refusal> {
    if value.len() > MAX_RECORD_BYTES {
        let why = format!("{} bytes, more than {MAX_RECORD_BYTES}", value.len());
        return Err(Refusal::new("size", why));
    }
    let (name, subject) = keys
        .parse_grant(key)
        .ok_or_else(|| Refusal::new("key", "not POLICY/ADDRESS or POLICY/NETWORK".into()))?;
    let shared: Shared =
        serde_json::from_slice(value).map_err(|e| Refusal::new("value", e.to_string()))?;
    // This node's own writes: it applied them when it made them.
    if shared.node() == local {
        return Ok(Taken::Nothing);
    }
    let (policy_key, policy) = policies
        .by_name(name)
        .and_then(|key| Some((key, policies.get(key)?)))
        .ok_or_else(|| Refusal::new("policy", format!("no policy \"{name}\" here")))?;
    if policy.scope != Scope::Cluster {
        let why = format!("policy \"{name}\" is not of scope \"cluster\" here");
        return Err(Refusal::new("scope", why));
    }
    Ok(match shared {
        Shared::Granted {
            node,
            ports,
            until,
            at,
            user,
        } => {
            let left = match until {
                None => GrantLeft::UntilClosed,
                Some(until) if until > now => GrantLeft::For(Duration::from_millis(until - now)),
                Some(_) => return Ok(Taken::Nothing),
            };
            let record = GrantRecord {
                src: subject.src,
                prefix: subject.prefix,
                policy: policy_key,
                left,
                ports: grant_ports(policy, &ports).map_err(Refusal::grant)?,
                stage: 0,
                origin: Origin::LOCAL,
                user: user
                    .map(|name| {
                        policies.user_key(policy_key, &name).ok_or_else(|| {
                            let why = format!(
                                "no SPA user \"{name}\" of policy \"{}\" here",
                                policy.name
                            );
                            Refusal::new("user", why)
                        })
                    })
                    .transpose()?,
            };
            // A write time from the future is taken as now.
            Taken::Grant {
                record,
                node,
                at: at.min(now),
            }
        }
        Shared::Revoked { node, until, .. } => Taken::Revoke {
            policy: policy_key,
            subject,
            node,
            until,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::FlowPort;

    #[test]
    fn grant_keys_read_back_as_their_policy_and_subject() {
        let keys = Keys::new("/knockq");
        for subject in ["10.0.0.2", "10.0.0.0/24", "fd00::2", "fd00::/64"] {
            let subject: Subject = subject.parse().unwrap();
            let key = keys.grant("ssh", subject);
            assert_eq!(keys.parse_grant(key.as_bytes()), Some(("ssh", subject)));
        }
        assert_eq!(
            keys.grant("ssh", "10.0.0.0/24".parse().unwrap()),
            "/knockq/grants/ssh/10.0.0.0/24"
        );
        assert_eq!(keys.window("daily", 7), "/knockq/windows/daily/7");
        assert_eq!(keys.parse_grant(b"/knockq/windows/daily/7"), None);
        assert_eq!(keys.parse_grant(b"/knockq/grants/ssh/not-an-address"), None);
        assert_eq!(keys.parse_grant(b"/other/grants/ssh/10.0.0.2"), None);
    }

    #[test]
    fn values_are_json_tagged_by_state() {
        let granted = Shared::Granted {
            node: "bastion-1".into(),
            ports: vec![
                PortRange::single(FlowPort::tcp(22)),
                PortRange::single(FlowPort::tcp(8080)),
            ],
            until: None,
            at: 1,
            user: None,
        };
        let text = serde_json::to_string(&granted).unwrap();
        assert_eq!(
            text,
            r#"{"state":"granted","node":"bastion-1","ports":[22,8080],"until":null,"at":1}"#
        );
        assert_eq!(serde_json::from_str::<Shared>(&text).unwrap(), granted);
        let revoked: Shared =
            serde_json::from_str(r#"{"state":"revoked","node":"b","reason":"admin","at":2}"#)
                .unwrap();
        assert_eq!(revoked.node(), "b");
    }
}
