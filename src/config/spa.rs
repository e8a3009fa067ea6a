//! `[policy.spa]`: a single packet authorization knock, and its users,
//! inline (`[[policy.spa.user]]`) or one file each in `users_dir`, so that
//! configuration management adds and removes people as files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::file::{duration, optional_duration, ErrorContext};
use super::ConfigError;
use crate::flow::PortRange;
use crate::spa::Keys;

/// A policy's SPA knock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spa {
    /// The UDP port the packets come to.
    pub port: u16,
    /// How far a packet's timestamp may be from the gate's clock, either way.
    pub max_age: Duration,
    /// Users whose HMAC is tried per packet at most; the rest are counted
    /// as not tried.
    pub max_candidates: usize,
    /// Digests of accepted packets kept at most, against replays.
    pub replay_cache: usize,
    pub users: Vec<SpaUser>,
}

/// One person's keys and what they may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaUser {
    pub name: String,
    pub keys: Keys,
    /// Networks the user's packets may come from; empty: any.
    pub sources: Vec<IpNet>,
    /// The policy's open ports this user may open (fwknop's `OPEN_PORTS`);
    /// empty: all of them.
    pub open_ports: Vec<PortRange>,
    /// The longest grant the user may ask for.
    pub max_timeout: Option<Duration>,
    /// Unix time from which the user is refused (fwknop's `ACCESS_EXPIRE`).
    pub expires: Option<u64>,
    /// Refuse packets that leave the address to the packet's source
    /// (`0.0.0.0`, the client's `-s`).
    pub require_source_address: bool,
    /// A UDP port of the user's own (the client's `-p`): its packets find
    /// the user's key at once, and the policy's port tries no user with one.
    pub port: Option<u16>,
}

impl SpaUser {
    pub fn expired(&self, unix_secs: u64) -> bool {
        self.expires.is_some_and(|at| unix_secs >= at)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpa {
    #[serde(default = "default_port")]
    pub(crate) port: Spanned<u16>,
    #[serde(default = "default_max_age", deserialize_with = "duration")]
    max_age: Duration,
    #[serde(default = "default_max_candidates")]
    max_candidates: Spanned<usize>,
    #[serde(default = "default_replay_cache")]
    replay_cache: Spanned<usize>,
    #[serde(default, rename = "user")]
    users: Vec<RawUser>,
    users_dir: Option<Spanned<PathBuf>>,
    /// The users of `users_dir`, read with the structure.
    #[serde(skip)]
    dir_users: Vec<UserFile>,
}

/// A user's file of `users_dir`: its text, for errors, and the user.
struct UserFile {
    path: PathBuf,
    text: String,
    user: RawUser,
}

fn default_port() -> Spanned<u16> {
    Spanned::new(0..0, crate::spa::DEFAULT_PORT)
}

fn default_max_age() -> Duration {
    Duration::from_secs(120)
}

fn default_max_candidates() -> Spanned<usize> {
    Spanned::new(0..0, 16)
}

fn default_replay_cache() -> Spanned<usize> {
    Spanned::new(0..0, 65536)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUser {
    name: Spanned<String>,
    pub(crate) port: Option<Spanned<u16>>,
    key_file: Spanned<PathBuf>,
    hmac_key_file: Spanned<PathBuf>,
    #[serde(default)]
    sources: Vec<IpNet>,
    open_ports: Option<Spanned<Vec<PortRange>>>,
    #[serde(default, deserialize_with = "optional_duration")]
    max_timeout: Option<Duration>,
    expires: Option<Spanned<String>>,
    #[serde(default)]
    require_source_address: bool,
}

impl RawSpa {
    /// Reads the users of `users_dir`, one per `*.toml` file, in name
    /// order; errors name the file they are in.
    pub(crate) fn read_users_dir(
        &mut self,
        errors: &ErrorContext,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let Some(dir) = &self.users_dir else {
            return Ok(());
        };
        let path = errors.relative_path(dir.get_ref());
        let listing = std::fs::read_dir(&path).map_err(|e| {
            let message = format!("{}: {e}", path.display());
            errors.spanned(dir, key("spa.users_dir"), message)
        })?;
        let mut files: Vec<PathBuf> = listing
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|file| file.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let user = ErrorContext {
                text: &text,
                path: &path,
            }
            .deserialize(&text)?;
            self.dir_users.push(UserFile { path, text, user });
        }
        Ok(())
    }

    /// Every user, inline then from `users_dir`: the user, the context its
    /// errors are told in, and its key (`policy[0].spa.user[1]`, or empty
    /// in a file of its own).
    pub(crate) fn users<'a>(
        &'a self,
        errors: &'a ErrorContext<'a>,
        key: &'a dyn Fn(&str) -> String,
    ) -> impl Iterator<Item = (&'a RawUser, ErrorContext<'a>, String)> {
        let inline = self.users.iter().enumerate().map(move |(i, user)| {
            let context = ErrorContext {
                text: errors.text,
                path: errors.path,
            };
            (user, context, key(&format!("spa.user[{i}]")))
        });
        let files = self.dir_users.iter().map(|file| {
            let context = ErrorContext {
                text: &file.text,
                path: &file.path,
            };
            (&file.user, context, String::new())
        });
        inline.chain(files)
    }

    pub(crate) fn port(&self) -> &Spanned<u16> {
        &self.port
    }

    /// The settings, with every user read. `open_ports` are the policy's.
    pub(crate) fn read(
        &self,
        open_ports: &[PortRange],
        errors: &ErrorContext,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Spa, ConfigError> {
        if *self.port.get_ref() == 0 {
            let message = "port 0 cannot receive packets".to_owned();
            return Err(errors.spanned(&self.port, key("spa.port"), message));
        }
        for (value, name, range) in [
            (&self.max_candidates, "spa.max_candidates", 1..=4096),
            (&self.replay_cache, "spa.replay_cache", 16..=1 << 24),
        ] {
            if !range.contains(value.get_ref()) {
                let message = format!(
                    "{} is outside {}..{}",
                    value.get_ref(),
                    range.start(),
                    range.end()
                );
                return Err(errors.spanned(value, key(name), message));
            }
        }
        let mut users = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        for (raw, context, user_key) in self.users(errors, key) {
            let user = raw.read(open_ports, &context, &user_key)?;
            let here = context.path.display().to_string();
            if let Some(first) = seen.insert(user.name.clone(), here) {
                let message = format!("user \"{}\" is already given in {first}", user.name);
                return Err(context.spanned(&raw.name, field(&user_key, "name"), message));
            }
            users.push(user);
        }
        Ok(Spa {
            port: *self.port.get_ref(),
            max_age: self.max_age,
            max_candidates: *self.max_candidates.get_ref(),
            replay_cache: *self.replay_cache.get_ref(),
            users,
        })
    }
}

/// `KEY.FIELD`, or `FIELD` alone for a user in a file of its own.
pub(crate) fn field(key: &str, field: &str) -> String {
    match key {
        "" => field.to_owned(),
        key => format!("{key}.{field}"),
    }
}

impl RawUser {
    fn read(
        &self,
        policy_ports: &[PortRange],
        errors: &ErrorContext,
        key: &str,
    ) -> Result<SpaUser, ConfigError> {
        let key = |name: &str| field(key, name);
        let name = self.name.get_ref();
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_graphic())
            || name.contains(':')
        {
            let message =
                format!("user name \"{name}\" must be 1 to 64 printable characters without ':'");
            return Err(errors.spanned(&self.name, key("name"), message));
        }
        let keys = Keys::load(
            &errors.relative_path(self.key_file.get_ref()),
            &errors.relative_path(self.hmac_key_file.get_ref()),
        )
        .map_err(|e| errors.spanned(&self.key_file, key("key_file"), e.to_string()))?;
        let open_ports = self.open_ports.as_ref();
        for range in open_ports.into_iter().flat_map(|ports| ports.get_ref()) {
            let within =
                |entry: &PortRange| entry.contains(range.first()) && entry.contains(range.last());
            if let (false, Some(ports)) = (policy_ports.iter().any(within), open_ports) {
                let message = format!("{range} is not among the policy's open_ports");
                return Err(errors.spanned(ports, key("open_ports"), message));
            }
        }
        let expires = self
            .expires
            .as_ref()
            .map(|text| {
                parse_date(text.get_ref()).ok_or_else(|| {
                    let message = format!(
                        "\"{}\" is not a date such as \"2027-01-31\"",
                        text.get_ref()
                    );
                    errors.spanned(text, key("expires"), message)
                })
            })
            .transpose()?;
        Ok(SpaUser {
            name: name.clone(),
            keys,
            sources: self.sources.iter().map(IpNet::trunc).collect(),
            open_ports: open_ports.map(|p| p.get_ref().clone()).unwrap_or_default(),
            max_timeout: self.max_timeout,
            expires,
            require_source_address: self.require_source_address,
            port: self.port.as_ref().map(|p| *p.get_ref()),
        })
    }
}

/// `2027-01-31` (UTC midnight starting that day), as Unix seconds.
fn parse_date(text: &str) -> Option<u64> {
    let at: SystemTime = humantime::parse_rfc3339(&format!("{text}T00:00:00Z")).ok()?;
    Some(at.duration_since(UNIX_EPOCH).ok()?.as_secs())
}
