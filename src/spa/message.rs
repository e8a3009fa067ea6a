//! The plaintext of an SPA packet: fwknop's `:`-separated fields, read and
//! written (`lib/fko_encode.c` and `lib/fko_decode.c` in fwknop).

use std::fmt;
use std::net::IpAddr;

use sha2::{Digest, Sha256, Sha384, Sha512};

use super::{base64_decode, base64_encode};
use crate::flow::{FlowPort, Proto};

/// Longest user name fwknop sends.
const MAX_USER: usize = 64;

/// Why a datagram was not a message knockq takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("{0} messages are not supported")]
    Type(MessageType),
}

/// fwknop's message types, by their number on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    Command = 0,
    Access = 1,
    NatAccess = 2,
    ClientTimeoutAccess = 3,
    ClientTimeoutNatAccess = 4,
    LocalNatAccess = 5,
    ClientTimeoutLocalNatAccess = 6,
}

impl MessageType {
    fn from_number(n: u8) -> Option<Self> {
        use MessageType::*;
        [
            Command,
            Access,
            NatAccess,
            ClientTimeoutAccess,
            ClientTimeoutNatAccess,
            LocalNatAccess,
            ClientTimeoutLocalNatAccess,
        ]
        .get(usize::from(n))
        .copied()
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageType::Command => "command",
            MessageType::Access => "access",
            MessageType::NatAccess => "NAT access",
            MessageType::ClientTimeoutAccess => "access with timeout",
            MessageType::ClientTimeoutNatAccess => "NAT access with timeout",
            MessageType::LocalNatAccess => "local NAT access",
            MessageType::ClientTimeoutLocalNatAccess => "local NAT access with timeout",
        })
    }
}

/// The address a message asks access for, and the ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// `0.0.0.0`: the packet's own source (the client's `-s`).
    pub addr: IpAddr,
    pub ports: Vec<FlowPort>,
}

impl Access {
    /// Whether the message leaves the address to the packet's source.
    pub fn any_source(&self) -> bool {
        self.addr.is_unspecified()
    }
}

/// An access request: message type 1, or 3 with `timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// 16 random decimal digits.
    pub random: String,
    pub user: String,
    /// Unix time the client made the packet at, in seconds.
    pub timestamp: u64,
    pub version: String,
    pub access: Access,
    /// The access the client asks for, in seconds (type 3).
    pub timeout: Option<u32>,
}

impl Message {
    /// Reads a decrypted plaintext, checking its digest. Only access
    /// messages (types 1 and 3) are taken.
    pub fn decode(plain: &[u8]) -> Result<Message, Refusal> {
        let malformed = Refusal::Malformed;
        let text = std::str::from_utf8(plain).map_err(|_| malformed("not text"))?;
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed("not printable text"));
        }
        let (fields, digest) = text.rsplit_once(':').ok_or(malformed("no fields"))?;
        let computed = match digest.len() {
            43 => base64_encode(&Sha256::digest(fields)),
            64 => base64_encode(&Sha384::digest(fields)),
            86 => base64_encode(&Sha512::digest(fields)),
            _ => return Err(malformed("digest of unsupported length")),
        };
        if computed != digest {
            return Err(malformed("digest does not match"));
        }
        let mut fields = fields.split(':');
        let mut next = |what| fields.next().ok_or(malformed(what));
        let random = next("no random value")?;
        if random.len() < 16 || !random.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("random value is not 16 digits"));
        }
        let user = decode_text(next("no user")?).ok_or(malformed("user is not base64 text"))?;
        if user.is_empty() || user.len() > MAX_USER {
            return Err(malformed("user name is empty or too long"));
        }
        let timestamp = next("no timestamp")?
            .parse()
            .map_err(|_| malformed("timestamp is not a number"))?;
        let version = next("no version")?;
        if version.is_empty() || version.len() > 8 {
            return Err(malformed("version"));
        }
        let kind = next("no message type")?
            .parse()
            .ok()
            .and_then(MessageType::from_number)
            .ok_or(malformed("unknown message type"))?;
        if !matches!(kind, MessageType::Access | MessageType::ClientTimeoutAccess) {
            return Err(Refusal::Type(kind));
        }
        let access = decode_text(next("no access message")?)
            .and_then(|text| parse_access(&text))
            .ok_or(malformed("access message is not ADDRESS,PROTO/PORT,..."))?;
        // What follows: a server_auth for type 1 (knockq asks for none);
        // for type 3 an optional server_auth, then the timeout.
        let rest: Vec<&str> = fields.collect();
        let timeout = match kind {
            MessageType::ClientTimeoutAccess => {
                let last = rest.last().ok_or(malformed("no client timeout"))?;
                if last.is_empty() || !last.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(malformed("client timeout is not a number"));
                }
                Some(
                    last.parse()
                        .map_err(|_| malformed("client timeout too large"))?,
                )
            }
            _ => None,
        };
        if rest.len() > 2 {
            return Err(malformed("too many fields"));
        }
        Ok(Message {
            random: random.to_owned(),
            user,
            timestamp,
            version: version.to_owned(),
            access,
            timeout,
        })
    }

    /// The plaintext, digest included.
    pub fn encode(&self) -> Vec<u8> {
        let ports: Vec<String> = self
            .access
            .ports
            .iter()
            .map(|port| format!("{}/{}", port.proto().as_str(), port.number()))
            .collect();
        let access = format!("{},{}", self.access.addr, ports.join(","));
        let kind = match self.timeout {
            Some(_) => MessageType::ClientTimeoutAccess,
            None => MessageType::Access,
        };
        let mut text = format!(
            "{}:{}:{}:{}:{}:{}",
            self.random,
            base64_encode(self.user.as_bytes()),
            self.timestamp,
            self.version,
            kind as u8,
            base64_encode(access.as_bytes()),
        );
        if let Some(timeout) = self.timeout {
            text.push_str(&format!(":{timeout}"));
        }
        let digest = base64_encode(&Sha256::digest(&text));
        text.push(':');
        text.push_str(&digest);
        text.into_bytes()
    }
}

fn decode_text(field: &str) -> Option<String> {
    String::from_utf8(base64_decode(field.as_bytes())?).ok()
}

/// `10.0.0.2,tcp/22,udp/53`
fn parse_access(text: &str) -> Option<Access> {
    let mut parts = text.split(',');
    let addr = parts.next()?.parse().ok()?;
    let ports = parts
        .map(|part| {
            let (proto, number) = part.split_once('/')?;
            let proto = match proto {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => return None,
            };
            let number: u16 = number.parse().ok().filter(|&n| n > 0)?;
            Some(FlowPort::new(proto, number))
        })
        .collect::<Option<Vec<_>>>()?;
    (!ports.is_empty()).then_some(Access { addr, ports })
}
