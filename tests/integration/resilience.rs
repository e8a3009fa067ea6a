//! What the gate promises under stress: reloads, restarts, crashes, floods
//! and port sweeps, on the real kernel.

use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::*;

/// What the SYN flood sends, from random sources: first knocks.
const SYNS_TO_1111: &str = "tcp(sp=drnd(), dp=1111, seq=drnd(), syn, window=64240)";

const TWO_POLICIES: &str = r#"
[[policy]]
name = "ssh"
sequence = [1111, 2222]
open_ports = [22]

[[policy]]
name = "old"
sequence = [7000, 8000]
open_ports = [8443]
"#;

#[test]
fn sighup_with_an_invalid_config_keeps_the_old_one() {
    if !can_run_end_to_end("sighup_with_an_invalid_config_keeps_the_old_one") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let config = net.config(EXAMPLE_CONFIG);
    net.load_rules(&config, "iptables");
    let mut gate = net.start_daemon(&config);
    let [a, b, ..] = CLIENTS4;
    net.knock(a, &[1111, 2222]);

    std::fs::write(
        &config,
        with_offload(&EXAMPLE_CONFIG.replace("[1111, 2222]", "[1111, 70000]")),
    )
    .unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for_log("reload refused, still running the previous configuration");
    assert!(gate
        .log()
        .contains("policy[0].sequence[1]: port 70000 is outside 1..65535"));

    std::fs::write(
        &config,
        with_offload(&EXAMPLE_CONFIG.replace("num = 0 ", "num = 5 ")),
    )
    .unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for_log("[queue] changed, and that needs a restart");

    assert!(gate.is_running());
    assert_eq!(net.connect(a, 22), Reply::Open, "the grant survived");
    net.knock(b, &[1111, 2222]);
    assert_eq!(
        net.connect(b, 22),
        Reply::Open,
        "the old policy still opens"
    );
}

#[test]
fn sighup_with_a_changed_config_swaps_policies_and_keeps_unchanged_grants() {
    if !can_run_end_to_end("sighup_with_a_changed_config_swaps_policies_and_keeps_unchanged_grants")
    {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 443, 8443]);
    let config = net.config(TWO_POLICIES);
    net.load_rules(&config, "iptables");
    let gate = net.start_daemon(&config);
    let [a, b, c, d] = CLIENTS4;
    net.knock(a, &[1111, 2222]);
    net.knock(b, &[7000, 8000]);
    assert_eq!(net.connect(b, 8443), Reply::Open);

    let changed = TWO_POLICIES.replace(
        "name = \"old\"\nsequence = [7000, 8000]\nopen_ports = [8443]",
        "name = \"web\"\nsequence = [5000, 6000]\nopen_ports = [443]",
    );
    std::fs::write(&config, with_offload(&changed)).unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for_log("event=reload kept=ssh fresh=web dropped=old");

    assert_eq!(
        net.connect(a, 22),
        Reply::Open,
        "unchanged policy: grant kept"
    );
    assert!(
        net.connect(b, 8443).is_rejected(),
        "removed policy: grant gone"
    );
    net.knock(c, &[5000, 6000]);
    assert_eq!(net.connect(c, 443), Reply::Open, "the new sequence opens");
    net.knock(d, &[7000, 8000]);
    assert!(
        net.connect(d, 8443).is_rejected(),
        "the removed sequence does not"
    );
}

fn metric(net: &Net, name: &str) -> f64 {
    let (_, body) = net.http_get(9724, "/metrics");
    sample(&body, name).unwrap_or_else(|| panic!("no {name} in\n{body}"))
}

/// Seconds of flood: 30 with KNOCKQ_FLOOD_SECONDS=30, short by default.
fn flood_seconds() -> u64 {
    std::env::var("KNOCKQ_FLOOD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

/// Largest resident set allowed to the gate with a 50,000-source table.
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// Knocks 1111 and 2222 from `src` the way a user does during a flood, and
/// tries 22. An overloaded gate drops some SYNs, strangers' first knocks
/// evict progress from the full table after a while, and the kernel's ICMP
/// rate limit eats most rejects, so the knocks go out back to back without
/// waiting for answers, and the user tries again when 22 stays shut.
fn knock_under_flood(net: &Net, src: &str) -> bool {
    (0..5).any(|_| {
        net.in_client(&format!(
            "nc -z -w 1 -s {src} {GATE4} 1111 & sleep 0.005; nc -z -w 1 -s {src} {GATE4} 2222 & wait"
        ));
        net.connect_within(src, 22, 3) == Reply::Open
    })
}

#[test]
fn a_spoofed_syn_flood_neither_overflows_state_nor_locks_users_out() {
    let test = "a_spoofed_syn_flood_neither_overflows_state_nor_locks_users_out";
    if !can_run_end_to_end(test) || !can_run(test, true, &["trafgen"]) {
        return;
    }
    let mut net = Net::alone();
    net.listen(&[22]);
    let config =
        net.config(&EXAMPLE_CONFIG.replace("max_sources = 1000000", "max_sources = 50000"));
    net.load_rules(&config, "iptables");
    // Per-packet debug lines would log the whole flood.
    let gate = net.start_daemon_logging(&config, &[], "info");
    let [before, during, ..] = CLIENTS4;
    net.knock(before, &[1111, 2222]);

    let flood = Flood::start(&net, SYNS_TO_1111, None);
    let started = Instant::now();
    let mut knocked = false;
    let mut checks = 0;
    // Throughout the flood, and at least three times however slow the checks.
    while checks < 3 || started.elapsed() < Duration::from_secs(flood_seconds()) {
        assert!(metric(&net, "knockq_tracked_sources") <= 50_000.0);
        let rss = gate.rss_kib();
        assert!(rss < RSS_BOUND_KIB, "RSS {rss} KiB");
        // The gate drops some SYNs while overloaded (fail-closed): clients
        // retransmit, as TCP does.
        let reply = net.connect_within(before, 22, 10);
        assert_eq!(reply, Reply::Open, "the earlier grant, during the flood");
        if !knocked {
            assert!(
                knock_under_flood(&net, during),
                "a knock during the flood never opened"
            );
            knocked = true;
        }
        checks += 1;
    }
    let decided = metric(
        &net,
        "knockq_verdicts_total{proto=\"tcp\",reason=\"knock\",verdict=\"reject\"}",
    );
    assert!(
        decided > 10_000.0,
        "the flood reached the gate: {decided} knocks decided"
    );
    assert!(metric(&net, "knockq_state_evictions_total") > 0.0);

    // SIGKILL mid-flood: while down, protected ports are closed (fail-closed).
    wait_for("the grant to be saved", || {
        std::fs::read_to_string(net.state_dir().join("grants.json"))
            .is_ok_and(|s| s.contains(before))
    });
    gate.kill();
    assert_eq!(net.bound_queues(), 0);
    let reply = net.connect(before, 22);
    assert!(
        reply != Reply::Open && !reply.is_rejected(),
        "dropped while down: {reply:?}"
    );
    drop(flood);

    // Back up: the earlier grant works without knocking again.
    let gate = net.start_daemon_logging(&config, &[], "info");
    assert_eq!(
        net.connect(before, 22),
        Reply::Open,
        "restored after SIGKILL"
    );
    assert!(
        gate.log()
            .contains(&format!("event=restore src={before} policy=ssh")),
        "{}",
        gate.log()
    );
    sleep(Duration::from_millis(500));
    assert_eq!(
        net.pending_packets(),
        0,
        "nothing left waiting in the queue"
    );
}

#[test]
fn a_corrupt_state_file_is_logged_and_ignored() {
    if !can_run_end_to_end("a_corrupt_state_file_is_logged_and_ignored") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    std::fs::create_dir_all(net.state_dir()).unwrap();
    std::fs::write(
        net.state_dir().join("grants.json"),
        "{\"version\":1,\"saved_at\":17",
    )
    .unwrap();
    let gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    gate.wait_for_log("saved grants not restored");
    assert!(
        gate.log().contains("grants.json: unreadable, ignored"),
        "{}",
        gate.log()
    );
    net.knock(CLIENTS4[0], &[1111, 2222]);
    assert_eq!(net.connect(CLIENTS4[0], 22), Reply::Open);
}

/// A hand-edited state file asks for more than the example policy (an 8 h
/// grant of 22 and 8080 to addresses) could give: networks, other ports,
/// grants without end or longer than 8 h, a policy not in force. Restore
/// refuses each with a log line and a count, and puts back the good one.
#[test]
fn a_state_file_asking_for_more_than_the_policy_gives_is_refused() {
    if !can_run_end_to_end("a_state_file_asking_for_more_than_the_policy_gives_is_refused") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let [good, other_ports, endless, too_long] = CLIENTS4;
    let grant = |source: &str, policy: &str, extra: &str, seconds_left: &str| {
        format!(
            r#"{{"source":"{source}","policy":"{policy}","knock":"1111 2222","open_ports":[22,8080],"close_port":3333,"seconds_left":{seconds_left}{extra}}}"#
        )
    };
    let grants = [
        grant(good, "ssh", "", "600"),
        grant("0.0.0.0", "ssh", r#","prefix":0"#, "600"),
        grant("10.0.0.0", "ssh", r#","prefix":8"#, "600"),
        grant(other_ports, "ssh", r#","ports":[22,9999]"#, "600"),
        grant(endless, "ssh", "", "null"),
        grant(too_long, "ssh", "", "100000"),
        grant(too_long, "ssh", "", "1e300"),
        grant(too_long, "nope", "", "600"),
    ];
    // Written a day from now: the time since counts as none.
    let saved_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400;
    std::fs::create_dir_all(net.state_dir()).unwrap();
    std::fs::write(
        net.state_dir().join("grants.json"),
        format!(
            r#"{{"version":3,"saved_at":{saved_at},"grants":[{}],"spent":[]}}"#,
            grants.join(",")
        ),
    )
    .unwrap();
    let gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    gate.wait_for_log(&format!("event=restore src={good} policy=ssh"));
    assert_eq!(net.connect(good, 22), Reply::Open, "the good grant is back");
    for src in [other_ports, endless, too_long] {
        assert!(net.connect(src, 22).is_rejected(), "{src} was not restored");
    }
    let log = gate.log();
    for (subject, why) in [
        (
            "0.0.0.0/0 under ssh",
            "the policy grants addresses, not networks",
        ),
        (
            "10.0.0.0/8 under ssh",
            "the policy grants addresses, not networks",
        ),
        (
            &format!("{other_ports} under ssh"),
            "port 9999 is not one of the policy's open ports",
        ),
        (
            &format!("{endless} under ssh"),
            "it lasts until closed, and the policy's grants end",
        ),
        (
            &format!("{too_long} under ssh"),
            "it lasts longer than the policy's longest grant, 8h",
        ),
        (
            &format!("{too_long} under ssh"),
            "1e300 seconds left is past any end",
        ),
        (
            &format!("{too_long} under nope"),
            "policy \"nope\" is not in force here with that knock and those ports",
        ),
    ] {
        let line = format!("saved grant {subject} not restored: {why}");
        assert!(log.contains(&line), "no \"{line}\" in\n{log}");
    }
    for (reason, count) in [
        ("network", 2.0),
        ("ports", 1.0),
        ("end", 3.0),
        ("policy", 1.0),
    ] {
        let series = format!("knockq_state_grants_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&net, &series), count, "{series}");
    }
    let status = text(&net.knockq_control("status").stdout);
    assert!(
        !status.contains("0.0.0.0") && !status.contains("10.0.0.0"),
        "{status}"
    );
}

#[test]
fn full_port_sweeps_with_nmap_never_open() {
    if !can_run_end_to_end("full_port_sweeps_with_nmap_never_open") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    let src = CLIENTS4[1];
    for order in ["-r", ""] {
        let out = net.in_client(&format!(
            "nmap -n -Pn -sS -p- {order} --max-retries 0 --min-rate 20000 -e veth1 -S {src} {GATE4}"
        ));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("Nmap done: 1 IP address (1 host up)"),
            "{report}"
        );
        assert!(
            net.connect(src, 22).is_rejected(),
            "a sweep {order} opened 22"
        );
    }
    let log = gate.log();
    assert!(!log.contains("event=grant"), "{log}");
    assert!(
        log.contains(&format!("event=reset src={src} policy=ssh")),
        "the sweep was seen and reset"
    );
}
