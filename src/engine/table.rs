//! The bounded table of tracked sources.
//!
//! A source enters the table with its first knock and leaves when it has no
//! progress and no grant left. At the cap, a source without a grant is
//! evicted: the one that knocked least recently among a few sampled at a
//! random place in one shard. Sampling needs no per-source bookkeeping (an
//! exact oldest-first order would cost a queue entry per source) and finds
//! an old source, since the sample is random and the table turns over.
//! Grants are never evicted to make room for strangers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::source::SourceState;
use super::{Event, EventKind, EventSink, Timestamp};

/// Sources without a grant compared per eviction.
const EVICTION_SAMPLE: usize = 8;
/// Evicted from a full sample: the least recent knockers of it. Reading the
/// sample is most of an eviction's cost, so each one makes room for two.
const EVICTED_PER_SAMPLE: usize = 2;
/// Tracked sources looked at per eviction at most: a table nearly full of
/// grants refuses a stranger rather than search it all.
const EVICTION_LOOKS: usize = 64 * EVICTION_SAMPLE;

pub struct SourceTable {
    /// aHash with a random key: several times cheaper than the default
    /// SipHash, still keyed so that spoofed sources cannot aim at one bucket.
    map: DashMap<IpAddr, SourceState, ahash::RandomState>,
    /// Entries in the map plus reservations about to be inserted; never above
    /// `max`. Kept apart because `DashMap::len` locks every shard.
    len: AtomicUsize,
    max: usize,
    /// The shard the next eviction starts at, round robin.
    next_shard: AtomicUsize,
}

impl SourceTable {
    pub fn new(max: usize) -> Self {
        SourceTable {
            map: DashMap::with_hasher(ahash::RandomState::new()),
            len: AtomicUsize::new(0),
            max,
            next_shard: AtomicUsize::new(0),
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
        events: &mut S,
        f: impl FnOnce(&mut SourceState, &mut S) -> R,
    ) -> Option<R> {
        // Eviction locks a shard, so room is made before this source's shard
        // is locked below.
        let reserved = create && !self.map.contains_key(&src) && self.reserve(events);
        let mut entry = match self.map.entry(src) {
            Entry::Occupied(entry) => {
                if reserved {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
                entry.into_ref()
            }
            Entry::Vacant(entry) if reserved => entry.insert(SourceState::default()),
            Entry::Vacant(_) => return None,
        };
        let result = f(&mut entry, events);
        if entry.is_empty() {
            drop(entry);
            if self
                .map
                .remove_if(&src, |_, state| state.is_empty())
                .is_some()
            {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Some(result)
    }

    /// Takes one place in the table, evicting a source without a grant when
    /// the table is full. False if every tracked source holds a grant.
    fn reserve(&self, events: &mut impl EventSink) -> bool {
        loop {
            let len = self.len.load(Ordering::Relaxed);
            if len >= self.max {
                if !self.evict_one(events) {
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

    /// Evicts the sources that knocked least recently of up to
    /// [`EVICTION_SAMPLE`] without a grant, read from a random place on: in a
    /// large table all from one shard (the next in turn), in a small one from
    /// every shard. A full sample gives up [`EVICTED_PER_SAMPLE`] sources; a
    /// smaller one (a small table: all of it) its oldest only. False if none
    /// of the sources looked at is without a grant.
    fn evict_one(&self, events: &mut impl EventSink) -> bool {
        let shards = self.map.shards();
        let first = self.next_shard.fetch_add(1, Ordering::Relaxed);
        let mut sample = [(IpAddr::from([0, 0, 0, 0]), Timestamp::default()); EVICTION_SAMPLE];
        let (mut sampled, mut looked) = (0, 0);
        'sampling: for i in 0..shards.len() {
            let shard = shards[(first + i) % shards.len()].read();
            let buckets = shard.buckets();
            let start = fastrand::usize(..buckets);
            for index in (0..buckets).map(|step| (start + step) % buckets) {
                // SAFETY: the shard's read lock is held while its buckets are
                // read, and every index is below `buckets()`.
                let (src, state) = unsafe {
                    if !shard.is_bucket_full(index) {
                        continue;
                    }
                    shard.bucket(index).as_ref()
                };
                let state = state.get();
                looked += 1;
                if looked > EVICTION_LOOKS {
                    break 'sampling;
                }
                if state.holds_grant() {
                    continue;
                }
                sample[sampled] = (*src, state.last_knock());
                sampled += 1;
                if sampled == EVICTION_SAMPLE {
                    break 'sampling;
                }
            }
        }
        if sampled == 0 {
            return false;
        }
        let sample = &mut sample[..sampled];
        sample.sort_unstable_by_key(|&(_, knocked)| knocked);
        let evict = if sampled == EVICTION_SAMPLE {
            EVICTED_PER_SAMPLE
        } else {
            1
        };
        for &(src, knocked) in &sample[..evict] {
            // Unless it changed since it was sampled; the caller checks for
            // room again anyway.
            let evicted = self.map.remove_if(&src, |_, state| {
                !state.holds_grant() && state.last_knock() == knocked
            });
            if let Some((src, state)) = evicted {
                self.len.fetch_sub(1, Ordering::Relaxed);
                for policy in state.policies() {
                    events.event(Event {
                        src,
                        policy,
                        kind: EventKind::Evicted,
                    });
                }
            }
        }
        true
    }

    /// Runs `f` on every source, read-only.
    pub fn for_each(&self, mut f: impl FnMut(IpAddr, &SourceState)) {
        for entry in self.map.iter() {
            f(*entry.key(), entry.value());
        }
    }

    /// Runs `f` on every source and forgets those it leaves empty.
    pub fn retain(&self, mut f: impl FnMut(IpAddr, &mut SourceState)) {
        let mut removed = 0;
        self.map.retain(|src, state| {
            f(*src, state);
            removed += usize::from(state.is_empty());
            !state.is_empty()
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
    }
}
