//! Parsing mode: QEMU's main channel with its RAM pages taken out of the stream and sent through
//! the page codec and the multi-channel transport; everything else carried in order on the
//! transport's control connection; a stream QEMU accepts rebuilt on the destination.
//!
//! Source: the [`Parser`] reads the stream until the RAM block list. Nothing leaves the host
//! before that, so a stream it cannot read is still carried whole in opaque mode. Then a
//! transport session opens (the block list as its memory layout, every connection through the
//! shims' keyed handshake), plus one link for the return path. Each page goes to
//! [`Sender::send_page`]; the bytes between pages are collected and, as soon as a page or the end
//! of what QEMU wrote so far comes, sent as a blob, after a barrier ([`Sender::end_pass`]) when
//! pages came before them. A blob's tag is the number of passes ended before it.
//!
//! Destination: the channels decode pages into a bounded staging area, by channel and pass. One
//! writer thread rebuilds QEMU's stream from it. A blob with tag `t` arrives only after every
//! page of the passes below `t` was applied; the writer writes those pages as fresh RAM records,
//! then the blob's bytes. So every page reaches QEMU before the bytes that followed it at the
//! source (its section's end marker above all) and after the bytes that preceded it (its
//! section's header): the order QEMU's loader needs. The source marks the last blob before a
//! pass's pages ([`BLOB_BYTES_THEN_PAGES`]); once that is written, the pass's pages are written
//! as they arrive, without waiting for the pass to end, so the destination QEMU loads while the
//! link carries. Pages of later passes wait in the staging area, and when it and the writer
//! hold [`STAGED_LIMIT`] bytes between them the channels stop reading (pages the writer may
//! write only while it has others to write): the source feels the destination's pace through
//! the link, and the destination never lags far behind (which would lengthen the downtime).
//! Pages the codec found unchanged are not written at all: the destination QEMU already holds
//! that content.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use pagecodec::{
    Generation, MemoryLayout, PAGE_SIZE, Page, PageAddr, PageSink, SinkError, ZERO_PAGE,
};
use pagestream_transport::channel::DEFAULT_MAX_FRAME_BODY;
use pagestream_transport::error::full_message;
use pagestream_transport::net::Acceptor as _;
use pagestream_transport::{
    ReceiverConfig, ReceiverEvent, Sender, SenderConfig, SessionStats, StreamAcceptor, StreamSetup,
    TcpBackend, TcpConnector, accept,
};

use crate::destination::{DestinationConfig, QEMU_READY_TIMEOUT};
use crate::endpoint::{Conn, connect_qemu};
use crate::link::{self, Compression, Key, LinkHeader, StreamKind};
use crate::multifd::{self, MultifdOut};
use crate::relay::{Watch, WatchedReader, WatchedWriter};
use crate::session::Session;
use crate::source::{SourceConfig, connect_destination};
use crate::stream::{self, Event, MAX_RAM_BLOCKS, Parser, RamBlock, TARGET_PAGE_SIZE};
use crate::stream_end::{EndWatch, StreamEnd};

/// First byte of a blob: the RAM block list.
const BLOB_BLOCKS: u8 = 1;
/// First byte of a blob: stream bytes to write to QEMU after the pages before them. Then a be32:
/// the RAM end-of-section markers among the bytes (a destination QEMU loading pages over
/// multifd channels needs a barrier on each channel for each; [`SECTIONS_UNKNOWN`] once the
/// parser stopped understanding the stream before its device state), then the bytes.
const BLOB_BYTES: u8 = 2;
/// A blob's count of end-of-section markers when the stream is no longer parsed.
const SECTIONS_UNKNOWN: u32 = u32::MAX;
/// First byte of a blob: the source's account of the mode, for the destination's summary.
const BLOB_MODE: u8 = 3;
/// First byte of a blob: stream bytes like [`BLOB_BYTES`], and the last before the pages of its
/// tag's pass: the destination may write those pages as they arrive once it wrote these bytes.
/// (Bytes sent when QEMU paused between writes go as [`BLOB_BYTES`]: more bytes may follow them
/// before the next page, so pages must wait; an empty blob of this kind releases them then.)
const BLOB_BYTES_THEN_PAGES: u8 = 4;
/// First byte of a blob: the source QEMU ended its stream before the end of its migration
/// ([`stream::Ending::Early`]), and why, in words. The destination still hands its QEMU every
/// byte (QEMU fails on the cut stream as it would without the shims), then reports the
/// migration failed for this reason rather than complete (`Session::unfinished`: nothing is
/// shut down, so that both return paths end in order and no echo of a failure hides why).
const BLOB_ENDED_EARLY: u8 = 5;
/// First byte of a blob, empty otherwise: the source QEMU's stream ended as a finished
/// migration's does ([`stream::Ending::Finished`]), for the destination's summary.
const BLOB_FINISHED: u8 = 6;

/// Why a migration whose stream ended early failed, as both shims report it.
const ENDED_EARLY: &str = "the source QEMU ended its migration stream before the device state, \
     in the RAM phase: the migration was cancelled or failed at the source";
/// Why a migration whose stream ended past the RAM phase, but not as a finished migration's
/// does ([`stream::Ending::Cut`]), failed.
const ENDED_CUT: &str = "the source QEMU ended its migration stream midway, past the RAM phase \
     (its last bytes are not the end of a migration): the migration was cancelled or failed at \
     the source";

/// Why a stream the source stopped parsing cannot feed a destination QEMU's multifd channels.
pub(crate) const UNPARSED_FOR_MULTIFD: &str = "the source shim stopped parsing QEMU's stream before its device state (see its summary): \
     the destination QEMU's multifd channels cannot be given their barriers; run the \
     destination shim without --qemu-multifd (and the destination QEMU without multifd)";

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
/// How long a destination QEMU with multifd may take to start reading its main channel once
/// the shim opened all its channels.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(10);
/// What a writer of the destination returns when the session ended before its stream did: the
/// echo of a failure reported elsewhere.
const SESSION_ENDED_EARLY: &str = "the session ended early";

const _: () = assert!(TARGET_PAGE_SIZE == PAGE_SIZE);
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

/// Encodes the RAM block list for the destination.
fn encode_blocks(blocks: &[RamBlock]) -> Vec<u8> {
    let mut out = vec![BLOB_BLOCKS];
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for block in blocks {
        out.push(block.name.len() as u8);
        out.extend_from_slice(block.name.as_bytes());
        out.extend_from_slice(&block.used_length.to_le_bytes());
    }
    out
}

/// Decodes and checks the RAM block list against the session's memory layout.
fn decode_blocks(mut body: &[u8], layout: &MemoryLayout) -> Result<Vec<RamBlock>, String> {
    let mut take = |n: usize| -> Result<&[u8], String> {
        if body.len() < n {
            return Err("a truncated RAM block list".to_string());
        }
        let (head, rest) = body.split_at(n);
        body = rest;
        Ok(head)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    if count != layout.region_count() || count > MAX_RAM_BLOCKS {
        return Err(format!(
            "a RAM block list of {count} blocks for a layout of {} regions",
            layout.region_count()
        ));
    }
    let mut blocks = Vec::with_capacity(count);
    for &pages in layout.region_pages() {
        let len = usize::from(take(1)?[0]);
        let name = std::str::from_utf8(take(len)?)
            .map_err(|_| "a RAM block name that is not text".to_string())?
            .to_string();
        let used_length = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let block = RamBlock { name, used_length };
        if block.name.is_empty() || block.pages() != pages {
            return Err(format!(
                "RAM block {:?} does not match the session's layout",
                block.name
            ));
        }
        blocks.push(block);
    }
    if !body.is_empty() {
        return Err("trailing bytes after the RAM block list".into());
    }
    Ok(blocks)
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

/// What the summary says of a parsing-mode session.
fn mode_text(channels: u16, backend: &str, pass_through: Option<&(String, bool, u64)>) -> String {
    let mut text = format!(
        "parsing (RAM pages through the page codec on {channels} channel(s) over {backend}, the \
         rest of the main channel in order on the control connection; multifd channels opaque)"
    );
    if let Some((reason, false, at)) = pass_through {
        text.push_str(&format!(
            "; from stream byte {at} on carried as bytes because of {reason}"
        ));
    }
    text
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

/// Page bytes the destination holds for passes it may not write yet, before the channels wait.
/// It bounds how far the destination QEMU lags behind the link: what is held here must still be
/// written when the source stops its guest, and a short lag keeps the downtime short. The
/// channels' waiting reaches the source as a full link, then QEMU as a slow socket, so QEMU's
/// bandwidth estimate (which decides when it stops the guest) sees the real pace.
const STAGED_LIMIT: usize = 16 << 20;
/// What a zero page's record costs in the staging count.
const STAGED_ZERO: usize = 16;

/// Pages in one chunk of a bucket's page bytes (64 KiB: under glibc's threshold for mapping
/// an allocation of its own, so a chunk never costs a mapping and an unmapping).
const CHUNK_PAGES: usize = 16;
const CHUNK_BYTES: usize = CHUNK_PAGES * PAGE_SIZE;
/// Emptied chunks kept for reuse: all the staging can hold, and a chunk in progress per
/// channel besides.
const SPARE_CHUNKS: usize = STAGED_LIMIT / CHUNK_BYTES + 64;
/// Emptied buckets kept for reuse (their record lists).
const SPARE_BUCKETS: usize = 64;

/// Pages of one pass from one channel, in arrival order.
#[derive(Default)]
struct Bucket {
    /// Address and whether the page is zero (no bytes in `chunks`).
    records: Vec<(PageAddr, bool)>,
    /// The bytes of the pages that are not zero, in order, [`CHUNK_PAGES`] to a chunk (every
    /// chunk full but the last). Fixed-size chunks that go back to the staging once written
    /// serve every bucket alike: pages are copied into memory that is already backed, where a
    /// growing buffer per bucket would touch fresh memory (a page fault and a cleared page per
    /// 4 KiB, most of the decoding threads' time) and copy itself at every doubling.
    chunks: Vec<Vec<u8>>,
    /// Pages in `chunks`.
    data_pages: usize,
}

impl Bucket {
    fn staged_bytes(&self) -> usize {
        self.data_pages * PAGE_SIZE + STAGED_ZERO * (self.records.len() - self.data_pages)
    }

    /// The bytes of the pages that are not zero, in order.
    fn pages(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().flat_map(|c| c.chunks_exact(PAGE_SIZE))
    }
}

/// Decoded pages and stream bytes on their way from the channels to the writer of QEMU's stream.
#[derive(Default)]
struct Staging {
    state: Mutex<StagingState>,
    /// The writer waits here for work.
    work: Condvar,
    /// Channels wait here for room.
    room: Condvar,
}

#[derive(Default)]
struct StagingState {
    /// Per channel: pages by pass.
    buckets: Vec<BTreeMap<Generation, Bucket>>,
    /// Blobs in arrival order, with their tags.
    blobs: VecDeque<(u32, Vec<u8>)>,
    /// Pages of passes up to this one may be written as they come: the stream bytes before
    /// them are written (the tag of the last blob of stream bytes written).
    writable: Option<Generation>,
    /// Page bytes held (see [`Bucket::staged_bytes`]).
    held: usize,
    /// Page bytes the writer took and has not finished writing to QEMU.
    in_writer: usize,
    writer_waiting: bool,
    channels_waiting: usize,
    /// The transport delivered everything.
    finished: bool,
    /// The session ended early (or the writer failed): everyone stops.
    stopped: bool,
    /// Emptied buckets the writer gave back, their record lists kept (see
    /// [`Staging::batch_written`]).
    spare: Vec<Bucket>,
    /// Emptied chunks of page bytes, kept for reuse.
    spare_chunks: Vec<Vec<u8>>,
    /// The transport's session ended: channels stop waiting for room.
    released: bool,
}

impl StagingState {
    /// Takes the buckets of passes up to `last` from every channel, channel by channel.
    fn take_through(&mut self, last: Generation) -> Vec<Bucket> {
        let mut taken = Vec::new();
        for buckets in &mut self.buckets {
            // Generations are the peer's numbers: the last one possible takes everything.
            let later = match last.checked_add(1) {
                Some(next) => buckets.split_off(&next),
                None => BTreeMap::new(),
            };
            let ready = std::mem::replace(buckets, later);
            taken.extend(ready.into_values());
        }
        let bytes = taken.iter().map(Bucket::staged_bytes).sum::<usize>();
        self.held -= bytes;
        self.in_writer += bytes;
        taken
    }

    /// Whether the writer has pages it can write: a batch in hand, or staged pages of passes
    /// it may write.
    fn writer_has_pages(&self) -> bool {
        self.in_writer > 0
            || self
                .writable
                .is_some_and(|w| self.buckets.iter().any(|b| b.range(..=w).next().is_some()))
    }
}

/// What the writer does next.
enum WriterWork {
    /// Pages of a pass whose preceding bytes are written.
    Pages(Vec<Bucket>),
    /// A blob, after the pages that came before it.
    Blob {
        pages: Vec<Bucket>,
        tag: u32,
        data: Vec<u8>,
    },
    Done,
    Stop,
}

impl Staging {
    /// Stores a page from `channel`; waits for room while the destination's backlog (pages
    /// staged and pages the writer is writing) reaches [`STAGED_LIMIT`]. A page of a pass that
    /// may be written waits only while the writer has other pages to write, which it is
    /// draining: the pages the writer needs always get through, and yet QEMU's pace holds the
    /// channels back (without that bound a slow destination QEMU let tens of MiB pile up here,
    /// all of which it still had to load after the source stopped its guest).
    /// Adds the time it waited to `stalled`.
    fn push(
        &self,
        channel: usize,
        addr: PageAddr,
        generation: Generation,
        page: Option<&Page>,
        stalled: &mut Duration,
    ) -> Result<(), SinkError> {
        let mut state = self.state.lock().expect("not poisoned");
        loop {
            if state.stopped || state.released {
                return Err("the destination stopped rebuilding QEMU's stream".into());
            }
            let may_write = state.writable.is_some_and(|w| generation <= w);
            let full = state.held + state.in_writer >= STAGED_LIMIT;
            if !full || (may_write && !state.writer_has_pages()) {
                break;
            }
            state.channels_waiting += 1;
            let waiting = Instant::now();
            state = self.room.wait(state).expect("not poisoned");
            *stalled += waiting.elapsed();
            state.channels_waiting -= 1;
        }
        let StagingState {
            buckets,
            spare,
            spare_chunks,
            ..
        } = &mut *state;
        let bucket = buckets[channel]
            .entry(generation)
            .or_insert_with(|| spare.pop().unwrap_or_default());
        bucket.records.push((addr, page.is_none()));
        match page {
            Some(page) => {
                if bucket.chunks.last().is_none_or(|c| c.len() == CHUNK_BYTES) {
                    let chunk = spare_chunks
                        .pop()
                        .unwrap_or_else(|| Vec::with_capacity(CHUNK_BYTES));
                    bucket.chunks.push(chunk);
                }
                let chunk = bucket.chunks.last_mut().expect("a chunk was just ensured");
                chunk.extend_from_slice(page);
                bucket.data_pages += 1;
                state.held += PAGE_SIZE;
            }
            None => state.held += STAGED_ZERO,
        }
        let wake = state.writer_waiting && state.writable.is_some_and(|w| generation <= w);
        drop(state);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// A blob from the control connection (never waits: blobs move the writer on).
    fn blob(&self, tag: u32, data: Vec<u8>) {
        self.state
            .lock()
            .expect("not poisoned")
            .blobs
            .push_back((tag, data));
        self.work.notify_one();
    }

    fn set_channels(&self, channels: usize) {
        self.state.lock().expect("not poisoned").buckets =
            (0..channels).map(|_| BTreeMap::new()).collect();
    }

    /// The transport delivered everything.
    fn finish(&self) {
        self.state.lock().expect("not poisoned").finished = true;
        self.work.notify_one();
    }

    /// The transport's session ended (its last act before it joins the channel threads):
    /// channels stop waiting for room; the writer goes on with what it has.
    fn release_channels(&self) {
        self.state.lock().expect("not poisoned").released = true;
        self.room.notify_all();
    }

    /// Everyone stops waiting, now and later.
    fn stop(&self) {
        self.state.lock().expect("not poisoned").stopped = true;
        self.work.notify_all();
        self.room.notify_all();
    }

    /// The writer's next work; waits for it.
    fn next(&self) -> WriterWork {
        let mut state = self.state.lock().expect("not poisoned");
        loop {
            if state.stopped {
                return WriterWork::Stop;
            }
            let work = if let Some(w) = state
                .writable
                .filter(|&w| state.buckets.iter().any(|b| b.range(..=w).next().is_some()))
            {
                Some(WriterWork::Pages(state.take_through(w)))
            } else if let Some((tag, data)) = state.blobs.pop_front() {
                // The transport delivers a blob only after every page of the passes before its
                // tag was applied: they are all here.
                let pages = match tag.checked_sub(1) {
                    Some(last) => state.take_through(last),
                    None => Vec::new(),
                };
                Some(WriterWork::Blob { pages, tag, data })
            } else if state.finished {
                Some(WriterWork::Done)
            } else {
                None
            };
            if let Some(work) = work {
                if state.channels_waiting > 0 {
                    self.room.notify_all();
                }
                return work;
            }
            state.writer_waiting = true;
            state = self.work.wait(state).expect("not poisoned");
            state.writer_waiting = false;
        }
    }

    /// The writer wrote the pages it took last, in `buckets`; their chunks and record lists
    /// serve again, up to [`SPARE_CHUNKS`] and [`SPARE_BUCKETS`].
    fn batch_written(&self, buckets: Vec<Bucket>) {
        let mut state = self.state.lock().expect("not poisoned");
        state.in_writer = 0;
        for mut bucket in buckets {
            for mut chunk in bucket.chunks.drain(..) {
                if state.spare_chunks.len() >= SPARE_CHUNKS {
                    break;
                }
                chunk.clear();
                state.spare_chunks.push(chunk);
            }
            if state.spare.len() < SPARE_BUCKETS {
                bucket.records.clear();
                bucket.data_pages = 0;
                state.spare.push(bucket);
            }
        }
        if state.channels_waiting > 0 {
            self.room.notify_all();
        }
    }

    /// Stream bytes up to pass `tag` are written: its pages may be written as they come.
    fn written_through(&self, tag: u32) {
        let mut state = self.state.lock().expect("not poisoned");
        state.writable = Some(state.writable.map_or(tag, |w| w.max(tag)));
        if state.channels_waiting > 0 {
            self.room.notify_all();
        }
    }
}

/// A channel's decoded pages, into the staging.
struct StagingSink {
    staging: Arc<Staging>,
    channel: usize,
    /// Time spent waiting for room, not yet reported.
    stalled: Duration,
}

impl PageSink for StagingSink {
    fn zero(&mut self, addr: PageAddr, generation: Generation) -> Result<(), SinkError> {
        self.staging
            .push(self.channel, addr, generation, None, &mut self.stalled)
    }

    fn data(
        &mut self,
        addr: PageAddr,
        generation: Generation,
        page: &Page,
    ) -> Result<(), SinkError> {
        self.staging.push(
            self.channel,
            addr,
            generation,
            Some(page),
            &mut self.stalled,
        )
    }

    fn take_stalled(&mut self) -> Duration {
        std::mem::take(&mut self.stalled)
    }
}

/// The destination's rebuilding of the stream for QEMU, on its own thread.
struct Rebuild<'a> {
    out: BufWriter<Conn>,
    layout: MemoryLayout,
    blocks: Vec<RamBlock>,
    staging: &'a Staging,
    written: u64,
    session: &'a Session,
    /// The source's account of the mode.
    mode: Option<String>,
    /// Why the migration did not end, when the source QEMU's stream ended early.
    ended_early: Option<String>,
    /// The source said its QEMU's stream ended as a finished migration's does.
    source_finished: bool,
    /// The destination QEMU's multifd channels, when it loads pages over them.
    multifd: Option<MultifdOut>,
    /// How that QEMU syncs them, from the machine type in the stream's first bytes.
    discipline: Option<multifd::SyncDiscipline>,
    /// Pages written (on the multifd channels, or as ZERO records on the main channel) since
    /// the last barrier.
    pages_since_sync: bool,
    /// The destination QEMU read the first bytes of its main channel.
    qemu_reads: bool,
    /// Record headers of the group being written (kept for its capacity).
    headers: Vec<u8>,
    /// The stream's bytes other than pages, as written, for its end.
    end: EndWatch,
}

impl Rebuild<'_> {
    /// Writes until the transport has delivered everything (or the session stops). However it
    /// ends, the multifd channels' queues close, so that their threads write what they hold and
    /// end their connections.
    fn run(&mut self) -> Result<(), String> {
        let result = self.write_until_done();
        self.multifd = None;
        result
    }

    fn write_until_done(&mut self) -> Result<(), String> {
        loop {
            match self.staging.next() {
                WriterWork::Pages(pages) => {
                    self.write_buckets(&pages)?;
                    // Pages written now need not wait for the next blob to reach QEMU.
                    self.flush()?;
                    self.staging.batch_written(pages);
                }
                WriterWork::Blob { pages, tag, data } => {
                    self.write_buckets(&pages)?;
                    self.staging.batch_written(pages);
                    self.blob(tag, &data)?;
                }
                // Every batch queued its last packet already (`write_buckets`).
                WriterWork::Done => return self.flush(),
                WriterWork::Stop => return Err(SESSION_ENDED_EARLY.into()),
            }
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        self.out.flush().map_err(qemu_write_error)?;
        self.session
            .parsed_raw
            .store(self.written, Ordering::Relaxed);
        Ok(())
    }

    fn blob(&mut self, tag: u32, data: &[u8]) -> Result<(), String> {
        let (&kind, body) = data.split_first().ok_or("an empty blob")?;
        match kind {
            BLOB_BLOCKS => {
                self.blocks = decode_blocks(body, &self.layout)?;
                Ok(())
            }
            BLOB_BYTES | BLOB_BYTES_THEN_PAGES => {
                if self.blocks.is_empty() {
                    return Err("stream bytes came before the RAM block list".into());
                }
                let (count, body) = body
                    .split_first_chunk::<4>()
                    .ok_or("a blob of stream bytes without its count of section ends")?;
                let sections_ended = u32::from_be_bytes(*count);
                if let Some(multifd) = &mut self.multifd {
                    if sections_ended == SECTIONS_UNKNOWN {
                        return Err(UNPARSED_FOR_MULTIFD.into());
                    }
                    let discipline = match self.discipline {
                        Some(discipline) => discipline,
                        None => {
                            let machine = stream::machine_type(body).ok_or(
                                "the stream does not open with its configuration section, which \
                                 names the machine type the destination QEMU's multifd channels \
                                 sync by: run the destination shim without --qemu-multifd",
                            )?;
                            *self.discipline.insert(multifd::sync_discipline(machine)?)
                        }
                    };
                    match discipline {
                        // The pages before these bytes, then a barrier per section end on
                        // every channel: QEMU's main thread waits for them at each marker.
                        multifd::SyncDiscipline::EachSection => {
                            self.written += multifd.sync(&self.blocks, sections_ended)?;
                        }
                        // One barrier, said by a MULTIFD_FLUSH record inside the section whose
                        // end these bytes hold, right after its pages: the bytes after a page
                        // start inside its section's records. Sections without pages need none.
                        multifd::SyncDiscipline::FlushRecords => {
                            if sections_ended > 0 && self.pages_since_sync {
                                self.written += multifd.sync(&self.blocks, 1)?;
                                self.out
                                    .write_all(&multifd::FLUSH_RECORD)
                                    .map_err(qemu_write_error)?;
                                self.written += multifd::FLUSH_RECORD.len() as u64;
                                self.pages_since_sync = false;
                            }
                        }
                    }
                }
                self.out.write_all(body).map_err(qemu_write_error)?;
                self.written += body.len() as u64;
                self.flush()?;
                // The stream's last bytes are among these: once they are QEMU's, a multifd
                // channel it closes is closed after the end (`relay::ClosedAfterEnd`).
                self.end.feed(body);
                if self.end.verdict() == StreamEnd::Finished {
                    self.session.stream_delivered.store(true, Ordering::SeqCst);
                }
                if !self.qemu_reads && self.multifd.is_some() {
                    self.wait_until_qemu_reads()?;
                }
                if kind == BLOB_BYTES_THEN_PAGES {
                    self.staging.written_through(tag);
                }
                Ok(())
            }
            BLOB_MODE => {
                self.mode = Some(String::from_utf8_lossy(body).into_owned());
                Ok(())
            }
            BLOB_ENDED_EARLY => {
                self.ended_early = Some(String::from_utf8_lossy(body).into_owned());
                Ok(())
            }
            BLOB_FINISHED => {
                self.source_finished = true;
                Ok(())
            }
            other => Err(format!("a blob of unknown kind {other}")),
        }
    }

    /// A destination QEMU with multifd reads its main channel only once all its multifd
    /// channels are connected: one that expects more than the shim opened would wait forever,
    /// and the migration with it. It must read the stream's first bytes soon.
    fn wait_until_qemu_reads(&mut self) -> Result<(), String> {
        let since = Instant::now();
        let channels = self.multifd.as_ref().map_or(0, MultifdOut::channels);
        loop {
            match self.out.get_ref().unread() {
                Ok(0) | Err(_) => break,
                Ok(_) if since.elapsed() > QEMU_START_TIMEOUT => {
                    return Err(format!(
                        "the destination QEMU did not start reading its migration stream within \
                         {} s of its {channels} multifd channel(s) opening: does it expect more \
                         (its `multifd-channels` must equal --qemu-multifd {channels})?",
                        QEMU_START_TIMEOUT.as_secs()
                    ));
                }
                Ok(_) => {
                    if self.session.failed().is_some() {
                        return Err(SESSION_ENDED_EARLY.into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        // A QEMU that reads its main channel took all its multifd channels first; one without
        // multifd refused or dropped the shim's channels, whose writes then fail and say so.
        self.qemu_reads = true;
        Ok(())
    }

    /// Writes a batch of pages; with multifd, the last packet goes to its channel at once too
    /// (pages must not wait for more to fill it).
    fn write_buckets(&mut self, buckets: &[Bucket]) -> Result<(), String> {
        for bucket in buckets {
            self.write_bucket(bucket)?;
        }
        if let Some(multifd) = &mut self.multifd {
            self.written += multifd.flush(&self.blocks)?;
        }
        Ok(())
    }

    fn write_bucket(&mut self, bucket: &Bucket) -> Result<(), String> {
        if self.multifd.is_some() {
            return self.write_bucket_multifd(bucket);
        }
        // Records go out in groups, each in one vectored write: headers from `headers`, page
        // bytes straight from the bucket's chunks. A group larger than the writer's buffer
        // passes it by (one copy of each page fewer than through the buffer).
        let mut pages = bucket.pages();
        for group in bucket.records.chunks(RECORDS_PER_WRITE) {
            let mut headers = std::mem::take(&mut self.headers);
            headers.clear();
            // (end of its header in `headers`, its page bytes) per record.
            let mut parts: Vec<(usize, Option<&[u8]>)> = Vec::with_capacity(group.len());
            for &(addr, zero) in group {
                let block = self.blocks.get(addr.region as usize).ok_or_else(|| {
                    format!("a page of RAM block {} that does not exist", addr.region)
                })?;
                let offset = addr.index * PAGE_SIZE as u64;
                let mut header = [0u8; 8 + 1 + 255];
                let len = record_header(&mut header, &block.name, offset, zero);
                headers.extend_from_slice(&header[..len]);
                let data = if zero {
                    // A ZERO record's fill byte.
                    headers.push(0);
                    None
                } else {
                    Some(pages.next().ok_or("a bucket short of page data")?)
                };
                parts.push((headers.len(), data));
            }
            let mut slices = Vec::with_capacity(2 * parts.len());
            let mut start = 0;
            for &(end, data) in &parts {
                slices.push(io::IoSlice::new(&headers[start..end]));
                start = end;
                if let Some(page) = data {
                    slices.push(io::IoSlice::new(page));
                }
            }
            let bytes: usize = slices.iter().map(|s| s.len()).sum();
            write_all_vectored(&mut self.out, &mut slices).map_err(qemu_write_error)?;
            self.written += bytes as u64;
            self.pages_since_sync |= !group.is_empty();
            drop(slices);
            self.headers = headers;
        }
        Ok(())
    }

    /// A bucket's pages onto the destination QEMU's multifd channels (its ZERO records on the
    /// main channel).
    fn write_bucket_multifd(&mut self, bucket: &Bucket) -> Result<(), String> {
        let mut pages = bucket.pages();
        for &(addr, zero) in &bucket.records {
            let block = self.blocks.get(addr.region as usize).ok_or_else(|| {
                format!("a page of RAM block {} that does not exist", addr.region)
            })?;
            let offset = addr.index * PAGE_SIZE as u64;
            self.pages_since_sync = true;
            if !zero {
                let page = pages.next().ok_or("a bucket short of page data")?;
                let multifd = self.multifd.as_mut().expect("called with multifd");
                self.written += multifd.page(&self.blocks, addr.region as usize, offset, page)?;
                continue;
            }
            let mut header = [0u8; 8 + 1 + 255];
            let len = record_header(&mut header, &block.name, offset, zero);
            self.out
                .write_all(&header[..len])
                .and_then(|()| self.out.write_all(&[0]))
                .map_err(qemu_write_error)?;
            self.written += (len + 1) as u64;
        }
        Ok(())
    }
}

/// Records per vectored write of the destination's main channel: two slices each, within
/// the kernel's 1024 per call.
const RECORDS_PER_WRITE: usize = 500;

/// Writes all of `slices` (std's `write_all_vectored` is not stable yet).
fn write_all_vectored(out: &mut impl Write, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a failed write to the destination QEMU means. QEMU closes its migration connection
/// when it refuses the stream or fails loading it (a machine of another size or type, a device
/// it does not have): say so, rather than just that a pipe broke.
pub(crate) fn qemu_write_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => format!(
            "the destination QEMU closed the migration connection while the stream was being \
             written: it refused the stream or failed to load it (its log or `query-migrate` \
             says why) ({e})"
        ),
        _ => format!("writing to QEMU failed: {e}"),
    }
}

/// What a failed write to one of the destination QEMU's multifd channels means: a QEMU without
/// multifd (or with fewer channels) closes the connections it does not take.
fn multifd_write_error(e: io::Error, id: usize, channels: u8) -> String {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => format!(
            "the destination QEMU closed multifd channel {id}: it does not take it (is its \
             `multifd` capability on, with `multifd-channels` {channels}?), or it refused the \
             stream or failed to load it (its log or `query-migrate` says why) ({e})"
        ),
        _ => format!("writing to QEMU's multifd channel {id} failed: {e}"),
    }
}

/// A RAM record's header (be64 offset|flags, u8 length, block name) in `out`; returns its
/// length. Same encoding as [`stream::write_page_record`], without the page.
fn record_header(out: &mut [u8; 264], block: &str, offset: u64, zero: bool) -> usize {
    let flag = if zero {
        stream::flags::ZERO
    } else {
        stream::flags::PAGE
    };
    out[..8].copy_from_slice(&(offset | flag).to_be_bytes());
    out[8] = block.len() as u8;
    out[9..9 + block.len()].copy_from_slice(block.as_bytes());
    9 + block.len()
}

/// Receives a parsing-mode session and feeds the rebuilt main channel to the destination QEMU.
pub(crate) fn destination_main(
    session: &Arc<Session>,
    config: &DestinationConfig,
    connections: Receiver<TcpStream>,
) -> Result<(), String> {
    let backend = TcpBackend::detect(&config.log);
    let mut acceptor = StreamAcceptor::new(
        connections,
        backend,
        DEFAULT_MAX_FRAME_BODY,
        config.log.clone(),
    );
    let staging = Arc::new(Staging::default());
    let receiver_config = ReceiverConfig {
        log: config.log.clone(),
        timeout: config.link_timeout,
        on_end: Some({
            let staging = staging.clone();
            Arc::new(move || staging.release_channels())
        }),
        ..ReceiverConfig::default()
    };
    // A session that fails while the transport waits for its connections (the source gave up,
    // or another of its links was refused) ends that wait: no more connections will come.
    let weak = Arc::downgrade(session);
    session.on_failure(Box::new(move || {
        if let Some(session) = weak.upgrade()
            // Not waiting for the lock: whoever holds it is handing a connection over.
            && let Ok(mut tx) = session.pages_tx.try_lock()
        {
            tx.take();
        }
    }));
    let pending = accept(&mut acceptor, &receiver_config)
        .map_err(|e| format!("the page transport: {}", full_message(&e)))?;
    let channels = pending.channels();
    let layout = pending.layout().clone();
    // The mode as this end knows it; the source's account replaces it when it arrives.
    *session.mode.lock().expect("not poisoned") =
        Some(mode_text(channels, acceptor.backend(), None));
    // QEMU takes its first connection as the main channel: connect it before any multifd link.
    let qemu = connect_qemu(&config.qemu)?;
    let clone = || qemu.try_clone().map_err(|e| e.to_string());
    {
        let q = clone()?;
        session.on_failure(Box::new(move || q.shutdown(Shutdown::Both)));
    }
    *session.qemu_main.lock().expect("not poisoned") = Some(clone()?);
    session.set_main_ready();
    // Then its multifd channels, if it loads pages over them.
    let (multifd_out, multifd_channels) = match &config.qemu_multifd {
        Some(m) => {
            let mut conns = Vec::new();
            for id in 0..m.channels {
                // QEMU listens already (it took the main channel): no retrying.
                let refused = |e: io::Error| {
                    format!(
                        "the destination QEMU refused multifd channel {id} ({e}): is its \
                         `multifd` capability on, with `multifd-channels` {}?",
                        m.channels
                    )
                };
                let mut conn = Conn::connect(&config.qemu).map_err(refused)?;
                multifd::introduce(&mut conn, m, id).map_err(refused)?;
                let q = conn.try_clone().map_err(|e| e.to_string())?;
                session.on_failure(Box::new(move || q.shutdown(Shutdown::Both)));
                conns.push(conn);
            }
            let (out, queues) = MultifdOut::new(m.channels);
            (Some(out), conns.into_iter().zip(queues).collect::<Vec<_>>())
        }
        None => (None, Vec::new()),
    };

    staging.set_channels(usize::from(channels));
    let sinks: Vec<StagingSink> = (0..usize::from(channels))
        .map(|channel| StagingSink {
            staging: staging.clone(),
            channel,
            stalled: Duration::ZERO,
        })
        .collect();
    let mut rebuild = Rebuild {
        out: BufWriter::with_capacity(1 << 20, clone()?),
        layout,
        blocks: Vec::new(),
        staging: &staging,
        written: 0,
        session,
        mode: None,
        ended_early: None,
        source_finished: false,
        multifd: multifd_out,
        discipline: None,
        pages_since_sync: false,
        qemu_reads: false,
        headers: Vec::new(),
        end: EndWatch::new(),
    };
    let stats = Arc::new(SessionStats::new(usize::from(channels)));
    let mut blob_bytes = 0u64;
    let (result, rebuilt) = std::thread::scope(|scope| {
        let writer = std::thread::Builder::new()
            .name("ps-rebuild".into())
            .spawn_scoped(scope, || {
                let result = rebuild.run();
                // A writer stopped because the session ended early only echoes the failure
                // that ended it, which is reported where it happened.
                if let Err(e) = &result
                    && e != SESSION_ENDED_EARLY
                {
                    // Shut everything down: the source must hear of it and fail its QEMU's
                    // migration rather than finish it into a broken destination.
                    session.fail(format!("rebuilding the stream: {e}"));
                    staging.stop();
                }
                result
            });
        let writer = match writer {
            Ok(writer) => writer,
            Err(e) => return (Ok(None), Err(format!("cannot start a thread: {e}"))),
        };
        let mut channel_writers = Vec::new();
        let qemu_channels = config.qemu_multifd.map_or(0, |m| m.channels);
        for (id, (conn, queue)) in multifd_channels.into_iter().enumerate() {
            let staging = &staging;
            let spawned = std::thread::Builder::new()
                .name(format!("ps-multifd-{id}"))
                .spawn_scoped(scope, move || {
                    let result = multifd::run_channel(conn, queue)
                        .map_err(|e| multifd_write_error(e, id, qemu_channels));
                    if let Err(e) = &result {
                        session.fail(format!("rebuilding the stream: {e}"));
                        staging.stop();
                    }
                    result
                });
            match spawned {
                Ok(handle) => channel_writers.push(handle),
                Err(e) => {
                    staging.stop();
                    return (Ok(None), Err(format!("cannot start a thread: {e}")));
                }
            }
        }
        let watched = stats.clone();
        let result = pending.run_with_stats(&mut acceptor, sinks, watched, |event| {
            if let ReceiverEvent::Blob { tag, data } = event {
                blob_bytes += data.len() as u64;
                staging.blob(tag, data);
            }
            session.parsed_wire.store(
                stats.snapshot().wire_bytes() + blob_bytes,
                Ordering::Relaxed,
            );
        });
        match &result {
            Ok(_) => staging.finish(),
            Err(_) => staging.stop(),
        }
        let mut rebuilt = writer
            .join()
            .unwrap_or_else(|_| Err("the rebuilding thread panicked".into()));
        for handle in channel_writers {
            let result = handle
                .join()
                .unwrap_or_else(|_| Err("a multifd channel's thread panicked".into()));
            if rebuilt.is_ok() {
                rebuilt = result;
            }
        }
        (result.map(Some), rebuilt)
    });
    // The writer's error explains a transport failure it caused; otherwise the transport's.
    let summary = match (result, rebuilt) {
        (_, Err(e)) if e != SESSION_ENDED_EARLY => return Err(e),
        (Err(e), _) => return Err(format!("the page transport: {}", full_message(&e))),
        (Ok(None), Err(e)) | (Ok(Some(_)), Err(e)) => return Err(e),
        (Ok(None), Ok(())) => return Err("the session did not run".into()),
        (Ok(Some(summary)), Ok(())) => summary,
    };
    // The stream is complete: QEMU sees its end.
    qemu.shutdown(Shutdown::Write);
    session.verified.fetch_add(1, Ordering::Relaxed);
    session
        .parsed_wire
        .store(summary.stats.wire_bytes() + blob_bytes, Ordering::Relaxed);
    *session.pages.lock().expect("not poisoned") = Some(summary.stats.classes);
    let mut mode = rebuild
        .mode
        .take()
        .unwrap_or_else(|| mode_text(channels, summary.backend, None));
    if let Some(m) = &config.qemu_multifd {
        mode.push_str(&format!(
            "; pages into the destination QEMU over its {} multifd channel(s) (--qemu-multifd)",
            m.channels
        ));
    }
    *session.mode.lock().expect("not poisoned") = Some(mode);
    if let Some(why) = rebuild.ended_early.take() {
        session.unfinished(why);
        *session.stream_told.lock().expect("not poisoned") = Some(false);
    } else if rebuild.source_finished {
        *session.stream_told.lock().expect("not poisoned") = Some(true);
    }
    Ok(())
}

/// Relays the destination QEMU's return path back to the source shim.
pub(crate) fn destination_return_path(
    session: &Arc<Session>,
    link: TcpStream,
) -> Result<(), String> {
    session.helper_opened();
    let result = (|| -> Result<(), String> {
        {
            let l = link.try_clone().map_err(|e| e.to_string())?;
            session.on_failure(Box::new(move || {
                let _ = l.shutdown(Shutdown::Both);
            }));
        }
        session.wait_main_ready(QEMU_READY_TIMEOUT)?;
        let mut qemu = session
            .qemu_main
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(Conn::try_clone)
            .transpose()
            .map_err(|e| e.to_string())?
            .ok_or("the main channel is not connected")?;
        // The source sends nothing this way but its end marker.
        let mut link_in = link.try_clone().map_err(|e| e.to_string())?;
        let drain = crate::session::spawn_named("ps-return-drain", move || {
            link::from_link(&mut link_in, &mut io::sink(), |_, _| {})
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
        let mut link_out = link;
        let (raw, wire) = session.direction(false);
        let mut from_qemu = WatchedReader::new(&mut qemu, Watch::ReturnPath(session));
        link::to_link(&mut from_qemu, &mut link_out, Compression::Lz4, |r, w| {
            raw.fetch_add(r, Ordering::Relaxed);
            wire.fetch_add(w, Ordering::Relaxed);
        })
        .map_err(|e| from_qemu.copy_error(&e, false))?;
        let _ = link_out.shutdown(Shutdown::Write);
        drain
            .join()
            .map_err(|_| "the return-path thread panicked".to_string())?
            .map_err(|e| format!("from the other shim: {}", link::link_error(&e)))?;
        Ok(())
    })();
    session.closed(false);
    result
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;

    fn addr(index: u64) -> PageAddr {
        PageAddr::new(0, index)
    }

    /// Stages pages `indexes` of pass `generation` from `channel`, none of which may wait.
    fn stage(staging: &Staging, channel: usize, generation: Generation, indexes: Range<u64>) {
        let page = [1u8; PAGE_SIZE];
        for i in indexes {
            staging
                .push(
                    channel,
                    addr(i),
                    generation,
                    Some(&page),
                    &mut Duration::default(),
                )
                .unwrap();
        }
    }

    /// Pushes one page from another thread, which may wait for room; returns how long it did.
    fn push_later(
        staging: &Arc<Staging>,
        channel: usize,
        index: u64,
        generation: Generation,
    ) -> std::thread::JoinHandle<Result<Duration, SinkError>> {
        let staging = staging.clone();
        std::thread::spawn(move || {
            let mut stalled = Duration::default();
            staging
                .push(
                    channel,
                    addr(index),
                    generation,
                    Some(&[1; PAGE_SIZE]),
                    &mut stalled,
                )
                .map(|()| stalled)
        })
    }

    fn pages_of(work: WriterWork) -> Vec<u64> {
        match work {
            WriterWork::Pages(buckets) | WriterWork::Blob { pages: buckets, .. } => buckets
                .iter()
                .flat_map(|b| b.records.iter().map(|(a, _)| a.index))
                .collect(),
            WriterWork::Done => vec![u64::MAX],
            WriterWork::Stop => vec![u64::MAX - 1],
        }
    }

    #[test]
    fn staged_pages_are_written_in_the_order_of_the_stream() {
        let staging = Staging::default();
        staging.set_channels(2);
        let page = [7u8; PAGE_SIZE];
        // Pass 0's pages, then a blob tagged 1 (pass 0 ended), then pass 1's pages, which
        // arrive before the blob that releases them.
        staging
            .push(0, addr(1), 0, Some(&page), &mut Duration::default())
            .unwrap();
        staging
            .push(1, addr(2), 0, None, &mut Duration::default())
            .unwrap();
        staging.blob(1, vec![BLOB_BYTES, 1]);
        staging
            .push(0, addr(3), 1, Some(&page), &mut Duration::default())
            .unwrap();
        // The blob comes with the pages before it, not with pass 1's.
        match staging.next() {
            WriterWork::Blob { pages, tag, .. } => {
                assert_eq!(tag, 1);
                let mut got: Vec<u64> = pages
                    .iter()
                    .flat_map(|b| b.records.iter().map(|(a, _)| a.index))
                    .collect();
                got.sort_unstable();
                assert_eq!(got, [1, 2]);
            }
            _ => panic!("expected the blob"),
        }
        // More bytes of the same pass may follow a plain blob: pass 1 still waits.
        staging.blob(1, vec![BLOB_BYTES_THEN_PAGES]);
        assert!(matches!(staging.next(), WriterWork::Blob { tag: 1, .. }));
        staging.written_through(1);
        assert_eq!(pages_of(staging.next()), [3]);
        // Pages of a released pass go to the writer as they come.
        staging
            .push(1, addr(4), 1, Some(&page), &mut Duration::default())
            .unwrap();
        assert_eq!(pages_of(staging.next()), [4]);
        staging.finish();
        assert_eq!(pages_of(staging.next()), [u64::MAX]);
        assert_eq!(staging.state.lock().unwrap().held, 0);
    }

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

    #[test]
    fn written_chunks_serve_again_emptied() {
        let staging = Staging::default();
        staging.set_channels(1);
        staging.written_through(0);
        let pages = 3 * CHUNK_PAGES as u64 + 1;
        for index in 0..pages {
            staging
                .push(
                    0,
                    addr(index),
                    0,
                    Some(&[index as u8; PAGE_SIZE]),
                    &mut Duration::default(),
                )
                .unwrap();
        }
        let WriterWork::Pages(taken) = staging.next() else {
            panic!("expected pages");
        };
        assert_eq!(taken[0].chunks.len(), 4);
        assert!(
            taken[0]
                .pages()
                .enumerate()
                .all(|(i, p)| p == [i as u8; PAGE_SIZE])
        );
        let buffers: Vec<*const u8> = taken[0].chunks.iter().map(|c| c.as_ptr()).collect();
        staging.batch_written(taken);
        // The next page goes into one of the same chunks, emptied.
        staging
            .push(
                0,
                addr(99),
                0,
                Some(&[6; PAGE_SIZE]),
                &mut Duration::default(),
            )
            .unwrap();
        let WriterWork::Pages(taken) = staging.next() else {
            panic!("expected pages");
        };
        assert_eq!(taken[0].records, [(addr(99), false)]);
        assert_eq!(taken[0].pages().collect::<Vec<_>>(), [[6; PAGE_SIZE]]);
        assert!(buffers.contains(&taken[0].chunks[0].as_ptr()));
        assert_eq!(taken[0].chunks[0].capacity(), CHUNK_BYTES);
        // What is kept stays bounded.
        let many = Bucket {
            records: Vec::new(),
            chunks: (0..2 * SPARE_CHUNKS).map(|_| Vec::new()).collect(),
            data_pages: 0,
        };
        staging.batch_written(vec![many]);
        assert!(staging.state.lock().unwrap().spare_chunks.len() <= SPARE_CHUNKS);
    }

    #[test]
    fn the_highest_pass_number_does_not_overflow() {
        let staging = Staging::default();
        staging.set_channels(1);
        let page = [3u8; PAGE_SIZE];
        staging
            .push(0, addr(1), u32::MAX, Some(&page), &mut Duration::default())
            .unwrap();
        staging.written_through(u32::MAX);
        assert_eq!(pages_of(staging.next()), [1]);
    }

    #[test]
    fn a_full_staging_holds_back_only_the_passes_not_released() {
        let staging = Arc::new(Staging::default());
        staging.set_channels(1);
        staging.written_through(0);
        let future_pages = STAGED_LIMIT / PAGE_SIZE;
        stage(&staging, 0, 1, 0..future_pages as u64);
        // Full: a page of the released pass 0 still gets in; one of pass 1 waits.
        stage(&staging, 0, 0, 0..1);
        let waiting = push_later(&staging, 0, 9, 1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished());
        // The writer takes pass 0's page; pass 1 is still not released, the page still waits.
        assert_eq!(pages_of(staging.next()), [0]);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished());
        staging.batch_written(Vec::new());
        // Pass 1's bytes are written: its staged pages go to the writer, and once it wrote
        // them the waiting page gets in.
        staging.written_through(1);
        assert_eq!(pages_of(staging.next()).len(), future_pages);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished());
        staging.batch_written(Vec::new());
        waiting.join().unwrap().unwrap();
        assert_eq!(pages_of(staging.next()), [9]);
    }

    #[test]
    fn pages_the_writer_may_write_wait_while_it_writes_a_full_backlog() {
        let staging = Arc::new(Staging::default());
        staging.set_channels(2);
        staging.written_through(0);
        let limit_pages = (STAGED_LIMIT / PAGE_SIZE) as u64;
        stage(&staging, 0, 0, 0..limit_pages);
        // The writer takes the backlog and writes it to a slow QEMU: a channel's next page of
        // the same pass waits until that is done.
        assert_eq!(pages_of(staging.next()).len(), limit_pages as usize);
        let waiting = push_later(&staging, 1, limit_pages, 0);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished());
        staging.batch_written(Vec::new());
        let stalled = waiting.join().unwrap().unwrap();
        assert!(stalled >= Duration::from_millis(40), "{stalled:?}");
        assert_eq!(pages_of(staging.next()), [limit_pages]);
    }

    #[test]
    fn a_channel_waiting_for_room_gives_up_when_the_session_ends() {
        let staging = Arc::new(Staging::default());
        staging.set_channels(1);
        stage(&staging, 0, 0, 0..(STAGED_LIMIT / PAGE_SIZE) as u64);
        let waiting = push_later(&staging, 0, 0, 0);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished());
        staging.release_channels();
        let err = waiting.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("stopped"), "{err}");
        // The writer still gets what was staged.
        staging.blob(1, vec![BLOB_BYTES]);
        assert_eq!(pages_of(staging.next()).len(), STAGED_LIMIT / PAGE_SIZE);
    }

    #[test]
    fn block_lists_round_trip_and_are_checked() {
        let blocks = vec![
            RamBlock {
                name: "pc.ram".into(),
                used_length: 64 << 12,
            },
            RamBlock {
                name: "/rom@etc/acpi/rsdp".into(),
                used_length: 100,
            },
        ];
        let layout = MemoryLayout::new(vec![64, 1]).unwrap();
        let blob = encode_blocks(&blocks);
        assert_eq!(blob[0], BLOB_BLOCKS);
        assert_eq!(decode_blocks(&blob[1..], &layout).unwrap(), blocks);
        let other = MemoryLayout::new(vec![64, 2]).unwrap();
        assert!(decode_blocks(&blob[1..], &other).is_err());
        assert!(decode_blocks(&blob[1..blob.len() - 1], &layout).is_err());
        let mut longer = blob[1..].to_vec();
        longer.push(0);
        assert!(decode_blocks(&longer, &layout).is_err());
    }

    /// The destination's rebuilding says when the stream it handed QEMU ended as a finished
    /// migration's: a multifd channel QEMU closes after that is no failure
    /// (`relay::ClosedAfterEnd`).
    #[test]
    fn the_rebuilding_tells_when_the_whole_stream_was_handed_over() {
        let blocks = vec![RamBlock {
            name: "pc.ram".into(),
            used_length: 64 << 12,
        }];
        let (qemu, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let staging = Staging::default();
        let session = Session::new([4; 16]);
        let mut rebuild = Rebuild {
            out: BufWriter::new(Conn::Unix(qemu)),
            layout: MemoryLayout::new(vec![64]).unwrap(),
            blocks: Vec::new(),
            staging: &staging,
            written: 0,
            session: &session,
            mode: None,
            ended_early: None,
            source_finished: false,
            multifd: None,
            discipline: None,
            pages_since_sync: false,
            qemu_reads: false,
            headers: Vec::new(),
            end: EndWatch::new(),
        };
        let bytes = |stream: &[u8]| {
            let mut blob = vec![BLOB_BYTES];
            blob.extend_from_slice(&0u32.to_be_bytes());
            blob.extend_from_slice(stream);
            blob
        };
        rebuild.blob(0, &encode_blocks(&blocks)).unwrap();
        let mut opening = stream::QEVM.to_vec();
        opening.extend_from_slice(&[0, 0, 0, 3, stream::CONFIGURATION]);
        opening.extend_from_slice(&4u32.to_be_bytes());
        opening.extend_from_slice(b"pc-q");
        rebuild.blob(1, &bytes(&opening)).unwrap();
        assert!(!session.stream_delivered.load(Ordering::SeqCst));
        let json = b"{\"page_size\":4096}";
        let mut end = vec![stream::SECTION_EOF, stream::VMDESCRIPTION];
        end.extend_from_slice(&(json.len() as u32).to_be_bytes());
        end.extend_from_slice(json);
        // The end in two pieces: handed over only with the last byte.
        rebuild.blob(2, &bytes(&end[..end.len() - 1])).unwrap();
        assert!(!session.stream_delivered.load(Ordering::SeqCst));
        rebuild.blob(3, &bytes(&end[end.len() - 1..])).unwrap();
        assert!(session.stream_delivered.load(Ordering::SeqCst));
    }

    #[test]
    fn record_headers_match_the_stream_encoding() {
        let mut header = [0u8; 264];
        let len = record_header(&mut header, "pc.ram", 5 << 12, false);
        let mut full = Vec::new();
        stream::write_page_record(&mut full, "pc.ram", 5 << 12, Some(&[7; PAGE_SIZE]));
        assert_eq!(&header[..len], &full[..len]);
        let len = record_header(&mut header, "pc.ram", 5 << 12, true);
        let mut zero = Vec::new();
        stream::write_page_record(&mut zero, "pc.ram", 5 << 12, None);
        assert_eq!(&header[..len], &zero[..len]);
        assert_eq!(zero.len(), len + 1);
    }
}
