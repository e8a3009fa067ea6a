//! Packet bytes (starting at the IP header, as NFQUEUE delivers them) to
//! the facts the engine decides on.

use std::net::IpAddr;

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};

use crate::engine::Syn;

/// Reads the source address and TCP destination port. The packet may be cut
/// short by the queue's copy range: only the headers are needed. `None` when
/// the bytes are not TCP over IPv4 or IPv6.
pub fn parse_syn(packet: &[u8]) -> Option<Syn> {
    let sliced = LaxSlicedPacket::from_ip(packet).ok()?;
    let src = match sliced.net? {
        LaxNetSlice::Ipv4(ip) => IpAddr::V4(ip.header().source_addr()),
        LaxNetSlice::Ipv6(ip) => IpAddr::V6(ip.header().source_addr()),
        LaxNetSlice::Arp(_) => return None,
    };
    match sliced.transport? {
        TransportSlice::Tcp(tcp) => Some(Syn {
            src,
            dst_port: tcp.destination_port(),
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
        assert_eq!(syn.dst_port, 2222);
    }

    #[test]
    fn reads_ipv6_syn() {
        let src = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let dst = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let bytes = tcp_syn(PacketBuilder::ipv6(src, dst, 64));
        let syn = parse_syn(&bytes).unwrap();
        assert_eq!(syn.src, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(syn.dst_port, 2222);
    }

    #[test]
    fn reads_headers_of_a_packet_cut_by_the_copy_range() {
        let builder = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 22, 1, 64240)
            .syn();
        let mut bytes = Vec::new();
        builder.write(&mut bytes, &[0u8; 400]).unwrap();
        bytes.truncate(128);
        assert_eq!(parse_syn(&bytes).unwrap().dst_port, 22);
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
