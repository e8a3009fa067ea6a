//! What each destination port means to the gate, looked up in one step.

use super::PolicyId;
use crate::config::{Knock, Policy};
use crate::flow::{FlowPort, PortRange};

/// A set of policies, as a bit mask; configurations hold at most
/// [`PolicySet::CAPACITY`] policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicySet(u32);

impl PolicySet {
    pub const CAPACITY: usize = 32;

    pub fn contains(self, id: PolicyId) -> bool {
        self.0 & (1 << id) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = PolicyId> {
        (0..Self::CAPACITY as PolicyId).filter(move |&id| self.contains(id))
    }

    fn insert(&mut self, id: PolicyId) {
        self.0 |= 1 << id;
    }
}

/// Which of a policy's open ports a grant opens, as bits over the indices of
/// `open_ports`: a script may open some of them. Built-in grants open all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortMask(u16);

impl PortMask {
    pub const ALL: PortMask = PortMask(u16::MAX);
    /// Open ports a script policy may have, so that any subset fits a mask.
    pub const MAX_PORTS: usize = 16;

    /// The mask of the entries of `open_ports` that hold `ports`: a port
    /// of a range opens the whole range. The error names a port that no
    /// entry holds.
    pub fn of(open_ports: &[PortRange], ports: &[PortRange]) -> Result<Self, PortRange> {
        let mut mask = 0u16;
        for &port in ports {
            let index = open_ports
                .iter()
                .take(Self::MAX_PORTS)
                .position(|entry| entry.contains(port.first()) && entry.contains(port.last()))
                .ok_or(port)?;
            mask |= 1 << index;
        }
        Ok(PortMask(mask))
    }

    /// Whether the grant opens `port`.
    pub fn opens(self, open_ports: &[PortRange], port: FlowPort) -> bool {
        open_ports
            .iter()
            .position(|entry| entry.contains(port))
            .is_some_and(|index| {
                self == Self::ALL || (index < Self::MAX_PORTS && self.0 & (1 << index) != 0)
            })
    }

    /// The entries opened, in the order of `open_ports`.
    pub fn ports(self, open_ports: &[PortRange]) -> impl Iterator<Item = PortRange> + '_ {
        open_ports
            .iter()
            .enumerate()
            .filter(move |&(index, _)| {
                self == Self::ALL || (index < Self::MAX_PORTS && self.0 & (1 << index) != 0)
            })
            .map(|(_, &port)| port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// No policy knocks, closes or opens this port.
    Unrelated,
    /// A port of a sequence `policy` accepts; `first`: the first port of one.
    Knock {
        policy: PolicyId,
        first: bool,
    },
    /// In the range of a rotating policy: a knock or unrelated, depending on
    /// the time (see `Policies::role`).
    Rotating {
        policy: PolicyId,
    },
    Close {
        policy: PolicyId,
    },
    /// A knock port a script policy declared: the script decides what it does.
    Script {
        policy: PolicyId,
    },
    /// The port single packet authorization datagrams of `policy` come to.
    Spa {
        policy: PolicyId,
    },
    /// Opened by a grant of any of these policies.
    Open {
        policies: PolicySet,
    },
}

/// Role of every port, indexed by [`FlowPort::index`].
pub struct PortMap(Box<[PortRole]>);

impl PortMap {
    /// Builds the map from validated policies: knock and close ports and
    /// rotating ranges are unique across policies, so only open ports can be
    /// shared.
    pub fn new(policies: &[Policy]) -> Self {
        let mut roles = vec![PortRole::Unrelated; FlowPort::COUNT].into_boxed_slice();
        for (id, policy) in policies.iter().enumerate() {
            let id = PolicyId::try_from(id).expect("validated: at most 32 policies");
            for port in policy.open_ports.iter().flat_map(|range| range.iter()) {
                let role = &mut roles[port.index()];
                let mut set = match *role {
                    PortRole::Open { policies } => policies,
                    _ => PolicySet::default(),
                };
                set.insert(id);
                *role = PortRole::Open { policies: set };
            }
            if let Some(port) = policy.close_port {
                roles[port.index()] = PortRole::Close { policy: id };
            }
            match &policy.knock {
                Knock::Fixed(sequence) => {
                    for (step, &port) in sequence.iter().enumerate() {
                        roles[port.index()] = PortRole::Knock {
                            policy: id,
                            first: step == 0,
                        };
                    }
                }
                Knock::Rotating(rotating) => {
                    for port in rotating.ports.iter() {
                        roles[port.index()] = PortRole::Rotating { policy: id };
                    }
                }
                Knock::Script(script) => {
                    for port in script.knock_ports.iter().flat_map(|range| range.iter()) {
                        roles[port.index()] = PortRole::Script { policy: id };
                    }
                }
                Knock::Spa(spa) => {
                    let own = spa.users.iter().filter_map(|user| user.port);
                    for port in std::iter::once(spa.port).chain(own) {
                        roles[FlowPort::udp(port).index()] = PortRole::Spa { policy: id };
                    }
                }
            }
        }
        PortMap(roles)
    }

    pub fn role(&self, port: FlowPort) -> PortRole {
        self.0[port.index()]
    }
}
