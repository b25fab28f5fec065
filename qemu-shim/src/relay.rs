//! The shims' sessions, and opaque mode: every QEMU connection carried to the other host as an
//! ordered byte stream, compressed in chunks, with its return direction carried back.
//!
//! With `--mode auto` (the default) the main channel goes through parsing mode instead
//! (`parsed.rs`) whenever its stream can be parsed; multifd channels are always carried opaque.
//!
//! The source shim listens where QEMU migrates to. It tells QEMU's connections apart by their
//! first bytes (the main channel starts with `QEVM`, a multifd channel with its own magic and
//! channel id), groups them into a migration session, and opens one authenticated link per
//! connection to the destination shim. The destination shim connects each link to the
//! destination QEMU, the main channel first (QEMU takes the first connection as the main one),
//! and relays both ways. Each direction is a plain read-compress-write loop: when the network is
//! slow, writes block, reads stop, and QEMU's own writes block, so QEMU measures the real
//! bandwidth and the shim holds no more than a chunk and the socket buffers.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pagestream_transport::net::Log;

use pagecodec::{ClassCounts, PageClass};

use crate::link::{self, Compression, Key, LinkHeader, Moved, StreamKind};
use crate::multifd::QemuMultifd;
use crate::parsed;
use crate::process_use;
use crate::return_path::ReturnPathWatch;
use crate::stream;
use crate::stream_end::{EndWatch, StreamEnd};

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

/// How long a destination link other than the main channel waits for the main channel's
/// connection to the destination QEMU (QEMU takes its first connection as the main channel).
pub(crate) const QEMU_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The bytes an opaque link's socket may hold unsent on the source ([`link::limit_unsent`]).
/// QEMU takes the pace of its own writes for the link's bandwidth and stops its guest when what
/// remains looks short; megabytes waiting in the socket (its autotuned send buffer held
/// 2.5-2.8 MB unsent whenever writes blocked) made that pace look faster than the link. Five
/// alternating rounds of `bench qemu --methods shim-opaque,shim-multifd` at 1 Gbit/s: opaque
/// mode's downtime 97-309 ms (median 252) before, 92-234 ms (median 120) with 256 KiB, at
/// 3.15-4.69 s (median 3.90) against 3.27-4.13 s (3.63).
const OPAQUE_UNSENT_BYTES: usize = 256 << 10;
/// The receive buffer of every link the destination shim accepts
/// ([`link::limit_receive_buffer`]). The kernel sizes a receive buffer from the pace at which
/// the application reads in one round trip, and never shrinks it: over a path with a round
/// trip, a destination slower than the link (its QEMU writing fresh memory on CPUs the shims
/// share) left tens of megabytes waiting in its sockets, which the source QEMU took for
/// bytes delivered. Measured with `bench qemu --rtt 10` at 1 Gbit/s (`ss` every 50 ms): up
/// to 30 MB waiting in the destination's page channels, and in 2 of 40 runs a downtime of
/// 2.2-2.8 s against the source QEMU's own 120 ms, the time the destination took to drain
/// them; with 2 MiB (the kernel doubles it, and advertises most of that as the window), at
/// most 5.8 MB waited, downtimes 105-122 ms, total times unchanged (4.68-4.73 s against
/// 4.08-4.86 s). A window of a few megabytes still covers 1 Gbit/s up to a round trip of about
/// 25 ms per link; parsing mode's `--channels` multiplies it.
const LINK_RECEIVE_BUFFER: usize = 2 << 20;

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

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// The process at the other end of a unix socket (`SO_PEERCRED`); `None` over TCP.
    fn peer_pid(&self) -> Option<u32> {
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

/// Where a shim hands each migration's summary, besides its log: `(side, summary)`, side being
/// "source shim" or "destination shim".
pub type SummarySink = Arc<dyn Fn(&str, &Summary) + Send + Sync>;

/// How a migration went, as one shim saw it.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The session's id, as hex.
    pub session: String,
    /// How the stream was carried, and why.
    pub mode: String,
    /// QEMU connections carried (1 + multifd channels).
    pub connections: u32,
    /// From the first connection to the last byte.
    pub elapsed: Duration,
    /// Migration stream: bytes QEMU wrote, and bytes on the link.
    pub forward: Moved,
    /// Return path: bytes QEMU wrote back, and bytes on the link.
    pub back: Moved,
    /// Streams this shim received whose length and digest matched the sender's (links), or
    /// whose frames all passed their checksums and counts (parsing mode's pages): one per QEMU
    /// connection when all went well.
    pub verified: u32,
    /// Pages by class (parsing mode): how the page codec sent the main channel's pages.
    pub pages: Option<ClassCounts>,
    /// What the destination QEMU said at the end on its return path (`return-path` or
    /// `postcopy-ram`): it loaded the migration, or it could not. `None`: it said nothing this
    /// shim could read (no return path, QEMU's own TLS, or it never got that far).
    pub destination_loaded: Option<bool>,
    /// Whether the source QEMU finished its migration stream, by its last bytes (see
    /// `stream_end.rs`): `false`, it stopped midway (cancelled, or failed at the source).
    /// `None`: they cannot tell (QEMU's own TLS; a stream that ends in a bare EOF byte; parsing
    /// mode's destination when the source could not tell either).
    pub source_finished: Option<bool>,
    /// Destination: connections the destination QEMU closed once the migration was over,
    /// without reading their last bytes (QEMU 7.2's multifd channels end with a packet the
    /// destination need not read).
    pub closed_after_end: u32,
    /// CPU time the process running this shim spent from the session's start to its summary,
    /// all threads (see `process_use.rs`). `None` where it cannot be read.
    pub process_cpu: Option<Duration>,
    /// The most memory that process has held resident since it started, bytes.
    pub peak_resident: Option<u64>,
    /// The first failure, if any.
    pub error: Option<String>,
}

impl Summary {
    /// The summary as one JSON object, for programs (`--summary-json`).
    pub fn to_json(&self, side: &str) -> serde_json::Value {
        let moved = |m: &Moved| serde_json::json!({ "raw_bytes": m.raw, "wire_bytes": m.wire });
        let pages = self.pages.map(|counts| {
            PageClass::ALL
                .iter()
                .map(|&class| (class.name().to_string(), counts.pages(class).into()))
                .collect::<serde_json::Map<String, serde_json::Value>>()
        });
        serde_json::json!({
            "side": side,
            "session": self.session,
            "completed": self.error.is_none(),
            "mode": self.mode,
            "qemu_connections": self.connections,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "stream": moved(&self.forward),
            "return_path": moved(&self.back),
            "verified_streams": self.verified,
            "pages": pages,
            "destination_loaded": self.destination_loaded,
            "source_finished": self.source_finished,
            "closed_after_end": self.closed_after_end,
            "process": {
                "cpu_s": self.process_cpu.map(|cpu| cpu.as_secs_f64()),
                "peak_resident_bytes": self.peak_resident,
            },
            "error": self.error,
        })
    }

    /// A few lines for people.
    pub fn render(&self, side: &str) -> String {
        let ratio = self.forward.raw as f64 / self.forward.wire.max(1) as f64;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut text = format!(
            "{side}: migration {} {} in {:.2} s, mode {}\n  {} QEMU connection(s); stream {:.1} MiB raw, {:.1} MiB on the wire ({:.2}x), {:.1} MB/s raw\n  return path {} bytes",
            self.session,
            if self.error.is_none() {
                "completed"
            } else {
                "FAILED"
            },
            secs,
            self.mode,
            self.connections,
            self.forward.raw as f64 / (1 << 20) as f64,
            self.forward.wire as f64 / (1 << 20) as f64,
            ratio,
            self.forward.raw as f64 / secs / 1e6,
            self.back.raw,
        );
        if let Some(classes) = &self.pages {
            text.push_str(&format!(
                "\n  pages: {} zero, {} unchanged, {} duplicate, {} delta, {} zstd, {} LZ4, {} raw",
                classes.pages(PageClass::Zero),
                classes.pages(PageClass::Unchanged),
                classes.pages(PageClass::Duplicate),
                classes.pages(PageClass::Delta),
                classes.pages(PageClass::Zstd),
                classes.pages(PageClass::Lz4),
                classes.pages(PageClass::Raw),
            ));
        }
        text.push_str(&format!(
            "\n  {} of {} incoming stream(s) verified end to end (links: length and XXH3-64; \
             parsed pages: frame checksums and counts)",
            self.verified, self.connections
        ));
        if self.source_finished == Some(true) {
            text.push_str(
                "\n  the source QEMU finished its stream (it ends as a whole migration's does)",
            );
        }
        if let Some(loaded) = self.destination_loaded {
            text.push_str(if loaded {
                "\n  the destination QEMU loaded it (it said so on the return path)"
            } else {
                "\n  the destination QEMU did not confirm on its return path that it loaded it"
            });
        }
        if self.closed_after_end > 0 {
            text.push_str(&format!(
                "\n  the destination QEMU closed {} connection(s) once the migration was over, \
                 before reading their last bytes (QEMU 7.2 ends each multifd channel with a \
                 packet it need not read)",
                self.closed_after_end
            ));
        }
        if let Some(cpu) = self.process_cpu {
            text.push_str(&format!(
                "\n  this shim's process: {:.2} CPU-s over the migration",
                cpu.as_secs_f64()
            ));
            if let Some(peak) = self.peak_resident {
                text.push_str(&format!(
                    ", at most {:.0} MiB resident",
                    peak as f64 / (1 << 20) as f64
                ));
            }
        }
        if let Some(e) = &self.error {
            text.push_str(&format!("\n  error: {e}"));
        }
        text
    }
}

/// How the source shim carries QEMU's main channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Parsing mode whenever the stream can be parsed, opaque otherwise.
    Auto,
    /// Always opaque.
    Opaque,
}

/// The mode of a session that nothing else was said of: every connection opaque.
pub const OPAQUE_MODE: &str = "opaque (every QEMU connection carried as a compressed byte stream)";

/// One migration in progress on either shim.
pub(crate) struct Session {
    pub(crate) id: [u8; 16],
    started: Instant,
    /// The process's CPU time when the session started.
    cpu_at_start: Option<Duration>,
    pub(crate) forward_raw: AtomicU64,
    /// Link bytes of the QEMU connections relayed as byte streams (opaque mode, and the
    /// multifd channels of a source QEMU in parsing mode).
    pub(crate) forward_wire: AtomicU64,
    /// Link bytes of parsing mode's main channel (its page transport and blobs), set as they
    /// grow: counted apart so that the relays' additions to [`Session::forward_wire`] beside
    /// it are not overwritten.
    pub(crate) parsed_wire: AtomicU64,
    /// Destination, parsing mode: bytes of the rebuilt main channel written to QEMU, set as
    /// they grow, apart from [`Session::forward_raw`] for the same reason.
    pub(crate) parsed_raw: AtomicU64,
    back_raw: AtomicU64,
    back_wire: AtomicU64,
    connections: AtomicU64,
    pub(crate) verified: AtomicU64,
    /// Connections carried and not yet finished.
    open: Mutex<u32>,
    /// The main channel is connected (destination: to QEMU).
    pub(crate) main_ready: Mutex<bool>,
    pub(crate) changed: Condvar,
    pub(crate) main_done: AtomicBool,
    /// Its summary was printed and handed on.
    reported: AtomicBool,
    error: Mutex<Option<String>>,
    /// Why a migration whose every byte was carried did not end (its stream ended early). It
    /// fails the summary like an error, unless an error came first, but shuts nothing down:
    /// the session winds down in order, return path included.
    unfinished: Mutex<Option<String>>,
    /// Sockets to shut down if the migration fails.
    kill: Mutex<Vec<Box<dyn Fn() + Send>>>,
    /// How the main channel was carried and why; opaque when unset.
    pub(crate) mode: Mutex<Option<String>>,
    /// Pages by class, in parsing mode.
    pub(crate) pages: Mutex<Option<ClassCounts>>,
    /// Destination, parsing mode: where the session's page-transport connections go.
    pub(crate) pages_tx: Mutex<Option<crossbeam_channel::Sender<TcpStream>>>,
    /// Destination, parsing mode: the main QEMU connection, for the return path.
    pub(crate) qemu_main: Mutex<Option<Conn>>,
    /// Source: the QEMU connections taken so far.
    members: Mutex<Members>,
    /// The main channel's return path, read as it passes.
    pub(crate) return_path: Mutex<ReturnPathWatch>,
    /// Opaque mode: the main channel's migration stream, read as it passes for its last bytes.
    pub(crate) stream_end: Mutex<EndWatch>,
    /// Parsing mode: whether the source QEMU finished its stream, as the parser told it (it
    /// reads the stream's last bytes itself).
    pub(crate) stream_told: Mutex<Option<bool>>,
    /// Source: the main channel runs in parsing mode. Its stream showed no postcopy, so its QEMU
    /// opens no [`StreamKind::Unannounced`] connection.
    pub(crate) parsing: AtomicBool,
    /// Destination, parsing mode: the stream handed to QEMU ends as a whole migration's does
    /// (its device description, or its last footer and EOF, written).
    pub(crate) stream_delivered: AtomicBool,
    /// Destination, opaque mode: the destination QEMU closed its end of the main channel.
    destination_main_closed: AtomicBool,
    /// Destination: connections that QEMU closed once the migration was over, before reading
    /// their last bytes ([`ClosedAfterEnd`]).
    closed_after_end: AtomicU64,
    /// How long a connection that QEMU closed waits for the migration to show it was over.
    after_end_wait: Duration,
}

/// The QEMU connections a source session took: whose they are, and which. A source shim
/// carries one migration at a time, and a connection of another QEMU must not join it: its
/// pages would reach the wrong VM.
#[derive(Debug, Default)]
struct Members {
    /// The QEMU process they come from, where the socket says so (unix sockets).
    pid: Option<u32>,
    main: bool,
    multifd: std::collections::BTreeSet<u8>,
    unannounced: bool,
}

impl Members {
    /// Takes a connection of `kind` from process `pid` (if known), or says why it cannot be
    /// part of this migration. Over TCP, where the process is unknown, a second main channel or
    /// a second multifd channel with the same id still shows another QEMU.
    fn admit(&mut self, kind: StreamKind, pid: Option<u32>) -> Result<(), String> {
        if let (Some(ours), Some(theirs)) = (self.pid, pid)
            && ours != theirs
        {
            return Err(format!(
                "it comes from QEMU process {theirs}, and QEMU process {ours} is migrating"
            ));
        }
        match kind {
            StreamKind::Main if self.main => {
                return Err("a second main channel: another QEMU is migrating".into());
            }
            StreamKind::Main => self.main = true,
            StreamKind::Multifd(id) if !self.multifd.insert(id) => {
                return Err(format!(
                    "a second multifd channel {id}: another QEMU is migrating"
                ));
            }
            StreamKind::Unannounced if self.unannounced => {
                return Err(
                    "a second connection that does not say what it is (QEMU opens one, for \
                     postcopy-preempt)"
                        .into(),
                );
            }
            StreamKind::Unannounced => self.unannounced = true,
            _ => {}
        }
        self.pid = self.pid.or(pid);
        Ok(())
    }

    /// The kind of a connection that opened as `opening`. A TLS handshake hides what it is:
    /// the one that opens a session is the main channel (QEMU connects its multifd channels
    /// only once the main channel's handshake is done), the others are multifd channels,
    /// numbered in the order they come (the destination QEMU reads each one's real id inside
    /// TLS).
    fn kind_of(&self, opening: Opening, opens_session: bool) -> StreamKind {
        match opening {
            Opening::Plain(kind) => kind,
            Opening::Unannounced => StreamKind::Unannounced,
            Opening::Resumed => StreamKind::Main,
            Opening::Tls if opens_session => StreamKind::Main,
            Opening::Tls => {
                StreamKind::Multifd(u8::try_from(self.multifd.len()).unwrap_or(u8::MAX))
            }
        }
    }
}

impl Session {
    pub(crate) fn new(id: [u8; 16]) -> Arc<Self> {
        Arc::new(Session {
            id,
            started: Instant::now(),
            cpu_at_start: process_use::process_cpu_time(),
            forward_raw: AtomicU64::new(0),
            forward_wire: AtomicU64::new(0),
            parsed_wire: AtomicU64::new(0),
            parsed_raw: AtomicU64::new(0),
            back_raw: AtomicU64::new(0),
            back_wire: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            open: Mutex::new(0),
            main_ready: Mutex::new(false),
            changed: Condvar::new(),
            main_done: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            error: Mutex::new(None),
            unfinished: Mutex::new(None),
            kill: Mutex::new(Vec::new()),
            mode: Mutex::new(None),
            pages: Mutex::new(None),
            pages_tx: Mutex::new(None),
            qemu_main: Mutex::new(None),
            members: Mutex::new(Members::default()),
            parsing: AtomicBool::new(false),
            return_path: Mutex::new(ReturnPathWatch::default()),
            stream_end: Mutex::new(EndWatch::new()),
            stream_told: Mutex::new(None),
            stream_delivered: AtomicBool::new(false),
            destination_main_closed: AtomicBool::new(false),
            closed_after_end: AtomicU64::new(0),
            after_end_wait: AFTER_END_WAIT,
        })
    }

    /// Whether the migration is over at the destination QEMU: the whole stream was handed to
    /// it (by its last bytes, which both modes read), or, where those cannot be read (QEMU's
    /// own TLS), QEMU closed its main channel.
    fn over_at_destination(&self) -> bool {
        if self.stream_delivered.load(Ordering::SeqCst) {
            return true;
        }
        match self.stream_end.lock().expect("not poisoned").verdict() {
            StreamEnd::Finished => true,
            StreamEnd::Cut => false,
            StreamEnd::Unknown => self.destination_main_closed.load(Ordering::SeqCst),
        }
    }

    /// Shuts `kill` down too if the migration fails.
    pub(crate) fn on_failure(&self, kill: Box<dyn Fn() + Send>) {
        // Under the error's lock, as `fail` runs them: a session that failed already runs it
        // now (a connection opened after the failure must not wait on a peer that is gone).
        let error = self.error.lock().expect("not poisoned");
        if error.is_some() {
            drop(error);
            kill();
            return;
        }
        self.kill.lock().expect("not poisoned").push(kill);
    }

    /// The first failure so far.
    pub(crate) fn failed(&self) -> Option<String> {
        self.error.lock().expect("not poisoned").clone()
    }

    /// Whether a connection of QEMU process `pid` (if known) that does not say what it is can be
    /// this migration's [`StreamKind::Unannounced`] one: the main channel has spoken, from the
    /// same QEMU, and is carried opaque (a parsed stream showed no postcopy), and no such
    /// connection came yet.
    fn takes_unannounced(&self, pid: Option<u32>) -> bool {
        let members = self.members.lock().expect("not poisoned");
        let same_qemu = match (members.pid, pid) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => true,
        };
        let decided = self.mode.lock().expect("not poisoned").is_some();
        members.main
            && same_qemu
            && !members.unannounced
            && decided
            && !self.parsing.load(Ordering::SeqCst)
            && !self.main_done.load(Ordering::SeqCst)
            && self.failed().is_none()
    }

    /// Waits until the main channel is connected to the destination QEMU.
    pub(crate) fn wait_main_ready(&self, timeout: Duration) -> Result<(), String> {
        let mut ready = self.main_ready.lock().expect("not poisoned");
        let deadline = Instant::now() + timeout;
        while !*ready {
            if Instant::now() >= deadline {
                return Err("the main channel never came".into());
            }
            if let Some(e) = self.failed() {
                return Err(format!("the session failed: {e}"));
            }
            ready = self
                .changed
                .wait_timeout(ready, Duration::from_millis(50))
                .expect("not poisoned")
                .0;
        }
        Ok(())
    }

    /// Marks the main channel connected to the destination QEMU.
    pub(crate) fn set_main_ready(&self) {
        *self.main_ready.lock().expect("not poisoned") = true;
        self.changed.notify_all();
    }

    /// Link bytes of the migration stream, every connection's.
    pub(crate) fn forward_wire_bytes(&self) -> u64 {
        self.forward_wire.load(Ordering::Relaxed) + self.parsed_wire.load(Ordering::Relaxed)
    }

    /// Raw bytes of the migration stream, every connection's.
    pub(crate) fn forward_raw_bytes(&self) -> u64 {
        self.forward_raw.load(Ordering::Relaxed) + self.parsed_raw.load(Ordering::Relaxed)
    }

    /// The counters of the migration stream (`true`) or of the return path.
    pub(crate) fn direction(&self, forward: bool) -> (&AtomicU64, &AtomicU64) {
        if forward {
            (&self.forward_raw, &self.forward_wire)
        } else {
            (&self.back_raw, &self.back_wire)
        }
    }

    pub(crate) fn hex(&self) -> String {
        self.id[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Records the first failure and shuts every socket of the session down, so that neither
    /// QEMU waits on a migration that cannot finish.
    pub(crate) fn fail(&self, what: String) {
        let mut error = self.error.lock().expect("not poisoned");
        if error.is_none() {
            *error = Some(what);
            for kill in self.kill.lock().expect("not poisoned").iter() {
                kill();
            }
        }
    }

    /// Prints the session's summary and hands it on, once per session whichever of its
    /// connections gets here first.
    fn report(
        &self,
        side: &str,
        log: &Log,
        sink: Option<&SummarySink>,
        done: &std::sync::mpsc::Sender<Summary>,
    ) {
        if self.reported.swap(true, Ordering::SeqCst) {
            return;
        }
        let summary = self.summary();
        log(&summary.render(side));
        if let Some(sink) = sink {
            sink(side, &summary);
        }
        let _ = done.send(summary);
    }

    fn summary(&self) -> Summary {
        let failed = self.failed();
        let destination_loaded = self
            .return_path
            .lock()
            .expect("not poisoned")
            .loaded(failed.is_some());
        let told = *self.stream_told.lock().expect("not poisoned");
        let source_finished = told.or(
            match self.stream_end.lock().expect("not poisoned").verdict() {
                StreamEnd::Finished => Some(true),
                StreamEnd::Cut => Some(false),
                StreamEnd::Unknown => None,
            },
        );
        Summary {
            session: self.hex(),
            mode: self
                .mode
                .lock()
                .expect("not poisoned")
                .clone()
                .unwrap_or_else(|| OPAQUE_MODE.into()),
            connections: self.connections.load(Ordering::Relaxed) as u32,
            elapsed: self.started.elapsed(),
            forward: Moved {
                raw: self.forward_raw_bytes(),
                wire: self.forward_wire_bytes(),
            },
            back: Moved {
                raw: self.back_raw.load(Ordering::Relaxed),
                wire: self.back_wire.load(Ordering::Relaxed),
            },
            verified: self.verified.load(Ordering::Relaxed) as u32,
            pages: *self.pages.lock().expect("not poisoned"),
            destination_loaded,
            source_finished,
            closed_after_end: self.closed_after_end.load(Ordering::Relaxed) as u32,
            process_cpu: process_use::process_cpu_time()
                .zip(self.cpu_at_start)
                .map(|(now, start)| now.saturating_sub(start)),
            peak_resident: process_use::peak_resident_bytes(),
            // What this shim saw first; then how the source's stream ended; then what the
            // destination QEMU said (the only word where the stream's end cannot tell).
            error: failed
                .or_else(|| self.unfinished.lock().expect("not poisoned").clone())
                .or_else(|| (source_finished == Some(false)).then(|| STREAM_CUT.to_string()))
                .or_else(|| {
                    (destination_loaded == Some(false)).then(|| {
                        "the destination QEMU did not confirm on its return path that it \
                         loaded the migration: the source cancelled it, or the destination QEMU \
                         refused what it read (its log says why)"
                            .to_string()
                    })
                }),
        }
    }

    /// Records that the migration did not end although everything was carried (see
    /// `unfinished`).
    pub(crate) fn unfinished(&self, why: String) {
        self.unfinished
            .lock()
            .expect("not poisoned")
            .get_or_insert(why);
    }

    /// A connection of the session that is not one of QEMU's (parsing mode's return path): the
    /// session waits for it, the summary does not count it.
    pub(crate) fn helper_opened(&self) {
        *self.open.lock().expect("not poisoned") += 1;
    }

    pub(crate) fn opened(&self) {
        *self.open.lock().expect("not poisoned") += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, main: bool) {
        *self.open.lock().expect("not poisoned") -= 1;
        if main {
            self.main_done.store(true, Ordering::SeqCst);
        }
        self.changed.notify_all();
    }

    /// Waits until the main channel and every other connection have finished.
    pub(crate) fn wait_finished(&self) {
        let mut open = self.open.lock().expect("not poisoned");
        while !(self.main_done.load(Ordering::SeqCst) && *open == 0) {
            open = self
                .changed
                .wait_timeout(open, Duration::from_millis(100))
                .expect("not poisoned")
                .0;
        }
    }
}

/// Prints a progress line every second while the session runs.
pub(crate) fn progress(session: Arc<Session>, side: &'static str, log: Log) {
    // The stream's raw bytes come from QEMU at the source and go to QEMU at the destination.
    let qemu = if side == "destination" {
        "to QEMU"
    } else {
        "from QEMU"
    };
    let warn = log.clone();
    let spawned = spawn_named("ps-progress", move || {
        let mut last = 0;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            if session.main_done.load(Ordering::SeqCst) {
                return;
            }
            let raw = session.forward_raw_bytes();
            let wire = session.forward_wire_bytes();
            log(&format!(
                "{side} {}: {:.1} MiB {qemu}, {:.1} MiB on the wire ({:.2}x), {:.1} MB/s",
                session.hex(),
                raw as f64 / (1 << 20) as f64,
                wire as f64 / (1 << 20) as f64,
                raw as f64 / wire.max(1) as f64,
                (raw - last) as f64 / 1e6
            ));
            last = raw;
        }
    });
    if let Err(e) = spawned {
        warn(&format!(
            "{side} shim: no progress lines for this migration: cannot start a thread: {e}"
        ));
    }
}

/// Why a migration whose stream the source QEMU stopped midway failed (opaque mode).
const STREAM_CUT: &str = "the source QEMU ended its migration stream midway (its last bytes \
     are not the end of a migration): the migration was cancelled or failed at the source";

/// Which of a session's watches reads the bytes a relay moves: those of the main channel only.
#[derive(Clone, Copy)]
pub(crate) enum Watch<'a> {
    Nothing,
    /// The return path ([`ReturnPathWatch`]).
    ReturnPath(&'a Session),
    /// The migration stream's end ([`EndWatch`]).
    StreamEnd(&'a Session),
}

impl Watch<'_> {
    /// The watch for the main channel's bytes in one direction (`forward`: the migration
    /// stream), or none for another connection.
    pub(crate) fn of(session: &Session, main: bool, forward: bool) -> Watch<'_> {
        match (main, forward) {
            (false, _) => Watch::Nothing,
            (true, true) => Watch::StreamEnd(session),
            (true, false) => Watch::ReturnPath(session),
        }
    }

    fn feed(self, bytes: &[u8]) {
        match self {
            Watch::Nothing => {}
            Watch::ReturnPath(session) => session
                .return_path
                .lock()
                .expect("not poisoned")
                .feed(bytes),
            Watch::StreamEnd(session) => {
                session.stream_end.lock().expect("not poisoned").feed(bytes)
            }
        }
    }
}

/// Reads from `inner`, showing the bytes to `watch`: the source shim reading its QEMU's
/// migration stream, the destination shim reading its QEMU's return path.
pub(crate) struct WatchedReader<'a, R> {
    pub(crate) inner: R,
    pub(crate) watch: Watch<'a>,
    /// Whether a read from `inner` failed: an error from the copy then belongs to this side,
    /// not to the link it copies to.
    pub(crate) failed: bool,
}

impl<'a, R> WatchedReader<'a, R> {
    pub(crate) fn new(inner: R, watch: Watch<'a>) -> Self {
        WatchedReader {
            inner,
            watch,
            failed: false,
        }
    }

    /// What an error of a copy from this reader to the other shim means: QEMU's, if the read
    /// failed (`forward`: QEMU's migration stream, else its return path), else the link's.
    pub(crate) fn copy_error(&self, e: &io::Error, forward: bool) -> String {
        if self.failed {
            qemu_read_error(e, forward)
        } else {
            format!("to the other shim: {}", link::link_error(e))
        }
    }
}

impl<R: Read> Read for WatchedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|e| {
            self.failed |= e.kind() != io::ErrorKind::Interrupted;
        })?;
        self.watch.feed(&buf[..n]);
        Ok(n)
    }
}

/// How long a connection that the destination QEMU closed waits for the migration to show it
/// was over ([`ClosedAfterEnd`]). QEMU closes its main channel, and the shim has handed it the
/// stream's last bytes, within milliseconds of its multifd channels' cleanup.
const AFTER_END_WAIT: Duration = Duration::from_secs(3);

/// A connection of the destination QEMU other than its main channel, which QEMU may close
/// before reading its last bytes once the migration is over.
///
/// QEMU 7.2's multifd source sends each channel one more packet after the final sync, an empty
/// one: a sync that finds pages pending queues two jobs, and the channel's thread sends the
/// pages and the sync flag in the first packet and nothing in the second. The destination's
/// thread may or may not read it before the migration's cleanup closes the channel. Then
/// QEMU resets the connection (bytes unread), or the relay's write of that packet finds it
/// closed. Natively the source QEMU is done with the channel by then and never hears of it.
///
/// The relay forgives QEMU's closing (a reset, a broken pipe) only once the migration is over
/// at the destination ([`Session::over_at_destination`]), waiting up to [`AFTER_END_WAIT`] for
/// it to show: it drops the rest of what comes for that connection and ends it toward the
/// other shim as usual. Closed any earlier, the connection failed, and so does the session:
/// the source QEMU must hear of it, as it would without the shims.
struct ClosedAfterEnd<'a> {
    session: &'a Session,
    /// QEMU's closing was forgiven: what comes for it goes nowhere.
    forgiven: AtomicBool,
}

impl ClosedAfterEnd<'_> {
    /// Whether an error on QEMU's side of the connection is QEMU closing it after the end.
    fn forgives(&self, e: &io::Error) -> bool {
        if self.forgiven.load(Ordering::SeqCst) {
            return true;
        }
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return false;
        }
        let deadline = Instant::now() + self.session.after_end_wait;
        loop {
            if self.session.failed().is_some() {
                return false;
            }
            if self.session.over_at_destination() {
                self.forgiven.store(true, Ordering::SeqCst);
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Writes to a destination QEMU's connection; once QEMU closed it after the end, drops what
/// comes ([`ClosedAfterEnd`]).
struct ForgivingWriter<'a, 'b, W> {
    inner: W,
    closed: Option<&'a ClosedAfterEnd<'b>>,
}

impl<W: Write> Write for ForgivingWriter<'_, '_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(closed) = self.closed
            && closed.forgiven.load(Ordering::SeqCst)
        {
            return Ok(buf.len());
        }
        match self.inner.write(buf) {
            Err(e) if self.closed.is_some_and(|c| c.forgives(&e)) => Ok(buf.len()),
            written => written,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.inner.flush() {
            Err(e) if self.closed.is_some_and(|c| c.forgives(&e)) => Ok(()),
            flushed => flushed,
        }
    }
}

/// Reads from a destination QEMU's connection; QEMU closing it after the end ends it
/// ([`ClosedAfterEnd`]).
struct ForgivingReader<'a, 'b, R> {
    inner: R,
    closed: Option<&'a ClosedAfterEnd<'b>>,
}

impl<R: Read> Read for ForgivingReader<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Err(e) if self.closed.is_some_and(|c| c.forgives(&e)) => Ok(0),
            read => read,
        }
    }
}

/// What a failed read from this side's QEMU means (`forward`: its migration stream, at the
/// source; otherwise its return path, at the destination). A QEMU that closes a connection
/// while bytes sent to it wait unread resets it.
fn qemu_read_error(e: &io::Error, forward: bool) -> String {
    let (qemu, what) = if forward {
        ("source", "migration stream")
    } else {
        ("destination", "return path")
    };
    match e.kind() {
        io::ErrorKind::ConnectionReset => format!(
            "the {qemu} QEMU reset the connection of its {what} (it closed it with bytes sent \
             to it still unread) ({e})"
        ),
        _ => format!("reading the {qemu} QEMU's {what} failed: {e}"),
    }
}

/// Writes to `inner`, showing the bytes to `watch`: the destination shim handing the migration
/// stream to its QEMU, the source shim handing it the return path.
pub(crate) struct WatchedWriter<'a, W> {
    pub(crate) inner: W,
    pub(crate) watch: Watch<'a>,
    /// Whether a write to `inner` failed: an error from the copy then belongs to this side,
    /// not to the link it copies from.
    pub(crate) failed: bool,
}

impl<W: Write> Write for WatchedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf);
        // Bytes the other side sent count even when this QEMU can no longer take them (a
        // cancelled migration's QEMU closes its end): the watch reads what was said. (An
        // interrupted write is tried again with the same bytes: not seen yet.)
        let seen = match &written {
            Ok(n) => &buf[..*n],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => &[],
            Err(_) => {
                self.failed = true;
                buf
            }
        };
        self.watch.feed(seen);
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a failed write of the return path into the source QEMU means.
pub(crate) fn return_path_write_error(e: &io::Error) -> String {
    format!("writing QEMU's return path to it failed: {e}")
}

/// Relays one QEMU connection over one link, both directions, until both ended. `forward`:
/// this side reads QEMU's migration stream (the source shim); otherwise it reads QEMU's return
/// path (the destination shim). `main`: it is the main channel, whose return path the session
/// watches.
fn relay(
    mut qemu: Conn,
    prefix: Vec<u8>,
    link: TcpStream,
    session: &Arc<Session>,
    forward: bool,
    main: bool,
    compression: Compression,
) -> Result<(), String> {
    let clone_err = |e: io::Error| format!("cannot set up the relay: {e}");
    let mut qemu_out = qemu.try_clone().map_err(clone_err)?;
    let mut link_in = link.try_clone().map_err(clone_err)?;
    {
        let (q, l) = (
            qemu.try_clone().map_err(clone_err)?,
            link.try_clone().map_err(clone_err)?,
        );
        session
            .kill
            .lock()
            .expect("not poisoned")
            .push(Box::new(move || {
                q.shutdown(Shutdown::Both);
                let _ = l.shutdown(Shutdown::Both);
            }));
    }
    // The destination QEMU may close a connection other than its main channel once the
    // migration is over, before reading its last bytes.
    let closed_after_end = (!forward && !main).then(|| ClosedAfterEnd {
        session,
        forgiven: AtomicBool::new(false),
    });
    let closed_after_end = closed_after_end.as_ref();
    let (outgoing, incoming) = std::thread::scope(|scope| {
        // What comes from the link: the return path on the source shim, the migration stream
        // on the destination shim.
        let spawned = std::thread::Builder::new()
            .name("ps-link-in".into())
            .spawn_scoped(scope, || -> Result<(), String> {
                let (raw, wire) = session.direction(!forward);
                let mut to_qemu = WatchedWriter {
                    inner: ForgivingWriter {
                        inner: &mut qemu_out,
                        closed: closed_after_end,
                    },
                    watch: Watch::of(session, main, !forward),
                    failed: false,
                };
                let copied = link::from_link(&mut link_in, &mut to_qemu, |r, w| {
                    raw.fetch_add(r, Ordering::Relaxed);
                    wire.fetch_add(w, Ordering::Relaxed);
                });
                let qemu_failed = to_qemu.failed;
                copied.map_err(|e| {
                    let why = if qemu_failed && !forward {
                        crate::parsed::qemu_write_error(e)
                    } else if qemu_failed {
                        return_path_write_error(&e)
                    } else {
                        format!("from the other shim: {}", link::link_error(&e))
                    };
                    // Fail the session now: the other direction may be blocked reading a QEMU
                    // that will never send again, and must be woken.
                    session.fail(why.clone());
                    why
                })?;
                session.verified.fetch_add(1, Ordering::Relaxed);
                // The other side is done sending: pass the end on to QEMU.
                qemu_out.shutdown(Shutdown::Write);
                Ok(())
            });
        let incoming = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                let why = format!("cannot start a thread: {e}");
                session.fail(why.clone());
                return (Err(why.clone()), Err(why));
            }
        };
        let mut link_out = &link;
        let (raw, wire) = session.direction(forward);
        let mut from_qemu = WatchedReader::new(
            ForgivingReader {
                inner: prefix.as_slice().chain(&mut qemu),
                closed: closed_after_end,
            },
            Watch::of(session, main, forward),
        );
        let outgoing = link::to_link(&mut from_qemu, &mut link_out, compression, |r, w| {
            raw.fetch_add(r, Ordering::Relaxed);
            wire.fetch_add(w, Ordering::Relaxed);
        })
        .map_err(|e| {
            let why = from_qemu.copy_error(&e, forward);
            session.fail(why.clone());
            why
        });
        if outgoing.is_ok() && main && !forward {
            // The destination QEMU closed its main channel.
            session
                .destination_main_closed
                .store(true, Ordering::SeqCst);
        }
        let _ = link.shutdown(Shutdown::Write);
        let incoming = incoming
            .join()
            .unwrap_or_else(|_| Err("relay thread panicked".into()));
        (outgoing, incoming)
    });
    outgoing?;
    incoming?;
    if closed_after_end.is_some_and(|c| c.forgiven.load(Ordering::SeqCst)) {
        session.closed_after_end.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// What the source shim needs.
#[derive(Clone)]
pub struct SourceConfig {
    /// Where QEMU migrates to.
    pub listen: Endpoint,
    /// The destination shim.
    pub to: String,
    /// Pre-shared key, if any.
    pub key: Option<Key>,
    /// How the migration stream is compressed (opaque mode).
    pub compression: Compression,
    /// Parsing mode when possible, or always opaque.
    pub mode: Mode,
    /// Data channels of parsing mode's page transport.
    pub channels: u16,
    /// How long the destination shim may stay unreachable before the migration fails
    /// ([`link::watch_liveness`]; default [`link::DEFAULT_LINK_TIMEOUT`]).
    pub link_timeout: Duration,
    /// Also hands each summary here (`--summary-json`).
    pub on_summary: Option<SummarySink>,
    /// Exit after one migration.
    pub once: bool,
    /// Progress and summaries.
    pub log: Log,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("listen", &self.listen)
            .field("to", &self.to)
            .finish()
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(endpoint: &Endpoint) -> Result<Self, String> {
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

    fn accept(&self) -> io::Result<Conn> {
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

/// How long a failure that is probably the echo of another waits before it is recorded.
const ECHO_GRACE: Duration = Duration::from_millis(250);

/// What a QEMU connection's first bytes say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opening {
    Plain(StreamKind),
    /// A TLS handshake (QEMU's `tls-creds`): which channel it is, only the order tells.
    Tls,
    /// Nothing that says what it is, from the QEMU whose main channel is carried opaque:
    /// postcopy-preempt's channel (see [`StreamKind::Unannounced`]).
    Unannounced,
    /// The main channel of a postcopy migration resumed after a failure: no header, a command
    /// first ([`stream::opens_postcopy_resume`]).
    Resumed,
}

/// How long a connection must stay silent, once the migration's main channel has spoken, to be
/// taken for its unannounced one. QEMU's main and multifd channels and TLS handshakes all
/// speak as soon as they connect, and the main channel's first bytes come only after QEMU's
/// setup (its other channels are connected by then).
const UNANNOUNCED_AFTER: Duration = Duration::from_millis(200);

/// How long a connection may stay silent otherwise before it is refused.
const OPENING_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the first bytes of a QEMU connection and says what it is. Returns the bytes read, which
/// must be forwarded first. `takes_unannounced` says whether a migration is under way that this
/// connection can be the unannounced channel of (asked again while it stays silent).
fn classify(
    conn: &mut Conn,
    takes_unannounced: &dyn Fn() -> bool,
) -> Result<(Opening, Vec<u8>), String> {
    const TICK: Duration = Duration::from_millis(20);
    conn.set_read_timeout(Some(TICK))
        .map_err(|e| e.to_string())?;
    let opened = Instant::now();
    // Since when this connection could have been the unannounced one.
    let mut could_be: Option<Instant> = None;
    let mut head = vec![0u8; 4];
    let mut got = 0;
    while got < 4 {
        match conn.read(&mut head[got..]) {
            Ok(0) => return Err("QEMU closed it without a stream header".into()),
            Ok(n) => {
                got += n;
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("QEMU sent no stream header ({e})")),
        }
        if got == 0 && takes_unannounced() {
            let since = *could_be.get_or_insert_with(Instant::now);
            if since.elapsed() >= UNANNOUNCED_AFTER {
                conn.set_read_timeout(None).map_err(|e| e.to_string())?;
                return Ok((Opening::Unannounced, Vec::new()));
            }
        } else {
            could_be = None;
        }
        if opened.elapsed() >= OPENING_TIMEOUT {
            return Err(format!(
                "QEMU sent no stream header in {} s",
                OPENING_TIMEOUT.as_secs()
            ));
        }
    }
    conn.set_read_timeout(Some(OPENING_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let kind = if head == b"QEVM" {
        Opening::Plain(StreamKind::Main)
    } else if u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) == crate::multifd::MAGIC {
        // be32 version, 16-byte uuid, then the channel id.
        let mut rest = vec![0u8; 21];
        conn.read_exact(&mut rest)
            .map_err(|e| format!("truncated multifd header ({e})"))?;
        head.extend_from_slice(&rest);
        Opening::Plain(StreamKind::Multifd(head[24]))
    } else if is_tls_handshake(&head) {
        Opening::Tls
    } else if stream::opens_postcopy_resume(&head) {
        Opening::Resumed
    } else if takes_unannounced() {
        // postcopy-preempt's channel, opened when postcopy starts (QEMU 8.0 on) and used at
        // once: its first bytes are a page record.
        Opening::Unannounced
    } else {
        return Err(format!(
            "not a QEMU migration stream (it starts with {:02x?})",
            &head[..4]
        ));
    };
    conn.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((kind, head))
}

/// Whether `head` starts a TLS record of the handshake (content type 22, protocol version
/// 3.x: SSL 3.0 to TLS 1.3, whose records all say 3.1 to 3.3), as QEMU's `tls-creds` open a
/// migration connection.
fn is_tls_handshake(head: &[u8]) -> bool {
    matches!(head, [0x16, 0x03, 0x00..=0x04, ..])
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut id);
    }
    id
}

/// Runs the source shim until killed (or, with `once`, until one migration ended). Returns the
/// summaries of the migrations it carried.
pub fn run_source(config: SourceConfig) -> Result<Vec<Summary>, String> {
    let listener = Listener::bind(&config.listen)?;
    let to: SocketAddr = config
        .to
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the destination shim {}: {e}", config.to))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", config.to))?;
    (config.log)(&format!(
        "source shim: QEMU migrates to {}; destination shim {to}; {}",
        config.listen,
        if config.key.is_some() {
            "authenticated"
        } else {
            "no key"
        }
    ));
    let current: Arc<Mutex<Option<Arc<Session>>>> = Arc::new(Mutex::new(None));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Summary>();
    let mut summaries = Vec::new();
    loop {
        if config.once && !summaries.is_empty() {
            return Ok(summaries);
        }
        // With `once`, stop accepting as soon as the session is over.
        let conn = match accept_or_done(&listener, &done_rx, &mut summaries, config.once)? {
            Some(conn) => conn,
            None => return Ok(summaries),
        };
        let (config, current, done_tx) = (config.clone(), current.clone(), done_tx.clone());
        let log = config.log.clone();
        let spawned = spawn_named("ps-src-conn", move || {
            let mut conn = conn;
            let pid = conn.peer_pid();
            let takes_unannounced = || {
                let current = current.lock().expect("not poisoned");
                current.as_ref().is_some_and(|s| s.takes_unannounced(pid))
            };
            let (opening, prefix) = match classify(&mut conn, &takes_unannounced) {
                Ok(c) => c,
                Err(why) => {
                    (config.log)(&format!("source shim: refused a connection: {why}"));
                    return;
                }
            };
            // A migration's connections arrive together, in no fixed order (QEMU 7.2 opens its
            // multifd channels before the main channel sends anything): the first one opens the
            // session, the others join it until it is over. One migration at a time: a
            // connection that cannot be this migration's is closed, which fails its QEMU's
            // migration at once.
            let (session, kind) = {
                let mut current = current.lock().expect("not poisoned");
                match current.as_ref() {
                    Some(s) if !s.main_done.load(Ordering::SeqCst) && s.failed().is_none() => {
                        let mut members = s.members.lock().expect("not poisoned");
                        let kind = members.kind_of(opening, false);
                        let admitted = members.admit(kind, pid);
                        drop(members);
                        if let Err(why) = admitted {
                            (config.log)(&format!(
                                "source shim: refused a connection: {why}; a shim pair carries \
                                 one migration at a time (migrate the VMs one after another, or \
                                 through another shim pair on another socket and port)"
                            ));
                            return;
                        }
                        (s.clone(), kind)
                    }
                    _ if opening == Opening::Unannounced => {
                        (config.log)(
                            "source shim: refused a connection: it does not say what it is, and \
                             the migration it belonged to is over",
                        );
                        return;
                    }
                    _ => {
                        let s = Session::new(random_id());
                        let mut members = s.members.lock().expect("not poisoned");
                        let kind = members.kind_of(opening, true);
                        let admitted = members.admit(kind, pid);
                        drop(members);
                        debug_assert!(admitted.is_ok(), "a new session takes any connection");
                        *current = Some(s.clone());
                        progress(s.clone(), "source", config.log.clone());
                        (s, kind)
                    }
                }
            };
            let main = kind == StreamKind::Main;
            session.opened();
            let result = (|| -> Result<(), String> {
                let mut prefix = prefix;
                if main && opening == Opening::Tls {
                    *session.mode.lock().expect("not poisoned") = Some(format!(
                        "{OPAQUE_MODE}: QEMU's TLS encrypts the stream between the two QEMUs"
                    ));
                } else if main && opening == Opening::Resumed {
                    *session.mode.lock().expect("not poisoned") = Some(format!(
                        "{OPAQUE_MODE}: a postcopy migration resumed after a failure"
                    ));
                } else if main && config.mode == Mode::Auto {
                    match parsed::source_main(
                        conn.try_clone().map_err(|e| e.to_string())?,
                        prefix,
                        &session,
                        &config,
                        to,
                    )? {
                        parsed::SourceOutcome::Carried => return Ok(()),
                        parsed::SourceOutcome::Opaque { read, why } => {
                            (config.log)(&format!(
                                "source shim: main channel carried opaque: {why}"
                            ));
                            *session.mode.lock().expect("not poisoned") = Some(format!(
                                "opaque (the main channel's stream cannot be parsed: {why})"
                            ));
                            prefix = read;
                        }
                    }
                } else if main {
                    *session.mode.lock().expect("not poisoned") =
                        Some(format!("{OPAQUE_MODE}, as asked (--mode opaque)"));
                }
                // A resumed postcopy waits for the destination shim as long as a lost link
                // would: QEMU 7.2's source, its resume connection closed unanswered, stays in
                // postcopy-recover for good, so the shims may be restarted in any order.
                let patience = if opening == Opening::Resumed {
                    config.link_timeout
                } else {
                    Duration::ZERO
                };
                let mut link = connect_destination(to, patience)?;
                link.set_nodelay(true).map_err(|e| e.to_string())?;
                link::watch_liveness(&link, config.link_timeout).map_err(|e| e.to_string())?;
                link::limit_unsent(&link, OPAQUE_UNSENT_BYTES).map_err(|e| e.to_string())?;
                link.set_read_timeout(Some(config.link_timeout))
                    .map_err(|e| e.to_string())?;
                link::connect_handshake(
                    &mut link,
                    config.key.as_ref(),
                    LinkHeader {
                        session: session.id,
                        kind,
                    },
                )
                .map_err(|e| e.to_string())?;
                link.set_read_timeout(None).map_err(|e| e.to_string())?;
                relay(conn, prefix, link, &session, true, main, config.compression)
            })();
            if let Err(why) = result {
                session.fail(format!("{kind:?} channel: {why}"));
            }
            session.closed(main);
            if main {
                session.wait_finished();
                session.report(
                    "source shim",
                    &config.log,
                    config.on_summary.as_ref(),
                    &done_tx,
                );
            }
        });
        if let Err(e) = spawned {
            // The connection closes with the thread's closure: its QEMU's migration fails.
            log(&format!(
                "source shim: refused a connection: cannot start a thread: {e}"
            ));
        }
    }
}

/// Connects to the destination shim, trying again for `patience` while it refuses (not yet
/// started).
pub(crate) fn connect_destination(to: SocketAddr, patience: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + patience;
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(link) => return Ok(link),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("cannot reach the destination shim {to}: {e}")),
        }
    }
}

/// Accepts the next connection; with `once`, returns `None` when the migration finished first.
fn accept_or_done(
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

/// What the destination shim needs.
#[derive(Clone)]
pub struct DestinationConfig {
    /// Where the source shim connects.
    pub listen: String,
    /// The destination QEMU's incoming socket.
    pub qemu: Endpoint,
    /// Pre-shared key, if any.
    pub key: Option<Key>,
    /// Accept unauthenticated peers that are not on loopback.
    pub allow_remote_without_key: bool,
    /// How the return path is compressed.
    pub compression: Compression,
    /// The destination QEMU loads pages over its own multifd channels (parsing mode only).
    pub qemu_multifd: Option<QemuMultifd>,
    /// How long the source shim may stay unreachable before the migration fails
    /// ([`link::watch_liveness`]; default [`link::DEFAULT_LINK_TIMEOUT`]).
    pub link_timeout: Duration,
    /// Also hands each summary here (`--summary-json`).
    pub on_summary: Option<SummarySink>,
    /// Exit after one migration.
    pub once: bool,
    /// Progress and summaries.
    pub log: Log,
}

impl std::fmt::Debug for DestinationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationConfig")
            .field("listen", &self.listen)
            .field("qemu", &self.qemu)
            .finish()
    }
}

/// Starts a thread named `name`: profiles and `top -H` then tell the shims' threads apart.
/// A system out of threads says so (`std::thread::spawn` would panic).
pub(crate) fn spawn_named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
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

/// Runs the destination shim until killed (or, with `once`, until one migration ended).
pub fn run_destination(config: DestinationConfig) -> Result<Vec<Summary>, String> {
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    run_destination_on(listener, config)
}

/// Like [`run_destination`], on a bound listener.
pub fn run_destination_on(
    listener: TcpListener,
    config: DestinationConfig,
) -> Result<Vec<Summary>, String> {
    (config.log)(&format!(
        "destination shim: listening on {}; QEMU at {}; {}",
        listener.local_addr().map_err(|e| e.to_string())?,
        config.qemu,
        if config.key.is_some() {
            "authenticated"
        } else {
            "no key"
        }
    ));
    let sessions: Arc<Mutex<Vec<Arc<Session>>>> = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Summary>();
    let mut summaries = Vec::new();
    let listener = Listener::Tcp(listener);
    loop {
        if config.once && !summaries.is_empty() {
            return Ok(summaries);
        }
        let conn = match accept_or_done(&listener, &done_rx, &mut summaries, config.once)? {
            Some(conn) => conn,
            None => return Ok(summaries),
        };
        let Conn::Tcp(mut link) = conn else {
            unreachable!("the destination listens on TCP");
        };
        let (config, sessions, done_tx) = (config.clone(), sessions.clone(), done_tx.clone());
        let log = config.log.clone();
        let spawned = spawn_named("ps-dst-conn", move || {
            let peer = link.peer_addr().ok();
            let trusted =
                config.allow_remote_without_key || peer.is_some_and(|p| p.ip().is_loopback());
            match link::watch_liveness(&link, config.link_timeout)
                .and_then(|()| link::limit_receive_buffer(&link, LINK_RECEIVE_BUFFER))
            {
                Ok(true) => {}
                Ok(false) => (config.log)(&format!(
                    "destination shim: a link's receive buffer stays the kernel's to size                      (net.core.rmem_max is under {} KiB and the shim lacks CAP_NET_ADMIN): over                      a long path the source QEMU may then switch over early, with a longer                      downtime",
                    LINK_RECEIVE_BUFFER >> 10
                )),
                Err(e) => {
                    (config.log)(&format!(
                        "destination shim: cannot set up a link's socket: {e}"
                    ));
                    return;
                }
            }
            let _ = link.set_read_timeout(Some(config.link_timeout));
            // One migration at a time: this shim feeds one QEMU, which takes one incoming
            // migration. A connection of another session while one is under way is refused
            // (the other source shim says why), rather than fed to the same QEMU.
            let admit = |header: &LinkHeader| {
                let mut all = sessions.lock().expect("not poisoned");
                all.retain(|s| !s.main_done.load(Ordering::SeqCst));
                if let Some(s) = all.iter().find(|s| s.id == header.session) {
                    return Ok(s.clone());
                }
                // A failed session is being torn down; it holds nothing up.
                if let Some(busy) = all.iter().find(|s| s.failed().is_none()) {
                    return Err(format!(
                        "the destination shim is feeding migration {} to its QEMU ({}) and takes \
                         one migration at a time",
                        busy.hex(),
                        config.qemu
                    ));
                }
                let s = Session::new(header.session);
                all.push(s.clone());
                Ok(s)
            };
            let (header, session) =
                match link::accept_handshake(&mut link, config.key.as_ref(), trusted, admit) {
                    Ok(admitted) => admitted,
                    Err(e) => {
                        let why = match e {
                            link::LinkError::Refused(reason) => reason,
                            other => other.to_string(),
                        };
                        (config.log)(&format!(
                            "destination shim: refused {}: {why}",
                            peer.map_or("a peer".into(), |p| p.to_string())
                        ));
                        return;
                    }
                };
            let _ = link.set_read_timeout(None);
            let main = matches!(header.kind, StreamKind::Main | StreamKind::Pages);
            match header.kind {
                StreamKind::Pages => {
                    if session.failed().is_some() {
                        // Too late: the session's transport gave up waiting for connections.
                        return;
                    }
                    // The first page-transport connection of a session carries the session; the
                    // others join it through its acceptor.
                    let rx = {
                        let mut tx = session.pages_tx.lock().expect("not poisoned");
                        if let Some(tx) = tx.as_ref() {
                            parsed::hand_over(&session, tx, link);
                            return;
                        }
                        let (new_tx, rx) = crossbeam_channel::unbounded();
                        parsed::hand_over(&session, &new_tx, link);
                        *tx = Some(new_tx);
                        rx
                    };
                    session.opened();
                    progress(session.clone(), "destination", config.log.clone());
                    if let Err(why) = parsed::destination_main(&session, &config, rx) {
                        session.fail(format!("main channel (parsing mode): {why}"));
                    }
                    session.closed(true);
                    session.wait_finished();
                    session.report(
                        "destination shim",
                        &config.log,
                        config.on_summary.as_ref(),
                        &done_tx,
                    );
                    return;
                }
                StreamKind::ReturnPath => {
                    if let Err(why) = parsed::destination_return_path(&session, link) {
                        // The return path seldom fails on its own account: when the destination
                        // QEMU or the main stream fails, its break is the echo. Let the main
                        // channel's explanation be recorded first.
                        if session.failed().is_none() {
                            std::thread::sleep(ECHO_GRACE);
                        }
                        session.fail(format!("return path (parsing mode): {why}"));
                    }
                    return;
                }
                // Relayed to the destination QEMU as they are, once its main channel is
                // connected.
                StreamKind::Main | StreamKind::Multifd(_) | StreamKind::Unannounced => {}
            }
            if config.qemu_multifd.is_some() {
                // The destination QEMU waits for multifd channels that only this shim's
                // parsing mode opens, with barriers only it knows where to put.
                let why = match header.kind {
                    StreamKind::Multifd(_) => {
                        "the source QEMU migrates with multifd itself: its channels go to the \
                         destination QEMU as they are, so run the destination shim without \
                         --qemu-multifd"
                    }
                    _ => {
                        "the source shim carries QEMU's main channel opaque (its summary says \
                         why), and only parsing mode can feed the destination QEMU's multifd \
                         channels: run the destination shim without --qemu-multifd (and the \
                         destination QEMU without multifd)"
                    }
                };
                session.opened();
                session.fail(format!("{:?} channel: {why}", header.kind));
                if let Ok(clone) = link.try_clone() {
                    let _ = clone.shutdown(Shutdown::Both);
                }
                session.closed(main);
                // The session failed for good: say so now, whether its main channel came yet
                // or not (if it never comes, nothing else would).
                session.report(
                    "destination shim",
                    &config.log,
                    config.on_summary.as_ref(),
                    &done_tx,
                );
                return;
            }
            session.opened();
            if main {
                progress(session.clone(), "destination", config.log.clone());
            }
            let result = (|| -> Result<(), String> {
                if !main {
                    // QEMU takes its first connection as the main channel: wait for it.
                    session.wait_main_ready(QEMU_READY_TIMEOUT)?;
                }
                let qemu = connect_qemu(&config.qemu)?;
                if main {
                    session.set_main_ready();
                }
                relay(
                    qemu,
                    Vec::new(),
                    link,
                    &session,
                    false,
                    main,
                    config.compression,
                )
            })();
            if let Err(why) = result {
                session.fail(format!("{:?} channel: {why}", header.kind));
            }
            session.closed(main);
            if main {
                session.wait_finished();
                session.report(
                    "destination shim",
                    &config.log,
                    config.on_summary.as_ref(),
                    &done_tx,
                );
            }
        });
        if let Err(e) = spawned {
            // The connection closes with the thread's closure: its QEMU's migration fails.
            log(&format!(
                "destination shim: refused a connection: cannot start a thread: {e}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay between a "QEMU" (one end of a unix socket pair) and a link (a loopback TCP
    /// pair) whose other shim sends `stream` and then its end marker, on the destination side,
    /// for a multifd channel; `over`: the migration is over at the destination already. Returns
    /// the session's failure (the one its summary reports) and the session.
    fn relay_to_destination_qemu(
        stream: &[u8],
        qemu: TestQemu,
        link_cut: bool,
        over: bool,
    ) -> (Option<String>, Arc<Session>) {
        let (qemu_side, qemu_peer) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut other_shim = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (link, _) = listener.accept().unwrap();
        let expected = stream.len();
        match qemu {
            TestQemu::Gone => drop(qemu_peer),
            // A QEMU that takes everything and sends nothing back.
            TestQemu::Loads => {
                std::thread::spawn(move || {
                    let mut peer = qemu_peer;
                    let _ = peer.shutdown(Shutdown::Write);
                    let _ = io::copy(&mut peer, &mut io::sink());
                });
            }
            // One that closes the connection once the whole stream waits in it, unread.
            TestQemu::ClosesUnread => {
                std::thread::spawn(move || {
                    use std::os::fd::AsRawFd;
                    loop {
                        let mut waiting: libc::c_int = 0;
                        // SAFETY: an open socket; FIONREAD writes one int.
                        let rc = unsafe {
                            libc::ioctl(qemu_peer.as_raw_fd(), libc::FIONREAD, &mut waiting)
                        };
                        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
                        if usize::try_from(waiting).unwrap_or(0) >= expected {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    drop(qemu_peer);
                });
            }
        }
        let data = stream.to_vec();
        let sender = std::thread::spawn(move || {
            if link_cut {
                // A few bytes of a frame header, then the connection closes.
                let _ = other_shim.write_all(&[7, 0]);
            } else {
                let _ = link::to_link(
                    &mut data.as_slice(),
                    &mut other_shim,
                    Compression::Lz4,
                    |_, _| {},
                );
            }
            let _ = other_shim.shutdown(Shutdown::Write);
            let _ = io::copy(&mut other_shim, &mut io::sink());
        });
        let mut session = Session::new([1; 16]);
        Arc::get_mut(&mut session).unwrap().after_end_wait = Duration::from_millis(100);
        session.stream_delivered.store(over, Ordering::SeqCst);
        let outcome = relay(
            Conn::Unix(qemu_side),
            Vec::new(),
            link,
            &session,
            false,
            false,
            Compression::Lz4,
        );
        sender.join().unwrap();
        assert_eq!(outcome.is_ok(), session.failed().is_none(), "{outcome:?}");
        (session.failed(), session)
    }

    /// How the destination QEMU of [`relay_to_destination_qemu`] behaves.
    #[derive(Clone, Copy)]
    enum TestQemu {
        Loads,
        Gone,
        ClosesUnread,
    }

    /// A destination QEMU that closed its connection mid-migration fails the relay's writes,
    /// and one that closed it with bytes unread fails its reads: the error says QEMU closed it
    /// (and where to look), not that the other shim failed.
    #[test]
    fn a_relay_names_the_side_that_failed() {
        let stream = vec![0x5a; 4 << 20];
        let relay = |stream: &[u8], qemu, link_cut| {
            relay_to_destination_qemu(stream, qemu, link_cut, false).0
        };
        assert_eq!(relay(&stream, TestQemu::Loads, false), None);
        let err = relay(&stream, TestQemu::Gone, false).unwrap();
        assert!(
            err.contains("the destination QEMU closed the migration connection"),
            "{err}"
        );
        // A stream that fits in the socket's buffer: written whole, then reset.
        let err = relay(&stream[..4096], TestQemu::ClosesUnread, false).unwrap();
        assert!(
            err.contains("the destination QEMU reset the connection of its return path"),
            "{err}"
        );
        let err = relay(&stream, TestQemu::Loads, true).unwrap();
        assert!(err.starts_with("from the other shim: "), "{err}");
    }

    /// When a destination QEMU's closing of a multifd channel comes after the end: the stream
    /// handed to it ends as a finished migration's (parsing mode says so itself), or, where its
    /// bytes say nothing (QEMU's own TLS), QEMU closed its main channel too. A stream that was
    /// cut is never over, whatever QEMU closed.
    #[test]
    fn the_end_at_the_destination_is_told_by_the_stream_or_the_main_channel() {
        use crate::stream::{CONFIGURATION, SECTION_EOF, VMDESCRIPTION};
        let mut opening = b"QEVM\0\0\0\x03".to_vec();
        opening.push(CONFIGURATION);
        opening.extend_from_slice(&4u32.to_be_bytes());
        opening.extend_from_slice(b"pc-q");
        let json = b"{\"page_size\":4096}";
        let mut end = vec![SECTION_EOF, VMDESCRIPTION];
        end.extend_from_slice(&(json.len() as u32).to_be_bytes());
        end.extend_from_slice(json);
        let over = |bytes: &[&[u8]], main_closed: bool| {
            let session = Session::new([2; 16]);
            for b in bytes {
                session.stream_end.lock().unwrap().feed(b);
            }
            session
                .destination_main_closed
                .store(main_closed, Ordering::SeqCst);
            session.over_at_destination()
        };
        assert!(over(&[&opening, &[7; 100], &end], false));
        assert!(!over(&[&opening, &[7; 100]], false));
        assert!(!over(&[&opening, &[7; 100]], true), "a cut stream");
        // TLS records: nothing to read in them.
        let tls = [0x16, 0x03, 0x03, 0x00, 0x40];
        assert!(!over(&[&tls, &[9; 64]], false));
        assert!(over(&[&tls, &[9; 64]], true));
        let parsed = Session::new([3; 16]);
        assert!(!parsed.over_at_destination());
        parsed.stream_delivered.store(true, Ordering::SeqCst);
        assert!(parsed.over_at_destination());
    }

    /// Once the migration is over at the destination, QEMU closing a multifd channel before
    /// reading its last bytes (QEMU 7.2's trailing packet) ends that connection cleanly: the
    /// rest is dropped, the link's stream still verified, and the summary counts it.
    #[test]
    fn a_multifd_channel_closed_after_the_end_is_no_failure() {
        let stream = vec![0x5a; 4 << 20];
        for (qemu, stream) in [
            (TestQemu::ClosesUnread, &stream[..4096]),
            (TestQemu::Gone, &stream[..]),
        ] {
            let (failed, session) = relay_to_destination_qemu(stream, qemu, false, true);
            assert_eq!(failed, None);
            let summary = session.summary();
            assert_eq!(summary.verified, 1);
            assert_eq!(summary.closed_after_end, 1);
            assert!(
                summary
                    .render("destination shim")
                    .contains("closed 1 connection(s) once the migration was over"),
                "{}",
                summary.render("destination shim")
            );
        }
        // One QEMU reads whole counts nothing.
        let (failed, session) = relay_to_destination_qemu(&stream, TestQemu::Loads, false, true);
        assert_eq!(failed, None);
        assert_eq!(session.summary().closed_after_end, 0);
    }

    #[test]
    fn a_migration_takes_only_its_own_qemus_connections() {
        // Over a unix socket the process tells.
        let mut m = Members::default();
        m.admit(StreamKind::Multifd(0), Some(10)).unwrap();
        m.admit(StreamKind::Main, Some(10)).unwrap();
        m.admit(StreamKind::Multifd(1), Some(10)).unwrap();
        let err = m.admit(StreamKind::Main, Some(11)).unwrap_err();
        assert!(
            err.contains("QEMU process 11") && err.contains("process 10"),
            "{err}"
        );
        assert!(m.admit(StreamKind::Multifd(2), Some(11)).is_err());
        // Over TCP the process is unknown: a repeated channel still shows another QEMU.
        let mut m = Members::default();
        m.admit(StreamKind::Main, None).unwrap();
        m.admit(StreamKind::Multifd(0), None).unwrap();
        assert!(
            m.admit(StreamKind::Main, None)
                .unwrap_err()
                .contains("second main channel")
        );
        let err = m.admit(StreamKind::Multifd(0), None).unwrap_err();
        assert!(err.contains("second multifd channel 0"), "{err}");
        m.admit(StreamKind::Multifd(1), None).unwrap();
    }

    #[test]
    fn tls_connections_are_told_apart_by_their_order() {
        // A ClientHello record (TLS 1.0 to 1.3 all write 3.1 in the record layer), and the
        // plain openings that are not one.
        assert!(is_tls_handshake(&[0x16, 0x03, 0x01, 0x02]));
        assert!(is_tls_handshake(&[0x16, 0x03, 0x03, 0x00]));
        assert!(!is_tls_handshake(b"QEVM"));
        assert!(!is_tls_handshake(&crate::multifd::MAGIC.to_be_bytes()));
        assert!(!is_tls_handshake(&[0x17, 0x03, 0x03, 0x00]));
        let mut m = Members::default();
        let main = m.kind_of(Opening::Tls, true);
        assert_eq!(main, StreamKind::Main);
        m.admit(main, Some(7)).unwrap();
        for id in 0..3 {
            let kind = m.kind_of(Opening::Tls, false);
            assert_eq!(kind, StreamKind::Multifd(id));
            m.admit(kind, Some(7)).unwrap();
        }
        // Another QEMU's encrypted connection is refused like any other.
        assert!(m.admit(m.kind_of(Opening::Tls, false), Some(8)).is_err());
        // Plain connections say what they are, whatever the order.
        let plain = Opening::Plain(StreamKind::Multifd(9));
        assert_eq!(m.kind_of(plain, true), StreamKind::Multifd(9));
    }

    #[test]
    fn a_silent_connection_is_the_unannounced_one_only_while_a_migration_can_take_it() {
        let pair = || {
            let (a, b) = UnixStream::pair().unwrap();
            (a, Conn::Unix(b))
        };
        // Silent, with a migration that can take it: after the grace, not before.
        let (_qemu, mut conn) = pair();
        let started = Instant::now();
        let (opening, prefix) = classify(&mut conn, &|| true).unwrap();
        assert_eq!(opening, Opening::Unannounced);
        assert!(prefix.is_empty());
        assert!(started.elapsed() >= UNANNOUNCED_AFTER);
        // The grace counts from when a migration could take it, not from the connection.
        let (_qemu, mut conn) = pair();
        let asked = Instant::now();
        let (opening, _) =
            classify(&mut conn, &|| asked.elapsed() >= Duration::from_millis(150)).unwrap();
        assert_eq!(opening, Opening::Unannounced);
        assert!(asked.elapsed() >= Duration::from_millis(150) + UNANNOUNCED_AFTER);
        // A main channel slow to speak is still the main channel.
        let (mut qemu, mut conn) = pair();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            qemu.write_all(b"QEVM\0\0\0\x03").unwrap();
            qemu
        });
        let (opening, prefix) = classify(&mut conn, &|| false).unwrap();
        assert_eq!(opening, Opening::Plain(StreamKind::Main));
        assert_eq!(prefix, b"QEVM");
        drop(writer.join());
        // Bytes that are no opening: a page record on postcopy-preempt's channel, opened when
        // postcopy starts, if a migration can take it; refused otherwise, and kept either way.
        for takes in [true, false] {
            let (mut qemu, mut conn) = pair();
            qemu.write_all(&[0, 0, 0, 0, 0, 0x10, 0, 0x08]).unwrap();
            match classify(&mut conn, &|| takes) {
                Ok((opening, prefix)) => {
                    assert!(takes);
                    assert_eq!(opening, Opening::Unannounced);
                    assert_eq!(prefix, [0, 0, 0, 0]);
                }
                Err(why) => {
                    assert!(!takes);
                    assert!(why.contains("not a QEMU migration stream"), "{why}");
                }
            }
        }
        // A closed connection is refused at once.
        let (qemu, mut conn) = pair();
        drop(qemu);
        assert!(classify(&mut conn, &|| false).is_err());
        // QEMU opens one such connection per migration.
        let mut m = Members::default();
        m.admit(StreamKind::Main, Some(3)).unwrap();
        let kind = m.kind_of(Opening::Unannounced, false);
        assert_eq!(kind, StreamKind::Unannounced);
        m.admit(kind, Some(3)).unwrap();
        assert!(m.admit(kind, Some(3)).unwrap_err().contains("a second"));
    }

    #[test]
    fn a_summary_reads_the_same_as_json() {
        let mut pages = ClassCounts::default();
        pages.add(PageClass::Zero, 10, 4);
        pages.add(PageClass::Lz4, 3, 5000);
        let summary = Summary {
            session: "0123456789ab".into(),
            mode: "parsing".into(),
            connections: 1,
            elapsed: Duration::from_millis(2500),
            forward: Moved {
                raw: 1000,
                wire: 400,
            },
            back: Moved { raw: 0, wire: 20 },
            verified: 1,
            pages: Some(pages),
            destination_loaded: Some(true),
            source_finished: Some(true),
            closed_after_end: 2,
            process_cpu: Some(Duration::from_millis(1250)),
            peak_resident: Some(150 << 20),
            error: None,
        };
        let json = summary.to_json("source shim");
        assert_eq!(json["side"], "source shim");
        assert_eq!(json["completed"], true);
        assert_eq!(json["elapsed_s"], 2.5);
        assert_eq!(json["stream"]["raw_bytes"], 1000);
        assert_eq!(json["stream"]["wire_bytes"], 400);
        assert_eq!(json["return_path"]["wire_bytes"], 20);
        assert_eq!(json["verified_streams"], 1);
        assert_eq!(json["pages"]["zero"], 10);
        assert_eq!(json["pages"]["lz4"], 3);
        assert_eq!(json["error"], serde_json::Value::Null);
        assert_eq!(json["destination_loaded"], true);
        assert_eq!(json["source_finished"], true);
        assert_eq!(json["closed_after_end"], 2);
        assert_eq!(json["process"]["cpu_s"], 1.25);
        assert_eq!(json["process"]["peak_resident_bytes"], 150 << 20);
        let text = summary.render("source shim");
        assert!(
            text.contains(
                "this shim's process: 1.25 CPU-s over the migration, at most 150 MiB resident"
            ),
            "{text}"
        );
        assert!(
            text.contains("the source QEMU finished its stream"),
            "{text}"
        );
        assert!(
            text.contains("closed 2 connection(s) once the migration was over"),
            "{text}"
        );
        let failed = Summary {
            error: Some("the other shim stopped answering".into()),
            pages: None,
            ..summary
        };
        let json = failed.to_json("destination shim");
        assert_eq!(json["completed"], false);
        assert_eq!(json["error"], "the other shim stopped answering");
        assert_eq!(json["pages"], serde_json::Value::Null);
    }

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
