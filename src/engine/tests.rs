//! The gate's rules, one test each, on an injected clock.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::flow::PortRange;
use crate::{config, loader};

/// The example policy without a grant timeout; shared with other tests.
pub(crate) const SSH: &str = r#"
[[policy]]
name = "ssh"
sequence = [1111, 2222]
step_timeout = "10s"
open_ports = [22, 8080]
close_port = 3333
"#;

const ACCEPT: Decision = Decision::ACCEPT;
const NO_GRANT: Decision = Decision::reject(Reason::NoGrant);
const KNOCK: Decision = Decision::reject(Reason::Knock);

fn engine(text: &str) -> Engine {
    Engine::new(&loader::parse(text, Path::new("test.toml")).unwrap())
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// An engine with a clock the test moves by hand, collecting events.
struct Gate {
    engine: Engine,
    now: u64,
    events: Vec<Event>,
}

impl Gate {
    fn new(text: &str) -> Self {
        Gate {
            engine: engine(text),
            now: 0,
            events: Vec::new(),
        }
    }

    fn syn(&mut self, src: &str, dst_port: u16) -> Decision {
        self.flow(src, FlowPort::tcp(dst_port))
    }

    /// A new flow of either protocol.
    fn flow(&mut self, src: &str, dst_port: FlowPort) -> Decision {
        let syn = NewFlow {
            src: ip(src),
            dst_port,
        };
        self.engine.decide(
            syn,
            &[],
            Timestamp::from_millis(self.now),
            &mut self.events,
            &mut NoScripts,
        )
    }

    fn knock(&mut self, src: &str, ports: &[u16]) {
        for &port in ports {
            assert_eq!(self.syn(src, port), KNOCK, "knock on {port}");
        }
    }

    /// SYNs that may or may not be knocks, such as a wrong rotating sequence.
    fn knock_ports_ignoring_verdicts(&mut self, src: &str, ports: &[u16]) {
        for &port in ports {
            self.syn(src, port);
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    fn expire(&mut self) {
        self.engine.expire(
            Timestamp::from_millis(self.now),
            TablePart::WHOLE,
            &mut self.events,
        );
    }

    fn key(&self, name: &str) -> PolicyKey {
        self.engine.policies().by_name(name).unwrap()
    }

    fn kinds(&self, src: &str) -> Vec<EventKind> {
        let src = ip(src);
        self.events
            .iter()
            .filter(|e| e.src == src)
            .map(|e| e.kind)
            .collect()
    }
}

#[test]
fn a_stranger_is_rejected_and_not_tracked() {
    let mut gate = Gate::new(SSH);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert_eq!(gate.syn("10.0.0.2", 443), NO_GRANT);
    assert_eq!(gate.engine.tracked_sources(), 0);
    assert!(gate.events.is_empty());
}

#[test]
fn the_sequence_opens_the_open_ports_for_the_very_next_syn() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.0.2", 8080), ACCEPT);
    assert_eq!(
        gate.syn("10.0.0.2", 22),
        ACCEPT,
        "any number of connections"
    );
    assert_eq!(
        gate.kinds("10.0.0.2"),
        [EventKind::Advanced { stage: 1 }, EventKind::Granted]
    );
}

#[test]
fn ports_no_policy_opens_stay_closed_for_granted_sources() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.2", 443), NO_GRANT);
    assert_eq!(
        gate.syn("10.0.0.2", 1111),
        KNOCK,
        "knock ports are never accepted"
    );
    assert_eq!(gate.syn("10.0.0.2", 2222), KNOCK);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
}

#[test]
fn sources_never_see_each_others_state() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111]);
    gate.knock("10.0.0.3", &[2222]);
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    gate.knock("10.0.0.2", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT);
}

#[test]
fn ipv6_sources_knock_like_ipv4_ones() {
    let mut gate = Gate::new(SSH);
    gate.knock("fd00::2", &[1111, 2222]);
    assert_eq!(gate.syn("fd00::2", 22), ACCEPT);
    assert_eq!(gate.syn("fd00::3", 22), NO_GRANT);
    assert_eq!(gate.syn("::ffff:10.0.0.2", 22), NO_GRANT);
}

#[test]
fn the_next_knock_must_come_within_the_step_window() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111]);
    gate.advance(10_000);
    gate.knock("10.0.0.2", &[2222]);
    assert_eq!(
        gate.syn("10.0.0.2", 22),
        ACCEPT,
        "exactly the window is in time"
    );

    gate.knock("10.0.0.3", &[1111]);
    gate.advance(10_001);
    gate.knock("10.0.0.3", &[2222]);
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT);
    assert_eq!(gate.kinds("10.0.0.3")[1], EventKind::Expired);
}

#[test]
fn retransmitted_knocks_change_nothing() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111, 1111, 2222, 2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(
        gate.kinds("10.0.0.2"),
        [
            EventKind::Advanced { stage: 1 },
            EventKind::Duplicate,
            EventKind::Granted,
            EventKind::Duplicate,
        ]
    );
}

#[test]
fn a_duplicate_does_not_extend_the_step_window() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111]);
    gate.advance(6_000);
    gate.knock("10.0.0.2", &[1111]);
    gate.advance(6_000);
    gate.knock("10.0.0.2", &[2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
}

#[test]
fn the_first_port_restarts_the_sequence_at_any_stage() {
    let mut gate =
        Gate::new("[[policy]]\nname = \"long\"\nsequence = [1, 2, 3]\nallow_weak_sequence = true\nopen_ports = [22]\n");
    gate.knock("10.0.0.2", &[1, 2, 1, 2, 3]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert!(gate.kinds("10.0.0.2").contains(&EventKind::Restarted));
}

#[test]
fn a_knock_out_of_order_does_not_advance() {
    let mut gate =
        Gate::new("[[policy]]\nname = \"long\"\nsequence = [1, 2, 3]\nallow_weak_sequence = true\nopen_ports = [22]\n");
    gate.knock("10.0.0.2", &[2, 3]);
    assert_eq!(
        gate.engine.tracked_sources(),
        0,
        "only the first port starts tracking"
    );
    gate.knock("10.0.0.2", &[1, 3, 2, 3]);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert!(gate.kinds("10.0.0.2").contains(&EventKind::Reset));
}

#[test]
fn strict_policies_reset_on_any_other_port() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111]);
    assert_eq!(gate.syn("10.0.0.2", 80), NO_GRANT);
    gate.knock("10.0.0.2", &[2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert_eq!(gate.kinds("10.0.0.2")[1], EventKind::Reset);
}

#[test]
fn lenient_policies_ignore_other_ports() {
    let mut gate = Gate::new(&SSH.replace("close_port", "strict = false\nclose_port"));
    gate.knock("10.0.0.2", &[1111]);
    assert_eq!(gate.syn("10.0.0.2", 80), NO_GRANT);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    gate.knock("10.0.0.2", &[2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
}

#[test]
fn the_close_port_revokes_the_grant() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.0.2", 3333), Decision::reject(Reason::Close));
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert_eq!(gate.syn("10.0.0.2", 8080), NO_GRANT);
    assert_eq!(
        gate.kinds("10.0.0.2").last(),
        Some(&EventKind::Revoked(RevokeReason::CloseKnock))
    );
}

#[test]
fn a_grant_ends_after_its_timeout() {
    let mut gate = Gate::new(&SSH.replace("close_port", "grant_timeout = \"1h\"\nclose_port"));
    gate.knock("10.0.0.2", &[1111, 2222]);
    gate.advance(3_600_000 - 1);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    gate.advance(1);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert_eq!(
        gate.kinds("10.0.0.2").last(),
        Some(&EventKind::Revoked(RevokeReason::Timeout))
    );
}

#[test]
fn without_a_timeout_a_grant_lasts_until_the_close_knock() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111, 2222]);
    gate.advance(400 * 24 * 3_600_000);
    gate.expire();
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
}

#[test]
fn knocking_again_refreshes_the_grant() {
    let mut gate = Gate::new(&SSH.replace("close_port", "grant_timeout = \"100s\"\nclose_port"));
    gate.knock("10.0.0.2", &[1111, 2222]);
    gate.advance(50_000);
    gate.knock("10.0.0.2", &[1111]);
    assert_eq!(
        gate.syn("10.0.0.2", 22),
        ACCEPT,
        "a grant survives a new knock"
    );
    gate.knock("10.0.0.2", &[1111, 2222]);
    gate.advance(99_000);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    gate.advance(1_000);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert!(gate.kinds("10.0.0.2").contains(&EventKind::Refreshed));
}

#[test]
fn a_one_port_sequence_grants_at_once() {
    let mut gate = Gate::new("[[policy]]\nname = \"one\"\nsequence = [7000]\nopen_ports = [22]\n");
    gate.knock("10.0.0.2", &[7000, 7000]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(
        gate.kinds("10.0.0.2"),
        [EventKind::Granted, EventKind::Duplicate]
    );
}

#[test]
fn policies_are_independent_and_may_share_open_ports() {
    let two = format!(
        "{SSH}\n[[policy]]\nname = \"web\"\nsequence = [5000, 6000]\nopen_ports = [22, 443]\nstrict = false\n"
    );
    let mut gate = Gate::new(&two);
    gate.knock("10.0.0.2", &[5000, 6000]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.0.2", 443), ACCEPT);
    assert_eq!(gate.syn("10.0.0.2", 8080), NO_GRANT, "8080 belongs to ssh");
    // A knock of one policy is another port to a strict policy in progress.
    gate.knock("10.0.0.3", &[1111, 5000, 2222]);
    assert_eq!(gate.syn("10.0.0.3", 8080), NO_GRANT);
    gate.knock("10.0.0.3", &[6000]);
    assert_eq!(gate.syn("10.0.0.3", 443), ACCEPT, "web is lenient");
}

#[test]
fn expiry_removes_sources_without_waiting_for_them() {
    let mut gate = Gate::new(&SSH.replace("close_port", "grant_timeout = \"1m\"\nclose_port"));
    gate.knock("10.0.0.2", &[1111]);
    gate.knock("10.0.0.3", &[1111, 2222]);
    assert_eq!(gate.engine.tracked_sources(), 2);
    gate.advance(10_001);
    gate.expire();
    assert_eq!(gate.engine.tracked_sources(), 1);
    assert_eq!(gate.kinds("10.0.0.2").last(), Some(&EventKind::Expired));
    gate.advance(50_000);
    gate.expire();
    assert_eq!(gate.engine.tracked_sources(), 0);
    assert_eq!(
        gate.kinds("10.0.0.3").last(),
        Some(&EventKind::Revoked(RevokeReason::Timeout))
    );
}

#[test]
fn a_closed_source_is_forgotten() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111, 2222]);
    assert_eq!(gate.syn("10.0.0.2", 3333), Decision::reject(Reason::Close));
    gate.advance(10_001);
    gate.expire();
    assert_eq!(gate.engine.tracked_sources(), 0);
}

fn capped(max_sources: usize) -> Gate {
    Gate::new(&format!("[limits]\nmax_sources = {max_sources}\n{SSH}"))
}

#[test]
fn a_full_table_evicts_the_least_recent_knocker() {
    let mut gate = capped(2);
    gate.knock("10.0.0.1", &[1111]);
    gate.advance(1);
    gate.knock("10.0.0.2", &[1111]);
    gate.advance(1);
    gate.knock("10.0.0.3", &[1111]);
    assert_eq!(gate.engine.tracked_sources(), 2);
    assert_eq!(gate.kinds("10.0.0.1").last(), Some(&EventKind::Evicted));
    gate.knock("10.0.0.1", &[2222]);
    assert_eq!(
        gate.syn("10.0.0.1", 22),
        NO_GRANT,
        "evicted progress is gone"
    );
    gate.knock("10.0.0.2", &[2222]);
    gate.knock("10.0.0.3", &[2222]);
    assert_eq!(gate.syn("10.0.0.3", 22), ACCEPT);
}

#[test]
fn grants_are_never_evicted_for_strangers() {
    let mut gate = capped(2);
    gate.knock("10.0.0.1", &[1111, 2222]);
    gate.knock("10.0.0.2", &[1111]);
    gate.knock("10.0.0.3", &[1111]);
    assert_eq!(gate.kinds("10.0.0.2").last(), Some(&EventKind::Evicted));
    gate.knock("10.0.0.3", &[2222]);
    for stranger in 4..50 {
        gate.knock(&format!("10.0.0.{stranger}"), &[1111]);
    }
    assert_eq!(gate.engine.tracked_sources(), 2);
    assert_eq!(gate.syn("10.0.0.1", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.0.3", 22), ACCEPT);
    gate.knock("10.0.0.9", &[2222]);
    assert_eq!(gate.syn("10.0.0.9", 22), NO_GRANT, "no room, not tracked");
}

#[test]
fn the_cap_holds_under_a_stream_of_strangers() {
    let mut gate = capped(100);
    for i in 0..10_000u32 {
        let src = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
        gate.knock(&src, &[1111]);
        assert!(gate.engine.tracked_sources() <= 100);
        gate.advance(1);
        gate.events.clear();
        if i % 1000 == 0 {
            gate.expire();
        }
    }
    assert_eq!(
        gate.engine.tracked_sources(),
        100,
        "each stranger took an evicted source's place"
    );
    gate.knock("10.0.39.15", &[2222]);
    assert_eq!(
        gate.syn("10.0.39.15", 22),
        ACCEPT,
        "the newest stranger kept its progress"
    );
}

#[test]
fn an_operator_can_grant_without_knocking_and_revoke() {
    let mut gate = Gate::new(SSH);
    let src = ip("10.0.0.7");
    gate.engine
        .grant(
            src,
            gate.key("ssh"),
            Some(Duration::from_secs(60)),
            Timestamp::from_millis(0),
            &mut gate.events,
        )
        .unwrap();
    assert_eq!(gate.syn("10.0.0.7", 22), ACCEPT);
    gate.advance(60_000);
    assert_eq!(
        gate.syn("10.0.0.7", 22),
        NO_GRANT,
        "the hand-made grant timed out"
    );

    gate.engine
        .grant(
            src,
            gate.key("ssh"),
            None,
            Timestamp::from_millis(gate.now),
            &mut gate.events,
        )
        .unwrap();
    gate.advance(400 * 24 * 3_600_000);
    assert_eq!(
        gate.syn("10.0.0.7", 22),
        ACCEPT,
        "no duration, no policy timeout: until closed"
    );
    assert_eq!(
        gate.engine
            .revoke(src, None, RevokeReason::Admin, |_| true, &mut gate.events),
        1
    );
    assert_eq!(
        gate.engine
            .revoke(src, None, RevokeReason::Admin, |_| true, &mut gate.events),
        0
    );
    assert_eq!(gate.syn("10.0.0.7", 22), NO_GRANT);
    assert_eq!(gate.engine.tracked_sources(), 0);
    assert_eq!(
        gate.kinds("10.0.0.7"),
        [
            EventKind::Granted,
            EventKind::Revoked(RevokeReason::Timeout),
            EventKind::Granted,
            EventKind::Revoked(RevokeReason::Admin),
        ]
    );
}

#[test]
fn revoking_one_policy_keeps_the_others() {
    let two = format!("{SSH}\n[[policy]]\nname = \"web\"\nsequence = [5000]\nopen_ports = [443]\n");
    let mut gate = Gate::new(&two);
    gate.knock("10.0.0.2", &[1111, 2222, 5000]);
    assert_eq!(
        gate.engine.revoke(
            ip("10.0.0.2"),
            Some(gate.key("web")),
            RevokeReason::Admin,
            |_| true,
            &mut gate.events
        ),
        1
    );
    assert_eq!(gate.syn("10.0.0.2", 443), NO_GRANT);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
}

#[test]
fn a_hand_made_grant_needs_room_but_never_evicts_grants() {
    let mut gate = capped(1);
    gate.knock("10.0.0.1", &[1111, 2222]);
    let err = gate.engine.grant(
        ip("10.0.0.2"),
        gate.key("ssh"),
        None,
        Timestamp::from_millis(0),
        &mut gate.events,
    );
    assert_eq!(err, Err(GrantError::TableFull(TableFull)));
    assert_eq!(gate.syn("10.0.0.1", 22), ACCEPT);
}

#[test]
fn status_shows_progress_and_grants_with_time_left() {
    let mut gate = Gate::new(&SSH.replace("close_port", "grant_timeout = \"1h\"\nclose_port"));
    gate.knock("10.0.0.3", &[1111]);
    gate.knock("10.0.0.2", &[1111, 2222]);
    gate.advance(4_000);
    let status = gate.engine.status(Timestamp::from_millis(gate.now));
    assert_eq!(
        status,
        [
            SourceStatus {
                src: ip("10.0.0.2"),
                prefix: None,
                policy: "ssh".into(),
                stage: 0,
                origin: Origin::LOCAL,
                user: None,
                status: PolicyStatus {
                    progress: None,
                    grant: Some(GrantLeft::For(Duration::from_secs(3596))),
                    ports: PortMask::ALL,
                },
            },
            SourceStatus {
                src: ip("10.0.0.3"),
                prefix: None,
                policy: "ssh".into(),
                stage: 0,
                origin: Origin::LOCAL,
                user: None,
                status: PolicyStatus {
                    progress: Some(Progress {
                        stage: 1,
                        of: 2,
                        left: Duration::from_secs(6),
                    }),
                    grant: None,
                    ports: PortMask::ALL,
                },
            },
        ]
    );
    assert_eq!(
        gate.engine.grants(Timestamp::from_millis(gate.now)),
        status[..1],
        "the grants alone"
    );
    gate.advance(7_000);
    assert_eq!(
        gate.engine.status(Timestamp::from_millis(gate.now)).len(),
        1,
        "progress timed out"
    );
}

#[test]
fn a_bucket_full_of_strangers_keeps_every_grant() {
    let mut gate = capped(1000);
    // Few enough grants that no bucket gets more than its eight places
    // hold, but for odds of a few in a million.
    let granted: Vec<String> = (0..100).map(|i| format!("10.1.0.{i}")).collect();
    for src in &granted {
        gate.knock(src, &[1111, 2222]);
    }
    for i in 0..20_000u32 {
        let src = std::net::Ipv4Addr::from(0x0a02_0000 + i).to_string();
        gate.knock(&src, &[1111]);
        gate.advance(1);
        gate.events.clear();
    }
    assert_eq!(gate.engine.tracked_sources(), 1000, "the cap is reached");
    for src in &granted {
        assert_eq!(gate.syn(src, 22), ACCEPT, "{src} kept its grant");
    }
}

#[test]
fn reasons_index_their_list() {
    for (i, reason) in Reason::ALL.into_iter().enumerate() {
        assert_eq!(reason as usize, i);
    }
}

fn policies_of(text: &str) -> Vec<crate::config::Policy> {
    loader::parse(text, Path::new("reload.toml"))
        .unwrap()
        .policies
}

#[test]
fn a_reload_keeps_the_state_of_unchanged_policies() {
    let two =
        format!("{SSH}\n[[policy]]\nname = \"web\"\nsequence = [5000, 6000]\nopen_ports = [443]\n");
    let mut gate = Gate::new(&two);
    gate.knock("10.0.0.2", &[1111, 2222]);
    gate.knock("10.0.0.3", &[1111]);
    gate.knock("10.0.0.4", &[5000, 6000]);
    // ssh only gets a longer step window; web changes its sequence; db is new.
    let next = format!(
        "{}\n[[policy]]\nname = \"web\"\nsequence = [5000, 7000]\nopen_ports = [443]\n\
         [[policy]]\nname = \"db\"\nsequence = [9000]\nopen_ports = [5432]\n",
        SSH.replace("\"10s\"", "\"20s\"")
    );
    let reloaded = gate.engine.reload(&policies_of(&next));
    assert_eq!(reloaded.kept, ["ssh"]);
    assert_eq!(reloaded.fresh, ["web", "db"]);
    assert_eq!(reloaded.dropped, ["web"]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT, "the grant carried over");
    gate.advance(15_000);
    gate.knock("10.0.0.3", &[2222]);
    assert_eq!(
        gate.syn("10.0.0.3", 22),
        ACCEPT,
        "progress carried over, under the new window"
    );
    assert_eq!(
        gate.syn("10.0.0.4", 443),
        NO_GRANT,
        "the changed policy's grant is gone"
    );
    gate.knock("10.0.0.4", &[5000]);
    assert_eq!(
        gate.syn("10.0.0.4", 6000),
        NO_GRANT,
        "6000 is no longer a knock port"
    );
    assert_eq!(
        gate.syn("10.0.0.4", 443),
        NO_GRANT,
        "the old sequence no longer opens"
    );
    gate.knock("10.0.0.4", &[5000, 7000]);
    assert_eq!(gate.syn("10.0.0.4", 443), ACCEPT);
    gate.knock("10.0.0.5", &[9000]);
    assert_eq!(gate.syn("10.0.0.5", 5432), ACCEPT);
}

#[test]
fn state_of_removed_policies_is_forgotten() {
    let mut gate = Gate::new(SSH);
    gate.knock("10.0.0.2", &[1111, 2222]);
    gate.engine.reload(&policies_of(
        "[[policy]]\nname = \"web\"\nsequence = [5000]\nopen_ports = [22]\n",
    ));
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert_eq!(
        gate.syn("10.0.0.3", 1111),
        NO_GRANT,
        "1111 is not a knock port any more"
    );
    gate.expire();
    assert_eq!(gate.engine.tracked_sources(), 0);
    assert!(gate
        .engine
        .status(Timestamp::from_millis(gate.now))
        .is_empty());
}

#[test]
fn restored_grants_keep_the_time_they_had_left() {
    let mut gate = Gate::new(SSH);
    let key = gate.key("ssh");
    let now = Timestamp::from_millis(0);
    let left = GrantLeft::For(Duration::from_secs(30));
    let restore = |src: &str, left| GrantRecord {
        src: ip(src),
        prefix: None,
        policy: key,
        left,
        ports: PortMask::ALL,
        stage: 0,
        origin: Origin::LOCAL,
        user: None,
    };
    gate.engine
        .restore(restore("10.0.0.2", left), now, &mut gate.events)
        .unwrap();
    gate.engine
        .restore(
            restore("10.0.0.3", GrantLeft::UntilClosed),
            now,
            &mut gate.events,
        )
        .unwrap();
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    gate.advance(30_000);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    assert_eq!(gate.syn("10.0.0.3", 8080), ACCEPT);
    assert_eq!(gate.kinds("10.0.0.3"), [EventKind::Restored]);
}

// Rotating sequences. Times are Unix milliseconds, as the daemon gives them.

const PERIOD_MS: u64 = 30_000;
/// The start of window 1000.
const WINDOW_1000: u64 = 1000 * PERIOD_MS;

fn rotating_with(secret: &[u8]) -> crate::rotating::Rotating {
    crate::rotating::Rotating {
        secret: crate::rotating::Secret::from_bytes(secret),
        length: 3,
        period: Duration::from_millis(PERIOD_MS),
        ports: PortRange::new(FlowPort::tcp(20000), FlowPort::tcp(59999)).unwrap(),
    }
}

const OPS_SECRET: &[u8] = b"ops secret: thirty-two bytes at least";

/// A gate with one rotating policy, "ops", opening 22 until the close knock
/// on 3333, at the start of window 1000.
fn rotating_gate() -> Gate {
    let policy = config::Policy {
        name: "ops".into(),
        knock: config::Knock::Rotating(rotating_with(OPS_SECRET)),
        step_timeout: Duration::from_secs(10),
        open_ports: vec![PortRange::single(FlowPort::tcp(22))],
        close_port: Some(FlowPort::tcp(3333)),
        grant_timeout: None,
        strict: true,
        hooks: Default::default(),
        scope: Default::default(),
        offline: Default::default(),
    };
    let mut gate = Gate::new(SSH);
    gate.engine.reload(&[policy]);
    gate.now = WINDOW_1000;
    gate
}

fn ops_sequence(window: u64) -> Vec<u16> {
    numbers(&rotating_with(OPS_SECRET).sequence("ops", window))
}

fn numbers(ports: &[FlowPort]) -> Vec<u16> {
    ports.iter().map(|port| port.number()).collect()
}

#[test]
fn the_current_windows_sequence_opens() {
    let mut gate = rotating_gate();
    gate.knock("10.0.0.2", &ops_sequence(1000));
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT);
}

#[test]
fn a_completed_window_cannot_be_replayed_from_anywhere() {
    let mut gate = rotating_gate();
    let sequence = ops_sequence(1000);
    gate.knock("10.0.0.2", &sequence);
    gate.advance(1_000);
    gate.knock("10.0.0.66", &sequence);
    assert_eq!(gate.syn("10.0.0.66", 22), NO_GRANT, "same window");
    assert_eq!(gate.kinds("10.0.0.66").last(), Some(&EventKind::Replayed));
    // The next window still accepts window 1000's sequence, as the previous
    // one: spent all the same.
    gate.advance(PERIOD_MS);
    gate.knock("10.0.0.67", &sequence);
    assert_eq!(gate.syn("10.0.0.67", 22), NO_GRANT, "next window");
    // Two windows on, its ports are not even knocks.
    gate.advance(PERIOD_MS);
    for &port in &sequence {
        assert_eq!(gate.syn("10.0.0.68", port), NO_GRANT);
    }
    assert_eq!(gate.syn("10.0.0.68", 22), NO_GRANT);
    // The source that knocked first kept its grant.
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
}

#[test]
fn a_cluster_rotating_knock_waits_for_its_claim() {
    let mut gate = rotating_gate();
    let mut policies = gate.engine.policies().list().to_vec();
    policies[0].scope = config::Scope::Cluster;
    gate.engine.reload(&policies);
    let sequence = ops_sequence(1000);
    gate.knock("10.0.0.2", &sequence);
    assert_eq!(
        gate.kinds("10.0.0.2").last(),
        Some(&EventKind::Claim { window: 1000 })
    );
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT, "not before the claim");
    gate.knock("10.0.0.3", &sequence);
    assert_eq!(
        gate.kinds("10.0.0.3").last(),
        Some(&EventKind::Replayed),
        "spent here already"
    );
}

#[test]
fn a_grant_of_another_node_keeps_its_origin_and_ends_by_a_cluster_revoke() {
    let mut gate = Gate::new(SSH);
    let key = gate.key("ssh");
    let shared = GrantRecord {
        src: ip("10.0.0.2"),
        prefix: None,
        policy: key,
        left: GrantLeft::For(Duration::from_secs(60)),
        ports: PortMask::ALL,
        stage: 0,
        origin: Origin(2),
        user: None,
    };
    let now = Timestamp::from_millis(gate.now);
    gate.engine.adopt(shared, now, &mut gate.events).unwrap();
    assert_eq!(gate.kinds("10.0.0.2"), [EventKind::Granted]);
    assert_eq!(gate.events[0].grant.origin, Origin(2));
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    assert_eq!(gate.engine.grants(now)[0].origin, Origin(2));
    gate.events.clear();
    let other_grant = |scope: &GrantScope| scope.until == Timestamp::from_millis(1);
    let spared = gate.engine.revoke(
        ip("10.0.0.2"),
        Some(key),
        RevokeReason::Cluster,
        other_grant,
        &mut gate.events,
    );
    assert_eq!(spared, 0, "not the grant named");
    let revoked = gate.engine.revoke(
        ip("10.0.0.2"),
        Some(key),
        RevokeReason::Cluster,
        |_| true,
        &mut gate.events,
    );
    assert_eq!(revoked, 1);
    assert_eq!(
        gate.kinds("10.0.0.2"),
        [EventKind::Revoked(RevokeReason::Cluster)]
    );
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    // A knock here makes the grant this node's own.
    gate.knock("10.0.0.2", &[1111, 2222]);
    assert_eq!(gate.engine.grants(now)[0].origin, Origin::LOCAL);
}

#[test]
fn the_previous_window_is_accepted_for_a_clock_behind() {
    let mut gate = rotating_gate();
    gate.advance(5_000);
    gate.knock("10.0.0.2", &ops_sequence(999));
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    gate.knock_ports_ignoring_verdicts("10.0.0.3", &ops_sequence(998));
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT, "two windows behind");
}

#[test]
fn a_knock_may_span_the_turn_of_a_window() {
    let mut gate = rotating_gate();
    let sequence = ops_sequence(1000);
    gate.advance(PERIOD_MS - 1_000);
    gate.knock("10.0.0.2", &sequence[..2]);
    gate.advance(2_000);
    gate.knock("10.0.0.2", &sequence[2..]);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
}

#[test]
fn sequences_of_another_secret_or_mixed_windows_never_open() {
    let mut gate = rotating_gate();
    let wrong = rotating_with(b"not the ops secret, but as long as it").sequence("ops", 1000);
    gate.knock_ports_ignoring_verdicts("10.0.0.2", &numbers(&wrong));
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
    // Two ports of one window and the last of another.
    let (now, before) = (ops_sequence(1000), ops_sequence(999));
    gate.knock("10.0.0.3", &[now[0], now[1], before[2]]);
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT);
}

#[test]
fn a_range_port_outside_the_live_sequences_resets_progress() {
    let mut gate = rotating_gate();
    let sequence = ops_sequence(1000);
    let stray = (20000..=59999)
        .find(|p| !ops_sequence(1000).contains(p) && !ops_sequence(999).contains(p))
        .unwrap();
    gate.knock("10.0.0.2", &sequence[..2]);
    assert_eq!(gate.syn("10.0.0.2", stray), NO_GRANT);
    assert_eq!(gate.kinds("10.0.0.2").last(), Some(&EventKind::Reset));
    gate.knock("10.0.0.2", &sequence[2..]);
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
}

#[test]
fn spent_windows_are_forgotten_once_no_longer_accepted() {
    let mut gate = rotating_gate();
    gate.knock("10.0.0.2", &ops_sequence(1000));
    let key = gate.key("ops");
    assert_eq!(gate.engine.spent_windows(), [(key, 1000)]);
    gate.advance(PERIOD_MS);
    gate.expire();
    assert_eq!(
        gate.engine.spent_windows(),
        [(key, 1000)],
        "still the previous"
    );
    gate.advance(PERIOD_MS);
    gate.expire();
    assert!(gate.engine.spent_windows().is_empty());
}

#[test]
fn a_restored_spent_window_stays_spent() {
    let mut gate = rotating_gate();
    let key = gate.key("ops");
    gate.engine.restore_spent(key, 1000);
    gate.knock("10.0.0.2", &ops_sequence(1000));
    assert_eq!(gate.syn("10.0.0.2", 22), NO_GRANT);
}

#[test]
fn rotating_windows_follow_the_wall_clock_and_deadlines_do_not() {
    let mut gate = rotating_gate();
    // Timestamps from a monotonic clock started at 0; Unix time is window
    // 1000 plus 1 s.
    gate.now = 5_000;
    gate.engine.set_wall_clock(WallClock {
        offset_millis: (WINDOW_1000 + 1_000 - 5_000) as i64,
    });
    gate.knock("10.0.0.2", &ops_sequence(1000));
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT);
    // The wall clock is stepped 2 windows ahead: window 1000's ports are no
    // knocks any more, window 1002's are.
    gate.engine.set_wall_clock(WallClock {
        offset_millis: (WINDOW_1000 + 2 * PERIOD_MS + 1_000 - 5_000) as i64,
    });
    gate.knock_ports_ignoring_verdicts("10.0.0.3", &ops_sequence(1000));
    assert_eq!(gate.syn("10.0.0.3", 22), NO_GRANT);
    gate.knock("10.0.0.4", &ops_sequence(1002));
    assert_eq!(gate.syn("10.0.0.4", 22), ACCEPT);
    assert_eq!(gate.syn("10.0.0.2", 22), ACCEPT, "the step moved no grant");
}

#[test]
fn expiring_the_table_in_parts_settles_every_source_once() {
    let mut gate = Gate::new(SSH);
    for i in 0..200 {
        gate.knock(&format!("10.0.{}.{}", i / 100, i % 100), &[1111]);
    }
    gate.advance(10_001);
    gate.events.clear();
    let now = Timestamp::from_millis(gate.now);
    let mut left = Vec::new();
    for index in 0..8 {
        let part = TablePart { index, of: 8 };
        gate.engine.expire(now, part, &mut gate.events);
        left.push(gate.engine.tracked_sources());
    }
    assert!(
        (1..200).contains(&left[0]),
        "one part is not the whole table: {left:?}"
    );
    assert!(left.windows(2).all(|w| w[0] >= w[1]), "{left:?}");
    assert_eq!(left[7], 0);
    let expired = gate.events.iter().filter(|e| e.kind == EventKind::Expired);
    assert_eq!(expired.count(), 200);
}

#[test]
fn open_until_is_the_latest_end_of_the_grants_that_open_the_port() {
    let text = format!(
        "{SSH}grant_timeout = \"1h\"\n[[policy]]\nname = \"ops\"\nsequence = [5000, 6000]\nopen_ports = [22]\ngrant_timeout = \"2h\"\n"
    );
    let mut gate = Gate::new(&text);
    let src = "10.0.0.2";
    let until = |gate: &Gate, port| {
        let now = Timestamp::from_millis(gate.now);
        gate.engine
            .open_until(ip(src), None, FlowPort::tcp(port), now)
    };
    assert_eq!(until(&gate, 22), None, "no grant");
    gate.knock(src, &[1111, 2222]);
    let hour = Duration::from_secs(3600);
    let first = Timestamp::from_millis(0).saturating_add(hour);
    assert_eq!(until(&gate, 22), Some(first));
    gate.advance(1000);
    gate.knock(src, &[5000, 6000]);
    let second = Timestamp::from_millis(1000).saturating_add(2 * hour);
    assert_eq!(until(&gate, 22), Some(second), "the later of the two");
    assert_eq!(until(&gate, 8080), Some(first), "ops does not open 8080");
    gate.syn(src, 3333);
    assert_eq!(until(&gate, 8080), None, "closed");
    assert_eq!(until(&gate, 22), Some(second), "still opened by ops");
    gate.now = second.as_millis();
    assert_eq!(until(&gate, 22), None, "ended, even before it is expired");
    assert_eq!(
        gate.engine.open_until(
            ip("10.0.0.0"),
            Some(24),
            FlowPort::tcp(22),
            Timestamp::from_millis(0)
        ),
        None,
        "no network grant"
    );
}

#[test]
fn a_grant_by_hand_lasts_no_longer_than_the_policys_own() {
    let gate = Gate::new(&SSH.replace(
        "close_port = 3333",
        "close_port = 3333\ngrant_timeout = \"1h\"",
    ));
    let key = gate.engine.policies().key(0);
    let now = Timestamp::from_millis(0);
    let hour = Duration::from_secs(3600);
    let grant = |duration| {
        gate.engine
            .grant(ip("10.0.0.2"), key, Some(duration), now, &mut Vec::new())
    };
    assert_eq!(grant(2 * hour), Err(GrantError::TooLong { longest: hour }));
    assert_eq!(grant(hour), Ok(()));
    let unbounded = Gate::new(SSH);
    let key = unbounded.engine.policies().key(0);
    assert_eq!(
        unbounded
            .engine
            .grant(ip("10.0.0.2"), key, Some(1000 * hour), now, &mut Vec::new()),
        Ok(()),
        "a policy whose grants last until closed"
    );
}

const WIREGUARD: &str = r#"[[policy]]
name = "wg"
sequence = ["7000/udp", 8000, "9000/udp"]
open_ports = [22, "51820/udp", "60000-61000/udp"]
close_port = "7001/udp"
"#;

#[test]
fn a_mixed_sequence_opens_udp_and_tcp_ports() {
    let mut gate = Gate::new(WIREGUARD);
    let src = "10.0.0.2";
    assert_eq!(gate.flow(src, FlowPort::udp(51820)), NO_GRANT);
    for port in [
        FlowPort::udp(7000),
        FlowPort::tcp(8000),
        FlowPort::udp(9000),
    ] {
        assert_eq!(gate.flow(src, port), KNOCK, "knock on {port}");
    }
    assert_eq!(gate.flow(src, FlowPort::udp(51820)), ACCEPT);
    assert_eq!(
        gate.flow(src, FlowPort::udp(60500)),
        ACCEPT,
        "inside the range"
    );
    assert_eq!(gate.flow(src, FlowPort::tcp(22)), ACCEPT);
    // The protocol is part of the port: TCP 51820 and UDP 22 stay closed.
    assert_eq!(gate.flow(src, FlowPort::tcp(51820)), NO_GRANT);
    assert_eq!(gate.flow(src, FlowPort::udp(22)), NO_GRANT);
    assert_eq!(
        gate.flow(src, FlowPort::udp(7001)),
        Decision::reject(Reason::Close)
    );
    assert_eq!(gate.flow(src, FlowPort::udp(51820)), NO_GRANT);
}

#[test]
fn the_same_number_of_the_other_protocol_is_not_a_knock() {
    let mut gate = Gate::new(WIREGUARD);
    let src = "10.0.0.2";
    assert_eq!(gate.flow(src, FlowPort::udp(7000)), KNOCK);
    // TCP 8000 is the second step; TCP 7000 and UDP 8000 are not knocks, and
    // a strict policy resets on them.
    assert_eq!(gate.flow(src, FlowPort::udp(8000)), NO_GRANT);
    assert_eq!(
        gate.kinds(src),
        [EventKind::Advanced { stage: 1 }, EventKind::Reset]
    );
    assert_eq!(gate.flow(src, FlowPort::udp(7000)), KNOCK);
    assert_eq!(gate.flow(src, FlowPort::tcp(7000)), NO_GRANT);
    assert_eq!(
        gate.flow(src, FlowPort::tcp(8000)),
        KNOCK,
        "reset: no longer the second step"
    );
    assert_eq!(gate.flow(src, FlowPort::udp(9000)), KNOCK);
    assert_eq!(gate.flow(src, FlowPort::udp(51820)), NO_GRANT);
}

/// Single packet authorization: packets sealed as fwknop's client seals
/// them, on the gate's injected clock.
mod spa {
    use super::*;
    use crate::spa::{seal, Access, Keys, Message};

    /// Unix time at the test clock's origin.
    const EPOCH_SECS: u64 = 1_796_653_647;

    struct SpaGate {
        gate: Gate,
        dir: tempfile::TempDir,
        keys: Vec<(String, Keys)>,
    }

    /// Writes a user's two key files into `dir`; their config lines.
    fn user(dir: &Path, name: &str, extra: &str) -> (String, Keys) {
        use std::os::unix::fs::PermissionsExt;
        let cipher = [name.len() as u8; 32];
        let hmac = [name.as_bytes()[0]; 64];
        for (file, bytes) in [("key", &cipher[..]), ("hmac", &hmac[..])] {
            let path = dir.join(format!("{name}.{file}"));
            std::fs::write(&path, crate::spa::base64_encode(bytes)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let d = dir.display();
        let text = format!(
            "[[policy.spa.user]]\nname = \"{name}\"\nkey_file = \"{d}/{name}.key\"\nhmac_key_file = \"{d}/{name}.hmac\"\n{extra}\n"
        );
        (text, Keys::new(&cipher, &hmac))
    }

    /// A gate with an SPA policy opening 22 and 53/udp for `users` (name,
    /// extra settings), and `spa` settings.
    fn spa_gate(spa: &str, users: &[(&str, &str)]) -> SpaGate {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "[[policy]]\nname = \"spa\"\nopen_ports = [22, \"53/udp\", 8080]\ngrant_timeout = \"30s\"\n[policy.spa]\n{spa}\n"
        );
        let mut keys = Vec::new();
        for (name, extra) in users {
            let (lines, user_keys) = user(dir.path(), name, extra);
            text.push_str(&lines);
            keys.push((name.to_string(), user_keys));
        }
        let gate = Gate::new(&text);
        gate.engine.set_wall_clock(WallClock {
            offset_millis: (EPOCH_SECS * 1000) as i64,
        });
        SpaGate { gate, dir, keys }
    }

    fn message(user: &str, addr: &str, ports: &[FlowPort], timestamp: u64) -> Message {
        Message {
            random: "1234567890123456".into(),
            user: user.into(),
            timestamp,
            version: "3.0.0".into(),
            access: Access {
                addr: addr.parse().unwrap(),
                ports: ports.to_vec(),
            },
            timeout: None,
        }
    }

    impl SpaGate {
        fn keys(&self, user: &str) -> &Keys {
            &self.keys.iter().find(|(name, _)| name == user).unwrap().1
        }

        /// Unix time now on the gate's clock.
        fn unix(&self) -> u64 {
            EPOCH_SECS + self.gate.now / 1000
        }

        /// The datagram `user` sends asking for `ports` for `addr`, now.
        fn packet(&self, user: &str, addr: &str, ports: &[FlowPort]) -> Vec<u8> {
            let message = message(user, addr, ports, self.unix());
            seal(&message, self.keys(user), [3; 8]).into_bytes()
        }

        /// Sends `datagram` from `src`; what became of it.
        fn send(&mut self, src: &str, datagram: &[u8]) -> SpaOutcome {
            self.send_to(src, crate::spa::DEFAULT_PORT, datagram)
        }

        /// Decides `datagram` from `src` to UDP `port`, leaving its events
        /// in the gate's list.
        fn deliver(&mut self, src: &str, port: u16, datagram: &[u8]) -> Decision {
            let flow = NewFlow {
                src: ip(src),
                dst_port: FlowPort::udp(port),
            };
            self.gate.engine.decide(
                flow,
                datagram,
                Timestamp::from_millis(self.gate.now),
                &mut self.gate.events,
                &mut NoScripts,
            )
        }

        /// The same, to UDP `port`.
        fn send_to(&mut self, src: &str, port: u16, datagram: &[u8]) -> SpaOutcome {
            let decision = self.deliver(src, port, datagram);
            assert_eq!(
                decision.verdict(),
                Verdict::Drop,
                "SPA datagrams are dropped"
            );
            let outcomes: Vec<SpaOutcome> = self
                .gate
                .events
                .drain(..)
                .filter_map(|e| match e.kind {
                    EventKind::Spa { outcome, .. } => Some(outcome),
                    _ => None,
                })
                .collect();
            assert_eq!(outcomes.len(), 1, "one outcome per datagram");
            outcomes[0]
        }
    }

    const TCP22: FlowPort = FlowPort::tcp(22);

    #[test]
    fn a_packet_grants_its_source_at_once_and_a_replay_gains_nothing() {
        let mut g = spa_gate("", &[("alice", "")]);
        let packet = g.packet("alice", "10.0.0.2", &[TCP22]);
        assert_eq!(g.gate.syn("10.0.0.2", 22), NO_GRANT);
        assert_eq!(g.send("10.0.0.2", &packet), SpaOutcome::Granted);
        assert_eq!(g.gate.syn("10.0.0.2", 22), ACCEPT, "the very next SYN");
        assert_eq!(g.gate.syn("10.0.0.2", 8080), NO_GRANT, "not asked for");
        assert_eq!(g.send("10.0.0.2", &packet), SpaOutcome::Replayed);
        assert_eq!(g.send("10.0.0.9", &packet), SpaOutcome::RefusedAddress);
        assert_eq!(g.gate.syn("10.0.0.9", 22), NO_GRANT);
        g.gate.now += 31_000;
        g.gate.expire();
        assert_eq!(g.gate.syn("10.0.0.2", 22), NO_GRANT, "grant_timeout");
    }

    #[test]
    fn any_source_packets_grant_their_sender_and_replay_from_elsewhere_fails() {
        let mut g = spa_gate(
            "",
            &[("alice", ""), ("bob", "require_source_address = true")],
        );
        let packet = g.packet("alice", "0.0.0.0", &[TCP22]);
        assert_eq!(g.send("10.0.0.3", &packet), SpaOutcome::Granted);
        assert_eq!(g.send("10.0.0.4", &packet), SpaOutcome::Replayed);
        assert_eq!(g.gate.syn("10.0.0.4", 22), NO_GRANT);
        let packet = g.packet("bob", "0.0.0.0", &[TCP22]);
        assert_eq!(g.send("10.0.0.5", &packet), SpaOutcome::RefusedAddress);
    }

    #[test]
    fn packets_too_old_or_from_the_future_are_refused() {
        let mut g = spa_gate("max_age = \"120s\"", &[("alice", "")]);
        g.gate.now = 1_000_000;
        let old = message("alice", "10.0.0.2", &[TCP22], g.unix() - 600);
        let old = seal(&old, g.keys("alice"), [1; 8]);
        assert_eq!(g.send("10.0.0.2", old.as_bytes()), SpaOutcome::TooOld);
        let ahead = message("alice", "10.0.0.2", &[TCP22], g.unix() + 121);
        let ahead = seal(&ahead, g.keys("alice"), [1; 8]);
        assert_eq!(g.send("10.0.0.2", ahead.as_bytes()), SpaOutcome::TooOld);
        let skewed = message("alice", "10.0.0.2", &[TCP22], g.unix() - 119);
        let skewed = seal(&skewed, g.keys("alice"), [1; 8]);
        assert_eq!(g.send("10.0.0.2", skewed.as_bytes()), SpaOutcome::Granted);
    }

    #[test]
    fn each_refusal_has_its_outcome_and_grants_nothing() {
        let mut g = spa_gate(
            "",
            &[
                ("alice", "sources = [\"10.0.0.0/24\"]\nopen_ports = [22]"),
                ("carol", "expires = \"2020-01-01\""),
            ],
        );
        let forged = Keys::new(&[9; 32], &[9; 64]);
        let message_for = |user: &str, g: &SpaGate| message(user, "10.0.0.2", &[TCP22], g.unix());
        let wrong_keys = seal(&message_for("alice", &g), &forged, [1; 8]);
        assert_eq!(
            g.send("10.0.0.2", wrong_keys.as_bytes()),
            SpaOutcome::BadHmac
        );
        assert_eq!(g.send("10.0.0.2", &[b'A'; 1500]), SpaOutcome::BadHmac);
        let other_name = seal(&message_for("mallory", &g), g.keys("alice"), [1; 8]);
        assert_eq!(
            g.send("10.0.0.2", other_name.as_bytes()),
            SpaOutcome::UnknownUser
        );
        let expired = g.packet("carol", "10.0.0.2", &[TCP22]);
        assert_eq!(g.send("10.0.0.2", &expired), SpaOutcome::ExpiredUser);
        let not_hers = g.packet("alice", "10.0.0.2", &[FlowPort::tcp(8080)]);
        assert_eq!(g.send("10.0.0.2", &not_hers), SpaOutcome::RefusedPort);
        let not_the_policys = g.packet("alice", "10.0.0.2", &[FlowPort::tcp(23)]);
        assert_eq!(
            g.send("10.0.0.2", &not_the_policys),
            SpaOutcome::RefusedPort
        );
        // Outside alice's sources, only carol's key is tried.
        let outside = g.packet("alice", "192.0.2.1", &[TCP22]);
        assert_eq!(g.send("192.0.2.1", &outside), SpaOutcome::BadHmac);
        let mut cut = g.packet("alice", "10.0.0.2", &[TCP22]);
        cut.truncate(cut.len() - 5);
        assert_eq!(g.send("10.0.0.2", &cut), SpaOutcome::BadHmac);
        for src in ["10.0.0.2", "192.0.2.1"] {
            assert_eq!(g.gate.syn(src, 22), NO_GRANT, "{src}");
        }
        let asked_both = g.packet("alice", "10.0.0.2", &[TCP22, FlowPort::tcp(8080)]);
        assert_eq!(g.send("10.0.0.2", &asked_both), SpaOutcome::Granted);
        assert_eq!(g.gate.syn("10.0.0.2", 22), ACCEPT);
        assert_eq!(g.gate.syn("10.0.0.2", 8080), NO_GRANT, "only her own ports");
    }

    #[test]
    fn a_source_no_user_may_send_from_is_refused_without_any_hmac() {
        let mut g = spa_gate("", &[("alice", "sources = [\"10.0.0.0/24\"]")]);
        let packet = g.packet("alice", "192.0.2.1", &[TCP22]);
        assert_eq!(g.send("192.0.2.1", &packet), SpaOutcome::RefusedSource);
    }

    #[test]
    fn the_client_timeout_is_kept_within_the_users_max_timeout() {
        let mut g = spa_gate("", &[("alice", "max_timeout = \"10s\"")]);
        let mut asked = message("alice", "10.0.0.2", &[TCP22], g.unix());
        asked.timeout = Some(5);
        let packet = seal(&asked, g.keys("alice"), [1; 8]);
        assert_eq!(g.send("10.0.0.2", packet.as_bytes()), SpaOutcome::Granted);
        g.gate.now += 4_000;
        assert_eq!(g.gate.syn("10.0.0.2", 22), ACCEPT);
        g.gate.now += 2_000;
        assert_eq!(g.gate.syn("10.0.0.2", 22), NO_GRANT, "5 s asked");
        asked.timeout = Some(3600);
        let packet = seal(&asked, g.keys("alice"), [2; 8]);
        assert_eq!(g.send("10.0.0.2", packet.as_bytes()), SpaOutcome::Granted);
        g.gate.now += 11_000;
        assert_eq!(g.gate.syn("10.0.0.2", 22), NO_GRANT, "10 s at most");
    }

    #[test]
    fn the_candidate_cap_counts_the_users_left_untried() {
        let mut g = spa_gate(
            "max_candidates = 1",
            &[("alice", ""), ("bob", ""), ("carol", "")],
        );
        let packet = g.packet("carol", "10.0.0.2", &[TCP22]);
        g.deliver("10.0.0.2", crate::spa::DEFAULT_PORT, &packet);
        let untried: Vec<(SpaOutcome, u16)> = g
            .gate
            .events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Spa { outcome, untried } => Some((outcome, untried)),
                _ => None,
            })
            .collect();
        assert_eq!(untried, vec![(SpaOutcome::BadHmac, 2)]);
    }

    #[test]
    fn a_full_replay_cache_refuses_new_packets_until_old_ones_age_out() {
        let mut g = spa_gate("replay_cache = 16\nmax_age = \"60s\"", &[("alice", "")]);
        for i in 0..16u8 {
            let mut m = message("alice", "10.0.0.2", &[TCP22], g.unix());
            m.random = format!("{:016}", i);
            let packet = seal(&m, g.keys("alice"), [i; 8]);
            assert_eq!(g.send("10.0.0.2", packet.as_bytes()), SpaOutcome::Granted);
        }
        let next = g.packet("alice", "10.0.0.2", &[TCP22]);
        assert_eq!(g.send("10.0.0.2", &next), SpaOutcome::CacheFull);
        g.gate.now += 61_000;
        let later = g.packet("alice", "10.0.0.2", &[TCP22]);
        assert_eq!(g.send("10.0.0.2", &later), SpaOutcome::Granted);
    }

    #[test]
    fn a_reload_ends_a_removed_users_grants_and_keeps_the_others() {
        let mut g = spa_gate("", &[("alice", ""), ("bob", "")]);
        let alice = g.packet("alice", "10.0.0.2", &[TCP22]);
        let bob = g.packet("bob", "10.0.0.3", &[TCP22]);
        assert_eq!(g.send("10.0.0.2", &alice), SpaOutcome::Granted);
        assert_eq!(g.send("10.0.0.3", &bob), SpaOutcome::Granted);
        let (lines, _) = user(g.dir.path(), "bob", "");
        let text = format!(
            "[[policy]]\nname = \"spa\"\nopen_ports = [22, \"53/udp\", 8080]\ngrant_timeout = \"30s\"\n[policy.spa]\n{lines}"
        );
        let config = loader::parse(&text, Path::new("test.toml")).unwrap();
        g.gate.engine.reload(&config.policies);
        g.gate.expire();
        let revoked: Vec<(IpAddr, EventKind)> =
            g.gate.events.drain(..).map(|e| (e.src, e.kind)).collect();
        assert_eq!(
            revoked,
            vec![(
                ip("10.0.0.2"),
                EventKind::Revoked(RevokeReason::UserRemoved)
            )]
        );
        assert_eq!(g.gate.syn("10.0.0.2", 22), NO_GRANT);
        assert_eq!(g.gate.syn("10.0.0.3", 22), ACCEPT);
    }

    #[test]
    fn an_spa_grant_names_its_user() {
        let mut g = spa_gate("", &[("alice", "")]);
        let packet = g.packet("alice", "10.0.0.2", &[TCP22]);
        g.deliver("10.0.0.2", crate::spa::DEFAULT_PORT, &packet);
        let grant = g
            .gate
            .events
            .iter()
            .find(|e| e.kind == EventKind::Granted)
            .unwrap();
        let policies = g.gate.engine.policies();
        assert_eq!(
            policies.user_name(grant.policy, grant.grant.user.unwrap()),
            Some("alice")
        );
    }

    #[test]
    fn a_user_with_a_port_of_their_own_is_found_there_alone() {
        let mut g = spa_gate("", &[("alice", ""), ("bob", "port = 62202")]);
        let bob = g.packet("bob", "10.0.0.3", &[TCP22]);
        assert_eq!(g.send_to("10.0.0.3", 62202, &bob), SpaOutcome::Granted);
        assert_eq!(g.gate.syn("10.0.0.3", 22), ACCEPT);
        let bob = g.packet("bob", "10.0.0.4", &[TCP22]);
        assert_eq!(
            g.send("10.0.0.4", &bob),
            SpaOutcome::BadHmac,
            "not on the shared port"
        );
        let alice = g.packet("alice", "10.0.0.2", &[TCP22]);
        assert_eq!(
            g.send_to("10.0.0.2", 62202, &alice),
            SpaOutcome::BadHmac,
            "only bob is tried there"
        );
        assert_eq!(g.send("10.0.0.2", &alice), SpaOutcome::Granted);
    }

    #[test]
    fn a_users_port_with_another_role_is_refused_where_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (lines, _) = user(dir.path(), "bob", "port = 22");
        let text = format!(
            "[[policy]]\nname = \"spa\"\nopen_ports = [22, \"22/udp\"]\n[policy.spa]\n{lines}"
        );
        let err = loader::parse(&text, Path::new("test.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "test.toml:9: policy[0].spa.user[0].port: the user's port 22/udp is also an open port of policy \"spa\""
        );
        let users = dir.path().join("users");
        std::fs::create_dir(&users).unwrap();
        let (lines, _) = user(dir.path(), "carol", "port = 7000");
        std::fs::write(
            users.join("carol.toml"),
            lines.replace("[[policy.spa.user]]\n", ""),
        )
        .unwrap();
        let text = format!(
            "[[policy]]\nname = \"knock\"\nsequence = [\"7000/udp\", 8000]\nopen_ports = [22]\n\n\
             [[policy]]\nname = \"spa\"\nopen_ports = [22]\n[policy.spa]\nusers_dir = \"{}\"\n",
            users.display()
        );
        let err = loader::parse(&text, Path::new("test.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}:4: port: the user's port 7000/udp is also a knock port of policy \"knock\"",
                users.join("carol.toml").display()
            )
        );
    }
}
