//! `knockq connect`: reach a port behind the gate and pass stdin and stdout
//! through, as an ssh ProxyCommand does.

use std::fs::File;
use std::io::{self, Read, Write};
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

/// Copies until end of input with plain reads and writes. (`io::copy`
/// splices between pipes and sockets; ssh sessions relayed that way broke
/// off during key exchange.)
fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buffer[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn retryable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::TimedOut
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
        let _ = pump(&mut stdin, &mut upload);
        let _ = upload.shutdown(Shutdown::Write);
    });
    let mut download = stream;
    match pump(&mut download, &mut stdout) {
        Ok(_) => Ok(()),
        // The reader of stdout is gone (ssh exited): nothing left to relay.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
    }
}
