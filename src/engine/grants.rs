//! Grants made other than by a knock: by hand, put back after a restart,
//! taken from another node of the cluster; their revocation, and when the
//! grants of a port end.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::bounds;
use super::prefixes::PrefixGrant;
use super::{
    source, Engine, Event, EventKind, EventSink, GrantLeft, GrantScope, Origin, PolicyKey,
    PortMask, RevokeReason, Timestamp, UserKey,
};
use crate::flow::{FlowPort, PortRange};

/// The source table is at its cap and every tracked source holds a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the source table is full of grants")]
pub struct TableFull;

impl Engine {
    /// Opens a grant for `src` by hand, for `duration` or, without one, for
    /// the policy's grant timeout. Fails when the policy is no longer in
    /// force, `duration` is longer than the policy's own grants last (so
    /// that every grant in force comes back after a restart), or the table
    /// is full of grants.
    pub fn grant(
        &self,
        src: IpAddr,
        key: PolicyKey,
        duration: Option<Duration>,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        let policies = self.policies.load();
        let policy = policies.get(key).ok_or(GrantError::NoSuchPolicy)?;
        if let (Some(duration), Some(longest)) = (duration, bounds::longest_grant(policy)) {
            if duration > longest {
                return Err(GrantError::TooLong { longest });
            }
        }
        let end = source::grant_end(duration.or(policy.grant_timeout), now);
        self.sources
            .update(src, true, events, |source, events| {
                let slot = source.slot_or_insert(key, now);
                slot.grant(end, PortMask::ALL, &mut |kind, grant| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                        grant,
                    })
                });
            })
            .ok_or(GrantError::TableFull(TableFull))
    }

    /// Puts back a grant saved before a restart, with the time it had left.
    pub fn restore(
        &self,
        saved: GrantRecord,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        self.put_grant(saved, EventKind::Restored, now, events)
    }

    /// Applies a grant another node of the cluster made, with the time it
    /// has left. A source granted already keeps its grant, taken over by
    /// the new one's end and origin.
    pub fn adopt(
        &self,
        shared: GrantRecord,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        self.put_grant(shared, EventKind::Granted, now, events)
    }

    /// Puts `record` in place, held to its policy's bounds; a new grant is a
    /// `kind` event.
    fn put_grant(
        &self,
        record: GrantRecord,
        kind: EventKind,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        let policies = self.policies.load();
        let policy = policies
            .get(record.policy)
            .ok_or(GrantError::NoSuchPolicy)?;
        let GrantRecord {
            src,
            prefix,
            policy: key,
            left,
            ports,
            stage,
            origin,
            user,
        } = bounds::bound(policy, record)?;
        let end = match left {
            GrantLeft::For(left) => now.saturating_add(left),
            GrantLeft::UntilClosed => source::NEVER,
        };
        if let Some(prefix) = prefix {
            let net = IpNet::new(src, prefix)
                .map_err(|_| GrantError::BadPrefix)?
                .trunc();
            let grant = PrefixGrant {
                net,
                policy: key,
                ports,
                until: end,
                origin,
            };
            return match self.prefixes.grant(grant, kind, events) {
                true => Ok(()),
                false => Err(GrantError::TableFull(TableFull)),
            };
        }
        self.sources
            .update(src, true, events, |source, events| {
                let slot = source.slot_or_insert(key, now);
                slot.put_grant(end, ports, stage, origin, user, kind, &mut |kind, grant| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                        grant,
                    })
                });
            })
            .ok_or(GrantError::TableFull(TableFull))
    }

    /// Ends the grants of `src`, under one policy or all, and the network
    /// grants that hold it, that `which` picks (a revocation from another
    /// node names the grant it ended, and spares a newer one), for
    /// `reason`; returns how many there were.
    pub fn revoke(
        &self,
        src: IpAddr,
        policy: Option<PolicyKey>,
        reason: RevokeReason,
        which: impl Fn(&GrantScope) -> bool,
        events: &mut impl EventSink,
    ) -> usize {
        let networks = self.prefixes.revoke(src, policy, reason, &which, events);
        let addresses = self
            .sources
            .update(src, false, events, |source, events| {
                let mut revoked = 0;
                for slot in source
                    .slots_mut()
                    .filter(|slot| policy.is_none_or(|p| p == slot.policy))
                    .filter(|slot| which(&slot.scope()))
                {
                    let key = slot.policy;
                    let mut emit = |kind, grant| {
                        events.event(Event {
                            src,
                            policy: key,
                            kind,
                            grant,
                        })
                    };
                    revoked += usize::from(slot.revoke(reason, &mut emit));
                }
                source.remove_empty_slots();
                revoked
            })
            .unwrap_or(0);
        networks + addresses
    }

    /// When the last of the grants that open `port` to `src` ends, at
    /// `now`: the address's own grants, or with `prefix` the network grants
    /// of exactly that network. `None` if no grant opens it.
    pub fn open_until(
        &self,
        src: IpAddr,
        prefix: Option<u8>,
        port: FlowPort,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let policies = self.policies.load();
        // A mask of all ports opens the policy's open ports, not any port.
        let opens = |key: PolicyKey, ports: PortMask| {
            policies
                .get(key)
                .is_some_and(|policy| ports.opens(&policy.open_ports, port))
        };
        match prefix {
            Some(prefix) => {
                let net = IpNet::new(src, prefix).ok()?.trunc();
                let grants = self.prefixes.list(now).into_iter();
                grants
                    .filter(|grant| grant.net == net && opens(grant.policy, grant.ports))
                    .map(|grant| grant.until)
                    .max()
            }
            None => self
                .sources
                .update(src, false, &mut Vec::new(), |source, _| {
                    source
                        .slots()
                        .filter(|slot| slot.is_granted() && opens(slot.policy, slot.scope().ports))
                        .map(|slot| slot.scope().until)
                        .filter(|&until| until > now)
                        .max()
                })
                .flatten(),
        }
    }
}

/// A grant to put in place as it stands: saved before a restart, or made
/// on another node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRecord {
    pub src: IpAddr,
    /// A network grant's prefix length.
    pub prefix: Option<u8>,
    pub policy: PolicyKey,
    pub left: GrantLeft,
    pub ports: PortMask,
    /// A script policy's stage.
    pub stage: u8,
    pub origin: Origin,
    /// The SPA user an SPA grant is for.
    pub user: Option<UserKey>,
}

/// Why a grant was not put in place. Past a grant by hand, each but the
/// full table is a grant from outside asking for more than the policy here
/// could give (`bounds.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the policy is not in force here")]
    NoSuchPolicy,
    #[error("the prefix is longer than the address")]
    BadPrefix,
    #[error("the policy grants addresses, not networks")]
    NetworkGrant,
    #[error("the network is wider than the policy's /{shortest}")]
    TooWide { shortest: u8 },
    #[error("port {0} is not one of the policy's open ports")]
    Port(PortRange),
    #[error("it lasts until closed, and the policy's grants end")]
    UntilClosed,
    #[error("it lasts longer than the policy's longest grant, {}", humantime::format_duration(*longest))]
    TooLong { longest: Duration },
    #[error(transparent)]
    TableFull(TableFull),
}

impl GrantError {
    /// The `reason` label of the refusal counters.
    pub fn reason(self) -> &'static str {
        match self {
            GrantError::NoSuchPolicy => "policy",
            GrantError::BadPrefix => "prefix",
            GrantError::NetworkGrant | GrantError::TooWide { .. } => "network",
            GrantError::Port(_) => "ports",
            GrantError::UntilClosed | GrantError::TooLong { .. } => "end",
            GrantError::TableFull(_) => "table_full",
        }
    }
}
