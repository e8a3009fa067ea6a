//! `knockq run`: binds the queues, runs one worker per queue, expires state
//! in the background and stops cleanly on SIGINT or SIGTERM.

mod events;
mod queue;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info};

use crate::config::Config;
use crate::engine::{Engine, Timestamp};

pub use queue::BindError;

/// How often timed-out progress and grants are removed.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);

/// The daemon's monotonic clock, as the engine's timestamps.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Clock(Instant::now())
    }

    pub fn now(&self) -> Timestamp {
        Timestamp::from_millis(u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

enum Stop {
    Signal(i32),
    WorkerFailed(u16, String),
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("worker for queue {0} stopped: {1}")]
    Worker(u16, String),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
}

pub fn run(config: &Config) -> Result<(), DaemonError> {
    let engine = Arc::new(Engine::new(config));
    let clock = Clock::start();
    // Bind every queue before starting: a queue that cannot be bound is
    // reported at once, with nothing left running.
    let queues = config
        .queue
        .numbers()
        .map(|num| queue::open_queue(num).map(|queue| (num, queue)))
        .collect::<Result<Vec<_>, _>>()?;

    let (stop_tx, stop_rx) = channel::unbounded();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(DaemonError::Signals)?;
    let signal_tx = stop_tx.clone();
    thread::Builder::new()
        .name("knockq-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let _ = signal_tx.send(Stop::Signal(signal));
            }
        })
        .map_err(DaemonError::Signals)?;

    let shutdown = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = queues
        .into_iter()
        .map(|(num, queue)| {
            let worker =
                worker::Worker::new(num, Arc::clone(&engine), clock, Arc::clone(&shutdown));
            let stop_tx = stop_tx.clone();
            thread::Builder::new()
                .name(format!("knockq-queue-{num}"))
                .spawn(move || {
                    if let Err(e) = worker.run(queue) {
                        let _ = stop_tx.send(Stop::WorkerFailed(num, e.to_string()));
                    }
                })
                .expect("spawning a worker thread")
        })
        .collect();
    let names: Vec<&str> = engine.policies().iter().map(|p| p.name.as_str()).collect();
    info!(
        "knockq gate running on {}, policies: {}",
        config.queue,
        names.join(", ")
    );

    let mut expired = Vec::new();
    let outcome = loop {
        match stop_rx.recv_timeout(EXPIRE_INTERVAL) {
            Ok(Stop::Signal(signal)) => {
                info!(signal, "stopping");
                break Ok(());
            }
            Ok(Stop::WorkerFailed(num, why)) => {
                error!(queue = num, "worker stopped: {why}");
                break Err(DaemonError::Worker(num, why));
            }
            Err(RecvTimeoutError::Timeout) => {
                engine.expire(clock.now(), &mut expired);
                events::log(&engine, expired.drain(..));
            }
            Err(RecvTimeoutError::Disconnected) => unreachable!("the main loop holds a sender"),
        }
    };
    shutdown.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    outcome
}
