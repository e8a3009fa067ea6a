//! The policies in force, with their port lookup. Replaced whole on reload;
//! state in the source table refers to policies by key, so a reload keeps the
//! state of every policy it does not change.

use std::sync::atomic::{AtomicU32, Ordering};

use super::rotation::{rotating_role, Accepted, ScheduleCache, SpentWindows};
use super::{PolicyId, PortMap, PortRole, Timestamp, UserKey, WallClock};

use crate::config::{Knock, Policy};
use crate::flow::FlowPort;

/// Names a policy across reloads: a policy keeps its key while its name,
/// sequence and ports stay the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey(u32);

pub struct Policies {
    list: Vec<Policy>,
    keys: Vec<PolicyKey>,
    ports: PortMap,
    schedule: ScheduleCache,
    /// Per policy, the keys of its SPA users, in the order of its list.
    users: Vec<Vec<UserKey>>,
}

/// Whether two policies are the same knock for the same ports: the state of
/// one is valid for the other. Timeouts and strictness may differ, and so
/// may a script's limits: its text and ports are its knock.
fn same_knock(a: &Policy, b: &Policy) -> bool {
    let knock = match (&a.knock, &b.knock) {
        (Knock::Script(_), Knock::Script(_)) => a.knock.identity() == b.knock.identity(),
        // Users come and go by reload; each user's grants follow the user.
        (Knock::Spa(a), Knock::Spa(b)) => a.port == b.port,
        (a, b) => a == b,
    };
    a.name == b.name && knock && a.open_ports == b.open_ports && a.close_port == b.close_port
}

impl Policies {
    /// Policies for `list`; each keeps the key of its same knock in
    /// `previous`, or gets a fresh one from `next_key`.
    pub(super) fn new(list: &[Policy], previous: Option<&Policies>, next_key: &AtomicU32) -> Self {
        let keys = list
            .iter()
            .map(|policy| {
                previous
                    .and_then(|old| {
                        old.list
                            .iter()
                            .position(|p| same_knock(p, policy))
                            .map(|i| old.keys[i])
                    })
                    .unwrap_or_else(|| PolicyKey(next_key.fetch_add(1, Ordering::Relaxed)))
            })
            .collect::<Vec<PolicyKey>>();
        let users = list
            .iter()
            .zip(&keys)
            .map(|(policy, &key)| {
                let Knock::Spa(spa) = &policy.knock else {
                    return Vec::new();
                };
                let earlier = previous.and_then(|old| old.find(key).map(|(id, p)| (id, p, old)));
                spa.users
                    .iter()
                    .map(|user| {
                        earlier
                            .and_then(|(id, p, old)| match &p.knock {
                                Knock::Spa(s) => s
                                    .users
                                    .iter()
                                    .position(|u| u.name == user.name)
                                    .map(|i| old.users[usize::from(id)][i]),
                                _ => None,
                            })
                            .unwrap_or_else(|| {
                                let n = next_key.fetch_add(1, Ordering::Relaxed);
                                UserKey(
                                    std::num::NonZeroU32::new(n.wrapping_add(1).max(1))
                                        .expect("at least 1"),
                                )
                            })
                    })
                    .collect()
            })
            .collect();
        Policies {
            list: list.to_vec(),
            keys,
            users,
            ports: PortMap::new(list),
            schedule: ScheduleCache::new(),
        }
    }

    pub fn list(&self) -> &[Policy] {
        &self.list
    }

    /// What a SYN to `port` is at `now`: a port in a rotating range is a
    /// knock only while a live sequence holds it.
    pub(super) fn role(&self, port: FlowPort, now: Timestamp, wall: WallClock) -> PortRole {
        match self.ports.role(port) {
            PortRole::Rotating { policy } => {
                let schedule = self.schedule.at(&self.list, wall.unix_millis(now));
                rotating_role(&schedule, policy, port)
            }
            role => role,
        }
    }

    /// The sequences policy `id` accepts at `now`.
    pub(super) fn accepted<'a>(
        &'a self,
        id: PolicyId,
        now: Timestamp,
        wall: WallClock,
        spent: &'a SpentWindows,
    ) -> Accepted<'a> {
        let key = self.key(id);
        match &self.list[usize::from(id)].knock {
            Knock::Fixed(sequence) => Accepted::fixed(sequence, spent, key, wall),
            Knock::Rotating(rotating) => {
                let schedule = self.schedule.at(&self.list, wall.unix_millis(now));
                Accepted::rotating(rotating, schedule, id, spent, key, wall)
            }
            // Scripts keep their own sequences, if any, and SPA has none:
            // none is accepted here.
            Knock::Script(_) | Knock::Spa(_) => Accepted::fixed(&[], spent, key, wall),
        }
    }

    /// The keys of policy `id`'s SPA users, in the order of its list.
    pub fn user_keys(&self, id: PolicyId) -> &[UserKey] {
        &self.users[usize::from(id)]
    }

    /// The name of the SPA user `user` of policy `key`, if still in force.
    pub fn user_name(&self, key: PolicyKey, user: UserKey) -> Option<&str> {
        let (id, policy) = self.find(key)?;
        let Knock::Spa(spa) = &policy.knock else {
            return None;
        };
        let index = self.user_keys(id).iter().position(|&u| u == user)?;
        Some(spa.users[index].name.as_str())
    }

    /// The key of policy `key`'s SPA user `name`, if in force.
    pub fn user_key(&self, key: PolicyKey, name: &str) -> Option<UserKey> {
        let (id, policy) = self.find(key)?;
        let Knock::Spa(spa) = &policy.knock else {
            return None;
        };
        let index = spa.users.iter().position(|u| u.name == name)?;
        Some(self.user_keys(id)[index])
    }

    pub fn key(&self, id: PolicyId) -> PolicyKey {
        self.keys[usize::from(id)]
    }

    /// The policy with `key`, if it is still in force.
    pub fn find(&self, key: PolicyKey) -> Option<(PolicyId, &Policy)> {
        let index = self.keys.iter().position(|&k| k == key)?;
        Some((PolicyId::try_from(index).ok()?, &self.list[index]))
    }

    pub fn get(&self, key: PolicyKey) -> Option<&Policy> {
        self.find(key).map(|(_, policy)| policy)
    }

    pub fn by_name(&self, name: &str) -> Option<PolicyKey> {
        let index = self.list.iter().position(|p| p.name == name)?;
        Some(self.keys[index])
    }

    pub fn keys(&self) -> impl Iterator<Item = (PolicyKey, &Policy)> {
        self.keys.iter().copied().zip(&self.list)
    }
}
