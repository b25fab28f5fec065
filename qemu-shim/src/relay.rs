//! Opaque mode: a QEMU connection carried to the other host as an ordered byte stream,
//! compressed in chunks, with its return direction carried back (`link.rs` frames it).
//!
//! Each direction is a plain read-compress-write loop: when the network is slow, writes block,
//! reads stop, and QEMU's own writes block, so QEMU measures the real bandwidth and the shim
//! holds no more than a chunk and the socket buffers. Both shims relay this way every
//! connection of a migration in opaque mode, and in parsing mode every connection but the main
//! channel (multifd channels); the relays also read the main channel's bytes as they pass for
//! how the migration ended (`stream_end.rs`, `return_path.rs`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::endpoint::Conn;
use crate::link::{self, Compression};
use crate::session::Session;

/// Which of a session's watches reads the bytes a relay moves: those of the main channel only.
#[derive(Clone, Copy)]
pub(crate) enum Watch<'a> {
    Nothing,
    /// The return path ([`ReturnPathWatch`](crate::return_path::ReturnPathWatch)).
    ReturnPath(&'a Session),
    /// The migration stream's end ([`EndWatch`](crate::stream_end::EndWatch)).
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
pub(crate) const AFTER_END_WAIT: Duration = Duration::from_secs(3);

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
pub(crate) fn relay(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

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
}
