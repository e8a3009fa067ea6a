//! UDP end to end: knocks by datagram from knockd's `knock`, nc and
//! knockq's own client, and a real DNS server (Debian's dnsmasq) behind
//! the gate, queried with dig.

use std::fs;

use crate::util::*;

/// A DNS server opened by a UDP sequence and closed by a UDP knock, and a
/// mixed sequence that opens ssh's TCP port.
const POLICIES: &str = r#"[[policy]]
name = "dns"
sequence = ["7000/udp", "8000/udp"]
open_ports = ["53/udp"]
close_port = "9000/udp"

[[policy]]
name = "mixed"
sequence = ["1111/udp", 2222]
open_ports = [22]
"#;

const NAME: &str = "knockq.test";
const ANSWER: &str = "10.9.0.77";

/// dnsmasq on the gate's port 53, both families, answering one name and
/// logging every query it receives to `dnsmasq.log`.
fn start_dns(net: &mut Net) {
    let addresses = [
        format!("--listen-address={GATE4}"),
        format!("--listen-address={GATE6}"),
    ];
    let answer = format!("--address=/{NAME}/{ANSWER}");
    let mut args = vec![
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--user=root",
        "--pid-file=",
        "--log-queries",
        "--log-facility=-",
    ];
    args.extend(addresses.iter().map(String::as_str));
    args.push(&answer);
    net.spawn_in_gate("dnsmasq", &args);
    wait_for("dnsmasq", || {
        let out = net.in_gate("ss -lunH");
        text(&out.stdout).contains(&format!("{GATE4}:53 "))
    });
}

/// What dig says when `src` asks the gate for [`NAME`]: the address, or
/// its error.
fn dig(net: &Net, src: &str) -> String {
    dig_from(net, GATE4, &format!("-b {src}"))
}

/// The same, to `server`, with dig's `options`.
fn dig_from(net: &Net, server: &str, options: &str) -> String {
    let out = net.in_client(&format!(
        "dig +time=2 +tries=1 +short {options} @{server} {NAME} A"
    ));
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn answered(reply: &str) -> bool {
    reply.trim() == ANSWER
}

/// Refused at once by ICMP port unreachable, as a closed UDP port answers.
fn refused(reply: &str) -> bool {
    reply.contains("connection refused")
}

fn udp_knock_with_nc(net: &Net, src: &str, ports: &[u16]) {
    for port in ports {
        let dst = if src.contains(':') { GATE6 } else { GATE4 };
        net.in_client(&format!("printf x | nc -u -w 1 -s {src} {dst} {port}"));
    }
}

#[test]
fn a_dns_server_behind_the_gate_answers_only_after_a_udp_knock() {
    if !can_run(
        "a_dns_server_behind_the_gate_answers_only_after_a_udp_knock",
        true,
        &["dnsmasq", "dig", "knock", "nc"],
    ) {
        return;
    }
    let mut net = Net::new();
    start_dns(&mut net);
    // nft where the kernel can queue from it (the VM), iptables here.
    let rules: &[&str] = if in_emulated_vm() {
        &["nft"]
    } else {
        DUAL_STACK_RULES
    };
    let gate = net.start_gate(POLICIES, rules);
    let (knocker, stranger) = (CLIENTS4[0], CLIENTS4[1]);
    let before = dig(&net, knocker);
    assert!(refused(&before), "before the knock: {before}");

    // knockd's client, UDP throughout.
    let out = net.in_client(&format!("knock -u -d 100 {GATE4} 7000 8000"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    gate.wait_for_log(&format!("event=grant src={knocker} policy=dns"));
    let after = dig(&net, knocker);
    assert!(answered(&after), "after the knock: {after}");
    let again = dig(&net, knocker);
    assert!(answered(&again), "a second query, a new flow: {again}");
    let strangers = dig(&net, stranger);
    assert!(refused(&strangers), "a stranger: {strangers}");

    // The close knock, by nc.
    udp_knock_with_nc(&net, knocker, &[9000]);
    gate.wait_for_log(&format!(
        "event=revoke src={knocker} policy=dns reason=close_knock"
    ));
    let closed = dig(&net, knocker);
    assert!(refused(&closed), "after the close knock: {closed}");

    // knockq's own client, over IPv6 by -6.
    net.client_hosts(&format!("{GATE4} gate\n{GATE6} gate\n"));
    let out = net.in_client(&format!(
        "{} knock -6 gate 7000/udp 8000/udp --delay 100ms",
        env!("CARGO_BIN_EXE_knockq")
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // From the address the kernel picks, as knockq's client's knocks came.
    let v6 = dig_from(&net, GATE6, "");
    assert!(answered(&v6), "over IPv6 after knockq's knock -6: {v6}");
    assert!(
        refused(&dig(&net, knocker)),
        "the IPv4 address knocked nothing"
    );

    // The server's own log: the stranger's queries never reached it.
    let log = fs::read_to_string(net.dir.path().join("dnsmasq.log")).unwrap();
    let queries = |src: &str| log.matches(&format!("query[A] {NAME} from {src}")).count();
    assert_eq!(queries(knocker), 2, "{log}");
    assert_eq!(queries(stranger), 0, "{log}");
    assert_eq!(queries("fd09::"), 1, "{log}");
    assert_eq!(net.pending_packets(), 0);
}

#[test]
fn knockds_client_opens_a_mixed_sequence() {
    if !can_run(
        "knockds_client_opens_a_mixed_sequence",
        true,
        &["knock", "nc"],
    ) {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let gate = net.start_gate(POLICIES, IPV4_RULES);
    let src = CLIENTS4[0];
    assert!(net.connect(src, 22).is_rejected());
    // Knocks in the wrong protocols do nothing.
    let out = net.in_client(&format!("knock -d 100 {GATE4} 1111:tcp 2222:udp"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        net.connect(src, 22).is_rejected(),
        "TCP 1111 and UDP 2222 are no knocks"
    );
    let out = net.in_client(&format!("knock -d 100 {GATE4} 1111:udp 2222:tcp"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    gate.wait_for_log(&format!("event=grant src={src} policy=mixed"));
    assert_eq!(net.connect(src, 22), Reply::Open);
    assert_eq!(net.pending_packets(), 0);
}

/// Whether this kernel has WireGuard, tried in a throwaway namespace.
fn kernel_has_wireguard() -> bool {
    let net = Net::new();
    net.in_gate("ip link add wgprobe type wireguard")
        .status
        .success()
}

/// A WireGuard interface `wg0` in `ns` at `address`, with a new key; its
/// public key.
fn wireguard(net: &Net, ns: &str, name: &str, address: &str, port: u16) -> String {
    let key = net.dir.path().join(format!("{name}.key"));
    let script = format!(
        "umask 077; wg genkey > {key} && ip link add wg0 type wireguard && \
         wg set wg0 private-key {key} listen-port {port} && \
         ip address add {address}/24 dev wg0 && ip link set wg0 up && wg pubkey < {key}",
        key = key.display()
    );
    let out = in_namespace(ns, &script);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

fn handshakes(net: &Net) -> String {
    text(&net.in_client("wg show wg0 latest-handshakes").stdout)
}

/// A WireGuard tunnel through the gate: its handshake, a new UDP flow to
/// 51820, passes only for a source that knocked. Runs where the kernel has
/// WireGuard: in the Debian-kernel VM (`vm::gate_tests_on_debians_stock_kernel`),
/// whose kernel must.
#[test]
fn a_wireguard_tunnel_passes_only_after_the_knock() {
    let test = "a_wireguard_tunnel_passes_only_after_the_knock";
    if !can_run(test, true, &["wg", "ping"]) {
        return;
    }
    if !kernel_has_wireguard() {
        assert!(
            !in_emulated_vm(),
            "{test}: the VM's kernel has no WireGuard"
        );
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!(
                "\n########## {test}: NOT RUN on this kernel, which has no WireGuard; \
                 vm::gate_tests_on_debians_stock_kernel runs it on Debian's ##########\n\n"
            )
            .as_bytes(),
        );
        return;
    }
    let net = Net::new();
    let policy = "[[policy]]\nname = \"wireguard\"\nsequence = [\"7000/udp\", \"8000/udp\"]\n\
                  open_ports = [\"51820/udp\"]\nclose_port = \"9000/udp\"\n";
    let gate = net.start_gate(policy, IPV4_RULES);
    let gate_key = wireguard(&net, &net.gate, "gate", "10.99.0.1", 51820);
    let peer = |name: &str, port: u16| {
        let key = wireguard(&net, &net.client, name, "10.99.0.2", port);
        let out = net.in_gate(&format!("wg set wg0 peer {key} allowed-ips 10.99.0.2/32"));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = net.in_client(&format!(
            "wg set wg0 peer {gate_key} endpoint {GATE4}:51820 allowed-ips 10.99.0.1/32"
        ));
        assert!(out.status.success(), "{}", text(&out.stderr));
        key
    };
    let ping = |seconds: u32| {
        net.in_client(&format!("ping -c 1 -W {seconds} 10.99.0.1"))
            .status
            .success()
    };
    let first = peer("client", 40001);
    assert!(!ping(2), "a ping through the tunnel before the knock");
    let none = format!("{gate_key}\t0\n");
    assert_eq!(handshakes(&net), none, "no handshake before the knock");

    let knock = net.in_client(&format!(
        "{} knock {GATE4} 7000/udp 8000/udp",
        env!("CARGO_BIN_EXE_knockq")
    ));
    assert!(knock.status.success(), "{}", text(&knock.stderr));
    gate.wait_for_log(&format!("event=grant src={} policy=wireguard", CLIENTS4[0]));
    // WireGuard tries a handshake again 5 s after the last one.
    assert!(ping(10), "a ping through the tunnel after the knock");
    assert_ne!(handshakes(&net), none);

    let close = net.in_client(&format!(
        "{} knock {GATE4} 9000/udp",
        env!("CARGO_BIN_EXE_knockq")
    ));
    assert!(close.status.success(), "{}", text(&close.stderr));
    gate.wait_for_log(&format!(
        "event=revoke src={} policy=wireguard reason=close_knock",
        CLIENTS4[0]
    ));
    // A new peer, from a new port: a new flow, without a grant.
    net.in_client("ip link del wg0");
    net.in_gate(&format!("wg set wg0 peer {first} remove"));
    peer("client2", 40002);
    assert!(!ping(7), "a new peer's ping after the close knock");
    assert_eq!(
        handshakes(&net),
        none,
        "no handshake for a new peer after the close knock"
    );
}

/// Sends malformed UDP to a port from a source: a header cut short, a
/// length of 0, a length beyond the packet, a first fragment whose rest
/// never comes, and a later fragment alone.
const MALFORMED_UDP: &str = r#"
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def ip(payload, ident, frag=0):
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + payload
def udp(length, data):
    return struct.pack("!HHHH", 40000, port, length, 0) + data
for packet in [
    ip(struct.pack("!HH", 40000, port), 1),
    ip(udp(0, b"x"), 2),
    ip(udp(100, b"x"), 3),
    ip(udp(24, b"12345678"), 4, frag=0x2000),
    ip(b"87654321", 5, frag=2),
]:
    s.sendto(packet, (dst, 0))
"#;

/// Malformed UDP to the second knock port, between the knocks of a
/// sequence: conntrack finds it invalid (or never completes the fragments),
/// so it never reaches the queue, and the sequence goes on as if it had not
/// been sent.
#[test]
fn malformed_udp_changes_nothing() {
    if !can_run("malformed_udp_changes_nothing", true, &["nc", "python3"]) {
        return;
    }
    let net = Net::new();
    let gate = net.start_gate(POLICIES, IPV4_RULES);
    let src = CLIENTS4[0];
    udp_knock_with_nc(&net, src, &[7000]);
    gate.wait_for_log(&format!("event=knock src={src} policy=dns stage=1"));
    let sent = net.in_client(&format!("python3 -c '{MALFORMED_UDP}' {src} {GATE4} 8000"));
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = gate.log();
    assert!(
        !log.contains("dst_port=8000/udp"),
        "decided by the daemon:\n{log}"
    );
    assert!(!log.contains("event=grant"), "{log}");
    assert_eq!(net.pending_packets(), 0);
    // The sequence was neither advanced nor reset by them.
    udp_knock_with_nc(&net, src, &[8000]);
    gate.wait_for_log(&format!("event=grant src={src} policy=dns"));
}
