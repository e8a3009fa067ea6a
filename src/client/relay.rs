//! `knockq connect`: reach a port behind the gate and pass stdin and stdout
//! through, as an ssh ProxyCommand does.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use super::ClientError;

/// Pause between connection attempts while the gate may still be opening.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Connects to `addr:port`, trying again on refusal until `patience` has
/// passed: the last knock's answer can arrive before the gate has seen it
/// on a slow path, and a refusal costs nothing.
pub fn connect(
    addr: IpAddr,
    port: u16,
    timeout: Duration,
    patience: Duration,
) -> Result<TcpStream, ClientError> {
    let target = SocketAddr::new(addr, port);
    let give_up = Instant::now() + patience;
    loop {
        match TcpStream::connect_timeout(&target, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) if retryable(&e) && Instant::now() + RETRY_EVERY < give_up => {
                thread::sleep(RETRY_EVERY)
            }
            Err(source) => return Err(ClientError::Connect { target, source }),
        }
    }
}

fn retryable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::HostUnreachable | io::ErrorKind::TimedOut
    )
}

/// Copies stdin to the socket and the socket to stdout until the far side
/// closes. When stdin ends first, the socket's sending half is shut so the
/// far side sees the end too. Unbuffered, so every byte goes through as it
/// comes: ssh waits for answers to what it sent.
pub fn relay(stream: TcpStream) -> io::Result<()> {
    let mut stdin = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let mut stdout = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let mut upload = stream.try_clone()?;
    // The thread may be left blocked on stdin when the far side closes
    // first; the process ends without it.
    thread::spawn(move || {
        let _ = io::copy(&mut stdin, &mut upload);
        let _ = upload.shutdown(Shutdown::Write);
    });
    let mut download = stream;
    match io::copy(&mut download, &mut stdout) {
        Ok(_) => Ok(()),
        // The reader of stdout is gone (ssh exited): nothing left to relay.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
    }
}
