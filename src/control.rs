//! The control protocol: one JSON object per line each way, over the daemon's
//! Unix socket. `answer` is the daemon's side, without the socket; `request`
//! is the client's.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EventSink, GrantLeft, Origin, PolicyKey, RevokeReason, Timestamp};
use crate::listeners::Nodes;

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    Grant {
        source: IpAddr,
        policy: String,
        /// A duration such as "1h"; without it, the policy's grant timeout.
        #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
        duration: Option<String>,
    },
    Revoke {
        source: IpAddr,
        /// Without it, every policy's grant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        sources: Vec<SourceEntry>,
        /// Set while another live instance holds this node's name in the
        /// cluster, so that this one shares nothing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_name_taken: Option<String>,
    },
    Granted {
        source: IpAddr,
        policy: String,
        grant: GrantEntry,
    },
    Revoked {
        source: IpAddr,
        grants: usize,
    },
    Error {
        error: String,
    },
}

/// One source under one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// The source, or the network address of a network grant.
    pub source: IpAddr,
    /// A network grant's prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    pub policy: String,
    pub grant: Option<GrantEntry>,
    pub progress: Option<ProgressEntry>,
    /// The cluster node the grant was made on, when not this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The SPA user of an SPA grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GrantEntry {
    /// `None`: open until the close knock.
    pub seconds_left: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProgressEntry {
    pub stage: u8,
    /// Stages to a grant; 0 for a script policy, whose stages have no fixed end.
    pub of: usize,
    pub seconds_left: f64,
}

impl From<GrantLeft> for GrantEntry {
    fn from(left: GrantLeft) -> Self {
        GrantEntry {
            seconds_left: left.duration().map(|d| d.as_secs_f64()),
        }
    }
}

/// The daemon's answer to one request line. A request that cannot be read
/// or carried out changes nothing.
pub fn answer(
    engine: &Engine,
    nodes: &Nodes,
    line: &str,
    now: Timestamp,
    events: &mut impl EventSink,
) -> Response {
    let request = match serde_json::from_str::<Request>(line) {
        Ok(request) => request,
        Err(e) => {
            return Response::Error {
                error: format!("malformed request: {e}"),
            }
        }
    };
    carry_out(engine, nodes, request, now, events).unwrap_or_else(|error| Response::Error { error })
}

fn carry_out(
    engine: &Engine,
    nodes: &Nodes,
    request: Request,
    now: Timestamp,
    events: &mut impl EventSink,
) -> Result<Response, String> {
    match request {
        Request::Status {} => {
            let sources = engine
                .status(now)
                .into_iter()
                .map(|s| SourceEntry {
                    source: s.src,
                    prefix: s.prefix,
                    policy: s.policy,
                    origin: (s.status.grant.is_some() && !s.origin.is_local())
                        .then(|| nodes.name(s.origin).to_string()),
                    user: s.status.grant.and(s.user),
                    grant: s.status.grant.map(GrantEntry::from),
                    progress: s.status.progress.map(|p| ProgressEntry {
                        stage: p.stage,
                        of: p.of,
                        seconds_left: p.left.as_secs_f64(),
                    }),
                })
                .collect();
            let node_name_taken = nodes
                .contested()
                .then(|| nodes.name(Origin::LOCAL).to_string());
            Ok(Response::Status {
                sources,
                node_name_taken,
            })
        }
        Request::Grant {
            source,
            policy,
            duration,
        } => {
            let key = policy_key(engine, &policy)?;
            let duration = duration
                .map(|text| match humantime::parse_duration(&text) {
                    Ok(d) if !d.is_zero() => Ok(d),
                    Ok(_) => Err(format!("duration \"{text}\" must be longer than zero")),
                    Err(e) => Err(format!("invalid duration \"{text}\": {e}")),
                })
                .transpose()?;
            engine
                .grant(source, key, duration, now, events)
                .map_err(|e| e.to_string())?;
            let grant = engine
                .status(now)
                .into_iter()
                .find(|s| s.src == source && s.policy == policy)
                .and_then(|s| s.status.grant)
                .map(GrantEntry::from)
                .ok_or("the grant ended at once")?;
            Ok(Response::Granted {
                source,
                policy,
                grant,
            })
        }
        Request::Revoke { source, policy } => {
            let key = policy
                .as_deref()
                .map(|name| policy_key(engine, name))
                .transpose()?;
            match engine.revoke(source, key, RevokeReason::Admin, |_| true, events) {
                0 => Err(format!(
                    "{source} holds no grant{}",
                    match &policy {
                        Some(name) => format!(" under policy \"{name}\""),
                        None => String::new(),
                    }
                )),
                grants => Ok(Response::Revoked { source, grants }),
            }
        }
    }
}

fn policy_key(engine: &Engine, name: &str) -> Result<PolicyKey, String> {
    let policies = engine.policies();
    policies.by_name(name).ok_or_else(|| {
        let names: Vec<&str> = policies.list().iter().map(|p| p.name.as_str()).collect();
        format!("unknown policy \"{name}\" (policies: {})", names.join(", "))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control socket {} (is `knockq run` running?)", path.display())]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("unreadable answer from the daemon: {0}")]
    Answer(#[from] serde_json::Error),
}

/// Sends one request to the daemon and waits for its answer.
pub fn request(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Event, NewFlow};
    use std::path::Path;

    fn engine() -> Engine {
        let text = "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\ngrant_timeout = \"2h\"\n";
        Engine::new(&crate::loader::parse(text, Path::new("t.toml")).unwrap())
    }

    fn ask(engine: &Engine, line: &str) -> Response {
        answer(
            engine,
            &Nodes::new("test"),
            line,
            Timestamp::from_millis(0),
            &mut Vec::<Event>::new(),
        )
    }

    fn error(response: Response) -> String {
        match response {
            Response::Error { error } => error,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn grant_status_and_revoke() {
        let engine = engine();
        let granted = ask(
            &engine,
            r#"{"command":"grant","source":"10.0.0.9","policy":"ssh","for":"1h"}"#,
        );
        let source: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            granted,
            Response::Granted {
                source,
                policy: "ssh".into(),
                grant: GrantEntry {
                    seconds_left: Some(3600.0)
                },
            }
        );
        let syn = NewFlow {
            src: source,
            dst_port: crate::flow::FlowPort::tcp(22),
        };
        assert!(
            engine
                .decide(
                    syn,
                    &[],
                    Timestamp::from_millis(1),
                    &mut Vec::new(),
                    &mut crate::engine::NoScripts
                )
                .verdict()
                == crate::engine::Verdict::Accept
        );
        let Response::Status { sources, .. } = ask(&engine, r#"{"command":"status"}"#) else {
            panic!("no status");
        };
        assert_eq!(sources.len(), 1);
        assert_eq!(
            sources[0].grant,
            Some(GrantEntry {
                seconds_left: Some(3600.0)
            })
        );
        assert_eq!(
            ask(&engine, r#"{"command":"revoke","source":"10.0.0.9"}"#),
            Response::Revoked { source, grants: 1 }
        );
        assert_eq!(
            error(ask(&engine, r#"{"command":"revoke","source":"10.0.0.9"}"#)),
            "10.0.0.9 holds no grant"
        );
    }

    #[test]
    fn without_a_duration_the_policy_timeout_applies() {
        let engine = engine();
        let granted = ask(
            &engine,
            r#"{"command":"grant","source":"fd00::9","policy":"ssh"}"#,
        );
        assert!(
            matches!(granted, Response::Granted { grant: GrantEntry { seconds_left: Some(s) }, .. } if s == 7200.0)
        );
    }

    #[test]
    fn bad_requests_change_nothing() {
        let engine = engine();
        let cases = [
            ("garbage", "malformed request: expected value at line 1 column 1"),
            (r#"{"command":"reboot"}"#, "malformed request: unknown variant `reboot`, expected one of `status`, `grant`, `revoke` at line 1 column 19"),
            (r#"{"command":"grant","source":"10.0.0.300","policy":"ssh"}"#, "malformed request: invalid IP address syntax"),
            (r#"{"command":"grant","source":"10.0.0.9","policy":"web"}"#, "unknown policy \"web\" (policies: ssh)"),
            (r#"{"command":"grant","source":"10.0.0.9","policy":"ssh","for":"soon"}"#, "invalid duration \"soon\": expected number at 0"),
            (r#"{"command":"grant","source":"10.0.0.9","policy":"ssh","for":"0s"}"#, "duration \"0s\" must be longer than zero"),
            (r#"{"command":"status","verbose":true}"#, "malformed request: unknown field `verbose`, there are no fields"),
        ];
        for (line, message) in cases {
            assert_eq!(error(ask(&engine, line)), message, "{line}");
        }
        assert_eq!(engine.tracked_sources(), 0);
    }
}
