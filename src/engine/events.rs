//! The engine's events: each change of a source's state under a policy,
//! handed to an [`EventSink`] as it happens.

use std::net::IpAddr;

use super::{source, PolicyKey, PortMask, Timestamp};

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
    /// The SPA user the grant is for.
    pub user: Option<UserKey>,
}

/// Names an SPA user of a policy across reloads, by the user's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserKey(pub std::num::NonZeroU32);

/// The node of a cluster a grant was made on: [`Origin::LOCAL`] for this
/// one. Other nodes are numbered as they are first heard of; the numbers
/// are named by `listeners::Nodes`; the engine only keeps them.
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
    /// A cluster policy's SPA packet passed every check here: the grant
    /// the event is about waits for the cluster to claim the packet's
    /// digest (its first 16 bytes), so that no other node takes it too.
    SpaClaim {
        digest: u128,
    },
    /// A grant saved before a restart was put back.
    Restored,
    Revoked(RevokeReason),
    /// Dropped to make room in a full table.
    Evicted,
    /// A single packet authorization datagram, and what became of it;
    /// `untried`: users of the port the candidate cap left out.
    Spa {
        outcome: SpaOutcome,
        untried: u16,
    },
}

/// What became of an SPA datagram; a small fixed set, fit for labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpaOutcome {
    Granted,
    /// No candidate user's HMAC key authenticates it (forged, cut, a wrong
    /// key, or a mode knockq does not take: GPG, legacy without HMAC).
    BadHmac,
    Replayed,
    /// Its timestamp is farther from the gate's clock than `max_age`.
    TooOld,
    /// The user name inside is not the user whose key opened it.
    UnknownUser,
    /// A command or NAT message.
    RefusedType,
    /// It names an address other than its source.
    RefusedAddress,
    /// No user may send from this source.
    RefusedSource,
    /// None of the ports it asks for is one the user may open.
    RefusedPort,
    ExpiredUser,
    Malformed,
    /// The replay cache is full of packets still young enough to pass.
    CacheFull,
    /// A cluster policy's packet, refused: etcd could not be reached to
    /// claim it.
    Unclaimed,
}

impl SpaOutcome {
    pub const ALL: [SpaOutcome; 13] = [
        SpaOutcome::Granted,
        SpaOutcome::BadHmac,
        SpaOutcome::Replayed,
        SpaOutcome::TooOld,
        SpaOutcome::UnknownUser,
        SpaOutcome::RefusedType,
        SpaOutcome::RefusedAddress,
        SpaOutcome::RefusedSource,
        SpaOutcome::RefusedPort,
        SpaOutcome::ExpiredUser,
        SpaOutcome::Malformed,
        SpaOutcome::CacheFull,
        SpaOutcome::Unclaimed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SpaOutcome::Granted => "granted",
            SpaOutcome::BadHmac => "bad_hmac",
            SpaOutcome::Replayed => "replayed",
            SpaOutcome::TooOld => "too_old",
            SpaOutcome::UnknownUser => "unknown_user",
            SpaOutcome::RefusedType => "refused_type",
            SpaOutcome::RefusedAddress => "refused_address",
            SpaOutcome::RefusedSource => "refused_source",
            SpaOutcome::RefusedPort => "refused_port",
            SpaOutcome::ExpiredUser => "expired_user",
            SpaOutcome::Malformed => "malformed",
            SpaOutcome::CacheFull => "cache_full",
            SpaOutcome::Unclaimed => "unclaimed",
        }
    }
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
    /// The SPA user was removed by a reload, or reached `expires`.
    UserRemoved,
}

impl RevokeReason {
    pub const ALL: [RevokeReason; 5] = [
        RevokeReason::CloseKnock,
        RevokeReason::Timeout,
        RevokeReason::Admin,
        RevokeReason::Cluster,
        RevokeReason::UserRemoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::CloseKnock => "close_knock",
            RevokeReason::Timeout => "timeout",
            RevokeReason::Admin => "admin",
            RevokeReason::Cluster => "cluster",
            RevokeReason::UserRemoved => "user_removed",
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
