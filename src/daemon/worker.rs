//! One NFQUEUE worker: the whole per-packet path on one screen.
//! Receive, parse, decide, verdict; every received packet gets exactly one
//! verdict, the reject one unless the engine said accept, in the order the
//! packets came.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nfq::Queue;
use std::os::fd::RawFd;
use tracing::{debug, warn};

use super::events::EventReport;
use super::metrics::Metrics;
use super::receive::{Receiver, MAX_BATCH};
use super::verdicts::VerdictBatch;
use crate::engine::{Decision, Engine, Event, NewFlow, PolicyKey, Reason, Timestamp};
use crate::flow::Proto;
use crate::listeners::Clock;
use crate::packet;
use crate::script::{Failure, FailureKind, ScriptVms};

/// How long a receive waits before the worker checks for shutdown.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_millis(200);
/// Unexpected receive errors in a row after which the worker gives up.
const MAX_CONSECUTIVE_ERRORS: u32 = 100;

pub struct Worker {
    pub num: u16,
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub report: EventReport,
    pub clock: Clock,
    pub shutdown: Arc<AtomicBool>,
    /// When this worker last went round its loop, for the watchdog.
    pub heartbeat: Arc<AtomicU64>,
}

/// A packet received in this wake-up: its queue id and what parsing found.
struct Parsed {
    id: u32,
    /// `None` if parsing failed with a panic.
    syn: Option<Option<NewFlow>>,
}

/// A packet decided in this wake-up, counted once its verdict is out.
struct Decided {
    syn: Option<NewFlow>,
    decision: Decision,
}

impl Worker {
    /// Serves `queue` (whose socket is `fd`) until shutdown. Each wake-up
    /// takes every packet already queued (up to [`MAX_BATCH`] datagrams) in
    /// one receive, decides each in order, and sends one verdict message per
    /// run of equal verdicts.
    pub fn run(mut self, mut queue: Queue, fd: RawFd) -> io::Result<()> {
        let mut events: Vec<Event> = Vec::with_capacity(8);
        let mut parsed: Vec<Parsed> = Vec::with_capacity(MAX_BATCH);
        let mut decided: Vec<Decided> = Vec::with_capacity(MAX_BATCH);
        let mut receiver = Receiver::new(fd);
        let mut verdicts = VerdictBatch::new(fd, self.num);
        let mut unusual = UnusualCounts::default();
        // This thread's own script VMs, made on first use.
        let mut scripts = ScriptVms::new();
        let mut script_failures = ScriptFailures::default();
        let mut errors_in_a_row = 0;
        while !self.shutdown.load(Ordering::Relaxed) {
            self.heartbeat
                .store(self.clock.now().as_millis(), Ordering::Relaxed);
            // One time for the whole batch: its packets arrived together.
            let received = match receiver.receive() {
                Ok(_) => {
                    let received = Instant::now();
                    // Parse the whole batch first, starting to load each
                    // source's state: the loads from memory overlap instead
                    // of following one another.
                    parsed.extend(receiver.packets().map(|packet| {
                        let syn =
                            guarded(|| packet::parse_new_flow(packet.payload.unwrap_or_default()));
                        if let Some(Some(syn)) = syn {
                            self.engine.prefetch(syn.src);
                        }
                        Parsed { id: packet.id, syn }
                    }));
                    let now = self.clock.at(received);
                    // Parsing took the packets in this same order.
                    for (packet, queued) in parsed.drain(..).zip(receiver.packets()) {
                        self.take(
                            packet,
                            queued.payload.unwrap_or_default(),
                            now,
                            &mut verdicts,
                            &mut decided,
                            &mut events,
                            &mut scripts,
                        );
                    }
                    received
                }
                Err(e) if is_transient(&e) => {
                    self.report.summarise(Instant::now());
                    continue;
                }
                Err(e) => {
                    errors_in_a_row += 1;
                    warn!(queue = self.num, "receive failed: {e}");
                    if errors_in_a_row >= MAX_CONSECUTIVE_ERRORS {
                        return Err(e);
                    }
                    continue;
                }
            };
            errors_in_a_row = 0;
            if let Err(e) = verdicts.flush() {
                warn!(queue = self.num, "sending verdicts failed: {e}");
            }
            // Counted and logged after the verdicts are out: no I/O before.
            let answered_after = received.elapsed();
            for Decided { syn, decision } in decided.drain(..) {
                let proto = syn.map(|flow| flow.dst_port.proto());
                self.metrics.verdict(decision.reason, proto, answered_after);
                if let Some(NewFlow { src, dst_port }) = syn {
                    debug!(queue = self.num, %src, %dst_port, verdict = %decision.verdict().as_str(), reason = %decision.reason.as_str());
                }
                unusual.note(self.num, decision.reason);
            }
            if scripts.has_failures() {
                script_failures.report(&self.engine, &self.metrics, scripts.take_failures());
            }
            self.report
                .publish(&self.engine, &mut events, Instant::now());
        }
        if let Err(e) = queue.unbind(self.num) {
            debug!(queue = self.num, "unbind: {e}");
        }
        Ok(())
    }

    /// Decides one packet and adds its verdict to the batch. The state change
    /// lands before the next packet is decided; a grant change reaches the
    /// listeners that need it before the verdict (rare: one per grant).
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        packet: Parsed,
        bytes: &[u8],
        now: Timestamp,
        verdicts: &mut VerdictBatch,
        decided: &mut Vec<Decided>,
        events: &mut Vec<Event>,
        scripts: &mut ScriptVms,
    ) {
        let before = events.len();
        let decision = decide(packet.syn, |syn| {
            // Only a UDP datagram's data is read (by an SPA port).
            let payload = match syn.dst_port.proto() {
                Proto::Udp => packet::datagram_payload(bytes),
                Proto::Tcp => &[],
            };
            self.engine.decide(syn, payload, now, events, scripts)
        });
        if events[before..].iter().any(|e| e.kind.changes_grant())
            && self.report.publishes_before_verdict()
        {
            self.report.publish(&self.engine, events, Instant::now());
        }
        let syn = packet.syn.flatten();
        if let Err(e) = verdicts.push(packet.id, decision.verdict()) {
            warn!(queue = self.num, "sending verdicts failed: {e}");
        }
        decided.push(Decided { syn, decision });
    }
}

/// The decision for a parsed packet: the engine's for a SYN, else reject.
fn decide(parsed: Option<Option<NewFlow>>, engine: impl FnOnce(NewFlow) -> Decision) -> Decision {
    match parsed {
        Some(Some(syn)) => guarded(|| engine(syn)).unwrap_or(Decision::reject(Reason::Failed)),
        Some(None) => Decision::reject(Reason::Unparsable),
        None => Decision::reject(Reason::Failed),
    }
}

/// Runs `f`, turning a panic into `None`. A bug must cost one packet its
/// accept (the caller rejects it), never the worker: a dead worker leaves
/// its queue to fill up.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    panic::catch_unwind(AssertUnwindSafe(f)).ok()
}

/// Errors that say nothing about the socket's health: the receive timeout,
/// interrupted calls, a full socket buffer (the kernel dropped packets), and
/// late errors about earlier verdicts.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::ENOBUFS | libc::ENOENT | libc::EPERM | libc::EINVAL)
    )
}

/// Counts packets that could not be decided normally, logged at 1, 2, 4, 8…
/// so a flood of them cannot flood the log.
#[derive(Default)]
struct UnusualCounts {
    unparsable: u64,
    failed: u64,
}

impl UnusualCounts {
    fn note(&mut self, queue: u16, reason: Reason) {
        let (count, what) = match reason {
            Reason::Unparsable => (
                &mut self.unparsable,
                "packets that are neither TCP nor UDP over IPv4/IPv6 rejected",
            ),
            Reason::Failed => (
                &mut self.failed,
                "packets rejected after a failure while deciding",
            ),
            _ => return,
        };
        *count += 1;
        if count.is_power_of_two() {
            warn!(queue, count = *count, "{what}");
        }
    }
}

/// Failed script calls: every one counted in the metrics, logged with the
/// script's file and line at 1, 2, 4, 8… failures of each policy and kind
/// (with the latest message kept, for failures past those described).
#[derive(Default)]
struct ScriptFailures(std::collections::HashMap<(PolicyKey, FailureKind), (u64, String)>);

impl ScriptFailures {
    fn report(
        &mut self,
        engine: &Engine,
        metrics: &Metrics,
        (described, counted): (Vec<Failure>, Vec<(PolicyKey, FailureKind)>),
    ) {
        let policies = engine.policies();
        let described = described
            .into_iter()
            .map(|f| (f.policy, f.kind, Some(f.message)));
        let counted = counted
            .into_iter()
            .map(|(policy, kind)| (policy, kind, None));
        for (key, kind, message) in described.chain(counted) {
            // A reload may have removed the policy since.
            let Some(policy) = policies.get(key) else {
                continue;
            };
            metrics.script_error(&policy.name, kind.as_str());
            let (count, latest) = self.0.entry((key, kind)).or_default();
            *count += 1;
            if let Some(message) = message {
                *latest = message;
            }
            if count.is_power_of_two() {
                warn!(event = %"script_error", policy = %policy.name, kind = %kind.as_str(), count = *count, "{latest}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_deciding_rejects_the_packet() {
        let syn = NewFlow {
            src: "10.0.0.1".parse().unwrap(),
            dst_port: crate::flow::FlowPort::tcp(22),
        };
        let decision = decide(Some(Some(syn)), |_| panic!("a bug in the engine"));
        assert_eq!(decision, Decision::reject(Reason::Failed));
        assert_eq!(decision.verdict(), crate::engine::Verdict::Reject);
        // The next packet is decided normally.
        assert_eq!(
            decide(Some(Some(syn)), |_| Decision::ACCEPT),
            Decision::ACCEPT
        );
    }

    #[test]
    fn a_panic_while_parsing_rejects_the_packet() {
        let parsed = guarded(|| -> Option<NewFlow> { panic!("a bug in the parser") });
        assert_eq!(parsed, None);
        let decision = decide(parsed, |_| Decision::ACCEPT);
        assert_eq!(decision, Decision::reject(Reason::Failed));
        assert_eq!(
            decide(Some(None), |_| Decision::ACCEPT),
            Decision::reject(Reason::Unparsable)
        );
    }
}
