//! Simulation reports as text, JSON or CSV; several configurations side by
//! side.

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::Report;

/// Everything one run produced, for JSON.
#[derive(Serialize)]
pub struct Run<'a> {
    pub capture: String,
    /// Frames neither TCP nor UDP over IP.
    pub frames_skipped: u64,
    /// Byte offset where the capture was cut off, if it was.
    pub cut_at: Option<usize>,
    pub reports: &'a [Report],
}

pub fn json(run: &Run) -> String {
    serde_json::to_string_pretty(run).expect("reports serialise") + "\n"
}

/// Capture time as RFC 3339 UTC with milliseconds.
fn time(at: f64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs_f64(at)).to_string()
}

pub fn text(reports: &[Report]) -> String {
    let mut out = String::new();
    for report in reports {
        let _ = writeln!(out, "{}: {} new flows", report.config, report.new_flows);
        let verdicts: Vec<String> = report
            .verdicts
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  verdicts: {}",
            if verdicts.is_empty() {
                "none".into()
            } else {
                verdicts.join(", ")
            }
        );
        for policy in &report.policies {
            let _ = writeln!(out, "  policy {}", policy.name);
            for g in &policy.granted {
                let _ = writeln!(
                    out,
                    "    granted     {} at {} after {} knocks",
                    g.source,
                    time(g.at),
                    g.knocks
                );
            }
            for i in &policy.incomplete {
                let _ = writeln!(out, "    incomplete  {}: {}", i.source, i.why.describe());
            }
            if policy.granted.is_empty() && policy.incomplete.is_empty() {
                let _ = writeln!(out, "    no source made progress");
            }
            let _ = writeln!(
                out,
                "    open ports: {} SYNs accepted, {} refused",
                policy.open_port_accepted, policy.open_port_refused
            );
        }
        if !report.timeline.is_empty() {
            let _ = writeln!(out, "  timeline");
            for c in &report.timeline {
                let _ = writeln!(
                    out,
                    "    {}  {}  {}  {}",
                    time(c.at),
                    c.source,
                    c.policy,
                    c.change
                );
            }
        }
        if !report.packets.is_empty() {
            let _ = writeln!(out, "  verdicts per SYN");
            for p in &report.packets {
                let _ = writeln!(
                    out,
                    "    {}  {} -> {}  {}/{}",
                    time(p.at),
                    p.source,
                    p.dst_port,
                    p.verdict,
                    p.reason
                );
            }
        }
    }
    if reports.len() > 1 {
        out.push('\n');
        out.push_str(&comparison(reports, "  "));
    }
    out
}

pub fn csv(reports: &[Report]) -> String {
    let quote = |field: &str| {
        if field.contains([',', '"', '\n']) {
            format!("\"{}\"", field.replace('"', "\"\""))
        } else {
            field.to_owned()
        }
    };
    let mut out = String::from("measure");
    for report in reports {
        let _ = write!(out, ",{}", quote(&report.config));
    }
    out.push('\n');
    for (measure, values) in rows(reports) {
        let _ = write!(out, "{}", quote(&measure));
        for value in values {
            let _ = write!(out, ",{}", value.map_or(String::new(), |v| v.to_string()));
        }
        out.push('\n');
    }
    out
}

/// The side-by-side table: one row per measure, one column per config.
fn comparison(reports: &[Report], gap: &str) -> String {
    let rows = rows(reports);
    let headers: Vec<&str> = reports.iter().map(|r| r.config.as_str()).collect();
    let first = rows
        .iter()
        .map(|(m, _)| m.len())
        .chain(["measure".len()])
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = headers.iter().map(|h| h.len().max(5)).collect();
    let mut out = format!("{:first$}", "measure");
    for (h, w) in headers.iter().zip(&widths) {
        let _ = write!(out, "{gap}{h:>w$}");
    }
    out.push('\n');
    for (measure, values) in rows {
        let _ = write!(out, "{measure:first$}");
        for (v, w) in values.iter().zip(&widths) {
            let cell = v.map_or("-".to_owned(), |v| v.to_string());
            let _ = write!(out, "{gap}{cell:>w$}");
        }
        out.push('\n');
    }
    out
}

/// Measures of every report, in a stable order; `None` where a config has no
/// policy of that name.
fn rows(reports: &[Report]) -> Vec<(String, Vec<Option<u64>>)> {
    let mut measures: Vec<String> = Vec::new();
    let per_report: Vec<Vec<(String, u64)>> = reports.iter().map(measures_of).collect();
    for list in &per_report {
        for (m, _) in list {
            if !measures.contains(m) {
                measures.push(m.clone());
            }
        }
    }
    measures
        .into_iter()
        .map(|m| {
            let values = per_report
                .iter()
                .map(|list| list.iter().find(|(name, _)| *name == m).map(|(_, v)| *v))
                .collect();
            (m, values)
        })
        .collect()
}

fn measures_of(report: &Report) -> Vec<(String, u64)> {
    let mut out = vec![("new flows".to_owned(), report.new_flows)];
    out.extend(report.verdicts.iter().map(|(k, &v)| (k.clone(), v)));
    for p in &report.policies {
        let count =
            |f: fn(super::Why) -> bool| p.incomplete.iter().filter(|i| f(i.why)).count() as u64;
        let name = &p.name;
        out.push((format!("{name}: sources granted"), p.granted.len() as u64));
        out.push((
            format!("{name}: sources incomplete"),
            p.incomplete.len() as u64,
        ));
        out.push((
            format!("{name}: incomplete (timeout)"),
            count(|w| w == super::Why::Timeout),
        ));
        out.push((
            format!("{name}: incomplete (reset by another port)"),
            count(|w| matches!(w, super::Why::ResetByOtherPort { .. })),
        ));
        out.push((
            format!("{name}: incomplete (wrong order)"),
            count(|w| matches!(w, super::Why::WrongOrder { .. })),
        ));
        out.push((
            format!("{name}: open-port SYNs accepted"),
            p.open_port_accepted,
        ));
        out.push((
            format!("{name}: open-port SYNs refused"),
            p.open_port_refused,
        ));
    }
    out
}
