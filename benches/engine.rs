//! The engine's decision time and memory per tracked source.
//!
//! `cargo bench --bench engine`. Decisions for an unknown source, a knock
//! that advances, a first knock into a full table (evicting), and a granted
//! source, with 1, 100,000 and 1,000,000 tracked sources, on one thread and
//! on two threads sharing the engine; and the same knock written as a script
//! policy at 1,000,000 tracked sources. Memory is measured with a counting
//! allocator, not estimated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use knockq::engine::{Engine, Event, NewFlow, Timestamp};
use knockq::flow::FlowPort;
use knockq::loader;
use knockq::script::ScriptVms;

/// Counts the bytes live on the heap.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CONFIG: &str = r#"
[limits]
max_sources = MAX

[[policy]]
name = "ssh"
sequence = [1111, 2222, 4444]
step_timeout = "1h"
open_ports = [22, 8080]
close_port = 3333
"#;

/// The built-in policy's knock, as a script policy.
const SCRIPT_CONFIG: &str = r#"
[limits]
max_sources = MAX

[[policy]]
name = "ssh"
step_timeout = "1h"
open_ports = [22, 8080]
[policy.script]
file = "bench.lua"
knock_ports = [1111, 2222, 3333, 4444]
"#;

/// The seed example's script, with the built-in policy's three ports.
fn script() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies/seed.lua");
    let seed = std::fs::read_to_string(path).unwrap();
    let script = seed.replace("{ 1111, 2222 }", "{ 1111, 2222, 4444 }");
    assert_ne!(script, seed, "the seed script's sequence");
    script
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    BuiltIn,
    Script,
}

fn engine(max_sources: usize) -> Engine {
    engine_with(Policy::BuiltIn, max_sources)
}

fn engine_with(policy: Policy, max_sources: usize) -> Engine {
    let text = match policy {
        Policy::BuiltIn => CONFIG,
        Policy::Script => SCRIPT_CONFIG,
    };
    let dir = tempfile::TempDir::new().unwrap();
    if policy == Policy::Script {
        std::fs::write(dir.path().join("bench.lua"), script()).unwrap();
    }
    let text = text.replace("MAX", &max_sources.to_string());
    Engine::new(&loader::parse(&text, &dir.path().join("bench.toml")).unwrap())
}

/// The n-th source address of the benchmark, spread over 10.0.0.0/8.
fn source(n: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        0x0a00_0000 + (n.wrapping_mul(2_654_435_761) & 0x00ff_ffff) as u32,
    ))
}

/// What one thread needs to decide: its events buffer and its script VMs,
/// as a worker has.
#[derive(Default)]
struct Thread {
    events: Vec<Event>,
    scripts: ScriptVms,
}

fn decide(engine: &Engine, src: IpAddr, dst_port: u16, thread: &mut Thread) {
    black_box(engine.decide(
        NewFlow {
            src,
            dst_port: FlowPort::tcp(dst_port),
        },
        &[],
        Timestamp::from_millis(1),
        &mut thread.events,
        &mut thread.scripts,
    ));
    thread.events.clear();
}

/// Packets the daemon's worker takes per wake-up at most.
const BATCH: usize = 64;

/// Decides SYNs from `batch` to `dst_port` in order; with `prefetch`, as
/// the worker does, first starts loading every source's state.
fn decide_batch(
    engine: &Engine,
    batch: &[IpAddr],
    dst_port: u16,
    prefetch: bool,
    events: &mut Thread,
) {
    if prefetch {
        for &src in batch {
            engine.prefetch(src);
        }
    }
    for &src in batch {
        decide(engine, src, dst_port, events);
    }
}

/// An engine tracking `tracked` sources at stage 1, with room for as many
/// more (and at least the default cap), so that they are not evicted.
fn filled(policy: Policy, tracked: u64) -> Engine {
    let engine = engine_with(policy, (2 * tracked as usize).max(1 << 20));
    let mut events = Thread::default();
    for n in 0..tracked {
        decide(&engine, source(n), 1111, &mut events);
    }
    engine
}

/// The whole engine's heap, filled to its cap of a million sources, per
/// source. The table is allocated at its full size up front, so this counts
/// from before the engine exists.
fn memory_per_source() {
    const SOURCES: usize = 1_000_000;
    let before = LIVE.load(Ordering::Relaxed);
    let engine = engine(SOURCES);
    let mut events = Thread::default();
    // Some first knocks land in a full bucket below the cap and take an
    // older source's place: knock until the cap is reached.
    let mut n = 0;
    while engine.tracked_sources() < SOURCES {
        decide(&engine, source(n), 1111, &mut events);
        n += 1;
    }
    let full = LIVE.load(Ordering::Relaxed);
    println!(
        "memory: {} bytes per tracked source ({SOURCES} sources, {n} first knocks to reach them)",
        (full - before) / SOURCES,
    );
}

fn single_thread(c: &mut Criterion) {
    memory_per_source();
    for (policy, tracked) in [
        (Policy::BuiltIn, 1u64),
        (Policy::BuiltIn, 100_000),
        (Policy::BuiltIn, 1_000_000),
        (Policy::Script, 1_000_000),
    ] {
        let engine = filled(policy, tracked);
        let mut events = Thread::default();
        let name = match policy {
            Policy::BuiltIn => format!("decide/{tracked} tracked"),
            Policy::Script => format!("decide/{tracked} tracked, script policy"),
        };
        let mut group = c.benchmark_group(name);
        let mut n = 0;
        group.bench_function("unknown source", |b| {
            b.iter(|| {
                n += 1;
                decide(&engine, source(tracked + n), 22, &mut events)
            })
        });
        // The tracked sources in turn, 64 at a time, knock the second port
        // of three (timed) and then the first again (untimed), which puts
        // them back at stage 1 for their next turn. With many sources their
        // state is out of the CPU's cache by then, as in a real gate.
        for (name, prefetch) in [
            ("knock that advances", false),
            ("knock that advances, batches of 64 prefetched", true),
        ] {
            let mut turn = 0;
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut took = Duration::ZERO;
                    for _ in 0..iters {
                        let batch: [IpAddr; BATCH] =
                            std::array::from_fn(|i| source((turn + i as u64) % tracked));
                        turn += BATCH as u64;
                        let start = Instant::now();
                        decide_batch(&engine, &batch, 2222, prefetch, &mut events);
                        took += start.elapsed();
                        decide_batch(&engine, &batch, 1111, false, &mut events);
                    }
                    took / BATCH as u32
                })
            });
        }
        let granted: Vec<IpAddr> = (0..1000).map(|i| source(u64::MAX / 4 + i)).collect();
        for &src in &granted {
            for port in [1111, 2222, 4444] {
                decide(&engine, src, port, &mut events);
            }
        }
        let mut i = 0;
        group.bench_function("granted source", |b| {
            b.iter(|| {
                i = (i + 1) % granted.len();
                decide(&engine, granted[i], 22, &mut events)
            })
        });
        group.finish();
    }

    // A first knock into a table at its cap: each one evicts the oldest.
    let full = engine(1_000_000);
    let mut events = Thread::default();
    for n in 0..1_000_000 {
        decide(&full, source(n), 1111, &mut events);
    }
    let mut n = 1_000_000;
    for (name, prefetch) in [
        ("first knock evicting", false),
        ("first knock evicting, batches of 64 prefetched", true),
    ] {
        c.bench_function(&format!("decide/1000000 tracked, full/{name}"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let batch: [IpAddr; BATCH] = std::array::from_fn(|i| source(n + i as u64));
                    n += BATCH as u64;
                    decide_batch(&full, &batch, 1111, prefetch, &mut events);
                }
                start.elapsed() / BATCH as u32
            })
        });
    }
}

/// Two threads deciding at once on one engine; time per decision per thread.
fn two_threads(c: &mut Criterion) {
    let engine = filled(Policy::BuiltIn, 1_000_000);
    let mut group = c.benchmark_group("decide/1000000 tracked, 2 threads");
    for (name, port) in [("unknown source", 22u16), ("first knock", 1111)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for thread in 0..2u64 {
                        let engine = &engine;
                        scope.spawn(move || {
                            let mut events = Thread::default();
                            for i in 0..iters {
                                let n = 10_000_000 + thread * (1 << 40) + i;
                                decide(engine, source(n), port, &mut events);
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = single_thread, two_threads
}
criterion_main!(benches);
