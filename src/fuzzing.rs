//! The parsers of untrusted bytes, each entered the way the daemon (or
//! `simulate`, or `check`) enters it: what the fuzz targets
//! (`fuzz/fuzz_targets`, `make fuzz`) and the replay of their corpus on
//! stable (`tests/fuzz_corpus.rs`) both run. Bad input is refused, never a
//! panic; where a parser's answer has an invariant, it is checked here, so
//! a broken one is a crash the fuzzer finds.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::cluster::record::{take, Keys, Taken};
use crate::config::Config;
use crate::engine::{longest_grant, Engine, Event, GrantLeft, Timestamp};
use crate::listeners::Nodes;

/// A parser entered with untrusted bytes.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus folder (`fuzz/corpus/NAME`).
pub const TARGETS: [(&str, Target); 7] = [
    ("queue_packet", queue_packet),
    ("cluster_record", cluster_record),
    ("control_request", control_request),
    ("configuration", configuration),
    ("capture", capture),
    ("state_file", state_file),
    ("spa_packet", spa_packet),
];

/// A netlink datagram from the queue, as the worker reads it: each queued
/// packet's bytes to the engine's question. The input is also read as one
/// packet's bytes alone (IPv4, IPv6 with extension headers, TCP, UDP).
pub fn queue_packet(data: &[u8]) {
    for packet in crate::daemon::queued_packets(data) {
        if let Some(payload) = packet.payload {
            let _ = crate::packet::parse_new_flow(payload);
        }
    }
    let _ = crate::packet::parse_new_flow(data);
}

/// A record under the fleet's prefix (its key, a NUL byte, its value) as
/// a node takes it, through the engine's bounds: whatever it says, no
/// grant it leaves is wider or longer than its policy gives.
pub fn cluster_record(data: &[u8]) {
    let (key, value) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let engine = Engine::new(fleet_config());
    let policies = engine.policies();
    let now = Timestamp::from_millis(1_000);
    let unix_now = 1_800_000_000_000;
    let Ok(Taken::Grant { record, .. }) = take(
        &Keys::new("/knockq"),
        "here",
        &policies,
        key,
        value,
        unix_now,
    ) else {
        return;
    };
    if engine.adopt(record, now, &mut Vec::new()).is_err() {
        return;
    }
    for grant in engine.grants(now) {
        let policy = policies
            .get(policies.by_name(&grant.policy).expect("a policy in force"))
            .expect("a policy in force");
        if let (Some(longest), Some(GrantLeft::For(left))) =
            (longest_grant(policy), grant.status.grant)
        {
            assert!(left <= longest, "{grant:?} lasts past {longest:?}");
        }
        if let Some(GrantLeft::UntilClosed) = grant.status.grant {
            assert!(longest_grant(policy).is_none(), "{grant:?} never ends");
        }
        if let Some(prefix) = grant.prefix {
            let crate::config::Knock::Script(script) = &policy.knock else {
                panic!("a network grant of a policy without a script: {grant:?}");
            };
            let shortest = match grant.src {
                IpAddr::V4(_) => script.min_prefix_v4,
                IpAddr::V6(_) => script.min_prefix_v6,
            };
            assert!(prefix >= shortest, "{grant:?} is wider than /{shortest}");
        }
    }
}

/// A control request line, answered as the daemon answers it.
pub fn control_request(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let engine = Engine::new(fleet_config());
    let now = Timestamp::from_millis(1_000);
    let mut events: Vec<Event> = Vec::new();
    let answer = crate::control::answer(&engine, &Nodes::new("here"), line, now, &mut events);
    serde_json::to_string(&answer).expect("an answer serialises");
}

/// A configuration file, through `knockq check`: read and checked whole,
/// then summarised. Files it names are looked for in a folder holding a
/// script (`policy.lua`) and a secret (`secret.key`).
pub fn configuration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = fixtures().join("knockq.toml");
    match crate::loader::parse(text, &path) {
        Ok(config) => {
            crate::cli::check::summary(&path, &config);
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "a refusal is one line: {e}"),
    }
}

/// A capture file (pcap or pcapng), read as `knockq simulate` reads it.
pub fn capture(data: &[u8]) {
    let _ = crate::simulate::capture::parse(data, Path::new("fuzz.pcap"));
}

/// A state file, restored into a fresh engine as at start.
pub fn state_file(data: &[u8]) {
    let engine = Engine::new(fleet_config());
    let store = crate::daemon::StateStore::new(&fixtures());
    let _ = store.restore_from(
        data,
        &engine,
        &Nodes::new("here"),
        Timestamp::from_millis(1_000),
        &mut Vec::new(),
    );
}

/// Policies of every kind a record or a saved grant can name: fixed and
/// script, shared and not, with and without a timeout.
const FLEET: &str = r#"
[limits]
max_sources = 1000
max_prefix_grants = 16
[cluster]
endpoints = ["http://127.0.0.1:2379"]
node = "here"
[[policy]]
name = "ssh"
sequence = [1111, 2222]
open_ports = [22, 8080]
close_port = 3333
grant_timeout = "1h"
scope = "cluster"
[[policy]]
name = "forever"
sequence = [4444, 5555]
open_ports = [443]
scope = "cluster"
[[policy]]
name = "local"
sequence = [6666, 7777]
open_ports = [22]
[[policy]]
name = "team"
open_ports = [22, 8080]
grant_timeout = "2h"
scope = "cluster"
[policy.script]
file = "policy.lua"
knock_ports = [7000, "7100-7199"]
max_grant = "8h"
min_prefix_v4 = 16
min_prefix_v6 = 48
"#;

fn fleet_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        crate::loader::parse(FLEET, &fixtures().join("fleet.toml")).expect("the fleet is valid")
    })
}

/// A folder with the files configurations name, made once per process.
fn fixtures() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("knockq-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a fixtures folder");
        std::fs::write(
            dir.join("policy.lua"),
            "return function(k) if k.stage == 1 then return k:grant{ports = {22}} end return 1 end",
        )
        .expect("the script");
        let secret = dir.join("secret.key");
        if !secret.exists() {
            crate::rotating::keygen(&secret).expect("the secret");
        }
        dir
    })
    .clone()
}

/// An SPA datagram, as the gate reads one: the HMAC check, then (as if it
/// had passed) the decryption and the plaintext's fields. The input is also
/// read as a plaintext; what it decodes to must encode back to itself.
pub fn spa_packet(data: &[u8]) {
    use crate::spa::{authentic, open, Keys, Message};
    static KEYS: OnceLock<Keys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| Keys::new(&[1; 32], &[2; 64]));
    let _ = authentic(data, keys);
    let _ = open(data, keys);
    if let Ok(message) = Message::decode(data) {
        let again = Message::decode(&message.encode());
        assert_eq!(again.as_ref(), Ok(&message), "a decoded message re-encodes");
    }
}
