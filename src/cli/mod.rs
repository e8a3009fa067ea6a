//! The command line: argument definitions, dispatch, and the one place where
//! errors become messages and exit codes.

mod check;
pub mod exit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;
use crate::daemon;
use crate::firewall::{Backend, Ruleset};

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
    },
    /// Print the firewall rules that send SYNs to the gate.
    Rules {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = Backend::Nft)]
        backend: Backend,
    },
    /// Validate a configuration and summarise its policies.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
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
        Command::Run { config } => {
            init_logging();
            let config = config::load(&config)?;
            daemon::run(&config)?;
        }
        Command::Rules { config, backend } => {
            let config = config::load(&config)?;
            print!("{}", Ruleset::from_config(&config).render(backend));
        }
        Command::Check { config: path } => {
            let config = config::load(&path)?;
            print!("{}", check::summary(&path, &config));
        }
    }
    Ok(())
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KNOCKQ_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
