//! knockq: a port-knocking gate. The kernel queues each NEW TCP SYN it did
//! not accept already; the daemon decides each one with a per-source knock
//! state machine and answers accept or reject.
//!
//! The modules are layers, each naming only those listed before it
//! (`tests/layers.rs` holds them to it):
//!
//! - [`flow`]: the port a new flow is for, the one type every layer names.
//! - [`rotating`]: rotating knock sequences derived from a shared secret.
//! - [`spa`]: single packet authorization in fwknop's wire format.
//! - [`config`]: the TOML configuration: what the file says.
//! - [`engine`]: the pure state machine (no I/O; the clock is an argument),
//!   and what a configuration's policies mean.
//! - [`packet`]: packet bytes to the facts the engine needs.
//! - [`script`]: script policies: knock logic in sandboxed Luau.
//! - [`listeners`]: grant events and what listens to them; node names, the clock.
//! - [`hooks`]: commands run when grants open and end.
//! - [`cluster`]: grants and spent windows shared by a fleet through etcd.
//! - [`loader`]: a configuration read and checked whole (config, engine, scripts).
//! - [`firewall`]: the rules that feed the queue, as iptables or nft text.
//! - [`offload`]: `[rules] offload`: the kernel sets kept equal to the grants.
//! - [`control`]: the control protocol, both sides.
//! - [`simulate`]: the engine replayed over captures and generated sweeps.
//! - [`client`]: `knockq knock` and `knockq connect`, the knock client.
//! - [`daemon`]: the NFQUEUE workers around the engine, composing the rest.
//! - [`cli`]: the `knockq` command line.
//! - [`fuzzing`]: the parsers of untrusted bytes as the fuzz targets enter them.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod firewall;
pub mod flow;
pub mod fuzzing;
pub mod hooks;
pub mod listeners;
pub mod loader;
pub mod offload;
pub mod packet;
pub mod rotating;
pub mod script;
pub mod simulate;
pub mod spa;
