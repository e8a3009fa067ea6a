//! `knockq simulate`: the daemon's engine, fed with the new flows of a
//! capture (TCP SYNs, and UDP datagrams that start a flow to a port the
//! rules queue) and their capture timestamps as the clock, reporting what each policy would have
//! done: who got in, who almost did and why not, and the verdict totals.

pub mod capture;
pub mod report;
pub mod sweep;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::engine::{
    Engine, Event, EventKind, Policies, PolicyKey, PortRole, Reason, TablePart, Timestamp, Verdict,
};
use crate::flow::{FlowPort, Proto};
use crate::script::ScriptVms;
use capture::Packet;

/// How often the daemon expires state; the simulation does the same.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only SYNs to this address; all SYNs when unset.
    pub dst: Option<IpAddr>,
    /// Keep every state change, in order.
    pub timeline: bool,
    /// Keep every packet's verdict, in order.
    pub verdicts: bool,
}

/// What one configuration would have done with a capture.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: String,
    /// New flows fed to the engine.
    pub new_flows: u64,
    /// Verdicts by reason, as `verdict/reason`.
    pub verdicts: BTreeMap<String, u64>,
    pub policies: Vec<PolicyReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Change>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packets: Vec<PacketVerdict>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub name: String,
    pub granted: Vec<Granted>,
    pub incomplete: Vec<Incomplete>,
    /// SYNs to the policy's open ports that would have been accepted.
    pub open_port_accepted: u64,
    pub open_port_refused: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Granted {
    pub source: IpAddr,
    /// Capture time of the first grant, seconds from the Unix epoch.
    pub at: f64,
    /// SYNs to the policy's knock ports up to and including that grant.
    pub knocks: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Incomplete {
    pub source: IpAddr,
    pub why: Why,
}

/// Why a source that made progress never completed the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Why {
    /// The next knock came after the step window, or never.
    Timeout,
    /// A SYN to a port outside the sequence reset it (strict policy).
    ResetByOtherPort { port: FlowPort },
    /// A knock port of the sequence, out of order, reset it.
    WrongOrder { port: FlowPort },
    /// Dropped to make room in a full source table.
    Evicted,
    /// Completed a rotating sequence whose window was already spent.
    Replayed,
    /// Still part-way through when the capture ended.
    KnockingAtEnd,
}

impl Why {
    pub fn describe(self) -> String {
        match self {
            Why::Timeout => "timeout".to_owned(),
            Why::ResetByOtherPort { port } => format!("reset by another port ({port})"),
            Why::WrongOrder { port } => format!("wrong order ({port})"),
            Why::Evicted => "evicted from a full table".to_owned(),
            Why::Replayed => "replay of a spent rotating window".to_owned(),
            Why::KnockingAtEnd => "still knocking when the capture ended".to_owned(),
        }
    }
}

/// One state change, for the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub at: f64,
    pub source: IpAddr,
    pub policy: String,
    pub change: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PacketVerdict {
    pub at: f64,
    pub source: IpAddr,
    pub dst_port: FlowPort,
    pub verdict: &'static str,
    pub reason: &'static str,
}

/// One source's story under one policy.
#[derive(Default)]
struct Track {
    knocks: u32,
    progressed: bool,
    granted: Option<(f64, u32)>,
    /// What ended the latest progress, if it ended.
    ended: Option<Why>,
}

/// Runs the packets, in capture order, through a fresh engine for `config`.
pub fn simulate(config: &Config, name: &str, packets: &[Packet], options: &Options) -> Report {
    let engine = Engine::new(config);
    let mut simulation = Simulation {
        scripts: ScriptVms::new(),
        policies: engine.policies(),
        engine,
        options,
        tracks: BTreeMap::new(),
        open_ports: vec![(0, 0); config.policies.len()],
        events: Vec::new(),
        next_expiry: None,
        report: Report {
            config: name.to_owned(),
            new_flows: 0,
            verdicts: Reason::ALL.iter().map(|&r| (verdict_key(r), 0)).collect(),
            policies: Vec::new(),
            timeline: Vec::new(),
            packets: Vec::new(),
        },
    };
    let udp_ports = config.decided_udp_ports();
    let mut udp_flows = UdpFlows::default();
    for packet in packets {
        let flow = &packet.flow;
        let new = match flow.dst_port.proto() {
            Proto::Tcp => flow.is_syn(),
            Proto::Udp => {
                udp_flows.is_new(packet)
                    && udp_ports.iter().any(|range| range.contains(flow.dst_port))
            }
        };
        if !new || options.dst.is_some_and(|dst| dst != flow.dst) {
            continue;
        }
        let verdict = simulation.packet(packet);
        if flow.dst_port.proto() == Proto::Udp && verdict == Verdict::Accept {
            udp_flows.accepted(packet);
        }
    }
    simulation.finish()
}

/// The UDP flows the gate accepted, as conntrack keeps them. Until its
/// service replies, a flow's next datagram is NEW again and the gate
/// decides it again; after a reply its datagrams, either way, are
/// ESTABLISHED and never reach the queue. A rejected datagram leaves no
/// entry.
#[derive(Default)]
struct UdpFlows {
    /// (source, source port, destination, destination port) as first seen:
    /// when last seen, and whether a reply was.
    flows: HashMap<(IpAddr, u16, IpAddr, u16), (Duration, bool)>,
}

impl UdpFlows {
    /// conntrack's defaults: `nf_conntrack_udp_timeout` and
    /// `nf_conntrack_udp_timeout_stream`.
    const UNREPLIED: Duration = Duration::from_secs(30);
    const REPLIED: Duration = Duration::from_secs(120);

    /// Whether `packet` is NEW to conntrack; a reply marks its flow replied.
    fn is_new(&mut self, packet: &Packet) -> bool {
        let f = &packet.flow;
        let forward = (f.src, f.src_port, f.dst, f.dst_port.number());
        let reverse = (f.dst, f.dst_port.number(), f.src, f.src_port);
        for (key, reply) in [(forward, false), (reverse, true)] {
            let Some((last, replied)) = self.flows.get_mut(&key) else {
                continue;
            };
            let timeout = if *replied {
                Self::REPLIED
            } else {
                Self::UNREPLIED
            };
            if packet.time.saturating_sub(*last) > timeout {
                self.flows.remove(&key);
                continue;
            }
            *replied |= reply;
            if *replied {
                *last = packet.time;
                return false;
            }
        }
        true
    }

    fn accepted(&mut self, packet: &Packet) {
        let f = &packet.flow;
        let key = (f.src, f.src_port, f.dst, f.dst_port.number());
        self.flows
            .entry(key)
            .and_modify(|(last, _)| *last = packet.time)
            .or_insert((packet.time, false));
    }
}

fn verdict_key(reason: Reason) -> String {
    format!("{}/{}", reason.verdict().as_str(), reason.as_str())
}

struct Simulation<'a> {
    engine: Engine,
    /// Script policies run in one VM each, as on one worker.
    scripts: ScriptVms,
    /// The engine's policies: a simulation never reloads.
    policies: Arc<Policies>,
    options: &'a Options,
    tracks: BTreeMap<(PolicyKey, IpAddr), Track>,
    /// Per policy: SYNs to its open ports accepted and refused.
    open_ports: Vec<(u64, u64)>,
    events: Vec<Event>,
    next_expiry: Option<Timestamp>,
    report: Report,
}

impl Simulation<'_> {
    fn packet(&mut self, packet: &Packet) -> Verdict {
        let at = packet.time.as_secs_f64();
        let now =
            Timestamp::from_millis(u64::try_from(packet.time.as_millis()).unwrap_or(u64::MAX));
        // Expire as the daemon does, about once a second.
        if self.next_expiry.is_none_or(|next| now >= next) {
            self.engine.expire(now, TablePart::WHOLE, &mut self.events);
            self.record(at, None);
            self.next_expiry = Some(now.saturating_add(EXPIRE_INTERVAL));
        }
        let syn = packet.flow.new_flow();
        let decision = self.engine.decide(
            syn,
            &packet.payload,
            now,
            &mut self.events,
            &mut self.scripts,
        );
        self.report.new_flows += 1;
        *self
            .report
            .verdicts
            .entry(verdict_key(decision.reason))
            .or_default() += 1;
        let role = self.engine.role(syn.dst_port, now);
        if let PortRole::Knock { policy, .. } | PortRole::Script { policy } = role {
            let key = self.policies.key(policy);
            self.tracks.entry((key, syn.src)).or_default().knocks += 1;
        }
        for (i, policy) in self.policies.list().iter().enumerate() {
            if policy.open_ports.iter().any(|r| r.contains(syn.dst_port)) {
                match decision.reason {
                    Reason::Granted => self.open_ports[i].0 += 1,
                    _ => self.open_ports[i].1 += 1,
                }
            }
        }
        if self.options.verdicts {
            self.report.packets.push(PacketVerdict {
                at,
                source: syn.src,
                dst_port: syn.dst_port,
                verdict: decision.verdict().as_str(),
                reason: decision.reason.as_str(),
            });
        }
        self.record(at, Some((syn.dst_port, role)));
        decision.verdict()
    }

    /// Folds the events of one packet (or one expiry) into the tracks.
    fn record(&mut self, at: f64, packet: Option<(FlowPort, PortRole)>) {
        for Event {
            src, policy, kind, ..
        } in self.events.drain(..)
        {
            let track = self.tracks.entry((policy, src)).or_default();
            let Some((id, rules)) = self.policies.find(policy) else {
                continue;
            };
            let steps = match rules.knock.sequence_len() {
                0 => String::new(),
                steps => format!("/{steps}"),
            };
            let change = match kind {
                EventKind::Spa { outcome, .. } => format!("spa {}", outcome.as_str()),
                EventKind::Advanced { stage } => {
                    track.progressed = true;
                    track.ended = None;
                    format!("knock {stage}{steps}")
                }
                EventKind::Restarted => {
                    track.ended = None;
                    format!("restart at 1{steps}")
                }
                EventKind::Duplicate => "duplicate knock".to_owned(),
                EventKind::Granted | EventKind::Refreshed => {
                    track.progressed = true;
                    track.granted.get_or_insert((at, track.knocks));
                    let refreshed = if kind == EventKind::Refreshed {
                        " (refreshed)"
                    } else {
                        ""
                    };
                    format!("grant{refreshed}")
                }
                EventKind::Reset => {
                    let (port, role) = packet.expect("resets happen on packets");
                    track.ended = Some(match role {
                        PortRole::Knock { policy: p, .. } | PortRole::Script { policy: p }
                            if p == id =>
                        {
                            Why::WrongOrder { port }
                        }
                        _ => Why::ResetByOtherPort { port },
                    });
                    format!("reset by port {port}")
                }
                EventKind::Expired => {
                    track.ended = Some(Why::Timeout);
                    "step window passed".to_owned()
                }
                EventKind::Revoked(reason) => format!("revoke ({})", reason.as_str()),
                EventKind::Restored => "grant restored".to_owned(),
                EventKind::Replayed => {
                    track.ended = Some(Why::Replayed);
                    "replay of a spent window, refused".to_owned()
                }
                EventKind::Evicted => {
                    track.ended = Some(Why::Evicted);
                    "evicted from a full table".to_owned()
                }
                // A simulation has no cluster to claim the window from.
                EventKind::Claim { window } => {
                    format!("window {window} completed; its grant waits for the cluster's claim, not simulated")
                }
                EventKind::SpaClaim { .. } => {
                    "SPA packet accepted; its grant waits for the cluster's claim, not simulated"
                        .to_owned()
                }
            };
            if self.options.timeline {
                self.report.timeline.push(Change {
                    at,
                    source: src,
                    policy: rules.name.clone(),
                    change,
                });
            }
        }
    }

    fn finish(mut self) -> Report {
        for (id, (key, policy)) in self.policies.keys().enumerate() {
            let mine: Vec<_> = self
                .tracks
                .iter()
                .filter(|((k, _), _)| *k == key)
                .map(|((_, source), track)| (*source, track))
                .collect();
            let granted = mine
                .iter()
                .filter_map(|(source, t)| {
                    let (at, knocks) = t.granted?;
                    Some(Granted {
                        source: *source,
                        at,
                        knocks,
                    })
                })
                .collect();
            let incomplete = mine
                .iter()
                .filter(|(_, t)| t.progressed && t.granted.is_none())
                .map(|(source, t)| Incomplete {
                    source: *source,
                    why: t.ended.unwrap_or(Why::KnockingAtEnd),
                })
                .collect();
            self.report.policies.push(PolicyReport {
                name: policy.name.clone(),
                granted,
                incomplete,
                open_port_accepted: self.open_ports[id].0,
                open_port_refused: self.open_ports[id].1,
            });
        }
        self.report
    }
}

#[cfg(test)]
mod tests;
