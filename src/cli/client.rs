//! `knockq knock`, `knockq connect` and `knockq keygen`: the client side.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::client::knock::{self, Family, KnockOptions};
use crate::client::profile::{self, Profile};
use crate::client::{profile_sequence, relay, ClientError};
use crate::flow::FlowPort;

/// Options every client command takes.
#[derive(clap::Args)]
pub struct ClientArgs {
    /// Knock as this profile of the client configuration says.
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// The client configuration [default: ~/.config/knockq/client.toml].
    #[arg(long, value_name = "FILE")]
    client_config: Option<PathBuf>,
    /// How long to wait for the gate's answer to each knock.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Pause between knocks.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Print each knock and the gate's answer on stderr.
    #[arg(long, short)]
    verbose: bool,
    /// Knock and connect over IPv4 only.
    #[arg(short = '4', conflicts_with = "ipv6")]
    ipv4: bool,
    /// Knock and connect over IPv6 only.
    #[arg(short = '6')]
    ipv6: bool,
}

impl ClientArgs {
    fn profile(&self) -> Result<Option<Profile>, ClientError> {
        let Some(name) = &self.profile else {
            return Ok(None);
        };
        let path = self
            .client_config
            .clone()
            .unwrap_or_else(profile::default_path);
        Ok(Some(profile::load(&path, name)?))
    }

    /// The gate's address, of the family asked for: knocks and the
    /// connection after them go to this one address.
    fn resolve(&self, host: &str) -> Result<IpAddr, ClientError> {
        let family = match (self.ipv4, self.ipv6) {
            (true, _) => Some(Family::V4),
            (_, true) => Some(Family::V6),
            _ => None,
        };
        knock::resolve(host, family)
    }

    fn options(&self) -> KnockOptions {
        KnockOptions {
            timeout: self.timeout,
            delay: self.delay,
        }
    }

    /// Sends the profile's SPA datagram to `addr`, if it has one.
    fn send_spa(
        &self,
        profile: Option<&Profile>,
        host: &str,
        addr: IpAddr,
    ) -> Result<(), ClientError> {
        let Some(spa) = profile.and_then(|p| p.spa.as_ref()) else {
            return Ok(());
        };
        crate::client::spa::send(addr, spa)?;
        if self.verbose {
            eprintln!(
                "knockq: sent {host} ({addr}) an SPA packet for {} to port {}/udp",
                spa.user, spa.port
            );
        }
        Ok(())
    }

    /// Knocks `ports` at `addr`, saying what happened if asked to.
    fn send(&self, host: &str, addr: IpAddr, ports: &[FlowPort]) -> Result<(), ClientError> {
        knock::send(addr, ports, self.options(), |port, answer| {
            if self.verbose {
                eprintln!(
                    "knockq: knocked {host} ({addr}) port {port}: {}",
                    answer.as_str()
                );
            }
        })
    }
}

fn usage(message: &str) -> ClientError {
    ClientError::Usage(message.to_owned())
}

/// The host named on the command line, else the profile's.
fn host_of(host: Option<String>, profile: Option<&Profile>) -> Result<String, ClientError> {
    host.or_else(|| profile.map(|p| p.host.clone()))
        .ok_or_else(|| usage("give a HOST, or a --profile that names one"))
}

pub fn knock(
    host: Option<String>,
    ports: Vec<FlowPort>,
    args: &ClientArgs,
) -> Result<(), ClientError> {
    let profile = args.profile()?;
    let host = host_of(host, profile.as_ref())?;
    let ports = match (&profile, ports.is_empty()) {
        (_, false) => ports,
        (Some(profile), true) => profile_sequence(profile),
        (None, true) => return Err(usage("give the ports to knock, or a --profile")),
    };
    let addr = args.resolve(&host)?;
    args.send_spa(profile.as_ref(), &host, addr)?;
    args.send(&host, addr, &ports)
}

pub struct Connect {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub knock: Vec<FlowPort>,
    pub close: bool,
    /// Overrides the profile's close port; implies `close`.
    pub close_port: Option<FlowPort>,
    pub patience: Duration,
}

pub fn connect(request: Connect, args: &ClientArgs) -> Result<(), ClientError> {
    let profile = args.profile()?;
    let host = host_of(request.host, profile.as_ref())?;
    let port = request
        .port
        .or_else(|| profile.as_ref().and_then(|p| p.port))
        .ok_or_else(|| usage("give a PORT, or a --profile with a port"))?;
    let close_port = match (request.close_port, request.close) {
        (Some(port), _) => Some(port),
        (None, false) => None,
        (None, true) => Some(profile.as_ref().and_then(|p| p.close_port).ok_or_else(|| {
            usage("--close needs --close-port PORT, or a --profile with a close_port")
        })?),
    };
    let knock = match (&profile, request.knock.is_empty()) {
        (_, false) => request.knock,
        (Some(profile), true) => profile_sequence(profile),
        (None, true) => Vec::new(),
    };
    let addr = args.resolve(&host)?;
    // The gate decides the datagram before the connection's SYN arrives.
    args.send_spa(profile.as_ref(), &host, addr)?;
    args.send(&host, addr, &knock)?;
    let stream = relay::connect(addr, port, args.timeout, request.patience)?;
    if close_port.is_some() {
        // ssh hangs up its ProxyCommand as it exits: live on to close.
        let _ = signal_hook::flag::register(
            signal_hook::consts::SIGHUP,
            Arc::new(AtomicBool::new(false)),
        );
    }
    let relayed = relay::relay(stream).map_err(ClientError::Relay);
    if let Some(close_port) = close_port {
        args.send(&host, addr, &[close_port])?;
    }
    relayed
}

/// Writes `user`'s two SPA key files into `dir`; what to paste where: the
/// gate's user stanza, knockq's client profile, and `~/.fwknoprc`'s.
pub fn spa_keygen(dir: &std::path::Path, user: &str) -> anyhow::Result<String> {
    let key_file = dir.join(format!("{user}.key"));
    let hmac_file = dir.join(format!("{user}.hmac"));
    let (key, hmac) = crate::spa::Keys::generate(&key_file, &hmac_file)?;
    Ok(format!(
        "# wrote {key} and {hmac} (mode 0600)\n\
         \n\
         # The gate, in the [policy.spa] of its policy:\n\
         [[policy.spa.user]]\n\
         name = \"{user}\"\n\
         key_file = \"{key}\"\n\
         hmac_key_file = \"{hmac}\"\n\
         \n\
         # knockq's client, ~/.config/knockq/client.toml:\n\
         [profile.NAME.spa]\n\
         user = \"{user}\"\n\
         key_file = \"{key}\"\n\
         hmac_key_file = \"{hmac}\"\n\
         access = [22]\n\
         \n\
         # fwknop's client, ~/.fwknoprc:\n\
         [NAME]\n\
         SPA_SERVER          GATE\n\
         ACCESS              tcp/22\n\
         ALLOW_IP            source\n\
         SPOOF_USER          {user}\n\
         USE_HMAC            Y\n\
         KEY_BASE64          {key_base64}\n\
         HMAC_KEY_BASE64     {hmac_base64}\n",
        key = key_file.display(),
        hmac = hmac_file.display(),
        key_base64 = key,
        hmac_base64 = hmac,
    ))
}
