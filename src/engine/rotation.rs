//! Which sequences a policy accepts at a given time. A fixed policy accepts
//! its sequence; a rotating one accepts the sequences of the current and the
//! previous window (for clock skew and slow links), each only until some
//! source completes it: a completed window is spent.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};

use super::{PolicyId, PolicyKey, PortRole, Timestamp, WallClock};
use crate::config::{Knock, Policy};
use crate::flow::FlowPort;
use crate::rotating::Rotating;

/// The live windows of every rotating policy, worked out once per window
/// rather than per packet.
pub(super) struct Schedule {
    /// Unix milliseconds during which no rotating policy changes window.
    span: Range<u64>,
    /// By policy id; `None` for fixed policies.
    live: Vec<Option<LiveWindows>>,
}

/// The current and the previous window, each with its sequence.
type LiveWindows = [(u64, Vec<FlowPort>); 2];

impl Schedule {
    fn at(list: &[Policy], now: u64) -> Self {
        let mut span = 0..u64::MAX;
        let live = list
            .iter()
            .map(|policy| {
                let Knock::Rotating(rotating) = &policy.knock else {
                    return None;
                };
                let period = rotating.period_millis();
                let window = rotating.window_at(now);
                span.start = span.start.max(window * period);
                span.end = span.end.min((window + 1).saturating_mul(period));
                let previous = window.saturating_sub(1);
                Some([
                    (window, rotating.sequence(&policy.name, window)),
                    (previous, rotating.sequence(&policy.name, previous)),
                ])
            })
            .collect();
        Schedule { span, live }
    }

    fn windows(&self, policy: PolicyId) -> &[(u64, Vec<FlowPort>)] {
        self.live
            .get(usize::from(policy))
            .and_then(Option::as_ref)
            .map_or(&[], |windows| windows.as_slice())
    }
}

/// The schedule of one set of policies, rebuilt when the time leaves it.
pub(super) struct ScheduleCache(ArcSwap<Schedule>);

impl ScheduleCache {
    pub(super) fn new() -> Self {
        ScheduleCache(ArcSwap::from_pointee(Schedule {
            span: 0..0,
            live: Vec::new(),
        }))
    }

    /// The schedule at Unix time `now` (ms). Workers that cross into a new
    /// window at once may each build it; they build the same one.
    pub(super) fn at(&self, list: &[Policy], now: u64) -> Guard<Arc<Schedule>> {
        let schedule = self.0.load();
        if schedule.span.contains(&now) {
            return schedule;
        }
        let fresh = Arc::new(Schedule::at(list, now));
        self.0.store(Arc::clone(&fresh));
        Guard::from_inner(fresh)
    }
}

/// What a port in a rotating policy's range is at the schedule's time.
pub(super) fn rotating_role(schedule: &Schedule, policy: PolicyId, port: FlowPort) -> PortRole {
    let windows = schedule.windows(policy);
    if windows.iter().any(|(_, sequence)| sequence.contains(&port)) {
        let first = windows.iter().any(|(_, sequence)| sequence[0] == port);
        PortRole::Knock { policy, first }
    } else {
        PortRole::Unrelated
    }
}

/// Windows whose sequence some source completed; shared by all sources.
#[derive(Default)]
pub struct SpentWindows(Mutex<HashSet<(PolicyKey, u64)>>);

impl SpentWindows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(PolicyKey, u64)>> {
        // The set stays consistent through any panic: each change is one insert.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `window` spent; false if it already was.
    pub fn spend(&self, policy: PolicyKey, window: u64) -> bool {
        self.lock().insert((policy, window))
    }

    /// Forgets windows no policy in force can accept any more.
    pub fn prune(&self, mut still_live: impl FnMut(PolicyKey, u64) -> bool) {
        self.lock()
            .retain(|&(policy, window)| still_live(policy, window));
    }

    pub fn list(&self) -> Vec<(PolicyKey, u64)> {
        let mut list: Vec<_> = self.lock().iter().copied().collect();
        list.sort_unstable();
        list
    }
}

/// The sequences one policy accepts at one time, newest first, each with
/// its window (a fixed sequence is window 0, forever).
pub struct Accepted<'a> {
    kind: AcceptedKind<'a>,
    spent: &'a SpentWindows,
    key: PolicyKey,
    wall: WallClock,
}

enum AcceptedKind<'a> {
    Fixed(&'a [FlowPort]),
    Rotating {
        rotating: &'a Rotating,
        schedule: Guard<Arc<Schedule>>,
        policy: PolicyId,
    },
}

impl<'a> Accepted<'a> {
    pub(super) fn fixed(
        sequence: &'a [FlowPort],
        spent: &'a SpentWindows,
        key: PolicyKey,
        wall: WallClock,
    ) -> Self {
        Accepted {
            kind: AcceptedKind::Fixed(sequence),
            spent,
            key,
            wall,
        }
    }

    pub(super) fn rotating(
        rotating: &'a Rotating,
        schedule: Guard<Arc<Schedule>>,
        policy: PolicyId,
        spent: &'a SpentWindows,
        key: PolicyKey,
        wall: WallClock,
    ) -> Self {
        Accepted {
            kind: AcceptedKind::Rotating {
                rotating,
                schedule,
                policy,
            },
            spent,
            key,
            wall,
        }
    }

    /// The window that was current at `t`.
    pub fn window_at(&self, t: Timestamp) -> u64 {
        match &self.kind {
            AcceptedKind::Fixed(_) => 0,
            AcceptedKind::Rotating { rotating, .. } => rotating.window_at(self.wall.unix_millis(t)),
        }
    }

    /// The sequence of `window`, if it is accepted now.
    pub fn sequence(&self, window: u64) -> Option<&[FlowPort]> {
        self.iter()
            .find(|&(w, _)| w == window)
            .map(|(_, sequence)| sequence)
    }

    /// The newest accepted window whose sequence starts with `port`.
    pub fn starting_with(&self, port: FlowPort) -> Option<u64> {
        self.iter()
            .find(|(_, sequence)| sequence[0] == port)
            .map(|(window, _)| window)
    }

    /// Records that a source completed `window`'s sequence; false if one
    /// already had, so the completion is a replay. Fixed sequences are never
    /// spent.
    pub fn spend(&self, window: u64) -> bool {
        match self.kind {
            AcceptedKind::Fixed(_) => true,
            AcceptedKind::Rotating { .. } => self.spent.spend(self.key, window),
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[FlowPort])> {
        let (fixed, rotating) = match &self.kind {
            AcceptedKind::Fixed(sequence) => (Some((0, *sequence)), None),
            AcceptedKind::Rotating {
                schedule, policy, ..
            } => (None, Some(schedule.windows(*policy))),
        };
        fixed.into_iter().chain(
            rotating
                .into_iter()
                .flatten()
                .map(|(window, sequence)| (*window, sequence.as_slice())),
        )
    }
}
