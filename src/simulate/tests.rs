//! Simulations over captures these tests write themselves.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use etherparse::PacketBuilder;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::DataLink;

use super::capture::{self, CaptureError};
use super::sweep::{self, Order};
use super::*;
use crate::engine::tests::SSH;
use crate::flow::FlowPort;
use crate::loader;

/// Capture time of the first packet, seconds from the epoch.
const T0: f64 = 1_790_000_000.0;
const GATE: &str = "10.9.0.1";

/// One SYN (or SYN-ACK) of a test capture: seconds after T0, source, port.
struct Syn(f64, &'static str, u16);

fn frame(src: &str, dst_port: u16, ack: bool) -> Vec<u8> {
    let builder = match (
        src.parse::<IpAddr>().unwrap(),
        GATE.parse::<IpAddr>().unwrap(),
    ) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(s.octets(), d.octets(), 64)
        }
        (IpAddr::V6(s), _) => {
            let d: std::net::Ipv6Addr = "fd09::1".parse().unwrap();
            PacketBuilder::ethernet2([2; 6], [4; 6]).ipv6(s.octets(), d.octets(), 64)
        }
        _ => unreachable!(),
    };
    let mut tcp = builder.tcp(40000, dst_port, 1, 64240).syn();
    if ack {
        tcp = tcp.ack(1);
    }
    let mut bytes = Vec::new();
    tcp.write(&mut bytes, &[]).unwrap();
    bytes
}

fn pcap(syns: &[Syn]) -> Vec<u8> {
    let header = PcapHeader {
        datalink: DataLink::ETHERNET,
        ..Default::default()
    };
    let mut writer = PcapWriter::with_header(Vec::new(), header).unwrap();
    for Syn(at, src, port) in syns {
        let data = frame(src, *port, false);
        let time = Duration::from_secs_f64(T0 + at);
        writer
            .write_packet(&PcapPacket::new(time, data.len() as u32, &data))
            .unwrap();
    }
    writer.into_writer()
}

fn run(text: &str, capture_bytes: &[u8], options: &Options) -> Report {
    let config = loader::parse(text, Path::new("knockq.toml")).unwrap();
    let capture = capture::parse(capture_bytes, Path::new("capture.pcap")).unwrap();
    simulate(&config, "knockq.toml", &capture.packets, options)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn a_clean_knock_and_connect() {
    let report = run(
        SSH,
        &pcap(&[
            Syn(0.0, "10.9.0.2", 1111),
            Syn(1.0, "10.9.0.2", 2222),
            Syn(1.5, "10.9.0.2", 22),
        ]),
        &Options::default(),
    );
    let ssh = &report.policies[0];
    assert_eq!(ssh.granted.len(), 1);
    assert_eq!(ssh.granted[0].source, ip("10.9.0.2"));
    assert!((ssh.granted[0].at - (T0 + 1.0)).abs() < 1e-3);
    assert_eq!(ssh.granted[0].knocks, 2);
    assert!(ssh.incomplete.is_empty());
    assert_eq!((ssh.open_port_accepted, ssh.open_port_refused), (1, 0));
    assert_eq!(report.verdicts["accept/granted"], 1);
    assert_eq!(report.verdicts["reject/knock"], 2);
}

#[test]
fn a_slow_knock_misses_the_window() {
    let report = run(
        SSH,
        &pcap(&[
            Syn(0.0, "10.9.0.2", 1111),
            Syn(11.0, "10.9.0.2", 2222),
            Syn(12.0, "10.9.0.2", 22),
        ]),
        &Options::default(),
    );
    let ssh = &report.policies[0];
    assert!(ssh.granted.is_empty());
    assert_eq!(ssh.incomplete.len(), 1);
    assert_eq!(ssh.incomplete[0].why, Why::Timeout);
    assert_eq!((ssh.open_port_accepted, ssh.open_port_refused), (0, 1));
}

#[test]
fn retransmitted_knocks_still_open() {
    let syns = [
        Syn(0.0, "10.9.0.2", 1111),
        Syn(1.0, "10.9.0.2", 1111),
        Syn(2.0, "10.9.0.2", 2222),
        Syn(3.0, "10.9.0.2", 2222),
        Syn(3.1, "10.9.0.2", 22),
    ];
    let options = Options {
        timeline: true,
        ..Default::default()
    };
    let report = run(SSH, &pcap(&syns), &options);
    assert_eq!(report.policies[0].granted[0].knocks, 3);
    let changes: Vec<&str> = report.timeline.iter().map(|c| c.change.as_str()).collect();
    assert_eq!(
        changes,
        ["knock 1/2", "duplicate knock", "grant", "duplicate knock"]
    );
}

#[test]
fn an_interleaved_scan_resets_and_wrong_order_is_named() {
    let three = "[[policy]]\nname = \"three\"\nsequence = [1, 2, 3]\nallow_weak_sequence = true\nopen_ports = [22]\n";
    let syns = [
        Syn(0.0, "10.9.0.2", 1),
        Syn(0.1, "10.9.0.2", 80),
        Syn(0.2, "10.9.0.2", 2),
        Syn(0.0, "10.9.0.3", 1),
        Syn(0.1, "10.9.0.3", 3),
        Syn(0.0, "10.9.0.4", 1),
    ];
    let report = run(three, &pcap(&syns), &Options::default());
    let whys: Vec<(IpAddr, Why)> = report.policies[0]
        .incomplete
        .iter()
        .map(|i| (i.source, i.why))
        .collect();
    assert_eq!(
        whys,
        [
            (
                ip("10.9.0.2"),
                Why::ResetByOtherPort {
                    port: FlowPort::tcp(80)
                }
            ),
            (
                ip("10.9.0.3"),
                Why::WrongOrder {
                    port: FlowPort::tcp(3)
                }
            ),
            (ip("10.9.0.4"), Why::KnockingAtEnd),
        ]
    );
}

#[test]
fn ipv6_sources_and_syn_acks() {
    let mut bytes = pcap(&[Syn(0.0, "fd09::2", 1111), Syn(0.5, "fd09::2", 2222)]);
    // A SYN-ACK is not a connection attempt: the gate never sees it.
    let mut writer = PcapWriter::with_header(Vec::new(), PcapHeader::default()).unwrap();
    let data = frame("fd09::3", 1111, true);
    writer
        .write_packet(&PcapPacket::new(
            Duration::from_secs_f64(T0),
            data.len() as u32,
            &data,
        ))
        .unwrap();
    bytes.extend_from_slice(&writer.into_writer()[24..]);
    let report = run(SSH, &bytes, &Options::default());
    assert_eq!(report.new_flows, 2);
    assert_eq!(report.policies[0].granted[0].source, ip("fd09::2"));
}

fn pcapng(syns: &[Syn], resolution: Option<u8>) -> Vec<u8> {
    let mut writer = PcapNgWriter::new(Vec::new()).unwrap();
    let options = resolution
        .map(InterfaceDescriptionOption::IfTsResol)
        .into_iter()
        .collect();
    writer
        .write_pcapng_block(InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: 0,
            options,
        })
        .unwrap();
    let ticks_per_second = 10f64.powi(i32::from(resolution.unwrap_or(6)));
    for Syn(at, src, port) in syns {
        let data = frame(src, *port, false);
        let ticks = ((T0 + at) * ticks_per_second) as u64;
        writer
            .write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                // pcap-file stores this tick count as is.
                timestamp: Duration::from_nanos(ticks),
                original_len: data.len() as u32,
                data: Cow::Owned(data),
                options: vec![],
            })
            .unwrap();
    }
    writer.into_inner()
}

#[test]
fn pcapng_timestamps_follow_the_interface_resolution() {
    let syns = [Syn(0.0, "10.9.0.2", 1111), Syn(9.0, "10.9.0.2", 2222)];
    for resolution in [None, Some(9), Some(3)] {
        let report = run(SSH, &pcapng(&syns, resolution), &Options::default());
        let granted = &report.policies[0].granted;
        assert_eq!(granted.len(), 1, "resolution {resolution:?}");
        assert!(
            (granted[0].at - (T0 + 9.0)).abs() < 1e-3,
            "resolution {resolution:?}: {}",
            granted[0].at
        );
    }
    // Eleven seconds apart in microseconds is not eleven milliseconds.
    let late = [Syn(0.0, "10.9.0.2", 1111), Syn(11.0, "10.9.0.2", 2222)];
    let report = run(SSH, &pcapng(&late, None), &Options::default());
    assert_eq!(report.policies[0].incomplete[0].why, Why::Timeout);
}

#[test]
fn linux_cooked_captures_are_read() {
    let header = PcapHeader {
        datalink: DataLink::LINUX_SLL,
        ..Default::default()
    };
    let mut writer = PcapWriter::with_header(Vec::new(), header).unwrap();
    for (at, port) in [(0.0, 1111), (1.0, 2222)] {
        let mut data = vec![0u8; 14];
        data.extend([0x08, 0x00]);
        data.extend(&frame("10.9.0.2", port, false)[14..]);
        writer
            .write_packet(&PcapPacket::new(
                Duration::from_secs_f64(T0 + at),
                data.len() as u32,
                &data,
            ))
            .unwrap();
    }
    let report = run(SSH, &writer.into_writer(), &Options::default());
    assert_eq!(report.policies[0].granted.len(), 1);
}

#[test]
fn a_cut_off_capture_keeps_its_complete_records() {
    let full = pcap(&[
        Syn(0.0, "10.9.0.2", 1111),
        Syn(1.0, "10.9.0.2", 2222),
        Syn(2.0, "10.9.0.2", 22),
    ]);
    let cut = &full[..full.len() - 10];
    let capture = capture::parse(cut, Path::new("cut.pcap")).unwrap();
    assert_eq!(capture.packets.len(), 2);
    let record = (full.len() - 24) / 3;
    assert_eq!(
        capture.cut_at,
        Some((24 + 2 * record, "the last record is incomplete".to_owned()))
    );
    assert_eq!(
        capture::parse(&full, Path::new("full.pcap"))
            .unwrap()
            .cut_at,
        None
    );
}

#[test]
fn files_that_are_not_captures_are_refused() {
    let err =
        capture::parse(b"[[policy]]\nname = \"ssh\"\n", Path::new("knockq.toml")).unwrap_err();
    assert_eq!(err.to_string(), "knockq.toml: not a pcap or pcapng capture");
    let header = PcapHeader {
        datalink: DataLink::PPP,
        ..Default::default()
    };
    let ppp = PcapWriter::with_header(Vec::new(), header)
        .unwrap()
        .into_writer();
    let err = capture::parse(&ppp, Path::new("ppp.pcap")).unwrap_err();
    assert!(matches!(err, CaptureError::UnsupportedLink { .. }));
    assert_eq!(
        err.to_string(),
        "ppp.pcap: link type PPP is not supported (Ethernet, Linux cooked SLL/SLL2, raw IP are)"
    );
}

#[test]
fn two_configurations_side_by_side() {
    let syns = pcap(&[
        Syn(0.0, "10.9.0.2", 1111),
        Syn(7.0, "10.9.0.2", 2222),
        Syn(7.5, "10.9.0.2", 22),
    ]);
    let short = SSH.replace("\"10s\"", "\"5s\"");
    let mut first = run(&short, &syns, &Options::default());
    first.config = "short.toml".into();
    let second = run(SSH, &syns, &Options::default());
    let csv = report::csv(&[first.clone(), second.clone()]);
    assert!(csv.starts_with("measure,short.toml,knockq.toml\n"), "{csv}");
    assert!(csv.contains("\nssh: sources granted,0,1\n"), "{csv}");
    assert!(csv.contains("\nssh: incomplete (timeout),1,0\n"), "{csv}");
    assert!(
        csv.contains("\nssh: open-port SYNs accepted,0,1\n"),
        "{csv}"
    );
    let text = report::text(&[first, second]);
    assert!(
        text.contains("\nssh: sources granted                              0            1\n"),
        "{text}"
    );
}

fn sweep_results(text: &str) -> Vec<(Order, Option<u64>)> {
    let config = loader::parse(text, Path::new("knockq.toml")).unwrap();
    sweep::sweep(&config, Duration::from_millis(1))
        .into_iter()
        .map(|r| (r.order, r.granted_at_probe))
        .collect()
}

#[test]
fn full_sweeps_never_walk_through_a_strict_policy() {
    assert_eq!(
        sweep_results(SSH),
        [
            (Order::Ascending, None),
            (Order::Descending, None),
            (Order::Random, None)
        ]
    );
}

#[test]
fn an_ascending_sweep_walks_through_a_lenient_ascending_sequence() {
    let lenient = SSH.replace("close_port", "strict = false\nclose_port");
    let results = sweep_results(&lenient);
    assert_eq!(results[0], (Order::Ascending, Some(2222)));
    assert_eq!(results[1], (Order::Descending, None));
}

/// The seed example with its script beside it, as `simulate` loads it.
fn seed_script_config() -> Config {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
    loader::load(&dir.join("seed.toml")).unwrap()
}

#[test]
fn the_seed_script_simulates_like_the_built_in_policy() {
    let syns = pcap(&[
        Syn(0.0, "10.9.0.2", 1111),
        Syn(1.0, "10.9.0.2", 2222),
        Syn(1.5, "10.9.0.2", 22),
        Syn(2.0, "10.9.0.3", 1111),
        Syn(2.5, "10.9.0.3", 80),
        Syn(3.0, "10.9.0.3", 2222),
        Syn(4.0, "10.9.0.4", 1111),
        Syn(20.0, "10.9.0.4", 2222),
        Syn(21.0, "10.9.0.2", 3333),
        Syn(21.5, "10.9.0.2", 22),
        Syn(22.0, "fd09::2", 1111),
        Syn(22.1, "fd09::2", 1111),
        Syn(22.2, "fd09::2", 2222),
        Syn(22.3, "fd09::2", 8080),
    ]);
    let capture = capture::parse(&syns, Path::new("capture.pcap")).unwrap();
    let options = Options {
        verdicts: true,
        ..Options::default()
    };
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/knockq.toml");
    let builtin = loader::load(&example).unwrap();
    let builtin = simulate(&builtin, "knockq.toml", &capture.packets, &options);
    let script = simulate(
        &seed_script_config(),
        "seed.toml",
        &capture.packets,
        &options,
    );
    let verdicts = |report: &Report| -> Vec<(IpAddr, FlowPort, &'static str)> {
        report
            .packets
            .iter()
            .map(|p| (p.source, p.dst_port, p.verdict))
            .collect()
    };
    assert_eq!(verdicts(&script), verdicts(&builtin));
    let granted = |report: &Report| -> Vec<IpAddr> {
        report.policies[0]
            .granted
            .iter()
            .map(|g| g.source)
            .collect()
    };
    assert_eq!(granted(&script), [ip("10.9.0.2"), ip("fd09::2")]);
    assert_eq!(granted(&script), granted(&builtin));
    let whys = |report: &Report| -> Vec<(IpAddr, Why)> {
        report.policies[0]
            .incomplete
            .iter()
            .map(|i| (i.source, i.why))
            .collect()
    };
    assert_eq!(whys(&script), whys(&builtin));
    // A replay of the same capture gives the same answers every time.
    let again = simulate(
        &seed_script_config(),
        "seed.toml",
        &capture.packets,
        &options,
    );
    assert_eq!(verdicts(&again), verdicts(&script));
}

#[test]
fn full_sweeps_never_walk_through_the_seed_script() {
    let results: Vec<_> = sweep::sweep(&seed_script_config(), Duration::from_millis(1))
        .into_iter()
        .map(|r| (r.order, r.granted_at_probe))
        .collect();
    assert_eq!(
        results,
        [
            (Order::Ascending, None),
            (Order::Descending, None),
            (Order::Random, None)
        ]
    );
}

/// A UDP datagram of a test capture: seconds after T0, source and port,
/// destination and port.
struct Datagram(f64, &'static str, u16, &'static str, u16);

fn udp_pcap(datagrams: &[Datagram]) -> Vec<u8> {
    let header = PcapHeader {
        datalink: DataLink::ETHERNET,
        ..Default::default()
    };
    let mut writer = PcapWriter::with_header(Vec::new(), header).unwrap();
    for &Datagram(at, src, src_port, dst, dst_port) in datagrams {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (ip(src), ip(dst)) else {
            unreachable!("IPv4 only")
        };
        let builder = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(s.octets(), d.octets(), 64)
            .udp(src_port, dst_port);
        let mut data = Vec::new();
        builder.write(&mut data, b"x").unwrap();
        let time = Duration::from_secs_f64(T0 + at);
        writer
            .write_packet(&PcapPacket::new(time, data.len() as u32, &data))
            .unwrap();
    }
    writer.into_writer()
}

#[test]
fn udp_datagrams_are_decided_once_per_flow_as_conntrack_keeps_them() {
    let wireguard = "[[policy]]\nname = \"wg\"\nsequence = [\"7000/udp\", \"8000/udp\"]\n\
                     open_ports = [\"51820/udp\"]\n";
    let capture = udp_pcap(&[
        // A stranger's handshake, rejected: its retry is a new flow again.
        Datagram(0.0, "10.9.0.3", 40000, GATE, 51820),
        Datagram(1.0, "10.9.0.3", 40000, GATE, 51820),
        // DNS and other UDP the rules never queue.
        Datagram(1.5, "10.9.0.2", 40001, GATE, 53),
        Datagram(2.0, "10.9.0.2", 40002, GATE, 7000),
        Datagram(2.5, "10.9.0.2", 40003, GATE, 8000),
        // Accepted, without a reply yet: the next datagram is new again.
        Datagram(3.0, "10.9.0.2", 40004, GATE, 51820),
        Datagram(3.05, "10.9.0.2", 40004, GATE, 51820),
        // The reply: the later datagrams are not new.
        Datagram(3.1, GATE, 51820, "10.9.0.2", 40004),
        Datagram(60.0, "10.9.0.2", 40004, GATE, 51820),
        // Idle past the replied flow's 120 s: new again, still granted.
        Datagram(200.0, "10.9.0.2", 40004, GATE, 51820),
    ]);
    let options = Options {
        verdicts: true,
        ..Options::default()
    };
    let report = run(wireguard, &capture, &options);
    let verdicts: Vec<(String, FlowPort, &str)> = report
        .packets
        .iter()
        .map(|p| (p.source.to_string(), p.dst_port, p.reason))
        .collect();
    let want = [
        ("10.9.0.3", 51820, "no_grant"),
        ("10.9.0.3", 51820, "no_grant"),
        ("10.9.0.2", 7000, "knock"),
        ("10.9.0.2", 8000, "knock"),
        ("10.9.0.2", 51820, "granted"),
        ("10.9.0.2", 51820, "granted"),
        ("10.9.0.2", 51820, "granted"),
    ]
    .map(|(src, port, reason)| (src.to_owned(), FlowPort::udp(port), reason));
    assert_eq!(verdicts, want);
    assert_eq!(report.new_flows, 7);
}

#[test]
fn spa_captures_replay_with_the_key_files_as_the_gate_decided_them() {
    use std::os::unix::fs::PermissionsExt;
    // fwknop's own packet for alice at 10.0.0.2, made at Unix 1796653647.
    let testdata = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/spa/");
    let keys = std::fs::read_to_string(format!("{testdata}fwknop-keys.txt")).unwrap();
    let packet = std::fs::read_to_string(format!("{testdata}alice-access.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (file, field) in [
        ("alice.key", "KEY_BASE64:"),
        ("alice.hmac", "HMAC_KEY_BASE64:"),
    ] {
        let line = keys.lines().find(|l| l.starts_with(field)).unwrap();
        let path = dir.path().join(file);
        std::fs::write(&path, line.split_once(' ').unwrap().1).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let text = format!(
        "[[policy]]\nname = \"spa\"\nopen_ports = [22]\ngrant_timeout = \"30s\"\n[policy.spa]\n\
         [[policy.spa.user]]\nname = \"alice\"\nkey_file = \"{d}/alice.key\"\nhmac_key_file = \"{d}/alice.hmac\"\n",
        d = dir.path().display()
    );
    let made = 1_796_653_647.0;
    let header = PcapHeader {
        datalink: DataLink::ETHERNET,
        ..Default::default()
    };
    let mut writer = PcapWriter::with_header(Vec::new(), header).unwrap();
    let mut add = |at: f64, src: [u8; 4], data: &[u8], tcp: bool| {
        let ip = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(src, [10, 0, 0, 1], 64);
        let mut bytes = Vec::new();
        match tcp {
            true => ip
                .tcp(40000, 22, 1, 64240)
                .syn()
                .write(&mut bytes, &[])
                .unwrap(),
            false => ip.udp(40000, 62201).write(&mut bytes, data).unwrap(),
        }
        let time = Duration::from_secs_f64(made + at);
        writer
            .write_packet(&PcapPacket::new(time, bytes.len() as u32, &bytes))
            .unwrap();
    };
    let datagram = packet.trim_end().as_bytes();
    add(1.0, [10, 0, 0, 2], &[], true);
    add(2.0, [10, 0, 0, 2], datagram, false);
    add(2.001, [10, 0, 0, 2], &[], true);
    // The same packet again, and from elsewhere.
    add(3.0, [10, 0, 0, 2], datagram, false);
    add(4.0, [10, 0, 0, 9], datagram, false);
    add(4.001, [10, 0, 0, 9], &[], true);
    let capture = writer.into_writer();
    let options = Options {
        verdicts: true,
        ..Options::default()
    };
    let report = run(&text, &capture, &options);
    let verdicts: Vec<(String, &str)> = report
        .packets
        .iter()
        .map(|p| (p.source.to_string(), p.reason))
        .collect();
    let want = [
        ("10.0.0.2", "no_grant"),
        ("10.0.0.2", "spa"),
        ("10.0.0.2", "granted"),
        ("10.0.0.2", "spa"),
        ("10.0.0.9", "spa"),
        ("10.0.0.9", "no_grant"),
    ]
    .map(|(src, reason)| (src.to_owned(), reason));
    assert_eq!(verdicts, want);
}
