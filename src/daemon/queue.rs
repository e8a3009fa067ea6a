//! Opening and configuring one NFQUEUE socket.

use std::collections::HashSet;
use std::io;
use std::os::fd::RawFd;

use std::time::{Duration, Instant};

use nfq::Queue;

use super::receive;
use super::verdicts::{self, VerdictBatch, NFNL_SUBSYS_QUEUE, NLM_F_REQUEST};
use super::worker::RECEIVE_TIMEOUT;
use crate::engine::Verdict;

/// Bytes of each packet copied to the daemon at most: the headers of a SYN,
/// and all of an SPA datagram (up to 1500 bytes of data behind an IPv6 and
/// a UDP header). A SYN costs what it did: the kernel copies a packet's
/// length, not the range.
pub const COPY_RANGE: u16 = 1600;
/// Packets the kernel holds for this queue before it drops new ones.
const QUEUE_MAX_LEN: u32 = 8192;
/// Room for bursts of queued packets waiting to be received.
const RECEIVE_BUFFER_BYTES: libc::c_int = 8 << 20;

#[derive(Debug, thiserror::Error)]
#[error("cannot bind NFQUEUE {queue}")]
pub struct BindError {
    pub queue: u16,
    pub source: io::Error,
}

/// Opens a netlink socket bound to queue `num`, set up for the gate: headers
/// only, a long kernel queue, a large receive buffer, fail-open as configured
/// (the kernel accepts rather than drops when the queue is full), and a
/// receive timeout so the worker notices shutdown.
///
/// Must run before the daemon starts other threads (see [`netfilter_sockets`]).
pub fn open_queue(num: u16, fail_open: bool) -> Result<(Queue, RawFd), BindError> {
    let setup = || -> io::Result<(Queue, RawFd)> {
        let before = netfilter_sockets()?;
        let queue = Queue::open()?;
        let fd = match netfilter_sockets()?.difference(&before).collect::<Vec<_>>()[..] {
            [&fd] => fd,
            _ => return Err(io::Error::other("cannot find the new netlink socket")),
        };
        // FORCE goes past net.core.rmem_max; it needs CAP_NET_ADMIN, which
        // binding needs too, but fall back rather than fail.
        setsockopt(fd, libc::SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
            .or_else(|_| setsockopt(fd, libc::SO_RCVBUF, RECEIVE_BUFFER_BYTES))?;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: RECEIVE_TIMEOUT.as_micros() as libc::suseconds_t,
        };
        setsockopt(fd, libc::SO_RCVTIMEO, timeout)?;
        bind(fd, num, fail_open)?;
        Ok((queue, fd))
    };
    setup().map_err(|source| BindError { queue: num, source })
}

/// How long binding waits for the kernel's answer.
const BIND_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Binds queue `num` and sets it up in one config message, then waits for
/// the kernel's answer. Written here rather than with `nfq`'s `bind` and
/// setters: each of those waits for its answer by reading the socket and
/// discarding whatever else it reads, and a SYN queued meanwhile would then
/// stay in the kernel until a later batch verdict covered its id with
/// another packet's verdict, an accept perhaps. Packets read here, queued
/// before the answer, are rejected: the gate is not open until bound.
fn bind(fd: RawFd, num: u16, fail_open: bool) -> io::Result<()> {
    verdicts::send_to_kernel(fd, &config_message(num, fail_open))?;
    let mut rejects = VerdictBatch::new(fd, num);
    let mut datagram = [0u8; 8192];
    let deadline = Instant::now() + BIND_ANSWER_WITHIN;
    loop {
        // SAFETY: `datagram` is live and as long as the length passed.
        let len = unsafe { libc::recv(fd, datagram.as_mut_ptr().cast(), datagram.len(), 0) };
        if len < 0 {
            let e = io::Error::last_os_error();
            let again = matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            );
            if again && Instant::now() < deadline {
                continue;
            }
            return Err(e);
        }
        let datagram = &datagram[..len as usize];
        for packet in receive::packets(datagram) {
            rejects.push(packet.id, Verdict::Reject)?;
        }
        rejects.flush()?;
        if let Some(error) = receive::answer(datagram, CONFIG_SEQUENCE) {
            return match error {
                0 => Ok(()),
                // The kernel says EPERM both to a process without the
                // capability and for a queue another socket has bound.
                libc::EPERM if has_net_admin() => Err(io::Error::other(
                    "another program has bound it (the kernel says EPERM)",
                )),
                e => Err(io::Error::from_raw_os_error(e)),
            };
        }
    }
}

/// Whether this process has CAP_NET_ADMIN, from its effective capabilities.
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|effective| effective & (1 << CAP_NET_ADMIN) != 0)
}

const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NLM_F_ACK: u16 = 4;
/// Tells the answer to the config message from errors about verdicts,
/// which are sent with sequence 0.
const CONFIG_SEQUENCE: u32 = 1;

/// The config message binding queue `num` with the gate's settings; the
/// kernel applies its attributes in this order, and answers once.
fn config_message(num: u16, fail_open: bool) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&[0; 4]); // length, set below
    message.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG).to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    message.extend_from_slice(&CONFIG_SEQUENCE.to_ne_bytes());
    message.extend_from_slice(&[0; 4]); // port id, the kernel's
                                        // nfgenmsg: family unspecified, version 0, the queue in network order.
    message.extend_from_slice(&[0, 0]);
    message.extend_from_slice(&num.to_be_bytes());
    // nfqnl_msg_config_cmd: command, padding, protocol family.
    attribute(&mut message, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);
    // nfqnl_msg_config_params, packed: the copy range, then the mode.
    let mut params = u32::from(COPY_RANGE).to_be_bytes().to_vec();
    params.push(NFQNL_COPY_PACKET);
    attribute(&mut message, NFQA_CFG_PARAMS, &params);
    attribute(
        &mut message,
        NFQA_CFG_QUEUE_MAXLEN,
        &QUEUE_MAX_LEN.to_be_bytes(),
    );
    let flags = if fail_open { NFQA_CFG_F_FAIL_OPEN } else { 0 };
    attribute(&mut message, NFQA_CFG_FLAGS, &flags.to_be_bytes());
    attribute(
        &mut message,
        NFQA_CFG_MASK,
        &NFQA_CFG_F_FAIL_OPEN.to_be_bytes(),
    );
    let len = message.len() as u32;
    message[0..4].copy_from_slice(&len.to_ne_bytes());
    message
}

/// Appends a netlink attribute, padded to four bytes.
fn attribute(message: &mut Vec<u8>, kind: u16, value: &[u8]) {
    message.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(value);
    message.resize(message.len().next_multiple_of(4), 0);
}

/// The process's netlink-netfilter sockets. `nfq` 0.2 does not expose the
/// descriptor of its socket, which the socket options above, the batched
/// receive and the batch verdicts need: it is the one such socket that
/// `Queue::open` adds. Finding it this way is only
/// sound while no other thread opens descriptors.
fn netfilter_sockets() -> io::Result<HashSet<RawFd>> {
    let mut sockets = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let netfilter = getsockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
            && getsockopt(fd, libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER);
        if netfilter {
            sockets.insert(fd);
        }
    }
    Ok(sockets)
}

fn setsockopt<T>(fd: RawFd, option: libc::c_int, value: T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` of the size passed; the kernel checks
    // that `fd` is a socket and that the size fits the option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and describe an int-sized buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attributes of a config message: (type, value), in order.
    fn attributes(message: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut rest = &message[20..];
        let mut found = Vec::new();
        while rest.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
            found.push((
                u16::from_ne_bytes([rest[2], rest[3]]),
                rest[4..len].to_vec(),
            ));
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        found
    }

    #[test]
    fn one_config_message_binds_and_sets_up_the_queue() {
        let message = config_message(0x0102, true);
        let u16_at = |at: usize| u16::from_ne_bytes([message[at], message[at + 1]]);
        assert_eq!(
            u32::from_ne_bytes(message[0..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(
            u16_at(4),
            0x0302,
            "NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG"
        );
        assert_eq!(u16_at(6), 5, "a request to be answered");
        assert_eq!(&message[8..12], &CONFIG_SEQUENCE.to_ne_bytes());
        assert_eq!(
            &message[16..20],
            &[0, 0, 1, 2],
            "the queue in network order"
        );
        assert_eq!(
            attributes(&message),
            [
                (NFQA_CFG_CMD, vec![1, 0, 0, 0]),
                (NFQA_CFG_PARAMS, vec![0, 0, 6, 64, 2]),
                (NFQA_CFG_QUEUE_MAXLEN, 8192u32.to_be_bytes().to_vec()),
                (NFQA_CFG_FLAGS, vec![0, 0, 0, 1]),
                (NFQA_CFG_MASK, vec![0, 0, 0, 1]),
            ]
        );
        let closed = attributes(&config_message(0, false));
        assert_eq!(closed[3], (NFQA_CFG_FLAGS, vec![0; 4]), "fail closed");
        assert_eq!(closed[4], (NFQA_CFG_MASK, vec![0, 0, 0, 1]), "and say so");
    }
}
