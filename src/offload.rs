//! `[rules] offload` in the running daemon: keeps the kernel's granted sets
//! equal to the engine's grants, and reads what the kernel decided itself.
//!
//! The sets listen to grant events like the commands on grant and the
//! cluster do, but are the one listener that acts before the verdict: a
//! grant or revoke caused by a knock is in the kernel before that knock is
//! answered, so the kernel never accepts what the engine would reject, even
//! for a source the full knocking set could not record. Such events are
//! rare, and the cost of one update is in BENCHMARKS.md.
//!
//! Timeouts are the kernel's own: an element is added with the time its
//! grant has left, and a grant that times out is not deleted by hand.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, Opts};
use tracing::{debug, error, info};

use crate::config::{Config, Policy};
use crate::engine::{grant_left, Engine, Event, EventKind, RevokeReason, WallClock};
use crate::firewall::load::{self, Firewall, LoadError};
use crate::firewall::sets::{self, GrantedPair, Offload, SetChange};
use crate::flow::{FlowPort, PortRange};
use crate::listeners::{Clock, GrantListener};

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error(
        "[rules] offload is on but the kernel holds none of knockq's sets: \
         load the rules with `knockq rules --apply`"
    )]
    NoSets,
    #[error("cannot fill the kernel sets: {0}")]
    Load(#[from] LoadError),
}

pub struct KernelSets {
    firewall: Firewall,
    engine: Arc<Engine>,
    clock: Clock,
    /// Held while a subject's pairs are worked out and written, across the
    /// run of `nft` or `ipset`: two workers changing one pair must reach the
    /// kernel in the order they read the engine. Taken only on grant
    /// changes, never by a packet that changes no grant.
    order: Mutex<()>,
    updates: IntCounterVec,
}

impl KernelSets {
    /// Finds the sets `knockq rules --apply` loaded; `None` without
    /// offload. They are filled by [`KernelSets::reconcile`].
    pub fn find(
        config: &Config,
        engine: Arc<Engine>,
        clock: Clock,
    ) -> Result<Option<Arc<KernelSets>>, OffloadError> {
        if !config.rules.offload {
            return Ok(None);
        }
        let firewall = load::offload_sets().ok_or(OffloadError::NoSets)?;
        let updates = IntCounterVec::new(
            Opts::new(
                "knockq_kernel_set_updates_total",
                "Changes of the kernel's granted sets knockq made, by outcome.",
            ),
            &["outcome"],
        )
        .expect("a valid metric");
        Ok(Some(Arc::new(KernelSets {
            firewall,
            engine,
            clock,
            order: Mutex::new(()),
            updates,
        })))
    }

    /// Makes the granted sets hold exactly the engine's grants now, and
    /// the knock ports set this configuration's: on start, after the saved
    /// grants are restored, and on reload, when grants of removed or
    /// changed policies leave.
    pub fn reconcile(&self, config: &Config) -> Result<(), OffloadError> {
        let Some(offload) = Offload::from_config(config) else {
            return Ok(());
        };
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.clock.now();
        let policies = self.engine.policies();
        let mut longest: HashMap<(IpAddr, Option<u8>, FlowPort), Option<Duration>> = HashMap::new();
        for grant in self.engine.grants(now) {
            let (Some(left), Some(key)) = (grant.status.grant, policies.by_name(&grant.policy))
            else {
                continue;
            };
            let Some(policy) = policies.get(key) else {
                continue;
            };
            let left = left.duration();
            for port in grant
                .status
                .ports
                .ports(&policy.open_ports)
                .flat_map(PortRange::iter)
            {
                let entry = longest
                    .entry((grant.src, grant.prefix, port))
                    .or_insert(left);
                *entry = match (*entry, left) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
        }
        let pairs: Vec<GrantedPair> = longest
            .into_iter()
            .map(|((src, prefix, port), left)| GrantedPair {
                src,
                prefix,
                port,
                left,
            })
            .collect();
        load::update_sets(self.firewall, &offload.reconcile(self.firewall, &pairs))?;
        info!(
            "kernel sets ({}) hold {} granted pairs",
            self.firewall.as_str(),
            pairs.len()
        );
        Ok(())
    }

    /// Writes what `event` changed: each port its grant named, with the time
    /// the subject's longest grant of that port has left, or removed.
    fn update(&self, policy: &Policy, event: &Event) {
        let started = Instant::now();
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.clock.now();
        let (src, prefix) = (event.src, event.grant.prefix);
        let changes: Vec<SetChange> = event
            .grant
            .ports
            .ports(&policy.open_ports)
            .flat_map(PortRange::iter)
            .map(|port| {
                let until = self.engine.open_until(src, prefix, port, now);
                let pair = |left| GrantedPair {
                    src,
                    prefix,
                    port,
                    left,
                };
                match until {
                    Some(until) => SetChange::Put(pair(grant_left(until, now).duration())),
                    None => SetChange::Remove(pair(None)),
                }
            })
            .collect();
        let replace = || load::update_sets(self.firewall, &sets::changes(self.firewall, &changes));
        let written = match sets::creations(self.firewall, &changes) {
            Some(text) => load::update_sets(self.firewall, &text).or_else(|_| replace()),
            None => replace(),
        };
        let outcome = match written {
            Ok(()) => "ok",
            Err(e) => {
                error!(%src, policy = %policy.name, "kernel set not updated: {e}");
                "failed"
            }
        };
        self.updates.with_label_values(&[outcome]).inc();
        debug!(%src, policy = %policy.name, took_us = started.elapsed().as_micros() as u64, "kernel set updated");
    }
}

impl GrantListener for KernelSets {
    fn grant_event(&self, policy: &Policy, event: &Event, _wall: WallClock) {
        match event.kind {
            // Restored grants are put in place by `reconcile`, all at once;
            // timed-out ones left the kernel by its own timeout.
            EventKind::Restored | EventKind::Revoked(RevokeReason::Timeout) => {}
            kind if kind.changes_grant() => self.update(policy, event),
            _ => {}
        }
    }

    fn before_verdict(&self) -> bool {
        true
    }
}

/// The kernel's own decisions, read from the offload rules' counters at
/// each scrape.
pub struct KernelMetrics {
    sets: Arc<KernelSets>,
    verdicts: IntCounterVec,
    knocking_full: IntCounter,
    unreadable: AtomicU64,
}

impl KernelMetrics {
    pub fn new(sets: Arc<KernelSets>) -> prometheus::Result<Self> {
        Ok(KernelMetrics {
            sets,
            verdicts: IntCounterVec::new(
                Opts::new(
                    "knockq_kernel_verdicts_total",
                    "SYNs the kernel decided without the engine ([rules] offload), from rule counters.",
                ),
                &["verdict"],
            )?,
            knocking_full: IntCounter::new(
                "knockq_kernel_knocking_set_full_total",
                "Knocks whose source the full knocking set could not record.",
            )?,
            unreadable: AtomicU64::new(0),
        })
    }
}

impl Collector for KernelMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.verdicts.desc();
        descs.extend(self.knocking_full.desc());
        descs.extend(self.sets.updates.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match load::kernel_counts(self.sets.firewall) {
            Ok(counts) => {
                // The kernel's counters are the totals: set, not added.
                for (verdict, packets) in [("accept", counts.accepted), ("reject", counts.rejected)]
                {
                    let counter = self.verdicts.with_label_values(&[verdict]);
                    counter.inc_by(packets.saturating_sub(counter.get()));
                }
                self.knocking_full.inc_by(
                    counts
                        .knocking_full
                        .saturating_sub(self.knocking_full.get()),
                );
            }
            Err(e) => {
                if (self.unreadable.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two() {
                    error!("kernel counters not read: {e}");
                }
            }
        }
        let mut families = self.verdicts.collect();
        families.extend(self.knocking_full.collect());
        families.extend(self.sets.updates.collect());
        families
    }
}
