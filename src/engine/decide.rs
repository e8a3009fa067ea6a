//! The per-packet path: one new flow decided against every policy the
//! source has state in, script policies called with no lock held.

use std::net::IpAddr;

use ipnet::IpNet;
use smallvec::SmallVec;

use super::prefixes::PrefixGrant;
use super::rotation::SpentWindows;
use super::source::{self, SourceState};
use super::{
    Decision, Engine, Event, EventKind, EventSink, NewFlow, Origin, Policies, PolicyId, PolicySet,
    PortRole, Reason, RevokeReason, ScriptAction, ScriptGrant, ScriptInput, ScriptRunner,
    Timestamp, WallClock,
};
use crate::config;
use crate::flow::FlowPort;

impl Engine {
    /// Decides one new flow at time `now`; `payload` is what a UDP datagram
    /// carries (an SPA port reads it). The state change caused by the
    /// packet is complete when this returns, so the next packet from the same
    /// source already sees it. Script policies run through `scripts`, the
    /// calling thread's own.
    pub fn decide(
        &self,
        syn: NewFlow,
        payload: &[u8],
        now: Timestamp,
        events: &mut impl EventSink,
        scripts: &mut impl ScriptRunner,
    ) -> Decision {
        let policies = self.policies.load();
        let wall = self.wall_clock();
        let role = policies.role(syn.dst_port, now, wall);
        if let PortRole::Spa { policy } = role {
            let port = syn.dst_port.number();
            return self.decide_spa(&policies, policy, syn.src, port, payload, now, events);
        }
        // Only the first port of a sequence starts tracking a stranger; a
        // script's knock does once the script says so.
        let starts = match role {
            PortRole::Knock {
                first: true,
                policy,
            } => Some(policies.key(policy)),
            _ => None,
        };
        let syn_context = SynContext {
            role,
            port: syn.dst_port,
            wall,
            spent: &self.spent,
        };
        let mut calls = ScriptCalls::new();
        let granted = self
            .sources
            .update(syn.src, starts.is_some(), events, |source, events| {
                if let Some(key) = starts {
                    source.slot_or_insert(key, now);
                }
                apply(
                    &policies,
                    syn.src,
                    source,
                    syn_context,
                    now,
                    events,
                    &mut calls,
                )
            })
            .unwrap_or(false);
        if let PortRole::Open { policies: open } = role {
            if granted || self.prefix_opens(&policies, syn.src, syn.dst_port, open, now) {
                return Decision::ACCEPT;
            }
        }
        if let PortRole::Script { policy } = role {
            if !calls.iter().any(|call| call.policy == policy) {
                // An untracked source: the script starts from stage 0.
                calls.push(ScriptCall {
                    policy,
                    stage: 0,
                    last: None,
                    granted: false,
                });
            }
        }
        if !calls.is_empty() {
            // Every script runs, even after one failed: each answers for
            // its own policy.
            let mut all_ran = true;
            for call in &calls {
                all_ran &=
                    self.run_script(&policies, call, syn.src, syn_context, now, events, scripts);
            }
            if !all_ran {
                return Decision::reject(Reason::Failed);
            }
        }
        match role {
            PortRole::Knock { .. } | PortRole::Script { .. } => Decision::reject(Reason::Knock),
            PortRole::Close { .. } => Decision::reject(Reason::Close),
            PortRole::Spa { .. } => unreachable!("decided above"),
            PortRole::Open { .. } | PortRole::Unrelated | PortRole::Rotating { .. } => {
                Decision::reject(Reason::NoGrant)
            }
        }
    }

    /// Whether a network grant of one of `open` opens `port` for `src`.
    fn prefix_opens(
        &self,
        policies: &Policies,
        src: IpAddr,
        port: FlowPort,
        open: PolicySet,
        now: Timestamp,
    ) -> bool {
        self.prefixes
            .find(src, now, |grant| {
                policies.find(grant.policy).is_some_and(|(id, policy)| {
                    open.contains(id) && grant.ports.opens(&policy.open_ports, port)
                })
            })
            .is_some()
    }

    /// Calls a script policy's script for `syn` and applies its answer;
    /// false if the call failed, which changes nothing. No lock is held
    /// while the script runs.
    #[allow(clippy::too_many_arguments)]
    fn run_script(
        &self,
        policies: &Policies,
        call: &ScriptCall,
        src: IpAddr,
        SynContext {
            role, port, wall, ..
        }: SynContext,
        now: Timestamp,
        events: &mut impl EventSink,
        scripts: &mut impl ScriptRunner,
    ) -> bool {
        let key = policies.key(call.policy);
        let network_granted = || {
            self.prefixes
                .find(src, now, |grant| grant.policy == key)
                .is_some()
        };
        let input = ScriptInput {
            src,
            port,
            knock_port: role
                == PortRole::Script {
                    policy: call.policy,
                },
            stage: call.stage,
            last: call.last,
            granted: call.granted || network_granted(),
            now,
            unix_millis: wall.unix_millis(now),
        };
        let Some(output) = scripts.run(policies, call.policy, &input) else {
            return false;
        };
        let policy = &policies.list()[usize::from(call.policy)];
        let (end, network) = match output.action {
            ScriptAction::Grant(grant) => (
                source::grant_end(grant.duration.or(policy.grant_timeout), now),
                grant.prefix,
            ),
            _ => (source::NEVER, None),
        };
        let mut output = output;
        if let (ScriptAction::Grant(grant), Some(prefix)) = (output.action, network) {
            let net = IpNet::new(src, prefix)
                .expect("the runner checked the prefix")
                .trunc();
            let opened = PrefixGrant {
                net,
                policy: key,
                ports: grant.ports,
                until: end,
                origin: Origin::LOCAL,
            };
            if !self.prefixes.grant(opened, EventKind::Granted, events) {
                // The list of network grants is full: the knocker gets in
                // from its own address at least.
                output.action = ScriptAction::Grant(ScriptGrant {
                    prefix: None,
                    ..grant
                });
            }
        }
        let address_grant = matches!(output.action, ScriptAction::Grant(g) if g.prefix.is_none());
        let create = output.stage > 0 || address_grant;
        self.sources.update(src, create, events, |source, events| {
            let slot = match create {
                true => Some(source.slot_or_insert(key, now)),
                false => source.slot_mut(key),
            };
            if let Some(slot) = slot {
                slot.script_output(&output, end, now, &mut |kind, grant| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                        grant,
                    })
                });
            }
            source.remove_empty_slots();
        });
        if output.action == ScriptAction::Revoke {
            self.prefixes
                .revoke(src, Some(key), RevokeReason::CloseKnock, |_| true, events);
        }
        true
    }
}

/// One SYN as `apply` needs it.
#[derive(Clone, Copy)]
struct SynContext<'a> {
    role: PortRole,
    port: FlowPort,
    wall: WallClock,
    spent: &'a SpentWindows,
}

/// A script call a SYN needs: the policy, and the source's state under it.
struct ScriptCall {
    policy: PolicyId,
    stage: u8,
    last: Option<Timestamp>,
    granted: bool,
}

/// Nearly every SYN needs no script call, and the rest one: no allocation.
type ScriptCalls = SmallVec<[ScriptCall; 2]>;

/// Applies one SYN to every policy the source has state in, and lists the
/// script calls it needs. Returns whether the source holds a grant that
/// opens the SYN's port.
fn apply(
    policies: &Policies,
    src: IpAddr,
    source: &mut SourceState,
    SynContext {
        role,
        port,
        wall,
        spent,
    }: SynContext,
    now: Timestamp,
    events: &mut impl EventSink,
    calls: &mut ScriptCalls,
) -> bool {
    let mut granted = false;
    for slot in source.slots_mut() {
        let key = slot.policy;
        let Some((id, policy)) = policies.find(key) else {
            // A policy a reload removed or changed.
            slot.forget();
            continue;
        };
        let mut emit = |kind, grant| {
            events.event(Event {
                src,
                policy: key,
                kind,
                grant,
            })
        };
        slot.settle(policy, now, &mut emit);
        if let PortRole::Open { policies: open } = role {
            granted |= open.contains(id) && slot.opens(policy, port);
        }
        if let config::Knock::Script(_) = policy.knock {
            // The script decides, after the lock is released; only its
            // knock ports and sources with progress reach it.
            if role == (PortRole::Script { policy: id }) || slot.stage() > 0 {
                calls.push(ScriptCall {
                    policy: id,
                    stage: slot.stage(),
                    last: slot.last_step(),
                    granted: slot.is_granted(),
                });
            }
            continue;
        }
        match role {
            PortRole::Knock { policy: p, .. } if p == id => {
                let accepted = policies.accepted(id, now, wall, spent);
                slot.knock(policy, &accepted, port, now, &mut emit)
            }
            PortRole::Close { policy: p } if p == id => {
                slot.revoke(RevokeReason::CloseKnock, &mut emit);
                slot.other_syn(policy, &mut emit);
            }
            _ => slot.other_syn(policy, &mut emit),
        }
    }
    source.remove_empty_slots();
    if granted {
        // Granted sources reach open ports without entering any script.
        calls.clear();
    }
    granted
}
