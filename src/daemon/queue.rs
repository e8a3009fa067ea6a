//! Opening and configuring one NFQUEUE socket.

use std::collections::HashSet;
use std::io;
use std::os::fd::RawFd;

use nfq::Queue;

use super::worker::RECEIVE_TIMEOUT;

/// Bytes of each packet copied to the daemon: the IP and TCP headers.
const COPY_RANGE: u16 = 128;
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
        let mut queue = Queue::open()?;
        let fd = match netfilter_sockets()?.difference(&before).collect::<Vec<_>>()[..] {
            [&fd] => fd,
            _ => return Err(io::Error::other("cannot find the new netlink socket")),
        };
        queue.bind(num)?;
        // bind() resets the copy range to 64 KiB; headers are all we need.
        queue.set_copy_range(num, COPY_RANGE)?;
        queue.set_queue_max_len(num, QUEUE_MAX_LEN)?;
        queue.set_fail_open(num, fail_open)?;
        // FORCE goes past net.core.rmem_max; it needs CAP_NET_ADMIN, which
        // binding needs too, but fall back rather than fail.
        setsockopt(fd, libc::SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
            .or_else(|_| setsockopt(fd, libc::SO_RCVBUF, RECEIVE_BUFFER_BYTES))?;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: RECEIVE_TIMEOUT.as_micros() as libc::suseconds_t,
        };
        setsockopt(fd, libc::SO_RCVTIMEO, timeout)?;
        Ok((queue, fd))
    };
    setup().map_err(|source| BindError { queue: num, source })
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
