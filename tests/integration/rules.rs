//! `knockq rules --apply`, `--remove` and `--backend auto` against the real
//! kernel's firewall, in throwaway namespaces; also run on Debian's kernel
//! by `vm::gate_tests_on_debians_stock_kernel`.

use crate::gate::walkthrough;
use crate::util::*;

/// `knockq rules ARGS` in the gate namespace, with a configuration.
fn rules(net: &Net, config: &std::path::Path, args: &str) -> std::process::Output {
    net.knockq_in_gate(&format!("rules --config {} {args}", config.display()))
}

/// The gate's whole iptables and ip6tables filter tables, and its ipsets.
fn iptables_state(net: &Net) -> String {
    text(
        &net.in_gate("iptables -S; ip6tables -S; ipset list -n")
            .stdout,
    )
}

#[test]
fn apply_and_remove_keep_the_hosts_own_iptables_rules() {
    let test = "apply_and_remove_keep_the_hosts_own_iptables_rules";
    if !can_run_end_to_end(test) {
        return;
    }
    let net = Net::new();
    let config = net.config(EXAMPLE_CONFIG);
    succeeded(
        net.in_gate(
            "iptables -A INPUT -p tcp --dport 9 -j ACCEPT && iptables -N HOST && \
             ip6tables -A INPUT -p tcp --dport 9 -j ACCEPT",
        ),
        "the host's own rules",
    );
    let host = iptables_state(&net);

    for _ in 0..2 {
        succeeded(rules(&net, &config, "--apply --backend iptables"), "apply");
    }
    for tool in ["iptables", "ip6tables"] {
        let input = text(&net.in_gate(&format!("{tool} -S INPUT")).stdout);
        assert_eq!(
            input.lines().collect::<Vec<_>>(),
            [
                "-P INPUT ACCEPT",
                "-A INPUT -p tcp -m tcp --dport 9 -j ACCEPT",
                "-A INPUT -j KNOCKQ"
            ],
            "{tool}: the host's rule first, then one jump however often applied"
        );
        // With offload, the queue rules are in the chain that decides SYNs.
        let chains = text(&net.in_gate(&format!("{tool} -S")).stdout);
        assert!(
            chains.contains("-A KNOCKQ") && chains.contains("-j NFQUEUE --queue-num 0"),
            "{tool}: {chains}"
        );
    }
    // The loaded rules are the printed ones: the same rules in chain KNOCKQ.
    let printed = text(&rules(&net, &config, "--backend iptables").stdout);
    let loaded = text(&net.in_gate("iptables-save -t filter").stdout);
    let chain_rules = |dump: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.starts_with("-A KNOCKQ"))
            .map(str::to_owned)
            .collect()
    };
    let printed_file = net.dir.path().join("printed.iptables");
    std::fs::write(&printed_file, printed).unwrap();
    let reloaded = Net::new();
    // With offload, the printed rules use the ipsets printed beside them.
    let ipsets = text(&rules(&net, &config, "--backend ipset").stdout);
    let ipsets_file = net.dir.path().join("printed.ipset");
    std::fs::write(&ipsets_file, ipsets).unwrap();
    succeeded(
        reloaded.in_gate(&format!(
            "ipset -exist restore < {} && iptables-restore < {}",
            ipsets_file.display(),
            printed_file.display()
        )),
        "the printed rules",
    );
    let expected = text(&reloaded.in_gate("iptables-save -t filter").stdout);
    assert_eq!(chain_rules(&loaded), chain_rules(&expected));

    let out = succeeded(
        net.knockq_in_gate("rules --remove --backend iptables"),
        "remove",
    );
    assert!(text(&out.stderr).contains("removed the iptables rules"));
    assert_eq!(iptables_state(&net), host, "exactly knockq's rules removed");
    let again = succeeded(net.knockq_in_gate("rules --remove"), "remove again");
    assert_eq!(text(&again.stderr), "", "nothing left to remove");
}

#[test]
fn apply_and_remove_keep_the_hosts_own_nft_tables() {
    let test = "apply_and_remove_keep_the_hosts_own_nft_tables";
    if !can_run_end_to_end(test) || !can_queue_from_nft(test) {
        return;
    }
    let net = Net::new();
    let config = net.config(EXAMPLE_CONFIG);
    succeeded(
        net.in_gate(
            "nft add table inet host && nft add chain inet host input \
             '{ type filter hook input priority 0; policy accept; }' && \
             nft add rule inet host input tcp dport 9 accept",
        ),
        "the host's own table",
    );
    let host = text(&net.in_gate("nft list ruleset").stdout);
    for _ in 0..2 {
        succeeded(rules(&net, &config, "--apply --backend nft"), "apply");
    }
    let tables = text(&net.in_gate("nft list tables").stdout);
    assert_eq!(tables, "table inet host\ntable inet knockq\n");
    let knockq = text(&net.in_gate("nft list table inet knockq").stdout);
    // With offload: knock ports, knocking IPv4 and IPv6 sources.
    let queue_rules = if offload_on() { 3 } else { 1 };
    assert_eq!(knockq.matches("queue").count(), queue_rules, "{knockq}");
    succeeded(net.knockq_in_gate("rules --remove --backend nft"), "remove");
    assert_eq!(text(&net.in_gate("nft list ruleset").stdout), host);
}

/// `auto` asks the kernel: nft exactly where it can queue from nft, checked
/// here by loading a queue rule for real.
#[test]
fn auto_picks_nft_exactly_where_the_kernel_can_queue_from_it() {
    let test = "auto_picks_nft_exactly_where_the_kernel_can_queue_from_it";
    if !can_run_end_to_end(test) {
        return;
    }
    let net = Net::new();
    let config = net.config(EXAMPLE_CONFIG);
    let printed = |backend: &str| text(&succeeded(rules(&net, &config, backend), backend).stdout);
    let auto = printed("--backend auto");
    let nft = nft_can_queue();
    if in_emulated_vm() {
        assert!(nft, "Debian's kernel queues from nft");
    }
    let expected = match (nft, offload_on()) {
        (true, _) => printed("--backend nft"),
        (false, false) => printed("--backend iptables") + &printed("--backend ip6tables"),
        (false, true) => {
            printed("--backend ipset")
                + &printed("--backend iptables")
                + &printed("--backend ip6tables")
        }
    };
    assert_eq!(auto, expected);

    succeeded(rules(&net, &config, "--apply"), "apply");
    let nft_table = net.in_gate("nft list table inet knockq").status.success();
    let chain = net
        .in_gate("iptables -S KNOCKQ && ip6tables -S KNOCKQ")
        .status
        .success();
    assert_eq!((nft_table, chain), (nft, !nft), "loaded where auto said");
    succeeded(net.knockq_in_gate("rules --remove"), "remove");
    assert!(!net.in_gate("nft list table inet knockq").status.success());
    assert!(!net.in_gate("iptables -S KNOCKQ").status.success());
    assert!(!net.in_gate("ip6tables -S KNOCKQ").status.success());
}

/// The seed walkthrough through the rules `--apply --backend auto` loaded.
#[test]
fn walkthrough_with_applied_rules_both_families() {
    if can_run_end_to_end("walkthrough_with_applied_rules_both_families") {
        walkthrough(APPLIED_RULES, CLIENTS4);
        walkthrough(APPLIED_RULES, CLIENTS6);
    }
}

#[test]
fn run_says_which_rules_are_loaded() {
    if !can_run_end_to_end("run_says_which_rules_are_loaded") {
        return;
    }
    let net = Net::new();
    let config = net.config(EXAMPLE_CONFIG);
    if offload_on() {
        // Offload without its sets: nothing could keep them, so no start.
        let out = net.knockq_in_gate(&format!(
            "run --config {} --control-socket {} --state-dir {}",
            config.display(),
            net.control_socket().display(),
            net.state_dir().display()
        ));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(
                "[rules] offload is on but the kernel holds none of knockq's sets: \
                 load the rules with `knockq rules --apply`"
            ),
            "{}",
            text(&out.stderr)
        );
    } else {
        let gate = net.start_daemon(&config);
        gate.wait_for_log("no knockq rules are loaded");
    }
    let mut cases = vec![("iptables", "loaded through iptables and ip6tables")];
    if nft_can_queue() {
        cases.push(("nft", "loaded through nft"));
    }
    for (backend, said) in cases {
        succeeded(
            rules(&net, &config, &format!("--apply --backend {backend}")),
            "apply",
        );
        let gate = net.start_daemon(&config);
        gate.wait_for_log(said);
        drop(gate);
        succeeded(net.knockq_in_gate("rules --remove"), "remove");
    }
}

/// A configuration that does not load changes nothing in the kernel.
#[test]
fn a_refused_configuration_loads_nothing() {
    if !can_run_end_to_end("a_refused_configuration_loads_nothing") {
        return;
    }
    let net = Net::new();
    let config = net.config(&EXAMPLE_CONFIG.replace("count = 1", "count = 0"));
    let before = iptables_state(&net) + &text(&net.in_gate("nft list ruleset").stdout);
    for backend in ["auto", "iptables", "nft"] {
        let out = rules(&net, &config, &format!("--apply --backend {backend}"));
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stderr).lines().count(),
            1,
            "{}",
            text(&out.stderr)
        );
    }
    let after = iptables_state(&net) + &text(&net.in_gate("nft list ruleset").stdout);
    assert_eq!(after, before);
}
