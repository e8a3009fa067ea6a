//! The kernel fast path (`[rules] offload = true`): every end-to-end test of
//! the gate again with it, and the cases only offload has, where the kernel
//! decides by itself from the sets knockq keeps. The rules come from
//! `knockq rules --apply` (auto): iptables and ipsets here, nft sets on
//! Debian's kernel in `vm::gate_tests_on_debians_stock_kernel`.

use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use crate::util::*;

/// The end-to-end tests of the gate, run again with offload.
const AGAIN_WITH_OFFLOAD: &[&str] = &[
    "gate::",
    "udp::",
    "spa::",
    "rules::",
    "scripts::",
    "simulate::",
    "resilience::",
    "observe::",
    "client::",
    "cluster::",
];

/// This same test binary, on the tests above, with [`OFFLOAD`] set: every
/// configuration they write gets `[rules] offload = true`, and their rules
/// are loaded with their sets.
#[test]
fn every_gate_test_again_with_offload() {
    let test = "every_gate_test_again_with_offload";
    if !can_run_end_to_end(test) {
        return;
    }
    // The tests inside share the machine among themselves.
    let _alone = Net::machine_alone();
    let out = run(Command::new(std::env::current_exe().unwrap())
        .args(AGAIN_WITH_OFFLOAD)
        .env(OFFLOAD, "1"));
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let results: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("test ") || l.contains("test result") || l.contains("NOT RUN"))
        .collect();
    eprintln!("with offload:\n{}", results.join("\n"));
    assert!(out.status.success(), "tests failed with offload:\n{report}");
    assert!(
        report.contains("test gate::behaves_like_the_xt_recent_recipe ... ok"),
        "{report}"
    );
}

/// Sources leave the knocking set this long after their last knock: the
/// one-second step window of [`config`], one second more, and a margin.
const KNOCKING_GONE: Duration = Duration::from_millis(2300);

/// The seed policy with offload, short windows, and `extra` policies.
fn config(grant_timeout: &str, extra: &str) -> String {
    format!(
        "[rules]\noffload = true\n\n[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\n\
         open_ports = [22, 8080]\nclose_port = 3333\nstep_timeout = \"1s\"\n{grant_timeout}\n{extra}"
    )
}

/// The kernel's own accepts and rejects so far, from the metrics.
fn kernel_verdicts(net: &Net) -> (f64, f64) {
    let (_, body) = net.http_get(9724, "/metrics");
    let count = |verdict: &str| {
        sample(
            &body,
            &format!("knockq_kernel_verdicts_total{{verdict=\"{verdict}\"}}"),
        )
        .unwrap_or_else(|| panic!("no kernel verdicts in\n{body}"))
    };
    (count("accept"), count("reject"))
}

/// Asserts that `connect` is answered by the kernel, not the engine, with
/// `open` or a reject.
fn kernel_answers(net: &Net, src: &str, port: u16, open: bool) {
    let (accepted, rejected) = kernel_verdicts(net);
    let reply = net.connect(src, port);
    match open {
        true => assert_eq!(reply, Reply::Open, "{src} to {port}"),
        false => assert!(reply.is_rejected(), "{src} to {port}: {reply:?}"),
    }
    // A kernel reject can reach a client on the same machine while its
    // connect() still holds the socket; TCP then sends the SYN again.
    let (now_accepted, now_rejected) = kernel_verdicts(net);
    match open {
        true => assert_eq!(now_accepted, accepted + 1.0, "accepted by the kernel"),
        false => assert!(now_rejected > rejected, "rejected by the kernel"),
    }
}

fn start(net: &Net, text: &str) -> Daemon {
    net.start_gate(text, APPLIED_RULES)
}

#[test]
fn a_grant_ends_in_the_kernel_by_its_own_timeout() {
    if !can_run_end_to_end("a_grant_ends_in_the_kernel_by_its_own_timeout") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let gate = start(&net, &config("grant_timeout = \"5s\"", ""));
    let src = CLIENTS4[0];
    net.knock(src, &[1111, 2222]);
    sleep(KNOCKING_GONE);
    kernel_answers(&net, src, 22, true);
    // The grant's five seconds, from the last knock, and a margin.
    sleep(Duration::from_millis(3200));
    kernel_answers(&net, src, 22, false);
    // The engine expired it too, without a set update of its own.
    gate.wait_for_log("event=revoke src=10.9.0.2 policy=ssh reason=timeout");
    let (_, body) = net.http_get(9724, "/metrics");
    assert_eq!(
        sample(&body, r#"knockq_kernel_set_updates_total{outcome="ok"}"#),
        Some(1.0),
        "one update, for the grant: {body}"
    );
}

/// The no-race rule with a full knocking set: the close knock's revoke is
/// in the kernel before its verdict, so the SYN right after it, which the
/// knocking set could not send to the queue, is rejected by the kernel.
#[test]
fn a_close_knock_then_at_once_a_syn_to_an_open_port_with_the_knocking_set_full() {
    if !can_run_end_to_end(
        "a_close_knock_then_at_once_a_syn_to_an_open_port_with_the_knocking_set_full",
    ) {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    // One place in the knocking set.
    let _gate = start(&net, &config("", "[limits]\nmax_sources = 1\n"));
    let [me, other, ..] = CLIENTS4;
    // Granted by hand, so never in the knocking set, whose only place
    // another source then takes.
    succeeded(
        net.knockq_control(&format!("grant {me} --policy ssh")),
        "grant",
    );
    kernel_answers(&net, me, 22, true);
    net.knock(other, &[1111]);
    let (_, rejected) = kernel_verdicts(&net);
    let out = net.in_client(&format!(
        "nc -4 -z -w 3 -s {me} {GATE4} 3333; nc -4 -v -z -w 3 -s {me} {GATE4} 22"
    ));
    assert!(!out.status.success(), "22 after the close knock: open");
    let (_, body) = net.http_get(9724, "/metrics");
    assert_eq!(
        sample(&body, "knockq_kernel_knocking_set_full_total"),
        Some(1.0),
        "the close knock found the knocking set full: {body}"
    );
    assert!(
        sample(&body, r#"knockq_kernel_verdicts_total{verdict="reject"}"#).unwrap() > rejected,
        "22 rejected by the kernel: {body}"
    );
}

#[test]
fn an_admin_revoke_of_an_idle_source_reaches_the_kernel() {
    if !can_run_end_to_end("an_admin_revoke_of_an_idle_source_reaches_the_kernel") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 8080]);
    let _gate = start(&net, &config("", ""));
    let src = CLIENTS4[1];
    succeeded(
        net.knockq_control(&format!("grant {src} --policy ssh")),
        "grant",
    );
    kernel_answers(&net, src, 8080, true);
    succeeded(net.knockq_control(&format!("revoke {src}")), "revoke");
    kernel_answers(&net, src, 8080, false);
    kernel_answers(&net, src, 22, false);
}

/// Granted sources keep their access while knockq is down; new knocks fail
/// closed; a restart puts exactly the saved grants in the kernel.
#[test]
fn a_restart_puts_exactly_the_restored_grants_in_the_kernel() {
    if !can_run_end_to_end("a_restart_puts_exactly_the_restored_grants_in_the_kernel") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let text = config("", "");
    let config = net.config(&text);
    net.load_rules(&config, "auto");
    let gate = net.start_daemon(&config);
    let [granted, stranger, planted, ..] = CLIENTS4;
    net.knock(granted, &[1111, 2222]);
    assert_eq!(gate.stop(libc::SIGTERM).code(), Some(0));
    sleep(KNOCKING_GONE);

    // Down: the kernel still lets the granted source in, knocks go nowhere.
    assert_eq!(net.connect(granted, 22), Reply::Open);
    assert!(!net.connect(stranger, 1111).is_rejected(), "fail closed");
    // A pair knockq never granted, planted in the kernel's set meanwhile.
    let nft = net
        .in_gate("nft list set inet knockq granted4")
        .status
        .success();
    let plant = match nft {
        true => format!("nft add element inet knockq granted4 {{ {planted} . tcp . 22 }}"),
        false => format!("ipset add knockq-granted4 {planted},tcp:22"),
    };
    succeeded(net.in_gate(&plant), "plant");
    assert_eq!(net.connect(planted, 22), Reply::Open, "planted");

    let gate = net.start_daemon(&config);
    gate.wait_for_log("restored 1 grants");
    gate.wait_for_log("hold 2 granted pairs");
    kernel_answers(&net, granted, 22, true);
    kernel_answers(&net, planted, 22, false);
}

#[test]
fn a_reload_that_removes_a_policy_takes_its_grants_out_of_the_kernel() {
    if !can_run_end_to_end("a_reload_that_removes_a_policy_takes_its_grants_out_of_the_kernel") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 8443]);
    let web = "[[policy]]\nname = \"web\"\nsequence = [5000, 6000]\nopen_ports = [8443]\nstep_timeout = \"1s\"\n";
    let config = net.config(&config("", web));
    net.load_rules(&config, "auto");
    let gate = net.start_daemon(&config);
    let [a, b, ..] = CLIENTS4;
    net.knock(a, &[1111, 2222]);
    net.knock(b, &[5000, 6000]);
    sleep(KNOCKING_GONE);
    kernel_answers(&net, b, 8443, true);

    std::fs::write(&config, self::config("", "")).unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for_log("event=reload kept=ssh fresh= dropped=web");
    kernel_answers(&net, b, 8443, false);
    kernel_answers(&net, a, 22, true);
    // The removed policy's knock ports left the kernel's knock ports too.
    kernel_answers(&net, b, 5000, false);
}

/// Policies may share open ports: the pair stays while any grant opens it.
#[test]
fn a_port_two_grants_open_stays_open_until_both_end() {
    if !can_run_end_to_end("a_port_two_grants_open_stays_open_until_both_end") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 8080]);
    let ops = "[[policy]]\nname = \"ops\"\nsequence = [5000, 6000]\nopen_ports = [22]\nclose_port = 7000\nstep_timeout = \"1s\"\n";
    let _gate = start(&net, &config("", ops));
    let src = CLIENTS4[2];
    net.knock(src, &[1111, 2222, 5000, 6000, 3333]);
    sleep(KNOCKING_GONE);
    kernel_answers(&net, src, 22, true);
    kernel_answers(&net, src, 8080, false);
    net.knock(src, &[7000]);
    sleep(KNOCKING_GONE);
    kernel_answers(&net, src, 22, false);
}
