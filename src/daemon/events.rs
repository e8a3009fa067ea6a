//! Where engine events go: counted in the metrics, and logged as one stable
//! `event=… src=… policy=…` line per state change at info (for people and
//! for fail2ban-style parsers), knock steps at debug.
//!
//! Spoofed sources can make resets and expiries, even grants once a
//! sequence is known, at any rate: info lines are rate-limited, and what was
//! left out is summarised.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::metrics::Metrics;
use crate::engine::{Engine, Event, EventKind, Policies};

/// How often a summary of suppressed lines may be logged.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

pub struct EventReport {
    metrics: Arc<Metrics>,
    /// Raised when a grant opens or ends, so the grants get saved.
    grants_changed: Arc<AtomicBool>,
    /// Grants and revokes: what an auditor wants to see.
    grants: TokenBucket,
    /// Resets and expiries: anyone can cause them.
    noise: TokenBucket,
    suppressed: u64,
    last_summary: Instant,
}

impl EventReport {
    pub fn new(metrics: Arc<Metrics>, grants_changed: Arc<AtomicBool>, now: Instant) -> Self {
        EventReport {
            metrics,
            grants_changed,
            grants: TokenBucket::new(200.0, 50.0, now),
            noise: TokenBucket::new(50.0, 10.0, now),
            suppressed: 0,
            last_summary: now,
        }
    }

    /// Counts and logs `events`, and empties the buffer for reuse.
    pub fn publish(&mut self, engine: &Engine, events: &mut Vec<Event>, now: Instant) {
        if events.is_empty() {
            return self.summarise(now);
        }
        self.metrics.events(events);
        let grant_change = |e: &Event| {
            matches!(
                e.kind,
                EventKind::Granted
                    | EventKind::Refreshed
                    | EventKind::Restored
                    | EventKind::Revoked(_)
            )
        };
        if events.iter().any(grant_change) {
            self.grants_changed.store(true, Ordering::Relaxed);
        }
        let policies = engine.policies();
        for event in events.drain(..) {
            self.log(&policies, event, now);
        }
        self.summarise(now);
    }

    fn log(&mut self, policies: &Policies, Event { src, policy, kind }: Event, now: Instant) {
        // A reload may have removed the policy since the event.
        let Some(policy) = policies.get(policy) else {
            return;
        };
        let name = policy.name.as_str();
        let bucket = match kind {
            EventKind::Granted
            | EventKind::Refreshed
            | EventKind::Restored
            | EventKind::Revoked(_)
            | EventKind::Replayed => &mut self.grants,
            EventKind::Reset | EventKind::Expired => &mut self.noise,
            EventKind::Advanced { stage } => {
                return debug!(event = %"knock", %src, policy = %name, stage);
            }
            EventKind::Duplicate => return debug!(event = %"duplicate", %src, policy = %name),
            EventKind::Restarted => return debug!(event = %"restart", %src, policy = %name),
            EventKind::Evicted => return debug!(event = %"evict", %src, policy = %name),
        };
        if !bucket.take(now) {
            self.suppressed += 1;
            return;
        }
        match kind {
            EventKind::Granted | EventKind::Refreshed | EventKind::Restored => {
                let event = match kind {
                    EventKind::Granted => "grant",
                    EventKind::Refreshed => "refresh",
                    _ => "restore",
                };
                let ports = PortList(&policy.open_ports);
                info!(event = %event, %src, policy = %name, %ports);
            }
            EventKind::Revoked(reason) => {
                info!(event = %"revoke", %src, policy = %name, reason = %reason.as_str())
            }
            EventKind::Reset => info!(event = %"reset", %src, policy = %name),
            EventKind::Expired => info!(event = %"expire", %src, policy = %name),
            EventKind::Replayed => warn!(event = %"replay", %src, policy = %name),
            _ => unreachable!("handled above"),
        }
    }

    /// Logs how many lines the rate limit left out, at most every
    /// [`SUMMARY_INTERVAL`]. Call it also when idle.
    pub fn summarise(&mut self, now: Instant) {
        if self.suppressed > 0 && now.duration_since(self.last_summary) >= SUMMARY_INTERVAL {
            warn!(event = %"suppressed", count = self.suppressed, "event lines left out by the log rate limit");
            self.suppressed = 0;
            self.last_summary = now;
        }
    }
}

/// Allows `rate` events a second on average, in bursts of up to `burst`.
struct TokenBucket {
    burst: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(burst: f64, rate: f64, now: Instant) -> Self {
        TokenBucket {
            burst,
            rate,
            tokens: burst,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
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

/// `22,8080`
struct PortList<'a>(&'a [u16]);

impl std::fmt::Display for PortList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, port) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_events_is_counted_in_full_but_logged_within_the_limit() {
        let text = "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\n";
        let config = crate::config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let engine = Engine::new(&config);
        let metrics = Arc::new(Metrics::new(&engine.policies(), 0..1).unwrap());
        let start = Instant::now();
        let mut report = EventReport::new(Arc::clone(&metrics), Arc::default(), start);
        let key = engine.policies().key(0);
        let reset = |i: u32| Event {
            src: std::net::Ipv4Addr::from(i).into(),
            policy: key,
            kind: EventKind::Reset,
        };
        let mut events: Vec<Event> = (0..1000).map(reset).collect();
        report.publish(&engine, &mut events, start);
        assert!(events.is_empty());
        assert_eq!(
            report.suppressed, 950,
            "a burst of 50 reset lines, then silence"
        );
        assert!(metrics
            .render(0)
            .contains("knockq_knocks_total{outcome=\"reset\",policy=\"ssh\"} 1000"));
        let mut events = vec![reset(1)];
        report.publish(&engine, &mut events, start + SUMMARY_INTERVAL);
        assert_eq!(report.suppressed, 0, "summarised once the interval passed");
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
