//! The gate end to end: real kernel, real clients (nc, knock, nmap), rules
//! from `knockq rules`, in namespaces each test creates and deletes.

use std::thread::sleep;
use std::time::Duration;

use crate::util::*;

const NFT: &[&str] = &["nft"];

/// Example policy with short windows, so tests can wait them out.
fn short_windows(step_timeout: &str, grant_timeout: &str) -> String {
    EXAMPLE_CONFIG
        .replace(
            "step_timeout = \"10s\"",
            &format!("step_timeout = \"{step_timeout}\""),
        )
        .replace(
            "grant_timeout = \"8h\"",
            &format!("grant_timeout = \"{grant_timeout}\""),
        )
}

/// The example policy's walkthrough: closed, knock, open, close knock, closed.
pub fn walkthrough(backends: &[&str], clients: [&str; 4]) {
    let mut net = Net::new();
    walkthrough_with(&mut net, EXAMPLE_CONFIG, backends, clients);
}

/// The walkthrough against `config`, which must knock like the example.
fn walkthrough_with(net: &mut Net, config: &str, backends: &[&str], clients: [&str; 4]) {
    net.listen(&[22, 8080, 443]);
    let gate = net.start_gate(config, backends);
    let [me, stranger, ..] = clients;
    let reply = net.connect(me, 22);
    assert!(reply.is_rejected(), "{reply:?}");
    net.knock(me, &[1111, 2222]);
    assert_eq!(net.connect(me, 22), Reply::Open);
    assert_eq!(net.connect(me, 8080), Reply::Open);
    assert_eq!(
        net.connect(me, 22),
        Reply::Open,
        "any number of connections"
    );
    let reply = net.connect(me, 443);
    assert!(reply.is_rejected(), "no policy opens 443: {reply:?}");
    let reply = net.connect(stranger, 22);
    assert!(reply.is_rejected(), "grants are per source: {reply:?}");
    net.knock(me, &[3333]);
    for port in [22, 8080] {
        let reply = net.connect(me, port);
        assert!(reply.is_rejected(), "closed again, {port}: {reply:?}");
    }
    let log = gate.log();
    assert!(
        log.contains(&format!("event=grant src={me} policy=ssh ports=22,8080")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "event=revoke src={me} policy=ssh reason=close_knock"
        )),
        "{log}"
    );
    assert_eq!(net.pending_packets(), 0);
}

/// The seed walkthrough, against the seed recipe written as a script.
#[test]
fn walkthrough_with_the_seed_script_both_families() {
    if !can_run_end_to_end("walkthrough_with_the_seed_script_both_families") {
        return;
    }
    for clients in [CLIENTS4, CLIENTS6] {
        let mut net = Net::new();
        let config = net.example_policy("seed", |lua| lua);
        walkthrough_with(&mut net, &config, DUAL_STACK_RULES, clients);
    }
}

#[test]
fn walkthrough_with_nc_iptables() {
    if can_run_end_to_end("walkthrough_with_nc_iptables") {
        walkthrough(IPV4_RULES, CLIENTS4);
    }
}

#[test]
fn walkthrough_with_nc_ipv6_ip6tables() {
    if can_run_end_to_end("walkthrough_with_nc_ipv6_ip6tables") {
        walkthrough(DUAL_STACK_RULES, CLIENTS6);
    }
}

#[test]
fn walkthrough_with_nc_nft_both_families() {
    if !can_run_end_to_end("walkthrough_with_nc_nft_both_families")
        || !can_queue_from_nft("walkthrough_with_nc_nft_both_families")
    {
        return;
    }
    walkthrough(NFT, CLIENTS4);
    walkthrough(NFT, CLIENTS6);
}

/// The nft ruleset's reject rules, on any kernel: packets carrying the reject
/// mark are rejected the configured way, for IPv4 and IPv6.
#[test]
fn nft_rules_reject_marked_packets() {
    if !can_run_end_to_end("nft_rules_reject_marked_packets") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[5555, 5556]);
    let config = net.config(EXAMPLE_CONFIG);
    let rules = run(knockq()
        .args(["rules", "--backend", "nft", "--config"])
        .arg(&config));
    let rules = String::from_utf8(rules.stdout).unwrap();
    // Without the daemon the queue rule would drop these SYNs (fail-closed);
    // with offload, the chain deciding SYNs in the kernel would reject them.
    let without_queue: String = rules
        .lines()
        .filter(|l| !l.contains("queue num") && !l.contains("jump syn"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(net.dir.path().join("rules.nft"), without_queue).unwrap();
    std::fs::write(
        net.dir.path().join("marker.nft"),
        "table inet marker {\n chain pre {\n  type filter hook prerouting priority -150;\n  tcp dport 5555 meta mark set 0x6b710001\n }\n}\n",
    )
    .unwrap();
    let dir = net.dir.path().display().to_string();
    let out = net.in_gate(&format!(
        "nft -f {dir}/rules.nft && nft -f {dir}/marker.nft"
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for src in [CLIENTS4[0], CLIENTS6[0]] {
        let reply = net.connect(src, 5555);
        assert!(reply.is_rejected(), "{src}: {reply:?}");
        assert_eq!(
            net.connect(src, 5556),
            Reply::Open,
            "{src}: unmarked packets pass"
        );
    }
    let counters =
        String::from_utf8(net.in_gate("nft list chain inet knockq input").stdout).unwrap();
    assert!(
        counters.contains("counter packets 1 bytes 60 reject with icmp host-prohibited"),
        "{counters}"
    );
}

#[test]
fn knock_client_then_immediate_connect() {
    if !can_run_end_to_end("knock_client_then_immediate_connect") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let _gate = net.start_gate(EXAMPLE_CONFIG, DUAL_STACK_RULES);
    for (flag, dst, src) in [("", GATE4, CLIENTS4[0]), ("-6", GATE6, CLIENTS6[0])] {
        for round in 0..5 {
            // No pause between the last knock and the connection.
            let out = net.in_client(&format!(
                "knock {flag} {dst} 1111 2222 && nc {flag} -z -w 2 {dst} 22"
            ));
            assert!(
                out.status.success(),
                "round {round} from {src}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            net.knock(src, &[3333]);
            assert!(net.connect(src, 22).is_rejected());
        }
    }
}

#[test]
fn nmap_as_knock_client() {
    if !can_run_end_to_end("nmap_as_knock_client") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let _gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    let src = CLIENTS4[2];
    for port in [1111, 2222] {
        let out = net.in_client(&format!(
            "nmap -n -Pn -sS -e veth1 -S {src} -p {port} {GATE4}"
        ));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains(&format!("{port}/tcp filtered")), "{report}");
    }
    assert_eq!(net.connect(src, 22), Reply::Open);
    assert!(net.connect(CLIENTS4[0], 22).is_rejected());
}

#[test]
fn wrong_order_and_duplicates() {
    if !can_run_end_to_end("wrong_order_and_duplicates") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let _gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    let [a, b, ..] = CLIENTS4;
    net.knock(a, &[2222, 1111]);
    assert!(net.connect(a, 22).is_rejected(), "wrong order");
    net.knock(b, &[1111, 1111, 2222, 2222]);
    assert_eq!(net.connect(b, 22), Reply::Open, "retransmitted knocks");
}

#[test]
fn strict_policy_resets_on_another_port() {
    if !can_run_end_to_end("strict_policy_resets_on_another_port") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 80]);
    let gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    let src = CLIENTS4[0];
    net.knock(src, &[1111]);
    assert!(net.connect(src, 80).is_rejected());
    net.knock(src, &[2222]);
    assert!(net.connect(src, 22).is_rejected());
    gate.wait_for_log(&format!("event=reset src={src} policy=ssh"));
}

#[test]
fn step_window_and_grant_timeout() {
    if !can_run_end_to_end("step_window_and_grant_timeout") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let gate = net.start_gate(&short_windows("1s", "2s"), IPV4_RULES);
    let [slow, quick, ..] = CLIENTS4;
    net.knock(slow, &[1111]);
    net.knock(quick, &[1111, 2222]);
    sleep(Duration::from_millis(1300));
    net.knock(slow, &[2222]);
    assert!(
        net.connect(slow, 22).is_rejected(),
        "second knock after the step window"
    );
    assert_eq!(net.connect(quick, 22), Reply::Open);
    sleep(Duration::from_millis(1000));
    assert!(net.connect(quick, 22).is_rejected(), "grant timed out");
    gate.wait_for_log(&format!(
        "event=revoke src={quick} policy=ssh reason=timeout"
    ));
    gate.wait_for_log(&format!("event=expire src={slow} policy=ssh"));
}

/// A packet the gate cannot read still gets exactly one verdict: reject.
#[test]
fn unparsable_packet_is_rejected() {
    if !can_run_end_to_end("unparsable_packet_is_rejected") {
        return;
    }
    let net = Net::new();
    let gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    // Only new TCP and UDP flows reach the queue through knockq's rules;
    // queue an ICMP echo too.
    let out =
        net.in_gate("iptables -A KNOCKQ -p icmp --icmp-type echo-request -j NFQUEUE --queue-num 0");
    assert!(out.status.success());
    net.in_client(&format!("ping -c 1 -W 1 -I {} {GATE4}", CLIENTS4[0]));
    gate.wait_for_log(
        "packets that are neither TCP nor UDP over IPv4/IPv6 rejected queue=0 count=1",
    );
    let rules = String::from_utf8(net.in_gate("iptables -nvxL KNOCKQ").stdout).unwrap();
    let reject = rules
        .lines()
        .find(|l| l.contains("icmp-host-prohibited"))
        .unwrap();
    assert_eq!(reject.split_whitespace().next(), Some("1"), "{rules}");
    assert_eq!(net.pending_packets(), 0);
}

#[test]
fn sigterm_unbinds_and_exits_cleanly() {
    if !can_run_end_to_end("sigterm_unbinds_and_exits_cleanly") {
        return;
    }
    let net = Net::new();
    let gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    assert_eq!(net.bound_queues(), 1);
    let status = gate.stop(libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert_eq!(net.bound_queues(), 0, "queue still bound after SIGTERM");
}

#[test]
fn a_second_daemon_on_a_bound_queue_says_so() {
    if !can_run_end_to_end("a_second_daemon_on_a_bound_queue_says_so") {
        return;
    }
    let net = Net::new();
    let config = net.config(EXAMPLE_CONFIG);
    net.load_rules(&config, IPV4_RULES[0]);
    let _gate = net.start_daemon(&config);
    let second = net.knockq_in_gate(&format!(
        "run --config {} --control-socket {} --state-dir {}",
        config.display(),
        net.dir.path().join("second.sock").display(),
        net.dir.path().join("second-state").display(),
    ));
    let stderr = text(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot bind NFQUEUE 0: another program has bound it"),
        "{stderr}"
    );
    assert_eq!(net.bound_queues(), 1, "the first daemon keeps its queue");
}

#[test]
fn two_queues_share_the_state() {
    if !can_run_end_to_end("two_queues_share_the_state") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let config = EXAMPLE_CONFIG.replace("count = 1", "count = 2");
    let gate = net.start_gate(&config, DUAL_STACK_RULES);
    wait_for("both queues", || net.bound_queues() == 2);
    for src in CLIENTS4.iter().chain(CLIENTS6.iter()) {
        net.knock(src, &[1111, 2222]);
        assert_eq!(net.connect(src, 22), Reply::Open, "{src}");
    }
    assert!(gate.stop(libc::SIGINT).success());
    assert_eq!(net.bound_queues(), 0);
}

/// What a client does in a comparison scenario.
enum Step {
    /// nc from client address `i` to a port: connected or not.
    Connect(usize, u16),
    /// The `knock` client, then nc to 22 at once, from the first address.
    KnockThenConnect,
    /// An nmap SYN probe from client address `i`: reported open or not.
    Nmap(usize, u16),
}

/// Runs `steps` against a gate and returns, for each step, whether the
/// client got through.
fn outcomes(net: &Net, steps: &[Step]) -> Vec<bool> {
    steps
        .iter()
        .map(|step| match *step {
            Step::Connect(i, port) => net.connect(CLIENTS4[i], port) == Reply::Open,
            Step::KnockThenConnect => net
                .in_client(&format!("knock {GATE4} 1111 2222 && nc -z -w 2 {GATE4} 22"))
                .status
                .success(),
            Step::Nmap(i, port) => {
                let src = CLIENTS4[i];
                let out = net.in_client(&format!(
                    "nmap -n -Pn -sS -e veth1 -S {src} -p {port} {GATE4}"
                ));
                String::from_utf8_lossy(&out.stdout).contains(&format!("{port}/tcp open"))
            }
        })
        .collect()
}

/// The gate configured like the seed's recipe, with the built-in policy and
/// with the recipe as a script (examples/policies/seed.toml), answers every
/// client exactly as the recipe's xt_recent chains do.
#[test]
fn behaves_like_the_xt_recent_recipe() {
    if !can_run_end_to_end("behaves_like_the_xt_recent_recipe") {
        return;
    }
    use Step::*;
    let steps = [
        Connect(0, 22),
        Connect(0, 1111),
        Connect(0, 2222),
        Connect(0, 22),
        Connect(0, 8080),
        Connect(0, 443),
        Connect(1, 22),
        Connect(0, 3333),
        Connect(0, 22),
        Connect(0, 8080),
        // Wrong order.
        Connect(1, 2222),
        Connect(1, 1111),
        Connect(1, 22),
        // Retransmitted knocks.
        Connect(2, 1111),
        Connect(2, 1111),
        Connect(2, 2222),
        Connect(2, 2222),
        Connect(2, 22),
        // Another port in between resets.
        Connect(3, 1111),
        Connect(3, 80),
        Connect(3, 2222),
        Connect(3, 22),
        KnockThenConnect,
        Connect(0, 3333),
        Nmap(1, 1111),
        Nmap(1, 2222),
        Nmap(1, 22),
        Connect(1, 8080),
    ];
    let recipe = {
        let mut net = Net::new();
        net.listen(&[22, 8080, 443, 80]);
        let out = net.in_gate(&format!(
            "iptables-restore < {}/tests/testdata/recent-recipe.iptables",
            env!("CARGO_MANIFEST_DIR")
        ));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        outcomes(&net, &steps)
    };
    let knockq = {
        let mut net = Net::new();
        net.listen(&[22, 8080, 443, 80]);
        let _gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
        outcomes(&net, &steps)
    };
    let script = {
        let mut net = Net::new();
        net.listen(&[22, 8080, 443, 80]);
        let config = net.example_policy("seed", |lua| lua);
        let _gate = net.start_gate(&config, IPV4_RULES);
        outcomes(&net, &steps)
    };
    assert_eq!(knockq, recipe);
    assert_eq!(script, recipe, "the seed recipe as a script");
    assert_eq!(recipe.iter().filter(|&&open| open).count(), 6, "{recipe:?}");
}
