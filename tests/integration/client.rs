//! The knock client end to end: `knockq knock` and `knockq connect` against a
//! running gate, OpenSSH with `knockq connect` as its ProxyCommand, and
//! rotating sequences that a recorded knock cannot reuse.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::util::*;

const BIN: &str = env!("CARGO_BIN_EXE_knockq");

#[test]
fn knock_opens_a_fixed_policy_for_an_immediate_connect() {
    if !can_run_end_to_end("knock_opens_a_fixed_policy_for_an_immediate_connect") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22, 8080]);
    let _gate = net.start_gate(EXAMPLE_CONFIG, DUAL_STACK_RULES);
    net.client_hosts(&format!("{GATE4} gate.knockq.test\n"));
    let me = CLIENTS4[0];
    assert!(net.connect(me, 22).is_rejected());
    // By name, then a connect right after: the last knock's state change is
    // in before the connect's SYN is decided.
    succeeded(
        net.in_client(&format!(
            "{BIN} knock gate.knockq.test 1111 2222 && nc -4 -z -w 3 -s {me} {GATE4} 22"
        )),
        "knock then connect",
    );
    // IPv6, and `connect` itself: refused before the knock, through after it.
    // A reject decided in the kernel (offload) can come back over the veth
    // pair while connect() still holds its socket: TCP then keeps it as a
    // soft error until the SYN is sent again, a second later. The attempt
    // waits past that.
    let before = net.in_client(&format!(
        "{BIN} connect {GATE6} 8080 --wait 1s --timeout 3s </dev/null"
    ));
    assert_eq!(before.status.code(), Some(69), "{}", text(&before.stderr));
    assert_eq!(
        text(&before.stderr),
        format!("knockq: cannot connect to [{GATE6}]:8080 after knocking: Permission denied (os error 13)\n")
    );
    succeeded(
        net.in_client(&format!(
            "{BIN} connect {GATE6} 8080 --knock 1111,2222 </dev/null"
        )),
        "connect --knock over IPv6",
    );
}

#[test]
fn unreachable_or_unknown_hosts_are_one_line_errors() {
    if !can_run_end_to_end("unreachable_or_unknown_hosts_are_one_line_errors") {
        return;
    }
    let net = Net::new();
    // The client namespace has a route to the gate's /24 only.
    let out = net.in_client(&format!("{BIN} knock 10.99.0.1 1111 2222"));
    assert_eq!(out.status.code(), Some(69));
    assert_eq!(
        text(&out.stderr),
        "knockq: cannot knock 10.99.0.1:1111: Network is unreachable (os error 101)\n"
    );
    // Name lookups fail inside the namespace: nothing it can reach serves DNS.
    let out = net.in_client(&format!("{BIN} knock gate.knockq.invalid 1111"));
    assert_eq!(out.status.code(), Some(68), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("knockq: cannot resolve gate.knockq.invalid: ")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// A rotating policy "ops" with a short period, so a test can wait windows
/// out, and a fixed-sequence policy for the ssh test.
const ROTATING_PERIOD_SECS: u64 = 6;

fn rotating_config() -> String {
    format!(
        "{EXAMPLE_CONFIG}
[[policy]]
name = \"ops\"
open_ports = [22]
close_port = 4444
[policy.rotating]
secret_file = \"ops.key\"
period = \"{ROTATING_PERIOD_SECS}s\"
ports = \"20000-59999\"
"
    )
}

/// A client configuration with profile "ops" for the gate, reading the
/// secret at `secret`.
fn client_config(net: &Net, secret: &str) -> PathBuf {
    let path = net.dir.path().join(format!("client-{secret}.toml"));
    fs::write(
        &path,
        format!(
            "[profile.ops]
host = \"{GATE4}\"
port = 22
close_port = 4444
[profile.ops.rotating]
secret_file = \"{secret}\"
period = \"{ROTATING_PERIOD_SECS}s\"
ports = \"20000-59999\"
"
        ),
    )
    .unwrap();
    path
}

fn keygen(net: &Net, name: &str) {
    let key = net.dir.path().join(name);
    succeeded(run(knockq().arg("keygen").arg(&key)), "keygen");
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Sleeps until 0.3 s into the next rotating window.
fn wait_for_next_window() {
    let period = ROTATING_PERIOD_SECS as f64;
    let into = unix_secs() % period;
    sleep(Duration::from_secs_f64(period - into + 0.3));
}

/// `knockq knock --profile ops` from the client namespace, with its own
/// record of used windows; returns the ports it knocked.
fn knock_ops(net: &Net, config: &Path, state: &str, prefix: &str) -> Vec<u16> {
    let out = succeeded(
        net.in_client(&format!(
            "XDG_STATE_HOME={}/{state} {prefix} {BIN} knock --profile ops --client-config {} -v",
            net.dir.path().display(),
            config.display()
        )),
        "knock --profile ops",
    );
    let ports: Vec<u16> = text(&out.stderr)
        .lines()
        .filter_map(|line| line.split(" port ").nth(1)?.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(ports.len(), 3, "{}", text(&out.stderr));
    ports
}

/// Knocks `ports` with nc from `src`, as an observer who recorded them
/// would, and tries the protected port.
fn replay(net: &Net, src: &str, ports: &[u16]) -> Reply {
    for &port in ports {
        assert!(
            net.connect(src, port).is_rejected(),
            "replayed knock {port}"
        );
    }
    net.connect(src, 22)
}

#[test]
fn a_recorded_rotating_knock_cannot_be_reused() {
    if !can_run_end_to_end("a_recorded_rotating_knock_cannot_be_reused")
        || !can_run(
            "a_recorded_rotating_knock_cannot_be_reused",
            true,
            &["faketime"],
        )
    {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    keygen(&net, "ops.key");
    keygen(&net, "wrong.key");
    let gate = net.start_gate(&rotating_config(), IPV4_RULES);
    let client = client_config(&net, "ops.key");
    let [me, observer, later, latest] = CLIENTS4;

    wait_for_next_window();
    let sent = knock_ops(&net, &client, "me", "");
    assert_eq!(net.connect(me, 22), Reply::Open, "the client's knock opens");
    assert!(
        replay(&net, observer, &sent).is_rejected(),
        "replayed from another address in the same window"
    );
    gate.wait_for_log(&format!("event=replay src={observer} policy=ops"));
    wait_for_next_window();
    assert!(
        replay(&net, later, &sent).is_rejected(),
        "replayed in the next window, which still accepts the previous one"
    );
    gate.wait_for_log(&format!("event=replay src={later} policy=ops"));
    wait_for_next_window();
    assert!(
        replay(&net, latest, &sent).is_rejected(),
        "replayed two windows later"
    );
    assert_eq!(net.connect(me, 22), Reply::Open, "the real grant stays");

    // A client whose clock is one period behind knocks the previous window,
    // which the gate still accepts.
    succeeded(net.knockq_control(&format!("revoke {me}")), "revoke");
    assert!(net.connect(me, 22).is_rejected());
    wait_for_next_window();
    let behind = format!("faketime -f -{ROTATING_PERIOD_SECS}");
    knock_ops(&net, &client, "behind", &behind);
    assert_eq!(
        net.connect(me, 22),
        Reply::Open,
        "a clock one period behind"
    );

    // A wrong secret never opens, in any window.
    succeeded(net.knockq_control(&format!("revoke {me}")), "revoke");
    let wrong = client_config(&net, "wrong.key");
    for round in 0..2 {
        wait_for_next_window();
        knock_ops(&net, &wrong, &format!("wrong{round}"), "");
        assert!(
            net.connect(me, 22).is_rejected(),
            "wrong secret, round {round}"
        );
    }
}

#[test]
fn a_second_knock_in_a_spent_window_falls_back_to_the_previous_one() {
    if !can_run_end_to_end("a_second_knock_in_a_spent_window_falls_back_to_the_previous_one") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    keygen(&net, "ops.key");
    let _gate = net.start_gate(&rotating_config(), IPV4_RULES);
    let client = client_config(&net, "ops.key");
    let me = CLIENTS4[0];
    wait_for_next_window();
    let first = knock_ops(&net, &client, "me", "");
    assert_eq!(net.connect(me, 22), Reply::Open);
    // Closed, and knocked again in the same window: the client remembers
    // it spent this window and knocks the previous one instead.
    succeeded(
        net.in_client(&format!("{BIN} knock {GATE4} 4444")),
        "close knock",
    );
    assert!(net.connect(me, 22).is_rejected());
    let second = knock_ops(&net, &client, "me", "");
    assert_ne!(first, second);
    assert_eq!(net.connect(me, 22), Reply::Open);
}

/// sshd in the gate namespace: key-only, keys generated for the test.
pub struct Ssh {
    identity: PathBuf,
    known_hosts: PathBuf,
}

pub fn start_sshd(net: &mut Net) -> Ssh {
    let dir = net.dir.path().to_owned();
    let d = dir.display();
    sh_ok(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {d}/host_key && \
         ssh-keygen -q -t ed25519 -N '' -f {d}/id && \
         cp {d}/id.pub {d}/authorized_keys && mkdir -p /run/sshd"
    ));
    fs::write(
        dir.join("sshd_config"),
        format!(
            "ListenAddress {GATE4}:22
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile {d}/sshd.pid
"
        ),
    )
    .unwrap();
    let config = dir.join("sshd_config");
    net.spawn_in_gate(
        "/usr/sbin/sshd",
        &["-D", "-e", "-f", config.to_str().unwrap()],
    );
    wait_for("sshd", || {
        text(&net.in_gate("ss -ltnH").stdout).contains(&format!("{GATE4}:22 "))
    });
    Ssh {
        identity: dir.join("id"),
        known_hosts: dir.join("known_hosts"),
    }
}

impl Ssh {
    /// `ssh OPTIONS root@gate echo …` from the client namespace.
    pub fn run(&self, net: &Net, options: &str) -> Output {
        net.in_client(&self.command(options))
    }

    /// The command line of [`Ssh::run`], which prints `through-42`.
    pub fn command(&self, options: &str) -> String {
        format!(
            "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o UserKnownHostsFile={} -o StrictHostKeyChecking=accept-new \
             -o ConnectTimeout=5 {options} root@{GATE4} 'echo through-$((6 * 7))'",
            self.identity.display(),
            self.known_hosts.display()
        )
    }
}

#[test]
fn ssh_goes_through_with_knockq_connect_as_proxy_command() {
    if !can_run_end_to_end("ssh_goes_through_with_knockq_connect_as_proxy_command")
        || !can_run(
            "ssh_goes_through_with_knockq_connect_as_proxy_command",
            true,
            &["ssh", "ssh-keygen", "/usr/sbin/sshd"],
        )
    {
        return;
    }
    let mut net = Net::new();
    let ssh = start_sshd(&mut net);
    keygen(&net, "ops.key");
    let _gate = net.start_gate(&rotating_config(), IPV4_RULES);
    let me = CLIENTS4[0];

    let refused = ssh.run(&net, "");
    assert!(
        !refused.status.success(),
        "ssh without a knock went through"
    );
    assert!(
        text(&refused.stderr).contains("No route to host"),
        "{}",
        text(&refused.stderr)
    );

    // The fixed sequence, given on the command line.
    let out = succeeded(
        ssh.run(
            &net,
            &format!("-o ProxyCommand='{BIN} connect --knock 1111,2222 %h %p'"),
        ),
        "ssh with connect --knock",
    );
    assert_eq!(text(&out.stdout), "through-42\n");
    assert_eq!(
        net.connect(me, 22),
        Reply::Open,
        "still open without --close"
    );
    succeeded(net.in_client(&format!("{BIN} knock {GATE4} 3333")), "close");
    assert!(!ssh.run(&net, "").status.success(), "closed again");

    // The seed's own flow, knocks and close knock on the command line, with
    // no profile.
    let out = succeeded(
        ssh.run(
            &net,
            &format!("-o ProxyCommand='{BIN} connect --knock 1111,2222 --close-port 3333 %h %p'"),
        ),
        "ssh with connect --knock --close-port",
    );
    assert_eq!(text(&out.stdout), "through-42\n");
    wait_for("the --close-port knock after ssh ended", || {
        net.connect(me, 22).is_rejected()
    });

    // A rotating profile, written into an ssh configuration as a user would,
    // closing behind itself.
    let client = client_config(&net, "ops.key");
    let ssh_config = net.dir.path().join("ssh_config");
    fs::write(
        &ssh_config,
        format!(
            "Host {GATE4}\n    ProxyCommand {BIN} connect --profile ops --client-config {} --close %h %p\n",
            client.display()
        ),
    )
    .unwrap();
    let out = succeeded(
        net.in_client(&format!(
            "XDG_STATE_HOME={}/state ssh -F {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o UserKnownHostsFile={} root@{GATE4} 'echo through-$((6 * 7))'",
            net.dir.path().display(),
            ssh_config.display(),
            ssh.identity.display(),
            ssh.known_hosts.display()
        )),
        "ssh with a rotating profile",
    );
    assert_eq!(text(&out.stdout), "through-42\n");
    wait_for("the close knock after ssh ended", || {
        net.connect(me, 22).is_rejected()
    });
}
