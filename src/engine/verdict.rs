//! What the engine is asked about one new flow, and what it answers.

use std::net::IpAddr;

use crate::flow::FlowPort;

/// What the engine needs to know about a new flow: a TCP SYN, or a UDP
/// datagram that conntrack sees as NEW.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewFlow {
    pub src: IpAddr,
    pub dst_port: FlowPort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject,
    /// Dropped with no answer: an SPA port looks like nothing to a scanner.
    Drop,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Reject => "reject",
            Verdict::Drop => "drop",
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
    /// The packet was neither TCP nor UDP over IPv4/IPv6, or its transport
    /// header was cut short (decided by the I/O shell).
    Unparsable,
    /// Deciding panicked; the packet was rejected and the worker went on.
    Failed,
    /// A single packet authorization datagram, granting or not: dropped.
    Spa,
}

impl Reason {
    /// Every reason, in declaration order: `reason as usize` indexes it.
    pub const ALL: [Reason; 7] = [
        Reason::Granted,
        Reason::Knock,
        Reason::Close,
        Reason::NoGrant,
        Reason::Unparsable,
        Reason::Failed,
        Reason::Spa,
    ];

    pub fn verdict(self) -> Verdict {
        match self {
            Reason::Granted => Verdict::Accept,
            Reason::Spa => Verdict::Drop,
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
            Reason::Spa => "spa",
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
