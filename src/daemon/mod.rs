//! `knockq run`: binds the queues, runs one worker per queue, serves metrics
//! and the control socket, expires state in the background, and stops
//! cleanly on SIGINT or SIGTERM.

mod control;
mod events;
pub mod metrics;
mod queue;
mod scrape;
mod worker;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info};

use crate::config::Config;
use crate::engine::{Engine, Timestamp};
use control::ControlSocket;
use events::EventReport;
use metrics::Metrics;
use scrape::ScrapeServer;

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
    #[error("cannot use the control socket {0}")]
    Control(std::path::PathBuf, #[source] io::Error),
    #[error("cannot serve metrics on {0}")]
    Metrics(std::net::SocketAddr, #[source] io::Error),
    #[error("cannot set up metrics")]
    Registry(#[from] prometheus::Error),
    #[error("worker for queue {0} stopped: {1}")]
    Worker(u16, String),
    #[error("cannot start the daemon's threads")]
    Threads(#[source] io::Error),
}

pub fn run(config: &Config) -> Result<(), DaemonError> {
    let engine = Arc::new(Engine::new(config));
    let metrics = Arc::new(Metrics::new(&engine.policies(), config.queue.numbers())?);
    let clock = Clock::start();
    // Set-up that must happen while this is the only thread: finding each
    // queue's socket and binding the control socket under a narrow umask.
    // Everything is bound before anything runs: a failure leaves nothing.
    let queues = config
        .queue
        .numbers()
        .map(|num| queue::open_queue(num).map(|queue| (num, queue)))
        .collect::<Result<Vec<_>, _>>()?;
    let control = ControlSocket::bind(&config.control.socket)
        .map_err(|e| DaemonError::Control(config.control.socket.clone(), e))?;
    let scrape = match config.metrics.enabled {
        true => Some(
            ScrapeServer::start(
                config.metrics.listen,
                Arc::clone(&metrics),
                Arc::clone(&engine),
            )
            .map_err(|e| DaemonError::Metrics(config.metrics.listen, e))?,
        ),
        false => None,
    };

    let (stop_tx, stop_rx) = channel::unbounded();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(DaemonError::Threads)?;
    let signal_tx = stop_tx.clone();
    thread::Builder::new()
        .name("knockq-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let _ = signal_tx.send(Stop::Signal(signal));
            }
        })
        .map_err(DaemonError::Threads)?;

    let report = || EventReport::new(Arc::clone(&metrics), Instant::now());
    let control_path = control.path().to_owned();
    control
        .serve(Arc::clone(&engine), clock, report())
        .map_err(DaemonError::Threads)?;

    let shutdown = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (num, queue) in queues {
        let worker = worker::Worker {
            num,
            engine: Arc::clone(&engine),
            metrics: Arc::clone(&metrics),
            report: report(),
            clock,
            shutdown: Arc::clone(&shutdown),
        };
        let stop_tx = stop_tx.clone();
        let handle = thread::Builder::new()
            .name(format!("knockq-queue-{num}"))
            .spawn(move || {
                if let Err(e) = worker.run(queue) {
                    let _ = stop_tx.send(Stop::WorkerFailed(num, e.to_string()));
                }
            })
            .map_err(DaemonError::Threads)?;
        workers.push(handle);
    }
    let names: Vec<String> = config.policies.iter().map(|p| p.name.clone()).collect();
    info!(
        "knockq gate running on {}, policies: {}; control socket {}; metrics {}",
        config.queue,
        names.join(", "),
        control_path.display(),
        match config.metrics.enabled {
            true => format!("on http://{}/metrics", config.metrics.listen),
            false => "off".to_owned(),
        }
    );

    let mut report = report();
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
                report.publish(&engine, &mut expired, Instant::now());
            }
            Err(RecvTimeoutError::Disconnected) => unreachable!("this loop holds a sender"),
        }
    };
    shutdown.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    if let Some(scrape) = scrape {
        scrape.stop();
    }
    let _ = std::fs::remove_file(&control_path);
    outcome
}
