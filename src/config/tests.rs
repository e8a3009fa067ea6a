//! Every refused configuration names the file, the line and the key.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::flow::{FlowPort, PortRange};
use crate::loader::parse;

const SSH: &str = r#"[[policy]]
name = "ssh"
sequence = [1111, 2222]
open_ports = [22, 8080]
close_port = 3333
"#;

fn error(text: &str) -> String {
    parse(text, Path::new("knockq.toml"))
        .unwrap_err()
        .to_string()
}

#[test]
fn only_policies_are_needed() {
    let config = parse(SSH, Path::new("knockq.toml")).unwrap();
    assert_eq!(config.queue.numbers(), 0..1);
    assert_eq!(config.verdict.reject_with, RejectWith::IcmpHostProhibited);
    assert_eq!(config.limits.max_sources, 1_000_000);
    let policy = &config.policies[0];
    assert_eq!(policy.step_timeout, Duration::from_secs(10));
    assert_eq!(policy.grant_timeout, None);
    assert!(policy.strict);
    assert_eq!(
        policy.knock,
        Knock::Fixed(vec![FlowPort::tcp(1111), FlowPort::tcp(2222)])
    );
    assert_eq!(policy.close_port, Some(FlowPort::tcp(3333)));
}

#[test]
fn the_example_configuration_is_valid() {
    let text = include_str!("../../examples/knockq.toml");
    let config = parse(text, Path::new("knockq.toml")).unwrap();
    assert_eq!(
        config.policies[0].grant_timeout,
        Some(Duration::from_secs(8 * 3600))
    );
    assert_eq!(config.verdict.reject_with, RejectWith::IcmpHostProhibited);
}

#[test]
fn the_wireguard_example_is_valid() {
    let text = include_str!("../../examples/wireguard.toml");
    let config = parse(text, Path::new("wireguard.toml")).unwrap();
    assert_eq!(
        config.policies[0].open_ports[0],
        PortRange::single(FlowPort::udp(51820))
    );
}

#[test]
fn unknown_keys_are_refused() {
    assert_eq!(
        error(&format!("{SSH}colour = \"blue\"\n")),
        "knockq.toml:6: policy[0].colour: unknown field `colour`, expected one of `name`, `sequence`, `rotating`, \
         `script`, `spa`, `step_timeout`, `open_ports`, `close_port`, `grant_timeout`, `strict`, `allow_weak_sequence`, \
         `on_grant`, `on_revoke`, `scope`, `offline`"
    );
    assert!(error(&format!("[queue]\nnumber = 1\n{SSH}"))
        .starts_with("knockq.toml:2: queue.number: unknown field `number`"));
}

#[test]
fn ports_outside_the_range_are_refused() {
    assert_eq!(
        error(&SSH.replace("[1111, 2222]", "[1111, 70000]")),
        "knockq.toml:3: policy[0].sequence[1]: port 70000 is outside 1..65535"
    );
    assert_eq!(
        error(&SSH.replace("[22, 8080]", "[0]")),
        "knockq.toml:4: policy[0].open_ports[0]: port 0 is outside 1..65535"
    );
    assert_eq!(
        error(&SSH.replace("3333", "-1")),
        "knockq.toml:5: policy[0].close_port: port -1 is outside 1..65535"
    );
}

#[test]
fn an_empty_sequence_is_refused() {
    assert_eq!(
        error(&SSH.replace("[1111, 2222]", "[]")),
        "knockq.toml:3: policy[0].sequence: the sequence is empty: give at least one knock port"
    );
}

#[test]
fn a_knock_port_cannot_be_opened_or_close() {
    assert_eq!(
        error(&SSH.replace("[22, 8080]", "[22, 2222]")),
        "knockq.toml:3: policy[0].sequence: knock port 2222 is also an open port of policy \"ssh\""
    );
    assert_eq!(
        error(&SSH.replace("3333", "1111")),
        "knockq.toml:3: policy[0].sequence: knock port 1111 is also the close port of policy \"ssh\""
    );
    assert_eq!(
        error(&SSH.replace("[1111, 2222]", "[1111, 2222, 1111]")),
        "knockq.toml:3: policy[0].sequence: knock port 1111 is also a port that appears earlier \
         in the same sequence"
    );
}

#[test]
fn knock_ports_cannot_be_shared_between_policies() {
    let text =
        format!("{SSH}\n[[policy]]\nname = \"web\"\nsequence = [5000, 2222]\nopen_ports = [443]\n");
    assert_eq!(
        error(&text),
        "knockq.toml:9: policy[1].sequence: knock port 2222 is also a knock port of policy \"ssh\""
    );
    let text =
        format!("{SSH}\n[[policy]]\nname = \"web\"\nsequence = [5000]\nopen_ports = [1111]\n");
    assert_eq!(
        error(&text),
        "knockq.toml:3: policy[0].sequence: knock port 1111 is also an open port of policy \"web\""
    );
    let text = format!("{SSH}\n[[policy]]\nname = \"web\"\nsequence = [5000]\nopen_ports = [443]\nclose_port = 3333\n");
    assert_eq!(
        error(&text),
        "knockq.toml:11: policy[1].close_port: close port 3333 is also the close port of policy \"ssh\""
    );
}

#[test]
fn policy_names_are_unique() {
    let text =
        format!("{SSH}\n[[policy]]\nname = \"ssh\"\nsequence = [5000]\nopen_ports = [443]\n");
    assert_eq!(
        error(&text),
        "knockq.toml:8: policy[1].name: policy name \"ssh\" is already used by policy[0]"
    );
}

#[test]
fn durations_must_parse() {
    assert_eq!(
        error(&format!("{SSH}step_timeout = \"10 parsecs\"\n")),
        "knockq.toml:6: policy[0].step_timeout: invalid duration \"10 parsecs\": unknown time unit \
         \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years \
         (and few variations) (examples: \"10s\", \"500ms\", \"8h\")"
    );
    assert_eq!(
        error(&format!("{SSH}grant_timeout = \"0s\"\n")),
        "knockq.toml:6: policy[0].grant_timeout: duration \"0s\" must be longer than zero"
    );
}

#[test]
fn other_values_are_checked() {
    assert_eq!(
        error(&format!("[verdict]\nreject_with = \"icmp-please-go-away\"\n{SSH}")),
        "knockq.toml:2: verdict.reject_with: unknown variant `icmp-please-go-away`, expected one of \
         `icmp-host-prohibited`, `icmp-port-unreachable`, `icmp-admin-prohibited`, `tcp-reset`, `drop`"
    );
    assert_eq!(
        error(&format!("[queue]\ncount = 0\n{SSH}")),
        "knockq.toml:2: queue.count: count 0 is outside 1..64"
    );
    assert_eq!(
        error(&format!("[queue]\nnum = 65535\ncount = 2\n{SSH}")),
        "knockq.toml: queue: queues 65535..65536 go past 65535"
    );
    assert_eq!(
        error(&format!("[limits]\nmax_sources = 0\n{SSH}")),
        "knockq.toml:2: limits.max_sources: must be at least 1"
    );
    assert_eq!(
        error(&format!("[limits]\nmax_sources = 200000000\n{SSH}")),
        "knockq.toml:2: limits.max_sources: at most 100000000: the state table is allocated at start, about 73 bytes per source"
    );
    assert_eq!(
        error(&SSH.replace("\"ssh\"", "\"s s h\"")),
        "knockq.toml:2: policy[0].name: name \"s s h\" must be letters, digits, '-' or '_'"
    );
    assert_eq!(
        error(&SSH.replace("open_ports = [22, 8080]\n", "")),
        "knockq.toml:1: policy[0]: missing field `open_ports`"
    );
}

#[test]
fn a_file_needs_a_policy_and_valid_toml() {
    assert_eq!(
        error("[queue]\nnum = 3\n"),
        "knockq.toml: policy: no [[policy]] table: there is nothing to open"
    );
    assert!(error("[[policy]\nname = 1").starts_with("knockq.toml:1: "));
}

#[test]
fn consecutive_sequences_are_refused_unless_allowed() {
    for sequence in ["[1111, 1112, 1113]", "[4000, 3999]"] {
        let text = SSH.replace("[1111, 2222]", sequence);
        let ports = sequence.trim_matches(['[', ']']);
        assert_eq!(
            error(&text),
            format!(
                "knockq.toml:3: policy[0].sequence: the sequence {ports} is consecutive ports: a port \
                 scan in order knocks it by itself; scatter the ports, or set allow_weak_sequence = true"
            )
        );
        let allowed = format!("{text}allow_weak_sequence = true\n");
        assert!(parse(&allowed, Path::new("knockq.toml")).is_ok());
    }
    assert!(parse(
        &SSH.replace("[1111, 2222]", "[1111, 1112, 1114]"),
        Path::new("k.toml")
    )
    .is_ok());
    assert!(parse(&SSH.replace("[1111, 2222]", "[1111]"), Path::new("k.toml")).is_ok());
}

#[test]
fn management_networks_parse_as_cidrs() {
    let config = parse(
        &format!("[rules]\nalways_allow = [\"10.0.0.0/8\", \"fd00::/8\"]\n{SSH}"),
        Path::new("k.toml"),
    )
    .unwrap();
    assert_eq!(config.rules.always_allow.len(), 2);
    assert_eq!(
        error(&format!("[rules]\nalways_allow = [\"10.0.0.0/33\"]\n{SSH}")),
        "knockq.toml:2: rules.always_allow[0]: invalid IP address syntax"
    );
}

#[test]
fn restart_only_settings_are_named() {
    let old = parse(SSH, Path::new("k.toml")).unwrap();
    let same_but_policies = parse(&SSH.replace("[22, 8080]", "[22]"), Path::new("k.toml")).unwrap();
    assert_eq!(old.needs_restart_for(&same_but_policies), None);
    let requeued = parse(&format!("[queue]\nnum = 3\n{SSH}"), Path::new("k.toml")).unwrap();
    assert_eq!(old.needs_restart_for(&requeued), Some("[queue]"));
    let moved = parse(
        &format!("[control]\nsocket = \"/tmp/k.sock\"\n{SSH}"),
        Path::new("k.toml"),
    )
    .unwrap();
    assert_eq!(old.needs_restart_for(&moved), Some("[control]"));
}

#[test]
fn with_offload_a_longer_step_window_than_the_knocking_set_needs_a_restart() {
    let parse_offload = |text: &str| {
        parse(
            &format!("[rules]\noffload = true\n{text}"),
            Path::new("k.toml"),
        )
        .unwrap()
    };
    let old = parse_offload(&SSH.replace("[[policy]]", "[[policy]]\nstep_timeout = \"2500ms\""));
    assert_eq!(old.knocking_window(), Duration::from_secs(4));
    let shorter = parse_offload(
        SSH.replace("[[policy]]", "[[policy]]\nstep_timeout = \"1s\"")
            .as_str(),
    );
    assert_eq!(old.needs_restart_for(&shorter), None);
    let within = parse_offload(&SSH.replace("[[policy]]", "[[policy]]\nstep_timeout = \"3s\""));
    assert_eq!(
        old.needs_restart_for(&within),
        None,
        "3 s rounds to the same set"
    );
    let longer = parse_offload(&SSH.replace("[[policy]]", "[[policy]]\nstep_timeout = \"4s\""));
    assert!(old
        .needs_restart_for(&longer)
        .is_some_and(|why| why.contains("knocking set")));
}

/// A directory with a private secret file `ops.key` and a configuration
/// beside it that names the file relatively.
struct RotatingFixture {
    dir: tempfile::TempDir,
}

impl RotatingFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        crate::rotating::keygen(&dir.path().join("ops.key")).unwrap();
        RotatingFixture { dir }
    }

    fn parse(&self, text: &str) -> Result<Config, String> {
        parse(text, &self.dir.path().join("knockq.toml")).map_err(|e| e.to_string())
    }

    fn error(&self, text: &str) -> String {
        let err = self.parse(text).unwrap_err();
        let prefix = format!("{}/", self.dir.path().display());
        err.strip_prefix(&prefix).unwrap_or(&err).to_owned()
    }
}

const OPS: &str = r#"[[policy]]
name = "ops"
open_ports = [22]
close_port = 3333
[policy.rotating]
secret_file = "ops.key"
ports = "20000-59999"
"#;

#[test]
fn a_rotating_policy_reads_its_secret_beside_the_config() {
    let fixture = RotatingFixture::new();
    let config = fixture.parse(OPS).unwrap();
    let Knock::Rotating(rotating) = &config.policies[0].knock else {
        panic!("not rotating: {:?}", config.policies[0].knock);
    };
    assert_eq!(rotating.length, 3);
    assert_eq!(rotating.period, Duration::from_secs(30));
    assert_eq!(
        rotating.ports,
        PortRange::new(FlowPort::tcp(20000), FlowPort::tcp(59999)).unwrap()
    );
    assert_eq!(
        config.policies[0].knock.describe(),
        "rotating: 3 ports of 20000-59999 every 30s"
    );
    // The secret never shows in debug output.
    assert!(!format!("{config:?}")
        .contains(&std::fs::read_to_string(fixture.dir.path().join("ops.key")).unwrap()[..16]));
}

#[test]
fn rotating_settings_are_checked() {
    let fixture = RotatingFixture::new();
    let with = |line: &str| fixture.error(&format!("{OPS}{line}\n"));
    assert_eq!(
        with("length = 0"),
        "knockq.toml:8: policy[0].rotating.length: length 0 is outside 1..64"
    );
    assert_eq!(
        fixture.error(&OPS.replace("20000-59999", "20000-20099")),
        "knockq.toml:7: policy[0].rotating.ports: the range holds 100 ports; \
         rotating knocks need at least 256"
    );
    assert_eq!(
        fixture.error(&OPS.replace("20000-59999", "9-5")),
        "knockq.toml:7: policy[0].rotating.ports: port range \"9-5\" ends before it starts"
    );
    assert_eq!(
        fixture.error(&OPS.replace("20000-59999", "high")),
        "knockq.toml:7: policy[0].rotating.ports: \"high\" is not a port such as 22, 53/udp or 60000-61000/udp"
    );
    assert_eq!(
        with("period = \"0s\""),
        "knockq.toml:8: policy[0].rotating.period: duration \"0s\" must be longer than zero"
    );
    assert_eq!(
        with("period = \"500ms\""),
        "knockq.toml: policy[0].rotating.period: period must be at least 1s"
    );
    assert_eq!(
        fixture.error(&OPS.replace(
            "[policy.rotating]",
            "sequence = [1111, 2222]\n[policy.rotating]"
        )),
        "knockq.toml:5: policy[0].sequence: give one of sequence, [policy.rotating], [policy.script] or [policy.spa]"
    );
    assert_eq!(
        fixture.error(&OPS.replace("[policy.rotating]\nsecret_file = \"ops.key\"\nports = \"20000-59999\"\n", "")),
        "knockq.toml:2: policy[0].sequence: no knock: give a sequence of ports, a [policy.rotating], a [policy.script] or a [policy.spa] table"
    );
}

#[test]
fn a_missing_or_open_secret_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = RotatingFixture::new();
    let missing = fixture.error(&OPS.replace("ops.key", "nope.key"));
    assert!(
        missing.starts_with("knockq.toml:6: policy[0].rotating.secret_file: secret file ")
            && missing.contains("nope.key"),
        "{missing}"
    );
    let key = fixture.dir.path().join("ops.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = fixture.error(OPS);
    assert!(
        open.starts_with("knockq.toml:6: policy[0].rotating.secret_file: secret file ")
            && open.ends_with(
                "can be read or written by group or others (mode 0644): run chmod 600 on it"
            ),
        "{open}"
    );
}

#[test]
fn a_rotating_range_takes_no_port_of_another_use() {
    let fixture = RotatingFixture::new();
    assert_eq!(
        fixture.error(&OPS.replace("open_ports = [22]", "open_ports = [22, 30000]")),
        "knockq.toml:5: policy[0].rotating: the rotating range 20000-59999 takes port 30000, \
         which is an open port of policy \"ops\""
    );
    assert_eq!(
        fixture.error(&OPS.replace("close_port = 3333", "close_port = 40000")),
        "knockq.toml:4: policy[0].close_port: close port 40000 is also in the rotating range \
         of policy \"ops\""
    );
    let fixed_after =
        format!("{OPS}[[policy]]\nname = \"web\"\nsequence = [1111, 25000]\nopen_ports = [8080]\n");
    assert_eq!(
        fixture.error(&fixed_after),
        "knockq.toml:10: policy[1].sequence: knock port 25000 is also in the rotating range \
         of policy \"ops\""
    );
    let fixed_before =
        format!("[[policy]]\nname = \"web\"\nsequence = [1111, 25000]\nopen_ports = [8080]\n{OPS}");
    assert_eq!(
        fixture.error(&fixed_before),
        "knockq.toml:9: policy[1].rotating: the rotating range 20000-59999 takes port 25000, \
         which is a knock port of policy \"web\""
    );
    let two_ranges = format!(
        "{OPS}[[policy]]\nname = \"dev\"\nopen_ports = [2222]\n[policy.rotating]\n\
         secret_file = \"ops.key\"\nports = \"59000-60999\"\n"
    );
    assert_eq!(
        fixture.error(&two_ranges),
        "knockq.toml:11: policy[1].rotating: the rotating range 59000-60999 takes port 59000, \
         which is in the rotating range of policy \"ops\""
    );
}

#[test]
fn a_cluster_section_is_read_with_its_defaults() {
    let text = format!("[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nnode = \"bastion-1\"\n{SSH}scope = \"cluster\"\n");
    let config = parse(&text, Path::new("knockq.toml")).unwrap();
    let cluster = config.cluster.unwrap();
    assert_eq!(cluster.prefix, "/knockq");
    assert_eq!(cluster.node, "bastion-1");
    assert_eq!(cluster.backlog, 10_000);
    assert_eq!(config.policies[0].scope, Scope::Cluster);
    assert_eq!(config.policies[0].offline, Offline::Closed);
    assert!(parse(SSH, Path::new("knockq.toml"))
        .unwrap()
        .cluster
        .is_none());
}

#[test]
fn cluster_settings_that_cannot_work_are_refused() {
    let cluster = |body: &str| format!("[cluster]\n{body}\n{SSH}");
    for (text, message) in [
        (
            format!("{SSH}scope = \"cluster\"\n"),
            "knockq.toml:6: policy[0].scope: scope \"cluster\" needs a [cluster] section naming the etcd endpoints",
        ),
        (
            format!("{SSH}offline = \"local\"\n"),
            "knockq.toml:6: policy[0].offline: offline applies to rotating policies with scope \"cluster\" only",
        ),
        (
            cluster("endpoints = []"),
            "knockq.toml:2: cluster.endpoints: give at least one endpoint, such as \"https://10.0.0.5:2379\"",
        ),
        (
            cluster("endpoints = [\"10.0.0.5:2379\"]"),
            "knockq.toml:2: cluster.endpoints: \"10.0.0.5:2379\" is not an endpoint such as \"https://10.0.0.5:2379\"",
        ),
        (
            cluster("endpoints = [\"https://10.0.0.5:2379\"]"),
            "knockq.toml: cluster.ca_file: https:// endpoints need ca_file, the CA that signed etcd's certificates",
        ),
        (
            cluster("endpoints = [\"http://10.0.0.5:2379\"]\nprefix = \"knockq/\""),
            "knockq.toml:3: cluster.prefix: prefix \"knockq/\" must start with '/' and not end with one",
        ),
        (
            cluster("endpoints = [\"https://10.0.0.5:2379\"]\nca_file = \"/nonexistent/ca.pem\""),
            "knockq.toml:3: cluster.ca_file: /nonexistent/ca.pem: No such file or directory (os error 2)",
        ),
    ] {
        assert_eq!(error(&text), message);
    }
}

#[test]
fn ports_may_name_their_protocol() {
    let text = "[[policy]]\nname = \"wg\"\nsequence = [1111, \"2222/udp\", \"53/tcp\"]\n\
                open_ports = [\"53/udp\", \"60000-61000/udp\", 22]\nclose_port = \"3333/udp\"\n";
    let config = parse(text, Path::new("knockq.toml")).unwrap();
    let policy = &config.policies[0];
    assert_eq!(
        policy.knock,
        Knock::Fixed(vec![
            FlowPort::tcp(1111),
            FlowPort::udp(2222),
            FlowPort::tcp(53)
        ])
    );
    assert_eq!(policy.close_port, Some(FlowPort::udp(3333)));
    assert_eq!(
        policy.open_ports[1],
        PortRange::parse("60000-61000/udp").unwrap()
    );
    let udp: Vec<String> = config
        .decided_udp_ports()
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(udp, ["53/udp", "2222/udp", "3333/udp", "60000-61000/udp"]);
    assert!(parse(SSH, Path::new("knockq.toml"))
        .unwrap()
        .decided_udp_ports()
        .is_empty());
}

#[test]
fn bad_port_specs_and_roles_per_protocol_are_refused() {
    let with = |sequence: &str, open: &str| {
        error(&format!(
            "[[policy]]\nname = \"wg\"\nsequence = {sequence}\nopen_ports = {open}\n"
        ))
    };
    assert_eq!(
        with("[\"70000/udp\", 2222]", "[22]"),
        "knockq.toml:3: policy[0].sequence[0]: port 70000 is outside 1..65535"
    );
    assert_eq!(
        with("[1111, 2222]", "[\"22/sctp\"]"),
        "knockq.toml:4: policy[0].open_ports[0]: protocol \"sctp\" is neither tcp nor udp"
    );
    assert_eq!(
        with("[1111, 2222]", "[\"5-3/udp\"]"),
        "knockq.toml:4: policy[0].open_ports[0]: port range \"5-3/udp\" ends before it starts"
    );
    assert_eq!(
        with("[1111, \"53/udp\"]", "[\"53/udp\"]"),
        "knockq.toml:3: policy[0].sequence: knock port 53/udp is also an open port of policy \"wg\""
    );
    assert_eq!(
        with("[1111, 2222]", "[\"50-60/udp\", \"55/udp\"]"),
        "knockq.toml:4: policy[0].open_ports: open port 55/udp overlaps 50-60/udp, given earlier"
    );
    assert_eq!(
        with("[\"1111/udp\", \"1112/udp\"]", "[22]"),
        "knockq.toml:3: policy[0].sequence: the sequence 1111/udp, 1112/udp is consecutive ports: \
         a port scan in order knocks it by itself; scatter the ports, or set allow_weak_sequence = true"
    );
    // TCP 53 and UDP 53 are different ports; so are 1111 and 1112/udp.
    let fine = "[[policy]]\nname = \"dns\"\nsequence = [53, \"1111/udp\", 1112]\nopen_ports = [\"53/udp\"]\n";
    parse(fine, Path::new("knockq.toml")).unwrap();
}

#[test]
fn a_rotating_range_takes_its_protocol_from_proto() {
    let fixture = RotatingFixture::new();
    let config = fixture.parse(&format!("{OPS}proto = \"udp\"\n")).unwrap();
    let Knock::Rotating(rotating) = &config.policies[0].knock else {
        panic!("not rotating");
    };
    assert_eq!(rotating.ports.to_string(), "20000-59999/udp");
    assert_eq!(
        fixture.error(&OPS.replace("20000-59999", "20000-59999/udp")),
        "knockq.toml:7: policy[0].rotating.ports: \"20000-59999/udp\" names a protocol: \
         a rotating range takes it from rotating.proto"
    );
}
