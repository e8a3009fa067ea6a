//! knockq: a port-knocking gate. The kernel queues each NEW TCP SYN it did
//! not accept already; the daemon decides each one with a per-source knock
//! state machine and answers accept or reject.
//!
//! - [`engine`]: the pure state machine (no I/O; the clock is an argument).
//! - [`packet`]: packet bytes to the facts the engine needs.
//! - [`config`]: the TOML configuration and its validation.
//! - [`rotating`]: rotating knock sequences derived from a shared secret.
//! - [`script`]: script policies: knock logic in sandboxed Luau.
//! - [`hooks`]: commands run when grants open and end.
//! - [`cluster`]: grants and spent windows shared by a fleet through etcd.
//! - [`firewall`]: the rules that feed the queue, as iptables or nft text.
//! - [`daemon`]: the NFQUEUE workers around the engine, metrics, control socket.
//! - [`control`]: the control protocol, both sides.
//! - [`simulate`]: the engine replayed over captures and generated sweeps.
//! - [`client`]: `knockq knock` and `knockq connect`, the knock client.
//! - [`cli`]: the `knockq` command line.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod firewall;
pub mod hooks;
pub mod packet;
pub mod rotating;
pub mod script;
pub mod simulate;
