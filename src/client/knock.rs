//! Sending knocks: one TCP connection attempt per TCP port, in order, each
//! waiting for the gate's answer so the SYNs cannot overtake one another;
//! one datagram per UDP port, which the gate never answers, followed by the
//! delay.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::ClientError;
use crate::flow::{FlowPort, Proto};

/// How the gate answered one knock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A TCP reset.
    Refused,
    /// An ICMP error, such as knockq's default reject (host prohibited;
    /// admin prohibited over IPv6).
    Prohibited,
    /// Nothing within the timeout: a gate that drops.
    Silence,
    /// The connection was accepted: the port is open, not a knock port.
    Open,
    /// The attempt ended, not accepted, and the kernel kept no reason.
    Ended,
    /// A UDP knock's datagram left; no answer is expected.
    Sent,
}

impl Answer {
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Refused => "refused",
            Answer::Prohibited => "prohibited",
            Answer::Silence => "no answer",
            Answer::Open => "open",
            Answer::Ended => "ended without a reason",
            Answer::Sent => "sent",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct KnockOptions {
    /// How long to wait for each answer.
    pub timeout: Duration,
    /// Pause after each answer before the next knock.
    pub delay: Duration,
}

/// An address family to keep to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The first address `host` resolves to, of `family` if given.
pub fn resolve(host: &str, family: Option<Family>) -> Result<IpAddr, ClientError> {
    let resolve_error = |source| ClientError::Resolve {
        host: host.to_owned(),
        source,
    };
    let wanted = |addr: &IpAddr| match family {
        None => true,
        Some(Family::V4) => addr.is_ipv4(),
        Some(Family::V6) => addr.is_ipv6(),
    };
    let none = match family {
        None => "no address",
        Some(Family::V4) => "no IPv4 address",
        Some(Family::V6) => "no IPv6 address",
    };
    (host, 0)
        .to_socket_addrs()
        .map_err(resolve_error)?
        .map(|addr| addr.ip())
        .find(wanted)
        .ok_or_else(|| resolve_error(io::Error::other(none)))
}

/// Knocks each port of `ports` at `addr`, in order.
pub fn send(
    addr: IpAddr,
    ports: &[FlowPort],
    options: KnockOptions,
    mut on_answer: impl FnMut(FlowPort, Answer),
) -> Result<(), ClientError> {
    for (i, &port) in ports.iter().enumerate() {
        if i > 0 && !options.delay.is_zero() {
            std::thread::sleep(options.delay);
        }
        let target = SocketAddr::new(addr, port.number());
        let answer = match port.proto() {
            Proto::Tcp => attempt(target, options.timeout),
            Proto::Udp => datagram(target),
        }
        .map_err(|source| ClientError::Knock { target, source })?;
        on_answer(port, answer);
    }
    Ok(())
}

/// One datagram to `target`, as knockd's client sends: a byte, from a
/// fresh socket, so each knock is a new flow.
fn datagram(target: SocketAddr) -> io::Result<Answer> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(local)?.send_to(&[0], target)?;
    Ok(Answer::Sent)
}

/// One connection attempt to `target` and the gate's answer to it.
///
/// Written on socket2 rather than `TcpStream::connect_timeout`, because std
/// reports an attempt that the kernel ended without keeping an error code
/// (seen under load after an ICMP reject) as an error of its own, which
/// cannot be told apart from a knock that never left.
fn attempt(target: SocketAddr, timeout: Duration) -> io::Result<Answer> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    match socket.connect(&target.into()) {
        Ok(()) => return Ok(Answer::Open),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return answer_to(e),
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Answer::Silence);
        }
        let mut pollfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let millis = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, owned by this frame.
        match unsafe { libc::poll(&mut pollfd, 1, millis) } {
            -1 => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
            0 => {}
            _ => {
                return match socket.take_error()? {
                    Some(error) => answer_to(error),
                    None if pollfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 => {
                        Ok(Answer::Ended)
                    }
                    None => Ok(Answer::Open),
                };
            }
        }
    }
}

/// A failed connection attempt as the gate's answer, or as the error that
/// kept the knock from being sent.
fn answer_to(error: io::Error) -> Result<Answer, io::Error> {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Ok(Answer::Refused),
        io::ErrorKind::HostUnreachable | io::ErrorKind::PermissionDenied => Ok(Answer::Prohibited),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Ok(Answer::Silence),
        // No route from here (ENETUNREACH), no such local address, …: the
        // knock never left.
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_told_apart_from_failures_to_send() {
        let kind = |k: io::ErrorKind| answer_to(io::Error::from(k));
        assert_eq!(
            kind(io::ErrorKind::ConnectionRefused).unwrap(),
            Answer::Refused
        );
        assert_eq!(
            kind(io::ErrorKind::HostUnreachable).unwrap(),
            Answer::Prohibited
        );
        assert_eq!(
            kind(io::ErrorKind::PermissionDenied).unwrap(),
            Answer::Prohibited
        );
        assert_eq!(kind(io::ErrorKind::TimedOut).unwrap(), Answer::Silence);
        assert!(kind(io::ErrorKind::NetworkUnreachable).is_err());
        assert!(kind(io::ErrorKind::AddrNotAvailable).is_err());
    }
}
