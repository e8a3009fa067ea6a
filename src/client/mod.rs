//! The knock client: `knockq knock` and `knockq connect` (an ssh
//! ProxyCommand). It knocks fixed sequences as given and derives rotating
//! ones from the shared secret, as the gate does.
//!
//! - [`profile`]: `client.toml`, named hosts and how to knock them.
//! - [`knock`]: sending the knocks, in order.
//! - [`windows`]: which rotating window to knock.
//! - [`relay`]: connecting after the knock and relaying stdin and stdout.

pub mod knock;
pub mod profile;
pub mod relay;
pub mod spa;
pub mod windows;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Knock;
use crate::flow::FlowPort;
use profile::{Profile, ProfileError};
use windows::UsedWindows;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("cannot resolve {host}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot knock {target}")]
    Knock {
        target: SocketAddr,
        source: io::Error,
    },
    #[error("cannot connect to {target} after knocking")]
    Connect {
        target: SocketAddr,
        source: io::Error,
    },
    #[error("relaying to the connection failed")]
    Relay(#[source] io::Error),
    #[error("{0}")]
    Usage(String),
}

/// The ports to knock for `profile` now. For a rotating profile this is the
/// sequence of the first window this client has not used (see
/// [`windows::pick`]), after waiting for it if need be.
pub fn profile_sequence(profile: &Profile) -> Vec<FlowPort> {
    let rotating = match &profile.knock {
        None => return Vec::new(),
        Some(Knock::Fixed(sequence)) => return sequence.clone(),
        Some(Knock::Rotating(rotating)) => rotating,
        Some(Knock::Script(_) | Knock::Spa(_)) => {
            unreachable!("client profiles have no script or SPA knock")
        }
    };
    let used = UsedWindows::for_profile(&profile.name);
    let pick = windows::pick(rotating, &used.load(), unix_millis());
    if !pick.wait.is_zero() {
        eprintln!(
            "knockq: this client already used the open windows of profile {}; waiting {} for the next",
            profile.name,
            humantime::format_duration(Duration::from_secs(pick.wait.as_secs() + 1))
        );
        std::thread::sleep(pick.wait);
    }
    if let Err(e) = used.record(pick.window) {
        eprintln!("knockq: warning: cannot record the window used: {e}");
    }
    rotating.sequence(&profile.policy, pick.window)
}

fn unix_millis() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}
