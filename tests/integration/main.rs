//! knockq's integration tests: the CLI, and the gate end to end on the real
//! kernel in network namespaces the tests create and delete.

mod cli;
mod client;
mod cluster;
mod deploy;
mod gate;
mod observe;
mod offload;
mod resilience;
mod rules;
mod scripts;
mod simulate;
mod spa;
mod udp;
mod util;
mod vm;
