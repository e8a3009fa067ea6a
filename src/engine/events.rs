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
}

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
