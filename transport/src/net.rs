//! Making connections: TCP (with io_uring or blocking data channels) and in-memory.
//!
//! The source side is a [`Connector`] (opens the control connection, then one data connection per
//! channel), the destination side an [`Acceptor`] (hands out incoming connections with their
//! first message read, so that the session can tell control from data).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::channel::{FrameReader, FrameWriter};
use crate::control::{Join, Message, MessageReader};
use crate::error::TransportError;
use crate::memory::{self, FaultPlan, MemStream};
use crate::tcp::{TcpFrameReader, TcpFrameWriter};
use crate::uring::{self, UringFrameReader, UringFrameWriter};

/// Shuts a connection down from any thread, so that whatever blocks on it returns.
pub type Killer = Arc<dyn Fn() + Send + Sync>;

/// Where log lines go.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Runs on every TCP connection of a session before the transport speaks on it: on the source
/// right after connecting. An embedding application authenticates its connections here (the
/// QEMU shim runs its keyed handshake); an error abandons the connection and the session.
pub type StreamSetup = Arc<dyn Fn(&mut TcpStream) -> io::Result<()> + Send + Sync>;

/// A log that prints to standard error.
pub fn stderr_log() -> Log {
    Arc::new(|line| eprintln!("pagestream: {line}"))
}

/// A control connection: a byte stream in both directions, usable from two threads.
pub struct ControlConn {
    /// Receiving side.
    pub reader: Box<dyn Read + Send>,
    /// Sending side.
    pub writer: Box<dyn Write + Send>,
    /// Shuts both directions down.
    pub killer: Killer,
}

impl std::fmt::Debug for ControlConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlConn")
    }
}

/// A new connection on the destination, classified by its first message.
pub enum Incoming {
    /// A control connection and its first message (normally `Hello`).
    Control(ControlConn, Message),
    /// A data connection that joined with `Join`.
    Data(Join, Box<dyn FrameReader>, Killer),
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Control(_, first) => write!(f, "Control(first message {})", first.name()),
            Incoming::Data(join, _, _) => write!(f, "Data({join:?})"),
        }
    }
}

/// Opens the connections of a session on the source.
pub trait Connector: Send {
    /// Opens the control connection; reads on it time out after `timeout`.
    fn control(&mut self, timeout: Duration) -> Result<ControlConn, TransportError>;
    /// Opens data channel `join.channel` and sends `join` on it.
    fn data(&mut self, join: Join) -> Result<(Box<dyn FrameWriter>, Killer), TransportError>;
    /// The backend in use, for logs and reports.
    fn backend(&self) -> &'static str;
    /// Sets how many unsent bytes each data channel opened from now on may hold.
    fn set_writer_queue(&mut self, bytes: usize) {
        let _ = bytes;
    }
}

/// Accepts the connections of a session on the destination.
pub trait Acceptor: Send {
    /// The next connection, waiting at most `timeout`.
    fn accept(&mut self, timeout: Duration) -> Result<Incoming, TransportError>;
    /// The backend in use, for logs and reports.
    fn backend(&self) -> &'static str;
}

/// Which data-channel implementation TCP connections use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpBackend {
    /// io_uring, where the kernel allows it.
    Uring,
    /// Blocking sockets.
    Blocking,
}

impl TcpBackend {
    /// io_uring if it works here, blocking sockets otherwise (with a log line saying why).
    pub fn detect(log: &Log) -> Self {
        Self::choose(uring::probe(), log)
    }

    /// The backend for a given outcome of the io_uring probe.
    pub fn choose(probe: io::Result<()>, log: &Log) -> Self {
        match probe {
            Ok(()) => TcpBackend::Uring,
            Err(e) => {
                log(&format!(
                    "io_uring is not available ({e}); using blocking sockets instead"
                ));
                TcpBackend::Blocking
            }
        }
    }

    /// The backend's name.
    pub fn name(self) -> &'static str {
        match self {
            TcpBackend::Uring => "io_uring TCP",
            TcpBackend::Blocking => "blocking TCP",
        }
    }
}

/// Bytes of unsent frames a data-channel writer may hold before `submit` blocks.
pub const DEFAULT_WRITER_QUEUE: usize = 4 << 20;
/// Receive buffer per data channel (at least two of the largest frames).
pub const DEFAULT_READER_BUFFER: usize = 2 << 20;

fn socket_killer(stream: &TcpStream) -> io::Result<Killer> {
    let clone = stream.try_clone()?;
    Ok(Arc::new(move || {
        let _ = clone.shutdown(Shutdown::Both);
    }))
}

fn control_conn(stream: TcpStream, timeout: Duration) -> io::Result<ControlConn> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(ControlConn {
        reader: Box::new(stream.try_clone()?),
        killer: socket_killer(&stream)?,
        writer: Box::new(stream),
    })
}

/// Connects to a destination over TCP.
pub struct TcpConnector {
    addr: SocketAddr,
    backend: TcpBackend,
    writer_queue: usize,
    connect_timeout: Duration,
    setup: Option<StreamSetup>,
}

impl std::fmt::Debug for TcpConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConnector")
            .field("addr", &self.addr)
            .field("backend", &self.backend)
            .field("setup", &self.setup.is_some())
            .finish()
    }
}

impl TcpConnector {
    /// A connector to `addr` whose data channels use `backend`.
    pub fn new(addr: SocketAddr, backend: TcpBackend, connect_timeout: Duration) -> Self {
        Self {
            addr,
            backend,
            writer_queue: DEFAULT_WRITER_QUEUE,
            connect_timeout,
            setup: None,
        }
    }

    /// Runs `setup` on every connection right after it is made.
    pub fn with_setup(mut self, setup: StreamSetup) -> Self {
        self.setup = Some(setup);
        self
    }

    fn connect(&self, what: &str) -> Result<TcpStream, TransportError> {
        let mut stream =
            TcpStream::connect_timeout(&self.addr, self.connect_timeout).map_err(|source| {
                TransportError::Connect {
                    what: format!("cannot open the {what} to {}", self.addr),
                    source,
                }
            })?;
        if let Some(setup) = &self.setup {
            setup(&mut stream).map_err(|source| TransportError::Connect {
                what: format!("cannot set up the {what} to {}", self.addr),
                source,
            })?;
        }
        Ok(stream)
    }
}

impl Connector for TcpConnector {
    fn control(&mut self, timeout: Duration) -> Result<ControlConn, TransportError> {
        let stream = self.connect("control connection")?;
        control_conn(stream, timeout).map_err(|source| TransportError::Connect {
            what: format!("cannot set up the control connection to {}", self.addr),
            source,
        })
    }

    fn data(&mut self, join: Join) -> Result<(Box<dyn FrameWriter>, Killer), TransportError> {
        let what = format!("data channel {}", join.channel);
        let mut stream = self.connect(&what)?;
        let setup = |stream: &mut TcpStream| -> io::Result<()> {
            stream.set_nodelay(true)?;
            let mut bytes = Vec::new();
            Message::Join(join).encode(&mut bytes);
            stream.write_all(&bytes)
        };
        setup(&mut stream).map_err(|source| TransportError::Connect {
            what: format!("cannot join {what} to {}", self.addr),
            source,
        })?;
        let killer = socket_killer(&stream).map_err(|source| TransportError::Connect {
            what: format!("cannot set up {what}"),
            source,
        })?;
        let writer: Box<dyn FrameWriter> = match self.backend {
            TcpBackend::Uring => Box::new(
                UringFrameWriter::new(stream, self.writer_queue).map_err(|source| {
                    TransportError::Connect {
                        what: format!("cannot create an io_uring for {what}"),
                        source,
                    }
                })?,
            ),
            TcpBackend::Blocking => Box::new(TcpFrameWriter::new(stream)),
        };
        Ok((writer, killer))
    }

    fn backend(&self) -> &'static str {
        self.backend.name()
    }

    fn set_writer_queue(&mut self, bytes: usize) {
        self.writer_queue = bytes.max(1);
    }
}

/// Accepts sessions on a TCP listener.
pub struct TcpAcceptor {
    listener: TcpListener,
    backend: TcpBackend,
    max_frame_body: u32,
    log: Log,
}

impl std::fmt::Debug for TcpAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpAcceptor")
            .field("listener", &self.listener)
            .field("backend", &self.backend)
            .finish()
    }
}

impl TcpAcceptor {
    /// An acceptor on a bound listener.
    pub fn new(listener: TcpListener, backend: TcpBackend, max_frame_body: u32, log: Log) -> Self {
        Self {
            listener,
            backend,
            max_frame_body,
            log,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Waits until the listener has a connection or `deadline` passes.
    fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd for the duration of the call, and the count is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0)
    }
}

/// Reads exactly one message from a fresh connection, without reading past it.
fn first_message(stream: &mut TcpStream) -> Result<Message, String> {
    let mut reader = MessageReader::new();
    loop {
        let need = reader.needed().map_err(|e| e.to_string())?;
        if need == 0 {
            break;
        }
        let mut buf = vec![0u8; need];
        stream
            .read_exact(&mut buf)
            .map_err(|e| format!("no complete first message ({e})"))?;
        reader.feed(&buf);
    }
    reader
        .next_message()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no first message".to_string())
}

/// Tells a fresh destination-side connection's role from its first message and sets it up.
fn classify_tcp(
    mut stream: TcpStream,
    timeout: Duration,
    backend: TcpBackend,
    max_frame_body: u32,
) -> Result<Incoming, String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    match first_message(&mut stream)? {
        message @ Message::Hello(_) => {
            let conn = control_conn(stream, timeout).map_err(|e| e.to_string())?;
            Ok(Incoming::Control(conn, message))
        }
        Message::Join(join) => {
            // Data reads block until the peer sends or the session shuts the socket down.
            stream.set_read_timeout(None).map_err(|e| e.to_string())?;
            let killer = socket_killer(&stream).map_err(|e| e.to_string())?;
            let reader: Box<dyn FrameReader> = match backend {
                TcpBackend::Uring => Box::new(
                    UringFrameReader::new(stream, DEFAULT_READER_BUFFER, max_frame_body)
                        .map_err(|e| format!("cannot create an io_uring: {e}"))?,
                ),
                TcpBackend::Blocking => Box::new(TcpFrameReader::new(
                    stream,
                    DEFAULT_READER_BUFFER,
                    max_frame_body,
                )),
            };
            Ok(Incoming::Data(join, reader, killer))
        }
        other => Err(format!("unexpected first message {}", other.name())),
    }
}

impl Acceptor for TcpAcceptor {
    fn accept(&mut self, timeout: Duration) -> Result<Incoming, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout {
                    what: "waiting for a connection",
                    after: timeout,
                });
            }
            let ready = self
                .wait_readable(deadline)
                .map_err(|source| TransportError::Connect {
                    what: "cannot wait for connections".into(),
                    source,
                })?;
            if !ready {
                continue;
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(TransportError::Connect {
                        what: "cannot accept a connection".into(),
                        source,
                    });
                }
            };
            match classify_tcp(stream, timeout, self.backend, self.max_frame_body) {
                Ok(incoming) => return Ok(incoming),
                Err(why) => (self.log)(&format!("ignored a connection from {peer}: {why}")),
            }
        }
    }

    fn backend(&self) -> &'static str {
        self.backend.name()
    }
}

/// Accepts sessions from TCP connections that the embedding application accepted (and
/// authenticated) itself, handed over through a channel: for an application that serves
/// several kinds of connection on one listening port.
pub struct StreamAcceptor {
    streams: Receiver<TcpStream>,
    backend: TcpBackend,
    max_frame_body: u32,
    log: Log,
}

impl std::fmt::Debug for StreamAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamAcceptor")
            .field("backend", &self.backend)
            .finish()
    }
}

impl StreamAcceptor {
    /// An acceptor of the connections sent through `streams`.
    pub fn new(
        streams: Receiver<TcpStream>,
        backend: TcpBackend,
        max_frame_body: u32,
        log: Log,
    ) -> Self {
        Self {
            streams,
            backend,
            max_frame_body,
            log,
        }
    }
}

impl Acceptor for StreamAcceptor {
    fn accept(&mut self, timeout: Duration) -> Result<Incoming, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let stream = match self.streams.recv_timeout(left) {
                Ok(stream) => stream,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(TransportError::Timeout {
                        what: "waiting for a connection",
                        after: timeout,
                    });
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::Connect {
                        what: "no more connections will come".into(),
                        source: io::Error::from(io::ErrorKind::NotConnected),
                    });
                }
            };
            let peer = stream.peer_addr().ok();
            match classify_tcp(stream, timeout, self.backend, self.max_frame_body) {
                Ok(incoming) => return Ok(incoming),
                Err(why) => (self.log)(&format!(
                    "ignored a connection from {}: {why}",
                    peer.map_or("a peer".into(), |p| p.to_string())
                )),
            }
        }
    }

    fn backend(&self) -> &'static str {
        self.backend.name()
    }
}

/// What an in-memory connector hands to its acceptor.
enum MemIncoming {
    Control(MemStream),
    Data(Join, memory::MemFrameReader, Killer),
}

/// Source side of an in-memory network.
pub struct MemConnector {
    tx: Sender<MemIncoming>,
    faults: Vec<FaultPlan>,
    capacity: usize,
}

/// Destination side of an in-memory network.
pub struct MemAcceptor {
    rx: Receiver<MemIncoming>,
}

impl std::fmt::Debug for MemConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemConnector")
            .field("faults", &self.faults)
            .finish()
    }
}

impl std::fmt::Debug for MemAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemAcceptor")
    }
}

/// A connected pair for tests: data channel `i` gets `faults[i]` (none if absent) and holds up
/// to `capacity` frames in flight.
pub fn memory_network(faults: Vec<FaultPlan>, capacity: usize) -> (MemConnector, MemAcceptor) {
    let (tx, rx) = unbounded();
    (
        MemConnector {
            tx,
            faults,
            capacity,
        },
        MemAcceptor { rx },
    )
}

fn mem_control(stream: MemStream, timeout: Duration) -> ControlConn {
    let mut stream = stream;
    stream.set_read_timeout(Some(timeout));
    let killer: Killer = Arc::new(stream.closer());
    ControlConn {
        writer: Box::new(stream.writer()),
        reader: Box::new(stream),
        killer,
    }
}

impl Connector for MemConnector {
    fn control(&mut self, timeout: Duration) -> Result<ControlConn, TransportError> {
        let (ours, theirs) = memory::duplex();
        self.tx
            .send(MemIncoming::Control(theirs))
            .map_err(|_| TransportError::Connect {
                what: "in-memory destination is gone".into(),
                source: io::ErrorKind::ConnectionRefused.into(),
            })?;
        Ok(mem_control(ours, timeout))
    }

    fn data(&mut self, join: Join) -> Result<(Box<dyn FrameWriter>, Killer), TransportError> {
        let faults = self
            .faults
            .get(join.channel as usize)
            .cloned()
            .unwrap_or_default();
        let (writer, reader, killer) = memory::frame_pipe(self.capacity, faults);
        self.tx
            .send(MemIncoming::Data(join, reader, killer.clone()))
            .map_err(|_| TransportError::Connect {
                what: "in-memory destination is gone".into(),
                source: io::ErrorKind::ConnectionRefused.into(),
            })?;
        Ok((Box::new(writer), killer))
    }

    fn backend(&self) -> &'static str {
        "in-memory"
    }
}

impl Acceptor for MemAcceptor {
    fn accept(&mut self, timeout: Duration) -> Result<Incoming, TransportError> {
        let incoming = self
            .rx
            .recv_timeout(timeout)
            .map_err(|_| TransportError::Timeout {
                what: "waiting for a connection",
                after: timeout,
            })?;
        match incoming {
            MemIncoming::Control(stream) => {
                let mut conn = mem_control(stream, timeout);
                let message = read_message(&mut conn.reader, &mut MessageReader::new())?;
                Ok(Incoming::Control(conn, message))
            }
            MemIncoming::Data(join, reader, killer) => {
                Ok(Incoming::Data(join, Box::new(reader), killer))
            }
        }
    }

    fn backend(&self) -> &'static str {
        "in-memory"
    }
}

/// Turns a timed-out read of the control connection into the error that says what it means:
/// the peer stopped answering for `after` (the read timeout).
pub fn timeout_error(err: TransportError, what: &'static str, after: Duration) -> TransportError {
    match err {
        TransportError::Control {
            what: "read timed out",
            ..
        } => TransportError::Timeout { what, after },
        other => other,
    }
}

/// Reads the next control message from `reader`, buffering in `pending`.
pub fn read_message(
    reader: &mut Box<dyn Read + Send>,
    pending: &mut MessageReader,
) -> Result<Message, TransportError> {
    loop {
        if let Some(message) = pending.next_message().map_err(TransportError::BadMessage)? {
            return Ok(message);
        }
        let mut buf = [0u8; 64 << 10];
        let n = match reader.read(&mut buf) {
            Ok(0) => {
                return Err(TransportError::Control {
                    what: "the peer closed the control connection",
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(TransportError::Control {
                    what: "read timed out",
                    source: e,
                });
            }
            Err(source) => {
                return Err(TransportError::Control {
                    what: "read failed",
                    source,
                });
            }
        };
        pending.feed(&buf[..n]);
    }
}

/// Sends one control message.
pub fn write_message(writer: &mut dyn Write, message: &Message) -> Result<(), TransportError> {
    let mut bytes = Vec::new();
    message.encode(&mut bytes);
    writer
        .write_all(&bytes)
        .and_then(|()| writer.flush())
        .map_err(|source| TransportError::Control {
            what: "write failed",
            source,
        })
}
