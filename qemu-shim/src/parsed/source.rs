//! Parsing mode at the source: QEMU's main channel parsed, its RAM pages sent through the page
//! codec and the transport's channels, the bytes between them as blobs on the control
//! connection (see `mod.rs` for the protocol).

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pagecodec::{Generation, MemoryLayout, PAGE_SIZE, Page, PageAddr, ZERO_PAGE};
use pagestream_transport::error::full_message;
use pagestream_transport::{Sender, SenderConfig, StreamSetup, TcpBackend, TcpConnector};

use crate::endpoint::Conn;
use crate::link::{self, Compression, Key, LinkHeader, StreamKind};
use crate::relay::{Watch, WatchedWriter};
use crate::session::Session;
use crate::source::{SourceConfig, connect_destination};
use crate::stream::{self, Event, Parser, RamBlock};

use super::{
    BLOB_BYTES, BLOB_BYTES_THEN_PAGES, BLOB_ENDED_EARLY, BLOB_FINISHED, BLOB_MODE,
    SECTIONS_UNKNOWN, encode_blocks, mode_text,
};

/// Why a migration whose stream ended early failed, as both shims report it.
const ENDED_EARLY: &str = "the source QEMU ended its migration stream before the device state, \
     in the RAM phase: the migration was cancelled or failed at the source";

/// Why a migration whose stream ended past the RAM phase, but not as a finished migration's
/// does ([`stream::Ending::Cut`]), failed.
const ENDED_CUT: &str = "the source QEMU ended its migration stream midway, past the RAM phase \
     (its last bytes are not the end of a migration): the migration was cancelled or failed at \
     the source";

/// Bytes read from QEMU per call.
const READ_CHUNK: usize = 1 << 20;

/// Stream bytes the source reads looking for the RAM block list before it settles for opaque
/// mode (QEMU sends the list within its first few kilobytes).
const MAX_PREAMBLE: usize = 16 << 20;

/// The source's buffering, kept small on purpose. Whatever the source shim holds when QEMU stops
/// the guest must still cross the link before the destination can resume it, and QEMU decides
/// when to stop from the pace at which the shim takes its bytes: a deep pipeline makes that
/// pace look faster than the link and lengthens the downtime. `pagestream bench qemu` at 1
/// Gbit/s: 16 MiB in flight, 256 KiB frames and the kernel's default socket buffers gave
/// 280-590 ms of downtime; these values, with the bounded destination staging (and a 256 KiB
/// send buffer per page channel then, [`UNSENT_BYTES`] now), 27-150 ms, at the same total time.
const INFLIGHT_BYTES: usize = 4 << 20;

/// See [`INFLIGHT_BYTES`].
const FRAME_BYTES: u32 = 64 << 10;

/// The bytes a page channel's socket may hold not yet sent (see [`INFLIGHT_BYTES`] and
/// [`link::limit_unsent`]).
const UNSENT_BYTES: usize = 128 << 10;

const _: () = assert!(READ_CHUNK >= stream::MAX_ITEM);

/// How the source's main channel went.
pub(crate) enum SourceOutcome {
    /// Carried in parsing mode, to the end.
    Carried,
    /// The stream cannot be parsed: carry it opaque, starting with `read` (everything read
    /// from QEMU so far; nothing of it was sent).
    Opaque { read: Vec<u8>, why: String },
}

/// Runs the shims' keyed handshake on a new connection of a parsing-mode session; the
/// connection is given up once the other shim stops answering for `timeout`.
fn authenticate(
    stream: &mut TcpStream,
    key: Option<&Key>,
    session: [u8; 16],
    kind: StreamKind,
    timeout: Duration,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if kind == StreamKind::Pages {
        link::limit_unsent(stream, UNSENT_BYTES)?;
    }
    link::watch_liveness(stream, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    link::connect_handshake(stream, key, LinkHeader { session, kind })
        .map_err(|e| io::Error::other(e.to_string()))?;
    stream.set_read_timeout(None)
}

/// The source's input from QEMU: read straight into the buffer the parser reads (no copy
/// between a read buffer and a parse buffer, a copy of every page otherwise), the unparsed
/// rest of an item moved to the front only when the free space runs short.
struct InputBuffer {
    buf: Vec<u8>,
    /// The unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl InputBuffer {
    /// A buffer holding `unparsed` first.
    fn new(mut unparsed: Vec<u8>) -> Self {
        let end = unparsed.len();
        unparsed.resize(end.max(2 * READ_CHUNK), 0);
        Self {
            buf: unparsed,
            start: 0,
            end,
        }
    }

    fn unparsed(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what QEMU has written (at most [`READ_CHUNK`] bytes); 0 at the end of its stream.
    fn read_from(&mut self, qemu: &mut Conn) -> Result<usize, String> {
        if self.buf.len() - self.end < READ_CHUNK {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < READ_CHUNK {
                self.buf.resize(self.end + READ_CHUNK, 0);
            }
        }
        let end = self.end;
        let got = read_some(qemu, &mut self.buf[end..end + READ_CHUNK])?;
        self.end += got;
        Ok(got)
    }
}

fn read_some(qemu: &mut Conn, buf: &mut [u8]) -> Result<usize, String> {
    loop {
        match qemu.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading from QEMU failed: {e}")),
        }
    }
}

/// The source's side of a parsing-mode session, between the parser and the transport.
struct Outgoing {
    sender: Sender,
    /// Pass of the pages being sent: every run of bytes that follows pages ends one.
    generation: Generation,
    pages_in_pass: bool,
    /// The destination knows the pages of this pass may be written as they come.
    pages_released: bool,
    /// Stream bytes not sent yet.
    carry: Vec<u8>,
    blob_bytes: u64,
    /// RAM end-of-section markers among the bytes in `carry` ([`SECTIONS_UNKNOWN`] once the
    /// parser passes through what it does not understand).
    sections_ended: u32,
    /// Where and why the parser stopped taking pages out, if it did.
    pass_through: Option<(String, bool, u64)>,
    error: Option<String>,
}

impl Outgoing {
    fn event(&mut self, event: Event<'_>) {
        if self.error.is_some() {
            return;
        }
        let result = match event {
            Event::Bytes(bytes) => {
                self.carry.extend_from_slice(bytes);
                Ok(())
            }
            Event::Page {
                block,
                offset,
                data,
                ..
            } => {
                let page: &Page = data.try_into().expect("the parser hands out whole pages");
                self.page(block, offset, page)
            }
            Event::Fill {
                block,
                offset,
                byte,
                ..
            } => {
                if byte == 0 {
                    self.page(block, offset, &ZERO_PAGE)
                } else {
                    self.page(block, offset, &[byte; PAGE_SIZE])
                }
            }
            Event::RamSectionEnd => {
                self.sections_ended = self
                    .sections_ended
                    .saturating_add(1)
                    .min(SECTIONS_UNKNOWN - 1);
                Ok(())
            }
            Event::RamBlocks(_) => Err("the stream lists its RAM blocks twice".to_string()),
            Event::PassThrough {
                reason,
                expected,
                at,
            } => {
                if !expected {
                    // End-of-section markers may follow unseen among the bytes.
                    self.sections_ended = SECTIONS_UNKNOWN;
                }
                self.pass_through = Some((reason, expected, at));
                Ok(())
            }
        };
        if let Err(e) = result {
            self.error = Some(e);
        }
    }

    fn page(&mut self, block: usize, offset: u64, page: &Page) -> Result<(), String> {
        // The bytes before this page (its section's header) must reach QEMU first.
        if !self.carry.is_empty() || !self.pages_released {
            self.send_bytes(BLOB_BYTES_THEN_PAGES)?;
        }
        let addr = PageAddr::new(block as u32, offset / PAGE_SIZE as u64);
        self.sender
            .send_page(addr, self.generation, page)
            .map_err(|e| full_message(&e))?;
        self.pages_in_pass = true;
        Ok(())
    }

    /// Sends the bytes collected so far, after a barrier behind the pages that came before them.
    fn flush(&mut self) -> Result<(), String> {
        if self.carry.is_empty() {
            return Ok(());
        }
        self.send_bytes(BLOB_BYTES)
    }

    /// Sends the bytes collected so far (none, for a [`BLOB_BYTES_THEN_PAGES`]), after a barrier
    /// behind the pages that came before them.
    fn send_bytes(&mut self, kind: u8) -> Result<(), String> {
        if self.pages_in_pass {
            self.sender
                .end_pass(self.generation)
                .map_err(|e| full_message(&e))?;
            self.generation += 1;
            self.pages_in_pass = false;
        }
        self.pages_released = kind == BLOB_BYTES_THEN_PAGES;
        let mut blob = Vec::with_capacity(5 + self.carry.len());
        blob.push(kind);
        blob.extend_from_slice(&self.sections_ended.to_be_bytes());
        blob.extend_from_slice(&self.carry);
        if self.sections_ended != SECTIONS_UNKNOWN {
            self.sections_ended = 0;
        }
        self.sender
            .send_blob(self.generation, &blob)
            .map_err(|e| full_message(&e))?;
        self.blob_bytes += blob.len() as u64;
        self.carry.clear();
        Ok(())
    }
}

/// Carries the source's main QEMU connection in parsing mode, or says why it cannot.
pub(crate) fn source_main(
    mut qemu: Conn,
    prefix: Vec<u8>,
    session: &Arc<Session>,
    config: &SourceConfig,
    to: SocketAddr,
) -> Result<SourceOutcome, String> {
    let mut parser = Parser::new();
    let mut read = prefix.clone();
    let mut held = prefix;
    let mut carry = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let blocks = loop {
        let mut blocks = None;
        let mut stop = None;
        let n = parser.parse(&held, &mut |event| match event {
            Event::Bytes(bytes) => carry.extend_from_slice(bytes),
            Event::RamBlocks(list) => blocks = Some(list.to_vec()),
            Event::PassThrough { reason, .. } => stop = Some(reason),
            // The parser stops right after the block list: no page and no end of section
            // comes before it.
            Event::Page { .. } | Event::Fill { .. } | Event::RamSectionEnd => {}
        });
        held.drain(..n);
        if let Some(why) = stop {
            return Ok(SourceOutcome::Opaque { read, why });
        }
        if let Some(blocks) = blocks {
            break blocks;
        }
        if n > 0 {
            continue;
        }
        if read.len() > MAX_PREAMBLE {
            return Ok(SourceOutcome::Opaque {
                read,
                why: format!("no RAM block list in its first {MAX_PREAMBLE} bytes"),
            });
        }
        let got = read_some(&mut qemu, &mut buf)?;
        if got == 0 {
            return Ok(SourceOutcome::Opaque {
                read,
                why: "the stream ended before its RAM section".into(),
            });
        }
        read.extend_from_slice(&buf[..got]);
        held.extend_from_slice(&buf[..got]);
    };
    session
        .forward_raw
        .fetch_add(read.len() as u64, Ordering::Relaxed);
    drop(read);

    let layout = MemoryLayout::new(blocks.iter().map(RamBlock::pages).collect())
        .map_err(|e| format!("the RAM blocks do not fit a page layout: {e}"))?;
    let (key, id, timeout) = (config.key.clone(), session.id, config.link_timeout);
    let setup: StreamSetup =
        Arc::new(move |stream| authenticate(stream, key.as_ref(), id, StreamKind::Pages, timeout));
    let backend = TcpBackend::detect(&config.log);
    let connector = TcpConnector::new(to, backend, Duration::from_secs(10)).with_setup(setup);
    let sender = Sender::connect(
        Box::new(connector),
        layout,
        SenderConfig {
            channels: config.channels,
            log: config.log.clone(),
            inflight_bytes: INFLIGHT_BYTES,
            frame_bytes: FRAME_BYTES,
            timeout: config.link_timeout,
            dup_cache_bytes: config.dup_cache_bytes,
            delta_cache_bytes: config.delta_cache_bytes,
            ..SenderConfig::default()
        },
    )
    .map_err(|e| format!("cannot open the page transport: {}", full_message(&e)))?;
    let channels = sender.channels();
    // Said now, so that a migration that fails midway reports the mode it ran in.
    session.parsing.store(true, Ordering::SeqCst);
    *session.mode.lock().expect("not poisoned") = Some(mode_text(channels, sender.backend(), None));
    let back = source_return_path(&qemu, session, config, to)?;
    {
        let q = qemu.try_clone().map_err(|e| e.to_string())?;
        session.on_failure(Box::new(move || q.shutdown(Shutdown::Both)));
    }

    let mut out = Outgoing {
        sender,
        generation: 0,
        pages_in_pass: false,
        pages_released: false,
        carry,
        sections_ended: 0,
        blob_bytes: 0,
        pass_through: None,
        error: None,
    };
    let blocks_blob = encode_blocks(&blocks);
    out.sender
        .send_blob(0, &blocks_blob)
        .map_err(|e| full_message(&e))?;
    out.blob_bytes += blocks_blob.len() as u64;
    let mut input = InputBuffer::new(held);
    drop(buf);
    loop {
        loop {
            let n = parser.parse(input.unparsed(), &mut |event| out.event(event));
            input.consume(n);
            if n == 0 {
                break;
            }
        }
        if let Some(e) = out.error.take() {
            return Err(e);
        }
        // Whatever QEMU wrote so far goes now: commands and device state must not wait.
        out.flush()?;
        session.parsed_wire.store(
            out.sender.stats().wire_bytes() + out.blob_bytes,
            Ordering::Relaxed,
        );
        if let Some(e) = session.failed() {
            return Err(format!("the session failed: {e}"));
        }
        let got = input.read_from(&mut qemu)?;
        if got == 0 {
            break;
        }
        session.forward_raw.fetch_add(got as u64, Ordering::Relaxed);
    }
    let ending = parser.finish(input.unparsed(), &mut |event| out.event(event));
    if let Some(e) = out.error.take() {
        return Err(e);
    }
    out.flush()?;
    let mode = mode_text(channels, out.sender.backend(), out.pass_through.as_ref());
    let mut note = vec![BLOB_MODE];
    note.extend_from_slice(mode.as_bytes());
    out.sender
        .send_blob(out.generation, &note)
        .map_err(|e| full_message(&e))?;
    let mut blob_bytes = out.blob_bytes + note.len() as u64;
    // Whether the source QEMU finished its stream, and why not when it did not.
    let (finished, ended_early) = match ending {
        stream::Ending::Finished => (Some(true), None),
        stream::Ending::Early => (Some(false), Some(ENDED_EARLY)),
        stream::Ending::Cut => (Some(false), Some(ENDED_CUT)),
        stream::Ending::AfterRam | stream::Ending::NotFollowed => (None, None),
    };
    *session.stream_told.lock().expect("not poisoned") = finished;
    if finished == Some(true) {
        out.sender
            .send_blob(out.generation, &[BLOB_FINISHED])
            .map_err(|e| full_message(&e))?;
        blob_bytes += 1;
    }
    if let Some(why) = ended_early {
        // Every byte was carried, but the migration did not end: not a completed one, on
        // either side. Said without shutting anything down, so that the return paths wind
        // down in order.
        let mut note = vec![BLOB_ENDED_EARLY];
        note.extend_from_slice(why.as_bytes());
        out.sender
            .send_blob(out.generation, &note)
            .map_err(|e| full_message(&e))?;
        blob_bytes += note.len() as u64;
        session.unfinished(why.into());
    }
    let summary = out
        .sender
        .finish()
        .map_err(|e| format!("the page transport failed: {}", full_message(&e)))?;
    session
        .parsed_wire
        .store(summary.stats.wire_bytes() + blob_bytes, Ordering::Relaxed);
    *session.pages.lock().expect("not poisoned") = Some(summary.stats.classes);
    *session.mode.lock().expect("not poisoned") = Some(mode);
    back.join()
        .unwrap_or_else(|_| Err("the return-path thread panicked".into()))?;
    Ok(SourceOutcome::Carried)
}

/// Opens the return-path link and relays what comes back on it into the source QEMU.
fn source_return_path(
    qemu: &Conn,
    session: &Arc<Session>,
    config: &SourceConfig,
    to: SocketAddr,
) -> Result<std::thread::JoinHandle<Result<(), String>>, String> {
    let mut link = connect_destination(to, Duration::ZERO)?;
    authenticate(
        &mut link,
        config.key.as_ref(),
        session.id,
        StreamKind::ReturnPath,
        config.link_timeout,
    )
    .map_err(|e| format!("return path: {e}"))?;
    {
        let l = link.try_clone().map_err(|e| e.to_string())?;
        session.on_failure(Box::new(move || {
            let _ = l.shutdown(Shutdown::Both);
        }));
    }
    // Nothing goes this way but the end marker.
    link::to_link(&mut io::empty(), &mut link, Compression::Lz4, |_, _| {})
        .map_err(|e| format!("return path: {e}"))?;
    let mut qemu_out = qemu.try_clone().map_err(|e| e.to_string())?;
    let session = session.clone();
    crate::session::spawn_named("ps-return-path", move || {
        let (raw, wire) = session.direction(false);
        let mut to_qemu = WatchedWriter {
            inner: &mut qemu_out,
            watch: Watch::ReturnPath(&session),
            failed: false,
        };
        let received = link::from_link(&mut link, &mut to_qemu, |r, w| {
            raw.fetch_add(r, Ordering::Relaxed);
            wire.fetch_add(w, Ordering::Relaxed);
        });
        match received {
            Ok(_) => {
                session.verified.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let why = if to_qemu.failed {
                    crate::relay::return_path_write_error(&e)
                } else {
                    format!("return path from the other shim: {}", link::link_error(&e))
                };
                session.fail(why.clone());
                Err(why)
            }
        }
    })
    .map_err(|e| format!("return path: cannot start a thread: {e}"))
}

/// Gives a page-transport connection to its session's acceptor (and to the session's list of
/// sockets to shut down if it fails).
pub(crate) fn hand_over(
    session: &Session,
    to: &crossbeam_channel::Sender<TcpStream>,
    link: TcpStream,
) {
    if let Ok(clone) = link.try_clone() {
        session.on_failure(Box::new(move || {
            let _ = clone.shutdown(Shutdown::Both);
        }));
    }
    let _ = to.send(link);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_buffer_gives_every_byte_once_in_order() {
        use std::io::Write;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let stream: Vec<u8> = (0..5 * READ_CHUNK + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        // The first bytes came with the connection's classification, before the buffer.
        let sent = stream[10..].to_vec();
        let writer = std::thread::spawn(move || {
            // Uneven writes, so that reads end mid-item.
            for piece in sent.chunks(777_777) {
                b.write_all(piece).unwrap();
            }
        });
        let mut qemu = Conn::Unix(a);
        let mut input = InputBuffer::new(stream[..10].to_vec());
        let mut out = Vec::new();
        // Consume in odd steps, leaving a tail each time, as the parser does.
        let mut consumed = 10;
        out.extend_from_slice(input.unparsed());
        loop {
            let got = input.read_from(&mut qemu).unwrap();
            let unparsed = input.unparsed();
            out.extend_from_slice(&unparsed[consumed..]);
            let take = if got == 0 {
                unparsed.len()
            } else {
                unparsed.len().saturating_sub(4_099)
            };
            input.consume(take);
            consumed = input.unparsed().len();
            if got == 0 {
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(out.len(), stream.len());
        assert!(out == stream);
        // A tail never grows the buffer past a read's room beyond it.
        assert!(input.buf.len() <= 2 * READ_CHUNK);
    }
}
