//! The cluster's metric families, registered only where `[cluster]` is
//! configured: a single host's exposition stays as it was.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct ClusterMetrics {
    pub connected: IntGauge,
    /// By kind (grant, revoke, claim, replay, claim_refused) and origin,
    /// the node the change was made on.
    pub events: IntCounterVec,
    pub publish_failures: IntCounter,
    pub backlog: IntGauge,
    pub propagation: Histogram,
    /// Records of other nodes not applied, by why.
    pub records_refused: IntCounterVec,
    pub name_taken: IntGauge,
}

impl ClusterMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<ClusterMetrics> {
        let metrics = ClusterMetrics {
            connected: IntGauge::new(
                "knockq_cluster_connected",
                "1 while etcd is reachable and this node is in sync with it, 0 otherwise.",
            )?,
            events: IntCounterVec::new(
                Opts::new(
                    "knockq_cluster_events_total",
                    "Cluster changes by kind (grant, revoke, claim, replay, claim_refused) and origin, the node that made them: this node's are published, the others' applied.",
                ),
                &["kind", "origin"],
            )?,
            publish_failures: IntCounter::new(
                "knockq_cluster_publish_failures_total",
                "Grant changes never published: the queue or the backlog was full.",
            )?,
            backlog: IntGauge::new(
                "knockq_cluster_backlog",
                "Grant changes waiting for etcd to be reachable again.",
            )?,
            propagation: Histogram::with_opts(
                HistogramOpts::new(
                    "knockq_cluster_propagation_seconds",
                    "From another node's write of a grant to its being applied here.",
                )
                .buckets(vec![
                    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                ]),
            )?,
            records_refused: IntCounterVec::new(
                Opts::new(
                    "knockq_cluster_records_refused_total",
                    "Grant records under the prefix not applied, by reason: size, key, value, policy, scope (the record's policy is not a cluster policy here), prefix, network, ports, end (more than the policy here could give), table_full.",
                ),
                &["reason"],
            )?,
            name_taken: IntGauge::new(
                "knockq_cluster_node_name_taken",
                "1 while another running instance holds this node's name: this one shares nothing until it is free.",
            )?,
        };
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.events.clone()))?;
        registry.register(Box::new(metrics.publish_failures.clone()))?;
        registry.register(Box::new(metrics.backlog.clone()))?;
        registry.register(Box::new(metrics.propagation.clone()))?;
        registry.register(Box::new(metrics.records_refused.clone()))?;
        registry.register(Box::new(metrics.name_taken.clone()))?;
        Ok(metrics)
    }
}
