//! Engine events as log lines: one stable `event=… src=… policy=…` line per
//! state change at info, for people and for fail2ban-style parsers; knock
//! steps at debug.

use tracing::{debug, info};

use crate::engine::{Engine, Event, EventKind};

pub fn log(engine: &Engine, events: impl Iterator<Item = Event>) {
    for Event { src, policy, kind } in events {
        let policy = &engine.policies()[usize::from(policy)];
        let name = &policy.name;
        match kind {
            EventKind::Granted | EventKind::Refreshed => {
                let event = if kind == EventKind::Granted {
                    "grant"
                } else {
                    "refresh"
                };
                let ports = PortList(&policy.open_ports);
                let until = match policy.grant_timeout {
                    Some(timeout) => humantime::format_duration(timeout).to_string(),
                    None => "close".to_owned(),
                };
                info!("event={event} src={src} policy={name} ports={ports} until={until}");
            }
            EventKind::Revoked(reason) => {
                let reason = reason.as_str();
                info!("event=revoke src={src} policy={name} reason={reason}");
            }
            EventKind::Reset => info!("event=reset src={src} policy={name}"),
            EventKind::Expired => info!("event=expire src={src} policy={name}"),
            // A flood of first knocks from spoofed sources evicts at the
            // attacker's rate: keep it out of the info log.
            EventKind::Evicted => debug!("event=evict src={src} policy={name}"),
            EventKind::Advanced { stage } => {
                debug!("event=knock src={src} policy={name} stage={stage}")
            }
            EventKind::Duplicate => debug!("event=duplicate src={src} policy={name}"),
            EventKind::Restarted => debug!("event=restart src={src} policy={name}"),
        }
    }
}

/// `22,8080`
struct PortList<'a>(&'a [u16]);

impl std::fmt::Display for PortList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, port) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}
