//! QEMU's side of a shim: where QEMU is reached (`unix:PATH` or `tcp:HOST:PORT`), and a
//! connection to or from it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::session::Summary;

/// A QEMU-side endpoint: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.trim_start_matches("//");
            if path.is_empty() {
                return Err(format!("'{s}' names no socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            // HOST:PORT, the host possibly a bracketed IPv6 address. The name is resolved when
            // the shim connects; its shape is checked now, so that a typo fails at start-up
            // rather than at the first migration.
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!(
                    "'{s}' is not tcp:HOST:PORT (a port from 0 to 65535)"
                ));
            }
            return Ok(Endpoint::Tcp(addr.to_string()));
        }
        Err(format!(
            "'{s}' is not an endpoint: use unix:PATH or tcp:HOST:PORT"
        ))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connection to or from QEMU.
#[derive(Debug)]
pub(crate) enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        };
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// The process at the other end of a unix socket (`SO_PEERCRED`); `None` over TCP.
    pub(crate) fn peer_pid(&self) -> Option<u32> {
        use std::os::fd::AsRawFd;
        let Conn::Unix(s) = self else {
            return None;
        };
        // SAFETY: ucred is plain old data; all zeroes is a valid value.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: the descriptor is the open socket `s` borrows; the kernel writes at most `len`
        // bytes into `cred`, which lives across the call.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast::<libc::c_void>(),
                &mut len,
            )
        };
        (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
    }

    /// Bytes written that the peer has not read yet (SIOCOUTQ). On a unix socket that is
    /// exactly what QEMU has not read; over TCP, what its host has not acknowledged.
    pub(crate) fn unread(&self) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
        };
        let mut pending: libc::c_int = 0;
        // SAFETY: `fd` is an open socket of `self`; TIOCOUTQ (SIOCOUTQ) writes one int.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut pending) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(pending).unwrap_or(0))
    }

    pub(crate) fn connect(endpoint: &Endpoint) -> io::Result<Conn> {
        Ok(match endpoint {
            Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Connects to QEMU, retrying for a while: the destination QEMU may still be starting.
pub(crate) fn connect_qemu(endpoint: &Endpoint) -> Result<Conn, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Conn::connect(endpoint) {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(format!(
                    "cannot connect to the destination QEMU at {endpoint}: {e}"
                ));
            }
        }
    }
}

/// Where a shim listens: a unix socket or a TCP port.
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn bind(endpoint: &Endpoint) -> Result<Self, String> {
        match endpoint {
            Endpoint::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(format!(
                            "{} exists and is not a socket; not replacing it",
                            path.display()
                        ));
                    }
                    std::fs::remove_file(path).map_err(|e| {
                        format!("cannot remove the old socket {}: {e}", path.display())
                    })?;
                }
                Ok(Listener::Unix(UnixListener::bind(path).map_err(|e| {
                    format!("cannot listen on {}: {e}", path.display())
                })?))
            }
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(
                TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?,
            )),
        }
    }

    pub(crate) fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Unix(l) => Conn::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }
}

/// Accepts the next connection; with `once`, returns `None` when the migration finished first.
pub(crate) fn accept_or_done(
    listener: &Listener,
    done: &std::sync::mpsc::Receiver<Summary>,
    summaries: &mut Vec<Summary>,
    once: bool,
) -> Result<Option<Conn>, String> {
    if !once {
        loop {
            while let Ok(s) = done.try_recv() {
                summaries.push(s);
            }
            match listener.accept() {
                Ok(c) => return Ok(Some(c)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("accept failed: {e}")),
            }
        }
    }
    // Poll so that the end of the migration can stop the shim.
    set_nonblocking(listener, true)?;
    loop {
        if let Ok(s) = done.try_recv() {
            summaries.push(s);
            return Ok(None);
        }
        match listener.accept() {
            Ok(c) => {
                set_conn_blocking(&c)?;
                return Ok(Some(c));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("accept failed: {e}")),
        }
    }
}

fn set_nonblocking(listener: &Listener, on: bool) -> Result<(), String> {
    match listener {
        Listener::Unix(l) => l.set_nonblocking(on),
        Listener::Tcp(l) => l.set_nonblocking(on),
    }
    .map_err(|e| e.to_string())
}

fn set_conn_blocking(conn: &Conn) -> Result<(), String> {
    match conn {
        Conn::Unix(s) => s.set_nonblocking(false),
        Conn::Tcp(s) => s.set_nonblocking(false),
    }
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_when_parsed() {
        let unix: Endpoint = "unix:///run/ps/dst.sock".parse().unwrap();
        assert_eq!(unix, Endpoint::Unix(PathBuf::from("/run/ps/dst.sock")));
        let tcp: Endpoint = "tcp:[::1]:4444".parse().unwrap();
        assert_eq!(tcp, Endpoint::Tcp("[::1]:4444".into()));
        assert!("tcp:qemu-host:4444".parse::<Endpoint>().is_ok());
        for bad in [
            "tcp:1",
            "tcp::4444",
            "tcp:host:",
            "tcp:host:65536",
            "unix:",
            "host:1",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
