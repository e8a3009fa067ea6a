//! Per-source state: one slot per policy the source has progress or a grant in.

use smallvec::SmallVec;

use std::time::Duration;

use super::rotation::Accepted;
use super::script::ScriptOutput;
use super::{EventKind, GrantScope, Origin, PolicyKey, PortMask, RevokeReason, Timestamp, UserKey};
use crate::config::{Knock, Policy, Scope};
use crate::flow::FlowPort;

/// The end of a grant that lasts until the close knock.
pub const NEVER: Timestamp = Timestamp::from_millis(u64::MAX);

/// When a grant made at `now` for `timeout` (`None`: until closed) ends.
pub fn grant_end(timeout: Option<Duration>, now: Timestamp) -> Timestamp {
    timeout.map_or(NEVER, |timeout| now.saturating_add(timeout))
}

/// What is left at `now` of a grant that ends at `end`.
pub fn grant_left(end: Timestamp, now: Timestamp) -> GrantLeft {
    match end {
        NEVER => GrantLeft::UntilClosed,
        end => GrantLeft::For(end.since(now)),
    }
}

/// One source's state under one policy, for people to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyStatus {
    pub progress: Option<Progress>,
    pub grant: Option<GrantLeft>,
    /// The ports the grant opens.
    pub ports: PortMask,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Knocks matched so far, of `of` (0 for a script: its stages have no
    /// fixed end).
    pub stage: u8,
    pub of: usize,
    /// Time left for the next knock.
    pub left: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantLeft {
    For(Duration),
    UntilClosed,
}

impl GrantLeft {
    /// The time left; `None` for a grant until the close knock.
    pub fn duration(self) -> Option<Duration> {
        match self {
            GrantLeft::For(left) => Some(left),
            GrantLeft::UntilClosed => None,
        }
    }
}

/// Everything known about one source address.
#[derive(Debug, Default)]
pub struct SourceState {
    /// Nearly every source knocks under one policy: keep that one inline.
    slots: SmallVec<[PolicyState; 1]>,
}

impl SourceState {
    /// When the source last knocked a port it was waiting for, or started
    /// being tracked: a full table evicts the sources with the oldest.
    pub fn last_knock(&self) -> Timestamp {
        self.slots
            .iter()
            .map(|slot| slot.knocked_at)
            .max()
            .unwrap_or_default()
    }

    pub fn slots_mut(&mut self) -> impl Iterator<Item = &mut PolicyState> {
        self.slots.iter_mut()
    }

    pub fn policies(&self) -> impl Iterator<Item = PolicyKey> + '_ {
        self.slots.iter().map(|slot| slot.policy)
    }

    pub fn slot_or_insert(&mut self, policy: PolicyKey, now: Timestamp) -> &mut PolicyState {
        match self.slots.iter().position(|slot| slot.policy == policy) {
            Some(i) => &mut self.slots[i],
            None => {
                self.slots.push(PolicyState::new(policy, now));
                self.slots.last_mut().expect("just pushed")
            }
        }
    }

    pub fn slot_mut(&mut self, policy: PolicyKey) -> Option<&mut PolicyState> {
        self.slots.iter_mut().find(|slot| slot.policy == policy)
    }

    pub fn slots(&self) -> impl Iterator<Item = &PolicyState> {
        self.slots.iter()
    }

    pub fn remove_empty_slots(&mut self) {
        self.slots.retain(|slot| !slot.is_empty());
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A source holding any grant is never evicted for a stranger.
    pub fn holds_grant(&self) -> bool {
        self.slots.iter().any(PolicyState::is_granted)
    }
}

/// One source's progress and grant under one policy.
#[derive(Debug, Clone, Copy)]
pub struct PolicyState {
    pub policy: PolicyKey,
    /// Ports of the sequence matched so far; equal to the sequence length
    /// right after completion, so a retransmitted last knock is a duplicate.
    stage: u8,
    /// Which window's sequence the progress follows, as windows before the
    /// one current at `knocked_at`: 0 or 1 (always 0 for fixed sequences).
    /// A byte where a window number would take eight.
    lag: u8,
    /// The open ports the grant opens: all but for some script grants.
    ports: PortMask,
    /// Time of the last matched knock (for a script: of the last change
    /// of stage).
    knocked_at: Timestamp,
    /// When the grant ends ([`NEVER`]: at the close knock), or [`NO_GRANT`].
    /// A sentinel rather than an `Option`: eight bytes less per source.
    grant_until: Timestamp,
    /// The node the grant was made on.
    origin: Origin,
    /// The SPA user the grant is for; fits in what would be padding.
    user: Option<UserKey>,
}

/// `grant_until` without a grant: no grant ends at the clock's origin.
const NO_GRANT: Timestamp = Timestamp::from_millis(0);

impl PolicyState {
    fn new(policy: PolicyKey, now: Timestamp) -> Self {
        PolicyState {
            policy,
            stage: 0,
            lag: 0,
            ports: PortMask::ALL,
            knocked_at: now,
            grant_until: NO_GRANT,
            origin: Origin::LOCAL,
            user: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.stage == 0 && !self.is_granted()
    }

    /// Drops progress and grant without events: the policy is gone.
    pub fn forget(&mut self) {
        self.stage = 0;
        self.grant_until = NO_GRANT;
    }

    /// The grant events are about.
    pub fn scope(&self) -> GrantScope {
        GrantScope {
            prefix: None,
            ports: self.ports,
            until: self.grant_until,
            origin: self.origin,
            user: self.user,
        }
    }

    pub fn stage(&self) -> u8 {
        self.stage
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn user(&self) -> Option<UserKey> {
        self.user
    }

    /// The time of the last change of stage, while there is progress.
    pub fn last_step(&self) -> Option<Timestamp> {
        (self.stage > 0).then_some(self.knocked_at)
    }

    /// Whether the grant opens `port`, one of the policy's open ports.
    pub fn opens(&self, policy: &Policy, port: FlowPort) -> bool {
        self.is_granted() && self.ports.opens(&policy.open_ports, port)
    }

    fn grant_end(&self) -> Option<Timestamp> {
        (self.grant_until != NO_GRANT).then_some(self.grant_until)
    }

    /// Sets or clears the grant; returns the one it replaces.
    fn replace_grant(&mut self, end: Option<Timestamp>) -> Option<Timestamp> {
        let previous = self.grant_end();
        self.grant_until = end.map_or(NO_GRANT, |end| end.max(Timestamp::from_millis(1)));
        previous
    }

    pub fn is_granted(&self) -> bool {
        self.grant_until != NO_GRANT
    }

    fn in_progress(&self, policy: &Policy) -> bool {
        policy.knock.in_progress(self.stage)
    }

    /// Ends progress whose step window has passed and grants whose time is up.
    pub fn settle(
        &mut self,
        policy: &Policy,
        now: Timestamp,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) {
        if self.stage > 0 && now.since(self.knocked_at) > policy.step_timeout {
            if self.in_progress(policy) {
                emit(EventKind::Expired, self.scope());
            }
            self.stage = 0;
        }
        if self.grant_end().is_some_and(|end| now >= end) {
            let scope = self.scope();
            self.grant_until = NO_GRANT;
            emit(EventKind::Revoked(RevokeReason::Timeout), scope);
        }
    }

    /// A SYN to `port`, a port of a sequence the policy accepts now.
    pub fn knock(
        &mut self,
        policy: &Policy,
        accepted: &Accepted,
        port: FlowPort,
        now: Timestamp,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) {
        if self.stage > 0 {
            let window = accepted
                .window_at(self.knocked_at)
                .saturating_sub(u64::from(self.lag));
            if let Some(sequence) = accepted.sequence(window) {
                let stage = usize::from(self.stage);
                if sequence.get(stage) == Some(&port) {
                    return self.advance(policy, accepted, window, now, emit);
                }
                if sequence[stage - 1] == port {
                    return emit(EventKind::Duplicate, self.scope());
                }
            }
        }
        match accepted.starting_with(port) {
            Some(window) if self.stage == 0 => self.advance(policy, accepted, window, now, emit),
            Some(window) => {
                self.stage = 1;
                self.follow(accepted, window, now);
                emit(EventKind::Restarted, self.scope());
            }
            None => self.other_syn(policy, emit),
        }
    }

    /// Records a matched knock of `window`'s sequence at `now`.
    fn follow(&mut self, accepted: &Accepted, window: u64, now: Timestamp) {
        self.knocked_at = now;
        self.lag = u8::try_from(accepted.window_at(now) - window).expect("an accepted window");
    }

    fn advance(
        &mut self,
        policy: &Policy,
        accepted: &Accepted,
        window: u64,
        now: Timestamp,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) {
        self.stage += 1;
        self.follow(accepted, window, now);
        if usize::from(self.stage) < policy.knock.sequence_len() {
            emit(EventKind::Advanced { stage: self.stage }, self.scope());
        } else if !accepted.spend(window) {
            self.stage = 0;
            emit(EventKind::Replayed, self.scope());
        } else if policy.scope == Scope::Cluster && matches!(policy.knock, Knock::Rotating(_)) {
            emit(EventKind::Claim { window }, self.scope());
        } else {
            self.grant(grant_end(policy.grant_timeout, now), PortMask::ALL, emit);
        }
    }

    /// Ends the grant, if any; true if there was one.
    pub fn revoke(
        &mut self,
        reason: RevokeReason,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) -> bool {
        let scope = self.scope();
        let granted = self.replace_grant(None).is_some();
        if granted {
            emit(EventKind::Revoked(reason), scope);
        }
        granted
    }

    /// Opens (or restarts) this node's grant of `ports` until `end`.
    pub fn grant(
        &mut self,
        end: Timestamp,
        ports: PortMask,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) {
        let refreshed = self.replace_grant(Some(end)).is_some();
        self.ports = ports;
        self.origin = Origin::LOCAL;
        let kind = match refreshed {
            true => EventKind::Refreshed,
            false => EventKind::Granted,
        };
        emit(kind, self.scope());
    }

    /// Opens (or restarts) an SPA grant of `ports` for `user` until `end`.
    pub fn spa_grant(
        &mut self,
        end: Timestamp,
        ports: PortMask,
        user: UserKey,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) {
        self.user = Some(user);
        self.grant(end, ports, emit);
    }

    /// Puts a grant in place as it stands, saved before a restart or made
    /// on `origin`, with the script stage it had; a new grant is a `kind`
    /// event.
    pub fn put_grant(
        &mut self,
        end: Timestamp,
        ports: PortMask,
        stage: u8,
        origin: Origin,
        user: Option<UserKey>,
        kind: EventKind,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) {
        self.ports = ports;
        self.origin = origin;
        self.user = user;
        if stage > 0 {
            self.stage = stage;
        }
        if self.replace_grant(Some(end)).is_none() {
            emit(kind, self.scope());
        }
    }

    /// Applies what a script decided at `now`: its new stage, and the
    /// address grant or revoke it asked for (a network grant is the
    /// engine's to make). `end` is the grant's end.
    pub fn script_output(
        &mut self,
        output: &ScriptOutput,
        end: Timestamp,
        now: Timestamp,
        emit: &mut impl FnMut(EventKind, GrantScope),
    ) {
        use super::script::ScriptAction;
        let old = self.stage;
        if output.stage != old {
            self.stage = output.stage;
            self.knocked_at = now;
            let kind = match output.stage {
                0 => EventKind::Reset,
                stage if stage > old => EventKind::Advanced { stage },
                _ => EventKind::Restarted,
            };
            emit(kind, self.scope());
        }
        match output.action {
            ScriptAction::None => {}
            ScriptAction::Revoke => {
                self.revoke(RevokeReason::CloseKnock, emit);
            }
            ScriptAction::Grant(grant) if grant.prefix.is_none() => {
                self.grant(end, grant.ports, emit)
            }
            ScriptAction::Grant(_) => {}
        }
    }

    /// What the source has under this policy at `now`, as if settled.
    pub fn status(&self, policy: &Policy, now: Timestamp) -> PolicyStatus {
        let progress = (self.in_progress(policy)
            && now.since(self.knocked_at) <= policy.step_timeout)
            .then(|| Progress {
                stage: self.stage,
                of: policy.knock.sequence_len(),
                left: policy
                    .step_timeout
                    .saturating_sub(now.since(self.knocked_at)),
            });
        let grant = self
            .grant_end()
            .filter(|&end| now < end)
            .map(|end| grant_left(end, now));
        PolicyStatus {
            progress,
            grant,
            ports: self.ports,
        }
    }

    /// Any SYN that is not a knock of this policy's sequence in order.
    pub fn other_syn(&mut self, policy: &Policy, emit: &mut impl FnMut(EventKind, GrantScope)) {
        if policy.strict && self.in_progress(policy) {
            self.stage = 0;
            emit(EventKind::Reset, self.scope());
        }
    }
}
