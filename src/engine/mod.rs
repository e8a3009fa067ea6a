//! The knock state machine. Pure: no I/O, no clock of its own. Callers pass
//! the time of each packet, which makes every rule testable without sleeping
//! and lets the simulator replay captures with their own timestamps.

mod check;
mod policies;
mod ports;
mod prefixes;
mod rotation;
mod script;
mod source;
mod table;

#[cfg(test)]
pub(crate) mod tests;

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use ipnet::IpNet;
use smallvec::SmallVec;

use crate::config::{self, Config, Policy};
use crate::flow::FlowPort;

pub(crate) use check::check_rotating;
pub use check::{check, MAX_SEQUENCE_LEN, MIN_ROTATING_PORTS};
pub use policies::{Policies, PolicyKey};
pub use ports::{PolicySet, PortMap, PortMask, PortRole};
use prefixes::{PrefixGrant, PrefixGrants};
use rotation::SpentWindows;
pub use script::{NoScripts, ScriptAction, ScriptGrant, ScriptInput, ScriptOutput, ScriptRunner};
use source::SourceState;
pub use source::{grant_left, GrantLeft, PolicyStatus, Progress};
use table::SourceTable;
pub use table::TablePart;

/// Index of a policy in the list in force.
pub type PolicyId = u8;

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

/// What the engine needs to know about a NEW TCP SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syn {
    pub src: IpAddr,
    pub dst_port: FlowPort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Reject => "reject",
        }
    }
}

/// Why a packet got its verdict; a small fixed set, fit for metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// The source holds a grant that opens this port.
    Granted,
    /// A knock port: always rejected so knock clients return at once.
    Knock,
    /// A close port: always rejected, revokes the grant.
    Close,
    /// Nothing opens this port for this source.
    NoGrant,
    /// The packet was not TCP over IPv4/IPv6 (decided by the I/O shell).
    Unparsable,
    /// Deciding panicked; the packet was rejected and the worker went on.
    Failed,
}

impl Reason {
    /// Every reason, in declaration order: `reason as usize` indexes it.
    pub const ALL: [Reason; 6] = [
        Reason::Granted,
        Reason::Knock,
        Reason::Close,
        Reason::NoGrant,
        Reason::Unparsable,
        Reason::Failed,
    ];

    pub fn verdict(self) -> Verdict {
        match self {
            Reason::Granted => Verdict::Accept,
            _ => Verdict::Reject,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::Knock => "knock",
            Reason::Close => "close",
            Reason::NoGrant => "no_grant",
            Reason::Unparsable => "unparsable",
            Reason::Failed => "failed",
        }
    }
}

/// The engine's answer for one packet; the reason implies the verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
}

impl Decision {
    pub const ACCEPT: Decision = Decision {
        reason: Reason::Granted,
    };

    pub const fn reject(reason: Reason) -> Self {
        debug_assert!(!matches!(reason, Reason::Granted));
        Decision { reason }
    }

    pub fn verdict(self) -> Verdict {
        self.reason.verdict()
    }
}

/// A change of one source's state under one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The source, or the network address of a network grant.
    pub src: IpAddr,
    pub policy: PolicyKey,
    pub kind: EventKind,
    /// The grant a grant or revoke event is about (for other events, the
    /// source's grant as it stands).
    pub grant: GrantScope,
}

/// Which grant an event is about: whom it lets in, to which ports, until
/// when, and which node made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantScope {
    /// A network grant's prefix length; `None` for the address alone.
    pub prefix: Option<u8>,
    pub ports: PortMask,
    /// When it ends; [`GRANT_UNTIL_CLOSED`] for grants without a timeout.
    pub until: Timestamp,
    pub origin: Origin,
}

/// The node of a cluster a grant was made on: [`Origin::LOCAL`] for this
/// one. Other nodes are numbered as they are first heard of; the numbers
/// are the daemon's to name (`cluster::Nodes`), the engine only keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Origin(pub u16);

impl Origin {
    pub const LOCAL: Origin = Origin(0);

    pub fn is_local(self) -> bool {
        self == Origin::LOCAL
    }
}

/// The end of a grant that lasts until it is closed.
pub const GRANT_UNTIL_CLOSED: Timestamp = source::NEVER;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The next port of the sequence; `stage` ports are now matched.
    Advanced {
        stage: u8,
    },
    /// The port just knocked, again (a retransmitted SYN): nothing changes.
    Duplicate,
    /// The first port of the sequence while further along: back to stage 1.
    Restarted,
    /// Another port while in progress, under a strict policy.
    Reset,
    /// The step window passed before the next knock.
    Expired,
    /// The sequence was completed: the open ports are open for the source.
    Granted,
    /// The sequence was completed again while granted: the grant starts over.
    Refreshed,
    /// A rotating sequence was completed in a window already spent: a
    /// replay, refused.
    Replayed,
    /// A cluster policy's rotating sequence was completed in `window`,
    /// spent on this node: the grant waits for the cluster to claim the
    /// window for it, so that no other node takes the same knock.
    Claim {
        window: u64,
    },
    /// A grant saved before a restart was put back.
    Restored,
    Revoked(RevokeReason),
    /// Dropped to make room in a full table.
    Evicted,
}

impl EventKind {
    /// Whether the event opens, restarts or ends a grant.
    pub fn changes_grant(self) -> bool {
        matches!(
            self,
            EventKind::Granted | EventKind::Refreshed | EventKind::Restored | EventKind::Revoked(_)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeReason {
    CloseKnock,
    Timeout,
    /// By an operator, through the control socket.
    Admin,
    /// Revoked on another node of the cluster, by any of the above.
    Cluster,
}

impl RevokeReason {
    pub const ALL: [RevokeReason; 4] = [
        RevokeReason::CloseKnock,
        RevokeReason::Timeout,
        RevokeReason::Admin,
        RevokeReason::Cluster,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::CloseKnock => "close_knock",
            RevokeReason::Timeout => "timeout",
            RevokeReason::Admin => "admin",
            RevokeReason::Cluster => "cluster",
        }
    }
}

/// Receives the engine's events. The engine calls it while it holds a lock
/// on part of the source table, so implementations must not block or do I/O:
/// collect, count, and act on the events afterwards.
pub trait EventSink {
    fn event(&mut self, event: Event);
}

impl EventSink for Vec<Event> {
    fn event(&mut self, event: Event) {
        self.push(event);
    }
}

/// The source table is at its cap and every tracked source holds a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the source table is full of grants")]
pub struct TableFull;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// The source, or the network address of a network grant.
    pub src: IpAddr,
    /// A network grant's prefix length.
    pub prefix: Option<u8>,
    pub policy: String,
    /// The script stage to save with the grant (0 for other policies).
    pub stage: u8,
    pub status: PolicyStatus,
    /// The node the grant was made on.
    pub origin: Origin,
}

/// What a reload did to the policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Same knock, same ports: their grants and progress carry on.
    pub kept: Vec<String>,
    /// New or changed: they start with no state.
    pub fresh: Vec<String>,
    /// Gone or changed: their state was dropped.
    pub dropped: Vec<String>,
}

/// The gate's whole state: the policies in force and the bounded table of
/// sources that made progress or hold a grant. Shared by all workers.
pub struct Engine {
    policies: ArcSwap<Policies>,
    sources: SourceTable,
    prefixes: PrefixGrants,
    spent: SpentWindows,
    wall_offset: AtomicI64,
    next_key: AtomicU32,
}

impl Engine {
    pub fn new(config: &Config) -> Self {
        let next_key = AtomicU32::new(0);
        Engine {
            policies: ArcSwap::from_pointee(Policies::new(&config.policies, None, &next_key)),
            sources: SourceTable::new(config.limits.max_sources),
            prefixes: PrefixGrants::new(config.limits.max_prefix_grants),
            spent: SpentWindows::default(),
            wall_offset: AtomicI64::new(0),
            next_key,
        }
    }

    /// The policies in force now.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.load_full()
    }

    /// Puts `list` in force at once. Policies whose name, sequence and ports
    /// are unchanged keep their sources' state; the state of the others is
    /// forgotten. Call from one thread at a time.
    pub fn reload(&self, list: &[Policy]) -> Reloaded {
        let old = self.policies.load_full();
        let new = Policies::new(list, Some(&old), &self.next_key);
        let mut reloaded = Reloaded::default();
        for (key, policy) in new.keys() {
            match old.get(key) {
                Some(_) => reloaded.kept.push(policy.name.clone()),
                None => reloaded.fresh.push(policy.name.clone()),
            }
        }
        for (key, policy) in old.keys() {
            if new.get(key).is_none() {
                reloaded.dropped.push(policy.name.clone());
            }
        }
        self.policies.store(Arc::new(new));
        reloaded
    }

    /// Sets how timestamps map to Unix time, for rotating sequences. Without
    /// it, timestamps are taken as Unix time.
    pub fn set_wall_clock(&self, wall: WallClock) {
        self.wall_offset
            .store(wall.offset_millis, Ordering::Relaxed);
    }

    pub fn wall_clock(&self) -> WallClock {
        WallClock {
            offset_millis: self.wall_offset.load(Ordering::Relaxed),
        }
    }

    /// What a SYN to `port` is at `now`.
    pub fn role(&self, port: FlowPort, now: Timestamp) -> PortRole {
        self.policies.load().role(port, now, self.wall_clock())
    }

    /// Number of sources currently tracked.
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }

    /// Starts loading what is known about `src` into the CPU's cache.
    /// Called for each packet of a batch before any is decided, it lets the
    /// memory loads of the batch overlap.
    pub fn prefetch(&self, src: IpAddr) {
        self.sources.prefetch(src);
    }

    /// Decides one NEW SYN at time `now`. The state change caused by the
    /// packet is complete when this returns, so the next packet from the same
    /// source already sees it. Script policies run through `scripts`, the
    /// calling thread's own.
    pub fn decide(
        &self,
        syn: Syn,
        now: Timestamp,
        events: &mut impl EventSink,
        scripts: &mut impl ScriptRunner,
    ) -> Decision {
        let policies = self.policies.load();
        let wall = self.wall_clock();
        let role = policies.role(syn.dst_port, now, wall);
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

    /// Opens a grant for `src` by hand, for `duration` or, without one, for
    /// the policy's grant timeout. Fails when the policy is no longer in
    /// force or the table is full of grants.
    pub fn grant(
        &self,
        src: IpAddr,
        key: PolicyKey,
        duration: Option<Duration>,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        let policies = self.policies.load();
        let policy = policies.get(key).ok_or(GrantError::NoSuchPolicy)?;
        let end = source::grant_end(duration.or(policy.grant_timeout), now);
        self.sources
            .update(src, true, events, |source, events| {
                let slot = source.slot_or_insert(key, now);
                slot.grant(end, PortMask::ALL, &mut |kind, grant| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                        grant,
                    })
                });
            })
            .ok_or(GrantError::TableFull(TableFull))
    }

    /// Puts back a grant saved before a restart, with the time it had left.
    pub fn restore(
        &self,
        saved: GrantRecord,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        self.put_grant(saved, EventKind::Restored, now, events)
    }

    /// Applies a grant another node of the cluster made, with the time it
    /// has left. A source granted already keeps its grant, taken over by
    /// the new one's end and origin.
    pub fn adopt(
        &self,
        shared: GrantRecord,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        self.put_grant(shared, EventKind::Granted, now, events)
    }

    /// Puts `record` in place; a new grant is a `kind` event.
    fn put_grant(
        &self,
        record: GrantRecord,
        kind: EventKind,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<(), GrantError> {
        let GrantRecord {
            src,
            prefix,
            policy: key,
            left,
            ports,
            stage,
            origin,
        } = record;
        self.policies
            .load()
            .get(key)
            .ok_or(GrantError::NoSuchPolicy)?;
        let end = match left {
            GrantLeft::For(left) => now.saturating_add(left),
            GrantLeft::UntilClosed => source::NEVER,
        };
        if let Some(prefix) = prefix {
            let net = IpNet::new(src, prefix)
                .map_err(|_| GrantError::BadPrefix)?
                .trunc();
            let grant = PrefixGrant {
                net,
                policy: key,
                ports,
                until: end,
                origin,
            };
            return match self.prefixes.grant(grant, kind, events) {
                true => Ok(()),
                false => Err(GrantError::TableFull(TableFull)),
            };
        }
        self.sources
            .update(src, true, events, |source, events| {
                let slot = source.slot_or_insert(key, now);
                slot.put_grant(end, ports, stage, origin, kind, &mut |kind, grant| {
                    events.event(Event {
                        src,
                        policy: key,
                        kind,
                        grant,
                    })
                });
            })
            .ok_or(GrantError::TableFull(TableFull))
    }

    /// Ends the grants of `src`, under one policy or all, and the network
    /// grants that hold it, that `which` picks (a revocation from another
    /// node names the grant it ended, and spares a newer one), for
    /// `reason`; returns how many there were.
    pub fn revoke(
        &self,
        src: IpAddr,
        policy: Option<PolicyKey>,
        reason: RevokeReason,
        which: impl Fn(&GrantScope) -> bool,
        events: &mut impl EventSink,
    ) -> usize {
        let networks = self.prefixes.revoke(src, policy, reason, &which, events);
        let addresses = self
            .sources
            .update(src, false, events, |source, events| {
                let mut revoked = 0;
                for slot in source
                    .slots_mut()
                    .filter(|slot| policy.is_none_or(|p| p == slot.policy))
                    .filter(|slot| which(&slot.scope()))
                {
                    let key = slot.policy;
                    let mut emit = |kind, grant| {
                        events.event(Event {
                            src,
                            policy: key,
                            kind,
                            grant,
                        })
                    };
                    revoked += usize::from(slot.revoke(reason, &mut emit));
                }
                source.remove_empty_slots();
                revoked
            })
            .unwrap_or(0);
        networks + addresses
    }

    /// When the last of the grants that open `port` to `src` ends, at
    /// `now`: the address's own grants, or with `prefix` the network grants
    /// of exactly that network. `None` if no grant opens it.
    pub fn open_until(
        &self,
        src: IpAddr,
        prefix: Option<u8>,
        port: FlowPort,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let policies = self.policies.load();
        // A mask of all ports opens the policy's open ports, not any port.
        let opens = |key: PolicyKey, ports: PortMask| {
            policies.get(key).is_some_and(|policy| {
                policy.open_ports.contains(&port) && ports.opens(&policy.open_ports, port)
            })
        };
        match prefix {
            Some(prefix) => {
                let net = IpNet::new(src, prefix).ok()?.trunc();
                let grants = self.prefixes.list(now).into_iter();
                grants
                    .filter(|grant| grant.net == net && opens(grant.policy, grant.ports))
                    .map(|grant| grant.until)
                    .max()
            }
            None => self
                .sources
                .update(src, false, &mut Vec::new(), |source, _| {
                    source
                        .slots()
                        .filter(|slot| slot.is_granted() && opens(slot.policy, slot.scope().ports))
                        .map(|slot| slot.scope().until)
                        .filter(|&until| until > now)
                        .max()
                })
                .flatten(),
        }
    }

    /// The rotating windows some source completed and that are still
    /// accepted, so a replay is refused.
    pub fn spent_windows(&self) -> Vec<(PolicyKey, u64)> {
        self.spent.list()
    }

    /// Marks a window spent again after a restart.
    pub fn restore_spent(&self, key: PolicyKey, window: u64) {
        self.spent.spend(key, window);
    }

    /// Every tracked source's progress and grants at `now`, and the network
    /// grants.
    pub fn status(&self, now: Timestamp) -> Vec<SourceStatus> {
        self.statuses(now, true)
    }

    /// The grants open at `now`, without the progress of sources that hold
    /// none: a short list even while a flood of knocks fills the table.
    pub fn grants(&self, now: Timestamp) -> Vec<SourceStatus> {
        self.statuses(now, false)
    }

    fn statuses(&self, now: Timestamp, with_progress: bool) -> Vec<SourceStatus> {
        let policies = self.policies.load();
        let mut statuses = Vec::new();
        self.sources.for_each(|src, source| {
            if !with_progress && !source.holds_grant() {
                return;
            }
            for slot in source.slots() {
                let Some(policy) = policies.get(slot.policy) else {
                    continue;
                };
                let mut status = slot.status(policy, now);
                if !with_progress {
                    status.progress = None;
                }
                if status.progress.is_some() || status.grant.is_some() {
                    statuses.push(SourceStatus {
                        src,
                        prefix: None,
                        policy: policy.name.clone(),
                        stage: match policy.knock {
                            config::Knock::Script(_) => slot.stage(),
                            _ => 0,
                        },
                        status,
                        origin: slot.origin(),
                    });
                }
            }
        });
        for grant in self.prefixes.list(now) {
            let Some(policy) = policies.get(grant.policy) else {
                continue;
            };
            statuses.push(SourceStatus {
                src: grant.net.network(),
                prefix: Some(grant.net.prefix_len()),
                policy: policy.name.clone(),
                stage: 0,
                status: PolicyStatus {
                    progress: None,
                    grant: Some(source::grant_left(grant.until, now)),
                    ports: grant.ports,
                },
                origin: grant.origin,
            });
        }
        statuses.sort_by(|a, b| (a.src, a.prefix, &a.policy).cmp(&(b.src, b.prefix, &b.policy)));
        statuses
    }

    /// Settles the tracked sources in `part` of the table at time `now`:
    /// ends timed-out progress and grants, drops state of policies no longer
    /// in force, and forgets sources with nothing left. Run periodically so
    /// state does not wait for its source to come back.
    pub fn expire(&self, now: Timestamp, part: TablePart, events: &mut impl EventSink) {
        let policies = self.policies.load();
        let wall = self.wall_clock();
        self.sources.retain(part, |src, source| {
            for slot in source.slots_mut() {
                let key = slot.policy;
                match policies.get(key) {
                    Some(policy) => slot.settle(policy, now, &mut |kind, grant| {
                        events.event(Event {
                            src,
                            policy: key,
                            kind,
                            grant,
                        })
                    }),
                    None => slot.forget(),
                }
            }
            source.remove_empty_slots();
        });
        self.prefixes
            .expire(now, |key| policies.get(key).is_some(), events);
        self.spent.prune(|key, window| {
            policies.find(key).is_some_and(|(id, _)| {
                policies
                    .accepted(id, now, wall, &self.spent)
                    .sequence(window)
                    .is_some()
            })
        });
    }
}

/// A grant to put in place as it stands: saved before a restart, or made
/// on another node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRecord {
    pub src: IpAddr,
    /// A network grant's prefix length.
    pub prefix: Option<u8>,
    pub policy: PolicyKey,
    pub left: GrantLeft,
    pub ports: PortMask,
    /// A script policy's stage.
    pub stage: u8,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the policy is no longer in force")]
    NoSuchPolicy,
    #[error("the prefix is longer than the address")]
    BadPrefix,
    #[error(transparent)]
    TableFull(TableFull),
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
