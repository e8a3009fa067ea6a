//! Single packet authorization's cost on one core: a packet verified
//! (HMAC, decryption, fields), and a forged packet refused with 1, 100 and
//! 1,000 users on one shared port, with the default cap of 16 users tried
//! and with every user tried; a UDP knock decided, as the baseline.
//!
//! `cargo bench --bench spa`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use knockq::engine::{Engine, Event, NewFlow, NoScripts, Timestamp};
use knockq::flow::FlowPort;
use knockq::loader;
use knockq::spa::{authentic, open, seal, Access, Keys, Message};

/// Writes `users` users' key files into `dir`; the gate's configuration
/// with a UDP knock policy beside the SPA policy, and the first user's keys.
fn config(dir: &Path, users: usize, cap: usize) -> (String, Keys) {
    let mut text = format!(
        "[[policy]]\nname = \"udp\"\nsequence = [\"7000/udp\", \"8000/udp\"]\nopen_ports = [2222]\n\n\
         [[policy]]\nname = \"spa\"\nopen_ports = [22]\n[policy.spa]\nmax_candidates = {cap}\n"
    );
    let mut first = None;
    for n in 0..users {
        let cipher = [(n % 251) as u8 + 1; 32];
        let hmac: Vec<u8> = (0..64).map(|i| (n * 64 + i) as u8).collect();
        for (name, bytes) in [("key", &cipher[..]), ("hmac", &hmac[..])] {
            let path = dir.join(format!("u{n}.{name}"));
            std::fs::write(&path, base64(bytes)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        text += &format!(
            "[[policy.spa.user]]\nname = \"u{n}\"\nkey_file = \"u{n}.key\"\nhmac_key_file = \"u{n}.hmac\"\n"
        );
        first.get_or_insert(Keys::new(&cipher, &hmac));
    }
    (text, first.unwrap())
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn packet(keys: &Keys, user: &str) -> Vec<u8> {
    let message = Message {
        random: "1234567890123456".into(),
        user: user.into(),
        timestamp: 1_796_653_647,
        version: "3.0.0".into(),
        access: Access {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            ports: vec![FlowPort::tcp(22)],
        },
        timeout: None,
    };
    seal(&message, keys, [5; 8]).into_bytes()
}

fn decide(engine: &Engine, port: FlowPort, payload: &[u8], events: &mut Vec<Event>) {
    let flow = NewFlow {
        src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        dst_port: port,
    };
    black_box(engine.decide(
        flow,
        payload,
        Timestamp::from_millis(1),
        events,
        &mut NoScripts,
    ));
    events.clear();
}

fn spa(c: &mut Criterion) {
    let dir = tempfile::TempDir::new().unwrap();
    let (text, keys) = config(dir.path(), 1, 16);
    let valid = packet(&keys, "u0");
    let mut forged = valid.clone();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    c.bench_function("verify a valid packet", |b| {
        b.iter(|| {
            assert!(authentic(black_box(&valid), &keys));
            black_box(open(&valid, &keys).unwrap());
        })
    });
    let engine = Engine::new(&loader::parse(&text, &dir.path().join("bench.toml")).unwrap());
    let mut events = Vec::new();
    c.bench_function("decide a UDP knock", |b| {
        b.iter(|| decide(&engine, FlowPort::udp(7000), &[0], &mut events))
    });
    for (users, cap) in [(1, 16), (100, 16), (1000, 16), (100, 100), (1000, 1000)] {
        let dir = tempfile::TempDir::new().unwrap();
        let (text, _) = config(dir.path(), users, cap);
        let engine = Engine::new(&loader::parse(&text, &dir.path().join("bench.toml")).unwrap());
        let name = format!("decide a forged packet/{users} users, {cap} tried");
        c.bench_function(&name, |b| {
            b.iter(|| {
                decide(
                    &engine,
                    FlowPort::udp(knockq::spa::DEFAULT_PORT),
                    &forged,
                    &mut events,
                )
            })
        });
    }
}

criterion_group!(benches, spa);
criterion_main!(benches);
