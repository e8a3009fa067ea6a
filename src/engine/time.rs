//! The engine's clock: monotonic timestamps, passed in with each packet,
//! and their mapping to Unix time for rotating windows.

use std::time::Duration;

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
