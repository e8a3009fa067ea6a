//! The bounded table of tracked sources.
//!
//! A source enters the table with its first knock and leaves when it has no
//! progress and no grant left. The table is set-associative, like a CPU
//! cache: a keyed hash of the address picks one bucket of [`WAYS`] places,
//! allocated once, and the source can live only there. So a decision locks
//! one bucket and reads a few adjacent cache lines, never allocates, and
//! never waits for another bucket. A stranger that finds its bucket full, or
//! the table at its cap, takes the place of the source in that bucket that
//! knocked least recently. Grants are never evicted to make room for
//! strangers: a stranger whose bucket holds only grants is not tracked.
//!
//! The table has a quarter more places than its cap, so that buckets rarely
//! overflow below it: about 73 bytes per source of the cap in all.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::source::SourceState;
use super::{Event, EventKind, EventSink, GrantScope, Origin, PortMask, GRANT_UNTIL_CLOSED};

/// Places per bucket: the sources compared when one must be evicted.
const WAYS: usize = 8;

type Bucket = [Option<(IpAddr, SourceState)>; WAYS];

/// A place's tag when it is free.
const FREE: u8 = 0;

pub struct SourceTable {
    buckets: Box<[Mutex<Bucket>]>,
    /// One byte per place, a word per bucket: [`FREE`], or a byte of the
    /// hash of the source in that place. Written under the bucket's lock,
    /// read without it: a SYN from an untracked source is answered from
    /// this small array, which stays in the CPU's cache, without touching
    /// the bucket.
    tags: Box<[AtomicU64]>,
    /// aHash with a random key: cheap, and keyed so that spoofed sources
    /// cannot aim at one bucket.
    hasher: ahash::RandomState,
    /// Sources tracked, never above `max`.
    len: AtomicUsize,
    max: usize,
}

impl SourceTable {
    pub fn new(max: usize) -> Self {
        // A quarter more places than the cap, in whole buckets.
        let buckets = (max + max / 4).div_ceil(WAYS).max(1);
        SourceTable {
            buckets: huge_pages_vec(buckets, Mutex::default).into_boxed_slice(),
            tags: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
            hasher: ahash::RandomState::new(),
            len: AtomicUsize::new(0),
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The bucket `src` lives in, and its tag.
    fn place(&self, src: IpAddr) -> (usize, u8) {
        let hash = self.hasher.hash_one(src);
        // The hash scaled to the number of buckets, which takes its high
        // bits: no division. The tag takes the low ones.
        let index = ((u128::from(hash) * self.buckets.len() as u128) >> 64) as usize;
        (index, (hash as u8).max(1))
    }

    fn set_tag(&self, index: usize, way: usize, tag: u8) {
        let shift = 8 * way;
        let word = &self.tags[index];
        let tags = word.load(Ordering::Relaxed) & !(0xff << shift) | u64::from(tag) << shift;
        word.store(tags, Ordering::Release);
    }

    /// Starts loading the tags and the bucket of `src` into the CPU's cache.
    pub fn prefetch(&self, src: IpAddr) {
        let (index, _) = self.place(src);
        prefetch(&self.tags[index]);
        prefetch(&self.buckets[index]);
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
        let (index, tag) = self.place(src);
        let tagged = |tags: u64| ways_tagged(tags, tag);
        if !create
            && tagged(self.tags[index].load(Ordering::Acquire))
                .next()
                .is_none()
        {
            return None;
        }
        prefetch(&self.buckets[index]);
        let mut bucket = lock(&self.buckets[index]);
        let found = tagged(self.tags[index].load(Ordering::Relaxed))
            .find(|&way| bucket[way].as_ref().is_some_and(|(key, _)| *key == src));
        let way = match found {
            Some(way) => way,
            None if create => {
                let way = self.make_room(index, &mut bucket, events)?;
                bucket[way] = Some((src, SourceState::default()));
                self.set_tag(index, way, tag);
                way
            }
            None => return None,
        };
        let (_, state) = bucket[way].as_mut().expect("a tracked source");
        let result = f(state, events);
        if state.is_empty() {
            bucket[way] = None;
            self.set_tag(index, way, FREE);
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        Some(result)
    }

    /// Finds a free place for a new source in bucket `index` and counts the
    /// source in: an empty one while the table is below its cap, else the
    /// place of the source without a grant that knocked least recently,
    /// which is evicted. `None` if the bucket holds only grants.
    fn make_room(
        &self,
        index: usize,
        bucket: &mut Bucket,
        events: &mut impl EventSink,
    ) -> Option<usize> {
        if let Some(way) = ways_tagged(self.tags[index].load(Ordering::Relaxed), FREE).next() {
            let counted = self
                .len
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                    (len < self.max).then_some(len + 1)
                });
            if counted.is_ok() {
                return Some(way);
            }
        }
        let (way, _) = bucket
            .iter()
            .enumerate()
            .filter_map(|(way, place)| Some((way, place.as_ref()?)))
            .filter(|(_, (_, state))| !state.holds_grant())
            .min_by_key(|(_, (_, state))| state.last_knock())?;
        let (src, state) = bucket[way].take().expect("an occupied place");
        for policy in state.policies() {
            events.event(Event {
                src,
                policy,
                kind: EventKind::Evicted,
                grant: GrantScope {
                    prefix: None,
                    ports: PortMask::ALL,
                    until: GRANT_UNTIL_CLOSED,
                    origin: Origin::LOCAL,
                    user: None,
                },
            });
        }
        // The newcomer takes the evicted source's place and its count.
        Some(way)
    }

    /// The buckets of `part` holding any source, locked one at a time.
    /// Empty ones are skipped by their tags: an idle table is walked without
    /// touching its buckets.
    fn occupied(&self, part: TablePart) -> impl Iterator<Item = (usize, MutexGuard<'_, Bucket>)> {
        let len = self.buckets.len();
        let range = part.index * len / part.of..(part.index + 1) * len / part.of;
        range
            .filter(|&index| self.tags[index].load(Ordering::Acquire) != 0)
            .map(|index| (index, lock(&self.buckets[index])))
    }

    /// Runs `f` on every source, read-only.
    pub fn for_each(&self, mut f: impl FnMut(IpAddr, &SourceState)) {
        for (_, bucket) in self.occupied(TablePart::WHOLE) {
            for (src, state) in bucket.iter().flatten() {
                f(*src, state);
            }
        }
    }

    /// Runs `f` on every source in `part` and forgets those it leaves empty.
    pub fn retain(&self, part: TablePart, mut f: impl FnMut(IpAddr, &mut SourceState)) {
        for (index, mut bucket) in self.occupied(part) {
            for (way, place) in bucket.iter_mut().enumerate() {
                let Some((src, state)) = place else { continue };
                f(*src, state);
                if state.is_empty() {
                    *place = None;
                    self.set_tag(index, way, FREE);
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Part `index` of `of` equal parts of the table: a sweep of the whole table
/// can be spread over time, so that none holds up the workers for long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablePart {
    pub index: usize,
    pub of: usize,
}

impl TablePart {
    pub const WHOLE: TablePart = TablePart { index: 0, of: 1 };
}

/// The places of a bucket whose tag in `tags` is `tag`.
fn ways_tagged(tags: u64, tag: u8) -> impl Iterator<Item = usize> {
    (0..WAYS).filter(move |&way| (tags >> (8 * way)) as u8 == tag)
}

/// Starts loading all of `value` into the CPU's cache at once, rather than
/// one cache line after another as it is read: a bucket spans several.
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = (value as *const T).cast::<i8>();
        for offset in (0..size_of::<T>()).step_by(64) {
            // SAFETY: a prefetch is a hint; it reads nothing and cannot
            // fault, and the address lies within `value`.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(start.add(offset));
            }
        }
    }
    // Elsewhere the hardware's own prefetching has to do.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// A bucket's lock. Places, tags and the count change together, never
/// while the engine's code runs on a state, so a bucket whose lock a panic
/// poisoned is still whole.
fn lock(bucket: &Mutex<Bucket>) -> MutexGuard<'_, Bucket> {
    bucket.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `len` values from `make`, in memory the kernel is asked to back with huge
/// pages where it can: a lookup in a large table then costs a cache miss but
/// rarely a page-table walk as well.
fn huge_pages_vec<T>(len: usize, make: impl FnMut() -> T) -> Vec<T> {
    let mut vec = Vec::with_capacity(len);
    let bytes = len * size_of::<T>();
    let start = vec.as_mut_ptr() as usize;
    // madvise wants page-aligned ranges; huge pages need 2 MiB-aligned
    // stretches inside it.
    const PAGE: usize = 4096;
    let aligned = start.next_multiple_of(PAGE);
    if bytes > 2 << 20 {
        // SAFETY: the range lies inside the vector's own allocation, not yet
        // written; MADV_HUGEPAGE only changes how it is backed.
        unsafe {
            libc::madvise(
                aligned as *mut libc::c_void,
                (start + bytes - aligned) / PAGE * PAGE,
                libc::MADV_HUGEPAGE,
            );
        }
    }
    vec.resize_with(len, make);
    vec
}
