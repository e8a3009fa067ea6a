//! Exit codes, in one place (sysexits-style where one fits).

use std::io;
use std::process::ExitCode;

use crate::client::ClientError;
use crate::config::ConfigError;
use crate::daemon::DaemonError;
use crate::simulate::capture::CaptureError;

/// Bad configuration or usage: nothing was started. clap uses 2 for usage too.
pub const CONFIG: u8 = 2;
/// Runtime failure.
pub const FAILURE: u8 = 1;
/// A capture that cannot be read as one (EX_DATAERR).
pub const BAD_CAPTURE: u8 = 65;
/// Missing privilege (CAP_NET_ADMIN) to bind a queue.
pub const NO_PERMISSION: u8 = 77;
/// The client cannot resolve the gate's host name (EX_NOHOST).
pub const NO_HOST: u8 = 68;
/// The client cannot reach the gate or the port behind it (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;

pub fn code_for(err: &anyhow::Error) -> ExitCode {
    let code = if err.downcast_ref::<ConfigError>().is_some() {
        CONFIG
    } else if let Some(client) = err.downcast_ref::<ClientError>() {
        match client {
            ClientError::Profile(_) | ClientError::Usage(_) => CONFIG,
            ClientError::Resolve { .. } => NO_HOST,
            ClientError::Knock { .. } | ClientError::Connect { .. } => UNAVAILABLE,
            ClientError::Relay(_) => FAILURE,
        }
    } else if err.downcast_ref::<CaptureError>().is_some() {
        BAD_CAPTURE
    } else if let Some(DaemonError::Bind(bind)) = err.downcast_ref::<DaemonError>() {
        if bind.source.kind() == io::ErrorKind::PermissionDenied {
            NO_PERMISSION
        } else {
            FAILURE
        }
    } else {
        FAILURE
    };
    ExitCode::from(code)
}
