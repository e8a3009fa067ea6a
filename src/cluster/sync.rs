//! The cluster's thread. A session connects, publishes what waited while
//! etcd was away, reads the grants at one revision and applies them, then
//! watches from the next revision, so no change falls in between. Any
//! error ends the session; the next starts over the same way, which also
//! covers a compacted revision. Between sessions the gate decides alone:
//! grant changes wait in a bounded backlog, and cluster rotating knocks
//! fail closed unless their policy says `offline = "local"`.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::record::{take, Keys, NodeName, Refusal, Shared, Subject, Taken};
use super::{Change, ClusterMetrics, Report};
use crate::config::{ClusterConfig, Knock, Offline, Scope};
use crate::engine::{
    Engine, Event, EventKind, GrantRecord, GrantScope, Origin, PolicyKey, PortMask, RevokeReason,
    GRANT_UNTIL_CLOSED,
};
use crate::listeners::{Clock, Nodes, TokenBucket};

/// Wait between sessions.
const RETRY: Duration = Duration::from_secs(1);
/// Longest an etcd request may take before the session is given up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A revocation from another node ends a grant here that ends within this
/// many milliseconds of the one it names: the same grant, its end carried
/// over in whole milliseconds; a grant made since ends later.
const SAME_GRANT_WITHIN: u64 = 1000;
/// How often an idle connection is checked: a member that vanished
/// without closing it is noticed within this and the request timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(6);
/// How long a tombstone stays, in seconds: as long as the grant had left,
/// within these bounds, so a node away for that long still learns of it.
const TOMBSTONE_TTL: std::ops::RangeInclusive<i64> = 60..=86_400;
/// How long this node's name outlives it in etcd, in seconds: while it
/// runs, it renews the lease every [`NAME_RENEWAL`]; once it stops, the
/// name is free for another instance this long after.
const NAME_TTL: i64 = 6;
const NAME_RENEWAL: Duration = Duration::from_secs(2);
/// How often an instance whose name another holds tries it again.
const NAME_RETRY: Duration = Duration::from_secs(1);
/// Most of a refused record's key a log line shows.
const MAX_LOGGED_KEY: usize = 200;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("the watch ended: {0}")]
    WatchEnded(String),
    #[error("the lease of this node's name ended")]
    NameLost,
}

pub(super) struct Sync {
    config: ClusterConfig,
    engine: Arc<Engine>,
    clock: Clock,
    nodes: Arc<Nodes>,
    metrics: Arc<ClusterMetrics>,
    report: Report,
    keys: Keys,
    /// Grant changes made while etcd was away, oldest first.
    backlog: VecDeque<Change>,
    events: Vec<Event>,
    /// Log lines of refused records.
    refusal_log: TokenBucket,
    /// This running instance, told apart from another under the same name.
    instance: String,
    /// The endpoint the next session talks to. One at a time: the
    /// client's balancing over several fails requests while one is down,
    /// so a session that fails moves on to the next member.
    endpoint: usize,
}

impl Sync {
    pub(super) fn new(
        config: ClusterConfig,
        engine: Arc<Engine>,
        clock: Clock,
        nodes: Arc<Nodes>,
        metrics: Arc<ClusterMetrics>,
        report: Report,
    ) -> Sync {
        Sync {
            keys: Keys::new(&config.prefix),
            config,
            engine,
            clock,
            nodes,
            metrics,
            report,
            backlog: VecDeque::new(),
            events: Vec::new(),
            refusal_log: TokenBucket::new(20.0, 1.0, Instant::now()),
            instance: instance_id(),
            endpoint: 0,
        }
    }

    /// Runs sessions until the workers' side of the queue is gone.
    pub(super) fn run(mut self, mut changes: mpsc::Receiver<Change>) {
        for endpoint in &self.config.endpoints {
            if endpoint.starts_with("http://") && !on_loopback(endpoint) {
                warn!("cluster endpoint {endpoint} is plain http off this host: anyone on the path can read and forge grants; use https:// with client certificates");
            }
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => return error!("the cluster cannot run, this node decides alone: {e}"),
        };
        runtime.block_on(async {
            // Sessions failed in a row: after a round of every endpoint,
            // the next round waits a little.
            let mut failures = 0usize;
            loop {
                let endpoint = self.config.endpoints[self.endpoint].clone();
                match self.session(&endpoint, &mut changes).await {
                    Ok(()) => return,
                    Err(e) => {
                        if self.metrics.connected.get() == 1 {
                            failures = 0;
                        }
                        self.metrics.connected.set(0);
                        // The first failure of an outage, and then now and then.
                        if (failures + 1).is_power_of_two() {
                            warn!(
                                backlog = self.backlog.len(),
                                "cluster: etcd unreachable at {endpoint} ({e}); deciding locally, grant changes queued"
                            );
                        }
                        failures += 1;
                        self.endpoint = (self.endpoint + 1) % self.config.endpoints.len();
                    }
                }
                if failures % self.config.endpoints.len() == 0 {
                    let wait = tokio::time::sleep(RETRY);
                    let Some(()) = self.offline_until(wait, &mut changes).await else {
                        return;
                    };
                }
            }
        });
    }

    /// One session; `Ok` once the queue has closed.
    async fn session(
        &mut self,
        endpoint: &str,
        changes: &mut mpsc::Receiver<Change>,
    ) -> Result<(), SessionError> {
        let connect = Client::connect([endpoint], Some(self.options()));
        let Some(client) = self.offline_until(connect, changes).await else {
            return Ok(());
        };
        let mut client = client?;
        let Some((mut keeper, mut renewals)) = self.hold_name(&mut client, changes).await? else {
            return Ok(());
        };
        let mut renew = tokio::time::interval(NAME_RENEWAL);
        while let Some(change) = self.backlog.pop_front() {
            if let Err(e) = self.publish(&mut client, &change).await {
                self.backlog.push_front(change);
                return Err(e.into());
            }
            self.metrics.backlog.set(self.backlog.len() as i64);
        }
        let snapshot = client
            .get(self.keys.grants(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = snapshot.header().map_or(0, |h| h.revision());
        let learned = self.resync(snapshot.kvs());
        let mut watch = client
            .watch(
                self.keys.grants(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        self.metrics.connected.set(1);
        info!("cluster: in sync with etcd at {endpoint}, revision {revision}, {learned} grants of other nodes held");
        loop {
            tokio::select! {
                _ = renew.tick() => keeper.keep_alive().await?,
                renewal = renewals.message() => {
                    if renewal?.is_none_or(|renewal| renewal.ttl() <= 0) {
                        return Err(SessionError::NameLost);
                    }
                }
                change = changes.recv() => {
                    let Some(change) = change else { return Ok(()) };
                    self.handle(&mut client, change).await?;
                }
                message = watch.message() => {
                    let Some(response) = message? else {
                        return Err(SessionError::WatchEnded("closed by etcd".into()));
                    };
                    if response.canceled() || response.compact_revision() > 0 {
                        let why = response.cancel_reason().to_owned();
                        return Err(SessionError::WatchEnded(why));
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        match event.event_type() {
                            EventType::Put => {
                                self.apply(kv, true);
                            }
                            // A lease ran out, or someone removed the key.
                            EventType::Delete => self.revoke_key(kv),
                        }
                    }
                    (self.report)(&self.engine, &mut self.events);
                }
            }
        }
    }

    /// Holds this node's name under a lease of its own. While another
    /// running instance holds it, says so (log, metric, status) and tries
    /// again every [`NAME_RETRY`], taking changes as if etcd were away:
    /// two instances under one name would each take the other's records
    /// for their own. `None` once the queue has closed.
    async fn hold_name(
        &mut self,
        client: &mut Client,
        changes: &mut mpsc::Receiver<Change>,
    ) -> Result<Option<(LeaseKeeper, LeaseKeepAliveStream)>, SessionError> {
        let key = self.keys.node(&self.config.node);
        let mine = NodeName {
            instance: self.instance.clone(),
        };
        let value = serde_json::to_vec(&mine).expect("a record serialises");
        let mut told = false;
        loop {
            let lease = client.lease_grant(NAME_TTL, None).await?.id();
            let put = TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            );
            let free = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
            let ours = Compare::value(key.clone(), CompareOp::Equal, value.clone());
            // Free, or held by this instance from a session before.
            let mut held = false;
            for compare in [free, ours] {
                let txn = Txn::new().when([compare]).and_then([put.clone()]);
                if client.txn(txn).await?.succeeded() {
                    held = true;
                    break;
                }
            }
            if held {
                if told {
                    info!(
                        "cluster: node name {} is free again: sharing",
                        self.config.node
                    );
                }
                self.nodes.set_contested(false);
                self.metrics.name_taken.set(0);
                return Ok(Some(client.lease_keep_alive(lease).await?));
            }
            client.lease_revoke(lease).await?;
            if !told {
                let holder = client.get(key.clone(), None).await?;
                let other = holder
                    .kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<NodeName>(kv.value()).ok())
                    .map_or_else(|| "unknown".to_owned(), |name| name.instance);
                error!(
                    event = %"node_name_taken",
                    node = %self.config.node,
                    "cluster: another running instance ({other}) holds node name {}: this gate decides its own knocks \
                     but shares nothing until the name is free ({NAME_TTL}s after that instance stops); give each \
                     node a unique [cluster] node",
                    self.config.node
                );
                told = true;
            }
            self.nodes.set_contested(true);
            self.metrics.name_taken.set(1);
            if self
                .offline_until(tokio::time::sleep(NAME_RETRY), changes)
                .await
                .is_none()
            {
                return Ok(None);
            }
        }
    }

    fn options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // etcd refuses pings more often than every 5 s by default.
            .with_keep_alive(KEEP_ALIVE, REQUEST_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // A member cut off from the others ends the watch instead of
            // keeping it open with nothing coming: the session moves on.
            .with_require_leader(true);
        if let Some(ca) = &self.config.ca {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.config.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        options
    }

    /// Awaits `work` while taking changes as if etcd were away; `None`
    /// once the queue has closed.
    async fn offline_until<T>(
        &mut self,
        work: impl Future<Output = T>,
        changes: &mut mpsc::Receiver<Change>,
    ) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                change = changes.recv() => self.offline(change?),
            }
        }
    }

    /// A change while etcd is away: grant changes wait, claims cannot be made.
    fn offline(&mut self, change: Change) {
        match change {
            Change::SpaClaim { policy, event, .. } => {
                self.count("claim_refused", None);
                let src = event.src;
                warn!(event = %"claim_refused", %src, %policy, "SPA packet refused: etcd cannot be reached to claim it");
                self.spa_claimed(&event, None);
            }
            Change::Claim { policy, src, .. } => {
                let local = self
                    .policy(&policy)
                    .is_some_and(|(_, offline)| offline == Offline::Local);
                match local {
                    true => {
                        self.count("claim_offline", None);
                        self.grant_claimed(&policy, src);
                    }
                    false => {
                        self.count("claim_refused", None);
                        warn!(event = %"claim_refused", %src, %policy, "rotating knock refused: etcd cannot be reached to claim its window");
                    }
                }
            }
            change => {
                if self.backlog.len() >= self.config.backlog {
                    self.backlog.pop_front();
                    self.metrics.publish_failures.inc();
                }
                self.backlog.push_back(change);
                self.metrics.backlog.set(self.backlog.len() as i64);
            }
        }
    }

    async fn handle(&mut self, client: &mut Client, change: Change) -> Result<(), SessionError> {
        let result = match &change {
            Change::Claim {
                policy,
                src,
                window,
            } => self.claim(client, policy, *src, *window).await,
            Change::SpaClaim {
                policy,
                digest,
                event,
            } => self.claim_spa(client, policy, *digest, event).await,
            change => self.publish(client, change).await,
        };
        if result.is_err() {
            self.offline(change);
        }
        Ok(result?)
    }

    /// Writes a grant, or its tombstone.
    async fn publish(
        &self,
        client: &mut Client,
        change: &Change,
    ) -> Result<(), etcd_client::Error> {
        let now = unix_millis();
        let node = self.config.node.clone();
        let (key, value, ttl, kind) = match change {
            Change::Grant {
                policy,
                subject,
                ports,
                until,
                user,
            } => {
                let ttl = match until {
                    // Ended while it waited.
                    Some(until) if *until <= now => return Ok(()),
                    Some(until) => Some(seconds(until - now)),
                    None => None,
                };
                let policies = self.engine.policies();
                let user = user.and_then(|user| {
                    let name = policies.user_name(policies.by_name(policy)?, user)?;
                    Some(name.to_owned())
                });
                let value = Shared::Granted {
                    node,
                    ports: ports.clone(),
                    until: *until,
                    at: now,
                    user,
                };
                (self.keys.grant(policy, *subject), value, ttl, "grant")
            }
            Change::Revoke {
                policy,
                subject,
                reason,
                until,
            } => {
                let left = until.map_or(*TOMBSTONE_TTL.end(), |until| {
                    seconds(until.saturating_sub(now))
                });
                let value = Shared::Revoked {
                    node,
                    reason: reason.as_str().to_owned(),
                    until: *until,
                    at: now,
                };
                let ttl = left.clamp(*TOMBSTONE_TTL.start(), *TOMBSTONE_TTL.end());
                (
                    self.keys.grant(policy, *subject),
                    value,
                    Some(ttl),
                    "revoke",
                )
            }
            Change::Claim { .. } | Change::SpaClaim { .. } => {
                unreachable!("claims are not published")
            }
        };
        let options = match ttl {
            Some(ttl) => {
                Some(PutOptions::new().with_lease(client.lease_grant(ttl, None).await?.id()))
            }
            None => None,
        };
        let value = serde_json::to_vec(&value).expect("a record serialises");
        client.put(key, value, options).await?;
        self.count(kind, None);
        Ok(())
    }

    /// Claims `window` of a cluster rotating policy for `src`'s knock:
    /// the first node to claim it grants, every other refuses a replay.
    async fn claim(
        &mut self,
        client: &mut Client,
        policy: &str,
        src: std::net::IpAddr,
        window: u64,
    ) -> Result<(), etcd_client::Error> {
        let Some((period, _)) = self.policy(policy) else {
            return Ok(());
        };
        // A window is accepted while it or the next is current.
        let ttl = seconds(3 * period.as_millis() as u64);
        let key = self.keys.window(policy, window);
        if self.create_if_absent(client, key, ttl).await? {
            self.count("claim", None);
            self.grant_claimed(policy, src);
        } else {
            self.count("replay", None);
            self.replayed(policy, src);
        }
        Ok(())
    }

    /// Writes this node's name at `key` for `ttl` seconds unless the key
    /// exists: whether it did not, and this node claimed it.
    async fn create_if_absent(
        &self,
        client: &mut Client,
        key: String,
        ttl: i64,
    ) -> Result<bool, etcd_client::Error> {
        let lease = client.lease_grant(ttl, None).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.config.node.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        Ok(client.txn(txn).await?.succeeded())
    }

    /// Claims a cluster SPA policy's packet by its digest: the first node
    /// to claim it grants, every other refuses a replay.
    async fn claim_spa(
        &mut self,
        client: &mut Client,
        policy: &str,
        digest: u128,
        event: &Event,
    ) -> Result<(), etcd_client::Error> {
        let policies = self.engine.policies();
        let max_age = match policies.get(event.policy).map(|p| &p.knock) {
            Some(Knock::Spa(spa)) => spa.max_age,
            _ => return Ok(()),
        };
        // A packet passes the age check for max_age either side of now.
        let ttl = seconds(2 * max_age.as_millis() as u64 + 1000);
        let key = self.keys.spa_packet(policy, digest);
        let claimed = self.create_if_absent(client, key, ttl).await?;
        self.count(if claimed { "claim" } else { "replay" }, None);
        self.spa_claimed(event, Some(claimed));
        Ok(())
    }

    fn spa_claimed(&mut self, event: &Event, claimed: Option<bool>) {
        self.engine
            .spa_claimed(event, claimed, self.clock.now(), &mut self.events);
        (self.report)(&self.engine, &mut self.events);
    }

    /// A cluster rotating policy's period and offline setting.
    fn policy(&self, name: &str) -> Option<(Duration, Offline)> {
        let policies = self.engine.policies();
        let policy = policies.get(policies.by_name(name)?)?;
        match &policy.knock {
            Knock::Rotating(rotating) => Some((rotating.period, policy.offline)),
            _ => None,
        }
    }

    fn grant_claimed(&mut self, policy: &str, src: std::net::IpAddr) {
        let Some(key) = self.engine.policies().by_name(policy) else {
            return;
        };
        if let Err(e) = self
            .engine
            .grant(src, key, None, self.clock.now(), &mut self.events)
        {
            warn!(%src, %policy, "claimed window not granted: {e}");
        }
        (self.report)(&self.engine, &mut self.events);
    }

    fn replayed(&mut self, policy: &str, src: std::net::IpAddr) {
        let Some(key) = self.engine.policies().by_name(policy) else {
            return;
        };
        self.events.push(Event {
            src,
            policy: key,
            kind: EventKind::Replayed,
            grant: GrantScope {
                prefix: None,
                ports: PortMask::ALL,
                until: GRANT_UNTIL_CLOSED,
                origin: Origin::LOCAL,
                user: None,
            },
        });
        (self.report)(&self.engine, &mut self.events);
    }

    /// Applies the grants read at one revision, and revokes the grants of
    /// other nodes it no longer holds; returns how many of theirs are held.
    fn resync(&mut self, kvs: &[KeyValue]) -> usize {
        let mut held = HashSet::new();
        for kv in kvs {
            if let Some(granted) = self.apply(kv, false) {
                held.insert(granted);
            }
        }
        let policies = self.engine.policies();
        let now = self.clock.now();
        for grant in self.engine.grants(now) {
            let Some(key) = policies.by_name(&grant.policy) else {
                continue;
            };
            let subject = Subject {
                src: grant.src,
                prefix: grant.prefix,
            };
            let cluster = policies.get(key).is_some_and(|p| p.scope == Scope::Cluster);
            if cluster && !grant.origin.is_local() && !held.contains(&(key, subject)) {
                self.revoke(key, subject, |scope| !scope.origin.is_local());
            }
        }
        (self.report)(&self.engine, &mut self.events);
        held.len()
    }

    /// Applies one grant key's value written by another node; returns the
    /// grant it holds, if it holds one. `live`: it was just written, so its
    /// propagation is measured. A record that asks for more than the policy
    /// here could give is refused, counted and logged.
    fn apply(&mut self, kv: &KeyValue, live: bool) -> Option<(PolicyKey, Subject)> {
        match self.read_record(kv, live) {
            Ok(held) => held,
            Err(refusal) => {
                self.refuse(kv.key(), refusal);
                None
            }
        }
    }

    fn read_record(
        &mut self,
        kv: &KeyValue,
        live: bool,
    ) -> Result<Option<(PolicyKey, Subject)>, Refusal> {
        let policies = self.engine.policies();
        let now = unix_millis();
        let taken = take(
            &self.keys,
            &self.config.node,
            &policies,
            kv.key(),
            kv.value(),
            now,
        )?;
        Ok(match taken {
            Taken::Nothing => None,
            Taken::Grant { record, node, at } => {
                if live {
                    self.metrics
                        .propagation
                        .observe(now.saturating_sub(at) as f64 / 1000.0);
                }
                let record = GrantRecord {
                    origin: self.nodes.origin(&node),
                    ..record
                };
                self.engine
                    .adopt(record, self.clock.now(), &mut self.events)
                    .map_err(Refusal::grant)?;
                if live {
                    self.count("grant", Some(&node));
                }
                let subject = Subject {
                    src: record.src,
                    prefix: record.prefix,
                };
                Some((record.policy, subject))
            }
            Taken::Revoke {
                policy,
                subject,
                node,
                until,
            } => {
                // The grant it ended, not one made since.
                let wall = self.engine.wall_clock();
                self.revoke(policy, subject, |scope| {
                    let end =
                        (scope.until != GRANT_UNTIL_CLOSED).then(|| wall.unix_millis(scope.until));
                    same_grant(end, until)
                });
                if live {
                    self.count("revoke", Some(&node));
                }
                None
            }
        })
    }

    /// Counts a refused record and logs it, within the log's rate limit:
    /// any writer under the prefix can make records at any rate.
    fn refuse(&mut self, key: &[u8], refusal: Refusal) {
        let Refusal { reason, why } = refusal;
        self.metrics
            .records_refused
            .with_label_values(&[reason])
            .inc();
        if self.refusal_log.take(Instant::now()) {
            let key = String::from_utf8_lossy(key);
            let key: String = key.chars().take(MAX_LOGGED_KEY).collect();
            warn!(event = %"record_refused", %key, reason = %reason, "cluster: record not applied: {why}");
        }
    }

    fn revoke_key(&mut self, kv: &KeyValue) {
        let Some((name, subject)) = self.keys.parse_grant(kv.key()) else {
            return;
        };
        if let Some(key) = self.engine.policies().by_name(name) {
            self.revoke(key, subject, |_| true);
        }
    }

    /// Revokes `subject`'s grant under `key` if `which` picks it.
    fn revoke(&mut self, key: PolicyKey, subject: Subject, which: impl Fn(&GrantScope) -> bool) {
        let which = |scope: &GrantScope| scope.prefix == subject.prefix && which(scope);
        self.engine.revoke(
            subject.src,
            Some(key),
            RevokeReason::Cluster,
            which,
            &mut self.events,
        );
    }

    /// Counts a change by kind, made on `node` (this one without).
    fn count(&self, kind: &str, node: Option<&str>) {
        let origin = node.unwrap_or(&self.config.node);
        self.metrics.events.with_label_values(&[kind, origin]).inc();
    }
}

/// Whether a grant here that ends at `end` (Unix milliseconds; `None`: at
/// the close knock) is the one a revocation naming `revoked` ended.
fn same_grant(end: Option<u64>, revoked: Option<u64>) -> bool {
    match (end, revoked) {
        (None, None) => true,
        (Some(end), Some(revoked)) => end.abs_diff(revoked) <= SAME_GRANT_WITHIN,
        _ => false,
    }
}

/// A random id for this running instance: 16 hex digits.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    // Without randomness, the time and the process tell instances apart.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (unix_millis() ^ u64::from(std::process::id()) << 40).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whole seconds covering `millis`, at least one: a lease's TTL.
fn seconds(millis: u64) -> i64 {
    i64::try_from(millis.div_ceil(1000).max(1)).unwrap_or(i64::MAX)
}

/// Whether an endpoint's host is this machine's loopback.
fn on_loopback(endpoint: &str) -> bool {
    let host = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_endpoints_are_told_apart() {
        for endpoint in [
            "http://127.0.0.1:2379",
            "http://[::1]:2379",
            "http://localhost:2379",
        ] {
            assert!(on_loopback(endpoint), "{endpoint}");
        }
        for endpoint in [
            "http://10.0.0.5:2379",
            "http://[fd00::5]:2379",
            "http://etcd-1:2379",
        ] {
            assert!(!on_loopback(endpoint), "{endpoint}");
        }
    }

    #[test]
    fn a_revocation_ends_the_grant_it_names_and_spares_a_newer_one() {
        let hour = 3_600_000;
        assert!(
            same_grant(Some(10 * hour), Some(10 * hour + 3)),
            "carried over in whole ms"
        );
        assert!(same_grant(None, None));
        assert!(
            !same_grant(Some(11 * hour), Some(10 * hour)),
            "knocked again since"
        );
        assert!(!same_grant(Some(10 * hour), None));
        assert!(!same_grant(None, Some(10 * hour)));
    }

    #[test]
    fn leases_last_whole_seconds_covering_the_time() {
        assert_eq!(seconds(1), 1);
        assert_eq!(seconds(1000), 1);
        assert_eq!(seconds(1001), 2);
        assert_eq!(seconds(0), 1);
    }
}
