//! Prometheus metrics: one registry, handles resolved once at start so the
//! verdict path only does atomic adds, and the families read at scrape time
//! (tracked sources, the kernel's queue drop counters).

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Knock;
use crate::engine::{
    Event, EventKind, Policies, PolicyKey, Reason, Reloaded, RevokeReason, SpaOutcome,
};
use crate::flow::Proto;

/// Knock outcomes, in label order.
const KNOCK_OUTCOMES: [&str; 6] = [
    "advanced",
    "duplicate",
    "restarted",
    "reset",
    "expired",
    "replayed",
];
/// Why grants end, in label order; `evicted` stays at zero, since grants are
/// never evicted, but is exported so dashboards need no special case.
/// The `proto` labels of verdicts, in the order of [`Proto`], and `other`
/// for packets read as neither.
const VERDICT_PROTOS: [&str; 3] = [Proto::Tcp.as_str(), Proto::Udp.as_str(), "other"];
const REVOKE_REASONS: [&str; 6] = [
    "close_knock",
    "timeout",
    "evicted",
    "admin",
    "cluster",
    "user_removed",
];

pub struct Metrics {
    registry: Registry,
    /// Indexed like [`Reason::ALL`].
    verdicts: Vec<IntCounter>,
    verdict_duration: Histogram,
    per_policy: PolicyFamilies,
    /// Handles of the policies in force, replaced on reload.
    policies: ArcSwap<HashMap<PolicyKey, PolicyHandles>>,
    evictions: IntCounter,
    tracked_sources: IntGauge,
    script_errors: IntCounterVec,
    state_grants_refused: IntCounterVec,
}

/// The families labelled by policy.
struct PolicyFamilies {
    knocks: IntCounterVec,
    grants: IntCounterVec,
    revoked: IntCounterVec,
    active: IntGaugeVec,
    spa_packets: IntCounterVec,
    spa_untried: IntCounterVec,
}

/// One policy's series, resolved once.
struct PolicyHandles {
    /// Indexed like [`KNOCK_OUTCOMES`].
    knocks: Vec<IntCounter>,
    grants: IntCounter,
    /// Indexed like [`REVOKE_REASONS`].
    revoked: Vec<IntCounter>,
    active: IntGauge,
    /// Indexed like [`SpaOutcome::ALL`]; empty but for SPA policies.
    spa_packets: Vec<IntCounter>,
    spa_untried: Option<IntCounter>,
}

impl PolicyFamilies {
    fn handles(&self, policies: &Policies) -> HashMap<PolicyKey, PolicyHandles> {
        policies
            .keys()
            .map(|(key, policy)| {
                let name = policy.name.as_str();
                let handles = PolicyHandles {
                    knocks: KNOCK_OUTCOMES
                        .iter()
                        .map(|o| self.knocks.with_label_values(&[name, o]))
                        .collect(),
                    grants: self.grants.with_label_values(&[name]),
                    revoked: REVOKE_REASONS
                        .iter()
                        .map(|r| self.revoked.with_label_values(&[name, r]))
                        .collect(),
                    active: self.active.with_label_values(&[name]),
                    spa_packets: match policy.knock {
                        Knock::Spa(_) => SpaOutcome::ALL
                            .iter()
                            .map(|o| self.spa_packets.with_label_values(&[name, o.as_str()]))
                            .collect(),
                        _ => Vec::new(),
                    },
                    spa_untried: matches!(policy.knock, Knock::Spa(_))
                        .then(|| self.spa_untried.with_label_values(&[name])),
                };
                (key, handles)
            })
            .collect()
    }
}

impl Metrics {
    pub fn new(policies: &Policies, queues: Range<u16>) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let register = |c: Box<dyn Collector>| registry.register(c);

        let verdicts_vec = IntCounterVec::new(
            Opts::new(
                "knockq_verdicts_total",
                "Verdicts given, by verdict, reason and protocol (other: neither TCP nor UDP).",
            ),
            &["verdict", "reason", "proto"],
        )?;
        register(Box::new(verdicts_vec.clone()))?;
        let verdicts = Reason::ALL
            .iter()
            .flat_map(|r| VERDICT_PROTOS.map(|proto| (r, proto)))
            .map(|(r, proto)| {
                verdicts_vec.with_label_values(&[r.verdict().as_str(), r.as_str(), proto])
            })
            .collect();

        let verdict_duration = Histogram::with_opts(
            HistogramOpts::new(
                "knockq_verdict_duration_seconds",
                "Time from receiving a packet to sending its verdict.",
            )
            .buckets(exponential_buckets(1e-6, 2.0, 18)?),
        )?;
        register(Box::new(verdict_duration.clone()))?;

        let counters =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
                register(Box::new(vec.clone()))?;
                Ok(vec)
            };
        let per_policy = PolicyFamilies {
            knocks: counters(
                "knockq_knocks_total",
                "Knocks on sequence ports and what they did, by policy.",
                &["policy", "outcome"],
            )?,
            grants: counters(
                "knockq_grants_total",
                "Grants opened, by policy.",
                &["policy"],
            )?,
            revoked: counters(
                "knockq_grants_revoked_total",
                "Grants ended, by policy and reason.",
                &["policy", "reason"],
            )?,
            active: IntGaugeVec::new(
                Opts::new("knockq_active_grants", "Grants open now, by policy."),
                &["policy"],
            )?,
            spa_packets: counters(
                "knockq_spa_packets_total",
                "Single packet authorization datagrams, by policy and what became of them.",
                &["policy", "outcome"],
            )?,
            spa_untried: counters(
                "knockq_spa_candidates_untried_total",
                "Users an SPA datagram's source may send for whose key the candidate cap left untried.",
                &["policy"],
            )?,
        };
        register(Box::new(per_policy.active.clone()))?;
        let handles = per_policy.handles(policies);

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

        let script_errors = counters(
            "knockq_script_errors_total",
            "Script calls that failed, each rejecting its packet, by policy and kind (runtime, budget, memory, result, load).",
            &["policy", "kind"],
        )?;

        let state_grants_refused = counters(
            "knockq_state_grants_refused_total",
            "Saved grants not restored at start, by reason: policy (not in force with that knock and those ports), ports, prefix, network, end (more than the policy could give), table_full.",
            &["reason"],
        )?;

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
            per_policy,
            policies: ArcSwap::from_pointee(handles),
            evictions,
            tracked_sources,
            script_errors,
            state_grants_refused,
        })
    }

    /// Counts a failed script call; off the verdict path, after the
    /// verdicts are out.
    pub fn script_error(&self, policy: &str, kind: &str) {
        self.script_errors.with_label_values(&[policy, kind]).inc();
    }

    /// The counter of saved grants not restored, for the state store.
    pub fn state_grants_refused(&self) -> IntCounterVec {
        self.state_grants_refused.clone()
    }

    /// Follows a reload: series for the policies now in force; the active
    /// grants of dropped policies went with their state.
    pub fn reloaded(&self, policies: &Policies, reloaded: &Reloaded) {
        for name in &reloaded.dropped {
            let _ = self.per_policy.active.remove_label_values(&[name]);
        }
        self.policies
            .store(std::sync::Arc::new(self.per_policy.handles(policies)));
    }

    /// Counts one verdict for a flow of `proto` (`None`: a packet neither
    /// TCP nor UDP); atomic adds only.
    pub fn verdict(&self, reason: Reason, proto: Option<Proto>, took: Duration) {
        let proto = proto.map_or(VERDICT_PROTOS.len() - 1, |proto| proto as usize);
        self.verdicts[reason as usize * VERDICT_PROTOS.len() + proto].inc();
        self.verdict_duration.observe(took.as_secs_f64());
    }

    pub fn events(&self, events: &[Event]) {
        let policies = self.policies.load();
        for event in events {
            if event.kind == EventKind::Evicted {
                self.evictions.inc();
            }
            // A reload may have removed the policy since the event.
            let Some(policy) = policies.get(&event.policy) else {
                continue;
            };
            let knock = |outcome: usize| policy.knocks[outcome].inc();
            match event.kind {
                EventKind::Advanced { .. } => knock(0),
                EventKind::Duplicate => knock(1),
                EventKind::Restarted => knock(2),
                EventKind::Reset => knock(3),
                EventKind::Expired => knock(4),
                EventKind::Replayed => knock(5),
                EventKind::Granted => {
                    policy.grants.inc();
                    policy.active.inc();
                }
                // Opened before a restart: open again, not opened again.
                EventKind::Restored => policy.active.inc(),
                EventKind::Revoked(reason) => {
                    let index = match reason {
                        RevokeReason::CloseKnock => 0,
                        RevokeReason::Timeout => 1,
                        RevokeReason::Admin => 3,
                        RevokeReason::Cluster => 4,
                        RevokeReason::UserRemoved => 5,
                    };
                    policy.revoked[index].inc();
                    policy.active.dec();
                }
                // Counted by the cluster when it claims the window.
                EventKind::Spa { outcome, untried } => {
                    if let Some(counter) = policy.spa_packets.get(outcome as usize) {
                        counter.inc();
                    }
                    if let Some(counter) = &policy.spa_untried {
                        counter.inc_by(u64::from(untried));
                    }
                }
                EventKind::Refreshed
                | EventKind::Evicted
                | EventKind::Claim { .. }
                | EventKind::SpaClaim { .. } => {}
            }
        }
    }

    /// The registry, for families only some gates have (the cluster's).
    pub fn registry(&self) -> &Registry {
        &self.registry
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

    fn engine() -> crate::engine::Engine {
        let text = "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\n";
        crate::engine::Engine::new(&crate::loader::parse(text, Path::new("t.toml")).unwrap())
    }

    fn metrics() -> Metrics {
        Metrics::new(&engine().policies(), 0..1).unwrap()
    }

    fn value(rendered: &str, series: &str) -> Option<f64> {
        rendered
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_engine_outcome_moves_its_series() {
        let engine = engine();
        let metrics = Metrics::new(&engine.policies(), 0..1).unwrap();
        let key = engine.policies().key(0);
        let event = |kind| Event {
            src: "10.0.0.2".parse().unwrap(),
            policy: key,
            kind,
            grant: crate::engine::GrantScope {
                prefix: None,
                ports: crate::engine::PortMask::ALL,
                until: crate::engine::GRANT_UNTIL_CLOSED,
                origin: crate::engine::Origin::LOCAL,
                user: None,
            },
        };
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
        metrics.verdict(Reason::Granted, Some(Proto::Tcp), Duration::from_micros(3));
        metrics.verdict(Reason::Knock, Some(Proto::Udp), Duration::from_micros(5));
        metrics.verdict(Reason::Knock, Some(Proto::Udp), Duration::from_micros(500));
        metrics.verdict(Reason::Unparsable, None, Duration::from_micros(5));
        let text = metrics.render(0);
        assert_eq!(
            value(
                &text,
                r#"knockq_verdicts_total{proto="tcp",reason="granted",verdict="accept"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"knockq_verdicts_total{proto="udp",reason="knock",verdict="reject"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                r#"knockq_verdicts_total{proto="tcp",reason="knock",verdict="reject"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                r#"knockq_verdicts_total{proto="other",reason="unparsable",verdict="reject"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "knockq_verdict_duration_seconds_count"),
            Some(4.0)
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
            Some(3.0)
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
