//! `knockq simulate`: try configurations offline, against a capture or
//! against generated full-range sweeps.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::loader;
use crate::simulate::{self, capture, report, sweep, Options};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Csv,
}

pub struct Simulation {
    pub configs: Vec<PathBuf>,
    pub pcap: Option<PathBuf>,
    pub sweep: Option<Duration>,
    pub dst: Option<IpAddr>,
    pub format: Format,
    pub timeline: bool,
    pub verdicts: bool,
}

pub fn run(simulation: Simulation) -> anyhow::Result<String> {
    // Every configuration is checked before anything is simulated.
    let configs = simulation
        .configs
        .iter()
        .map(|path| Ok((path.display().to_string(), loader::load(path)?)))
        .collect::<anyhow::Result<Vec<(String, Config)>>>()?;
    let mut out = String::new();
    if let Some(path) = &simulation.pcap {
        out += &replay(path, &configs, &simulation)?;
    }
    if let Some(interval) = simulation.sweep {
        for (name, config) in &configs {
            out += &sweep::text(name, interval, &sweep::sweep(config, interval));
        }
    }
    Ok(out)
}

fn replay(
    path: &Path,
    configs: &[(String, Config)],
    simulation: &Simulation,
) -> anyhow::Result<String> {
    let capture = capture::read(path)?;
    if let Some((offset, why)) = &capture.cut_at {
        eprintln!(
            "knockq: warning: {}: cut off at byte {offset} ({why}); simulated the {} packets before it",
            path.display(),
            capture.packets.len()
        );
    }
    let options = Options {
        dst: simulation.dst,
        timeline: simulation.timeline,
        verdicts: simulation.verdicts,
    };
    let reports: Vec<_> = configs
        .iter()
        .map(|(name, config)| simulate::simulate(config, name, &capture.packets, &options))
        .collect();
    Ok(match simulation.format {
        Format::Json => report::json(&report::Run {
            capture: path.display().to_string(),
            frames_skipped: capture.skipped,
            cut_at: capture.cut_at.as_ref().map(|(offset, _)| *offset),
            reports: &reports,
        }),
        Format::Csv => report::csv(&reports),
        Format::Text => format!(
            "capture {}: {} TCP and UDP packets, {} frames that are neither skipped\n{}",
            path.display(),
            capture.packets.len(),
            capture.skipped,
            report::text(&reports)
        ),
    })
}
