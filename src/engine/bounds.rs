//! What a grant from outside the engine's own decisions may be: no more
//! than the local policy could give by itself. A record from the fleet and
//! a saved grant each name a policy, a subject, ports and an end; all of
//! them are held to the policy in force here, in this one place, whichever
//! path they came by. Anyone who can write under the fleet's prefix, or
//! edit the state file, can still grant an address what a knock would;
//! never a wider network, other ports or a longer time.

use std::net::IpAddr;
use std::time::Duration;

use super::{GrantError, GrantLeft, GrantRecord, PortMask};
use crate::config::{Knock, Policy};
use crate::flow::PortRange;

/// How far past the policy's longest grant a record's end may lie and be
/// cut back to it rather than refused: the clocks of two nodes differ a
/// little, and a grant made there a moment ago must not be lost here.
pub const CLOCK_SKEW: Duration = Duration::from_secs(10);

/// The longest grant the policy's own decisions make; `None` when they may
/// last until the close knock.
pub fn longest_grant(policy: &Policy) -> Option<Duration> {
    let timeout = policy.grant_timeout?;
    Some(match &policy.knock {
        // A script may ask for up to its max_grant, or take the timeout.
        Knock::Script(script) => timeout.max(script.max_grant),
        _ => timeout,
    })
}

/// The mask of `ports`, each one of the policy's open ports.
pub fn grant_ports(policy: &Policy, ports: &[PortRange]) -> Result<PortMask, GrantError> {
    PortMask::of(&policy.open_ports, ports).map_err(GrantError::Port)
}

/// `record`, held to `policy`: its time cut to the policy's longest grant
/// when past it by no more than [`CLOCK_SKEW`]; refused when it asks for
/// more than the policy could give.
pub(super) fn bound(policy: &Policy, mut record: GrantRecord) -> Result<GrantRecord, GrantError> {
    if let Some(prefix) = record.prefix {
        let bits = match record.src {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(GrantError::BadPrefix);
        }
        // Only a script grants networks, and none wider than its bounds.
        let Knock::Script(script) = &policy.knock else {
            return Err(GrantError::NetworkGrant);
        };
        let shortest = match record.src {
            IpAddr::V4(_) => script.min_prefix_v4,
            IpAddr::V6(_) => script.min_prefix_v6,
        };
        if prefix < shortest {
            return Err(GrantError::TooWide { shortest });
        }
    }
    if let Some(longest) = longest_grant(policy) {
        record.left = match record.left {
            GrantLeft::UntilClosed => return Err(GrantError::UntilClosed),
            GrantLeft::For(left) if left > longest + CLOCK_SKEW => {
                return Err(GrantError::TooLong { longest })
            }
            GrantLeft::For(left) => GrantLeft::For(left.min(longest)),
        };
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::{Origin, PolicyKey};
    use crate::flow::FlowPort;

    fn single(port: u16) -> PortRange {
        PortRange::single(FlowPort::tcp(port))
    }

    /// The policies of `text`, read from `path` (the engine's own checks
    /// are not what these tests are about).
    fn policies_at(text: &str, path: &Path) -> Vec<Policy> {
        let document = crate::config::read(text, path).unwrap();
        document.into_config().unwrap().policies
    }

    fn policies(text: &str) -> Vec<Policy> {
        policies_at(text, Path::new("t.toml"))
    }

    /// `bound` reads no key: any will do.
    fn key() -> PolicyKey {
        let text = "[[policy]]\nname = \"k\"\nsequence = [1111, 2222]\nopen_ports = [22]\n";
        let config = crate::config::read(text, Path::new("t.toml"))
            .unwrap()
            .into_config()
            .unwrap();
        crate::engine::Engine::new(&config).policies().key(0)
    }

    fn record(src: &str, prefix: Option<u8>, left: GrantLeft) -> GrantRecord {
        GrantRecord {
            src: src.parse().unwrap(),
            prefix,
            policy: key(),
            left,
            ports: PortMask::ALL,
            stage: 0,
            origin: Origin::LOCAL,
            user: None,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_fixed_policy_grants_addresses_for_its_timeout_at_most() {
        let fixed = &policies(
            "[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22, 8080]\ngrant_timeout = \"1h\"\n",
        )[0];
        assert_eq!(longest_grant(fixed), Some(HOUR));
        let address = record("10.0.0.2", None, GrantLeft::For(HOUR / 2));
        assert_eq!(bound(fixed, address), Ok(address));
        for prefix in [0, 8, 32] {
            assert_eq!(
                bound(fixed, record("0.0.0.0", Some(prefix), GrantLeft::For(HOUR))),
                Err(GrantError::NetworkGrant),
                "/{prefix}"
            );
        }
        assert_eq!(
            bound(fixed, record("10.0.0.2", None, GrantLeft::UntilClosed)),
            Err(GrantError::UntilClosed)
        );
        assert_eq!(
            bound(fixed, record("10.0.0.2", None, GrantLeft::For(24 * HOUR))),
            Err(GrantError::TooLong { longest: HOUR })
        );
        let skewed = record("10.0.0.2", None, GrantLeft::For(HOUR + CLOCK_SKEW / 2));
        assert_eq!(
            bound(fixed, skewed).unwrap().left,
            GrantLeft::For(HOUR),
            "a little past the end, as another node's clock has it: cut to the longest"
        );
        assert_eq!(
            grant_ports(fixed, &[single(8080)]),
            PortMask::of(&fixed.open_ports, &[single(8080)]).map_err(GrantError::Port)
        );
        assert_eq!(
            grant_ports(fixed, &[single(22), single(23)]),
            Err(GrantError::Port(single(23)))
        );
    }

    #[test]
    fn a_policy_without_a_timeout_may_grant_until_closed() {
        let open =
            &policies("[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\n")
                [0];
        assert_eq!(longest_grant(open), None);
        let forever = record("fd00::2", None, GrantLeft::UntilClosed);
        assert_eq!(bound(open, forever), Ok(forever));
        let long = record("fd00::2", None, GrantLeft::For(1000 * HOUR));
        assert_eq!(bound(open, long), Ok(long));
    }

    #[test]
    fn a_script_grants_networks_within_its_minimum_prefix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.lua"), "return function(k) return 0 end").unwrap();
        let text = "[[policy]]\nname = \"team\"\nopen_ports = [22]\ngrant_timeout = \"1h\"\n\
                    [policy.script]\nfile = \"p.lua\"\nknock_ports = [7000]\nmax_grant = \"8h\"\n\
                    min_prefix_v4 = 16\nmin_prefix_v6 = 48\n";
        let path = dir.path().join("t.toml");
        let script = &policies_at(text, &path)[0];
        assert_eq!(longest_grant(script), Some(8 * HOUR), "its max_grant");
        let net = record("10.78.0.0", Some(16), GrantLeft::For(HOUR));
        assert_eq!(bound(script, net), Ok(net));
        assert_eq!(
            bound(script, record("10.0.0.0", Some(8), GrantLeft::For(HOUR))),
            Err(GrantError::TooWide { shortest: 16 })
        );
        assert_eq!(
            bound(script, record("fd00::", Some(32), GrantLeft::For(HOUR))),
            Err(GrantError::TooWide { shortest: 48 })
        );
        assert_eq!(
            bound(script, record("10.0.0.2", Some(33), GrantLeft::For(HOUR))),
            Err(GrantError::BadPrefix)
        );
        assert_eq!(
            bound(
                script,
                record("10.78.0.0", Some(16), GrantLeft::UntilClosed)
            ),
            Err(GrantError::UntilClosed)
        );
    }
}
