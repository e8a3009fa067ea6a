//! `knockq simulate` on captures: refused and cut-off files through the CLI,
//! and a capture recorded live whose simulation must give the daemon's own
//! verdicts.

use std::process::{Command, Stdio};
use std::time::Duration;

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};

use crate::util::*;

/// A pcap of SYNs from 10.9.0.2 to `ports`, one second apart.
fn pcap(ports: &[u16]) -> Vec<u8> {
    let mut writer = PcapWriter::with_header(Vec::new(), PcapHeader::default()).unwrap();
    for (i, &port) in ports.iter().enumerate() {
        let builder = etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 9, 0, 2], [10, 9, 0, 1], 64)
            .tcp(40000, port, 1, 64240)
            .syn();
        let mut data = Vec::new();
        builder.write(&mut data, &[]).unwrap();
        let time = Duration::from_secs(1_790_000_000 + i as u64);
        writer
            .write_packet(&PcapPacket::new(time, data.len() as u32, &data))
            .unwrap();
    }
    writer.into_writer()
}

#[test]
fn a_file_that_is_not_a_capture_exits_65() {
    let out = run(knockq().args([
        "simulate",
        "--config",
        "examples/knockq.toml",
        "--pcap",
        "Cargo.toml",
    ]));
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "knockq: Cargo.toml: not a pcap or pcapng capture\n"
    );
}

#[test]
fn a_cut_off_capture_is_simulated_up_to_the_cut_with_a_warning() {
    let dir = tempfile::TempDir::new().unwrap();
    let full = pcap(&[1111, 2222, 22]);
    let path = dir.path().join("cut.pcap");
    std::fs::write(&path, &full[..full.len() - 7]).unwrap();
    let out = run(knockq()
        .args(["simulate", "--config", "examples/knockq.toml", "--pcap"])
        .arg(&path));
    assert!(out.status.success());
    let record = (full.len() - 24) / 3;
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "knockq: warning: {}: cut off at byte {} (the last record is incomplete); simulated the 2 packets before it\n",
            path.display(),
            24 + 2 * record
        )
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("examples/knockq.toml: 2 new flows\n"),
        "{report}"
    );
    assert!(
        report.contains("granted     10.9.0.2 at 2026-09-21T14:13:21.000Z after 2 knocks"),
        "{report}"
    );
}

#[test]
fn two_configs_compare_side_by_side_in_csv() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("walk.pcap");
    std::fs::write(&path, pcap(&[1111, 80, 2222, 22])).unwrap();
    let lenient = dir.path().join("lenient.toml");
    std::fs::write(
        &lenient,
        EXAMPLE_CONFIG.replace("strict = true", "strict = false"),
    )
    .unwrap();
    let out = run(knockq()
        .args([
            "simulate",
            "--format",
            "csv",
            "--config",
            "examples/knockq.toml",
            "--config",
        ])
        .arg(&lenient)
        .arg("--pcap")
        .arg(&path));
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.contains("\nssh: sources granted,0,1\n"), "{csv}");
    assert!(
        csv.contains("\nssh: incomplete (reset by another port),1,0\n"),
        "{csv}"
    );
}

#[test]
fn sweeps_report_whether_a_scan_walks_through() {
    let out = run(knockq().args(["simulate", "--config", "examples/knockq.toml", "--sweep"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "examples/knockq.toml: full-range sweeps from one address, one port every 1ms\n\
         \x20 policy ssh, ascending order: no grant\n\
         \x20 policy ssh, descending order: no grant\n\
         \x20 policy ssh, random order: no grant\n"
    );
}

/// The verdicts the daemon logged at debug level, in order:
/// (source, port, verdict, reason).
fn live_verdicts(log: &str) -> Vec<(String, String, String, String)> {
    log.lines()
        .filter(|line| line.contains(" verdict="))
        .map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                    .unwrap()
                    .to_owned()
            };
            (
                field("src"),
                field("dst_port"),
                field("verdict"),
                field("reason"),
            )
        })
        .collect()
}

#[test]
fn a_recorded_capture_simulates_to_the_live_verdicts() {
    let test = "a_recorded_capture_simulates_to_the_live_verdicts";
    if !can_run_end_to_end(test) || !can_run(test, true, &["tcpdump"]) {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 80]);
    let udp = "\n[[policy]]\nname = \"udp\"\nsequence = [\"7000/udp\", \"8000/udp\"]\n\
               open_ports = [\"5353/udp\"]\n";
    let config = net.config(&format!("{EXAMPLE_CONFIG}{udp}"));
    for backend in DUAL_STACK_RULES {
        net.load_rules(&config, backend);
    }
    let gate = net.start_daemon(&config);
    let capture = net.dir.path().join("live.pcap");
    let tcpdump_log = net.dir.path().join("tcpdump.log");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.gate,
            "tcpdump",
            "-i",
            "veth0",
            "--immediate-mode",
            "-U",
            "-n",
            "-w",
        ])
        .arg(&capture)
        .args(["tcp", "or", "udp"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&tcpdump_log).unwrap())
        .spawn()
        .unwrap();
    wait_for("tcpdump", || {
        std::fs::read_to_string(&tcpdump_log)
            .unwrap()
            .contains("listening on")
    });

    let [a, b, ..] = CLIENTS4;
    assert!(net.connect(a, 22).is_rejected());
    net.knock(a, &[1111, 2222]);
    assert_eq!(net.connect(a, 22), Reply::Open);
    net.knock(b, &[1111]);
    assert!(net.connect(b, 80).is_rejected());
    net.knock(b, &[2222]);
    assert!(net.connect(b, 22).is_rejected());
    net.knock(a, &[3333]);
    assert!(net.connect(a, 22).is_rejected());
    net.knock(CLIENTS6[0], &[1111, 2222]);
    assert_eq!(net.connect(CLIENTS6[0], 22), Reply::Open);
    // By datagram: to the UDP open port before and after the UDP knock.
    let c = CLIENTS4[2];
    for port in [5353, 7000, 8000, 5353] {
        net.in_client(&format!("printf x | nc -u -w 1 -s {c} {GATE4} {port}"));
    }

    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(tcpdump.id() as libc::pid_t, libc::SIGINT) };
    assert!(tcpdump.wait().unwrap().success());

    let out = run(knockq()
        .args(["simulate", "--format", "json", "--verdicts", "--config"])
        .arg(&config)
        .arg("--pcap")
        .arg(&capture));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let simulated: Vec<(String, String, String, String)> = run["reports"][0]["packets"]
        .as_array()
        .unwrap_or_else(|| panic!("no packets in {run:#}"))
        .iter()
        .map(|p| {
            (
                p["source"].as_str().unwrap().to_owned(),
                p["dst_port"].to_string().trim_matches('"').to_owned(),
                p["verdict"].as_str().unwrap().to_owned(),
                p["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let live = live_verdicts(&gate.log());
    assert_eq!(simulated.len(), 17, "{simulated:?}");
    let udp_verdicts: Vec<&str> = simulated
        .iter()
        .filter(|p| p.1.ends_with("/udp"))
        .map(|p| p.3.as_str())
        .collect();
    assert_eq!(udp_verdicts, ["no_grant", "knock", "knock", "granted"]);
    // The daemon decided the simulated packets in order; with offload the
    // kernel decided the others, unlogged, and its rule counters count
    // them, each with the verdict simulate gave it.
    let mut decided_live = live.iter().peekable();
    let (mut kernel_accepts, mut kernel_rejects) = (0.0, 0.0);
    for packet in &simulated {
        if decided_live.peek() == Some(&packet) {
            decided_live.next();
            continue;
        }
        assert!(
            offload_on(),
            "{packet:?} not decided live:\nsimulated {simulated:?}\nlive {live:?}"
        );
        match packet.2.as_str() {
            "accept" => kernel_accepts += 1.0,
            _ => kernel_rejects += 1.0,
        }
    }
    assert_eq!(
        decided_live.next(),
        None,
        "decided live, not simulated:\nsimulated {simulated:?}\nlive {live:?}"
    );
    if offload_on() {
        assert!(kernel_rejects >= 1.0, "the stranger's SYN to 22");
        let (_, metrics) = net.http_get(9724, "/metrics");
        for (verdict, want) in [("accept", kernel_accepts), ("reject", kernel_rejects)] {
            let series = format!("knockq_kernel_verdicts_total{{verdict=\"{verdict}\"}}");
            assert_eq!(sample(&metrics, &series), Some(want), "{metrics}");
        }
    }
    let granted = run["reports"][0]["policies"][0]["granted"]
        .as_array()
        .unwrap();
    assert_eq!(granted.len(), 2, "{granted:?}");
}
