//! Which rotating window the client knocks. The gate opens each window's
//! sequence once, so the client remembers the windows it used and, when the
//! current one is spent, knocks the previous one (which the gate still
//! accepts) or waits for the next.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(test)]
use crate::flow::FlowPort;
use crate::rotating::Rotating;

/// The window to knock and how long to wait before knocking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub window: u64,
    pub wait: Duration,
}

/// The first window at `unix_millis` that is not in `used`: the current
/// one, the previous one, or else the next one, after a wait.
pub fn pick(rotating: &Rotating, used: &[u64], unix_millis: u64) -> Pick {
    let current = rotating.window_at(unix_millis);
    match [current, current.saturating_sub(1)]
        .into_iter()
        .find(|w| !used.contains(w))
    {
        Some(window) => Pick {
            window,
            wait: Duration::ZERO,
        },
        None => {
            let next = current + 1;
            let starts = next * rotating.period_millis();
            Pick {
                window: next,
                wait: Duration::from_millis(starts - unix_millis),
            }
        }
    }
}

/// The windows a profile knocked, kept in a small file per profile.
pub struct UsedWindows {
    path: PathBuf,
}

impl UsedWindows {
    /// `$XDG_STATE_HOME/knockq/NAME.windows`, else under `~/.local/state`.
    pub fn for_profile(name: &str) -> Self {
        let state_home = std::env::var_os("XDG_STATE_HOME")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_default();
                Path::new(&home).join(".local").join("state")
            });
        UsedWindows {
            path: state_home.join("knockq").join(format!("{name}.windows")),
        }
    }

    /// The windows recorded; none if the file is missing or unreadable,
    /// which costs at most one knock the gate refuses.
    pub fn load(&self) -> Vec<u64> {
        fs::read_to_string(&self.path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    }

    /// Records `window`, keeping only the two newest: no older one is
    /// accepted any more.
    pub fn record(&self, window: u64) -> std::io::Result<()> {
        let mut used = self.load();
        used.push(window);
        used.sort_unstable_by(|a, b| b.cmp(a));
        used.dedup();
        used.truncate(2);
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let text: Vec<String> = used.iter().map(u64::to_string).collect();
        fs::write(&self.path, text.join(" ") + "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotating::Secret;

    fn rotating() -> Rotating {
        Rotating {
            secret: Secret::from_bytes(&[1; 32]),
            length: 3,
            period: Duration::from_secs(30),
            ports: crate::flow::PortRange::new(FlowPort::tcp(20000), FlowPort::tcp(59999)).unwrap(),
        }
    }

    #[test]
    fn a_used_window_falls_back_to_the_previous_then_waits() {
        let r = rotating();
        let t = 1000 * 30_000 + 12_000;
        let now = |window| Pick {
            window,
            wait: Duration::ZERO,
        };
        assert_eq!(pick(&r, &[], t), now(1000));
        assert_eq!(pick(&r, &[998], t), now(1000));
        assert_eq!(pick(&r, &[1000], t), now(999));
        assert_eq!(
            pick(&r, &[1000, 999], t),
            Pick {
                window: 1001,
                wait: Duration::from_secs(18)
            }
        );
    }

    #[test]
    fn used_windows_keep_the_two_newest() {
        let dir = tempfile::tempdir().unwrap();
        let used = UsedWindows {
            path: dir.path().join("state").join("ops.windows"),
        };
        assert!(used.load().is_empty());
        for window in [5, 7, 6, 7] {
            used.record(window).unwrap();
        }
        assert_eq!(used.load(), [7, 6]);
    }
}
