//! The cluster: grants of `scope = "cluster"` policies and their spent
//! rotating windows, shared by every node through etcd.
//!
//! It listens to the engine's grant events like every other
//! [`GrantListener`] and queues what to publish; its own thread runs the
//! etcd client on an async runtime that stays inside this module. The
//! verdict path never waits on etcd: a grant is made locally first, then
//! written; a cluster rotating window's grant follows its claim. The
//! thread also watches the prefix and applies the grants and revocations
//! of the other nodes to the engine, with their events reported like any
//! other.

mod metrics;
pub mod record;
mod sync;

use std::net::IpAddr;
use std::sync::Arc;
use std::thread;

use tokio::sync::mpsc;

use crate::config::{ClusterConfig, Knock, Policy, Scope};
use crate::engine::{
    Engine, Event, EventKind, RevokeReason, UserKey, WallClock, GRANT_UNTIL_CLOSED,
};
use crate::flow::PortRange;
use crate::listeners::{Clock, GrantListener, Nodes};
pub use metrics::ClusterMetrics;
use record::Subject;

/// Reports the events of grants applied from the cluster, as the workers'
/// are reported.
pub type Report = Box<dyn FnMut(&Engine, &mut Vec<Event>) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the cluster's thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot set up the cluster's metrics")]
    Metrics(#[from] prometheus::Error),
}

/// A grant change or claim made on this node, for the cluster.
#[derive(Debug)]
enum Change {
    Grant {
        policy: String,
        subject: Subject,
        ports: Vec<PortRange>,
        /// Unix milliseconds; `None`: until the close knock.
        until: Option<u64>,
        /// An SPA grant's user, named in the record.
        user: Option<UserKey>,
    },
    Revoke {
        policy: String,
        subject: Subject,
        reason: RevokeReason,
        until: Option<u64>,
    },
    Claim {
        policy: String,
        src: IpAddr,
        window: u64,
    },
    /// A cluster SPA policy's packet, to claim by its digest; `event` is
    /// the engine's `SpaClaim`, with the grant it waits to open.
    SpaClaim {
        policy: String,
        digest: u128,
        event: Event,
    },
}

/// The workers' side of the cluster: queues changes for its thread.
pub struct Cluster {
    queue: mpsc::Sender<Change>,
    metrics: Arc<ClusterMetrics>,
}

/// The cluster's thread, before it starts: what it syncs, given the report.
pub struct ClusterThread {
    changes: mpsc::Receiver<Change>,
    sync: Box<dyn FnOnce(Report) -> sync::Sync + Send>,
}

impl Cluster {
    /// The listener, and the thread to start once the listener is in the
    /// report the thread itself reports through: the grants it makes for
    /// claimed windows are published like any other.
    pub fn new(
        config: &ClusterConfig,
        engine: Arc<Engine>,
        clock: Clock,
        nodes: Arc<Nodes>,
        metrics: Arc<ClusterMetrics>,
    ) -> (Arc<Cluster>, ClusterThread) {
        let (queue, changes) = mpsc::channel(config.backlog);
        let cluster = Arc::new(Cluster {
            queue,
            metrics: Arc::clone(&metrics),
        });
        let config = config.clone();
        let sync = move |report| sync::Sync::new(config, engine, clock, nodes, metrics, report);
        let thread = ClusterThread {
            changes,
            sync: Box::new(sync),
        };
        (cluster, thread)
    }
}

impl ClusterThread {
    /// Starts the thread, which connects and resynchronises in the
    /// background: the gate decides on its own until then.
    pub fn start(self, report: Report) -> Result<(), ClusterError> {
        let ClusterThread { changes, sync } = self;
        let sync = sync(report);
        thread::Builder::new()
            .name("knockq-cluster".into())
            .spawn(move || sync.run(changes))
            .map_err(ClusterError::Thread)?;
        Ok(())
    }
}

impl GrantListener for Cluster {
    fn grant_event(&self, policy: &Policy, event: &Event, wall: WallClock) {
        if policy.scope != Scope::Cluster {
            return;
        }
        let subject = Subject {
            src: event.src,
            prefix: event.grant.prefix,
        };
        let until = match event.grant.until {
            GRANT_UNTIL_CLOSED => None,
            until => Some(wall.unix_millis(until)),
        };
        let change = match event.kind {
            // Grants made here; a restored one is in etcd already, or
            // ended or was revoked there while this node was away.
            EventKind::Granted | EventKind::Refreshed if event.grant.origin.is_local() => {
                Change::Grant {
                    policy: policy.name.clone(),
                    subject,
                    ports: event.grant.ports.ports(&policy.open_ports).collect(),
                    until,
                    user: event.grant.user,
                }
            }
            // A close knock, an operator or a user's removal here ends the
            // grant everywhere, wherever it was made; timeouts end it
            // everywhere by themselves.
            EventKind::Revoked(
                reason @ (RevokeReason::CloseKnock
                | RevokeReason::Admin
                | RevokeReason::UserRemoved),
            ) => Change::Revoke {
                policy: policy.name.clone(),
                subject,
                reason,
                until,
            },
            EventKind::Claim { window } if matches!(policy.knock, Knock::Rotating(_)) => {
                Change::Claim {
                    policy: policy.name.clone(),
                    src: event.src,
                    window,
                }
            }
            EventKind::SpaClaim { digest } if matches!(policy.knock, Knock::Spa(_)) => {
                Change::SpaClaim {
                    policy: policy.name.clone(),
                    digest,
                    event: *event,
                }
            }
            _ => return,
        };
        if self.queue.try_send(change).is_err() {
            self.metrics.publish_failures.inc();
        }
    }
}
