//! Packet bytes to the facts the engine decides on: from NFQUEUE (starting
//! at the IP header) and from capture files (starting at a link header).

use std::net::IpAddr;

use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};

use crate::engine::NewFlow;
use crate::flow::{FlowPort, Proto};

/// Reads the source address and destination port of a queued new flow: a
/// TCP segment or a UDP datagram. The packet may be cut short by the
/// queue's copy range: only the headers are needed. `None` when the bytes
/// are neither TCP nor UDP over IPv4 or IPv6, or the transport header is
/// cut short or sits in a later fragment.
pub fn parse_new_flow(packet: &[u8]) -> Option<NewFlow> {
    let flow = flow_facts(LaxSlicedPacket::from_ip(packet).ok()?)?;
    Some(flow.new_flow())
}

/// The transport header facts of a TCP segment or UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowFacts {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: FlowPort,
    /// TCP flags; false for UDP.
    pub syn: bool,
    pub ack: bool,
}

impl FlowFacts {
    /// A TCP connection attempt: SYN without ACK.
    pub fn is_syn(&self) -> bool {
        self.dst_port.proto() == Proto::Tcp && self.syn && !self.ack
    }

    pub fn new_flow(&self) -> NewFlow {
        NewFlow {
            src: self.src,
            dst_port: self.dst_port,
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

/// Reads a captured frame. `None` when it is not TCP or UDP over IPv4 or
/// IPv6.
pub fn parse_frame(link: Link, frame: &[u8]) -> Option<FlowFacts> {
    flow_facts(slice_frame(link, frame)?)
}

/// The data a UDP datagram carries, from a packet that starts at the IP
/// header (an SPA port reads it); empty for anything else.
pub fn datagram_payload(packet: &[u8]) -> &[u8] {
    LaxSlicedPacket::from_ip(packet).map_or(&[], udp_data)
}

/// The data a captured UDP datagram carries; empty for anything else.
pub fn frame_payload(link: Link, frame: &[u8]) -> &[u8] {
    slice_frame(link, frame).map_or(&[], udp_data)
}

fn udp_data(sliced: LaxSlicedPacket<'_>) -> &[u8] {
    match sliced.transport {
        Some(TransportSlice::Udp(udp)) => udp.payload(),
        _ => &[],
    }
}

fn slice_frame(link: Link, frame: &[u8]) -> Option<LaxSlicedPacket<'_>> {
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
    Some(sliced)
}

fn flow_facts(sliced: LaxSlicedPacket) -> Option<FlowFacts> {
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
    let (src_port, dst_port, syn, ack) = match sliced.transport? {
        TransportSlice::Tcp(tcp) => (
            tcp.source_port(),
            FlowPort::tcp(tcp.destination_port()),
            tcp.syn(),
            tcp.ack(),
        ),
        TransportSlice::Udp(udp) => (
            udp.source_port(),
            FlowPort::udp(udp.destination_port()),
            false,
            false,
        ),
        _ => return None,
    };
    // Port 0 is no service: nothing can listen there.
    (dst_port.number() != 0).then_some(FlowFacts {
        src,
        dst,
        src_port,
        dst_port,
        syn,
        ack,
    })
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
        let syn = parse_new_flow(&bytes).unwrap();
        assert_eq!(syn.src, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(syn.dst_port, FlowPort::tcp(2222));
    }

    #[test]
    fn reads_ipv6_syn() {
        let src = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let dst = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let bytes = tcp_syn(PacketBuilder::ipv6(src, dst, 64));
        let syn = parse_new_flow(&bytes).unwrap();
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
        assert_eq!(parse_new_flow(&bytes).unwrap().dst_port, FlowPort::tcp(22));
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
        let want = FlowFacts {
            src: "10.0.0.2".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            src_port: 40000,
            dst_port: FlowPort::tcp(2222),
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

    fn udp(payload: &[u8], dst_port: u16) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64).udp(5000, dst_port);
        let mut bytes = Vec::new();
        builder.write(&mut bytes, payload).unwrap();
        bytes
    }

    #[test]
    fn reads_a_udp_datagram_as_a_flow_to_a_udp_port() {
        for payload in [&b"x"[..], b""] {
            let flow = parse_new_flow(&udp(payload, 51820)).unwrap();
            assert_eq!(flow.dst_port, FlowPort::udp(51820));
            assert_eq!(flow.src, "10.0.0.2".parse::<IpAddr>().unwrap());
        }
        let facts = parse_frame(Link::RawIp, &udp(b"x", 53)).unwrap();
        assert!(!facts.is_syn());
        assert_eq!(facts.src_port, 5000);
    }

    #[test]
    fn refuses_malformed_udp_and_garbage() {
        let whole = udp(b"x", 53);
        // The IPv4 header is 20 bytes; the UDP header 8 more.
        assert_eq!(parse_new_flow(&whole[..24]), None, "short UDP header");
        let mut later_fragment = whole.clone();
        later_fragment[6] = 0x00;
        later_fragment[7] = 0x10; // fragment offset 16 bytes: no UDP header here
        assert_eq!(parse_new_flow(&later_fragment), None, "later fragment");
        assert_eq!(parse_new_flow(&udp(b"x", 0)), None, "port 0");
        assert_eq!(parse_new_flow(&[]), None);
        assert_eq!(parse_new_flow(&[0x45, 0, 0]), None);
        assert_eq!(parse_new_flow(&[0x60; 30]), None);
    }
}
