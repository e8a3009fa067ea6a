//! The client configuration, `~/.config/knockq/client.toml`: named profiles,
//! each a host and how to knock it.
//!
//! ```toml
//! [profile.myserver]
//! host = "gate.example.org"
//! sequence = [1111, 2222]
//! close_port = 3333
//! port = 22
//!
//! [profile.spa]
//! host = "gate.example.org"
//! port = 22
//! [profile.spa.spa]
//! user = "alice"
//! key_file = "alice.key"
//! hmac_key_file = "alice.hmac"
//! access = [22]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::spa::{Source, SpaProfile};
use crate::config::{ConfigError, ErrorContext, Knock, RawRotating};
use crate::flow::FlowPort;
use crate::spa::Keys;

/// One way to knock one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub host: String,
    /// The gate's policy name, which rotating sequences are derived from.
    pub policy: String,
    /// Ports to knock; `None` for a profile that sends only SPA.
    pub knock: Option<Knock>,
    /// A single packet authorization datagram, sent before any knock.
    pub spa: Option<SpaProfile>,
    pub close_port: Option<FlowPort>,
    /// The port `knockq connect` connects to when none is given.
    pub port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientConfig {
    #[serde(default)]
    profile: BTreeMap<String, RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    host: String,
    policy: Option<String>,
    sequence: Option<Spanned<Vec<FlowPort>>>,
    rotating: Option<Spanned<RawRotating>>,
    spa: Option<Spanned<RawSpaProfile>>,
    close_port: Option<FlowPort>,
    port: Option<FlowPort>,
}

/// `[profile.NAME.spa]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpaProfile {
    user: Spanned<String>,
    key_file: Spanned<PathBuf>,
    hmac_key_file: Spanned<PathBuf>,
    access: Spanned<Vec<FlowPort>>,
    #[serde(default = "default_source")]
    source: Spanned<String>,
    #[serde(default = "default_spa_port")]
    port: u16,
    #[serde(default, deserialize_with = "crate::config::optional_duration")]
    timeout: Option<std::time::Duration>,
}

fn default_source() -> Spanned<String> {
    Spanned::new(0..0, "auto".to_owned())
}

fn default_spa_port() -> u16 {
    crate::spa::DEFAULT_PORT
}

impl RawSpaProfile {
    fn read(
        &self,
        errors: &ErrorContext,
        key: &dyn Fn(&str) -> String,
    ) -> Result<SpaProfile, ConfigError> {
        let keys = Keys::load(
            &errors.relative_path(self.key_file.get_ref()),
            &errors.relative_path(self.hmac_key_file.get_ref()),
        )
        .map_err(|e| errors.spanned(&self.key_file, key("spa.key_file"), e.to_string()))?;
        if self.access.get_ref().is_empty() {
            let message = "give the ports to open, such as [22]".to_owned();
            return Err(errors.spanned(&self.access, key("spa.access"), message));
        }
        let source = Source::parse(self.source.get_ref())
            .map_err(|message| errors.spanned(&self.source, key("spa.source"), message))?;
        Ok(SpaProfile {
            user: self.user.get_ref().clone(),
            keys,
            access: self.access.get_ref().clone(),
            source,
            port: self.port,
            timeout: self.timeout,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: no profile \"{name}\"{}", path.display(), Known(known))]
    Unknown {
        path: PathBuf,
        name: String,
        known: Vec<String>,
    },
}

struct Known<'a>(&'a [String]);

impl std::fmt::Display for Known<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            [] => f.write_str(" (it has none)"),
            known => write!(f, " (it has: {})", known.join(", ")),
        }
    }
}

/// `$XDG_CONFIG_HOME/knockq/client.toml`, else `~/.config/knockq/client.toml`.
pub fn default_path() -> PathBuf {
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".config")
        });
    config_home.join("knockq").join("client.toml")
}

/// Reads profile `name` from the client configuration at `path`. The whole
/// file is validated, so a mistake in any profile is reported at once.
pub fn load(path: &Path, name: &str) -> Result<Profile, ProfileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let errors = ErrorContext { text: &text, path };
    let raw: RawClientConfig = errors.deserialize(&text)?;
    let known: Vec<String> = raw.profile.keys().cloned().collect();
    let mut found = None;
    for (profile_name, profile) in raw.profile {
        let checked = profile.validate(&profile_name, &errors)?;
        if profile_name == name {
            found = Some(checked);
        }
    }
    found.ok_or_else(|| ProfileError::Unknown {
        path: path.to_owned(),
        name: name.to_owned(),
        known,
    })
}

impl RawProfile {
    fn validate(self, name: &str, errors: &ErrorContext) -> Result<Profile, ConfigError> {
        let key = |field: &str| format!("profile.{name}.{field}");
        let spa = self
            .spa
            .as_ref()
            .map(|spa| spa.get_ref().read(errors, &key))
            .transpose()?;
        let knock = match (self.sequence, &self.rotating) {
            (Some(sequence), None) if sequence.get_ref().is_empty() => {
                let message = "the sequence is empty".to_owned();
                return Err(errors.spanned(&sequence, key("sequence"), message));
            }
            (Some(sequence), None) => Some(Knock::Fixed(sequence.into_inner())),
            (None, Some(rotating)) => {
                crate::engine::check_rotating(rotating.get_ref(), errors, &key)?;
                Some(Knock::Rotating(rotating.get_ref().read(errors, &key)?))
            }
            (Some(sequence), Some(_)) => {
                let message = "give either sequence or a rotating table, not both".to_owned();
                return Err(errors.spanned(&sequence, key("sequence"), message));
            }
            (None, None) if spa.is_some() => None,
            (None, None) => {
                let message =
                    "no knock: give a sequence, a rotating table or an spa table".to_owned();
                return Err(errors.at(None, key("sequence"), &message));
            }
        };
        Ok(Profile {
            name: name.to_owned(),
            host: self.host,
            policy: self.policy.unwrap_or_else(|| name.to_owned()),
            knock,
            spa,
            close_port: self.close_port,
            port: self.port.map(FlowPort::number),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("client.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn error(text: &str, name: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), text);
        let err = load(&path, name).unwrap_err().to_string();
        err.replace(&format!("{}/", dir.path().display()), "")
    }

    const PROFILES: &str = r#"
[profile.web]
host = "gate.example.org"
sequence = [1111, 2222]
close_port = 3333
port = 22

[profile.ops]
host = "10.0.0.1"
policy = "operations"
[profile.ops.rotating]
secret_file = "ops.key"
length = 4
period = "1m"
ports = "20000-29999"
"#;

    #[test]
    fn profiles_load_with_their_knock() {
        let dir = tempfile::tempdir().unwrap();
        crate::rotating::keygen(&dir.path().join("ops.key")).unwrap();
        let path = write(dir.path(), PROFILES);
        let web = load(&path, "web").unwrap();
        assert_eq!(web.host, "gate.example.org");
        assert_eq!(web.policy, "web");
        assert_eq!(
            web.knock,
            Some(Knock::Fixed(vec![FlowPort::tcp(1111), FlowPort::tcp(2222)]))
        );
        assert_eq!(
            (web.close_port, web.port),
            (Some(FlowPort::tcp(3333)), Some(22))
        );
        let ops = load(&path, "ops").unwrap();
        assert_eq!(ops.policy, "operations");
        assert_eq!(
            ops.knock.unwrap().describe(),
            "rotating: 4 ports of 20000-29999 every 1m"
        );
    }

    #[test]
    fn bad_profiles_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        crate::rotating::keygen(&dir.path().join("ops.key")).unwrap();
        let path = write(dir.path(), PROFILES);
        let unknown = load(&path, "db").unwrap_err().to_string();
        assert!(
            unknown.ends_with("client.toml: no profile \"db\" (it has: ops, web)"),
            "{unknown}"
        );
        assert_eq!(
            error(
                "[profile.web]\nhost = \"h\"\nsequence = [1111]\ncolor = 1\n",
                "web"
            ),
            "client.toml:4: profile.web.color: unknown field `color`, expected one of \
             `host`, `policy`, `sequence`, `rotating`, `spa`, `close_port`, `port`"
        );
        assert_eq!(
            error("[profile.web]\nhost = \"h\"\n", "web"),
            "client.toml: profile.web.sequence: no knock: give a sequence, a rotating table or an spa table"
        );
        assert_eq!(
            error("[profile.web]\nhost = \"h\"\nsequence = [0]\n", "web"),
            "client.toml:3: profile.web.sequence[0]: port 0 is outside 1..65535"
        );
        let broken = error("[profile.web\n", "web");
        assert!(
            broken.starts_with("client.toml:1: ") && !broken.contains('\n'),
            "{broken}"
        );
        let missing = error(
            "[profile.ops]\nhost = \"h\"\n[profile.ops.rotating]\nsecret_file = \"none.key\"\nports = \"20000-29999\"\n",
            "ops",
        );
        assert!(
            missing.starts_with("client.toml:4: profile.ops.rotating.secret_file: secret file "),
            "{missing}"
        );
    }

    #[test]
    fn an_spa_profile_loads_its_keys_and_source() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        crate::spa::Keys::generate(&dir.path().join("a.key"), &dir.path().join("a.hmac")).unwrap();
        let text =
            "[profile.spa]\nhost = \"gate\"\nport = 22\n[profile.spa.spa]\nuser = \"alice\"\n\
                    key_file = \"a.key\"\nhmac_key_file = \"a.hmac\"\naccess = [22, \"53/udp\"]\n";
        let path = write(
            dir.path(),
            &format!("{text}source = \"0.0.0.0\"\ntimeout = \"5m\"\n"),
        );
        let profile = load(&path, "spa").unwrap();
        assert_eq!(profile.knock, None);
        let spa = profile.spa.unwrap();
        assert_eq!(spa.user, "alice");
        assert_eq!(spa.access, vec![FlowPort::tcp(22), FlowPort::udp(53)]);
        assert_eq!(spa.source, Source::Any);
        assert_eq!(spa.port, crate::spa::DEFAULT_PORT);
        assert_eq!(spa.timeout, Some(std::time::Duration::from_secs(300)));
        let path = write(dir.path(), &format!("{text}source = \"here\"\n"));
        let err = load(&path, "spa").unwrap_err().to_string();
        assert!(
            err.ends_with("client.toml:9: profile.spa.spa.source: source \"here\" is not \"auto\", \"0.0.0.0\" or an address"),
            "{err}"
        );
        std::fs::set_permissions(
            dir.path().join("a.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let path = write(dir.path(), text);
        let err = load(&path, "spa").unwrap_err().to_string();
        assert!(
            err.contains("profile.spa.spa.key_file: secret file"),
            "{err}"
        );
    }
}
