//! Single packet authorization end to end: Debian's `fwknop` client opens
//! the gate with one datagram, and the very next connect succeeds; replays
//! and forgeries, sent from other addresses, gain nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::util::*;

/// Two users: alice may open 22 from anywhere; bob only 22, only from the
/// second client address.
fn policy(dir: &Path) -> String {
    format!(
        r#"[[policy]]
name = "spa"
open_ports = [22, 8080]
grant_timeout = "30s"

[policy.spa]
users_dir = "{users}"

[[policy.spa.user]]
name = "alice"
key_file = "alice.key"
hmac_key_file = "alice.hmac"
"#,
        users = dir.join("users").display()
    )
}

/// Keys as `fwknop --key-gen` makes them, written as knockq's key files
/// in `dir` as `NAME.key` and `NAME.hmac`; their base64 text.
fn fwknop_keys(dir: &Path, name: &str) -> (String, String) {
    let out = run(std::process::Command::new("fwknop")
        .arg("--key-gen")
        .env("HOME", dir));
    let text = text(&out.stdout);
    let field = |key: &str| {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_once(' ').unwrap().1.trim().to_owned()
    };
    let keys = (field("KEY_BASE64:"), field("HMAC_KEY_BASE64:"));
    for (file, value) in [("key", &keys.0), ("hmac", &keys.1)] {
        let path = dir.join(format!("{name}.{file}"));
        fs::write(&path, format!("{value}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }
    keys
}

/// The `fwknop` command that sends `user`'s packet asking for `access`,
/// with `options` (`-a ADDRESS` or `-s`, `-f SECONDS`…), saving the packet
/// to `save`.
fn fwknop(
    net: &Net,
    user: &str,
    keys: &(String, String),
    access: &str,
    options: &str,
    save: &str,
) -> String {
    format!(
        "HOME={home} fwknop -A {access} {options} -D {GATE4} -U {user} --use-hmac \
         --key-base64-rijndael {} --key-base64-hmac {} --no-save-args -B {save}",
        keys.0,
        keys.1,
        home = net.dir.path().display(),
    )
}

/// Sends the saved packet `file` again from `src`, by nc.
fn replay(net: &Net, file: &str, src: &str) {
    let out = net.in_client(&format!(
        "tr -d '\\n' < {file} | nc -u -w 1 -s {src} {GATE4} 62201"
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `knockq_spa_packets_total` for `outcome`, as a scrape says.
fn spa_count(net: &Net, outcome: &str) -> u64 {
    let (_, metrics) = net.http_get(9724, "/metrics");
    let series = format!("knockq_spa_packets_total{{outcome=\"{outcome}\",policy=\"spa\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[test]
fn fwknops_client_opens_the_gate_for_the_very_next_connect() {
    if !can_run(
        "fwknops_client_opens_the_gate_for_the_very_next_connect",
        true,
        &["fwknop", "nc"],
    ) {
        return;
    }
    let mut net = Net::new();
    let dir = net.dir.path().to_owned();
    fs::create_dir(dir.join("users")).unwrap();
    let alice = fwknop_keys(&dir, "alice");
    let bob = fwknop_keys(&dir, "bob");
    let carol = fwknop_keys(&dir, "carol");
    fs::write(
        dir.join("users/carol.toml"),
        format!(
            "name = \"carol\"\nkey_file = \"{d}/carol.key\"\nhmac_key_file = \"{d}/carol.hmac\"\n\
             expires = \"2020-01-01\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    fs::write(
        dir.join("users/bob.toml"),
        format!(
            "name = \"bob\"\nkey_file = \"{d}/bob.key\"\nhmac_key_file = \"{d}/bob.hmac\"\n\
             sources = [\"{}/32\"]\nopen_ports = [22]\n",
            CLIENTS4[1],
            d = dir.display()
        ),
    )
    .unwrap();
    net.listen(&[22, 8080]);
    let config = net.config(&policy(&dir));
    net.load_rules(&config, "iptables");
    let gate = net.start_daemon(&config);
    let src = CLIENTS4[0];
    assert!(net.connect(src, 22).is_rejected());

    // The packet, then a connect at once: no sleep, no retry.
    let sent = dir.join("alice-1.spa").display().to_string();
    let send = fwknop(&net, "alice", &alice, "tcp/22", &format!("-a {src}"), &sent);
    let out = net.in_client(&format!("{send} && nc -z -w 2 -s {src} {GATE4} 22"));
    assert!(
        out.status.success(),
        "the connect right after the packet: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    gate.wait_for_log(&format!(
        "event=grant src={src} policy=spa ports=22 user=alice"
    ));
    assert!(net.connect(src, 8080).is_rejected(), "not asked for");
    assert_eq!(spa_count(&net, "granted"), 1);

    // The captured packet again: from its own address, then from another.
    replay(&net, &sent, src);
    gate.wait_for_log("reason=replayed");
    replay(&net, &sent, CLIENTS4[2]);
    gate.wait_for_log("reason=refused_address");
    assert!(net.connect(CLIENTS4[2], 22).is_rejected());

    // After a restart, the packet is still spent; its grant is back.
    assert!(gate.stop(libc::SIGTERM).success());
    let gate = net.start_daemon(&config);
    replay(&net, &sent, src);
    gate.wait_for_log(&format!(
        "event=spa_refused src={src} policy=spa reason=replayed"
    ));
    assert_eq!(net.connect(src, 22), Reply::Open, "the restored grant");

    // -s: "my packet's source", for 5 seconds by --fw-timeout.
    let sent = dir.join("alice-2.spa").display().to_string();
    let send = fwknop(&net, "alice", &alice, "tcp/22", "-s -f 5", &sent);
    let out = net.in_client(&format!("{send} && nc -z -w 2 -s {src} {GATE4} 22"));
    assert!(out.status.success(), "-s: {}", text(&out.stderr));
    replay(&net, &sent, CLIENTS4[2]);
    gate.wait_for_log(&format!(
        "event=spa_refused src={} policy=spa reason=replayed",
        CLIENTS4[2]
    ));
    assert!(
        net.connect(CLIENTS4[2], 22).is_rejected(),
        "a replay from elsewhere"
    );
    gate.wait_for_log(&format!("event=revoke src={src} policy=spa reason=timeout"));
    assert!(net.connect(src, 22).is_rejected(), "5 s later");

    // bob: only port 22, only from his address.
    let bob_src = CLIENTS4[1];
    let sent = dir.join("bob-1.spa").display().to_string();
    let send = fwknop(&net, "bob", &bob, "tcp/8080", "-s", &sent);
    // fwknop sends from the client's first address: outside bob's
    // sources, so only alice's key is tried, and fails.
    net.in_client(&send);
    gate.wait_for_log(&format!(
        "event=spa_refused src={src} policy=spa reason=bad_hmac"
    ));
    replay(&net, &sent, bob_src);
    gate.wait_for_log(&format!(
        "event=spa_refused src={bob_src} policy=spa reason=refused_port"
    ));
    assert!(net.connect(bob_src, 8080).is_rejected());

    // A reload that removes bob's file ends his grant, not alice's.
    let sent = dir.join("bob-2.spa").display().to_string();
    let out = net.in_client(&format!(
        "{} -T",
        fwknop(&net, "bob", &bob, "tcp/22", "-s", &sent)
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    replay(&net, &sent, bob_src);
    gate.wait_for_log(&format!(
        "event=grant src={bob_src} policy=spa ports=22 user=bob"
    ));
    let sent = dir.join("alice-4.spa").display().to_string();
    net.in_client(&fwknop(
        &net,
        "alice",
        &alice,
        "tcp/22",
        &format!("-a {src}"),
        &sent,
    ));
    gate.wait_for_log(&format!(
        "event=refresh src={src} policy=spa ports=22 user=alice"
    ));
    fs::remove_file(dir.join("users/bob.toml")).unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for_log(&format!(
        "event=revoke src={bob_src} policy=spa reason=user_removed"
    ));
    assert!(net.connect(bob_src, 22).is_rejected(), "bob, removed");
    assert_eq!(net.connect(src, 22), Reply::Open, "alice, kept");

    // Refused, each for its reason: carol has expired; mallory is no user
    // (alice's keys, another name); a packet made 10 minutes ago; a legacy
    // packet without an HMAC, and one in GPG mode.
    let sent = dir.join("carol.spa").display().to_string();
    net.in_client(&fwknop(
        &net,
        "carol",
        &carol,
        "tcp/22",
        &format!("-a {src}"),
        &sent,
    ));
    gate.wait_for_log(&format!(
        "event=spa_refused src={src} policy=spa reason=expired_user"
    ));
    let sent = dir.join("mallory-name.spa").display().to_string();
    net.in_client(&fwknop(
        &net,
        "mallory",
        &alice,
        "tcp/22",
        &format!("-a {src}"),
        &sent,
    ));
    gate.wait_for_log(&format!(
        "event=spa_refused src={src} policy=spa reason=unknown_user"
    ));
    let sent = dir.join("old.spa").display().to_string();
    let old = fwknop(&net, "alice", &alice, "tcp/22", &format!("-a {src}"), &sent);
    net.in_client(&old.replace(" fwknop ", " faketime -f -10m fwknop "));
    gate.wait_for_log(&format!(
        "event=spa_refused src={src} policy=spa reason=too_old"
    ));
    let sent = dir.join("legacy.spa").display().to_string();
    let legacy = fwknop(&net, "alice", &alice, "tcp/22", &format!("-a {src}"), &sent);
    let legacy = legacy
        .replace(" --use-hmac", "")
        .replace(&format!(" --key-base64-hmac {}", alice.1), "");
    net.in_client(&legacy);
    wait_for("the legacy packet counted", || {
        spa_count(&net, "bad_hmac") == 2
    });
    // A GPG-mode packet, for a key made here.
    let gpg = dir.join("gnupg");
    let out = run(std::process::Command::new("sh").arg("-c").arg(format!(
        "mkdir -m 700 {g} && GNUPGHOME={g} gpg --batch --passphrase '' \
         --quick-gen-key 'gate <gate@knockq.test>' default default never",
        g = gpg.display()
    )));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sent = dir.join("gpg.spa").display().to_string();
    let out = net.in_client(&format!(
        "HOME={d} GNUPGHOME={g} fwknop -A tcp/22 -a {src} -D {GATE4} --gpg-encryption \
         --gpg-recipient-key gate@knockq.test --gpg-home-dir {g} --gpg-no-signing-pw \
         --no-save-args -T -B {sent}",
        d = dir.display(),
        g = gpg.display()
    ));
    // fwknop's test mode then fails to read back its own packet, which
    // it cannot decrypt without a signature: the packet was written.
    let packet = fs::read_to_string(&sent).unwrap_or_default();
    assert!(
        packet.len() > 500,
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    replay(&net, &sent, src);
    wait_for("the GPG packet counted", || {
        spa_count(&net, "bad_hmac") == 3
    });

    // Forgeries: the wrong keys, a flipped byte, a cut packet, noise.
    let wrong = fwknop_keys(&dir, "mallory");
    let sent = dir.join("mallory.spa").display().to_string();
    net.in_client(&fwknop(
        &net,
        "alice",
        &wrong,
        "tcp/22",
        &format!("-a {src}"),
        &sent,
    ));
    let good = dir.join("alice-3.spa").display().to_string();
    let send = fwknop(&net, "alice", &alice, "tcp/22", "-s", &good);
    let out = net.in_client(&format!("{} -T", send));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let packet = fs::read_to_string(&good).unwrap();
    let packet = packet.trim_end();
    let mut flipped = packet.as_bytes().to_vec();
    flipped[40] = if flipped[40] == b'A' { b'B' } else { b'A' };
    let variants = [
        ("flipped", String::from_utf8(flipped).unwrap()),
        ("cut", packet[..packet.len() - 10].to_owned()),
        ("noise", "x".repeat(1500)),
    ];
    for (name, bytes) in &variants {
        let file = dir.join(format!("{name}.spa"));
        fs::write(&file, bytes).unwrap();
        replay(&net, &file.display().to_string(), CLIENTS4[3]);
    }
    // Bob's from outside his sources, the legacy and GPG packets,
    // mallory's keys and the three variants.
    wait_for("the forgeries counted", || spa_count(&net, "bad_hmac") == 7);
    assert!(net.connect(CLIENTS4[3], 22).is_rejected());
    // Since the restart: the -s packet, bob's and alice's again.
    assert_eq!(spa_count(&net, "granted"), 3);
    assert_eq!(net.pending_packets(), 0);
}

/// A client configuration with profile `gate`: `user`'s keys in `dir`,
/// asking for 22 for `source`.
fn client_profile(dir: &Path, user: &str, source: &str) -> std::path::PathBuf {
    let path = dir.join(format!("client-{user}.toml"));
    fs::write(
        &path,
        format!(
            "[profile.gate]\nhost = \"{GATE4}\"\nport = 22\n[profile.gate.spa]\nuser = \"{user}\"\n\
             key_file = \"{user}.key\"\nhmac_key_file = \"{user}.hmac\"\naccess = [22]\nsource = \"{source}\"\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn knockqs_client_opens_knockq_and_fwknopd() {
    if !can_run(
        "knockqs_client_opens_knockq_and_fwknopd",
        true,
        &["fwknop", "fwknopd", "nc", "iptables"],
    ) {
        return;
    }
    let mut net = Net::new();
    let dir = net.dir.path().to_owned();
    fs::create_dir(dir.join("users")).unwrap();
    let alice = fwknop_keys(&dir, "alice");
    net.listen(&[22]);
    let src = CLIENTS4[0];
    let knockq = env!("CARGO_BIN_EXE_knockq");

    // knockq's client against knockq: the connect right after the packet.
    let gate = net.start_gate(&policy(&dir), IPV4_RULES);
    let profile = client_profile(&dir, "alice", "auto");
    let out = net.in_client(&format!(
        "{knockq} knock --profile gate --client-config {} -v && nc -z -w 2 -s {src} {GATE4} 22",
        profile.display()
    ));
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    gate.wait_for_log(&format!(
        "event=grant src={src} policy=spa ports=22 user=alice"
    ));
    let status = net.knockq_control("status");
    assert!(
        text(&status.stdout).contains("user alice"),
        "{}",
        text(&status.stdout)
    );
    drop(gate);
    net.in_gate("iptables -F && iptables -X");

    // knockq's client against Debian's fwknopd, with its own access.conf
    // and iptables: port 22 rejected until fwknopd's rule lets the source in.
    fs::write(
        dir.join("access.conf"),
        format!(
            "SOURCE ANY\nKEY_BASE64 {}\nHMAC_KEY_BASE64 {}\nFW_ACCESS_TIMEOUT 30\n",
            alice.0, alice.1
        ),
    )
    .unwrap();
    fs::write(dir.join("fwknopd.conf"), "").unwrap();
    let out = net.in_gate(&format!("iptables -A INPUT -p tcp --dport 22 -j REJECT"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(net.connect(src, 22).is_rejected());
    let run_dir = dir.join("fwknopd-run");
    fs::create_dir(&run_dir).unwrap();
    let (conf, access, run) = (
        dir.join("fwknopd.conf").display().to_string(),
        dir.join("access.conf").display().to_string(),
        run_dir.display().to_string(),
    );
    net.spawn_in_gate(
        "fwknopd",
        &["-f", "-i", "veth0", "-c", &conf, "-a", &access, "-r", &run],
    );
    // It sniffs from its main loop on: a packet sent before is not seen.
    wait_for("fwknopd's main loop", || {
        fs::read_to_string(dir.join("fwknopd.log")).is_ok_and(|log| log.contains("main event loop"))
    });
    let any = client_profile(&dir, "alice", "0.0.0.0");
    let out = net.in_client(&format!(
        "{knockq} knock --profile gate --client-config {}",
        any.display()
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // fwknopd sniffs, then runs iptables: the port opens a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.connect(src, 22) != Reply::Open {
        let log = fs::read_to_string(dir.join("fwknopd.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "fwknopd did not open 22:\n{log}");
    }
    let log = fs::read_to_string(dir.join("fwknopd.log")).unwrap();
    assert!(log.contains(&format!("SPA Packet from IP: {src}")), "{log}");
}

#[test]
fn a_real_client_gets_in_during_a_flood_of_forged_packets() {
    let test = "a_real_client_gets_in_during_a_flood_of_forged_packets";
    if !can_run(test, true, &["fwknop", "nc", "trafgen"]) {
        return;
    }
    let mut net = Net::alone();
    let dir = net.dir.path().to_owned();
    fs::create_dir(dir.join("users")).unwrap();
    let alice = fwknop_keys(&dir, "alice");
    net.listen(&[22]);
    let config = net.config(&policy(&dir));
    net.load_rules(&config, "iptables");
    // Per-packet debug lines would log the whole flood.
    let _gate = net.start_daemon_logging(&config, &[], "info");
    // The forgery: a real packet with one character changed, so that
    // every copy costs the gate a whole HMAC, as a forger's best would.
    let made = dir.join("made.spa").display().to_string();
    let out = net.in_client(&format!(
        "{} -T",
        fwknop(&net, "alice", &alice, "tcp/22", "-s", &made)
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut forged = fs::read_to_string(&made).unwrap().trim_end().to_owned();
    let flipped = if forged.ends_with('A') { "B" } else { "A" };
    forged.replace_range(forged.len() - 1.., flipped);
    let flood = Flood::start(
        &net,
        &format!("udp(sp=drnd(), dp=62201), \"{forged}\""),
        Some("100000pps"),
    );
    // A second of it at least, before the real client sends.
    wait_for("a second of flood to reach the gate", || {
        spa_count(&net, "bad_hmac") > 100_000
    });
    let src = CLIENTS4[0];
    let sent = dir.join("during.spa").display().to_string();
    let send = fwknop(&net, "alice", &alice, "tcp/22", &format!("-a {src}"), &sent);
    let started = Instant::now();
    let out = net.in_client(&send);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The connects of a user who tries again at once, for a second.
    let opened = (0..20).any(|_| net.connect_within(src, 22, 1) == Reply::Open);
    let took = started.elapsed();
    let forged_decided = spa_count(&net, "bad_hmac");
    sleep(Duration::from_millis(200));
    let still_flooding = spa_count(&net, "bad_hmac") > forged_decided;
    drop(flood);
    assert!(opened, "no way in within 20 tries during the flood");
    assert!(still_flooding, "the flood went on throughout");
    assert_eq!(spa_count(&net, "granted"), 1);
    eprintln!(
        "knockq: the real packet got in {} ms after it was sent, with {forged_decided} forged packets decided",
        took.as_millis()
    );
}

#[test]
fn ssh_goes_through_right_after_the_packet_and_with_knockq_connect() {
    let test = "ssh_goes_through_right_after_the_packet_and_with_knockq_connect";
    if !can_run(
        test,
        true,
        &["fwknop", "ssh", "ssh-keygen", "/usr/sbin/sshd"],
    ) {
        return;
    }
    let mut net = Net::new();
    let dir = net.dir.path().to_owned();
    fs::create_dir(dir.join("users")).unwrap();
    let alice = fwknop_keys(&dir, "alice");
    let ssh = crate::client::start_sshd(&mut net);
    let _gate = net.start_gate(&policy(&dir), IPV4_RULES);
    let src = CLIENTS4[0];
    assert!(!ssh.run(&net, "").status.success(), "ssh without a packet");

    // fwknop's packet, then ssh at once.
    let sent = dir.join("alice.spa").display().to_string();
    let send = fwknop(&net, "alice", &alice, "tcp/22", &format!("-a {src}"), &sent);
    let out = net.in_client(&format!("{send} && {}", ssh.command("")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through-42\n");

    // knockq connect as ssh's ProxyCommand sends the packet, then connects.
    let out = net.knockq_control(&format!("revoke {src}"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!ssh.run(&net, "").status.success(), "ssh after the revoke");
    let profile = client_profile(&dir, "alice", "auto");
    let bin = env!("CARGO_BIN_EXE_knockq");
    let proxy = format!(
        "-o ProxyCommand='{bin} connect --profile gate --client-config {} %h %p'",
        profile.display()
    );
    let out = ssh.run(&net, &proxy);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through-42\n");
}
