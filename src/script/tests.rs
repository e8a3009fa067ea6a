//! Script policies through the engine, on an injected clock: the shipped
//! examples, the contract, and hostile scripts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;
use crate::engine::{
    Decision, Engine, Event, EventKind, GrantLeft, GrantRecord, NewFlow, Reason, Timestamp,
    WallClock,
};
use crate::flow::FlowPort;
use crate::loader;

const KNOCK: Decision = Decision::reject(Reason::Knock);
const NO_GRANT: Decision = Decision::reject(Reason::NoGrant);
const FAILED: Decision = Decision::reject(Reason::Failed);
const ACCEPT: Decision = Decision::ACCEPT;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies")
}

/// A gate running one configuration, its scripts in one VM set, the clock
/// in milliseconds.
struct Gate {
    engine: Engine,
    scripts: ScriptVms,
    events: Vec<Event>,
    now: u64,
    _dir: Option<tempfile::TempDir>,
}

impl Gate {
    fn from_config(config: Config, dir: Option<tempfile::TempDir>) -> Self {
        Gate {
            engine: Engine::new(&config),
            scripts: ScriptVms::new(),
            events: Vec::new(),
            now: 1_000,
            _dir: dir,
        }
    }

    fn example(name: &str) -> Self {
        let config = loader::load(&examples().join(format!("{name}.toml"))).unwrap();
        Gate::from_config(config, None)
    }

    /// A policy "p" opening 22 and 8080, its script `lua` on knock ports
    /// 1111, 2222 and 3333, with `extra` lines in `[policy.script]`.
    fn script(lua: &str, extra: &str) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(dir.path().join("p.lua"), lua).unwrap();
        let path = dir.path().join("knockq.toml");
        std::fs::write(&path, policy_toml(extra)).unwrap();
        let config = loader::load(&path).unwrap();
        Gate::from_config(config, Some(dir))
    }

    fn syn(&mut self, src: &str, dst_port: u16) -> Decision {
        let syn = NewFlow {
            src: src.parse().unwrap(),
            dst_port: FlowPort::tcp(dst_port),
        };
        self.engine.decide(
            syn,
            &[],
            Timestamp::from_millis(self.now),
            &mut self.events,
            &mut self.scripts,
        )
    }

    fn knock(&mut self, src: &str, ports: &[u16]) {
        for &port in ports {
            assert_eq!(self.syn(src, port), KNOCK, "knock on {port}");
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    fn failures(&mut self) -> Vec<(FailureKind, String)> {
        let (described, _) = self.scripts.take_failures();
        described.into_iter().map(|f| (f.kind, f.message)).collect()
    }
}

fn policy_toml(extra: &str) -> String {
    format!(
        "[[policy]]\nname = \"p\"\nopen_ports = [22, 8080]\ngrant_timeout = \"1h\"\n\
         [policy.script]\nfile = \"p.lua\"\nknock_ports = [1111, 2222, 3333]\n{extra}"
    )
}

/// The error `knockq check` would print for a script.
fn load_error(lua: &str, extra: &str) -> String {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("p.lua"), lua).unwrap();
    let path = dir.path().join("knockq.toml");
    std::fs::write(&path, policy_toml(extra)).unwrap();
    let error = loader::load(&path).unwrap_err().to_string();
    error.replace(&format!("{}/", dir.path().display()), "")
}

#[test]
fn the_seed_script_answers_like_the_built_in_policy() {
    let builtin = "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22, 8080]\n\
                   close_port = 3333\ngrant_timeout = \"8h\"\n";
    let mut builtin = Gate::from_config(
        loader::parse(builtin, Path::new("knockq.toml")).unwrap(),
        None,
    );
    let mut script = Gate::example("seed");
    // The recipe-equivalence steps, and then some: retransmits, wrong
    // order, resets by other ports, the step window, close.
    let steps: &[(&str, u16, u64)] = &[
        ("10.0.0.1", 22, 0),
        ("10.0.0.1", 1111, 0),
        ("10.0.0.1", 2222, 0),
        ("10.0.0.1", 22, 0),
        ("10.0.0.1", 8080, 0),
        ("10.0.0.1", 443, 0),
        ("10.0.0.2", 22, 0),
        ("10.0.0.1", 2222, 0),
        ("10.0.0.1", 22, 0),
        ("10.0.0.1", 3333, 0),
        ("10.0.0.1", 22, 0),
        ("10.0.0.2", 2222, 0),
        ("10.0.0.2", 1111, 0),
        ("10.0.0.2", 22, 0),
        ("10.0.0.3", 1111, 0),
        ("10.0.0.3", 1111, 0),
        ("10.0.0.3", 2222, 0),
        ("10.0.0.3", 2222, 0),
        ("10.0.0.3", 22, 0),
        ("10.0.0.4", 1111, 0),
        ("10.0.0.4", 80, 0),
        ("10.0.0.4", 2222, 0),
        ("10.0.0.4", 22, 0),
        ("10.0.0.5", 1111, 0),
        ("10.0.0.5", 1111, 5_000),
        ("10.0.0.5", 2222, 11_000),
        ("10.0.0.5", 22, 0),
        ("10.0.0.6", 1111, 0),
        ("10.0.0.6", 2222, 9_000),
        ("10.0.0.6", 22, 0),
        ("fd00::1", 1111, 0),
        ("fd00::1", 2222, 0),
        ("fd00::1", 8080, 0),
        ("10.0.0.6", 3333, 0),
        ("10.0.0.6", 22, 0),
    ];
    for &(src, port, wait) in steps {
        builtin.advance(wait);
        script.advance(wait);
        assert_eq!(
            builtin.syn(src, port).verdict(),
            script.syn(src, port).verdict(),
            "{src} to {port}"
        );
    }
    assert_eq!(script.failures(), []);
}

#[test]
fn the_script_sees_only_its_ports_and_its_knockers() {
    // Counts its calls in the stage it returns.
    let lua = "return function(k) return if k.port == 1111 then 1 else k.stage + 1 end";
    let mut gate = Gate::script(lua, "");
    // A stranger's SYN to a port the script does not declare never enters it.
    assert_eq!(gate.syn("10.0.0.1", 4444), NO_GRANT);
    assert_eq!(gate.engine.tracked_sources(), 0);
    gate.knock("10.0.0.1", &[1111]);
    // With progress, every SYN enters it, so it can reset on other ports.
    assert_eq!(gate.syn("10.0.0.1", 4444), NO_GRANT);
    let status = gate.engine.status(Timestamp::from_millis(gate.now));
    assert_eq!(status[0].status.progress.unwrap().stage, 2);
    assert_eq!(gate.failures(), []);
}

#[test]
fn granted_sources_reach_open_ports_without_the_script() {
    // Fails on any call that is not a knock port: an open port SYN from a
    // granted source must not get there.
    let lua = "return function(k) if not k.knock then error('called for an open port') end \
               if k.port == 2222 then k:grant() end return 1 end";
    let mut gate = Gate::script(lua, "");
    gate.knock("10.0.0.1", &[2222]);
    for _ in 0..3 {
        assert_eq!(gate.syn("10.0.0.1", 22), ACCEPT);
    }
    assert_eq!(gate.failures(), []);
}

#[test]
fn progress_ends_after_the_step_window_and_the_script_sees_time() {
    let lua = "return function(k) if k.stage > 0 then assert(k.last ~= nil and k.now - k.last == 2.5) end return 1 end";
    let mut gate = Gate::script(lua, "");
    gate.knock("10.0.0.1", &[1111]);
    gate.advance(2_500);
    gate.knock("10.0.0.1", &[2222]);
    assert_eq!(
        gate.failures(),
        [],
        "k.now and k.last are the engine's times"
    );
    gate.advance(10_001);
    gate.engine.expire(
        Timestamp::from_millis(gate.now),
        crate::engine::TablePart::WHOLE,
        &mut gate.events,
    );
    assert_eq!(gate.engine.tracked_sources(), 0);
    assert!(gate.events.iter().any(|e| e.kind == EventKind::Expired));
}

#[test]
fn office_hours_count_knocks_only_in_office_hours() {
    let mut gate = Gate::example("office-hours");
    // Monday 2026-11-30 09:00 at UTC+1 is 08:00 UTC.
    let monday_nine = 1_795_996_800_000 + 8 * 3_600_000;
    let at = |gate: &mut Gate, unix_millis: u64| {
        gate.engine.set_wall_clock(WallClock {
            offset_millis: unix_millis as i64 - gate.now as i64,
        })
    };
    at(&mut gate, monday_nine);
    gate.knock("10.0.0.1", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.1", 22), ACCEPT);
    // Monday 20:00 local; Saturday 10:00 local.
    at(&mut gate, monday_nine + 11 * 3_600_000);
    gate.knock("10.0.0.2", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    at(&mut gate, monday_nine + 5 * 86_400_000 + 3_600_000);
    gate.knock("10.0.0.3", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT);
    assert_eq!(gate.failures(), []);
}

#[test]
fn cgnat_grants_the_knockers_network() {
    let mut gate = Gate::example("cgnat");
    gate.knock("198.51.100.7", &[1111, 2222]);
    assert_eq!(gate.syn("198.51.100.200", 22), ACCEPT, "the same /24");
    assert_eq!(gate.syn("198.51.101.7", 22), NO_GRANT, "another /24");
    assert_eq!(gate.syn("198.51.100.200", 23), NO_GRANT);
    gate.knock("2001:db8:0:ff::1", &[1111, 2222]);
    assert_eq!(gate.syn("2001:db8:0:aa::9", 22), ACCEPT, "the same /56");
    assert_eq!(gate.syn("2001:db8:1::9", 22), NO_GRANT);
    let status = gate.engine.status(Timestamp::from_millis(gate.now));
    let networks: Vec<(IpAddr, Option<u8>)> = status.iter().map(|s| (s.src, s.prefix)).collect();
    assert!(
        networks.contains(&("198.51.100.0".parse().unwrap(), Some(24))),
        "{networks:?}"
    );
    assert!(
        networks.contains(&("2001:db8:0::".parse().unwrap(), Some(56))),
        "{networks:?}"
    );
    // The close knock from another address of the network closes it.
    gate.knock("198.51.100.9", &[3333]);
    assert_eq!(gate.syn("198.51.100.200", 22), NO_GRANT);
    // Network grants end with their time, by the expiry sweep.
    gate.advance(3_600_000);
    gate.engine.expire(
        Timestamp::from_millis(gate.now),
        crate::engine::TablePart::WHOLE,
        &mut gate.events,
    );
    assert_eq!(gate.syn("2001:db8:0:aa::9", 22), NO_GRANT);
    assert!(gate
        .engine
        .status(Timestamp::from_millis(gate.now))
        .is_empty());
    assert_eq!(gate.failures(), []);
}

#[test]
fn network_grants_are_bounded_and_restored() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::copy(examples().join("cgnat.lua"), dir.path().join("cgnat.lua")).unwrap();
    let text = std::fs::read_to_string(examples().join("cgnat.toml")).unwrap();
    let path = dir.path().join("knockq.toml");
    std::fs::write(&path, format!("[limits]\nmax_prefix_grants = 2\n{text}")).unwrap();
    let mut gate = Gate::from_config(loader::load(&path).unwrap(), Some(dir));
    for net in 1..=3 {
        gate.knock(&format!("10.0.{net}.1"), &[1111, 2222]);
    }
    assert_eq!(gate.syn("10.0.1.2", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.2.2", 22), ACCEPT);
    // The third network did not fit: its knocker got in alone.
    assert_eq!(gate.syn("10.0.3.2", 22), NO_GRANT);
    assert_eq!(gate.syn("10.0.3.1", 22), ACCEPT);

    let key = gate.engine.policies().by_name("mobile").unwrap();
    let mut restored = Gate::from_config(loader::load(&path).unwrap(), None);
    restored
        .engine
        .restore(
            GrantRecord {
                src: "10.0.1.0".parse().unwrap(),
                prefix: Some(24),
                policy: key,
                left: GrantLeft::For(Duration::from_secs(60)),
                ports: crate::engine::PortMask::ALL,
                stage: 0,
                origin: crate::engine::Origin::LOCAL,
                user: None,
            },
            Timestamp::from_millis(restored.now),
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(restored.syn("10.0.1.77", 22), ACCEPT);
}

#[test]
fn daily_derives_the_sequence_from_the_secret_and_the_date() {
    let dir = tempfile::TempDir::new().unwrap();
    for file in ["daily.toml", "daily.lua"] {
        std::fs::copy(examples().join(file), dir.path().join(file)).unwrap();
    }
    crate::rotating::keygen(&dir.path().join("daily.key")).unwrap();
    let secret = crate::rotating::Secret::load(&dir.path().join("daily.key")).unwrap();
    let config = loader::load(&dir.path().join("daily.toml")).unwrap();
    let mut gate = Gate::from_config(config, Some(dir));
    let day = 20_000u64;
    let sequence = |day: u64| {
        let mac = secret.hmac(format!("knockq daily {day}").as_bytes());
        let n = |i: usize| u16::from_be_bytes([mac[2 * i], mac[2 * i + 1]]) % 1000;
        [20000 + n(0), 21000 + n(1), 22000 + n(2)]
    };
    gate.engine.set_wall_clock(WallClock {
        offset_millis: (day * 86_400_000 + 3_600_000) as i64 - gate.now as i64,
    });
    gate.knock("10.0.0.1", &sequence(day - 1));
    assert_eq!(gate.syn("10.0.0.1", 22), NO_GRANT, "yesterday's sequence");
    gate.knock("10.0.0.1", &sequence(day));
    assert_eq!(gate.syn("10.0.0.1", 22), ACCEPT, "today's");
    assert_eq!(gate.failures(), []);
}

#[test]
fn rhythm_wants_one_to_three_seconds_between_knocks() {
    let mut gate = Gate::example("rhythm");
    let knock_with_gaps = |gate: &mut Gate, src: &str, gap: u64| {
        gate.knock(src, &[1111]);
        gate.advance(gap);
        gate.knock(src, &[2222]);
        gate.advance(gap);
        gate.knock(src, &[3333]);
        gate.syn(src, 22)
    };
    assert_eq!(knock_with_gaps(&mut gate, "10.0.0.1", 2_000), ACCEPT);
    assert_eq!(
        knock_with_gaps(&mut gate, "10.0.0.2", 100),
        NO_GRANT,
        "too quick"
    );
    assert_eq!(
        knock_with_gaps(&mut gate, "10.0.0.3", 3_500),
        NO_GRANT,
        "too slow"
    );
    // A retransmitted SYN of a knock changes nothing.
    gate.knock("10.0.0.4", &[1111]);
    gate.advance(200);
    gate.knock("10.0.0.4", &[1111]);
    gate.advance(1_800);
    gate.knock("10.0.0.4", &[2222]);
    gate.advance(1_500);
    gate.knock("10.0.0.4", &[3333]);
    assert_eq!(gate.syn("10.0.0.4", 22), ACCEPT);
    assert_eq!(gate.failures(), []);
}

#[test]
fn allow_cidr_lets_only_its_networks_knock() {
    let mut gate = Gate::example("allow-cidr");
    gate.knock("10.9.0.3", &[1111, 2222]);
    assert_eq!(gate.syn("10.9.0.3", 22), ACCEPT);
    gate.knock("10.9.0.4", &[1111, 2222]);
    assert_eq!(gate.syn("10.9.0.4", 22), NO_GRANT);
    assert_eq!(gate.engine.tracked_sources(), 1, "outsiders leave no state");
    gate.knock("fd09::2", &[1111, 2222]);
    assert_eq!(gate.syn("fd09::2", 8080), ACCEPT);
    assert_eq!(gate.failures(), []);
}

#[test]
fn a_grant_may_open_some_of_the_ports_for_a_while() {
    let lua = "return function(k) if k.port == 2222 then k:grant{ ports = {8080}, seconds = 30 } end return 0 end";
    let mut gate = Gate::script(lua, "");
    gate.knock("10.0.0.1", &[2222]);
    assert_eq!(gate.syn("10.0.0.1", 8080), ACCEPT);
    assert_eq!(gate.syn("10.0.0.1", 22), NO_GRANT);
    gate.advance(30_000);
    assert_eq!(gate.syn("10.0.0.1", 8080), NO_GRANT);
}

#[test]
fn answers_out_of_bounds_are_refused_and_change_nothing() {
    for (lua, expected) in [
        (
            "k:grant{ ports = {23} }",
            "port 23 is not one of the policy's open_ports",
        ),
        ("k:grant{ seconds = 1e12 }", "outside 0..86400"),
        ("k:grant{ seconds = -1 }", "outside 0..86400"),
        ("k:grant{ prefix = 8 }", "prefix /8 is outside /16../32"),
        ("k:grant{ prefix = 33 }", "prefix /33 is outside /16../32"),
        ("k:grant{ colour = 'red' }", "unknown option \"colour\""),
        ("return 256", "the script returned 256"),
        ("return 1.5", "the script returned 1.5"),
        ("return 'open'", "the script returned a string"),
    ] {
        let mut gate = Gate::script(&format!("return function(k)\n  {lua}\nend"), "");
        assert_eq!(gate.syn("10.0.0.1", 1111), FAILED, "{lua}");
        assert_eq!(
            gate.syn("10.0.0.1", 22),
            NO_GRANT,
            "{lua}: nothing was granted"
        );
        assert_eq!(gate.engine.tracked_sources(), 0, "{lua}");
        let failures = gate.failures();
        assert_eq!(failures.len(), 1, "{lua}");
        let (kind, message) = &failures[0];
        assert_eq!(*kind, FailureKind::Result, "{lua}: {message}");
        assert!(message.contains(expected), "{lua}: {message}");
    }
}

#[test]
fn errors_name_the_script_file_and_line() {
    let mut gate = Gate::script("return function(k)\n  local t = nil\n  return t.x\nend", "");
    assert_eq!(gate.syn("10.0.0.1", 1111), FAILED);
    let failures = gate.failures();
    assert_eq!(failures[0].0, FailureKind::Runtime);
    assert!(failures[0].1.contains("p.lua:3:"), "{}", failures[0].1);
    // The worker goes on: the next call is decided normally.
    let mut gate = Gate::script(
        "return function(k)\n  if k.port == 1111 then error('boom') end\n  return 0\nend",
        "",
    );
    assert_eq!(gate.syn("10.0.0.1", 1111), FAILED);
    assert_eq!(gate.syn("10.0.0.1", 2222), KNOCK);
    let failures = gate.failures();
    assert!(failures[0].1.contains("p.lua:2: boom"), "{}", failures[0].1);
}

#[test]
fn a_script_that_does_not_load_is_one_line_with_file_and_line() {
    assert_eq!(
        load_error("return function(k)\n  return k.stage +\nend", ""),
        "p.lua:3: Expected identifier when parsing expression, got 'end'"
    );
    assert_eq!(load_error("error('no')\n", ""), "p.lua:1: no");
    assert!(load_error("return 42\n", "").contains("must end with `return function(k) ... end`"));
    assert_eq!(
        load_error("return function(k) end", "budget = \"1s\"\n"),
        "knockq.toml: policy[0].script.budget: budget 1s is longer than 100ms: a call that long stalls its queue"
    );
}

#[test]
fn an_endless_loop_is_stopped_by_the_budget() {
    let mut gate = Gate::script("return function(k)\n  while true do end\nend", "");
    let started = Instant::now();
    assert_eq!(gate.syn("10.0.0.1", 1111), FAILED);
    assert!(started.elapsed() < Duration::from_secs(1));
    let failures = gate.failures();
    assert_eq!(failures[0].0, FailureKind::Budget);
    assert!(
        failures[0]
            .1
            .contains("p.lua:2: the call ran past its time budget"),
        "{failures:?}"
    );
    // The VM still works for the next packet.
    assert_eq!(gate.syn("10.0.0.1", 4444), NO_GRANT);
}

#[test]
fn a_pathological_pattern_is_stopped_by_the_budget() {
    let lua = "local s = string.rep('a', 40)\nreturn function(k)\n  \
               return if string.find(s, string.rep('a*', 20) .. 'b') then 1 else 0\nend";
    let mut gate = Gate::script(lua, "");
    let started = Instant::now();
    assert_eq!(gate.syn("10.0.0.1", 1111), FAILED);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(gate.failures()[0].0, FailureKind::Budget);
}

#[test]
fn a_memory_bomb_meets_the_memory_limit() {
    let lua = "return function(k)\n  local t = {}\n  for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end\nend";
    let mut gate = Gate::script(lua, "memory_mib = 4\nbudget = \"100ms\"\n");
    assert_eq!(gate.syn("10.0.0.1", 1111), FAILED);
    let failures = gate.failures();
    assert_eq!(failures[0].0, FailureKind::Memory, "{failures:?}");
    // The VM gave the memory back and goes on.
    assert_eq!(gate.syn("10.0.0.1", 4444), NO_GRANT);
    let key = gate.engine.policies().by_name("p").unwrap();
    let Some((_, Ok(vm))) = gate.scripts.vms.iter().find(|(k, _)| *k == key) else {
        panic!("the VM is still there")
    };
    assert!(vm.used_memory() < 1 << 20, "{} bytes", vm.used_memory());
}

#[test]
fn the_sandbox_has_no_way_out_and_no_memory_across_calls() {
    for (lua, expected) in [
        ("io.open('/etc/passwd')", "attempt to index nil"),
        ("os.execute('id')", "attempt to index nil"),
        ("require('x')", "attempt to call a nil value"),
        ("loadstring('return 1')()", "attempt to call a nil value"),
        ("getfenv(1).x = 1", "attempt to call a nil value"),
        ("debug.traceback()", "attempt to index nil"),
        ("print('hello')", "attempt to call a nil value"),
        ("math.random()", "attempt to call a nil value"),
        ("x = 1", "readonly"),
        ("rawset(_G, 'x', 1)", "readonly"),
        ("string.len = nil", "readonly"),
        ("k.stage = 5", "readonly"),
        ("setmetatable(k, {})", "protected metatable"),
        ("k.secret_field = 1", "readonly"),
    ] {
        let mut gate = Gate::script(&format!("return function(k)\n  {lua}\n  return 1\nend"), "");
        assert_eq!(gate.syn("10.0.0.1", 1111), FAILED, "{lua}");
        let failures = gate.failures();
        assert_eq!(failures[0].0, FailureKind::Runtime, "{lua}");
        assert!(failures[0].1.contains(expected), "{lua}: {}", failures[0].1);
    }
    // The top level may keep constants, but nothing written by one call
    // is there for the next: globals are frozen once the script loaded.
    for lua in [
        "seen = {}\nreturn function(k)\n  seen[k.src] = true\n  return 0\nend",
        "local seen = {}\nreturn function(k)\n  seen[k.src] = true\n  return 0\nend",
        "local state = { nested = {} }\nlocal function remember(k) state.nested[k.src] = 1 end\n\
         return function(k)\n  remember(k)\n  return 0\nend",
    ] {
        let mut gate = Gate::script(lua, "");
        assert_eq!(gate.syn("10.0.0.1", 1111), FAILED, "{lua}");
        let failures = gate.failures();
        assert!(failures[0].1.contains("readonly"), "{lua}: {failures:?}");
    }
}

#[test]
fn a_reload_with_a_changed_script_takes_the_new_one() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("knockq.toml");
    std::fs::write(&path, policy_toml("")).unwrap();
    let lua = dir.path().join("p.lua");
    let opens_on = |port: u16| {
        format!("return function(k) if k.port == {port} then k:grant() end return 0 end")
    };
    std::fs::write(&lua, opens_on(2222)).unwrap();
    let mut gate = Gate::from_config(loader::load(&path).unwrap(), None);
    gate.knock("10.0.0.1", &[2222]);
    assert_eq!(gate.syn("10.0.0.1", 22), ACCEPT);
    // Other limits keep the knock, and its grants.
    std::fs::write(&path, policy_toml("budget = \"5ms\"\n")).unwrap();
    let result = gate.engine.reload(&loader::load(&path).unwrap().policies);
    assert_eq!(result.kept, ["p"]);
    assert_eq!(gate.syn("10.0.0.1", 22), ACCEPT);
    // Another text is another knock.
    std::fs::write(&lua, opens_on(1111)).unwrap();
    let result = gate.engine.reload(&loader::load(&path).unwrap().policies);
    assert_eq!(result.fresh, ["p"], "a changed script is a changed knock");
    assert_eq!(gate.syn("10.0.0.1", 22), NO_GRANT);
    gate.knock("10.0.0.2", &[2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    gate.knock("10.0.0.2", &[1111]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
}
