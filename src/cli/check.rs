//! `knockq check`: a readable summary of a valid configuration.

use std::fmt::Write;
use std::path::Path;

use crate::config::{Config, Knock, Offline, Scope};
use crate::firewall::sets::Offload;
use crate::flow::PortRange;

pub fn summary(path: &Path, config: &Config) -> String {
    let mut out = String::new();
    let count = config.policies.len();
    let plural = if count == 1 { "policy" } else { "policies" };
    let _ = writeln!(
        out,
        "{}: valid, {count} {plural}, {}, rejected SYNs get {}, at most {} tracked sources",
        path.display(),
        config.queue,
        config.verdict.reject_with.as_str(),
        config.limits.max_sources,
    );
    if let Some(offload) = Offload::from_config(config) {
        let _ = writeln!(
            out,
            "offload: the kernel queues knock ports {} and sources that knocked within {}, \
             accepts granted pairs, rejects the rest",
            offload.knock_ports_list(),
            humantime::format_duration(offload.knocking_window),
        );
    }
    if let Some(cluster) = &config.cluster {
        let tls = match (&cluster.ca, &cluster.identity) {
            (Some(_), Some(_)) => "TLS with a client certificate",
            (Some(_), None) => "TLS",
            _ => "plain http",
        };
        let _ = writeln!(
            out,
            "cluster: node {} at {} ({tls}), keys under {}",
            cluster.node,
            cluster.endpoints.join(", "),
            cluster.prefix,
        );
    }
    for policy in &config.policies {
        let ports = |ports: &[PortRange]| {
            ports
                .iter()
                .map(PortRange::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = write!(
            out,
            "policy {}: knock {} (at most {} between knocks{}) to open {}",
            policy.name,
            policy.knock.describe(),
            humantime::format_duration(policy.step_timeout),
            if policy.strict && !matches!(policy.knock, Knock::Script(_)) {
                ", other ports reset"
            } else {
                ""
            },
            ports(&policy.open_ports),
        );
        match policy.grant_timeout {
            Some(timeout) => {
                let _ = write!(out, " for {}", humantime::format_duration(timeout));
            }
            None => out.push_str(" until closed"),
        }
        if let Some(close) = policy.close_port {
            let _ = write!(out, "; knock {close} to close");
        }
        if let Knock::Script(script) = &policy.knock {
            let _ = write!(
                out,
                "; script compiled, budget {} a call, {} MiB",
                humantime::format_duration(script.budget),
                script.memory_limit >> 20
            );
        }
        if policy.scope == Scope::Cluster {
            out.push_str("; shared with the cluster");
            if policy.offline == Offline::Local && matches!(policy.knock, Knock::Rotating(_)) {
                out.push_str(", local windows while etcd is away");
            }
        }
        for (hook, argv) in [
            ("on grant", &policy.hooks.on_grant),
            ("on revoke", &policy.hooks.on_revoke),
        ] {
            if let Some(argv) = argv {
                let _ = write!(out, "; {hook} runs {}", argv[0]);
            }
        }
        out.push('\n');
    }
    out
}
