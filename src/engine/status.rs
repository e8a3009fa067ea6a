//! The engine's state as people and the state file read it: every source's
//! progress and grants, and the network grants.

use std::net::IpAddr;

use super::{source, Engine, Origin, PolicyStatus, Timestamp};
use crate::config;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// The source, or the network address of a network grant.
    pub src: IpAddr,
    /// A network grant's prefix length.
    pub prefix: Option<u8>,
    pub policy: String,
    /// The script stage to save with the grant (0 for other policies).
    pub stage: u8,
    pub status: PolicyStatus,
    /// The node the grant was made on.
    pub origin: Origin,
    /// The SPA user of an SPA grant.
    pub user: Option<String>,
}

impl Engine {
    /// Every tracked source's progress and grants at `now`, and the network
    /// grants.
    pub fn status(&self, now: Timestamp) -> Vec<SourceStatus> {
        self.statuses(now, true)
    }

    /// The grants open at `now`, without the progress of sources that hold
    /// none: a short list even while a flood of knocks fills the table.
    pub fn grants(&self, now: Timestamp) -> Vec<SourceStatus> {
        self.statuses(now, false)
    }

    fn statuses(&self, now: Timestamp, with_progress: bool) -> Vec<SourceStatus> {
        let policies = self.policies.load();
        let mut statuses = Vec::new();
        self.sources.for_each(|src, source| {
            if !with_progress && !source.holds_grant() {
                return;
            }
            for slot in source.slots() {
                let Some(policy) = policies.get(slot.policy) else {
                    continue;
                };
                let mut status = slot.status(policy, now);
                if !with_progress {
                    status.progress = None;
                }
                if status.progress.is_some() || status.grant.is_some() {
                    statuses.push(SourceStatus {
                        src,
                        prefix: None,
                        policy: policy.name.clone(),
                        stage: match policy.knock {
                            config::Knock::Script(_) => slot.stage(),
                            _ => 0,
                        },
                        status,
                        origin: slot.origin(),
                        user: slot
                            .user()
                            .and_then(|user| policies.user_name(slot.policy, user))
                            .map(str::to_owned),
                    });
                }
            }
        });
        for grant in self.prefixes.list(now) {
            let Some(policy) = policies.get(grant.policy) else {
                continue;
            };
            statuses.push(SourceStatus {
                src: grant.net.network(),
                prefix: Some(grant.net.prefix_len()),
                policy: policy.name.clone(),
                stage: 0,
                status: PolicyStatus {
                    progress: None,
                    grant: Some(source::grant_left(grant.until, now)),
                    ports: grant.ports,
                },
                origin: grant.origin,
                user: None,
            });
        }
        statuses.sort_by(|a, b| (a.src, a.prefix, &a.policy).cmp(&(b.src, b.prefix, &b.policy)));
        statuses
    }
}
