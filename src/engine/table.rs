//! The bounded table of tracked sources.
//!
//! A source enters the table with its first knock and leaves when it has no
//! progress and no grant left. At the cap, the oldest source without a grant
//! is evicted; grants are never evicted to make room for strangers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam::queue::SegQueue;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::source::SourceState;
use super::{Event, EventKind, EventSink, Timestamp};

pub struct SourceTable {
    /// aHash with a random key: several times cheaper than the default
    /// SipHash, still keyed so that spoofed sources cannot aim at one bucket.
    map: DashMap<IpAddr, SourceState, ahash::RandomState>,
    /// Entries in the map plus reservations about to be inserted; never above
    /// `max`. Kept apart because `DashMap::len` locks every shard.
    len: AtomicUsize,
    max: usize,
    /// Sources in the order they started being tracked. Entries whose source
    /// left the table (or came back later) are stale and skipped.
    order: SegQueue<(IpAddr, Timestamp)>,
}

impl SourceTable {
    pub fn new(max: usize) -> Self {
        SourceTable {
            map: DashMap::with_hasher(ahash::RandomState::new()),
            len: AtomicUsize::new(0),
            max,
            order: SegQueue::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Runs `f` on the state of `src` and removes the source if `f` leaves it
    /// empty. An untracked source is tracked first when `create` is set and
    /// there is room (or room can be made); otherwise returns `None`.
    pub fn update<R, S: EventSink>(
        &self,
        src: IpAddr,
        create: bool,
        now: Timestamp,
        events: &mut S,
        f: impl FnOnce(&mut SourceState, &mut S) -> R,
    ) -> Option<R> {
        // Eviction locks other shards, so room is made before this source's
        // shard is locked below.
        let reserved = create && !self.map.contains_key(&src) && self.reserve(events);
        let mut entry = match self.map.entry(src) {
            Entry::Occupied(entry) => {
                if reserved {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
                entry.into_ref()
            }
            Entry::Vacant(entry) if reserved => {
                self.order.push((src, now));
                entry.insert(SourceState::new(now))
            }
            Entry::Vacant(_) => return None,
        };
        let result = f(&mut entry, events);
        if entry.is_empty() {
            drop(entry);
            self.remove_if(&src, SourceState::is_empty);
        }
        Some(result)
    }

    /// Takes one place in the table, evicting the oldest source without a
    /// grant when the table is full. False if every tracked source holds a grant.
    fn reserve(&self, events: &mut impl EventSink) -> bool {
        loop {
            let len = self.len.load(Ordering::Relaxed);
            if len >= self.max {
                if !self.evict_oldest(events) {
                    return false;
                }
                continue;
            }
            if self
                .len
                .compare_exchange(len, len + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    fn evict_oldest(&self, events: &mut impl EventSink) -> bool {
        while let Some((src, since)) = self.order.pop() {
            let evictable =
                |state: &SourceState| state.tracked_since == since && !state.holds_grant();
            if let Some(state) = self.remove_if(&src, evictable) {
                for policy in state.policies() {
                    events.event(Event {
                        src,
                        policy,
                        kind: EventKind::Evicted,
                    });
                }
                return true;
            }
        }
        false
    }

    fn remove_if(&self, src: &IpAddr, f: impl FnOnce(&SourceState) -> bool) -> Option<SourceState> {
        let (_, state) = self.map.remove_if(src, |_, state| f(state))?;
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(state)
    }

    /// Runs `f` on every source, read-only.
    pub fn for_each(&self, mut f: impl FnMut(IpAddr, &SourceState)) {
        for entry in self.map.iter() {
            f(*entry.key(), entry.value());
        }
    }

    /// Runs `f` on every source, forgets those it leaves empty, and drops
    /// stale entries from the eviction order once they outnumber live ones.
    pub fn retain(&self, mut f: impl FnMut(IpAddr, &mut SourceState)) {
        let mut removed = 0;
        self.map.retain(|src, state| {
            f(*src, state);
            removed += usize::from(state.is_empty());
            !state.is_empty()
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);

        let live = self.len();
        if self.order.len() > 2 * live + 1024 {
            for _ in 0..self.order.len() {
                let Some((src, since)) = self.order.pop() else {
                    break;
                };
                let current = self
                    .map
                    .get(&src)
                    .is_some_and(|state| state.tracked_since == since);
                if current {
                    self.order.push((src, since));
                }
            }
        }
    }
}
