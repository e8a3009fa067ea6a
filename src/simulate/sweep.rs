//! Would a full-range port scan walk through a sequence? Generates the scans
//! a scanner would send from one address and runs them through the engine.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::capture::Packet;
use super::{simulate, Options};
use crate::config::Config;
use crate::flow::FlowPort;
use crate::packet::FlowFacts;

/// A documentation address (RFC 5737): nothing real.
const SCANNER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const TARGET: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
    /// Shuffled with a fixed seed, so runs repeat.
    Random,
}

impl Order {
    pub const ALL: [Order; 3] = [Order::Ascending, Order::Descending, Order::Random];

    pub fn as_str(self) -> &'static str {
        match self {
            Order::Ascending => "ascending",
            Order::Descending => "descending",
            Order::Random => "random",
        }
    }

    fn ports(self) -> Vec<u16> {
        let mut ports: Vec<u16> = (1..=u16::MAX).collect();
        match self {
            Order::Ascending => {}
            Order::Descending => ports.reverse(),
            Order::Random => fastrand::Rng::with_seed(0x6b71).shuffle(&mut ports),
        }
        ports
    }
}

/// What one sweep did to one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepResult {
    pub order: Order,
    pub policy: String,
    /// The probe (counted from 1) that completed the sequence, if any did.
    pub granted_at_probe: Option<u64>,
}

/// Sweeps all 65535 ports in each order, one probe every `interval`.
pub fn sweep(config: &Config, interval: Duration) -> Vec<SweepResult> {
    let start = Duration::from_secs(1_000_000);
    let mut results = Vec::new();
    for order in Order::ALL {
        let packets: Vec<Packet> = order
            .ports()
            .into_iter()
            .enumerate()
            .map(|(i, dst_port)| Packet {
                time: start + interval * u32::try_from(i).expect("65535 probes"),
                flow: FlowFacts {
                    src: SCANNER,
                    dst: TARGET,
                    src_port: 40000,
                    dst_port: FlowPort::tcp(dst_port),
                    syn: true,
                    ack: false,
                },
                payload: Vec::new(),
            })
            .collect();
        let report = simulate(config, order.as_str(), &packets, &Options::default());
        for policy in report.policies {
            let granted_at_probe = policy.granted.first().map(|g| {
                let elapsed = g.at - start.as_secs_f64();
                (elapsed / interval.as_secs_f64()).round() as u64 + 1
            });
            results.push(SweepResult {
                order,
                policy: policy.name,
                granted_at_probe,
            });
        }
    }
    results
}

pub fn text(config: &str, interval: Duration, results: &[SweepResult]) -> String {
    let mut out = format!(
        "{config}: full-range sweeps from one address, one port every {}\n",
        humantime::format_duration(interval)
    );
    for result in results {
        let outcome = match result.granted_at_probe {
            Some(probe) => format!("WALKS THROUGH: granted at probe {probe}"),
            None => "no grant".to_owned(),
        };
        out += &format!(
            "  policy {}, {} order: {outcome}\n",
            result.policy,
            result.order.as_str()
        );
    }
    out
}
