//! A script call's time budget, counted in CPU time its thread spends, so
//! a worker preempted on a busy host does not fail the calls it was in.
//!
//! Reading a thread's CPU clock is a system call, some 200 ns: as long as
//! a whole script call, too dear for every call. The interrupt watches the
//! wall clock instead (read in the vDSO, 20 ns), which runs at least as
//! fast as the thread's CPU clock, and reads the CPU clock only once the
//! wall clock says the budget may be spent. What the call itself used is
//! bounded by a reading of the CPU clock taken before it, refreshed at most
//! a quarter budget of wall time earlier: a call is stopped once it has
//! certainly used its budget, and so may run up to a quarter over.

use std::cell::Cell;
use std::time::{Duration, Instant};

pub struct Budget {
    budget: Cell<Duration>,
    started: Cell<Instant>,
    /// When the wall clock next says the budget may be spent.
    deadline: Cell<Instant>,
    /// The thread's CPU clock and the wall clock, read together.
    baseline: Cell<(Instant, Duration)>,
}

impl Budget {
    pub fn new() -> Budget {
        let now = Instant::now();
        Budget {
            budget: Cell::new(Duration::ZERO),
            started: Cell::new(now),
            deadline: Cell::new(now),
            baseline: Cell::new((now, thread_cpu_time())),
        }
    }

    /// Starts a call that may use `budget` of CPU time.
    pub fn start(&self, budget: Duration) {
        let now = Instant::now();
        if now.duration_since(self.baseline.get().0) > budget / 4 {
            self.baseline.set((now, thread_cpu_time()));
        }
        self.budget.set(budget);
        self.started.set(now);
        self.deadline.set(now + budget);
    }

    /// Whether the call has used its budget; asked by the interrupt.
    pub fn spent(&self) -> bool {
        let now = Instant::now();
        if now <= self.deadline.get() {
            return false;
        }
        let (baseline_at, baseline_cpu) = self.baseline.get();
        // The thread can have used at most the wall time between the
        // baseline and the call's start on what came before the call.
        let before_call = self.started.get().duration_since(baseline_at);
        let used = thread_cpu_time()
            .saturating_sub(baseline_cpu)
            .saturating_sub(before_call);
        let budget = self.budget.get();
        if used >= budget {
            return true;
        }
        self.deadline.set(now + (budget - used));
        false
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_THREAD_CPUTIME_ID
    // exists on every Linux knockq runs on, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burn(cpu: Duration) {
        let until = thread_cpu_time() + cpu;
        while thread_cpu_time() < until {}
    }

    #[test]
    fn time_the_thread_spends_asleep_does_not_count() {
        let budget = Budget::new();
        budget.start(Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!budget.spent());
    }

    #[test]
    fn cpu_time_the_call_uses_counts() {
        let budget = Budget::new();
        budget.start(Duration::from_millis(5));
        burn(Duration::from_millis(2));
        std::thread::sleep(Duration::from_millis(10));
        assert!(!budget.spent(), "2 ms of 5 used");
        burn(Duration::from_millis(4));
        assert!(budget.spent(), "6 ms of 5 used");
    }
}
