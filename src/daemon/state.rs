//! Grants and spent rotating windows saved across restarts: a JSON file
//! written atomically (temporary file, fsync, rename) and read back at start.
//! A grant comes back only under a policy with the same name, knock and
//! ports, with the time it had left; a spent window stays spent, so a
//! restart does not reopen a recorded knock to replay.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::engine::{
    grant_ports, Engine, EventSink, GrantLeft, GrantRecord, Origin, Policies, PolicyKey, PortMask,
    Timestamp,
};
use crate::flow::{FlowPort, PortRange};
use crate::listeners::Nodes;

const FORMAT_VERSION: u32 = 4;
/// Version 2 files (before network grants, port subsets and script
/// stages) and version 3 (before SPA) read the same, without them.
const OLDEST_READABLE_VERSION: u32 = 2;
/// Refused grants described in the log at most; the rest are counted.
const MAX_DESCRIBED_REFUSALS: usize = 20;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// When the file was written, seconds from the Unix epoch.
    saved_at: f64,
    grants: Vec<SavedGrant>,
    spent: Vec<SavedSpent>,
    /// Version 4 on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    spa_replays: Vec<SavedReplay>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedGrant {
    source: IpAddr,
    policy: String,
    /// As `Knock::describe` puts it.
    knock: String,
    open_ports: Vec<PortRange>,
    close_port: Option<FlowPort>,
    /// `None`: open until the close knock.
    seconds_left: Option<f64>,
    /// A network grant's prefix length; `source` is the network's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<u8>,
    /// The open ports the grant opens, when not all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<PortRange>>,
    /// A script policy's stage for the source.
    #[serde(default, skip_serializing_if = "is_zero")]
    stage: u8,
    /// The cluster node the grant was made on, when not this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    /// The SPA user an SPA grant is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

fn is_zero(stage: &u8) -> bool {
    *stage == 0
}

/// A rotating window some source completed.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedSpent {
    policy: String,
    knock: String,
    window: u64,
}

/// An SPA packet accepted, kept until it is too old to pass anyway.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedReplay {
    policy: String,
    knock: String,
    /// The SHA-256 of the datagram, in hex.
    sha256: String,
    /// Unix seconds after which the packet fails the age check.
    until: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: unreadable, ignored: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: format version {found} is not {FORMAT_VERSION}, ignored", path.display())]
    Version { path: PathBuf, found: u32 },
}

pub struct StateStore {
    path: PathBuf,
    /// Saved grants that restore refused, by reason.
    refused: Option<IntCounterVec>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl StateStore {
    pub fn new(dir: &Path) -> Self {
        StateStore {
            path: dir.join("grants.json"),
            refused: None,
        }
    }

    /// Counts the saved grants restore refuses in `counter`, by reason.
    pub fn counting_refusals(self, counter: IntCounterVec) -> Self {
        StateStore {
            refused: Some(counter),
            ..self
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every open grant and spent window; returns how many grants.
    pub fn save(
        &self,
        engine: &Engine,
        nodes: &Nodes,
        now: Timestamp,
    ) -> Result<usize, StateError> {
        let policies = engine.policies();
        let grants: Vec<SavedGrant> = engine
            .grants(now)
            .into_iter()
            .filter_map(|s| {
                let left = s.status.grant?;
                let policy = policies.get(policies.by_name(&s.policy)?)?;
                let ports = s.status.ports;
                Some(SavedGrant {
                    origin: (!s.origin.is_local()).then(|| nodes.name(s.origin).to_string()),
                    source: s.src,
                    prefix: s.prefix,
                    stage: s.stage,
                    ports: (ports != PortMask::ALL)
                        .then(|| ports.ports(&policy.open_ports).collect()),
                    policy: s.policy,
                    knock: policy.knock.identity(),
                    open_ports: policy.open_ports.clone(),
                    close_port: policy.close_port,
                    seconds_left: left.duration().map(|d| d.as_secs_f64()),
                    user: s.user,
                })
            })
            .collect();
        let spent = engine
            .spent_windows()
            .into_iter()
            .filter_map(|(key, window)| {
                let policy = policies.get(key)?;
                Some(SavedSpent {
                    policy: policy.name.clone(),
                    knock: policy.knock.identity(),
                    window,
                })
            })
            .collect();
        let spa_replays = engine
            .spa_replays()
            .into_iter()
            .filter_map(|(key, digest, until)| {
                let policy = policies.get(key)?;
                Some(SavedReplay {
                    policy: policy.name.clone(),
                    knock: policy.knock.identity(),
                    sha256: hex::encode(digest),
                    until,
                })
            })
            .collect();
        let count = grants.len();
        let file = StateFile {
            version: FORMAT_VERSION,
            saved_at: unix_now(),
            grants,
            spent,
            spa_replays,
        };
        let text = serde_json::to_vec_pretty(&file).expect("the state serialises");
        self.write_atomically(&text)
            .map_err(|source| StateError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(count)
    }

    fn write_atomically(&self, bytes: &[u8]) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let temporary = self.path.with_extension("json.tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, &self.path)?;
        fs::File::open(dir)?.sync_all()
    }

    /// Puts back the saved grants that still apply; returns how many. A
    /// missing file restores nothing; an unreadable one is an error the
    /// caller logs and carries on from. A saved grant that asks for more
    /// than its policy in force could give (a hand-edited file, say) is
    /// refused, logged and counted; the others come back.
    pub fn restore(
        &self,
        engine: &Engine,
        nodes: &Nodes,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<usize, StateError> {
        let text = match fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        self.restore_from(&text, engine, nodes, now, events)
    }

    /// Puts back the saved grants of `text`, a state file's contents.
    pub fn restore_from(
        &self,
        text: &[u8],
        engine: &Engine,
        nodes: &Nodes,
        now: Timestamp,
        events: &mut impl EventSink,
    ) -> Result<usize, StateError> {
        let file: StateFile =
            serde_json::from_slice(text).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&file.version) {
            return Err(StateError::Version {
                path: self.path.clone(),
                found: file.version,
            });
        }
        let policies = engine.policies();
        for spent in &file.spent {
            if let Some(key) = same_knock(&policies, &spent.policy, &spent.knock) {
                engine.restore_spent(key, spent.window);
            }
        }
        for replay in &file.spa_replays {
            let mut digest = [0u8; 32];
            let read = hex::decode_to_slice(&replay.sha256, &mut digest).is_ok();
            if let (Some(key), true) = (same_knock(&policies, &replay.policy, &replay.knock), read)
            {
                engine.restore_spa_replay(key, digest, replay.until);
            }
        }
        let mut refusals = Vec::new();
        let mut count = 0;
        for (subject, saved) in still_valid(file, &policies, nodes, unix_now()) {
            let refusal = match saved {
                Ok(saved) => match engine.restore(saved, now, events) {
                    Ok(()) => {
                        count += 1;
                        continue;
                    }
                    Err(e) => (e.reason(), e.to_string()),
                },
                Err(refusal) => refusal,
            };
            refusals.push((subject, refusal));
        }
        self.report_refusals(refusals);
        Ok(count)
    }

    fn report_refusals(&self, refusals: Vec<(String, (&'static str, String))>) {
        let total = refusals.len();
        for (i, (subject, (reason, why))) in refusals.into_iter().enumerate() {
            if let Some(counter) = &self.refused {
                counter.with_label_values(&[reason]).inc();
            }
            if i < MAX_DESCRIBED_REFUSALS {
                warn!(event = %"restore_refused", reason = %reason, "{}: saved grant {subject} not restored: {why}", self.path.display());
            }
        }
        if total > MAX_DESCRIBED_REFUSALS {
            warn!(
                "{}: {} more saved grants not restored",
                self.path.display(),
                total - MAX_DESCRIBED_REFUSALS
            );
        }
    }
}

/// The key of the policy in force named `name`, if its knock is `knock`.
fn same_knock(policies: &Policies, name: &str, knock: &str) -> Option<PolicyKey> {
    let key = policies.by_name(name)?;
    (policies.get(key)?.knock.identity() == knock).then_some(key)
}

/// Why a saved grant was not restored: the `reason` label, and what a
/// person reads in the log.
type Refusal = (&'static str, String);

/// The saved grants whose time has not run out by `unix_now`, each named
/// as `10.0.0.2 under ssh`: the record to restore, or why not, when its
/// policy is not in force unchanged or it cannot be read. A file written in
/// the future was written now.
fn still_valid(
    file: StateFile,
    policies: &Policies,
    nodes: &Nodes,
    unix_now: f64,
) -> Vec<(String, Result<GrantRecord, Refusal>)> {
    let elapsed = (unix_now - file.saved_at).max(0.0);
    file.grants
        .into_iter()
        .filter_map(|grant| {
            let subject = match grant.prefix {
                Some(prefix) => format!("{}/{prefix} under {}", grant.source, grant.policy),
                None => format!("{} under {}", grant.source, grant.policy),
            };
            let left = match grant.seconds_left {
                None => GrantLeft::UntilClosed,
                Some(left) if left - elapsed > 0.0 => {
                    match Duration::try_from_secs_f64(left - elapsed) {
                        Ok(left) => GrantLeft::For(left),
                        Err(_) => {
                            let why = format!("{left:e} seconds left is past any end");
                            return Some((subject, Err(("end", why))));
                        }
                    }
                }
                // Ended while the daemon was down.
                Some(_) => return None,
            };
            Some((subject, restorable(grant, left, policies, nodes)))
        })
        .collect()
}

fn restorable(
    grant: SavedGrant,
    left: GrantLeft,
    policies: &Policies,
    nodes: &Nodes,
) -> Result<GrantRecord, Refusal> {
    let changed = || {
        let why = format!(
            "policy \"{}\" is not in force here with that knock and those ports",
            grant.policy
        );
        ("policy", why)
    };
    let key = same_knock(policies, &grant.policy, &grant.knock).ok_or_else(changed)?;
    let policy = policies.get(key).ok_or_else(changed)?;
    if policy.open_ports != grant.open_ports || policy.close_port != grant.close_port {
        return Err(changed());
    }
    let ports = match &grant.ports {
        None => PortMask::ALL,
        Some(ports) => grant_ports(policy, ports).map_err(|e| (e.reason(), e.to_string()))?,
    };
    let user = match &grant.user {
        None => None,
        Some(name) => Some(policies.user_key(key, name).ok_or_else(|| {
            let why = format!("SPA user \"{name}\" is not in force here");
            ("user_removed", why)
        })?),
    };
    Ok(GrantRecord {
        src: grant.source,
        prefix: grant.prefix,
        policy: key,
        left,
        ports,
        stage: grant.stage,
        origin: grant
            .origin
            .as_deref()
            .map_or(Origin::LOCAL, |name| nodes.origin(name)),
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Event, NewFlow, NoScripts, Verdict};

    fn engine(text: &str) -> Engine {
        Engine::new(&crate::loader::parse(text, Path::new("t.toml")).unwrap())
    }

    const SSH: &str = "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\ngrant_timeout = \"1h\"\n";

    fn knock(engine: &Engine, src: &str) {
        for port in [1111, 2222] {
            let syn = NewFlow {
                src: src.parse().unwrap(),
                dst_port: crate::flow::FlowPort::tcp(port),
            };
            engine.decide(
                syn,
                &[],
                Timestamp::from_millis(0),
                &mut Vec::new(),
                &mut NoScripts,
            );
        }
    }

    fn open(engine: &Engine, src: &str) -> bool {
        let syn = NewFlow {
            src: src.parse().unwrap(),
            dst_port: crate::flow::FlowPort::tcp(22),
        };
        engine
            .decide(
                syn,
                &[],
                Timestamp::from_millis(5),
                &mut Vec::new(),
                &mut NoScripts,
            )
            .verdict()
            == Verdict::Accept
    }

    #[test]
    fn a_grant_of_another_node_comes_back_with_its_origin() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = StateStore::new(dir.path());
        let before = engine(SSH);
        let nodes = Nodes::new("bastion-1");
        let shared = GrantRecord {
            src: "10.0.0.2".parse().unwrap(),
            prefix: None,
            policy: before.policies().key(0),
            left: GrantLeft::For(Duration::from_secs(600)),
            ports: PortMask::ALL,
            stage: 0,
            origin: nodes.origin("bastion-2"),
            user: None,
        };
        before
            .adopt(shared, Timestamp::from_millis(1), &mut Vec::new())
            .unwrap();
        knock(&before, "10.0.0.3");
        store
            .save(&before, &nodes, Timestamp::from_millis(1))
            .unwrap();
        let text = fs::read_to_string(store.path()).unwrap();
        assert_eq!(
            text.matches("\"origin\": \"bastion-2\"").count(),
            1,
            "{text}"
        );

        let after = engine(SSH);
        let restarted = Nodes::new("bastion-1");
        store
            .restore(
                &after,
                &restarted,
                Timestamp::from_millis(0),
                &mut Vec::new(),
            )
            .unwrap();
        let grants = after.grants(Timestamp::from_millis(0));
        let origin = |src: &str| {
            grants
                .iter()
                .find(|g| g.src.to_string() == src)
                .unwrap()
                .origin
        };
        assert_eq!(&*restarted.name(origin("10.0.0.2")), "bastion-2");
        assert_eq!(origin("10.0.0.3"), Origin::LOCAL);
    }

    #[test]
    fn grants_survive_a_save_and_a_restore() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = StateStore::new(dir.path());
        let before = engine(SSH);
        knock(&before, "10.0.0.2");
        knock(&before, "fd00::2");
        assert_eq!(
            store
                .save(&before, &Nodes::new(""), Timestamp::from_millis(1))
                .unwrap(),
            2
        );
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let after = engine(SSH);
        let mut events: Vec<Event> = Vec::new();
        assert_eq!(
            store
                .restore(
                    &after,
                    &Nodes::new(""),
                    Timestamp::from_millis(0),
                    &mut events
                )
                .unwrap(),
            2
        );
        assert!(open(&after, "10.0.0.2") && open(&after, "fd00::2"));
        assert!(!open(&after, "10.0.0.3"));
    }

    #[test]
    fn network_grants_and_script_grants_of_some_ports_survive_a_restart() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(
            dir.path().join("p.lua"),
            "return function(k)\n  if k.port == 1111 then k:grant{ prefix = 24 } end\n  \
             if k.port == 2222 then k:grant{ ports = {8080} } end\n  return 0\nend\n",
        )
        .unwrap();
        let path = dir.path().join("knockq.toml");
        std::fs::write(
            &path,
            "[[policy]]\nname = \"p\"\nopen_ports = [22, 8080]\n[policy.script]\n\
             file = \"p.lua\"\nknock_ports = [1111, 2222]\n",
        )
        .unwrap();
        let config = crate::loader::load(&path).unwrap();
        let syn = |engine: &Engine, src: &str, port| {
            let syn = NewFlow {
                src: src.parse().unwrap(),
                dst_port: crate::flow::FlowPort::tcp(port),
            };
            let mut scripts = crate::script::ScriptVms::new();
            engine
                .decide(
                    syn,
                    &[],
                    Timestamp::from_millis(5),
                    &mut Vec::new(),
                    &mut scripts,
                )
                .verdict()
        };
        let before = Engine::new(&config);
        syn(&before, "10.0.1.5", 1111);
        syn(&before, "10.0.2.5", 2222);
        let store = StateStore::new(dir.path());
        assert_eq!(
            store
                .save(&before, &Nodes::new(""), Timestamp::from_millis(5))
                .unwrap(),
            2
        );
        let after = Engine::new(&config);
        assert_eq!(
            store
                .restore(
                    &after,
                    &Nodes::new(""),
                    Timestamp::from_millis(0),
                    &mut Vec::new()
                )
                .unwrap(),
            2
        );
        assert_eq!(syn(&after, "10.0.1.77", 22), Verdict::Accept, "the /24");
        assert_eq!(syn(&after, "10.0.2.5", 8080), Verdict::Accept);
        assert_eq!(syn(&after, "10.0.2.5", 22), Verdict::Reject, "only 8080");
        // A changed script is another knock: its grants do not come back.
        std::fs::write(dir.path().join("p.lua"), "return function(k) return 0 end").unwrap();
        let changed = Engine::new(&crate::loader::load(&path).unwrap());
        assert_eq!(
            store
                .restore(
                    &changed,
                    &Nodes::new(""),
                    Timestamp::from_millis(0),
                    &mut Vec::new()
                )
                .unwrap(),
            0
        );
    }

    #[test]
    fn a_changed_policy_or_an_expired_grant_is_not_restored() {
        let policies = engine(SSH).policies();
        let grant = |policy: &str, knock: &str, seconds_left| SavedGrant {
            source: "10.0.0.2".parse().unwrap(),
            policy: policy.into(),
            knock: knock.into(),
            open_ports: vec![PortRange::single(FlowPort::tcp(22))],
            close_port: None,
            seconds_left,
            prefix: None,
            ports: None,
            stage: 0,
            origin: None,
            user: None,
        };
        let file = StateFile {
            version: FORMAT_VERSION,
            saved_at: 1000.0,
            grants: vec![
                grant("ssh", "1111 2222", Some(100.0)),
                grant("ssh", "1111 2222", Some(10.0)),
                grant("ssh", "1111 2222", None),
                grant("ssh", "1111 3333", Some(100.0)),
                grant("web", "1111 2222", Some(100.0)),
            ],
            spent: Vec::new(),
            spa_replays: Vec::new(),
        };
        let valid = still_valid(file, &policies, &Nodes::new(""), 1030.0);
        let lefts: Vec<GrantLeft> = valid
            .iter()
            .filter_map(|(_, restore)| restore.as_ref().ok())
            .map(|restore| restore.left)
            .collect();
        assert_eq!(
            lefts,
            [
                GrantLeft::For(Duration::from_secs(70)),
                GrantLeft::UntilClosed
            ]
        );
    }

    #[test]
    fn broken_files_are_errors_not_crashes() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = StateStore::new(dir.path());
        let engine = engine(SSH);
        let mut events: Vec<Event> = Vec::new();
        assert_eq!(
            store
                .restore(
                    &engine,
                    &Nodes::new(""),
                    Timestamp::from_millis(0),
                    &mut events
                )
                .unwrap(),
            0,
            "no file yet"
        );
        for broken in [
            &b"{\"version\":1,\"saved_at\":"[..],
            b"\x00\xff garbage",
            b"{\"version\":7,\"saved_at\":1,\"grants\":[]}",
        ] {
            fs::write(store.path(), broken).unwrap();
            let err = store
                .restore(
                    &engine,
                    &Nodes::new(""),
                    Timestamp::from_millis(0),
                    &mut events,
                )
                .unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&store.path().display().to_string()),
                "{err}"
            );
        }
        assert_eq!(engine.tracked_sources(), 0);
    }
}
