//! Rotating knock sequences: for each time window, `length` distinct ports of
//! a range derived from HMAC-SHA256 of a shared secret. Gate and client derive
//! the same ports from the secret, the policy name and the window, so a
//! recorded knock is worth nothing once its window is spent or over.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::flow::{FlowPort, PortRange};

/// Fewest bytes of secret accepted: the HMAC key is only as strong as it.
pub const MIN_SECRET_BYTES: usize = 32;

/// Separates knockq's use of the secret from any other.
const DOMAIN: &[u8] = b"knockq rotating sequence v1";

/// A shared secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    // Not a `source`: the message is shown whole in configuration errors.
    #[error("secret file {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error(
        "secret file {} can be read or written by group or others (mode {mode:04o}): run chmod 600 on it",
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "secret file {} holds {len} bytes; at least {MIN_SECRET_BYTES} are needed (knockq keygen writes one)",
        path.display()
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

impl Secret {
    /// Reads a secret file: its bytes without trailing whitespace, so a key
    /// copied through an editor or a terminal stays the same key.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let io_error = |error| SecretError::Io {
            path: path.to_owned(),
            error,
        };
        let file = fs::File::open(path).map_err(io_error)?;
        let mode = file.metadata().map_err(io_error)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let mut bytes = io::Read::bytes(file)
            .collect::<Result<Vec<u8>, _>>()
            .map_err(io_error)?;
        let len = bytes.trim_ascii_end().len();
        bytes.truncate(len);
        if len < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                path: path.to_owned(),
                len,
            });
        }
        Ok(Secret(bytes))
    }

    /// HMAC-SHA256 of `message` under the secret.
    pub fn hmac(&self, message: &[u8]) -> [u8; 32] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// The secret's bytes, for keys kept in other forms (SPA's base64).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        Secret(bytes.to_vec())
    }
}

/// Writes a new secret to `path`, mode 0600, refusing to replace a file:
/// 32 random bytes as 64 hexadecimal digits, safe to copy as text.
pub fn keygen(path: &Path) -> Result<(), SecretError> {
    let mut random = [0u8; MIN_SECRET_BYTES];
    getrandom::fill(&mut random).map_err(|e| SecretError::Random(e.to_string()))?;
    let mut text: String = random.iter().map(|b| format!("{b:02x}")).collect();
    text.push('\n');
    write_new_secret(path, &text)
}

/// Writes `text` to a new file at `path`, mode 0600, refusing to replace
/// one.
pub fn write_new_secret(path: &Path, text: &str) -> Result<(), SecretError> {
    let io_error = |error| SecretError::Io {
        path: path.to_owned(),
        error,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    file.write_all(text.as_bytes()).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

/// How a rotating policy's sequences are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotating {
    pub secret: Secret,
    /// Ports per sequence.
    pub length: u8,
    /// Each window's sequence is in force for this long (whole seconds).
    pub period: Duration,
    pub ports: PortRange,
}

impl Rotating {
    pub fn period_millis(&self) -> u64 {
        u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX)
    }

    /// The window that Unix time `unix_millis` falls in.
    pub fn window_at(&self, unix_millis: u64) -> u64 {
        unix_millis / self.period_millis()
    }

    /// The sequence of `policy` for `window`: `length` distinct ports of the
    /// range. The HMAC output is read as 32-bit numbers, and numbers past the
    /// last whole multiple of the range size are skipped, so every port of
    /// the range is equally likely.
    pub fn sequence(&self, policy: &str, window: u64) -> Vec<FlowPort> {
        let size = self.ports.size();
        let length = usize::from(self.length);
        debug_assert!(
            size as usize >= length,
            "validated: the range holds the sequence"
        );
        let unbiased_below = u32::MAX - (u32::MAX % size);
        let mut ports = Vec::with_capacity(length);
        for block in 0u32.. {
            let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret.0)
                .expect("HMAC takes keys of any length");
            mac.update(DOMAIN);
            mac.update(&[0]);
            mac.update(policy.as_bytes());
            mac.update(&[0]);
            mac.update(&window.to_be_bytes());
            mac.update(&block.to_be_bytes());
            let digest = mac.finalize().into_bytes();
            for chunk in digest.chunks_exact(4) {
                let n = u32::from_be_bytes(chunk.try_into().expect("4 bytes"));
                if n >= unbiased_below {
                    continue;
                }
                let port = self.ports.nth(n % size);
                if !ports.contains(&port) {
                    ports.push(port);
                    if ports.len() == length {
                        return ports;
                    }
                }
            }
        }
        unreachable!("2^32 HMAC blocks always yield enough distinct ports")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange::new(FlowPort::tcp(first), FlowPort::tcp(last)).unwrap()
    }

    fn rotating(secret: &[u8]) -> Rotating {
        Rotating {
            secret: Secret::from_bytes(secret),
            length: 3,
            period: Duration::from_secs(30),
            ports: range(20000, 59999),
        }
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn derivation_is_deterministic_distinct_and_in_range() {
        let r = rotating(KEY);
        for window in 0..500 {
            let sequence = r.sequence("ops", window);
            assert_eq!(sequence, r.sequence("ops", window));
            assert_eq!(sequence.len(), 3);
            assert!(
                sequence.iter().all(|p| r.ports.contains(*p)),
                "{sequence:?}"
            );
            let mut sorted = sequence.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 3, "{sequence:?}");
        }
    }

    #[test]
    fn sequences_differ_between_windows_policies_and_secrets() {
        let r = rotating(KEY);
        let other_secret = rotating(b"another secret of at least 32 bytes!");
        let here = r.sequence("ops", 1000);
        assert_ne!(here, r.sequence("ops", 1001));
        assert_ne!(here, r.sequence("ops", 999));
        assert_ne!(here, r.sequence("dev", 1000));
        assert_ne!(here, other_secret.sequence("ops", 1000));
    }

    #[test]
    fn a_range_as_small_as_the_sequence_yields_all_of_it() {
        let r = Rotating {
            ports: range(40000, 40002),
            ..rotating(KEY)
        };
        let mut sequence = r.sequence("ops", 7);
        sequence.sort_unstable();
        assert_eq!(sequence, [40000, 40001, 40002].map(FlowPort::tcp));
    }

    #[test]
    fn every_port_of_a_small_range_comes_up() {
        let r = Rotating {
            ports: range(100, 109),
            length: 1,
            ..rotating(KEY)
        };
        let mut seen = [0u32; 10];
        for window in 0..2000 {
            seen[usize::from(r.sequence("ops", window)[0].number() - 100)] += 1;
        }
        // 200 expected each; a biased mapping or a stuck port would show.
        assert!(seen.iter().all(|&n| (130..=270).contains(&n)), "{seen:?}");
    }

    #[test]
    fn windows_follow_the_period() {
        let r = rotating(KEY);
        assert_eq!(r.window_at(0), 0);
        assert_eq!(r.window_at(29_999), 0);
        assert_eq!(r.window_at(30_000), 1);
    }

    #[test]
    fn keygen_writes_a_private_secret_that_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.key");
        keygen(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.trim_end().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(Secret::load(&path).unwrap().0.len(), 64);
        // A second keygen to the same file would silently change the key.
        assert!(matches!(keygen(&path), Err(SecretError::Io { .. })));
    }

    #[test]
    fn open_or_short_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("open.key");
        fs::write(&path, [7u8; 40]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = Secret::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("mode 0640") && err.contains("chmod 600"),
            "{err}"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Secret::load(&path).is_ok());
        fs::write(&path, b"short\n").unwrap();
        let err = Secret::load(&path).unwrap_err().to_string();
        assert!(err.contains("holds 5 bytes"), "{err}");

        let missing = dir.path().join("missing.key");
        assert!(matches!(
            Secret::load(&missing),
            Err(SecretError::Io { .. })
        ));
    }
}
