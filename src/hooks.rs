//! Commands run when a grant opens or ends (a policy's `on_grant` and
//! `on_revoke`): knockd's start and stop commands, fwknop's open and close
//! cycle. They run off the verdict path: grant events queue a run, a few
//! threads run the queue, each command within a time limit, and a full
//! queue drops the run and counts it. No shell: the argument vector is run
//! as written, placeholders filled in, with a minimal environment.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use prometheus::{IntCounterVec, Opts, Registry};
use tracing::{debug, warn};

use crate::config::{HooksConfig, Policy};
use crate::engine::{Event, EventKind, WallClock, GRANT_UNTIL_CLOSED};
use crate::listeners::{GrantListener, GrantPorts, Subject};

/// The environment commands get, and nothing else.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often a running command is checked for its end.
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    OnGrant,
    OnRevoke,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::OnGrant => "on_grant",
            Hook::OnRevoke => "on_revoke",
        }
    }
}

/// One command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub policy: String,
    pub hook: Hook,
    pub argv: Vec<String>,
}

/// The values of a run's placeholders.
pub struct Placeholders<'a> {
    pub source: &'a str,
    pub prefix: &'a str,
    pub policy: &'a str,
    pub ports: &'a str,
    pub reason: &'a str,
    pub end: &'a str,
}

/// `argv` with every placeholder filled in.
pub fn fill(argv: &[String], values: &Placeholders) -> Vec<String> {
    argv.iter()
        .map(|arg| {
            arg.replace("{source}", values.source)
                .replace("{prefix}", values.prefix)
                .replace("{policy}", values.policy)
                .replace("{ports}", values.ports)
                .replace("{reason}", values.reason)
                .replace("{end}", values.end)
        })
        .collect()
}

/// `knockq_hook_runs_total`: the executor's own metrics handle.
#[derive(Clone)]
pub struct HookMetrics {
    runs: IntCounterVec,
}

impl HookMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let runs = IntCounterVec::new(
            Opts::new(
                "knockq_hook_runs_total",
                "Commands run on grant and revoke, by policy, hook and outcome (ok, failed, timeout, dropped).",
            ),
            &["policy", "hook", "outcome"],
        )?;
        registry.register(Box::new(runs.clone()))?;
        Ok(HookMetrics { runs })
    }

    fn run(&self, run: &Run, outcome: &str) {
        self.runs
            .with_label_values(&[&run.policy, run.hook.as_str(), outcome])
            .inc();
    }
}

/// The executor: a bounded queue and the threads that run it.
pub struct Hooks {
    queue: Sender<Run>,
    metrics: HookMetrics,
}

impl Hooks {
    pub fn start(config: &HooksConfig, metrics: HookMetrics) -> std::io::Result<Arc<Hooks>> {
        let (queue, runs) = channel::bounded(config.queue);
        for n in 0..config.concurrency {
            let runs: Receiver<Run> = runs.clone();
            let metrics = metrics.clone();
            let timeout = config.timeout;
            thread::Builder::new()
                .name(format!("knockq-hooks-{n}"))
                .spawn(move || {
                    for run in runs {
                        let outcome = execute(&run, timeout);
                        metrics.run(&run, outcome.label());
                        match outcome {
                            Outcome::Ok => debug!(event = %"hook", policy = %run.policy, hook = %run.hook.as_str(), "ran {:?}", run.argv),
                            Outcome::Failed(why) | Outcome::TimedOut(why) => warn!(
                                event = %"hook_failed",
                                policy = %run.policy,
                                hook = %run.hook.as_str(),
                                "{}: {why}",
                                run.argv[0]
                            ),
                        }
                    }
                })?;
        }
        Ok(Arc::new(Hooks { queue, metrics }))
    }

    /// Queues `run`; never waits. A full queue drops it, counted.
    pub fn offer(&self, run: Run) {
        match self.queue.try_send(run) {
            Ok(()) => {}
            Err(TrySendError::Full(run) | TrySendError::Disconnected(run)) => {
                self.metrics.run(&run, "dropped");
            }
        }
    }
}

/// The commands on grant and revoke: a run queued for each grant or revoke
/// event of a policy that has one.
impl GrantListener for Hooks {
    fn grant_event(&self, policy: &Policy, event: &Event, wall: WallClock) {
        let (hook, argv, reason) = match event.kind {
            EventKind::Granted => (Hook::OnGrant, &policy.hooks.on_grant, "granted"),
            EventKind::Refreshed => (Hook::OnGrant, &policy.hooks.on_grant, "refreshed"),
            EventKind::Restored => (Hook::OnGrant, &policy.hooks.on_grant, "restored"),
            EventKind::Revoked(reason) => {
                (Hook::OnRevoke, &policy.hooks.on_revoke, reason.as_str())
            }
            _ => return,
        };
        let Some(argv) = argv else { return };
        let scope = event.grant;
        let end = match scope.until {
            GRANT_UNTIL_CLOSED => "never".to_owned(),
            until => (wall.unix_millis(until) / 1000).to_string(),
        };
        let values = Placeholders {
            source: &Subject(event).to_string(),
            prefix: &scope
                .prefix
                .unwrap_or(if event.src.is_ipv4() { 32 } else { 128 })
                .to_string(),
            policy: &policy.name,
            ports: &GrantPorts(policy, scope).to_string(),
            reason,
            end: &end,
        };
        self.offer(Run {
            policy: policy.name.clone(),
            hook,
            argv: fill(argv, &values),
        });
    }
}

enum Outcome {
    Ok,
    /// Why, with the last line the command wrote to stderr.
    Failed(String),
    TimedOut(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(_) => "failed",
            Outcome::TimedOut(_) => "timeout",
        }
    }
}

/// Runs one command to its end, or kills it (and whatever it started) when
/// `timeout` passes.
fn execute(run: &Run, timeout: Duration) -> Outcome {
    let mut child = match Command::new(&run.argv[0])
        .args(&run.argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Outcome::Failed(format!("cannot start: {e}")),
    };
    // Read stderr as it comes, or a chatty command would block on a full pipe.
    let stderr = child.stderr.take().map(|mut pipe| {
        thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.by_ref().take(64 * 1024).read_to_end(&mut text);
            String::from_utf8_lossy(&text)
                .lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .unwrap_or_default()
                .to_owned()
        })
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                // SAFETY: kill takes a process group id and a signal; the
                // group is the child's own.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.wait();
                return Outcome::TimedOut(format!(
                    "killed after {}",
                    humantime::format_duration(timeout)
                ));
            }
            Ok(None) => thread::sleep(POLL),
            Err(e) => return Outcome::Failed(format!("cannot wait for it: {e}")),
        }
    };
    let last_line = stderr
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    match status.success() {
        true => Outcome::Ok,
        false => Outcome::Failed(match last_line.is_empty() {
            true => format!("{status}"),
            false => format!("{status}: {last_line}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str]) -> Run {
        Run {
            policy: "ssh".into(),
            hook: Hook::OnGrant,
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn placeholders_are_filled_in_every_argument() {
        let argv: Vec<String> = ["nft", "add element inet t s { {source} }", "{ports}:{end}"]
            .map(String::from)
            .to_vec();
        let values = Placeholders {
            source: "10.0.0.0/24",
            prefix: "24",
            policy: "ssh",
            ports: "22,8080",
            reason: "granted",
            end: "never",
        };
        assert_eq!(
            fill(&argv, &values),
            [
                "nft",
                "add element inet t s { 10.0.0.0/24 }",
                "22,8080:never"
            ]
        );
    }

    #[test]
    fn a_command_succeeds_fails_with_its_last_stderr_line_or_times_out() {
        assert!(matches!(
            execute(&run(&["true"]), Duration::from_secs(5)),
            Outcome::Ok
        ));
        match execute(
            &run(&["sh", "-c", "echo first >&2; echo 'last words' >&2; exit 3"]),
            Duration::from_secs(5),
        ) {
            Outcome::Failed(why) => {
                assert!(
                    why.contains("exit status: 3") && why.ends_with("last words"),
                    "{why}"
                )
            }
            _ => panic!("a failing command fails"),
        }
        let started = Instant::now();
        assert!(matches!(
            execute(
                &run(&["sh", "-c", "sleep 30 & sleep 30"]),
                Duration::from_millis(200)
            ),
            Outcome::TimedOut(_)
        ));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(matches!(
            execute(&run(&["/nonexistent/program"]), Duration::from_secs(1)),
            Outcome::Failed(why) if why.starts_with("cannot start")
        ));
    }

    #[test]
    fn the_environment_is_minimal() {
        // SAFETY: tests in this binary do not read this variable.
        unsafe { std::env::set_var("KNOCKQ_HOOK_TEST_SECRET", "leak") };
        let outcome = execute(
            &run(&[
                "sh",
                "-c",
                "test -z \"$KNOCKQ_HOOK_TEST_SECRET\" && test -n \"$PATH\"",
            ]),
            Duration::from_secs(5),
        );
        assert!(matches!(outcome, Outcome::Ok));
    }
}
