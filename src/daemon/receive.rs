//! Receiving queued packets several at a time: one `recvmmsg` call takes
//! every datagram already waiting (up to [`MAX_BATCH`]), blocking only until
//! the first arrives. The `nfq` crate makes one `recv` per packet; this reads
//! the same socket and parses the netlink messages itself.

use std::io;
use std::os::fd::RawFd;

/// Datagrams received per call at most.
pub const MAX_BATCH: usize = 64;
/// Room per datagram: one queued packet's message with up to
/// [`super::queue::COPY_RANGE`] bytes of the packet and its attributes.
const DATAGRAM_BYTES: usize = 2048;

const NLMSG_HEADER: usize = 16;
const NFGENMSG: usize = 4;
const NLATTR_HEADER: usize = 4;
/// `NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET`.
const QUEUED_PACKET: u16 = 3 << 8;
const NLMSG_ERROR: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_PAYLOAD: u16 = 10;
/// Attribute types carry two flag bits above the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One packet the kernel queued: its id for the verdict, and the copied
/// bytes of the packet (from the IP header), if the message had them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedPacket<'a> {
    pub id: u32,
    pub payload: Option<&'a [u8]>,
}

pub struct Receiver {
    fd: RawFd,
    /// Where the datagrams land; boxed, so the pointers below stay valid.
    buffers: Box<[[u8; DATAGRAM_BYTES]]>,
    _iovecs: Box<[libc::iovec]>,
    /// One per buffer, set up once: each call only updates their lengths.
    headers: Box<[libc::mmsghdr]>,
    /// Datagrams filled by the last call.
    received: usize,
}

impl Receiver {
    pub fn new(fd: RawFd) -> Self {
        let mut buffers = vec![[0; DATAGRAM_BYTES]; MAX_BATCH].into_boxed_slice();
        let mut iovecs: Box<[libc::iovec]> = buffers
            .iter_mut()
            .map(|buffer| libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: DATAGRAM_BYTES,
            })
            .collect();
        let headers = iovecs
            .iter_mut()
            .map(|iovec| {
                // SAFETY: an all-zero mmsghdr is valid (null name, no control).
                let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
                header.msg_hdr.msg_iov = iovec;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        Receiver {
            fd,
            buffers,
            _iovecs: iovecs,
            headers,
            received: 0,
        }
    }

    /// Waits for at least one datagram (up to the socket's receive timeout)
    /// and takes every other one already waiting; returns how many.
    pub fn receive(&mut self) -> io::Result<usize> {
        self.received = 0;
        // SAFETY: every header points to one live iovec, which points to a
        // live buffer of the length it gives; both are boxed and owned here.
        let received = unsafe {
            libc::recvmmsg(
                self.fd,
                self.headers.as_mut_ptr(),
                MAX_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = received as usize;
        Ok(self.received)
    }

    /// The packets of the datagrams the last call received, in order.
    pub fn packets(&self) -> impl Iterator<Item = QueuedPacket<'_>> {
        self.headers[..self.received]
            .iter()
            .zip(self.buffers.iter())
            .flat_map(|(header, buffer)| {
                packets(&buffer[..(header.msg_len as usize).min(DATAGRAM_BYTES)])
            })
    }
}

/// The queued packets in one netlink datagram; other messages (errors
/// about earlier verdicts, for one) are skipped.
pub fn packets(datagram: &[u8]) -> impl Iterator<Item = QueuedPacket<'_>> {
    messages(datagram)
        .filter(|&(kind, _)| kind == QUEUED_PACKET)
        .filter_map(|(_, message)| queued_packet(message))
}

/// The kernel's answer to the request sent with `sequence`, if this datagram
/// has it: 0 for success, else the errno.
pub fn answer(datagram: &[u8], sequence: u32) -> Option<i32> {
    messages(datagram)
        .filter(|&(kind, _)| kind == NLMSG_ERROR)
        .find_map(|(_, message)| {
            // nlmsgerr: the error, then the header of the request answered.
            let error = i32::from_ne_bytes(message.get(16..20)?.try_into().ok()?);
            let answered = u32::from_ne_bytes(message.get(28..32)?.try_into().ok()?);
            (answered == sequence).then_some(-error)
        })
}

/// The netlink messages in one datagram, with their types; the walk stops
/// at a length that does not fit.
fn messages(datagram: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HEADER {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HEADER || len > rest.len() {
            return None;
        }
        let message = &rest[..len];
        rest = rest.get(align(len)..).unwrap_or(&[]);
        Some((kind, message))
    })
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A packet message's id and payload; `None` without a packet header.
fn queued_packet(message: &[u8]) -> Option<QueuedPacket<'_>> {
    let mut attributes = message.get(NLMSG_HEADER + NFGENMSG..)?;
    let mut id = None;
    let mut payload = None;
    while attributes.len() >= NLATTR_HEADER {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
        if len < NLATTR_HEADER || len > attributes.len() {
            break;
        }
        let value = &attributes[NLATTR_HEADER..len];
        match kind {
            // nfqnl_msg_packet_hdr: the id first, in network order.
            NFQA_PACKET_HDR if value.len() >= 4 => {
                id = Some(u32::from_be_bytes(value[..4].try_into().expect("4 bytes")))
            }
            NFQA_PAYLOAD => payload = Some(value),
            _ => {}
        }
        attributes = attributes.get(align(len)..).unwrap_or(&[]);
    }
    Some(QueuedPacket { id: id?, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((NLATTR_HEADER + value.len()) as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(align(bytes.len()), 0);
        bytes
    }

    fn message(kind: u16, attributes: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attributes.concat();
        let len = NLMSG_HEADER + NFGENMSG + body.len();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&[0; 10]); // flags, sequence, port id
        bytes.extend_from_slice(&[2, 0, 0, 0]); // AF_INET, version 0, queue 0
        bytes.extend_from_slice(&body);
        bytes
    }

    fn packet_header(id: u32) -> Vec<u8> {
        // id, hw_protocol 0x0800, hook 1 (input), padding.
        let mut value = id.to_be_bytes().to_vec();
        value.extend_from_slice(&[0x08, 0x00, 1]);
        attribute(NFQA_PACKET_HDR, &value)
    }

    #[test]
    fn packets_are_read_in_order_with_their_payloads() {
        let mark = attribute(3, &7u32.to_be_bytes());
        let mut datagram = message(
            QUEUED_PACKET,
            &[
                packet_header(41),
                mark,
                attribute(NFQA_PAYLOAD, b"\x45abcde"),
            ],
        );
        // A nested-flag bit on the type does not hide the payload.
        datagram.extend(message(
            QUEUED_PACKET,
            &[
                packet_header(42),
                attribute(NFQA_PAYLOAD | 0x4000, b"\x60xyz"),
            ],
        ));
        let packets: Vec<_> = packets(&datagram).collect();
        assert_eq!(
            packets,
            [
                QueuedPacket {
                    id: 41,
                    payload: Some(b"\x45abcde")
                },
                QueuedPacket {
                    id: 42,
                    payload: Some(b"\x60xyz")
                },
            ]
        );
    }

    /// The kernel's answer to a request with `sequence`: nlmsgerr.
    fn answer_to(sequence: u32, errno: i32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&36u32.to_ne_bytes());
        bytes.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        bytes.extend_from_slice(&[0; 10]);
        bytes.extend_from_slice(&(-errno).to_ne_bytes());
        // The request's header: length, type, flags, sequence, port id.
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes
    }

    #[test]
    fn the_answer_to_a_request_is_found_by_its_sequence() {
        // A packet queued before the answer, then an error about a verdict
        // (sequence 0), then the answer.
        let mut datagram = message(QUEUED_PACKET, &[packet_header(3)]);
        datagram.extend(answer_to(0, libc::ENOENT));
        assert_eq!(answer(&datagram, 1), None);
        assert_eq!(answer(&datagram, 0), Some(libc::ENOENT));
        datagram.extend(answer_to(1, 0));
        assert_eq!(answer(&datagram, 1), Some(0));
        assert_eq!(answer(&answer_to(1, libc::EBUSY), 1), Some(libc::EBUSY));
        assert_eq!(packets(&datagram).map(|p| p.id).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn other_messages_and_broken_ones_are_skipped() {
        // An error message about an earlier verdict, then a packet.
        let mut datagram = message(2, &[attribute(1, &[0; 16])]);
        datagram.extend(message(QUEUED_PACKET, &[packet_header(7)]));
        assert_eq!(
            packets(&datagram).collect::<Vec<_>>(),
            [QueuedPacket {
                id: 7,
                payload: None
            }]
        );
        // No packet header: no id to answer, nothing to return.
        let no_header = message(QUEUED_PACKET, &[attribute(NFQA_PAYLOAD, b"x")]);
        assert_eq!(packets(&no_header).count(), 0);
        // Lengths past the end, or too short to be a header, stop the walk.
        let mut cut = message(QUEUED_PACKET, &[packet_header(8)]);
        cut.truncate(cut.len() - 3);
        assert_eq!(packets(&cut).count(), 0);
        assert_eq!(packets(&[0xff; 7]).count(), 0);
        let mut zero_length = message(QUEUED_PACKET, &[packet_header(9)]);
        zero_length[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(packets(&zero_length).count(), 0);
    }
}
