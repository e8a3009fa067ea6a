//! Prometheus metrics: one registry, handles resolved once at start so the
//! verdict path only does atomic adds, and the families read at scrape time
//! (tracked sources, the kernel's queue drop counters).

use std::ops::Range;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Policy;
use crate::engine::{Event, EventKind, Reason, RevokeReason};

/// Knock outcomes, in label order.
const KNOCK_OUTCOMES: [&str; 5] = ["advanced", "duplicate", "restarted", "reset", "expired"];
/// Why grants end, in label order; `evicted` stays at zero, since grants are
/// never evicted, but is exported so dashboards need no special case.
const REVOKE_REASONS: [&str; 4] = ["close_knock", "timeout", "evicted", "admin"];

pub struct Metrics {
    registry: Registry,
    /// Indexed like [`Reason::ALL`].
    verdicts: Vec<IntCounter>,
    verdict_duration: Histogram,
    /// Per policy, indexed like [`KNOCK_OUTCOMES`].
    knocks: Vec<Vec<IntCounter>>,
    grants: Vec<IntCounter>,
    /// Per policy, indexed like [`REVOKE_REASONS`].
    revoked: Vec<Vec<IntCounter>>,
    active_grants: Vec<IntGauge>,
    evictions: IntCounter,
    tracked_sources: IntGauge,
}

impl Metrics {
    pub fn new(policies: &[Policy], queues: Range<u16>) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let register = |c: Box<dyn Collector>| registry.register(c);

        let verdicts_vec = IntCounterVec::new(
            Opts::new(
                "knockq_verdicts_total",
                "Verdicts given, by verdict and reason.",
            ),
            &["verdict", "reason"],
        )?;
        register(Box::new(verdicts_vec.clone()))?;
        let verdicts = Reason::ALL
            .iter()
            .map(|r| verdicts_vec.with_label_values(&[r.verdict().as_str(), r.as_str()]))
            .collect();

        let verdict_duration = Histogram::with_opts(
            HistogramOpts::new(
                "knockq_verdict_duration_seconds",
                "Time from receiving a packet to sending its verdict.",
            )
            .buckets(exponential_buckets(1e-6, 2.0, 18)?),
        )?;
        register(Box::new(verdict_duration.clone()))?;

        let per_policy =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
                register(Box::new(vec.clone()))?;
                Ok(vec)
            };
        let knocks_vec = per_policy(
            "knockq_knocks_total",
            "Knocks on sequence ports and what they did, by policy.",
            &["policy", "outcome"],
        )?;
        let grants_vec = per_policy(
            "knockq_grants_total",
            "Grants opened, by policy.",
            &["policy"],
        )?;
        let revoked_vec = per_policy(
            "knockq_grants_revoked_total",
            "Grants ended, by policy and reason.",
            &["policy", "reason"],
        )?;
        let active_vec = IntGaugeVec::new(
            Opts::new("knockq_active_grants", "Grants open now, by policy."),
            &["policy"],
        )?;
        register(Box::new(active_vec.clone()))?;

        let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
        let knocks = names
            .iter()
            .map(|p| {
                KNOCK_OUTCOMES
                    .iter()
                    .map(|o| knocks_vec.with_label_values(&[p, o]))
                    .collect()
            })
            .collect();
        let grants = names
            .iter()
            .map(|p| grants_vec.with_label_values(&[p]))
            .collect();
        let revoked = names
            .iter()
            .map(|p| {
                REVOKE_REASONS
                    .iter()
                    .map(|r| revoked_vec.with_label_values(&[p, r]))
                    .collect()
            })
            .collect();
        let active_grants = names
            .iter()
            .map(|p| active_vec.with_label_values(&[p]))
            .collect();

        let evictions = IntCounter::new(
            "knockq_state_evictions_total",
            "Sources without a grant dropped to make room in a full table.",
        )?;
        register(Box::new(evictions.clone()))?;
        let tracked_sources = IntGauge::new(
            "knockq_tracked_sources",
            "Sources with knock progress or a grant.",
        )?;
        register(Box::new(tracked_sources.clone()))?;

        let build_info = IntGaugeVec::new(
            Opts::new(
                "knockq_build_info",
                "Always 1; the version is in the label.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register(Box::new(build_info))?;
        register(Box::new(QueueDrops::new(queues)?))?;
        register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Metrics {
            registry,
            verdicts,
            verdict_duration,
            knocks,
            grants,
            revoked,
            active_grants,
            evictions,
            tracked_sources,
        })
    }

    /// Counts one verdict; atomic adds only.
    pub fn verdict(&self, reason: Reason, took: Duration) {
        self.verdicts[reason as usize].inc();
        self.verdict_duration.observe(took.as_secs_f64());
    }

    pub fn events(&self, events: &[Event]) {
        for event in events {
            let policy = usize::from(event.policy);
            let knock = |outcome: usize| self.knocks[policy][outcome].inc();
            match event.kind {
                EventKind::Advanced { .. } => knock(0),
                EventKind::Duplicate => knock(1),
                EventKind::Restarted => knock(2),
                EventKind::Reset => knock(3),
                EventKind::Expired => knock(4),
                EventKind::Granted => {
                    self.grants[policy].inc();
                    self.active_grants[policy].inc();
                }
                EventKind::Refreshed => {}
                EventKind::Revoked(reason) => {
                    let index = match reason {
                        RevokeReason::CloseKnock => 0,
                        RevokeReason::Timeout => 1,
                        RevokeReason::Admin => 3,
                    };
                    self.revoked[policy][index].inc();
                    self.active_grants[policy].dec();
                }
                EventKind::Evicted => self.evictions.inc(),
            }
        }
    }

    /// The text exposition of every family, with `tracked_sources` as of now.
    pub fn render(&self, tracked_sources: usize) -> String {
        self.tracked_sources
            .set(i64::try_from(tracked_sources).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        // Encoding into memory only fails on invalid metric data, which the
        // constructors above rule out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// `knockq_queue_dropped_total`, read from the kernel at each scrape: drops
/// the daemon never saw (queue full, or the socket buffer full).
struct QueueDrops {
    queues: Range<u16>,
    desc: Vec<Desc>,
}

impl QueueDrops {
    const NAME: &str = "knockq_queue_dropped_total";
    const HELP: &str = "Packets the kernel dropped from knockq's queues, by queue and reason.";

    fn new(queues: Range<u16>) -> prometheus::Result<Self> {
        let desc = Desc::new(
            Self::NAME.into(),
            Self::HELP.into(),
            vec!["queue".into(), "reason".into()],
            Default::default(),
        )?;
        Ok(QueueDrops {
            queues,
            desc: vec![desc],
        })
    }
}

impl Collector for QueueDrops {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(counters) =
            IntCounterVec::new(Opts::new(Self::NAME, Self::HELP), &["queue", "reason"])
        else {
            return Vec::new();
        };
        let table =
            std::fs::read_to_string("/proc/self/net/netfilter/nfnetlink_queue").unwrap_or_default();
        for drops in parse_queue_table(&table).filter(|d| self.queues.contains(&d.queue)) {
            let queue = drops.queue.to_string();
            counters
                .with_label_values(&[&queue, "queue_full"])
                .inc_by(drops.queue_full);
            counters
                .with_label_values(&[&queue, "user"])
                .inc_by(drops.user);
        }
        counters.collect()
    }
}

#[derive(Debug, PartialEq, Eq)]
struct QueueDropCounts {
    queue: u16,
    /// The queue was at its maximum length.
    queue_full: u64,
    /// Sending to the daemon failed (socket receive buffer full).
    user: u64,
}

/// Rows of /proc/net/netfilter/nfnetlink_queue: queue, peer port id, pending,
/// copy mode, copy range, queue dropped, user dropped, last id, 1.
fn parse_queue_table(text: &str) -> impl Iterator<Item = QueueDropCounts> + '_ {
    text.lines().filter_map(|line| {
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some(QueueDropCounts {
            queue: u16::try_from(*fields.first()?).ok()?,
            queue_full: *fields.get(5)?,
            user: *fields.get(6)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn metrics() -> Metrics {
        let text = "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\n";
        let config = crate::config::parse(text, Path::new("t.toml")).unwrap();
        Metrics::new(&config.policies, 0..1).unwrap()
    }

    fn value(rendered: &str, series: &str) -> Option<f64> {
        rendered
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn event(kind: EventKind) -> Event {
        Event {
            src: "10.0.0.2".parse().unwrap(),
            policy: 0,
            kind,
        }
    }

    #[test]
    fn every_engine_outcome_moves_its_series() {
        let metrics = metrics();
        metrics.events(&[
            event(EventKind::Advanced { stage: 1 }),
            event(EventKind::Duplicate),
            event(EventKind::Restarted),
            event(EventKind::Reset),
            event(EventKind::Expired),
            event(EventKind::Expired),
            event(EventKind::Granted),
            event(EventKind::Granted),
            event(EventKind::Refreshed),
            event(EventKind::Revoked(RevokeReason::CloseKnock)),
            event(EventKind::Evicted),
        ]);
        let text = metrics.render(7);
        let expect = [
            (
                r#"knockq_knocks_total{outcome="advanced",policy="ssh"}"#,
                1.0,
            ),
            (
                r#"knockq_knocks_total{outcome="duplicate",policy="ssh"}"#,
                1.0,
            ),
            (
                r#"knockq_knocks_total{outcome="restarted",policy="ssh"}"#,
                1.0,
            ),
            (r#"knockq_knocks_total{outcome="reset",policy="ssh"}"#, 1.0),
            (
                r#"knockq_knocks_total{outcome="expired",policy="ssh"}"#,
                2.0,
            ),
            (r#"knockq_grants_total{policy="ssh"}"#, 2.0),
            (r#"knockq_active_grants{policy="ssh"}"#, 1.0),
            (
                r#"knockq_grants_revoked_total{policy="ssh",reason="close_knock"}"#,
                1.0,
            ),
            (
                r#"knockq_grants_revoked_total{policy="ssh",reason="evicted"}"#,
                0.0,
            ),
            ("knockq_state_evictions_total", 1.0),
            ("knockq_tracked_sources", 7.0),
        ];
        for (series, want) in expect {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
    }

    #[test]
    fn verdicts_are_counted_by_verdict_and_reason_with_their_latency() {
        let metrics = metrics();
        metrics.verdict(Reason::Granted, Duration::from_micros(3));
        metrics.verdict(Reason::Knock, Duration::from_micros(5));
        metrics.verdict(Reason::Knock, Duration::from_micros(500));
        let text = metrics.render(0);
        assert_eq!(
            value(
                &text,
                r#"knockq_verdicts_total{reason="granted",verdict="accept"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"knockq_verdicts_total{reason="knock",verdict="reject"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                r#"knockq_verdicts_total{reason="unparsable",verdict="reject"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&text, "knockq_verdict_duration_seconds_count"),
            Some(3.0)
        );
        assert_eq!(
            value(
                &text,
                r#"knockq_verdict_duration_seconds_bucket{le="0.000004"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"knockq_verdict_duration_seconds_bucket{le="0.000008"}"#
            ),
            Some(2.0)
        );
        assert!(text.contains(&format!(
            "knockq_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn reads_the_kernel_queue_table() {
        let table = "    0   5230     3 2   128     17     4        7  1\n    1   5231     0 2   128     0     0        0  1\n";
        let rows: Vec<_> = parse_queue_table(table).collect();
        assert_eq!(
            rows,
            [
                QueueDropCounts {
                    queue: 0,
                    queue_full: 17,
                    user: 4
                },
                QueueDropCounts {
                    queue: 1,
                    queue_full: 0,
                    user: 0
                },
            ]
        );
        assert_eq!(parse_queue_table("garbage\n").count(), 0);
    }
}
