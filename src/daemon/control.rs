//! The control socket: a Unix socket, mode 0600, answering one JSON request
//! per line (see [`crate::control`]). Only root and the daemon's own user may
//! use it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::events::EventReport;
use crate::control::{self, Response, MAX_REQUEST_BYTES};
use crate::engine::Engine;
use crate::listeners::{Clock, Nodes};

/// How long a client may take to send a request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds the socket, replacing a stale one. Must run before the daemon
    /// starts other threads: it narrows the process umask for the bind so
    /// the socket never exists with a wider mode.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another knockq is answering on it",
                ));
            }
            std::fs::remove_file(path)?;
        }
        // SAFETY: umask only swaps the process's file mode mask.
        let previous = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(previous) };
        Ok(ControlSocket {
            listener: listener?,
            path: path.to_owned(),
        })
    }

    /// Answers clients one at a time on a thread of its own, for the life of
    /// the process.
    pub fn serve(
        self,
        engine: Arc<Engine>,
        nodes: Arc<Nodes>,
        clock: Clock,
        mut report: EventReport,
    ) -> io::Result<()> {
        thread::Builder::new()
            .name("knockq-control".into())
            .spawn(move || {
                let mut events = Vec::new();
                for stream in self.listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let served =
                        serve_client(&stream, &engine, &nodes, clock, &mut report, &mut events);
                    if let Err(e) = served {
                        debug!("control client: {e}");
                    }
                }
            })?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn serve_client(
    stream: &UnixStream,
    engine: &Engine,
    nodes: &Nodes,
    clock: Clock,
    report: &mut EventReport,
    events: &mut Vec<crate::engine::Event>,
) -> io::Result<()> {
    let mut writer = stream;
    let uid = peer_uid(stream)?;
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if uid != 0 && uid != own {
        warn!(
            uid,
            "control socket: refused a client that is neither root nor the daemon's user"
        );
        let refusal = Response::Error {
            error: "permission denied".into(),
        };
        return writeln!(writer, "{}", serde_json::to_string(&refusal)?);
    }
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let read = (&mut reader).take(MAX_REQUEST_BYTES).read_line(&mut line)?;
        if read == 0 {
            return Ok(());
        }
        let response = if !line.ends_with('\n') && read as u64 == MAX_REQUEST_BYTES {
            Response::Error {
                error: format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            }
        } else {
            control::answer(engine, nodes, line.trim_end(), clock.now(), events)
        };
        report.publish(engine, events, Instant::now());
        writeln!(writer, "{}", serde_json::to_string(&response)?)?;
        if matches!(response, Response::Error { .. }) && !line.ends_with('\n') {
            return Ok(());
        }
    }
}

fn peer_uid(stream: &UnixStream) -> io::Result<libc::uid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live and describe a ucred-sized buffer.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}
