//! `knockq status`, `grant` and `revoke`: clients of the daemon's control
//! socket.

use std::fmt::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use crate::control::{self, GrantEntry, Request, Response, SourceEntry};

/// Sends `request` and returns the answer, or the daemon's refusal as an error.
pub fn ask(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    match control::request(socket, request)? {
        Response::Error { error } => bail!("{error}"),
        response => Ok(response),
    }
}

pub fn status(socket: &Path, json: bool) -> anyhow::Result<String> {
    let response = ask(socket, &Request::Status {})?;
    if json {
        return Ok(serde_json::to_string_pretty(&response)? + "\n");
    }
    let Response::Status {
        sources,
        node_name_taken,
    } = response
    else {
        bail!("unexpected answer to status: {response:?}");
    };
    let warning = node_name_taken.map_or_else(String::new, |name| {
        format!(
            "cluster: another running instance holds node name \"{name}\": this gate shares \
             nothing until it is free; give each node a unique [cluster] node\n"
        )
    });
    Ok(warning + &table(&sources))
}

pub fn grant(
    socket: &Path,
    source: IpAddr,
    policy: String,
    duration: Option<String>,
) -> anyhow::Result<String> {
    match ask(
        socket,
        &Request::Grant {
            source,
            policy,
            duration,
        },
    )? {
        Response::Granted {
            source,
            policy,
            grant,
        } => Ok(format!(
            "granted {source} under {policy} {}\n",
            grant_left(grant)
        )),
        other => bail!("unexpected answer to grant: {other:?}"),
    }
}

pub fn revoke(socket: &Path, source: IpAddr, policy: Option<String>) -> anyhow::Result<String> {
    match ask(socket, &Request::Revoke { source, policy })? {
        Response::Revoked { source, grants } => Ok(format!(
            "revoked {grants} grant{} of {source}\n",
            if grants == 1 { "" } else { "s" }
        )),
        other => bail!("unexpected answer to revoke: {other:?}"),
    }
}

fn table(sources: &[SourceEntry]) -> String {
    if sources.is_empty() {
        return "no tracked sources\n".to_owned();
    }
    let rows: Vec<[String; 4]> = sources
        .iter()
        .map(|s| {
            let grant = s.grant.map_or_else(|| "-".to_owned(), grant_left);
            // A grant made on another node of the cluster says which.
            let grant = match &s.origin {
                Some(node) => format!("{grant} from {node}"),
                None => grant,
            };
            // An SPA grant says whose it is.
            let grant = match &s.user {
                Some(user) => format!("{grant}, user {user}"),
                None => grant,
            };
            let progress = s.progress.map_or_else(
                || "-".to_owned(),
                |p| {
                    let stage = match p.of {
                        0 => format!("stage {}", p.stage),
                        of => format!("{}/{of}", p.stage),
                    };
                    format!("{stage}, next within {}", seconds(p.seconds_left))
                },
            );
            let source = match s.prefix {
                Some(prefix) => format!("{}/{prefix}", s.source),
                None => s.source.to_string(),
            };
            [source, s.policy.clone(), grant, progress]
        })
        .collect();
    let header = ["SOURCE", "POLICY", "GRANT", "KNOCKS"].map(str::to_owned);
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|row| row[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in [&header].into_iter().chain(&rows) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

fn grant_left(grant: GrantEntry) -> String {
    match grant.seconds_left {
        Some(left) => format!("for {}", seconds(left)),
        None => "until the close knock".to_owned(),
    }
}

fn seconds(left: f64) -> String {
    humantime::format_duration(Duration::from_secs(left.ceil() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ProgressEntry;

    #[test]
    fn the_table_lines_up() {
        let sources = [
            SourceEntry {
                prefix: None,
                source: "10.0.0.2".parse().unwrap(),
                policy: "ssh".into(),
                grant: Some(GrantEntry {
                    seconds_left: Some(3599.2),
                }),
                progress: None,
                origin: None,
                user: Some("alice".into()),
            },
            SourceEntry {
                prefix: None,
                source: "fd00::33".parse().unwrap(),
                policy: "admin-web".into(),
                grant: Some(GrantEntry { seconds_left: None }),
                progress: Some(ProgressEntry {
                    stage: 1,
                    of: 3,
                    seconds_left: 4.5,
                }),
                origin: None,
                user: None,
            },
        ];
        assert_eq!(
            table(&sources),
            "SOURCE    POLICY     GRANT                  KNOCKS\n\
             10.0.0.2  ssh        for 1h, user alice     -\n\
             fd00::33  admin-web  until the close knock  1/3, next within 5s\n"
        );
        assert_eq!(table(&[]), "no tracked sources\n");
    }
}
