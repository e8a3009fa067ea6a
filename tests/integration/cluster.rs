//! A fleet on the real kernel: an etcd cluster of three members and three
//! gates, each in a namespace of its own on one bridge, with clients.
//! Knock one gate, open them all; close on any, close everywhere; ride out
//! a leader kill and a full etcd outage; refuse a rotating window replayed
//! on another gate; talk to etcd over TLS with client certificates.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use crate::util::*;

const MEMBERS: [&str; 3] = ["10.10.0.21", "10.10.0.22", "10.10.0.23"];
const GATES: [&str; 3] = ["10.10.0.11", "10.10.0.12", "10.10.0.13"];
const SOURCES: [&str; 4] = ["10.10.0.2", "10.10.0.3", "10.10.0.4", "10.10.0.5"];

static NEXT_FLEET: AtomicU32 = AtomicU32::new(0);

/// How the gates reach etcd.
enum Transport {
    Plain,
    /// Client certificates: gate 3's is signed by a CA etcd does not trust.
    Tls,
}

struct Fleet {
    id: String,
    dir: TempDir,
    namespaces: Vec<String>,
    members: usize,
    etcd: Vec<Option<Child>>,
    gates: Vec<Option<Daemon>>,
    listeners: Vec<Child>,
    transport: Transport,
    _machine: std::sync::RwLockReadGuard<'static, ()>,
}

impl Fleet {
    fn new(members: usize, transport: Transport, policies: &str) -> Fleet {
        let id = format!(
            "kf{}-{}",
            std::process::id(),
            NEXT_FLEET.fetch_add(1, Ordering::Relaxed)
        );
        let mut fleet = Fleet {
            dir: TempDir::new().unwrap(),
            namespaces: Vec::new(),
            members,
            etcd: Vec::new(),
            gates: Vec::new(),
            listeners: Vec::new(),
            transport,
            _machine: Net::machine_shared(),
            id,
        };
        let fabric = fleet.namespace("fabric");
        sh_ok(&format!(
            "ip -n {fabric} link add br0 type bridge && ip -n {fabric} link set br0 up"
        ));
        let mut hosts: Vec<(String, Vec<&str>)> = Vec::new();
        for (i, address) in MEMBERS[..members].iter().enumerate() {
            hosts.push((format!("etcd{}", i + 1), vec![address]));
        }
        for (i, address) in GATES.iter().enumerate() {
            hosts.push((format!("gate{}", i + 1), vec![address]));
        }
        hosts.push(("client".into(), SOURCES.to_vec()));
        for (name, addresses) in &hosts {
            let ns = fleet.namespace(name);
            let mut setup = format!(
                "ip -n {fabric} link add {name} type veth peer name eth0 netns {ns} && \
                 ip -n {fabric} link set {name} master br0 up && ip -n {ns} link set eth0 up"
            );
            for address in addresses {
                setup += &format!(" && ip -n {ns} addr add {address}/24 dev eth0");
            }
            sh_ok(&setup);
        }
        if let Transport::Tls = fleet.transport {
            fleet.make_certificates();
        }
        for member in 0..members {
            let child = fleet.start_member(member);
            fleet.etcd.push(Some(child));
        }
        fleet.wait_for_etcd();
        for (gate, address) in GATES.iter().enumerate() {
            let ns = fleet.ns(&format!("gate{}", gate + 1));
            fleet
                .listeners
                .push(listen_in(&ns, &[format!("{address}:22")]));
            let daemon = fleet.start_gate(gate, policies);
            fleet.gates.push(Some(daemon));
        }
        fleet
    }

    fn namespace(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.id);
        sh_ok(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        self.namespaces.push(ns.clone());
        ns
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn scheme(&self) -> &str {
        match self.transport {
            Transport::Plain => "http",
            Transport::Tls => "https",
        }
    }

    fn endpoints(&self) -> Vec<String> {
        MEMBERS[..self.members]
            .iter()
            .map(|m| format!("{}://{m}:2379", self.scheme()))
            .collect()
    }

    /// A CA etcd trusts, a server certificate per member, and client
    /// certificates for the gates: gate 3's from a CA of its own.
    fn make_certificates(&self) {
        let dir = self.dir.path().display();
        let mut script = format!(
            "cd {dir} && \
             for ca in ca rogue-ca; do openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout $ca.key -out $ca.pem -days 1 -subj /CN=$ca 2>/dev/null; done"
        );
        let mut sign = |name: &str, ca: &str, extensions: &str| {
            script += &format!(
                " && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {name}.key \
                   -out {name}.csr -subj /CN={name} 2>/dev/null \
                 && printf '{extensions}' > {name}.ext \
                 && openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial \
                   -out {name}.pem -days 1 -extfile {name}.ext 2>/dev/null"
            );
        };
        for (i, member) in MEMBERS[..self.members].iter().enumerate() {
            sign(
                &format!("etcd{}", i + 1),
                "ca",
                &format!("subjectAltName=IP:{member}\\nextendedKeyUsage=serverAuth,clientAuth\\n"),
            );
        }
        for gate in 1..=GATES.len() {
            let ca = if gate == 3 { "rogue-ca" } else { "ca" };
            sign(
                &format!("gate-{gate}"),
                ca,
                "extendedKeyUsage=clientAuth\\n",
            );
        }
        sh_ok(&script);
    }

    fn start_member(&self, member: usize) -> Child {
        let name = format!("etcd{}", member + 1);
        let address = MEMBERS[member];
        let cluster: Vec<String> = MEMBERS[..self.members]
            .iter()
            .enumerate()
            .map(|(i, m)| format!("etcd{}=http://{m}:2380", i + 1))
            .collect();
        let scheme = self.scheme();
        let mut args = vec![
            format!("--name={name}"),
            format!("--data-dir={}", self.path(&name).display()),
            format!("--listen-client-urls={scheme}://{address}:2379"),
            format!("--advertise-client-urls={scheme}://{address}:2379"),
            format!("--listen-peer-urls=http://{address}:2380"),
            format!("--initial-advertise-peer-urls=http://{address}:2380"),
            format!("--initial-cluster={}", cluster.join(",")),
            "--initial-cluster-state=new".into(),
            format!("--initial-cluster-token={}", self.id),
        ];
        if let Transport::Tls = self.transport {
            let file = |f: &str| self.path(f).display().to_string();
            args.extend([
                format!("--cert-file={}", file(&format!("{name}.pem"))),
                format!("--key-file={}", file(&format!("{name}.key"))),
                format!("--trusted-ca-file={}", file("ca.pem")),
                "--client-cert-auth".into(),
            ]);
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{name}.log")))
            .unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.ns(&name), "etcd"])
            .args(&args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd starts")
    }

    /// `etcdctl` from the first member's namespace.
    fn etcdctl(&self, args: &str) -> std::process::Output {
        let tls = match self.transport {
            Transport::Plain => String::new(),
            Transport::Tls => {
                let file = |f: &str| self.path(f).display().to_string();
                format!(
                    "--cacert {} --cert {} --key {}",
                    file("ca.pem"),
                    file("etcd1.pem"),
                    file("etcd1.key")
                )
            }
        };
        let endpoints = self.endpoints().join(",");
        in_namespace(
            &self.ns("etcd1"),
            &format!(
                "ETCDCTL_API=3 etcdctl --endpoints {endpoints} {tls} --command-timeout=2s {args}"
            ),
        )
    }

    fn wait_for_etcd(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.etcdctl("endpoint health").status.success() {
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}",
                self.member_logs()
            );
            sleep(Duration::from_millis(100));
        }
    }

    fn member_logs(&self) -> String {
        (1..=self.members)
            .map(|i| fs::read_to_string(self.path(&format!("etcd{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn config_path(&self, gate: usize) -> PathBuf {
        self.path(&format!("gate{}.toml", gate + 1))
    }

    fn control_socket(&self, gate: usize) -> PathBuf {
        self.path(&format!("gate{}.sock", gate + 1))
    }

    fn start_gate(&mut self, gate: usize, policies: &str) -> Daemon {
        self.start_gate_as(gate, policies, &format!("gate-{}", gate + 1))
    }

    /// Gate `gate` under node name `node`.
    fn start_gate_as(&mut self, gate: usize, policies: &str, node: &str) -> Daemon {
        let n = gate + 1;
        let tls = match self.transport {
            Transport::Plain => String::new(),
            Transport::Tls => format!(
                "ca_file = \"ca.pem\"\ncert_file = \"gate-{n}.pem\"\nkey_file = \"gate-{n}.key\"\n"
            ),
        };
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let config = format!(
            "[queue]\nnum = {gate}\n[cluster]\nendpoints = [{}]\nnode = \"{node}\"\n{tls}\n{policies}",
            endpoints.join(", ")
        );
        let path = self.config_path(gate);
        fs::write(&path, config).unwrap();
        let ns = self.ns(&format!("gate{n}"));
        let bin = env!("CARGO_BIN_EXE_knockq");
        succeeded(
            in_namespace(
                &ns,
                &format!(
                    "{bin} rules --config {} --backend iptables | iptables-restore",
                    path.display()
                ),
            ),
            "loading the rules",
        );
        let args = [
            "--control-socket".to_owned(),
            self.control_socket(gate).display().to_string(),
            "--state-dir".to_owned(),
            self.path(&format!("state{n}")).display().to_string(),
        ];
        let log = self.path(&format!("gate{n}.log"));
        Daemon::start(&ns, &path, &args, "debug", &log)
    }

    fn gate(&self, gate: usize) -> &Daemon {
        self.gates[gate].as_ref().expect("a running gate")
    }

    /// A connection attempt from `src` to `gate`'s port.
    fn connect(&self, src: &str, gate: usize, port: u16) -> Reply {
        attempt(&self.ns("client"), src, GATES[gate], port, 3)
    }

    fn knock(&self, src: &str, gate: usize, ports: &[u16]) {
        for &port in ports {
            let reply = self.connect(src, gate, port);
            assert!(
                reply.is_rejected(),
                "knock on {port} of gate {}: {reply:?}",
                gate + 1
            );
        }
    }

    /// Waits up to `seconds` for `src`'s connections to `gate` to be
    /// `open` or not.
    fn eventually(&self, src: &str, gate: usize, open: bool, seconds: u64) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let reply = self.connect(src, gate, 22);
            if (reply == Reply::Open) == open {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{src} on gate {}: {reply:?}, wanted {}\n{}",
                gate + 1,
                if open { "open" } else { "rejected" },
                self.gate(gate).log()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// `knockq ARGS` against `gate`'s control socket.
    fn control(&self, gate: usize, args: &str) -> String {
        let out = run(Command::new("sh").arg("-c").arg(format!(
            "{} {args} --control-socket {}",
            env!("CARGO_BIN_EXE_knockq"),
            self.control_socket(gate).display()
        )));
        text(&succeeded(out, args).stdout)
    }

    fn metrics(&self, gate: usize) -> String {
        let out = in_namespace(
            &self.ns(&format!("gate{}", gate + 1)),
            "printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' | nc -w 5 127.0.0.1 9724",
        );
        text(&out.stdout)
    }

    fn wait_until_in_sync(&self, gate: usize) {
        self.gate(gate).wait_for_log("cluster: in sync with etcd");
    }

    fn stop_member(&mut self, member: usize) {
        if let Some(mut child) = self.etcd[member].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Makes grants by hand on gate 1, one every half second, from
    /// addresses under `network` (three octets), until one reaches gate 2;
    /// returns it and the time from `since`.
    fn first_grant_to_cross(&self, network: &str, since: Instant) -> (String, Duration) {
        for i in 1.. {
            let src = format!("{network}.{i}");
            self.control(0, &format!("grant {src} --policy ssh"));
            let tried = Instant::now();
            while tried.elapsed() < Duration::from_millis(500) {
                if self.control(1, "status").contains(&src) {
                    return (src, since.elapsed());
                }
                sleep(Duration::from_millis(20));
            }
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "no grant crossed:\n{}",
                self.gate(0).log()
            );
        }
        unreachable!("the loop returns or fails")
    }

    /// The member that leads, by its index.
    fn leader(&self) -> usize {
        let out = succeeded(self.etcdctl("endpoint status -w json"), "endpoint status");
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let statuses = statuses.as_array().unwrap();
        statuses
            .iter()
            .position(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
            .expect("a leader")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.gates.clear();
        for child in self.etcd.iter_mut().flatten().chain(&mut self.listeners) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            sh(&format!(
                "ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}"
            ));
        }
    }
}

fn can_run_fleet(test: &str) -> bool {
    can_run(
        test,
        true,
        &[
            "ip",
            "nc",
            "iptables-restore",
            "python3",
            "etcd",
            "etcdctl",
            "openssl",
        ],
    )
}

const SSH: &str = "[[policy]]
name = \"ssh\"
sequence = [1111, 2222]
open_ports = [22]
close_port = 3333
grant_timeout = \"1h\"
scope = \"cluster\"
";

/// Timestamps of a daemon's log lines that contain every one of `parts`.
fn log_times(log: &str, parts: &[&str]) -> Vec<(String, f64)> {
    log.lines()
        .filter(|line| parts.iter().all(|p| line.contains(p)))
        .filter_map(|line| {
            let (time, rest) = line.split_once(' ')?;
            let src = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("src="))?;
            Some((src.to_owned(), seconds_of_day(time)?))
        })
        .collect()
}

/// `2026-12-03T14:20:32.339045Z` as seconds into its day.
fn seconds_of_day(time: &str) -> Option<f64> {
    let clock = time.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = clock.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[test]
fn a_knock_on_one_gate_opens_every_gate_and_a_close_on_another_closes_them() {
    if !can_run_fleet("a_knock_on_one_gate_opens_every_gate_and_a_close_on_another_closes_them") {
        return;
    }
    let fleet = Fleet::new(3, Transport::Plain, SSH);
    for gate in 0..3 {
        fleet.wait_until_in_sync(gate);
    }
    let [me, other, ..] = SOURCES;
    fleet.knock(me, 0, &[1111, 2222]);
    assert_eq!(
        fleet.connect(me, 0, 22),
        Reply::Open,
        "the knocked gate at once"
    );
    fleet.eventually(me, 1, true, 5);
    fleet.eventually(me, 2, true, 5);
    assert!(
        fleet.connect(other, 1, 22).is_rejected(),
        "for that source only"
    );
    let status = fleet.control(1, "status");
    assert!(
        status.contains(me) && status.contains("from gate-1"),
        "{status}"
    );
    assert!(fleet.gate(1).log().contains(&format!(
        "event=grant src={me} policy=ssh ports=22 origin=gate-1"
    )));
    let metrics = fleet.metrics(1);
    assert_eq!(
        sample(&metrics, "knockq_cluster_connected"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"knockq_cluster_events_total{kind="grant",origin="gate-1"}"#
        ),
        Some(1.0)
    );

    fleet.knock(me, 2, &[3333]);
    assert!(
        fleet.connect(me, 2, 22).is_rejected(),
        "closed where it was closed"
    );
    fleet.eventually(me, 0, false, 5);
    fleet.eventually(me, 1, false, 5);
    assert!(fleet
        .gate(0)
        .log()
        .contains(&format!("event=revoke src={me} policy=ssh reason=cluster")));

    // Propagation: 100 grants made on gate 1, as gate 1 and gate 2 log them.
    for i in 0..100 {
        fleet.control(0, &format!("grant 10.20.0.{} --policy ssh", i + 1));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let applied = loop {
        let applied = log_times(
            &fleet.gate(1).log(),
            &["event=grant src=10.20.0.", "origin=gate-1"],
        );
        if applied.len() == 100 || Instant::now() > deadline {
            break applied;
        }
        sleep(Duration::from_millis(100));
    };
    assert_eq!(applied.len(), 100, "every grant reached gate 2");
    let made = log_times(&fleet.gate(0).log(), &["event=grant src=10.20.0."]);
    let mut delays: Vec<f64> = applied
        .iter()
        .filter_map(|(src, at)| {
            let (_, made_at) = made.iter().find(|(s, _)| s == src)?;
            Some((at - made_at) * 1000.0)
        })
        .collect();
    assert_eq!(delays.len(), 100);
    delays.sort_by(f64::total_cmp);
    eprintln!(
        "propagation over 100 grants, gate 1 to gate 2: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&delays, 50.0),
        percentile(&delays, 99.0),
        delays[99]
    );
}

#[test]
fn the_fleet_rides_out_a_leader_kill_and_a_full_etcd_outage() {
    if !can_run_fleet("the_fleet_rides_out_a_leader_kill_and_a_full_etcd_outage") {
        return;
    }
    let mut fleet = Fleet::new(3, Transport::Plain, SSH);
    for gate in 0..3 {
        fleet.wait_until_in_sync(gate);
    }
    let leader = fleet.leader();
    fleet.stop_member(leader);
    let killed = Instant::now();
    // Grants by hand on gate 1 until one reaches gate 2.
    let (crossed, disruption) = fleet.first_grant_to_cross("10.30.0", killed);
    eprintln!(
        "etcd leader killed: grants crossed again after {:.2} s",
        disruption.as_secs_f64()
    );

    // With every member down, gates decide alone and queue their grants.
    for member in 0..3 {
        fleet.stop_member(member);
    }
    let me = SOURCES[2];
    fleet.knock(me, 0, &[1111, 2222]);
    assert_eq!(
        fleet.connect(me, 0, 22),
        Reply::Open,
        "a local knock with etcd down"
    );
    assert!(fleet.connect(me, 1, 22).is_rejected());
    wait_for("gate 1 to see etcd gone", || {
        let metrics = fleet.metrics(0);
        sample(&metrics, "knockq_cluster_connected") == Some(0.0)
            && sample(&metrics, "knockq_cluster_backlog") == Some(1.0)
    });
    // A restart meanwhile keeps what gate 2 learned: the state file is the
    // local truth, origins included.
    fleet.gates[1].take().unwrap().stop(libc::SIGTERM);
    let restarted = fleet.start_gate(1, SSH);
    fleet.gates[1] = Some(restarted);
    let status = fleet.control(1, "status");
    let line = status.lines().find(|l| l.contains(&crossed));
    assert!(line.is_some_and(|l| l.contains("from gate-1")), "{status}");
    for member in 0..3 {
        let child = fleet.start_member(member);
        fleet.etcd[member] = Some(child);
    }
    fleet.eventually(me, 1, true, 30);
    let status = fleet.control(1, "status");
    assert!(
        status.contains(&crossed),
        "still in etcd, kept on resync: {status}"
    );
    fleet.eventually(me, 2, true, 10);
    assert_eq!(
        sample(&fleet.metrics(0), "knockq_cluster_backlog"),
        Some(0.0)
    );
}

#[test]
fn a_member_cut_off_from_the_others_is_left_for_one_that_is_not() {
    if !can_run_fleet("a_member_cut_off_from_the_others_is_left_for_one_that_is_not") {
        return;
    }
    let fleet = Fleet::new(3, Transport::Plain, SSH);
    for gate in 0..3 {
        fleet.wait_until_in_sync(gate);
    }
    // Every gate starts with the first member: cut it off from its peers.
    // Still up and reachable, it has no leader, so the gates' watches on it
    // end and they move on.
    succeeded(
        in_namespace(
            &fleet.ns("etcd1"),
            "for chain in INPUT OUTPUT; do for port in --dport --sport; do \
               iptables -A $chain -p tcp $port 2380 -j DROP || exit 1; done; done",
        ),
        "partitioning etcd1",
    );
    let cut = Instant::now();
    wait_for("etcd1 to lose the others", || {
        let put = in_namespace(
            &fleet.ns("etcd1"),
            &format!(
                "ETCDCTL_API=3 etcdctl --endpoints http://{}:2379 --command-timeout=1s put /probe x",
                MEMBERS[0]
            ),
        );
        !put.status.success()
    });
    let (_, crossed_after) = fleet.first_grant_to_cross("10.40.0", cut);
    eprintln!(
        "first member cut off: grants crossed again after {:.2} s",
        crossed_after.as_secs_f64()
    );
    assert!(
        fleet
            .gate(1)
            .log()
            .contains("in sync with etcd at http://10.10.0.2"),
        "moved to another member"
    );
}

#[test]
fn a_rotating_window_spent_on_one_gate_is_refused_on_another() {
    if !can_run_fleet("a_rotating_window_spent_on_one_gate_is_refused_on_another") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let key = dir.path().join("ops.key");
    knockq::rotating::keygen(&key).unwrap();
    // "ops" fails closed while etcd is away, "ops-local" grants on the
    // node's own record of spent windows.
    let rotating = |name: &str, close: u16, ports: &str, offline: &str| {
        format!(
            "[[policy]]\nname = \"{name}\"\nopen_ports = [22]\nclose_port = {close}\nscope = \"cluster\"\n{offline}\
             [policy.rotating]\nsecret_file = \"{}\"\nperiod = \"30s\"\nports = \"{ports}\"\n",
            key.display()
        )
    };
    let policies = rotating("ops", 4444, "20000-39999", "")
        + &rotating("ops-local", 4445, "40000-59999", "offline = \"local\"\n");
    let mut fleet = Fleet::new(3, Transport::Plain, &policies);
    for gate in 0..3 {
        fleet.wait_until_in_sync(gate);
    }
    let config = knockq::loader::load(&fleet.config_path(0)).unwrap();
    let sequence = |policy: usize| {
        let knockq::config::Knock::Rotating(rotating) = &config.policies[policy].knock else {
            panic!("a rotating policy");
        };
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let sequence = rotating.sequence(&config.policies[policy].name, unix / 30);
        sequence
            .iter()
            .map(|port| port.number())
            .collect::<Vec<u16>>()
    };
    let [first, replayer, offline, offline_local] = SOURCES;
    let ops = sequence(0);
    fleet.knock(first, 0, &ops);
    // The grant follows the window's claim, one etcd round trip later.
    fleet.eventually(first, 0, true, 5);
    fleet.eventually(first, 1, true, 5);
    fleet.knock(replayer, 1, &ops);
    fleet
        .gate(1)
        .wait_for_log(&format!("event=replay src={replayer} policy=ops"));
    assert!(
        fleet.connect(replayer, 1, 22).is_rejected(),
        "a replay on another gate"
    );
    let metrics = fleet.metrics(1);
    assert_eq!(
        sample(
            &metrics,
            r#"knockq_cluster_events_total{kind="replay",origin="gate-2"}"#
        ),
        Some(1.0),
        "{metrics}"
    );

    // With etcd away, no window can be claimed: gate 3, which has not seen
    // this window spent, refuses "ops" and grants "ops-local" alone.
    for member in 0..3 {
        fleet.stop_member(member);
    }
    wait_for("gate 3 to see etcd gone", || {
        sample(&fleet.metrics(2), "knockq_cluster_connected") == Some(0.0)
    });
    fleet.knock(offline, 2, &ops);
    fleet
        .gate(2)
        .wait_for_log(&format!("event=claim_refused src={offline} policy=ops"));
    assert!(fleet.connect(offline, 2, 22).is_rejected(), "fails closed");
    fleet.knock(offline_local, 2, &sequence(1));
    fleet.eventually(offline_local, 2, true, 5);
    let metrics = fleet.metrics(2);
    for kind in ["claim_refused", "claim_offline"] {
        let series = format!(r#"knockq_cluster_events_total{{kind="{kind}",origin="gate-3"}}"#);
        assert_eq!(sample(&metrics, &series), Some(1.0), "{kind}: {metrics}");
    }
}

#[test]
fn etcd_over_tls_takes_only_certificates_its_ca_signed() {
    if !can_run_fleet("etcd_over_tls_takes_only_certificates_its_ca_signed") {
        return;
    }
    let fleet = Fleet::new(1, Transport::Tls, SSH);
    fleet.wait_until_in_sync(0);
    fleet.wait_until_in_sync(1);
    let me = SOURCES[0];
    fleet.knock(me, 0, &[1111, 2222]);
    fleet.eventually(me, 1, true, 5);
    // Gate 3's certificate is not the CA's: etcd refuses it, and it
    // decides alone.
    fleet.gate(2).wait_for_log("cluster: etcd unreachable");
    assert!(!fleet.gate(2).log().contains("cluster: in sync"));
    assert_eq!(
        sample(&fleet.metrics(2), "knockq_cluster_connected"),
        Some(0.0)
    );
    assert!(fleet.connect(me, 2, 22).is_rejected());
    // Nor does it take a client without a certificate.
    let out = in_namespace(
        &fleet.ns("gate3"),
        &format!(
            "ETCDCTL_API=3 etcdctl --endpoints https://{}:2379 --cacert {} --command-timeout=2s get /knockq --prefix",
            MEMBERS[0],
            fleet.path("ca.pem").display()
        ),
    );
    assert!(
        !out.status.success(),
        "etcd served a client without a certificate"
    );
}

/// Records no policy here could have made, written under the prefix with
/// etcdctl: networks for a policy that grants addresses, a network wider
/// than a script's bounds, other ports, ends without end, past the
/// policy's longest or past any number, unreadable values, a value of
/// 100 kB, a policy not in force, a key that is not an address. No gate
/// applies any; each is counted, and real grants still cross.
#[test]
fn records_asking_for_more_than_the_local_policy_gives_are_refused() {
    if !can_run_fleet("records_asking_for_more_than_the_local_policy_gives_are_refused") {
        return;
    }
    let scripts = TempDir::new().unwrap();
    let script = scripts.path().join("team.lua");
    fs::write(&script, "return function(k) return 0 end").unwrap();
    let team = format!(
        "[[policy]]\nname = \"team\"\nopen_ports = [22]\ngrant_timeout = \"1h\"\nscope = \"cluster\"\n\
         [policy.script]\nfile = \"{}\"\nknock_ports = [7000]\nmin_prefix_v4 = 16\n",
        script.display()
    );
    let fleet = Fleet::new(1, Transport::Plain, &format!("{SSH}{team}"));
    for gate in 0..3 {
        fleet.wait_until_in_sync(gate);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let granted = |ports: &str, until: &str, at: u64| {
        format!(r#"{{"state":"granted","node":"seed","ports":{ports},"until":{until},"at":{at}}}"#)
    };
    let half_hour = (now + 1_800_000).to_string();
    let in_a_day = (now + 86_400_000).to_string();
    let records = [
        ("ssh/0.0.0.0/0", granted("[22]", &half_hour, now)),
        ("ssh/10.0.0.0/8", granted("[22]", &half_hour, now)),
        ("team/10.0.0.0/8", granted("[22]", &half_hour, now)),
        ("ssh/10.30.0.1", granted("[22,8080]", &half_hour, now)),
        ("ssh/10.30.0.2", granted("[22]", "null", now)),
        ("ssh/10.30.0.3", granted("[22]", &in_a_day, now)),
        (
            "ssh/10.30.0.4",
            granted("[22]", "99999999999999999999999", now),
        ),
        ("ssh/10.30.0.5", r#"{"state":"granted","#.to_owned()),
        ("ssh/10.30.0.6", "x".repeat(100_000)),
        ("nope/10.30.0.7", granted("[22]", &half_hour, now)),
        ("ssh/not-an-address", granted("[22]", &half_hour, now)),
        // Written "tomorrow": taken as written now, and applied.
        (
            "ssh/10.30.0.8",
            granted("[22]", &half_hour, now + 86_400_000),
        ),
    ];
    for (key, value) in &records {
        succeeded(
            fleet.etcdctl(&format!("put /knockq/grants/{key} '{value}'")),
            key,
        );
    }
    let refused = [
        ("network", 3.0),
        ("ports", 1.0),
        ("end", 2.0),
        ("value", 2.0),
        ("size", 1.0),
        ("policy", 1.0),
        ("key", 1.0),
    ];
    for gate in 0..3 {
        wait_for("the records to be read", || {
            fleet.control(gate, "status").contains("10.30.0.8")
        });
        let metrics = fleet.metrics(gate);
        for (reason, count) in refused {
            let series = format!(r#"knockq_cluster_records_refused_total{{reason="{reason}"}}"#);
            assert_eq!(
                sample(&metrics, &series),
                Some(count),
                "gate {gate}: {series}"
            );
        }
        let status = fleet.control(gate, "status");
        for subject in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.30.0.1",
            "10.30.0.2",
            "10.30.0.3",
        ] {
            assert!(
                !status.contains(subject),
                "gate {gate} holds {subject}:\n{status}"
            );
        }
        let log = fleet.gate(gate).log();
        assert!(
            log.contains("event=record_refused key=/knockq/grants/ssh/0.0.0.0/0 reason=network"),
            "{log}"
        );
    }
    let [me, stranger, ..] = SOURCES;
    for gate in 0..3 {
        assert!(
            fleet.connect(stranger, gate, 22).is_rejected(),
            "gate {gate} let in an address that never knocked"
        );
    }
    fleet.knock(me, 0, &[1111, 2222]);
    fleet.eventually(me, 1, true, 1);
    fleet.eventually(me, 2, true, 1);
}

/// Gate 2 comes back under gate 1's node name, as a cloned machine would:
/// it says so, decides its own knocks and shares nothing, while gate 1 and
/// gate 3 share as before; once gate 1 stops and its name's lease ends, it
/// takes the name and shares.
#[test]
fn a_second_instance_under_a_taken_node_name_stays_out_until_the_name_is_free() {
    if !can_run_fleet("a_second_instance_under_a_taken_node_name_stays_out_until_the_name_is_free")
    {
        return;
    }
    let mut fleet = Fleet::new(1, Transport::Plain, SSH);
    for gate in 0..3 {
        fleet.wait_until_in_sync(gate);
    }
    fleet.gates[1].take().unwrap().stop(libc::SIGTERM);
    let twin = fleet.start_gate_as(1, SSH, "gate-1");
    fleet.gates[1] = Some(twin);
    fleet.gate(1).wait_for_log("holds node name gate-1");
    assert!(fleet
        .gate(1)
        .log()
        .contains("event=node_name_taken node=gate-1"));
    assert_eq!(
        sample(&fleet.metrics(1), "knockq_cluster_node_name_taken"),
        Some(1.0)
    );
    let status = fleet.control(1, "status");
    assert!(
        status.starts_with("cluster: another running instance holds node name \"gate-1\""),
        "{status}"
    );

    let [me, own, later, ..] = SOURCES;
    fleet.knock(me, 0, &[1111, 2222]);
    fleet.eventually(me, 2, true, 5);
    assert!(
        fleet.connect(me, 1, 22).is_rejected(),
        "the twin takes nothing"
    );
    fleet.knock(own, 1, &[1111, 2222]);
    assert_eq!(
        fleet.connect(own, 1, 22),
        Reply::Open,
        "it decides its own knocks"
    );
    sleep(Duration::from_secs(1));
    assert!(fleet.connect(own, 2, 22).is_rejected(), "and gives nothing");
    assert_eq!(
        sample(&fleet.metrics(0), "knockq_cluster_node_name_taken"),
        Some(0.0)
    );

    fleet.gates[0].take().unwrap().stop(libc::SIGTERM);
    // The name's lease (6 s) ends, and the twin tries again every second.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fleet
        .gate(1)
        .log()
        .contains("node name gate-1 is free again")
    {
        assert!(Instant::now() < deadline, "{}", fleet.gate(1).log());
        sleep(Duration::from_millis(100));
    }
    fleet.wait_until_in_sync(1);
    assert_eq!(
        sample(&fleet.metrics(1), "knockq_cluster_node_name_taken"),
        Some(0.0)
    );
    assert!(!fleet.control(1, "status").starts_with("cluster:"));
    fleet.eventually(own, 2, true, 5);
    fleet.knock(later, 2, &[1111, 2222]);
    fleet.eventually(later, 1, true, 5);
}

#[test]
fn an_spa_packet_accepted_on_one_gate_is_a_replay_on_another() {
    if !can_run_fleet("an_spa_packet_accepted_on_one_gate_is_a_replay_on_another")
        || !can_run(
            "an_spa_packet_accepted_on_one_gate_is_a_replay_on_another",
            true,
            &["fwknop"],
        )
    {
        return;
    }
    let keys = TempDir::new().unwrap();
    let (key, hmac) = (
        keys.path().join("alice.key"),
        keys.path().join("alice.hmac"),
    );
    let (key_base64, hmac_base64) = knockq::spa::Keys::generate(&key, &hmac).unwrap();
    let policies = format!(
        "[[policy]]\nname = \"spa\"\nopen_ports = [22]\ngrant_timeout = \"60s\"\nscope = \"cluster\"\n\
         [policy.spa]\n[[policy.spa.user]]\nname = \"alice\"\nkey_file = \"{}\"\nhmac_key_file = \"{}\"\n",
        key.display(),
        hmac.display()
    );
    let fleet = Fleet::new(1, Transport::Plain, &policies);
    for gate in 0..2 {
        fleet.wait_until_in_sync(gate);
    }
    let [sender, replayer, ..] = SOURCES;
    let packet = keys.path().join("packet");
    let out = in_namespace(
        &fleet.ns("client"),
        &format!(
            "HOME={home} fwknop -A tcp/22 -s -D {gate} -U alice --use-hmac --key-base64-rijndael {key_base64} \
             --key-base64-hmac {hmac_base64} --no-save-args -B {packet}",
            home = keys.path().display(),
            gate = GATES[0],
            packet = packet.display(),
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The grant follows the packet's claim, one etcd round trip later, and
    // reaches every gate.
    fleet.eventually(sender, 0, true, 5);
    fleet.eventually(sender, 1, true, 5);
    let status = fleet.control(1, "status");
    assert!(status.contains("user alice"), "{status}");
    // The same packet, from another address, to another gate.
    let out = in_namespace(
        &fleet.ns("client"),
        &format!(
            "tr -d '\\n' < {} | nc -u -w 1 -s {replayer} {} 62201",
            packet.display(),
            GATES[1]
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    fleet.gate(1).wait_for_log(&format!(
        "event=spa_refused src={replayer} policy=spa reason=replayed"
    ));
    assert!(
        fleet.connect(replayer, 1, 22).is_rejected(),
        "a replay on another gate"
    );
    let metrics = fleet.metrics(1);
    assert_eq!(
        sample(
            &metrics,
            r#"knockq_spa_packets_total{outcome="replayed",policy="spa"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"knockq_cluster_events_total{kind="replay",origin="gate-2"}"#
        ),
        Some(1.0),
        "{metrics}"
    );

    // Alice removed on the gate that granted her: her grant ends on every gate.
    let config = fs::read_to_string(fleet.config_path(0)).unwrap();
    let users = config.find("[[policy.spa.user]]").unwrap();
    fs::write(fleet.config_path(0), &config[..users]).unwrap();
    fleet.gate(0).signal(libc::SIGHUP);
    fleet.gate(0).wait_for_log(&format!(
        "event=revoke src={sender} policy=spa reason=user_removed"
    ));
    fleet.eventually(sender, 1, false, 5);

    // A record naming a user a gate does not have grants nothing there.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let record = format!(
        r#"{{"state":"granted","node":"seed","ports":[22],"until":{},"at":{now},"user":"mallory"}}"#,
        now + 60_000
    );
    succeeded(
        fleet.etcdctl(&format!("put /knockq/grants/spa/{replayer} '{record}'")),
        "a record for mallory",
    );
    wait_for("the record to be refused", || {
        sample(
            &fleet.metrics(1),
            r#"knockq_cluster_records_refused_total{reason="user"}"#,
        ) == Some(1.0)
    });
    assert!(
        fleet.connect(replayer, 1, 22).is_rejected(),
        "mallory's record"
    );
}
