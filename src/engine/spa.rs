//! The fourth kind of knock: one single packet authorization datagram. The
//! wire format is `crate::spa`'s; here a packet finds its user, is checked
//! against the user and the policy, and grants its source, all before its
//! verdict, so the very next SYN from the source is accepted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::source;
use super::{
    Decision, Engine, Event, EventKind, EventSink, GrantScope, Origin, Policies, PolicyId,
    PolicyKey, PortMask, Reason, SpaOutcome, Timestamp,
};
use crate::config::{Knock, Policy, Scope, Spa, SpaUser};
use crate::flow::PortRange;
use crate::spa::{self, Refusal};

/// SHA-256 digests of accepted packets, each kept until the packet could no
/// longer pass the age check. Bounded: a full cache refuses new packets
/// rather than forget young ones, which could then be replayed.
#[derive(Default)]
pub(super) struct Replays {
    /// (policy, digest) → Unix seconds after which the packet is too old.
    seen: Mutex<HashMap<(PolicyKey, [u8; 32]), u64>>,
}

impl Replays {
    /// Records `digest`; the outcome that refuses it, if any.
    fn claim(
        &self,
        key: (PolicyKey, [u8; 32]),
        until: u64,
        unix_secs: u64,
        capacity: usize,
    ) -> Option<SpaOutcome> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(&key).is_some_and(|&end| end >= unix_secs) {
            return Some(SpaOutcome::Replayed);
        }
        if seen.len() >= capacity {
            seen.retain(|_, &mut end| end >= unix_secs);
            if seen.len() >= capacity {
                return Some(SpaOutcome::CacheFull);
            }
        }
        seen.insert(key, until);
        None
    }

    pub(super) fn prune(&self, unix_secs: u64, in_force: impl Fn(PolicyKey) -> bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|&(policy, _), &mut end| end >= unix_secs && in_force(policy));
    }

    pub(super) fn list(&self) -> Vec<(PolicyKey, [u8; 32], u64)> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .map(|(&(policy, digest), &until)| (policy, digest, until))
            .collect()
    }

    pub(super) fn restore(&self, policy: PolicyKey, digest: [u8; 32], until: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert((policy, digest), until);
    }
}

impl Engine {
    /// Decides one datagram to policy `id`'s SPA port: dropped whatever
    /// becomes of it, with one `Spa` event saying what did.
    pub(super) fn decide_spa(
        &self,
        policies: &Policies,
        id: PolicyId,
        src: IpAddr,
        port: u16,
        payload: &[u8],
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Decision {
        let policy = &policies.list()[usize::from(id)];
        let Knock::Spa(spa) = &policy.knock else {
            unreachable!("an SPA port belongs to an SPA policy");
        };
        let key = policies.key(id);
        let (user, untried) = find_user(spa, src, port, payload);
        let outcome = match user {
            Err(outcome) => outcome,
            Ok(index) => {
                let unix_secs = self.wall_clock().unix_millis(now) / 1000;
                let user = &spa.users[index];
                match self.authorize(key, policy, spa, user, src, payload, unix_secs) {
                    Err(outcome) => outcome,
                    Ok(grant) => {
                        let scope = GrantScope {
                            prefix: None,
                            ports: grant.ports,
                            until: source::grant_end(grant.duration, now),
                            origin: Origin::LOCAL,
                            user: Some(policies.user_keys(id)[index]),
                        };
                        if policy.scope == Scope::Cluster {
                            // The cluster claims it, then says what became of it.
                            let digest = u128::from_be_bytes(
                                grant.digest[..16].try_into().expect("16 bytes"),
                            );
                            events.event(Event {
                                src,
                                policy: key,
                                kind: EventKind::SpaClaim { digest },
                                grant: scope,
                            });
                            return Decision::reject(Reason::Spa);
                        }
                        self.open_spa_grant(src, key, scope, now, events)
                    }
                }
            }
        };
        events.event(Event {
            src,
            policy: key,
            kind: EventKind::Spa { outcome, untried },
            grant: GrantScope {
                prefix: None,
                ports: PortMask::ALL,
                until: source::NEVER,
                origin: Origin::LOCAL,
                user: None,
            },
        });
        Decision::reject(Reason::Spa)
    }

    /// What an authentic packet of `user` grants, or why it grants nothing.
    #[allow(clippy::too_many_arguments)]
    fn authorize(
        &self,
        key: PolicyKey,
        policy: &Policy,
        spa: &Spa,
        user: &SpaUser,
        src: IpAddr,
        payload: &[u8],
        unix_secs: u64,
    ) -> Result<SpaGrant, SpaOutcome> {
        let message = spa::open(payload, &user.keys).map_err(|refusal| match refusal {
            Refusal::Type(_) => SpaOutcome::RefusedType,
            Refusal::Malformed(_) => SpaOutcome::Malformed,
        })?;
        if message.user != user.name {
            return Err(SpaOutcome::UnknownUser);
        }
        if user.expired(unix_secs) {
            return Err(SpaOutcome::ExpiredUser);
        }
        if message.timestamp.abs_diff(unix_secs) > spa.max_age.as_secs() {
            return Err(SpaOutcome::TooOld);
        }
        let any_source = message.access.any_source();
        if (any_source && user.require_source_address)
            || (!any_source && !same_address(message.access.addr, src))
        {
            return Err(SpaOutcome::RefusedAddress);
        }
        let allowed: Vec<PortRange> = message
            .access
            .ports
            .iter()
            .filter(|&&port| {
                user.open_ports.is_empty() || user.open_ports.iter().any(|r| r.contains(port))
            })
            .map(|&port| PortRange::single(port))
            .collect();
        // Ports outside the policy's open_ports have no mask bit: left out.
        let ports: Vec<PortRange> = allowed
            .into_iter()
            .filter(|&port| PortMask::of(&policy.open_ports, &[port]).is_ok())
            .collect();
        if ports.is_empty() {
            return Err(SpaOutcome::RefusedPort);
        }
        let mask = PortMask::of(&policy.open_ports, &ports).expect("filtered above");
        let asked = message
            .timeout
            .filter(|&secs| secs > 0)
            .map(|secs| Duration::from_secs(u64::from(secs)))
            .or(policy.grant_timeout);
        let duration = match (asked, user.max_timeout) {
            (Some(asked), Some(max)) => Some(asked.min(max)),
            (None, Some(max)) => Some(max),
            (asked, None) => asked,
        };
        let digest: [u8; 32] = Sha256::digest(payload).into();
        let until = message.timestamp.saturating_add(spa.max_age.as_secs());
        if let Some(refused) = self
            .replays
            .claim((key, digest), until, unix_secs, spa.replay_cache)
        {
            return Err(refused);
        }
        Ok(SpaGrant {
            ports: mask,
            duration,
            digest,
        })
    }

    /// Opens the SPA grant `scope` for `src` under policy `key`; the
    /// outcome.
    fn open_spa_grant(
        &self,
        src: IpAddr,
        key: PolicyKey,
        scope: GrantScope,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> SpaOutcome {
        let user = scope.user.expect("an SPA grant has its user");
        let opened = self.sources.update(src, true, events, |state, events| {
            state.slot_or_insert(key, now).spa_grant(
                scope.until,
                scope.ports,
                user,
                &mut |kind, grant| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                        grant,
                    })
                },
            )
        });
        match opened {
            Some(()) => SpaOutcome::Granted,
            // A table full of grants: nothing to open with.
            None => SpaOutcome::CacheFull,
        }
    }

    /// What became of a cluster policy's packet (an `SpaClaim` event): the
    /// cluster claimed it (`Some(true)`), another node had (`Some(false)`),
    /// or etcd could not be reached (`None`). Its grant opens only if
    /// claimed and its policy is still in force.
    pub fn spa_claimed(
        &self,
        claim: &Event,
        claimed: Option<bool>,
        now: Timestamp,
        events: &mut impl EventSink,
    ) {
        let in_force = self.policies.load().get(claim.policy).is_some();
        let outcome = match claimed {
            Some(true) if in_force => {
                self.open_spa_grant(claim.src, claim.policy, claim.grant, now, events)
            }
            Some(true) => return,
            Some(false) => SpaOutcome::Replayed,
            None => SpaOutcome::Unclaimed,
        };
        events.event(Event {
            kind: EventKind::Spa {
                outcome,
                untried: 0,
            },
            grant: GrantScope {
                user: None,
                ..claim.grant
            },
            ..*claim
        });
    }

    /// The digests of accepted SPA packets still young enough to pass.
    pub fn spa_replays(&self) -> Vec<(PolicyKey, [u8; 32], u64)> {
        self.replays.list()
    }

    /// Marks a packet accepted again after a restart.
    pub fn restore_spa_replay(&self, policy: PolicyKey, digest: [u8; 32], until: u64) {
        self.replays.restore(policy, digest, until);
    }
}

struct SpaGrant {
    ports: PortMask,
    /// `None`: until closed.
    duration: Option<Duration>,
    /// The SHA-256 of the datagram.
    digest: [u8; 32],
}

/// The user whose HMAC key authenticates `payload`, among those that send
/// to `port` (their own, or the policy's for users without one) and may
/// send from `src`, trying at most `max_candidates`; and how many the cap
/// left untried.
fn find_user(
    spa: &Spa,
    src: IpAddr,
    port: u16,
    payload: &[u8],
) -> (Result<usize, SpaOutcome>, u16) {
    let mut candidates = 0usize;
    let mut tried = 0usize;
    for (index, user) in spa.users.iter().enumerate() {
        if user.port.unwrap_or(spa.port) != port {
            continue;
        }
        if !user.sources.is_empty() && !user.sources.iter().any(|net| net.contains(&src)) {
            continue;
        }
        candidates += 1;
        if tried == spa.max_candidates {
            continue;
        }
        tried += 1;
        if spa::authentic(payload, &user.keys) {
            return (Ok(index), 0);
        }
    }
    let untried = u16::try_from(candidates - tried).unwrap_or(u16::MAX);
    match candidates {
        0 => (Err(SpaOutcome::RefusedSource), 0),
        _ => (Err(SpaOutcome::BadHmac), untried),
    }
}

/// Whether the address a message names is the packet's source; an IPv4
/// source may be written either way.
fn same_address(named: IpAddr, src: IpAddr) -> bool {
    named.to_canonical() == src.to_canonical()
}
