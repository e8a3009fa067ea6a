//! Where engine events go, the one place every listener hangs off: counted
//! in the metrics, logged as one stable `event=… src=… policy=…` line per
//! state change at info (for people and for fail2ban-style parsers), knock
//! steps at debug, grant changes flagged for saving, and handed to the
//! [`GrantListener`]s the daemon composed (the commands on grant and revoke,
//! the cluster, the kernel sets).
//!
//! Spoofed sources can make resets and expiries, even grants once a
//! sequence is known, at any rate: info lines are rate-limited, and what was
//! left out is summarised.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::metrics::Metrics;
use crate::engine::{Engine, Event, EventKind, Policies, SpaOutcome};
use crate::listeners::{GrantListener, GrantPorts, Nodes, Subject, TokenBucket};

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
    listeners: Vec<Arc<dyn GrantListener>>,
    /// Names the nodes grants came from.
    nodes: Arc<Nodes>,
}

impl EventReport {
    pub fn new(
        metrics: Arc<Metrics>,
        grants_changed: Arc<AtomicBool>,
        listeners: Vec<Arc<dyn GrantListener>>,
        nodes: Arc<Nodes>,
        now: Instant,
    ) -> Self {
        EventReport {
            listeners,
            nodes,
            metrics,
            grants_changed,
            grants: TokenBucket::new(200.0, 50.0, now),
            noise: TokenBucket::new(50.0, 10.0, now),
            suppressed: 0,
            last_summary: now,
        }
    }

    /// Whether grant changes are to be published before the verdict of the
    /// packet that caused them: some listener must hear them first.
    pub fn publishes_before_verdict(&self) -> bool {
        self.listeners.iter().any(|l| l.before_verdict())
    }

    /// Counts and logs `events`, and empties the buffer for reuse.
    pub fn publish(&mut self, engine: &Engine, events: &mut Vec<Event>, now: Instant) {
        if events.is_empty() {
            return self.summarise(now);
        }
        self.metrics.events(events);
        if events.iter().any(|e| e.kind.changes_grant()) {
            self.grants_changed.store(true, Ordering::Relaxed);
        }
        let policies = engine.policies();
        let wall = engine.wall_clock();
        for event in events.drain(..) {
            let heard = event.kind.changes_grant()
                || matches!(
                    event.kind,
                    EventKind::Claim { .. } | EventKind::SpaClaim { .. } | EventKind::Replayed
                );
            if let (true, Some(policy)) = (heard, policies.get(event.policy)) {
                for listener in &self.listeners {
                    listener.grant_event(policy, &event, wall);
                }
            }
            self.log(&policies, event, now);
        }
        self.summarise(now);
    }
}

impl EventReport {
    fn log(&mut self, policies: &Policies, event: Event, now: Instant) {
        let Event {
            policy,
            kind,
            grant,
            ..
        } = event;
        let src = Subject(&event);
        // A reload may have removed the policy since the event.
        let Some(policy) = policies.get(policy) else {
            return;
        };
        let name = policy.name.as_str();
        // Only grants made elsewhere say where.
        let origin = (!grant.origin.is_local()).then(|| self.nodes.name(grant.origin));
        let origin = origin.as_deref().unwrap_or("");
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
            EventKind::Claim { window } => {
                return debug!(event = %"claim", %src, policy = %name, window);
            }
            EventKind::SpaClaim { .. } => {
                return debug!(event = %"spa_claim", %src, policy = %name);
            }
            EventKind::Spa { outcome, untried } => {
                // A grant says so on its own line.
                if outcome != SpaOutcome::Granted {
                    debug!(event = %"spa_refused", %src, policy = %name, reason = %outcome.as_str(), untried);
                }
                return;
            }
        };
        // An SPA grant names its user; a removed user's name is gone.
        let user = grant
            .user
            .and_then(|user| policies.user_name(event.policy, user))
            .unwrap_or("");
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
                let ports = GrantPorts(policy, grant);
                match (origin, user) {
                    ("", "") => info!(event = %event, %src, policy = %name, %ports),
                    ("", user) => info!(event = %event, %src, policy = %name, %ports, %user),
                    (origin, _) => info!(event = %event, %src, policy = %name, %ports, %origin),
                }
            }
            EventKind::Revoked(reason) => {
                let reason = reason.as_str();
                match origin {
                    "" => info!(event = %"revoke", %src, policy = %name, %reason),
                    _ => info!(event = %"revoke", %src, policy = %name, %reason, %origin),
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_events_is_counted_in_full_but_logged_within_the_limit() {
        let text = "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\n";
        let config = crate::loader::parse(text, std::path::Path::new("t.toml")).unwrap();
        let engine = Engine::new(&config);
        let metrics = Arc::new(Metrics::new(&engine.policies(), 0..1).unwrap());
        let start = Instant::now();
        let mut report = EventReport::new(
            Arc::clone(&metrics),
            Arc::default(),
            Vec::new(),
            Arc::new(Nodes::new("")),
            start,
        );
        let key = engine.policies().key(0);
        let reset = |i: u32| Event {
            src: std::net::Ipv4Addr::from(i).into(),
            policy: key,
            kind: EventKind::Reset,
            grant: crate::engine::GrantScope {
                prefix: None,
                ports: crate::engine::PortMask::ALL,
                until: crate::engine::GRANT_UNTIL_CLOSED,
                origin: crate::engine::Origin::LOCAL,
                user: None,
            },
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
}
