//! The knock state machine. Pure: no I/O, no clock of its own. Callers pass
//! the time of each packet, which makes every rule testable without sleeping
//! and lets the simulator replay captures with their own timestamps.
//!
//! `mod.rs` holds the [`Engine`] and its life (reload, expiry); each other
//! concern has its file: `check.rs` what a configuration's policies mean and
//! the refusals that follow, `decide.rs` the per-packet path, `grants.rs`
//! grants made by hand, restored or adopted from the fleet, `bounds.rs` what
//! those from outside may be, `status.rs` the
//! state as listed, `events.rs` the events, `verdict.rs` the question and
//! the answer, `time.rs` the clock; below them the policies and their port
//! map (`policies.rs`, `ports.rs`), rotating windows (`rotation.rs`), the
//! script seam (`script.rs`), a source's state (`source.rs`), the bounded
//! table (`table.rs`) and network grants (`prefixes.rs`).

mod bounds;
mod check;
mod decide;
mod events;
mod grants;
mod policies;
mod ports;
mod prefixes;
mod rotation;
mod script;
mod source;
mod spa;
mod status;
mod table;
mod time;
mod verdict;

#[cfg(test)]
pub(crate) mod tests;

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Knock, Policy};
use crate::flow::FlowPort;

pub use bounds::{grant_ports, longest_grant, CLOCK_SKEW};
pub(crate) use check::check_rotating;
pub use check::{check, MAX_SEQUENCE_LEN, MIN_ROTATING_PORTS};
pub use events::{
    Event, EventKind, EventSink, GrantScope, Origin, RevokeReason, SpaOutcome, UserKey,
    GRANT_UNTIL_CLOSED,
};
pub use grants::{GrantError, GrantRecord, TableFull};
pub use policies::{Policies, PolicyKey};
pub use ports::{PolicySet, PortMap, PortMask, PortRole};
use prefixes::PrefixGrants;
use rotation::SpentWindows;
pub use script::{NoScripts, ScriptAction, ScriptGrant, ScriptInput, ScriptOutput, ScriptRunner};
pub use source::{grant_left, GrantLeft, PolicyStatus, Progress};
pub use status::SourceStatus;
use table::SourceTable;
pub use table::TablePart;
pub use time::{Timestamp, WallClock};
pub use verdict::{Decision, NewFlow, Reason, Verdict};

/// Index of a policy in the list in force.
pub type PolicyId = u8;

/// What a reload did to the policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Same knock, same ports: their grants and progress carry on.
    pub kept: Vec<String>,
    /// New or changed: they start with no state.
    pub fresh: Vec<String>,
    /// Gone or changed: their state was dropped.
    pub dropped: Vec<String>,
}

/// The gate's whole state: the policies in force and the bounded table of
/// sources that made progress or hold a grant. Shared by all workers.
pub struct Engine {
    policies: ArcSwap<Policies>,
    sources: SourceTable,
    prefixes: PrefixGrants,
    spent: SpentWindows,
    replays: spa::Replays,
    wall_offset: AtomicI64,
    next_key: AtomicU32,
}

impl Engine {
    pub fn new(config: &Config) -> Self {
        let next_key = AtomicU32::new(0);
        Engine {
            policies: ArcSwap::from_pointee(Policies::new(&config.policies, None, &next_key)),
            sources: SourceTable::new(config.limits.max_sources),
            prefixes: PrefixGrants::new(config.limits.max_prefix_grants),
            spent: SpentWindows::default(),
            replays: spa::Replays::default(),
            wall_offset: AtomicI64::new(0),
            next_key,
        }
    }

    /// The policies in force now.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.load_full()
    }

    /// Puts `list` in force at once. Policies whose name, sequence and ports
    /// are unchanged keep their sources' state; the state of the others is
    /// forgotten. Call from one thread at a time.
    pub fn reload(&self, list: &[Policy]) -> Reloaded {
        let old = self.policies.load_full();
        let new = Policies::new(list, Some(&old), &self.next_key);
        let mut reloaded = Reloaded::default();
        for (key, policy) in new.keys() {
            match old.get(key) {
                Some(_) => reloaded.kept.push(policy.name.clone()),
                None => reloaded.fresh.push(policy.name.clone()),
            }
        }
        for (key, policy) in old.keys() {
            if new.get(key).is_none() {
                reloaded.dropped.push(policy.name.clone());
            }
        }
        self.policies.store(Arc::new(new));
        reloaded
    }

    /// Sets how timestamps map to Unix time, for rotating sequences. Without
    /// it, timestamps are taken as Unix time.
    pub fn set_wall_clock(&self, wall: WallClock) {
        self.wall_offset
            .store(wall.offset_millis, Ordering::Relaxed);
    }

    pub fn wall_clock(&self) -> WallClock {
        WallClock {
            offset_millis: self.wall_offset.load(Ordering::Relaxed),
        }
    }

    /// What a SYN to `port` is at `now`.
    pub fn role(&self, port: FlowPort, now: Timestamp) -> PortRole {
        self.policies.load().role(port, now, self.wall_clock())
    }

    /// Number of sources currently tracked.
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }

    /// Starts loading what is known about `src` into the CPU's cache.
    /// Called for each packet of a batch before any is decided, it lets the
    /// memory loads of the batch overlap.
    pub fn prefetch(&self, src: IpAddr) {
        self.sources.prefetch(src);
    }
    /// The rotating windows some source completed and that are still
    /// accepted, so a replay is refused.
    pub fn spent_windows(&self) -> Vec<(PolicyKey, u64)> {
        self.spent.list()
    }

    /// Marks a window spent again after a restart.
    pub fn restore_spent(&self, key: PolicyKey, window: u64) {
        self.spent.spend(key, window);
    }
    /// Settles the tracked sources in `part` of the table at time `now`:
    /// ends timed-out progress and grants, drops state of policies no longer
    /// in force, and forgets sources with nothing left. Run periodically so
    /// state does not wait for its source to come back.
    pub fn expire(&self, now: Timestamp, part: TablePart, events: &mut impl EventSink) {
        let policies = self.policies.load();
        let wall = self.wall_clock();
        let unix_secs = wall.unix_millis(now) / 1000;
        self.sources.retain(part, |src, source| {
            for slot in source.slots_mut() {
                let key = slot.policy;
                let Some((id, policy)) = policies.find(key) else {
                    slot.forget();
                    continue;
                };
                let mut emit = |kind, grant| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                        grant,
                    })
                };
                slot.settle(policy, now, &mut emit);
                if let (Some(user), Knock::Spa(spa)) = (slot.user(), &policy.knock) {
                    let index = policies.user_keys(id).iter().position(|&u| u == user);
                    if index.is_none_or(|i| spa.users[i].expired(unix_secs)) {
                        slot.revoke(RevokeReason::UserRemoved, &mut emit);
                    }
                }
            }
            source.remove_empty_slots();
        });
        self.prefixes
            .expire(now, |key| policies.get(key).is_some(), events);
        self.replays
            .prune(unix_secs, |key| policies.get(key).is_some());
        self.spent.prune(|key, window| {
            policies.find(key).is_some_and(|(id, _)| {
                policies
                    .accepted(id, now, wall, &self.spent)
                    .sequence(window)
                    .is_some()
            })
        });
    }
}
