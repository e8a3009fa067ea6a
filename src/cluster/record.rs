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

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::flow::FlowPort;

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
        ports: Vec<FlowPort>,
        /// When it ends, in Unix milliseconds; `None`: at the close knock.
        until: Option<u64>,
        /// When it was written, in Unix milliseconds: the propagation's start.
        at: u64,
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

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    grants: String,
    windows: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            grants: format!("{prefix}/grants/"),
            windows: format!("{prefix}/windows/"),
        }
    }

    /// Where every grant is: what a node reads and watches.
    pub fn grants(&self) -> &str {
        &self.grants
    }

    pub fn grant(&self, policy: &str, subject: Subject) -> String {
        format!("{}{policy}/{subject}", self.grants)
    }

    pub fn window(&self, policy: &str, window: u64) -> String {
        format!("{}{policy}/{window}", self.windows)
    }

    /// The policy and subject of a grant's key.
    pub fn parse_grant<'k>(&self, key: &'k [u8]) -> Option<(&'k str, Subject)> {
        let key = std::str::from_utf8(key).ok()?;
        let (policy, subject) = key.strip_prefix(&self.grants)?.split_once('/')?;
        Some((policy, subject.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ports: vec![FlowPort::tcp(22), FlowPort::tcp(8080)],
            until: None,
            at: 1,
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
