//! Grant events and the listeners that hear them. The engine reports every
//! grant change as an [`Event`]; the daemon hands those of grants, claims
//! and replays to each [`GrantListener`] it composed: the commands on grant
//! and revoke (`hooks`), the fleet (`cluster`) and the kernel sets
//! (`offload`). They stand beside each other on this one trait, and none
//! reaches into the daemon: each keeps its own state and its own metrics.
//!
//! Also here, what the listeners share with the daemon: the names of the
//! nodes grants come from ([`Nodes`]) and the monotonic [`Clock`] the
//! engine's timestamps are read from.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::Policy;
use crate::engine::{Event, GrantScope, Origin, Timestamp, WallClock};

/// What hears of every grant change, claim and replay, on the thread the
/// event happened on: it must queue its work and return, never block,
/// unless it must act before the verdict.
pub trait GrantListener: Send + Sync {
    fn grant_event(&self, policy: &Policy, event: &Event, wall: WallClock);

    /// Whether a grant change must reach this listener before the verdict
    /// of the knock that caused it is sent (the kernel sets of offload).
    fn before_verdict(&self) -> bool {
        false
    }
}

/// The names of the nodes grants come from, numbered as the engine's
/// [`Origin`]s: this node is [`Origin::LOCAL`], the others get the next
/// number when first heard of.
pub struct Nodes {
    names: RwLock<Vec<Arc<str>>>,
    /// Another live instance holds this node's name in the cluster: this
    /// one shares nothing until the name is free.
    contested: AtomicBool,
}

impl Nodes {
    pub fn new(local: &str) -> Nodes {
        Nodes {
            names: RwLock::new(vec![local.into()]),
            contested: AtomicBool::new(false),
        }
    }

    /// Whether another live instance holds this node's name.
    pub fn contested(&self) -> bool {
        self.contested.load(Ordering::Relaxed)
    }

    pub fn set_contested(&self, contested: bool) {
        self.contested.store(contested, Ordering::Relaxed);
    }

    /// The origin of grants made on `name`.
    pub fn origin(&self, name: &str) -> Origin {
        let known = |names: &[Arc<str>]| names.iter().position(|n| &**n == name);
        if let Some(i) = known(&self.names.read().unwrap_or_else(PoisonError::into_inner)) {
            return Origin(i as u16);
        }
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        let i = match known(&names) {
            Some(i) => i,
            // A fleet of 65535 names is past any real one: the last
            // number stands for the rest.
            None if names.len() > usize::from(u16::MAX) => usize::from(u16::MAX),
            None => {
                names.push(name.into());
                names.len() - 1
            }
        };
        Origin(i as u16)
    }

    pub fn name(&self, origin: Origin) -> Arc<str> {
        let names = self.names.read().unwrap_or_else(PoisonError::into_inner);
        let i = usize::from(origin.0).min(names.len() - 1);
        Arc::clone(&names[i])
    }
}

/// The daemon's monotonic clock, as the engine's timestamps: deadlines do
/// not move when the wall clock is set.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Clock(Instant::now())
    }

    pub fn now(&self) -> Timestamp {
        self.at(Instant::now())
    }

    /// The timestamp of an instant read earlier.
    pub fn at(&self, instant: Instant) -> Timestamp {
        let elapsed = instant.saturating_duration_since(self.0);
        Timestamp::from_millis(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    }

    /// How the timestamps map to Unix time now. Read again every tick, so
    /// rotating windows follow the wall clock when NTP corrects it.
    pub fn wall(&self) -> WallClock {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let unix = i64::try_from(unix.as_millis()).unwrap_or(i64::MAX);
        let now = i64::try_from(self.now().as_millis()).unwrap_or(i64::MAX);
        WallClock {
            offset_millis: unix - now,
        }
    }
}

/// The ports a grant opens: `22,8080`.
pub struct GrantPorts<'a>(pub &'a Policy, pub GrantScope);

impl fmt::Display for GrantPorts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, port) in self.1.ports.ports(&self.0.open_ports).enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}

/// Whom an event is about: `10.0.0.2`, or `10.0.0.0/24` for a network grant.
pub struct Subject<'a>(pub &'a Event);

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.grant.prefix {
            Some(prefix) => write!(f, "{}/{prefix}", self.0.src),
            None => write!(f, "{}", self.0.src),
        }
    }
}

/// Allows `rate` events a second on average, in bursts of up to `burst`:
/// the rate limit of log lines that anyone can cause (the event report's,
/// the cluster's refused records).
pub struct TokenBucket {
    burst: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(burst: f64, rate: f64, now: Instant) -> Self {
        TokenBucket {
            burst,
            rate,
            tokens: burst,
            last: now,
        }
    }

    /// Whether one more event is allowed at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn nodes_are_numbered_as_first_heard_of() {
        let nodes = Nodes::new("bastion-1");
        assert_eq!(nodes.origin("bastion-1"), Origin::LOCAL);
        let second = nodes.origin("bastion-2");
        assert_eq!(second, Origin(1));
        assert_eq!(nodes.origin("bastion-3"), Origin(2));
        assert_eq!(nodes.origin("bastion-2"), second);
        assert_eq!(&*nodes.name(second), "bastion-2");
        assert_eq!(&*nodes.name(Origin::LOCAL), "bastion-1");
    }

    #[test]
    fn the_bucket_allows_bursts_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3.0, 2.0, start);
        assert!((0..3).all(|_| bucket.take(start)));
        assert!(!bucket.take(start));
        assert!(bucket.take(start + Duration::from_millis(500)));
        assert!(!bucket.take(start + Duration::from_millis(600)));
        let later = start + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| bucket.take(later)).count(),
            3,
            "never more than the burst"
        );
    }
}
