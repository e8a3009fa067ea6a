//! Shared helpers: the knockq binary, and throwaway network namespaces with
//! a gate on one side of a veth pair and clients on the other.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const GATE4: &str = "10.9.0.1";
pub const GATE6: &str = "fd09::1";
/// Client addresses: index 0..4 are usable as `-s` sources.
pub const CLIENTS4: [&str; 4] = ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5"];
pub const CLIENTS6: [&str; 4] = ["fd09::2", "fd09::3", "fd09::4", "fd09::5"];

pub const EXAMPLE_CONFIG: &str = include_str!("../../examples/knockq.toml");

/// Rules for IPv4 only, and for both families, with the iptables backend.
pub const IPV4_RULES: &[&str] = &["iptables"];
pub const DUAL_STACK_RULES: &[&str] = &["iptables", "ip6tables"];
/// The rules `knockq rules --apply --backend auto` loads.
pub const APPLIED_RULES: &[&str] = &["auto"];

pub fn knockq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_knockq"))
}

/// A command's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a command succeeded, showing its output if not.
pub fn succeeded(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Tools every end-to-end test uses.
const END_TO_END_TOOLS: [&str; 8] = [
    "ip",
    "nc",
    "knock",
    "nmap",
    "iptables-restore",
    "ip6tables-restore",
    "nft",
    "python3",
];

/// Whether this end-to-end test can run: root, and the usual tools.
pub fn can_run_end_to_end(test: &str) -> bool {
    can_run(test, true, &END_TO_END_TOOLS)
}

/// Whether `test` can run; when it cannot, says so loudly. Under CI
/// (`CI=true`) that is a failure, never a skip.
pub fn can_run(test: &str, needs_root: bool, tools: &[&str]) -> bool {
    let missing: Vec<_> = tools
        .iter()
        .filter(|tool| !sh(&format!("command -v {tool}")).status.success())
        .copied()
        .collect();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if needs_root && !root {
        "it needs root (network namespaces, NFQUEUE); run the suite as root".to_owned()
    } else if !missing.is_empty() {
        format!(
            "missing tools: {}; `make test` installs them",
            missing.join(", ")
        )
    } else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run under CI: {why}");
    }
    eprintln!("\n########## {test}: TEST NOT RUN: {why} ##########\n");
    false
}

/// Set by `vm::gate_tests_on_debians_stock_kernel` for the tests it runs
/// inside QEMU.
pub const IN_VM: &str = "KNOCKQ_TEST_IN_VM";

/// Set by `offload::gate_tests_with_offload` (and in the VM) for the tests
/// it runs again with `[rules] offload = true`.
pub const OFFLOAD: &str = "KNOCKQ_TEST_OFFLOAD";

/// Whether these tests run with the kernel fast path on: every
/// configuration written through [`Net::config`] gets `[rules] offload`.
pub fn offload_on() -> bool {
    std::env::var_os(OFFLOAD).is_some()
}

/// `text` with `[rules] offload = true`, when the tests run with offload.
pub fn with_offload(text: &str) -> String {
    if !offload_on() || text.contains("offload =") {
        return text.to_owned();
    }
    match text.contains("[rules]\n") {
        true => text.replacen("[rules]\n", "[rules]\noffload = true\n", 1),
        false => format!("[rules]\noffload = true\n{text}"),
    }
}

/// Whether these tests run in the emulated Debian-kernel VM.
pub fn in_emulated_vm() -> bool {
    std::env::var_os(IN_VM).is_some()
}

/// Whether this kernel can queue from nftables (CONFIG_NFT_QUEUE), tried in
/// a throwaway namespace; the iptables backend reaches NFQUEUE through
/// xt_NFQUEUE instead.
pub fn nft_can_queue() -> bool {
    let net = Net::new();
    let probe = net.in_gate(
        "nft add table inet probe && nft add chain inet probe c && nft add rule inet probe c queue num 9",
    );
    probe.status.success()
}

/// Whether a test that needs the nft queue statement can run here. Where
/// this kernel lacks it, the test runs in the Debian-kernel VM instead
/// (`vm::gate_tests_on_debians_stock_kernel`), whose kernel must have it.
pub fn can_queue_from_nft(test: &str) -> bool {
    if nft_can_queue() {
        return true;
    }
    assert!(
        !in_emulated_vm(),
        "{test}: the VM's kernel cannot queue from nft"
    );
    // Written to stderr itself, not through eprintln!, which the test
    // harness captures: the banner shows in every log, CI's included.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "\n########## {test}: NOT RUN on this kernel, which has no nft queue statement \
             (CONFIG_NFT_QUEUE); vm::gate_tests_on_debians_stock_kernel runs it on Debian's ##########\n\n"
        )
        .as_bytes(),
    );
    false
}

/// Two fresh network namespaces joined by a veth pair, deleted on drop.
pub struct Net {
    pub gate: String,
    pub client: String,
    pub dir: TempDir,
    children: Vec<Child>,
    _machine: MachineShare,
}

/// End-to-end tests share the machine; a flood test needs it to itself, or
/// its CPU-hungry generator would starve the others and they it.
static MACHINE: RwLock<()> = RwLock::new(());

enum MachineShare {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Open,
    /// The connection failed; nc's message.
    Failed(String),
}

impl Reply {
    /// Failed at once with an ICMP error or a reset, as a reject verdict
    /// answers, rather than timing out.
    pub fn is_rejected(&self) -> bool {
        const REJECTIONS: [&str; 3] = [
            "No route to host",
            "Permission denied",
            "Connection refused",
        ];
        matches!(self, Reply::Failed(msg) if REJECTIONS.iter().any(|r| msg.contains(r)))
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Listens on every `ADDRESS:PORT` argument; greets each connection, so
/// that [`attempt`] can tell it open, and closes it.
const LISTENER: &str = r#"
import selectors, socket, sys
selector = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.create_server((host, int(port)), family=family, backlog=4096)
    selector.register(server, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        connection, _ = key.fileobj.accept()
        try:
            connection.sendall(b"knockq-test-service\n")
        except OSError:
            pass
        connection.close()
"#;

impl Net {
    /// Namespaces for a test that may run beside others.
    pub fn new() -> Net {
        let shared = MACHINE
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Net::create(MachineShare::Shared(shared))
    }

    /// Namespaces for a test that runs alone on the machine.
    pub fn alone() -> Net {
        let alone = MACHINE
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Net::create(MachineShare::Alone(alone))
    }

    /// The machine to this test alone, without namespaces: for a test that
    /// keeps both cores busy, such as booting a VM.
    pub fn machine_alone() -> impl Drop {
        MACHINE
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The machine shared with other tests, for a test that builds
    /// namespaces of its own.
    pub fn machine_shared() -> RwLockReadGuard<'static, ()> {
        MACHINE
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn create(machine: MachineShare) -> Net {
        let id = format!(
            "kq{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            gate: format!("{id}-gate"),
            client: format!("{id}-client"),
            dir: TempDir::new().unwrap(),
            children: Vec::new(),
            _machine: machine,
        };
        for ns in [&net.gate, &net.client] {
            sh_ok(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        // The kernel sends one peer a burst of 6 ICMP errors, then one a
        // second: a test knocking fast would see some rejects only on a
        // retransmission, or not within its timeout (emulated in the VM,
        // where every step is slow, it did). The gate's namespace answers
        // every reject; the kernel's overall limit of 1000 a second stays.
        sh_ok(&format!(
            "ip netns exec {} sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0",
            net.gate
        ));
        let (g, c) = (&net.gate, &net.client);
        let mut setup = format!(
            "ip -n {g} link add veth0 type veth peer name veth1 netns {c} && \
             ip -n {g} addr add {GATE4}/24 dev veth0 && ip -n {g} addr add {GATE6}/64 dev veth0 nodad && \
             ip -n {g} link set veth0 up && ip -n {c} link set veth1 up"
        );
        for (v4, v6) in CLIENTS4.iter().zip(CLIENTS6) {
            setup += &format!(
                " && ip -n {c} addr add {v4}/24 dev veth1 && ip -n {c} addr add {v6}/64 dev veth1 nodad"
            );
        }
        sh_ok(&setup);
        net
    }

    pub fn in_gate(&self, script: &str) -> Output {
        in_namespace(&self.gate, script)
    }

    pub fn in_client(&self, script: &str) -> Output {
        in_namespace(&self.client, script)
    }

    /// Writes a configuration file into the test's directory (with
    /// offload when the tests run with it).
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join(format!(
            "knockq-{}.toml",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, with_offload(text)).unwrap();
        path
    }

    /// The text of `examples/policies/NAME.toml`, its script copied beside
    /// the files [`Net::config`] writes, and with `edit` applied to the
    /// script's text.
    pub fn example_policy(&self, name: &str, edit: impl FnOnce(String) -> String) -> String {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
        let script = fs::read_to_string(dir.join(format!("{name}.lua"))).unwrap();
        fs::write(self.dir.path().join(format!("{name}.lua")), edit(script)).unwrap();
        let config = fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
        // The default budget of 1 ms of CPU time fails calls here now and
        // then: emulated in the VM, a call takes some fifty times as long as
        // on the host, and on a loaded CI host a call's page faults can cost
        // milliseconds of system time. These tests are about the policies;
        // the budget has tests of its own.
        config.replace("[policy.script]\n", "[policy.script]\nbudget = \"100ms\"\n")
    }

    /// Loads the rules `knockq rules` prints into the gate namespace; for
    /// `auto`, `knockq rules --apply` loads what fits the kernel. With
    /// offload, the rules need their sets: `--apply` loads both, and both
    /// families for iptables.
    pub fn load_rules(&self, config: &Path, backend: &str) {
        let bin = env!("CARGO_BIN_EXE_knockq");
        let config = config.display();
        let command = match backend {
            "iptables" | "ip6tables" | "nft" if offload_on() => {
                let backend = backend.replace("ip6tables", "iptables");
                format!("{bin} rules --apply --config {config} --backend {backend}")
            }
            "iptables" => {
                format!("{bin} rules --config {config} --backend iptables | iptables-restore")
            }
            "ip6tables" => {
                format!("{bin} rules --config {config} --backend ip6tables | ip6tables-restore")
            }
            "nft" => format!("{bin} rules --config {config} --backend nft | nft -f -"),
            "auto" => format!("{bin} rules --apply --config {config} --backend auto"),
            other => panic!("unknown backend {other}"),
        };
        let out = self.in_gate(&command);
        assert!(
            out.status.success(),
            "loading {backend} rules: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Services on `ports` in the gate namespace, IPv4 and IPv6: one
    /// process accepting and closing connections, with a deep backlog so a
    /// busy machine never drops a SYN for want of an accept.
    pub fn listen(&mut self, ports: &[u16]) {
        let addresses = ports
            .iter()
            .flat_map(|port| [format!("{GATE4}:{port}"), format!("{GATE6}:{port}")]);
        let addresses: Vec<String> = addresses.collect();
        self.children.push(listen_in(&self.gate, &addresses));
        wait_for("listeners", || {
            let out = self.in_gate("ss -ltnH");
            let listening = String::from_utf8_lossy(&out.stdout);
            ports
                .iter()
                .all(|port| listening.matches(&format!(":{port} ")).count() == 2)
        });
    }

    /// Starts a long-running program in the gate namespace, killed on drop;
    /// its output goes to `NAME.log` in the test's directory.
    pub fn spawn_in_gate(&mut self, program: &str, args: &[&str]) {
        let name = Path::new(program).file_name().unwrap().to_string_lossy();
        let log = fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gate, program])
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.children.push(child);
    }

    /// Gives the client namespace its own /etc/hosts (`ip netns exec`
    /// mounts /etc/netns/NAME/hosts over it), so names resolve there only.
    pub fn client_hosts(&self, hosts: &str) {
        let dir = Path::new("/etc/netns").join(&self.client);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("hosts"), hosts).unwrap();
    }

    /// A TCP connection attempt from `src` to the gate's `port` with nc.
    pub fn connect(&self, src: &str, port: u16) -> Reply {
        self.connect_within(src, port, 3)
    }

    /// A connection attempt that waits up to `seconds`, retransmitting its
    /// SYN meanwhile (at 1, 3, 7 s): for a gate under a flood, which drops
    /// some SYNs.
    pub fn connect_within(&self, src: &str, port: u16, seconds: u32) -> Reply {
        let dst = if src.contains(':') { GATE6 } else { GATE4 };
        attempt(&self.client, src, dst, port, seconds)
    }

    /// Knocks with nc, asserting that every knock is rejected at once.
    pub fn knock(&self, src: &str, ports: &[u16]) {
        for &port in ports {
            let reply = self.connect(src, port);
            assert!(reply.is_rejected(), "knock on {port} from {src}: {reply:?}");
        }
    }

    /// Starts `knockq run` in the gate namespace with `rules` loaded for
    /// `backend`, and waits until its queue is bound.
    pub fn start_gate(&self, config_text: &str, backends: &[&str]) -> Daemon {
        let config = self.config(config_text);
        for backend in backends {
            self.load_rules(&config, backend);
        }
        self.start_daemon(&config)
    }

    pub fn start_daemon(&self, config: &Path) -> Daemon {
        self.start_daemon_with(config, &[])
    }

    /// Starts `knockq run` with extra arguments, logging at debug level.
    pub fn start_daemon_with(&self, config: &Path, args: &[&str]) -> Daemon {
        self.start_daemon_logging(config, args, "debug")
    }

    /// Starts `knockq run` with extra arguments, logging at `level`.
    pub fn start_daemon_logging(&self, config: &Path, args: &[&str], level: &str) -> Daemon {
        let log = self.dir.path().join(format!(
            "knockq-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut all = vec![
            "--control-socket".to_owned(),
            self.control_socket().display().to_string(),
            "--state-dir".to_owned(),
            self.state_dir().display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        Daemon::start(&self.gate, config, &all, level, &log)
    }

    /// An HTTP GET to 127.0.0.1:`port` inside the gate namespace: the
    /// response head and body.
    pub fn http_get(&self, port: u16, path: &str) -> (String, String) {
        // The request goes through printf: escape the path's percent signs.
        let path = path.replace('%', "%%");
        let out = self.in_gate(&format!(
            "printf \"GET {path} HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n\" | nc -w 10 127.0.0.1 {port}"
        ));
        let response = String::from_utf8(out.stdout).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (head.to_owned(), body.to_owned())
    }

    /// Runs `knockq ARGS` in the gate namespace against the daemon's control socket.
    pub fn knockq_control(&self, args: &str) -> Output {
        self.knockq_in_gate(&format!(
            "{args} --control-socket {}",
            self.control_socket().display()
        ))
    }

    /// Runs `knockq ARGS` in the gate namespace.
    pub fn knockq_in_gate(&self, args: &str) -> Output {
        self.in_gate(&format!("{} {args}", env!("CARGO_BIN_EXE_knockq")))
    }

    /// Where the daemon saves grants, in the test's directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's control socket, in the test's directory.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Lines of the gate namespace's nfnetlink_queue table: bound queues.
    pub fn bound_queues(&self) -> usize {
        let out = self.in_gate("cat /proc/net/netfilter/nfnetlink_queue");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Packets waiting in the gate namespace's queues for a verdict.
    pub fn pending_packets(&self) -> u64 {
        let out = self.in_gate("cat /proc/net/netfilter/nfnetlink_queue");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| {
                line.split_whitespace()
                    .nth(2)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Which rules the test's packets met, for the failure's log.
            let out = self.in_gate(
                "iptables-save -c; ip6tables-save -c; nft list ruleset; \
                 cat /proc/net/netfilter/nfnetlink_queue",
            );
            eprintln!(
                "--- the gate's rules and counters ---\n{}",
                text(&out.stdout)
            );
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.gate, &self.client] {
            sh(&format!(
                "ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}"
            ));
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// A running `knockq run`, killed on drop.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `knockq run --config CONFIG ARGS` in namespace `ns`, logging
    /// at `level` to `log`, and waits until it has bound its queue.
    pub fn start(ns: &str, config: &Path, args: &[String], level: &str, log: &Path) -> Daemon {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_knockq"),
                "run",
                "--config",
            ])
            .arg(config)
            .args(args)
            .env("KNOCKQ_LOG", level)
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let bound = || {
            let out = in_namespace(ns, "cat /proc/net/netfilter/nfnetlink_queue");
            !out.stdout.is_empty()
        };
        while !bound() {
            assert!(
                Instant::now() < deadline,
                "knockq did not bind its queue:\n{}",
                daemon.log()
            );
            sleep(Duration::from_millis(20));
        }
        daemon
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap()
    }

    /// Waits until the daemon's log contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no log line {text:?} in:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` and returns the exit status.
    pub fn stop(mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "knockq did not stop; log:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what the daemon saw.
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- {} ---\n{log}--- end of log ---", self.log.display());
        }
    }
}

/// A service in namespace `ns` on every `ADDRESS:PORT` of `addresses`,
/// accepting and closing connections.
pub fn listen_in(ns: &str, addresses: &[String]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", LISTENER])
        .args(addresses)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

pub fn in_namespace(ns: &str, script: &str) -> Output {
    run(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script]))
}

/// The value of one series in a Prometheus text exposition.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A connection attempt with nc from `src` in namespace `ns` to `dst`,
/// waiting up to `seconds`: open once the service speaks. The test services
/// speak first (the listener's banner, sshd's version line).
///
/// Emulated in the VM, nc about once in a hundred rejected attempts reports a
/// connection: the gate's rule counters show the SYN rejected and no packet
/// of that connection accepted, and the service never hears of it (an
/// attempt on a port with no service was "open" too). Such a report, a
/// connection the service never spoke on, is no answer: the attempt is made
/// again, a new SYN that the gate decides again.
pub fn attempt(ns: &str, src: &str, dst: &str, port: u16, seconds: u32) -> Reply {
    let family = if dst.contains(':') { "-6" } else { "-4" };
    // -N: the service sees the end of input, so sshd hangs up too.
    let command = format!("nc {family} -v -N -w {seconds} -s {src} {dst} {port} < /dev/null");
    for _ in 0..3 {
        let out = in_namespace(ns, &command);
        if !out.status.success() {
            return Reply::Failed(text(&out.stderr).trim().to_owned());
        }
        if !out.stdout.is_empty() {
            return Reply::Open;
        }
        eprintln!(
            "nc reported a connection from {src} to {dst} port {port} no service spoke on: again"
        );
    }
    Reply::Failed(format!(
        "nc reported connections to {dst} port {port} that no service spoke on"
    ))
}

pub fn sh(script: &str) -> Output {
    run(Command::new("sh").args(["-c", script]))
}

pub fn sh_ok(script: &str) -> Output {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `ready` for up to 10 seconds.
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

/// A started `trafgen` flooding the gate with `transport` (trafgen's text
/// for the transport header and payload) over IPv4 from random sources, as
/// fast as it can or at `rate` (`100000pps`); stopped on drop.
pub struct Flood(Child);

impl Flood {
    pub fn start(net: &Net, transport: &str, rate: Option<&str>) -> Flood {
        // Replies to the random sources leave through the client side, which
        // drops them: no neighbour lookups per source.
        sh_ok(&format!(
            "ip -n {} route add default via {}",
            net.gate, CLIENTS4[0]
        ));
        let mac = |ns: &str, dev: &str| {
            let out = sh_ok(&format!("ip -n {ns} -br link show {dev}"));
            String::from_utf8(out.stdout)
                .unwrap()
                .split_whitespace()
                .nth(2)
                .unwrap()
                .to_owned()
        };
        let config = net.dir.path().join("flood.cfg");
        fs::write(
            &config,
            format!(
                "{{\n  eth(da={}, sa={}),\n  ipv4(saddr=drnd(), daddr={GATE4}, ttl=64),\n  {transport},\n}}\n",
                mac(&net.gate, "veth0"),
                mac(&net.client, "veth1")
            ),
        )
        .unwrap();
        let mut command = Command::new("ip");
        // One core for the generator, one for the gate.
        command.args([
            "netns",
            "exec",
            &net.client,
            "trafgen",
            "--cpus",
            "1",
            "-q",
            "-o",
            "veth1",
        ]);
        if let Some(rate) = rate {
            command.args(["-b", rate]);
        }
        // trafgen forks its senders: give it a process group of its own to
        // stop them all.
        let child = command
            .arg("-i")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        Flood(child)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the group is our child's.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}
