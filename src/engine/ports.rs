//! What each destination port means to the gate, looked up in one step.

use super::PolicyId;
use crate::config::{Knock, Policy};

/// A set of policies, as a bit mask; configurations hold at most
/// [`PolicySet::CAPACITY`] policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicySet(u32);

impl PolicySet {
    pub const CAPACITY: usize = 32;

    pub fn contains(self, id: PolicyId) -> bool {
        self.0 & (1 << id) != 0
    }

    fn insert(&mut self, id: PolicyId) {
        self.0 |= 1 << id;
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
    /// Opened by a grant of any of these policies.
    Open {
        policies: PolicySet,
    },
}

/// Role of every port, indexed by port number.
pub struct PortMap(Box<[PortRole]>);

impl PortMap {
    /// Builds the map from validated policies: knock and close ports and
    /// rotating ranges are unique across policies, so only open ports can be
    /// shared.
    pub fn new(policies: &[Policy]) -> Self {
        let mut roles = vec![PortRole::Unrelated; 1 << 16].into_boxed_slice();
        for (id, policy) in policies.iter().enumerate() {
            let id = PolicyId::try_from(id).expect("validated: at most 32 policies");
            for &port in &policy.open_ports {
                let role = &mut roles[usize::from(port)];
                let mut set = match *role {
                    PortRole::Open { policies } => policies,
                    _ => PolicySet::default(),
                };
                set.insert(id);
                *role = PortRole::Open { policies: set };
            }
            if let Some(port) = policy.close_port {
                roles[usize::from(port)] = PortRole::Close { policy: id };
            }
            match &policy.knock {
                Knock::Fixed(sequence) => {
                    for (step, &port) in sequence.iter().enumerate() {
                        roles[usize::from(port)] = PortRole::Knock {
                            policy: id,
                            first: step == 0,
                        };
                    }
                }
                Knock::Rotating(rotating) => {
                    for port in rotating.ports.clone() {
                        roles[usize::from(port)] = PortRole::Rotating { policy: id };
                    }
                }
            }
        }
        PortMap(roles)
    }

    pub fn role(&self, port: u16) -> PortRole {
        self.0[usize::from(port)]
    }
}
