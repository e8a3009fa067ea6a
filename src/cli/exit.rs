//! Exit codes, in one place (sysexits-style where one fits).

use std::io;
use std::process::ExitCode;

use crate::config::ConfigError;
use crate::daemon::DaemonError;

/// Bad configuration or usage: nothing was started. clap uses 2 for usage too.
pub const CONFIG: u8 = 2;
/// Runtime failure.
pub const FAILURE: u8 = 1;
/// Missing privilege (CAP_NET_ADMIN) to bind a queue.
pub const NO_PERMISSION: u8 = 77;

pub fn code_for(err: &anyhow::Error) -> ExitCode {
    let code = if err.downcast_ref::<ConfigError>().is_some() {
        CONFIG
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
