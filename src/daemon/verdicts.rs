//! Verdicts for runs of packets in one message. The `nfq` crate sends one
//! verdict message per packet; NFQNL_MSG_VERDICT_BATCH gives one verdict and
//! mark to every packet of the queue up to an id. The worker decides packets
//! in order, so a run of packets with the same verdict costs one send.

use std::io;
use std::os::fd::RawFd;

use crate::engine::Verdict;
use crate::firewall::{ACCEPT_MARK, REJECT_MARK};

pub const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
pub const NLM_F_REQUEST: u16 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_REPEAT: u32 = 4;
/// nlmsghdr (16) + nfgenmsg (4) + verdict attribute (4 + 8) + mark (4 + 4).
pub const MESSAGE_LEN: usize = 40;

/// The batch verdict message giving `verdict` to every packet of `queue`
/// up to and including `last_id`.
pub fn encode(queue: u16, last_id: u32, verdict: Verdict) -> [u8; MESSAGE_LEN] {
    let (code, mark) = match verdict {
        Verdict::Accept => (NF_ACCEPT, ACCEPT_MARK),
        // The reject rule ahead of the queue rule catches the mark.
        Verdict::Reject => (NF_REPEAT, REJECT_MARK),
        Verdict::Drop => (NF_DROP, 0),
    };
    let mut message = [0u8; MESSAGE_LEN];
    // Netlink header, host byte order.
    message[0..4].copy_from_slice(&(MESSAGE_LEN as u32).to_ne_bytes());
    message[4..6]
        .copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH).to_ne_bytes());
    message[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    // nfgenmsg: family unspecified, version 0, the queue in network order.
    message[18..20].copy_from_slice(&queue.to_be_bytes());
    // Attributes: lengths and types in host order, payloads in network order.
    message[20..22].copy_from_slice(&12u16.to_ne_bytes());
    message[22..24].copy_from_slice(&NFQA_VERDICT_HDR.to_ne_bytes());
    message[24..28].copy_from_slice(&code.to_be_bytes());
    message[28..32].copy_from_slice(&last_id.to_be_bytes());
    message[32..34].copy_from_slice(&8u16.to_ne_bytes());
    message[34..36].copy_from_slice(&NFQA_MARK.to_ne_bytes());
    message[36..40].copy_from_slice(&mark.to_be_bytes());
    message
}

/// The current run of same-verdict packets, sent when the verdict changes
/// or on `flush`.
pub struct VerdictBatch {
    fd: RawFd,
    queue: u16,
    run: Option<(u32, Verdict)>,
}

impl VerdictBatch {
    /// `fd` is the netlink socket bound to `queue`, which received the packets.
    pub fn new(fd: RawFd, queue: u16) -> Self {
        VerdictBatch {
            fd,
            queue,
            run: None,
        }
    }

    /// Adds the next packet, in the order received.
    pub fn push(&mut self, id: u32, verdict: Verdict) -> io::Result<()> {
        let result = match self.run {
            Some((_, current)) if current != verdict => self.flush(),
            _ => Ok(()),
        };
        self.run = Some((id, verdict));
        result
    }

    /// Sends the current run. A later batch would cover the ids of a run
    /// whose send failed, with its own verdict: a failed send is retried
    /// before the run is given up.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some((last_id, verdict)) = self.run.take() else {
            return Ok(());
        };
        let message = encode(self.queue, last_id, verdict);
        let mut result = self.send(&message);
        for _ in 0..SEND_ATTEMPTS - 1 {
            if result.is_ok() {
                break;
            }
            result = self.send(&message);
        }
        result
    }

    fn send(&self, message: &[u8; MESSAGE_LEN]) -> io::Result<()> {
        send_to_kernel(self.fd, message)
    }
}

/// Sends one netlink message to the kernel on `fd`.
pub fn send_to_kernel(fd: RawFd, message: &[u8]) -> io::Result<()> {
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `message` and `kernel` are live for the call and their
    // lengths are the ones passed.
    let sent = unsafe {
        libc::sendto(
            fd,
            message.as_ptr().cast(),
            message.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    match sent < 0 {
        true => Err(io::Error::last_os_error()),
        false => Ok(()),
    }
}

/// Tries to send one verdict message before giving it up.
const SEND_ATTEMPTS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_verdict_message_has_the_kernel_layout() {
        let message = encode(3, 0x0102_0304, Verdict::Reject);
        let u16_at = |at: usize| u16::from_ne_bytes([message[at], message[at + 1]]);
        assert_eq!(u32::from_ne_bytes(message[0..4].try_into().unwrap()), 40);
        assert_eq!(
            u16_at(4),
            0x0303,
            "NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT_BATCH"
        );
        assert_eq!(u16_at(6), 1, "a request, no ack");
        assert_eq!(
            &message[8..16],
            &[0; 8],
            "sequence and port id left to the kernel"
        );
        assert_eq!(
            &message[16..20],
            &[0, 0, 0, 3],
            "AF_UNSPEC, version 0, queue 3 big-endian"
        );
        assert_eq!((u16_at(20), u16_at(22)), (12, 2));
        assert_eq!(
            &message[24..32],
            &[0, 0, 0, 4, 1, 2, 3, 4],
            "NF_REPEAT up to id 0x01020304"
        );
        assert_eq!((u16_at(32), u16_at(34)), (8, 3));
        assert_eq!(&message[36..40], &REJECT_MARK.to_be_bytes());
        let accept = encode(0, 7, Verdict::Accept);
        assert_eq!(&accept[24..32], &[0, 0, 0, 1, 0, 0, 0, 7]);
        assert_eq!(&accept[36..40], &ACCEPT_MARK.to_be_bytes());
    }
}
