//! The command line: argument definitions, dispatch, and the one place where
//! errors become messages and exit codes.

pub mod check;
mod client;
mod control;
pub mod exit;
mod generate;
mod simulate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::DEFAULT_CONTROL_SOCKET;
use crate::daemon;
use crate::firewall::load::{self, Firewall};
use crate::firewall::{Backend, Ruleset};
use crate::flow::FlowPort;
use crate::loader;

const DEFAULT_CONFIG: &str = "/etc/knockq/knockq.toml";

/// knockq: a port-knocking gate on NFQUEUE.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gate: decide every queued SYN until SIGINT or SIGTERM.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Serve metrics on this address instead of the configured one.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<SocketAddr>,
        /// Listen for control requests on this socket instead of the configured one.
        #[arg(long, value_name = "PATH")]
        control_socket: Option<PathBuf>,
        /// Save grants in this directory instead of the configured one.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Show the sources the gate tracks: knock progress and grants.
    Status {
        #[command(flatten)]
        socket: ControlSocketArg,
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Open a grant by hand, without knocking.
    Grant {
        source: IpAddr,
        #[arg(long)]
        policy: String,
        /// How long, such as 1h; without it, the policy's grant timeout.
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        #[command(flatten)]
        socket: ControlSocketArg,
    },
    /// Close a source's grants now.
    Revoke {
        source: IpAddr,
        /// Only this policy's grant.
        #[arg(long)]
        policy: Option<String>,
        #[command(flatten)]
        socket: ControlSocketArg,
    },
    /// Print the firewall rules that send SYNs to the gate, or load or
    /// remove them.
    Rules {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = RulesBackend::Auto)]
        backend: RulesBackend,
        /// Load the rules into the kernel as one change, keeping the host's
        /// own rules; loading again replaces them.
        #[arg(long, conflicts_with = "remove")]
        apply: bool,
        /// Remove exactly the rules --apply loaded (the configuration is not
        /// read: removal works whatever it has become).
        #[arg(long)]
        remove: bool,
    },
    /// Try configurations offline: replay a capture through the engine, or
    /// check whether full-range port sweeps would walk through a sequence.
    #[command(group = clap::ArgGroup::new("input").required(true).multiple(true).args(["pcap", "sweep"]))]
    Simulate {
        /// A configuration to try; give several to compare them side by side.
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
        /// A pcap or pcapng capture (Ethernet, Linux cooked or raw IP).
        #[arg(long, value_name = "CAPTURE")]
        pcap: Option<PathBuf>,
        /// Also sweep all 65535 ports in ascending, descending and random order.
        #[arg(long)]
        sweep: bool,
        /// Time between two probes of a sweep.
        #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
        sweep_interval: std::time::Duration,
        /// Only SYNs to this address count (default: every SYN in the capture).
        #[arg(long)]
        dst: Option<IpAddr>,
        #[arg(long, value_enum, default_value_t = simulate::Format::Text)]
        format: simulate::Format,
        /// List each source's state changes in order.
        #[arg(long)]
        timeline: bool,
        /// List every SYN's verdict in order.
        #[arg(long)]
        verdicts: bool,
    },
    /// Validate a configuration and summarise its policies.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Knock, in order: one TCP SYN per port, each after the last one's
    /// answer, or one datagram per UDP port (`2222/udp`), each followed by
    /// the --delay.
    Knock {
        /// The gate's host name or address [default: the profile's].
        host: Option<String>,
        /// The ports to knock, as 1111 or 2222/udp [default: the profile's sequence].
        #[arg(value_parser = FlowPort::parse)]
        ports: Vec<FlowPort>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Knock, connect, and relay stdin and stdout to the connection: an ssh
    /// ProxyCommand (`ProxyCommand knockq connect --profile NAME %h %p`).
    Connect {
        /// The host to connect to [default: the profile's].
        host: Option<String>,
        /// The port to connect to [default: the profile's].
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Knock these ports first, as 1111 or 2222/udp [default: the profile's sequence].
        #[arg(long, value_delimiter = ',', value_name = "PORT,...", value_parser = FlowPort::parse)]
        knock: Vec<FlowPort>,
        /// Knock the profile's close port when the connection ends.
        #[arg(long)]
        close: bool,
        /// Knock this port when the connection ends (no profile needed).
        #[arg(long, value_name = "PORT", value_parser = FlowPort::parse)]
        close_port: Option<FlowPort>,
        /// How long to keep trying to connect after knocking.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Write a new secret for rotating sequences (mode 0600; never
    /// overwrites), or with --spa USER the two SPA keys of USER into the
    /// directory FILE (default: here) as USER.key and USER.hmac.
    Keygen {
        #[arg(required_unless_present = "spa")]
        file: Option<PathBuf>,
        /// Write an SPA user's keys, and print the gate's and fwknop's stanzas.
        #[arg(long, value_name = "USER")]
        spa: Option<String>,
    },
    /// Write man pages or shell completions into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: generate::Generated,
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct ControlSocketArg {
    /// The daemon's control socket.
    #[arg(long = "control-socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    path: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RulesBackend {
    /// nft where the kernel can queue from nftables, else iptables and
    /// ip6tables; --remove removes knockq's rules from both.
    Auto,
    /// IPv4 and IPv6 rules for nft -f, in table inet knockq.
    Nft,
    /// IPv4 rules for iptables-restore; --apply and --remove handle the
    /// IPv6 rules through ip6tables as well.
    Iptables,
    /// IPv6 rules for ip6tables-restore (printed only).
    Ip6tables,
    /// With [rules] offload, the sets the iptables rules use, for ipset
    /// restore (printed only: --backend iptables loads them).
    Ipset,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line per event: `event=grant src=… policy=…`.
    Text,
    /// One JSON object per line.
    Json,
}

pub fn main() -> ExitCode {
    // --help, --version and usage errors exit here, before any set-up.
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("knockq: {err:#}");
            exit::code_for(&err)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            metrics_listen,
            control_socket,
            state_dir,
            log_format,
        } => {
            init_logging(log_format);
            // The command line wins over the file, on reload too.
            let load = || {
                loader::load(&config).map(|mut loaded| {
                    if let Some(listen) = metrics_listen {
                        loaded.metrics.enabled = true;
                        loaded.metrics.listen = listen;
                    }
                    if let Some(socket) = &control_socket {
                        loaded.control.socket = socket.clone();
                    }
                    if let Some(dir) = &state_dir {
                        loaded.state.dir = dir.clone();
                    }
                    loaded
                })
            };
            daemon::run(load()?, load)?;
        }
        Command::Status { socket, json } => print!("{}", control::status(&socket.path, json)?),
        Command::Grant {
            source,
            policy,
            duration,
            socket,
        } => print!(
            "{}",
            control::grant(&socket.path, source, policy, duration)?
        ),
        Command::Revoke {
            source,
            policy,
            socket,
        } => {
            print!("{}", control::revoke(&socket.path, source, policy)?)
        }
        Command::Rules {
            config,
            backend,
            apply,
            remove,
        } => rules(&config, backend, apply, remove)?,
        Command::Simulate {
            config,
            pcap,
            sweep,
            sweep_interval,
            dst,
            format,
            timeline,
            verdicts,
        } => print!(
            "{}",
            simulate::run(simulate::Simulation {
                configs: config,
                pcap,
                sweep: sweep.then_some(sweep_interval),
                dst,
                format,
                timeline,
                verdicts,
            })?
        ),
        Command::Check { config: path } => {
            let config = loader::load(&path)?;
            print!("{}", check::summary(&path, &config));
        }
        Command::Knock {
            host,
            ports,
            client,
        } => client::knock(host, ports, &client)?,
        Command::Connect {
            host,
            port,
            knock,
            close,
            close_port,
            wait,
            client,
        } => client::connect(
            client::Connect {
                host,
                port,
                knock,
                close,
                close_port,
                patience: wait,
            },
            &client,
        )?,
        Command::Generate { what, dir } => {
            for file in generate::generate(what, Cli::command(), &dir)? {
                println!("{}", file.display());
            }
        }
        Command::Keygen {
            file,
            spa: Some(user),
        } => {
            let dir = file.unwrap_or_else(|| PathBuf::from("."));
            print!("{}", client::spa_keygen(&dir, &user)?);
        }
        Command::Keygen { file, spa: None } => {
            let file = file.expect("clap requires FILE without --spa");
            crate::rotating::keygen(&file)?;
            eprintln!(
                "knockq: wrote a new secret to {} (mode 0600); give the gate and each client a copy",
                file.display()
            );
        }
    }
    Ok(())
}

fn rules(config: &Path, backend: RulesBackend, apply: bool, remove: bool) -> anyhow::Result<()> {
    // What is loaded or removed: IPv6 goes with IPv4, so ip6tables alone is
    // only ever printed.
    let chosen = || match backend {
        RulesBackend::Auto => Firewall::detect(),
        RulesBackend::Nft => Firewall::Nft,
        RulesBackend::Iptables | RulesBackend::Ip6tables | RulesBackend::Ipset => {
            Firewall::Iptables
        }
    };
    if matches!(backend, RulesBackend::Ip6tables | RulesBackend::Ipset) && (apply || remove) {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--backend ip6tables and ipset only print: --backend iptables loads and removes the IPv6 rules and the ipsets too",
            )
            .exit();
    }
    if remove {
        let firewalls = match backend {
            RulesBackend::Auto => vec![Firewall::Nft, Firewall::Iptables],
            _ => vec![chosen()],
        };
        for firewall in firewalls {
            if load::remove(firewall)? {
                eprintln!("knockq: removed the {} rules", firewall.as_str());
            }
        }
        return Ok(());
    }
    let rules = Ruleset::from_config(&loader::load(config)?);
    if apply {
        let firewall = chosen();
        load::apply(&rules, firewall)?;
        eprintln!(
            "knockq: loaded the {} rules for {}",
            firewall.as_str(),
            config.display()
        );
        return Ok(());
    }
    let printed: &[Backend] = match backend {
        RulesBackend::Auto => match (chosen(), rules.offload()) {
            (Firewall::Iptables, Some(_)) => {
                &[Backend::Ipset, Backend::Iptables, Backend::Ip6tables]
            }
            (firewall, _) => firewall.backends(),
        },
        RulesBackend::Nft => &[Backend::Nft],
        RulesBackend::Iptables => &[Backend::Iptables],
        RulesBackend::Ip6tables => &[Backend::Ip6tables],
        RulesBackend::Ipset => &[Backend::Ipset],
    };
    for &backend in printed {
        print!("{}", rules.render(backend));
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // A bare level is knockq's own: the libraries under it (the etcd
    // client's HTTP/2 frames, the scrape server) stay at warnings. A full
    // directive such as "debug" with targets is taken as written.
    let directive = std::env::var("KNOCKQ_LOG").unwrap_or_else(|_| "info".to_owned());
    let directive = match directive.contains(['=', ',']) {
        true => directive,
        false => format!("warn,knockq={directive}"),
    };
    let filter =
        EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("warn,knockq=info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}
