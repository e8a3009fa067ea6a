//! `[cluster]`: the etcd cluster a fleet of gates shares its grants and
//! spent windows through, and the policy settings that use it.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, ErrorContext};

/// Where a policy's grants hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// On this host alone.
    #[default]
    Host,
    /// On every node of the cluster.
    Cluster,
}

/// What a cluster policy's rotating knock does while etcd cannot be
/// reached to claim its window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offline {
    /// No grant: a window no node could claim might be spent elsewhere.
    #[default]
    Closed,
    /// The window is spent on this node alone, and the grant made.
    Local,
}

/// The etcd cluster, validated: TLS material read, node name known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub endpoints: Vec<String>,
    /// Every key knockq writes is under it; no trailing slash.
    pub prefix: String,
    /// This node's name, as other nodes see it.
    pub node: String,
    /// PEM: the CA that signed the members' certificates.
    pub ca: Option<Vec<u8>>,
    /// PEM: this node's client certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Grant changes waiting while etcd is unreachable, at most.
    pub backlog: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    endpoints: Spanned<Vec<String>>,
    #[serde(default = "default_prefix")]
    prefix: Spanned<String>,
    node: Option<Spanned<String>>,
    ca_file: Option<Spanned<PathBuf>>,
    cert_file: Option<Spanned<PathBuf>>,
    key_file: Option<Spanned<PathBuf>>,
    #[serde(default = "default_backlog")]
    backlog: Spanned<usize>,
}

fn default_prefix() -> Spanned<String> {
    Spanned::new(0..0, "/knockq".to_owned())
}

fn default_backlog() -> Spanned<usize> {
    Spanned::new(0..0, 10_000)
}

impl RawCluster {
    pub(super) fn validate(self, errors: &ErrorContext) -> Result<ClusterConfig, ConfigError> {
        let key = |field: &str| format!("cluster.{field}");
        let endpoints = self.endpoints.get_ref();
        let fail =
            |message: String| Err(errors.spanned(&self.endpoints, key("endpoints"), message));
        if endpoints.is_empty() {
            return fail("give at least one endpoint, such as \"https://10.0.0.5:2379\"".into());
        }
        let mut tls = false;
        for endpoint in endpoints {
            match endpoint.split_once("://") {
                Some(("https", rest)) if !rest.is_empty() => tls = true,
                Some(("http", rest)) if !rest.is_empty() => {}
                _ => {
                    return fail(format!(
                        "\"{endpoint}\" is not an endpoint such as \"https://10.0.0.5:2379\""
                    ))
                }
            }
        }
        if tls && endpoints.iter().any(|e| e.starts_with("http://")) {
            return fail("mix of http:// and https:// endpoints: use one or the other".into());
        }
        let prefix = self.prefix.get_ref();
        if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
            let message = format!("prefix \"{prefix}\" must start with '/' and not end with one");
            return Err(errors.spanned(&self.prefix, key("prefix"), message));
        }
        let node = match &self.node {
            Some(node) => node.get_ref().clone(),
            None => host_name().map_err(|e| {
                errors.at(None, key("node"), &format!("no node name given, and {e}"))
            })?,
        };
        if node.is_empty() || !node.chars().all(|c| c.is_ascii_graphic() && c != '/') {
            let message = format!("node name \"{node}\" must be printable, without '/' or spaces");
            return Err(match &self.node {
                Some(spanned) => errors.spanned(spanned, key("node"), message),
                None => errors.at(None, key("node"), &message),
            });
        }
        let read = |file: &Spanned<PathBuf>, field: &str| {
            let path = errors.relative_path(file.get_ref());
            std::fs::read(&path)
                .map_err(|e| errors.spanned(file, key(field), format!("{}: {e}", path.display())))
        };
        let ca = self
            .ca_file
            .as_ref()
            .map(|f| read(f, "ca_file"))
            .transpose()?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key_file)) => {
                Some((read(cert, "cert_file")?, read(key_file, "key_file")?))
            }
            (None, None) => None,
            (Some(cert), None) => {
                let message = "cert_file needs key_file".to_owned();
                return Err(errors.spanned(cert, key("cert_file"), message));
            }
            (None, Some(key_file)) => {
                let message = "key_file needs cert_file".to_owned();
                return Err(errors.spanned(key_file, key("key_file"), message));
            }
        };
        if (ca.is_some() || identity.is_some()) && !tls {
            return fail("TLS files are given, but the endpoints are http://: use https://".into());
        }
        if tls && ca.is_none() {
            let message = "https:// endpoints need ca_file, the CA that signed etcd's certificates";
            return Err(errors.at(None, key("ca_file"), message));
        }
        let backlog = *self.backlog.get_ref();
        if !(1..=1_000_000).contains(&backlog) {
            let message = format!("backlog {backlog} is outside 1..1000000");
            return Err(errors.spanned(&self.backlog, key("backlog"), message));
        }
        Ok(ClusterConfig {
            endpoints: endpoints.clone(),
            prefix: prefix.clone(),
            node,
            ca,
            identity,
            backlog,
        })
    }
}

fn host_name() -> Result<String, String> {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes a
    // NUL-terminated name into it, truncated if need be.
    let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len() - 1) };
    if rc != 0 {
        return Err(format!(
            "the host name cannot be read: {}",
            std::io::Error::last_os_error()
        ));
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}
