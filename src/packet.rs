//! Packet bytes to the facts the engine decides on: from NFQUEUE (starting
//! at the IP header) and from capture files (starting at a link header).

use std::net::IpAddr;

use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};

use crate::engine::Syn;
use crate::flow::FlowPort;

/// Reads the source address and TCP destination port of a queued packet.
/// The packet may be cut short by the queue's copy range: only the headers
/// are needed. `None` when the bytes are not TCP over IPv4 or IPv6.
pub fn parse_syn(packet: &[u8]) -> Option<Syn> {
    let tcp = tcp_facts(LaxSlicedPacket::from_ip(packet).ok()?)?;
    Some(tcp.syn())
}

/// The TCP header facts of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFacts {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub syn: bool,
    pub ack: bool,
}

impl TcpFacts {
    /// A connection attempt: SYN without ACK.
    pub fn is_syn(&self) -> bool {
        self.syn && !self.ack
    }

    pub fn syn(&self) -> Syn {
        Syn {
            src: self.src,
            dst_port: FlowPort::tcp(self.dst_port),
        }
    }
}

/// Link-layer framing of captured packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Ethernet,
    /// Linux cooked capture v1 (tcpdump -i any).
    LinuxSll,
    /// Linux cooked capture v2.
    LinuxSll2,
    /// No link header: the packet starts with IPv4 or IPv6.
    RawIp,
}

/// Reads a captured frame. `None` when it is not TCP over IPv4 or IPv6.
pub fn parse_frame(link: Link, frame: &[u8]) -> Option<TcpFacts> {
    let ether_type = |at: usize| {
        Some(EtherType(u16::from_be_bytes(
            frame.get(at..at + 2)?.try_into().ok()?,
        )))
    };
    let sliced = match link {
        Link::Ethernet => LaxSlicedPacket::from_ethernet(frame).ok()?,
        Link::LinuxSll => LaxSlicedPacket::from_ether_type(ether_type(14)?, frame.get(16..)?),
        Link::LinuxSll2 => LaxSlicedPacket::from_ether_type(ether_type(0)?, frame.get(20..)?),
        Link::RawIp => LaxSlicedPacket::from_ip(frame).ok()?,
    };
    tcp_facts(sliced)
}

fn tcp_facts(sliced: LaxSlicedPacket) -> Option<TcpFacts> {
    let (src, dst) = match sliced.net? {
        LaxNetSlice::Ipv4(ip) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
        ),
        LaxNetSlice::Ipv6(ip) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
        ),
        LaxNetSlice::Arp(_) => return None,
    };
    match sliced.transport? {
        TransportSlice::Tcp(tcp) => Some(TcpFacts {
            src,
            dst,
            dst_port: tcp.destination_port(),
            syn: tcp.syn(),
            ack: tcp.ack(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn tcp_syn(builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>) -> Vec<u8> {
        let builder = builder.tcp(40000, 2222, 1, 64240).syn();
        let mut bytes = Vec::with_capacity(builder.size(0));
        builder.write(&mut bytes, &[]).unwrap();
        bytes
    }

    #[test]
    fn reads_ipv4_syn() {
        let bytes = tcp_syn(PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64));
        let syn = parse_syn(&bytes).unwrap();
        assert_eq!(syn.src, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(syn.dst_port, FlowPort::tcp(2222));
    }

    #[test]
    fn reads_ipv6_syn() {
        let src = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let dst = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let bytes = tcp_syn(PacketBuilder::ipv6(src, dst, 64));
        let syn = parse_syn(&bytes).unwrap();
        assert_eq!(syn.src, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(syn.dst_port, FlowPort::tcp(2222));
    }

    #[test]
    fn reads_headers_of_a_packet_cut_by_the_copy_range() {
        let builder = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 22, 1, 64240)
            .syn();
        let mut bytes = Vec::new();
        builder.write(&mut bytes, &[0u8; 400]).unwrap();
        bytes.truncate(128);
        assert_eq!(parse_syn(&bytes).unwrap().dst_port, FlowPort::tcp(22));
    }

    #[test]
    fn reads_frames_of_every_supported_link_type() {
        let ip = tcp_syn(PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64));
        let mut ethernet = vec![0u8; 12];
        ethernet.extend([0x08, 0x00]);
        ethernet.extend(&ip);
        let mut sll = vec![0u8; 14];
        sll.extend([0x08, 0x00]);
        sll.extend(&ip);
        let mut sll2 = vec![0x08, 0x00];
        sll2.extend([0u8; 18]);
        sll2.extend(&ip);
        let want = TcpFacts {
            src: "10.0.0.2".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            dst_port: 2222,
            syn: true,
            ack: false,
        };
        for (link, frame) in [
            (Link::Ethernet, ethernet),
            (Link::LinuxSll, sll),
            (Link::LinuxSll2, sll2),
            (Link::RawIp, ip),
        ] {
            assert_eq!(parse_frame(link, &frame), Some(want), "{link:?}");
            assert_eq!(parse_frame(link, &frame[..10]), None, "{link:?} cut short");
        }
        assert!(want.is_syn());
    }

    #[test]
    fn refuses_udp_and_garbage() {
        let builder = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64).udp(5000, 9);
        let mut udp = Vec::new();
        builder.write(&mut udp, b"x").unwrap();
        assert_eq!(parse_syn(&udp), None);
        assert_eq!(parse_syn(&[]), None);
        assert_eq!(parse_syn(&[0x45, 0, 0]), None);
        assert_eq!(parse_syn(&[0x60; 30]), None);
    }
}
