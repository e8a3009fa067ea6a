//! Exit codes, in one place (sysexits-style where one fits).

use std::io;
use std::process::ExitCode;

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

pub fn code_for(err: &anyhow::Error) -> ExitCode {
    let code = if err.downcast_ref::<ConfigError>().is_some() {
        CONFIG
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
