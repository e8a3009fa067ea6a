//! The file as written: serde shapes that refuse unknown keys and keep the
//! byte span of each value, and [`ErrorContext`], which turns a span into
//! `file:line: key: message`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::cluster::RawCluster;
use super::sections::{
    ControlConfig, HooksConfig, LimitsConfig, MetricsConfig, QueueConfig, RulesConfig, StateConfig,
    VerdictConfig,
};
use super::{ConfigError, Offline, Scope};
use crate::flow::{FlowPort, PortRange, Proto};
use crate::rotating::{Rotating, Secret};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) queue: QueueConfig,
    #[serde(default)]
    pub(crate) verdict: VerdictConfig,
    #[serde(default)]
    pub(crate) limits: LimitsConfig,
    #[serde(default)]
    pub(crate) metrics: MetricsConfig,
    #[serde(default)]
    pub(crate) control: ControlConfig,
    #[serde(default)]
    pub(crate) state: StateConfig,
    #[serde(default)]
    pub(crate) rules: RulesConfig,
    #[serde(default)]
    pub(crate) hooks: HooksConfig,
    pub(crate) cluster: Option<RawCluster>,
    #[serde(default, rename = "policy")]
    pub(crate) policies: Vec<RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub(crate) name: Spanned<String>,
    pub(crate) sequence: Option<Spanned<Vec<FlowPort>>>,
    pub(crate) rotating: Option<Spanned<RawRotating>>,
    pub(crate) script: Option<Spanned<RawScript>>,
    pub(crate) spa: Option<Spanned<super::RawSpa>>,
    #[serde(default = "default_step_timeout", deserialize_with = "duration")]
    pub(crate) step_timeout: Duration,
    pub(crate) open_ports: Spanned<Vec<PortRange>>,
    pub(crate) close_port: Option<Spanned<FlowPort>>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub(crate) grant_timeout: Option<Duration>,
    #[serde(default = "default_strict")]
    pub(crate) strict: bool,
    #[serde(default)]
    pub(crate) allow_weak_sequence: bool,
    pub(crate) on_grant: Option<Spanned<Vec<String>>>,
    pub(crate) on_revoke: Option<Spanned<Vec<String>>>,
    pub(crate) scope: Option<Spanned<Scope>>,
    pub(crate) offline: Option<Spanned<Offline>>,
}

/// `[policy.script]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScript {
    pub(crate) file: Spanned<PathBuf>,
    pub(crate) knock_ports: Spanned<Vec<PortRange>>,
    #[serde(default = "default_budget", deserialize_with = "duration")]
    pub(crate) budget: Duration,
    #[serde(default = "default_memory_mib")]
    pub(crate) memory_mib: Spanned<u32>,
    #[serde(default = "default_max_grant", deserialize_with = "duration")]
    pub(crate) max_grant: Duration,
    #[serde(default = "default_min_prefix_v4")]
    pub(crate) min_prefix_v4: Spanned<u8>,
    #[serde(default = "default_min_prefix_v6")]
    pub(crate) min_prefix_v6: Spanned<u8>,
    pub(crate) secret_file: Option<Spanned<PathBuf>>,
}

fn default_budget() -> Duration {
    Duration::from_millis(1)
}

fn default_memory_mib() -> Spanned<u32> {
    Spanned::new(0..0, 16)
}

fn default_max_grant() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_min_prefix_v4() -> Spanned<u8> {
    Spanned::new(0..0, 16)
}

fn default_min_prefix_v6() -> Spanned<u8> {
    Spanned::new(0..0, 48)
}

/// `[policy.rotating]`, also a client profile's `rotating` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRotating {
    pub(crate) secret_file: Spanned<PathBuf>,
    #[serde(default = "default_rotating_length")]
    pub(crate) length: Spanned<u8>,
    #[serde(default = "default_period", deserialize_with = "duration")]
    pub(crate) period: Duration,
    pub(crate) ports: Spanned<String>,
    /// The protocol of the range's ports.
    #[serde(default = "default_proto")]
    pub(crate) proto: Spanned<Proto>,
}

fn default_proto() -> Spanned<Proto> {
    Spanned::new(0..0, Proto::Tcp)
}

fn default_rotating_length() -> Spanned<u8> {
    Spanned::new(0..0, 3)
}

fn default_period() -> Duration {
    Duration::from_secs(30)
}

impl RawRotating {
    /// The range, as written.
    pub(crate) fn ports(
        &self,
        errors: &ErrorContext,
        key: &dyn Fn(&str) -> String,
    ) -> Result<PortRange, ConfigError> {
        let text = self.ports.get_ref();
        let ports = match text.contains('/') {
            true => Err(format!(
                "\"{text}\" names a protocol: a rotating range takes it from rotating.proto"
            )),
            false => PortRange::parse(text).map(|range| range.with_proto(*self.proto.get_ref())),
        };
        ports.map_err(|message| errors.spanned(&self.ports, key("rotating.ports"), message))
    }

    /// The settings, with the secret read; a relative `secret_file` is taken
    /// from the configuration file's directory. Their bounds are the
    /// engine's to check (`engine::check`).
    pub(crate) fn read(
        &self,
        errors: &ErrorContext,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Rotating, ConfigError> {
        let ports = self.ports(errors, key)?;
        let file = errors.relative_path(self.secret_file.get_ref());
        let secret = Secret::load(&file).map_err(|e| {
            errors.spanned(
                &self.secret_file,
                key("rotating.secret_file"),
                e.to_string(),
            )
        })?;
        Ok(Rotating {
            secret,
            length: *self.length.get_ref(),
            period: self.period,
            ports,
        })
    }
}

fn default_step_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_strict() -> bool {
    true
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    match humantime::parse_duration(&text) {
        Ok(d) if d.is_zero() => Err(serde::de::Error::custom(format!(
            "duration \"{text}\" must be longer than zero"
        ))),
        Ok(d) => Ok(d),
        Err(e) => Err(serde::de::Error::custom(format!(
            "invalid duration \"{text}\": {e} (examples: \"10s\", \"500ms\", \"8h\")"
        ))),
    }
}

pub(crate) fn optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// `policy[0].sequence[1]`, without the wrapper fields `Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key: k } if k.starts_with("$__") => {}
            Segment::Map { key: k } | Segment::Enum { variant: k } => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
            }
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Unknown => {}
        }
    }
    key
}

/// A TOML file being read: turns byte spans into `file:line: key: message`.
pub(crate) struct ErrorContext<'a> {
    pub(crate) text: &'a str,
    pub(crate) path: &'a Path,
}

impl ErrorContext<'_> {
    /// The file as `T`, refusing unknown keys, with the key of any error.
    pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(
        &self,
        text: &str,
    ) -> Result<T, ConfigError> {
        let document = toml::Deserializer::parse(text)
            .map_err(|e| self.at(e.span(), String::new(), e.message()))?;
        serde_path_to_error::deserialize(document)
            .map_err(|e| self.at(e.inner().span(), key_path(e.path()), e.inner().message()))
    }

    /// `path` as written in the file, relative to the file's directory.
    pub(crate) fn relative_path(&self, path: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    pub(crate) fn at(&self, span: Option<Range<usize>>, key: String, message: &str) -> ConfigError {
        let line = span.map(|span| {
            let start = span.start.min(self.text.len());
            self.text[..start].matches('\n').count() + 1
        });
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            key,
            message: message.to_owned(),
        }
    }

    pub(crate) fn spanned<T>(
        &self,
        value: &Spanned<T>,
        key: String,
        message: String,
    ) -> ConfigError {
        self.at(Some(value.span()), key, &message)
    }
}
