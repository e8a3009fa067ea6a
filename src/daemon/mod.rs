//! `knockq run`: binds the queues, runs one worker per queue, serves metrics
//! and the control socket, expires and saves state in the background,
//! reloads on SIGHUP, and stops cleanly on SIGINT or SIGTERM.

mod control;
mod events;
pub mod metrics;
mod queue;
mod receive;
mod scrape;
mod state;
mod verdicts;
mod worker;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{error, info, warn};

use crate::cluster::{Cluster, ClusterError, ClusterMetrics};
use crate::config::{Config, ConfigError};
use crate::engine::{Engine, TablePart, Timestamp};
use crate::firewall;
use crate::hooks::{HookMetrics, Hooks};
use crate::listeners::{Clock, GrantListener, Nodes};
use crate::offload::{KernelMetrics, KernelSets, OffloadError};
use control::ControlSocket;
use events::EventReport;
use metrics::Metrics;
use scrape::ScrapeServer;

pub use queue::BindError;
pub use receive::{packets as queued_packets, QueuedPacket};
pub use state::{StateError, StateStore};

/// How often the main loop expires a part of the table, saves grants when
/// due and checks workers.
const TICK: Duration = Duration::from_millis(125);
/// The parts the table is expired in, one per tick: every source is settled
/// once a second, and no sweep of a large table holds up the workers for
/// long.
const SWEEP_PARTS: usize = 8;
/// Grants are saved at most this often while they change (and at exit).
const SAVE_INTERVAL: Duration = Duration::from_secs(3);
/// A worker that has not looped for this long is stuck: the watchdog starves.
const STUCK_AFTER: Duration = Duration::from_secs(3);

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
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Offload(#[from] OffloadError),
}

/// Runs the gate with `config` until SIGINT or SIGTERM. On SIGHUP, `reload`
/// reads the configuration again.
pub fn run(
    mut config: Config,
    reload: impl Fn() -> Result<Config, ConfigError>,
) -> Result<(), DaemonError> {
    let engine = Arc::new(Engine::new(&config));
    let metrics = Arc::new(Metrics::new(&engine.policies(), config.queue.numbers())?);
    let clock = Clock::start();
    engine.set_wall_clock(clock.wall());
    let grants_changed = Arc::new(AtomicBool::new(false));
    // Always there, idle until a policy has a command: a reload may add one.
    let hook_metrics = HookMetrics::register(metrics.registry())?;
    let hooks = Hooks::start(&config.hooks, hook_metrics).map_err(DaemonError::Threads)?;
    let nodes = Arc::new(Nodes::new(
        config.cluster.as_ref().map_or("", |c| c.node.as_str()),
    ));
    let mut listeners: Vec<Arc<dyn GrantListener>> = vec![hooks];
    let kernel_sets = KernelSets::find(&config, Arc::clone(&engine), clock)?;
    if let Some(sets) = &kernel_sets {
        metrics
            .registry()
            .register(Box::new(KernelMetrics::new(Arc::clone(sets))?))?;
        listeners.push(Arc::clone(sets) as Arc<dyn GrantListener>);
    }
    let cluster = match &config.cluster {
        Some(cluster_config) => {
            let cluster_metrics =
                ClusterMetrics::register(metrics.registry()).map_err(ClusterError::Metrics)?;
            let (cluster, thread) = Cluster::new(
                cluster_config,
                Arc::clone(&engine),
                clock,
                Arc::clone(&nodes),
                Arc::new(cluster_metrics),
            );
            listeners.push(cluster);
            Some(thread)
        }
        None => None,
    };
    let report = || {
        EventReport::new(
            Arc::clone(&metrics),
            Arc::clone(&grants_changed),
            listeners.clone(),
            Arc::clone(&nodes),
            Instant::now(),
        )
    };
    let mut main_report = report();
    // Caught from before the queues are bound: a SIGTERM that comes once
    // they are, during the set-up below, waits for the loop and stops the
    // gate cleanly rather than killing it with its queues bound.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(DaemonError::Threads)?;

    // Set-up that must happen while this is the only thread: finding each
    // queue's socket and binding the control socket under a narrow umask.
    // Everything is bound before anything runs: a failure leaves nothing.
    let queues = config
        .queue
        .numbers()
        .map(|num| {
            queue::open_queue(num, config.queue.fail_open).map(|(queue, fd)| (num, queue, fd))
        })
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

    // Grants from before a restart come back before the first packet.
    let store =
        StateStore::new(&config.state.dir).counting_refusals(metrics.state_grants_refused());
    let mut restored = Vec::new();
    match store.restore(&engine, &nodes, clock.now(), &mut restored) {
        Ok(count) => info!("restored {count} grants from {}", store.path().display()),
        Err(e) => warn!("saved grants not restored: {e}"),
    }
    main_report.publish(&engine, &mut restored, Instant::now());
    // The kernel accepts exactly the grants restored, before any packet.
    if let Some(sets) = &kernel_sets {
        sets.reconcile(&config)?;
    }
    if let Some(thread) = cluster {
        let mut cluster_report = report();
        thread.start(Box::new(move |engine, events| {
            cluster_report.publish(engine, events, Instant::now())
        }))?;
    }

    let (stop_tx, stop_rx) = channel::unbounded();
    let signal_tx = stop_tx.clone();
    thread::Builder::new()
        .name("knockq-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let _ = signal_tx.send(Stop::Signal(signal));
            }
        })
        .map_err(DaemonError::Threads)?;

    let control_path = control.path().to_owned();
    control
        .serve(Arc::clone(&engine), Arc::clone(&nodes), clock, report())
        .map_err(DaemonError::Threads)?;

    let shutdown = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let mut heartbeats = Vec::new();
    for (num, queue, fd) in queues {
        let heartbeat = Arc::new(AtomicU64::new(clock.now().as_millis()));
        heartbeats.push((num, Arc::clone(&heartbeat)));
        let worker = worker::Worker {
            num,
            engine: Arc::clone(&engine),
            metrics: Arc::clone(&metrics),
            report: report(),
            clock,
            shutdown: Arc::clone(&shutdown),
            heartbeat,
        };
        let stop_tx = stop_tx.clone();
        let handle = thread::Builder::new()
            .name(format!("knockq-queue-{num}"))
            .spawn(move || {
                if let Err(e) = worker.run(queue, fd) {
                    let _ = stop_tx.send(Stop::WorkerFailed(num, e.to_string()));
                }
            })
            .map_err(DaemonError::Threads)?;
        workers.push(handle);
    }
    let names: Vec<&str> = config.policies.iter().map(|p| p.name.as_str()).collect();
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
    report_loaded_rules(&config);
    // Every queue is bound and served: tell systemd (a no-op outside it).
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled();

    let mut expired = Vec::new();
    let mut last_save = Instant::now();
    let mut sweep = TablePart {
        index: 0,
        of: SWEEP_PARTS,
    };
    let outcome = loop {
        match stop_rx.recv_timeout(TICK) {
            Ok(Stop::Signal(SIGHUP)) => {
                let _ = sd_notify::notify(&[NotifyState::Reloading]);
                apply_reload(
                    &mut config,
                    reload(),
                    &engine,
                    &metrics,
                    kernel_sets.as_deref(),
                );
                let _ = sd_notify::notify(&[NotifyState::Ready]);
                continue;
            }
            Ok(Stop::Signal(signal)) => {
                info!(signal, "stopping");
                break Ok(());
            }
            Ok(Stop::WorkerFailed(num, why)) => {
                error!(queue = num, "worker stopped: {why}");
                break Err(DaemonError::Worker(num, why));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => unreachable!("this loop holds a sender"),
        }
        engine.set_wall_clock(clock.wall());
        engine.expire(clock.now(), sweep, &mut expired);
        sweep.index = (sweep.index + 1) % SWEEP_PARTS;
        main_report.publish(&engine, &mut expired, Instant::now());
        if last_save.elapsed() >= SAVE_INTERVAL && grants_changed.swap(false, Ordering::Relaxed) {
            save(&store, &engine, &nodes, clock);
            last_save = Instant::now();
        }
        if watchdog.is_some() && workers_alive(&heartbeats, clock) {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    };
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    shutdown.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    save(&store, &engine, &nodes, clock);
    if let Some(scrape) = scrape {
        scrape.stop();
    }
    let _ = std::fs::remove_file(&control_path);
    outcome
}

/// Puts a re-read configuration in force, or keeps the running one and says
/// why: nothing is half-applied.
fn apply_reload(
    config: &mut Config,
    reloaded: Result<Config, ConfigError>,
    engine: &Engine,
    metrics: &Metrics,
    kernel_sets: Option<&KernelSets>,
) {
    let new = match reloaded {
        Ok(new) => new,
        Err(e) => return error!("reload refused, still running the previous configuration: {e}"),
    };
    if let Some(section) = config.needs_restart_for(&new) {
        return error!(
            "reload refused, still running the previous configuration: {section} changed, and that needs a restart"
        );
    }
    let result = engine.reload(&new.policies);
    metrics.reloaded(&engine.policies(), &result);
    // Grants of removed or changed policies leave the kernel; new knock
    // ports reach it.
    if let Some(Err(e)) = kernel_sets.map(|sets| sets.reconcile(&new)) {
        error!("kernel sets not updated after the reload: {e}");
    }
    info!(
        event = %"reload",
        kept = %result.kept.join(","),
        fresh = %result.fresh.join(","),
        dropped = %result.dropped.join(","),
        "configuration reloaded"
    );
    *config = new;
}

fn save(store: &StateStore, engine: &Engine, nodes: &Nodes, clock: Clock) {
    if let Err(e) = store.save(engine, nodes, clock.now()) {
        error!("grants not saved: {e}");
    }
}

/// Whether every worker looped recently; names the ones that did not.
fn workers_alive(heartbeats: &[(u16, Arc<AtomicU64>)], clock: Clock) -> bool {
    let now = clock.now();
    let mut alive = true;
    for (num, heartbeat) in heartbeats {
        let last = Timestamp::from_millis(heartbeat.load(Ordering::Relaxed));
        let silent = now.since(last);
        if silent > STUCK_AFTER {
            error!(
                queue = num,
                "worker stuck for {}s; starving the watchdog",
                silent.as_secs()
            );
            alive = false;
        }
    }
    alive
}

/// Which backend's rules feed the queue: without any, no SYN reaches it.
fn report_loaded_rules(config: &Config) {
    let loaded = firewall::load::loaded();
    if loaded.is_empty() {
        warn!(
            "no knockq rules are loaded (neither table inet {} nor chain {}): no SYN reaches \
             {}; load them with `knockq rules --apply`",
            firewall::NFT_TABLE,
            firewall::CHAIN,
            config.queue
        );
        return;
    }
    let names: Vec<&str> = loaded.iter().map(|b| b.as_str()).collect();
    info!("knockq rules are loaded through {}", names.join(" and "));
}
