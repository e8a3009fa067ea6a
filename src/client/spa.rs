//! Sending a single packet authorization datagram, as fwknop's client
//! sends one: the profile's user and keys, the ports to open, and the
//! address to open them for.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::ClientError;
use crate::flow::FlowPort;
use crate::spa::{seal, Access, Keys, Message};

/// A profile's `[profile.NAME.spa]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaProfile {
    pub user: String,
    pub keys: Keys,
    /// The ports to ask for.
    pub access: Vec<FlowPort>,
    pub source: Source,
    /// The gate's SPA port.
    pub port: u16,
    /// How long to ask the grant to last; `None`: the gate's choice.
    pub timeout: Option<Duration>,
}

/// The address a packet asks access for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The address this host sends to the gate from.
    Auto,
    /// `0.0.0.0`: whatever source the gate sees (behind NAT).
    Any,
    Address(IpAddr),
}

impl Source {
    pub fn parse(text: &str) -> Result<Source, String> {
        match text {
            "auto" => Ok(Source::Auto),
            "0.0.0.0" => Ok(Source::Any),
            text => text.parse().map(Source::Address).map_err(|_| {
                format!("source \"{text}\" is not \"auto\", \"0.0.0.0\" or an address")
            }),
        }
    }
}

/// Sends `spa`'s datagram to `addr`.
pub fn send(addr: IpAddr, spa: &SpaProfile) -> Result<(), ClientError> {
    let target = SocketAddr::new(addr, spa.port);
    let knock_error = |source| ClientError::Knock { target, source };
    let local: SocketAddr = match addr {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(knock_error)?;
    socket.connect(target).map_err(knock_error)?;
    let access = match spa.source {
        Source::Auto => socket.local_addr().map_err(knock_error)?.ip(),
        Source::Any => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Source::Address(addr) => addr,
    };
    let mut random = [0u8; 16];
    let mut salt = [0u8; 8];
    for bytes in [&mut random[..], &mut salt[..]] {
        getrandom::fill(bytes).map_err(|e| knock_error(std::io::Error::other(e.to_string())))?;
    }
    let message = Message {
        // 16 decimal digits, as fwknop's client makes them.
        random: random.iter().map(|b| char::from(b'0' + b % 10)).collect(),
        user: spa.user.clone(),
        timestamp: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        version: "3.0.0".to_owned(),
        access: Access {
            addr: access,
            ports: spa.access.clone(),
        },
        timeout: spa
            .timeout
            .map(|t| u32::try_from(t.as_secs().max(1)).unwrap_or(u32::MAX)),
    };
    let datagram = seal(&message, &spa.keys, salt);
    socket.send(datagram.as_bytes()).map_err(knock_error)?;
    Ok(())
}
