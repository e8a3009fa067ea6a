//! Script policies and commands on grant and revoke, end to end: the
//! examples under examples/policies through the real daemon and nc, a
//! hostile script on a gate with two queues, and hooks that change an nft
//! set, fail and hang. (The seed script runs in gate.rs, beside the
//! built-in policy and the xt_recent recipe.)

use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::util::*;

const METRICS_PORT: u16 = 9724;

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn metrics(net: &Net) -> String {
    net.http_get(METRICS_PORT, "/metrics").1
}

/// office-hours.lua with its UTC offset set so that the gate's local time
/// now is `weekday` (0 = Monday) at 10:00.
fn office_hours_now_at(weekday: u64) -> impl FnOnce(String) -> String {
    let now = unix_seconds();
    let day = (now / 86_400.0).floor();
    // Monday 00:00 of this week, then the wanted day at 10:00.
    let monday = day - ((day as u64 + 3) % 7) as f64;
    let target = (monday + weekday as f64) * 86_400.0 + 10.0 * 3_600.0;
    let offset_hours = (target - now) / 3_600.0;
    move |lua: String| {
        lua.replace(
            "local UTC_OFFSET_HOURS = 1",
            &format!("local UTC_OFFSET_HOURS = {offset_hours}"),
        )
    }
}

#[test]
fn office_hours_open_on_a_weekday_morning_and_not_at_the_weekend() {
    if !can_run_end_to_end("office_hours_open_on_a_weekday_morning_and_not_at_the_weekend") {
        return;
    }
    let me = CLIENTS4[0];
    for (weekday, opens) in [(2, true), (5, false)] {
        let mut net = Net::new();
        net.listen(&[22]);
        let config = net.example_policy("office-hours", office_hours_now_at(weekday));
        let _gate = net.start_gate(&config, IPV4_RULES);
        net.knock(me, &[1111, 2222]);
        let open = net.connect(me, 22) == Reply::Open;
        assert_eq!(open, opens, "local weekday {weekday}, 10:00");
    }
}

#[test]
fn cgnat_opens_the_knockers_network() {
    if !can_run_end_to_end("cgnat_opens_the_knockers_network") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    // A client address outside the gate's /24, routed through the client.
    let outsider = "10.9.1.2";
    net.in_client(&format!("ip addr add {outsider}/32 dev veth1"));
    net.in_gate(&format!("ip route add {outsider}/32 via {}", CLIENTS4[0]));
    let config = net.example_policy("cgnat", |lua| lua);
    let _gate = net.start_gate(&config, DUAL_STACK_RULES);
    assert!(net.connect(CLIENTS4[1], 22).is_rejected());
    net.knock(CLIENTS4[0], &[1111, 2222]);
    assert_eq!(net.connect(CLIENTS4[1], 22), Reply::Open, "the same /24");
    assert_eq!(net.connect(CLIENTS4[3], 22), Reply::Open, "the same /24");
    assert!(net.connect(outsider, 22).is_rejected(), "another /24");
    net.knock(CLIENTS6[0], &[1111, 2222]);
    assert_eq!(net.connect(CLIENTS6[2], 22), Reply::Open, "the same /56");
    let status = net.knockq_control("status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("10.9.0.0/24") && status.contains("fd09::/56"),
        "{status}"
    );
    // Closed from another address of the network, for all of it.
    net.knock(CLIENTS4[2], &[3333]);
    assert!(net.connect(CLIENTS4[1], 22).is_rejected());
    assert_eq!(
        net.connect(CLIENTS6[2], 22),
        Reply::Open,
        "the IPv6 grant stays"
    );
}

#[test]
fn daily_opens_with_todays_sequence_only() {
    if !can_run_end_to_end("daily_opens_with_todays_sequence_only") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let config = net.example_policy("daily", |lua| lua);
    let key = net.dir.path().join("daily.key");
    knockq::rotating::keygen(&key).unwrap();
    let secret = knockq::rotating::Secret::load(&key).unwrap();
    let sequence = |day: u64| {
        let mac = secret.hmac(format!("knockq daily {day}").as_bytes());
        let n = |i: usize| u16::from_be_bytes([mac[2 * i], mac[2 * i + 1]]) % 1000;
        [20000 + n(0), 21000 + n(1), 22000 + n(2)]
    };
    let _gate = net.start_gate(&config, IPV4_RULES);
    let today = (unix_seconds() / 86_400.0) as u64;
    let me = CLIENTS4[0];
    net.knock(me, &sequence(today - 1));
    assert!(net.connect(me, 22).is_rejected(), "yesterday's sequence");
    net.knock(me, &sequence(today));
    assert_eq!(net.connect(me, 22), Reply::Open, "today's");
}

#[test]
fn rhythm_opens_for_knocks_one_to_three_seconds_apart() {
    if !can_run_end_to_end("rhythm_opens_for_knocks_one_to_three_seconds_apart") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let config = net.example_policy("rhythm", |lua| lua);
    let _gate = net.start_gate(&config, IPV4_RULES);
    let [steady, hasty, ..] = CLIENTS4;
    for port in [1111, 2222, 3333] {
        net.knock(steady, &[port]);
        if port != 3333 {
            sleep(Duration::from_millis(1500));
        }
    }
    assert_eq!(net.connect(steady, 22), Reply::Open);
    net.knock(hasty, &[1111, 2222, 3333]);
    assert!(net.connect(hasty, 22).is_rejected(), "knocks back to back");
}

#[test]
fn allow_cidr_lets_only_its_networks_knock() {
    if !can_run_end_to_end("allow_cidr_lets_only_its_networks_knock") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 8080]);
    let config = net.example_policy("allow-cidr", |lua| lua);
    let _gate = net.start_gate(&config, DUAL_STACK_RULES);
    for (src, allowed) in [
        (CLIENTS4[1], true),
        (CLIENTS4[2], false),
        (CLIENTS6[0], true),
        (CLIENTS6[3], false),
    ] {
        net.knock(src, &[1111, 2222]);
        assert_eq!(net.connect(src, 8080) == Reply::Open, allowed, "{src}");
    }
}

/// While a hostile script holds up one worker, a granted source whose
/// SYNs go to the other queue is still answered, and the failures are
/// counted and logged with the script's file and line.
#[test]
fn a_hostile_script_holds_up_only_its_own_packet() {
    if !can_run_end_to_end("a_hostile_script_holds_up_only_its_own_packet") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    std::fs::write(
        net.dir.path().join("hostile.lua"),
        "return function(k)\n  if k.port == 1111 then\n    while true do end\n  end\n  return 0\nend\n",
    )
    .unwrap();
    // 4444 is a knock port the script answers at once: a SYN to it shows
    // which queue a source's SYNs go to, with or without offload.
    let config = "[queue]\ncount = 2\n\n[[policy]]\nname = \"hostile\"\nopen_ports = [22]\n\
                  [policy.script]\nfile = \"hostile.lua\"\nknock_ports = [1111, 4444]\nbudget = \"100ms\"\n";
    // More client addresses, so that some land on the other queue.
    let extra: Vec<String> = (10..26).map(|i| format!("10.9.0.{i}")).collect();
    for address in &extra {
        net.in_client(&format!("ip addr add {address}/24 dev veth1"));
    }
    let path = net.config(config);
    net.load_rules(&path, "iptables");
    let gate = net.start_daemon_logging(&path, &[], "debug");
    wait_for("both queues", || net.bound_queues() == 2);
    let hostile = CLIENTS4[0];
    let queue_of = |gate: &Daemon, src: &str| -> Option<String> {
        let log = gate.log();
        log.lines()
            .find(|line| line.contains(&format!("src={src} ")))
            .and_then(|line| line.split("queue=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    // One SYN each tells which queue each source's SYNs go to.
    for src in std::iter::once(hostile).chain(extra.iter().map(String::as_str)) {
        net.connect(src, 4444);
    }
    let hostile_queue = queue_of(&gate, hostile).expect("the hostile source's queue");
    let bystander = extra
        .iter()
        .find(|src| queue_of(&gate, src).is_some_and(|q| q != hostile_queue))
        .expect("one of 16 sources on the other queue");
    let out = net.knockq_control(&format!("grant {bystander} --policy hostile --for 1h"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 20 hostile SYNs at once keep their worker busy for 2 s (and the
    // clients' retransmissions for longer).
    let mut burst = std::process::Command::new("ip")
        .args(["netns", "exec", &net.client, "sh", "-c"])
        .arg(format!(
            "for i in $(seq 20); do nc -z -w 3 -s {hostile} {GATE4} 1111 & done; wait"
        ))
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(200));
    for _ in 0..5 {
        assert_eq!(
            net.connect_within(bystander, 22, 1),
            Reply::Open,
            "answered within 1 s while the other queue is held up"
        );
    }
    burst.wait().unwrap();
    wait_for("the hostile SYNs decided", || net.pending_packets() == 0);
    sleep(Duration::from_millis(500));
    let metrics = metrics(&net);
    let failures = sample(
        &metrics,
        "knockq_script_errors_total{kind=\"budget\",policy=\"hostile\"}",
    )
    .unwrap_or(0.0);
    assert!(failures >= 20.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "knockq_verdicts_total{proto=\"tcp\",reason=\"failed\",verdict=\"reject\"}"
        ),
        Some(failures),
        "every failed call rejected its packet, and only that one"
    );
    let log = gate.log();
    assert!(
        log.contains("event=script_error")
            && log.contains("kind=budget")
            && log.contains("hostile.lua:3:"),
        "{log}"
    );
    // Logged at 1, 2, 4, 8… failures, not at each.
    let powers_of_two = (0..).take_while(|&n| 1 << n <= failures as u64).count();
    assert_eq!(
        log.matches("event=script_error").count(),
        powers_of_two,
        "{log}"
    );
}

/// Commands on grant and revoke: one keeps an nft set of granted sources,
/// one fails, one hangs; none holds up a verdict.
#[test]
fn commands_on_grant_and_revoke_run_off_the_verdict_path() {
    if !can_run_end_to_end("commands_on_grant_and_revoke_run_off_the_verdict_path") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 8080]);
    let out = net.in_gate(
        "nft add table inet hooktest && nft add set inet hooktest granted '{ type ipv4_addr; flags timeout; }'",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = r#"
[hooks]
timeout = "1s"

[[policy]]
name = "ssh"
sequence = [1111, 2222]
open_ports = [22]
close_port = 3333
grant_timeout = "1h"
on_grant = ["nft", "add", "element", "inet", "hooktest", "granted", "{ {source} }"]
on_revoke = ["nft", "delete", "element", "inet", "hooktest", "granted", "{ {source} }"]

[[policy]]
name = "web"
sequence = [4444, 5555]
open_ports = [8080]
close_port = 6666
on_grant = ["sh", "-c", "echo cannot reach the ticket system >&2; exit 7", "{policy}"]
on_revoke = ["sleep", "60"]
"#;
    let gate = net.start_gate(config, IPV4_RULES);
    let set = || {
        String::from_utf8_lossy(&net.in_gate("nft list set inet hooktest granted").stdout)
            .into_owned()
    };
    let me = CLIENTS4[0];
    net.knock(me, &[1111, 2222]);
    assert_eq!(net.connect(me, 22), Reply::Open);
    wait_for("the source in the nft set", || set().contains(me));
    net.knock(me, &[3333]);
    wait_for("the source out of the nft set", || !set().contains(me));

    // The failing and the hanging command: the knock opens at once all the same.
    net.knock(me, &[4444, 5555]);
    assert_eq!(net.connect(me, 8080), Reply::Open);
    net.knock(me, &[6666]);
    assert!(net.connect(me, 8080).is_rejected());
    wait_for("the hanging command killed", || {
        sample(
            &metrics(&net),
            "knockq_hook_runs_total{hook=\"on_revoke\",outcome=\"timeout\",policy=\"web\"}",
        ) == Some(1.0)
    });
    let metrics = metrics(&net);
    for (series, value) in [
        (
            "knockq_hook_runs_total{hook=\"on_grant\",outcome=\"ok\",policy=\"ssh\"}",
            1.0,
        ),
        (
            "knockq_hook_runs_total{hook=\"on_revoke\",outcome=\"ok\",policy=\"ssh\"}",
            1.0,
        ),
        (
            "knockq_hook_runs_total{hook=\"on_grant\",outcome=\"failed\",policy=\"web\"}",
            1.0,
        ),
    ] {
        assert_eq!(sample(&metrics, series), Some(value), "{series}\n{metrics}");
    }
    let log = gate.log();
    assert!(
        log.contains("exit status: 7: cannot reach the ticket system"),
        "{log}"
    );
    assert!(log.contains("sleep: killed after 1s"), "{log}");
}
