//! The knock state machine. Pure: no I/O, no clock of its own. Callers pass
//! the time of each packet, which makes every rule testable without sleeping
//! and lets the simulator replay captures with their own timestamps.

mod policies;
mod ports;
mod rotation;
mod source;
mod table;

#[cfg(test)]
pub(crate) mod tests;

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{Config, Policy};

pub use policies::{Policies, PolicyKey};
pub use ports::{PolicySet, PortMap, PortRole};
use rotation::SpentWindows;
use source::SourceState;
pub use source::{GrantLeft, PolicyStatus, Progress};
use table::SourceTable;
pub use table::TablePart;

/// Index of a policy in the list in force.
pub type PolicyId = u8;

/// A point on a monotonic clock, in milliseconds from an arbitrary origin.
/// Rotating sequences read it as Unix time through a [`WallClock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// How timestamps map to Unix time: the offset from one to the other, in
/// milliseconds. Kept apart from the timestamps so that correcting the wall
/// clock moves rotating windows but no deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    pub offset_millis: i64,
}

impl WallClock {
    pub fn unix_millis(self, t: Timestamp) -> u64 {
        t.0.saturating_add_signed(self.offset_millis)
    }
}

/// What the engine needs to know about a NEW TCP SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syn {
    pub src: IpAddr,
    pub dst_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Reject => "reject",
        }
    }
}

/// Why a packet got its verdict; a small fixed set, fit for metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// The source holds a grant that opens this port.
    Granted,
    /// A knock port: always rejected so knock clients return at once.
    Knock,
    /// A close port: always rejected, revokes the grant.
    Close,
    /// Nothing opens this port for this source.
    NoGrant,
    /// The packet was not TCP over IPv4/IPv6 (decided by the I/O shell).
    Unparsable,
    /// Deciding panicked; the packet was rejected and the worker went on.
    Failed,
}

impl Reason {
    /// Every reason, in declaration order: `reason as usize` indexes it.
    pub const ALL: [Reason; 6] = [
        Reason::Granted,
        Reason::Knock,
        Reason::Close,
        Reason::NoGrant,
        Reason::Unparsable,
        Reason::Failed,
    ];

    pub fn verdict(self) -> Verdict {
        match self {
            Reason::Granted => Verdict::Accept,
            _ => Verdict::Reject,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::Knock => "knock",
            Reason::Close => "close",
            Reason::NoGrant => "no_grant",
            Reason::Unparsable => "unparsable",
            Reason::Failed => "failed",
        }
    }
}

/// The engine's answer for one packet; the reason implies the verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
}

impl Decision {
    pub const ACCEPT: Decision = Decision {
        reason: Reason::Granted,
    };

    pub const fn reject(reason: Reason) -> Self {
        debug_assert!(!matches!(reason, Reason::Granted));
        Decision { reason }
    }

    pub fn verdict(self) -> Verdict {
        self.reason.verdict()
    }
}

/// A change of one source's state under one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub src: IpAddr,
    pub policy: PolicyKey,
    pub kind: EventKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The next port of the sequence; `stage` ports are now matched.
    Advanced {
        stage: u8,
    },
    /// The port just knocked, again (a retransmitted SYN): nothing changes.
    Duplicate,
    /// The first port of the sequence while further along: back to stage 1.
    Restarted,
    /// Another port while in progress, under a strict policy.
    Reset,
    /// The step window passed before the next knock.
    Expired,
    /// The sequence was completed: the open ports are open for the source.
    Granted,
    /// The sequence was completed again while granted: the grant starts over.
    Refreshed,
    /// A rotating sequence was completed in a window already spent: a
    /// replay, refused.
    Replayed,
    /// A grant saved before a restart was put back.
    Restored,
    Revoked(RevokeReason),
    /// Dropped to make room in a full table.
    Evicted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeReason {
    CloseKnock,
    Timeout,
    /// By an operator, through the control socket.
    Admin,
}

impl RevokeReason {
    pub const ALL: [RevokeReason; 3] = [
        RevokeReason::CloseKnock,
        RevokeReason::Timeout,
        RevokeReason::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::CloseKnock => "close_knock",
            RevokeReason::Timeout => "timeout",
            RevokeReason::Admin => "admin",
        }
    }
}

/// Receives the engine's events. The engine calls it while it holds a lock
/// on part of the source table, so implementations must not block or do I/O:
/// collect, count, and act on the events afterwards.
pub trait EventSink {
    fn event(&mut self, event: Event);
}

impl EventSink for Vec<Event> {
    fn event(&mut self, event: Event) {
        self.push(event);
    }
}

/// The source table is at its cap and every tracked source holds a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the source table is full of grants")]
pub struct TableFull;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    pub src: IpAddr,
    pub policy: String,
    pub status: PolicyStatus,
}

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
    spent: SpentWindows,
    wall_offset: AtomicI64,
    next_key: AtomicU32,
}

impl Engine {
    pub fn new(config: &Config) -> Self {
        let next_key = AtomicU32::new(0);
        Engine {
            policies: ArcSwap::from_pointee(Policies::new(&config.policies, None, &next_key)),
            sources: SourceTable::new(config.limits.max_sources),
            spent: SpentWindows::default(),
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

    fn wall_clock(&self) -> WallClock {
        WallClock {
            offset_millis: self.wall_offset.load(Ordering::Relaxed),
        }
    }

    /// What a SYN to `port` is at `now`.
    pub fn role(&self, port: u16, now: Timestamp) -> PortRole {
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

    /// Decides one NEW SYN at time `now`. The state change caused by the
    /// packet is complete when this returns, so the next packet from the same
    /// source already sees it.
    pub fn decide(&self, syn: Syn, now: Timestamp, events: &mut impl EventSink) -> Decision {
        let policies = self.policies.load();
        let wall = self.wall_clock();
        let role = policies.role(syn.dst_port, now, wall);
        // Only the first port of a sequence starts tracking a stranger.
        let starts = match role {
            PortRole::Knock {
                first: true,
                policy,
            } => Some(policies.key(policy)),
            _ => None,
        };
        let syn_context = SynContext {
            role,
            port: syn.dst_port,
            wall,
            spent: &self.spent,
        };
        let granted = self
            .sources
            .update(syn.src, starts.is_some(), events, |source, events| {
                if let Some(key) = starts {
                    source.slot_or_insert(key, now);
                }
                apply(&policies, syn.src, source, syn_context, now, events)
            })
            .unwrap_or(false);
        match role {
            PortRole::Knock { .. } => Decision::reject(Reason::Knock),
            PortRole::Close { .. } => Decision::reject(Reason::Close),
            PortRole::Open { .. } if granted => Decision::ACCEPT,
            PortRole::Open { .. } | PortRole::Unrelated | PortRole::Rotating { .. } => {
                Decision::reject(Reason::NoGrant)
            }
        }
    }

    /// Opens a grant for `src` by hand, for `duration` or, without one, for
    /// the policy's grant timeout. Fails when the policy is no longer in
    /// force or the table is full of grants.
    pub fn grant(
        &self,
        src: IpAddr,
        key: PolicyKey,
        duration: Option<Duration>,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        let policies = self.policies.load();
        let policy = policies.get(key).ok_or(GrantError::NoSuchPolicy)?;
        let end = source::grant_end(duration.or(policy.grant_timeout), now);
        self.sources
            .update(src, true, events, |source, events| {
                let slot = source.slot_or_insert(key, now);
                slot.grant(end, &mut |kind| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                    })
                });
            })
            .ok_or(GrantError::TableFull(TableFull))
    }

    /// Puts back a grant saved before a restart, with the time it had left.
    pub fn restore(
        &self,
        src: IpAddr,
        key: PolicyKey,
        left: GrantLeft,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        self.policies
            .load()
            .get(key)
            .ok_or(GrantError::NoSuchPolicy)?;
        let end = match left {
            GrantLeft::For(left) => now.saturating_add(left),
            GrantLeft::UntilClosed => source::NEVER,
        };
        self.sources
            .update(src, true, events, |source, events| {
                let slot = source.slot_or_insert(key, now);
                slot.restore(end, &mut |kind| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                    })
                });
            })
            .ok_or(GrantError::TableFull(TableFull))
    }

    /// Ends the grants of `src`, under one policy or all; returns how many
    /// there were.
    pub fn revoke(
        &self,
        src: IpAddr,
        policy: Option<PolicyKey>,
        events: &mut impl EventSink,
    ) -> usize {
        self.sources
            .update(src, false, events, |source, events| {
                let mut revoked = 0;
                for slot in source
                    .slots_mut()
                    .filter(|slot| policy.is_none_or(|p| p == slot.policy))
                {
                    let key = slot.policy;
                    let mut emit = |kind| {
                        events.event(Event {
                            src,
                            policy: key,
                            kind,
                        })
                    };
                    revoked += usize::from(slot.revoke(RevokeReason::Admin, &mut emit));
                }
                source.remove_empty_slots();
                revoked
            })
            .unwrap_or(0)
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

    /// Every tracked source's progress and grants at `now`.
    pub fn status(&self, now: Timestamp) -> Vec<SourceStatus> {
        self.statuses(now, true)
    }

    /// The grants open at `now`, without the progress of sources that hold
    /// none: a short list even while a flood of knocks fills the table.
    pub fn grants(&self, now: Timestamp) -> Vec<SourceStatus> {
        self.statuses(now, false)
    }

    fn statuses(&self, now: Timestamp, with_progress: bool) -> Vec<SourceStatus> {
        let policies = self.policies.load();
        let mut statuses = Vec::new();
        self.sources.for_each(|src, source| {
            if !with_progress && !source.holds_grant() {
                return;
            }
            for slot in source.slots() {
                let Some(policy) = policies.get(slot.policy) else {
                    continue;
                };
                let mut status = slot.status(policy, now);
                if !with_progress {
                    status.progress = None;
                }
                if status.progress.is_some() || status.grant.is_some() {
                    statuses.push(SourceStatus {
                        src,
                        policy: policy.name.clone(),
                        status,
                    });
                }
            }
        });
        statuses.sort_by(|a, b| (a.src, &a.policy).cmp(&(b.src, &b.policy)));
        statuses
    }

    /// Settles the tracked sources in `part` of the table at time `now`:
    /// ends timed-out progress and grants, drops state of policies no longer
    /// in force, and forgets sources with nothing left. Run periodically so
    /// state does not wait for its source to come back.
    pub fn expire(&self, now: Timestamp, part: TablePart, events: &mut impl EventSink) {
        let policies = self.policies.load();
        let wall = self.wall_clock();
        self.sources.retain(part, |src, source| {
            for slot in source.slots_mut() {
                let key = slot.policy;
                match policies.get(key) {
                    Some(policy) => slot.settle(policy, now, &mut |kind| {
                        events.event(Event {
                            src,
                            policy: key,
                            kind,
                        })
                    }),
                    None => slot.forget(),
                }
            }
            source.remove_empty_slots();
        });
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the policy is no longer in force")]
    NoSuchPolicy,
    #[error(transparent)]
    TableFull(TableFull),
}

/// One SYN as `apply` needs it.
#[derive(Clone, Copy)]
struct SynContext<'a> {
    role: PortRole,
    port: u16,
    wall: WallClock,
    spent: &'a SpentWindows,
}

/// Applies one SYN to every policy the source has state in. Returns whether
/// the source holds a grant that opens the SYN's port.
fn apply(
    policies: &Policies,
    src: IpAddr,
    source: &mut SourceState,
    SynContext {
        role,
        port,
        wall,
        spent,
    }: SynContext,
    now: Timestamp,
    events: &mut impl EventSink,
) -> bool {
    let mut granted = false;
    for slot in source.slots_mut() {
        let key = slot.policy;
        let Some((id, policy)) = policies.find(key) else {
            // A policy a reload removed or changed.
            slot.forget();
            continue;
        };
        let mut emit = |kind| {
            events.event(Event {
                src,
                policy: key,
                kind,
            })
        };
        slot.settle(policy, now, &mut emit);
        match role {
            PortRole::Knock { policy: p, .. } if p == id => {
                let accepted = policies.accepted(id, now, wall, spent);
                slot.knock(policy, &accepted, port, now, &mut emit)
            }
            PortRole::Close { policy: p } if p == id => {
                slot.revoke(RevokeReason::CloseKnock, &mut emit);
                slot.other_syn(policy, &mut emit);
            }
            _ => {
                slot.other_syn(policy, &mut emit);
                if let PortRole::Open { policies: open } = role {
                    granted |= open.contains(id) && slot.is_granted();
                }
            }
        }
    }
    source.remove_empty_slots();
    granted
}
