//! Grants to whole networks, for sources that knock from one address and
//! connect from another (mobile and carrier-grade NAT users). Few and
//! short-lived: a plain list behind a lock, bounded, which the verdict path
//! reads only while it holds any grant at all.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};

use ipnet::IpNet;

use super::{
    Event, EventKind, EventSink, GrantScope, Origin, PolicyKey, PortMask, RevokeReason, Timestamp,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixGrant {
    pub net: IpNet,
    pub policy: PolicyKey,
    pub ports: PortMask,
    /// [`super::source::NEVER`]: until closed.
    pub until: Timestamp,
    pub origin: Origin,
}

impl PrefixGrant {
    fn event(&self, kind: EventKind) -> Event {
        Event {
            src: self.net.network(),
            policy: self.policy,
            kind,
            grant: GrantScope {
                prefix: Some(self.net.prefix_len()),
                ports: self.ports,
                until: self.until,
                origin: self.origin,
                user: None,
            },
        }
    }
}

/// The network grants in force.
pub struct PrefixGrants {
    list: RwLock<Vec<PrefixGrant>>,
    /// `list.len()`, read without the lock by the verdict path.
    count: AtomicUsize,
    max: usize,
}

impl PrefixGrants {
    pub fn new(max: usize) -> Self {
        PrefixGrants {
            list: RwLock::new(Vec::new()),
            count: AtomicUsize::new(0),
            max,
        }
    }

    /// Whether any network grant is in force: the verdict path asks this
    /// before it looks further.
    pub fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// The first grant at `now` that holds `src` and passes `opens`.
    pub fn find(
        &self,
        src: IpAddr,
        now: Timestamp,
        mut opens: impl FnMut(&PrefixGrant) -> bool,
    ) -> Option<PrefixGrant> {
        if !self.any() {
            return None;
        }
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        list.iter()
            .find(|grant| now < grant.until && grant.net.contains(&src) && opens(grant))
            .copied()
    }

    /// Opens `grant`, or restarts the one of the same network and policy.
    /// `kind` is the event of a new grant (granted or restored). False if
    /// the list is full.
    pub fn grant(&self, grant: PrefixGrant, kind: EventKind, events: &mut impl EventSink) -> bool {
        let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = list
            .iter_mut()
            .find(|g| g.net == grant.net && g.policy == grant.policy)
        {
            *existing = grant;
            if kind == EventKind::Granted {
                events.event(grant.event(EventKind::Refreshed));
            }
            return true;
        }
        if list.len() >= self.max {
            return false;
        }
        list.push(grant);
        self.count.store(list.len(), Ordering::Relaxed);
        events.event(grant.event(kind));
        true
    }

    /// Ends the grants that hold `src`, of `policy` or of any, that
    /// `which` picks; returns how many.
    pub fn revoke(
        &self,
        src: IpAddr,
        policy: Option<PolicyKey>,
        reason: RevokeReason,
        which: impl Fn(&GrantScope) -> bool,
        events: &mut impl EventSink,
    ) -> usize {
        if !self.any() {
            return 0;
        }
        let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
        let before = list.len();
        list.retain(|grant| {
            let event = grant.event(EventKind::Revoked(reason));
            let ends = grant.net.contains(&src)
                && policy.is_none_or(|p| p == grant.policy)
                && which(&event.grant);
            if ends {
                events.event(event);
            }
            !ends
        });
        self.count.store(list.len(), Ordering::Relaxed);
        before - list.len()
    }

    /// Ends timed-out grants, and forgets those of policies `live` no
    /// longer knows, without events.
    pub fn expire(
        &self,
        now: Timestamp,
        live: impl Fn(PolicyKey) -> bool,
        events: &mut impl EventSink,
    ) {
        if !self.any() {
            return;
        }
        let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
        list.retain(|grant| {
            if !live(grant.policy) {
                return false;
            }
            if now >= grant.until {
                events.event(grant.event(EventKind::Revoked(RevokeReason::Timeout)));
                return false;
            }
            true
        });
        self.count.store(list.len(), Ordering::Relaxed);
    }

    /// The grants in force at `now`.
    pub fn list(&self, now: Timestamp) -> Vec<PrefixGrant> {
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        list.iter()
            .filter(|grant| now < grant.until)
            .copied()
            .collect()
    }
}
