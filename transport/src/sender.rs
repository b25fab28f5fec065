//! The source end of a session.
//!
//! ```text
//!  caller ──pages──▶ per-channel batches ──bounded queue──▶ worker i: Encoder ─▶ FrameWriter ─▶ channel i
//!     │                                                         (one thread per channel)
//!     └── PassEnd / Blob / Finish ──▶ control connection ◀── control reader thread, heartbeat thread
//! ```

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender as ChannelSender, bounded, select, unbounded};
use pagecodec::{
    Encoder, EncoderConfig, Generation, MemoryImage, MemoryLayout, PAGE_SIZE, Page, PageAddr,
    ShardMap,
};

use crate::adaptive::{
    CompressPace, LinkState, NO_FEEDBACK, WINDOW, Window, apply_level, compression_can_pay,
    link_state, next_level,
};
use crate::channel::{DEFAULT_MAX_FRAME_BODY, FrameWriter};
use crate::control::{
    Hello, Join, KNOWN_FEATURES, MAX_BLOB_CHUNK, MAX_CHANNELS, Message, MessageReader,
    PROTOCOL_VERSION, SessionId,
};
use crate::error::TransportError;
use crate::failure::{Failure, SharedWriter};
use crate::net::{Connector, Log, read_message, stderr_log, timeout_error, write_message};
use crate::stats::{SessionStats, StatsSnapshot};

/// Pages per batch handed from the caller to a channel worker.
pub const BATCH_PAGES: usize = 64;

/// Frame size of a session unless told otherwise: twice the codec's default. Larger frames
/// cost fewer checksums, submissions and wake-ups per byte; on loopback, where those add up,
/// 512 KiB frames measured 2-3% faster than 256 KiB ones, and 768 KiB ones no faster.
pub const DEFAULT_FRAME_BYTES: u32 = 512 << 10;

/// How much of the content the encoders compress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// As much as pays: more while the link is the bottleneck, less while the encoders or the
    /// destination are (see `next_level`).
    Adaptive,
    /// This compression level, always: 0 to 100 is the percentage of page groups compressed
    /// with LZ4 (0: raw pages, with zero, unchanged and duplicate detection still on); 101 to
    /// 200 compresses every group and `level - 100` percent of them with zstd instead (200:
    /// all zstd, for the slowest links).
    Fixed(u32),
}

/// The highest compression level: every group with zstd.
pub const MAX_COMPRESSION_LEVEL: u32 = 200;

/// A sensible channel count for this machine: one per CPU, at least 2, at most 8.
pub fn default_channels() -> u16 {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8) as u16)
}

/// How a source session behaves.
#[derive(Clone)]
pub struct SenderConfig {
    /// Data channels.
    pub channels: u16,
    /// Memory for pages and frames in flight (queued batches and unsent frames), over all
    /// channels. Smaller makes the caller feel a slow link sooner.
    pub inflight_bytes: usize,
    /// The peer is considered gone after this long without an answer.
    pub timeout: Duration,
    /// Interval of heartbeats on the control connection.
    pub heartbeat: Duration,
    /// Content-cache budget of the whole session (split over the channels).
    pub dup_cache_bytes: u64,
    /// Delta-cache budget of the whole session (split over the channels).
    pub delta_cache_bytes: u64,
    /// How much of the content to compress.
    pub compression: Compression,
    /// Size at which the encoders close a frame. A frame may overshoot it by a group of pages
    /// and one record ([`pagecodec::encoder::max_frame_body`]), and must still fit the
    /// destination's frame limit ([`DEFAULT_MAX_FRAME_BODY`]): [`Sender::connect`] refuses a
    /// size that would not.
    pub frame_bytes: u32,
    /// Where log lines go.
    pub log: Log,
}

impl std::fmt::Debug for SenderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderConfig")
            .field("channels", &self.channels)
            .field("inflight_bytes", &self.inflight_bytes)
            .field("timeout", &self.timeout)
            .field("compression", &self.compression)
            .finish()
    }
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            channels: default_channels(),
            inflight_bytes: 16 << 20,
            timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            dup_cache_bytes: pagecodec::encoder::DEFAULT_DUP_CACHE_BYTES,
            delta_cache_bytes: pagecodec::encoder::DEFAULT_DELTA_CACHE_BYTES,
            compression: Compression::Adaptive,
            frame_bytes: DEFAULT_FRAME_BYTES,
            log: stderr_log(),
        }
    }
}

/// What a finished session sent.
#[derive(Clone, Debug)]
pub struct SendSummary {
    /// Counters at the end.
    pub stats: StatsSnapshot,
    /// From the handshake to the destination's `Complete`.
    pub elapsed: Duration,
    /// Pages the destination says it applied.
    pub pages_applied: u64,
    /// The data-channel backend.
    pub backend: &'static str,
}

/// Pages on their way to a worker. Zero pages are only marked, not copied: the caller's thread
/// is on the path of every page, and copying a zero page costs more than looking at it.
struct PageBatch {
    generation: Generation,
    addrs: Vec<PageAddr>,
    /// Per page: whether it is all zero (and has no bytes in `data`).
    zero: Vec<bool>,
    /// The bytes of the non-zero pages, in order.
    data: Vec<u8>,
}

/// Guest memory the channel workers copy pages from themselves ([`Sender::send_shared`]), so
/// that the caller's thread copies nothing and each page is copied once on its way to the wire.
pub trait PageSource: Send + Sync {
    /// Copies the page at `addr`, as it is now, into `out`; `false` if `addr` is not in this
    /// memory.
    ///
    /// Guest memory may change while it is copied (a running VM): the copy is what gets sent,
    /// the encoder looks only at the copy (zero test, digest, compression), and a page written
    /// meanwhile is dirty and goes again in the next pass.
    fn copy_page(&self, addr: PageAddr, out: &mut Page) -> bool;

    /// The page at `addr` itself, for memory that nothing writes while it is borrowed (what a
    /// shared reference promises anyway: an image in the process's own memory, a snapshot);
    /// the worker then encodes straight from it and skips the copy. Guest memory of a running
    /// VM cannot give one: the default, `None`, has the worker copy the page first.
    fn page(&self, _addr: PageAddr) -> Option<&Page> {
        None
    }
}

impl PageSource for MemoryImage {
    fn page(&self, addr: PageAddr) -> Option<&Page> {
        MemoryImage::page(self, addr)
    }

    fn copy_page(&self, addr: PageAddr, out: &mut Page) -> bool {
        match self.page(addr) {
            Some(page) => {
                out.copy_from_slice(page);
                true
            }
            None => false,
        }
    }
}

/// Memory an application writes between passes (a test's or a demo's guest): workers read it
/// under the read lock, page by page.
impl PageSource for std::sync::RwLock<MemoryImage> {
    fn copy_page(&self, addr: PageAddr, out: &mut Page) -> bool {
        self.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .copy_page(addr, out)
    }
}

/// Pages a worker copies from a [`PageSource`] itself.
struct SharedBatch {
    generation: Generation,
    source: Arc<dyn PageSource>,
    addrs: Vec<PageAddr>,
}

/// Pages per [`SharedBatch`]: addresses only, so larger than a [`PageBatch`].
const SHARED_BATCH_PAGES: usize = 4 * BATCH_PAGES;

enum Work {
    Pages(PageBatch),
    Shared(SharedBatch),
    Barrier(u64),
    Finish,
}

enum WorkerEvent {
    Barrier { channel: u16, id: u64, frames: u64 },
    Finished { channel: u16, frames: u64 },
}

enum ControlEvent {
    PassApplied(Generation),
    Complete(u64),
}

/// The source end of a session.
pub struct Sender {
    layout: MemoryLayout,
    map: ShardMap,
    channels: u16,
    generation: Generation,
    finished: bool,
    batches: Vec<Option<PageBatch>>,
    work: Vec<ChannelSender<Work>>,
    pool: Receiver<PageBatch>,
    events: Receiver<WorkerEvent>,
    control: SharedWriter,
    control_events: Receiver<ControlEvent>,
    failure: Arc<Failure>,
    stats: Arc<SessionStats>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Dropped to wake the heartbeat thread at the end of the session.
    heartbeat_stop: Option<ChannelSender<()>>,
    barrier: u64,
    backend: &'static str,
    started: Instant,
    session_id: SessionId,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("session", &self.session_id)
            .field("channels", &self.channels)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Sender {
    /// Opens a session through `connector` for guest memory of `layout`: handshake, data
    /// channels, worker threads.
    pub fn connect(
        mut connector: Box<dyn Connector>,
        layout: MemoryLayout,
        config: SenderConfig,
    ) -> Result<Sender, TransportError> {
        let channels = config.channels;
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(TransportError::Usage(format!(
                "channel count {channels} is out of range (1 to {MAX_CHANNELS})"
            )));
        }
        let largest_frame = pagecodec::encoder::max_frame_body(config.frame_bytes);
        if largest_frame > DEFAULT_MAX_FRAME_BODY as usize {
            return Err(TransportError::Usage(format!(
                "a frame size of {} bytes makes frame bodies of up to {largest_frame} bytes, more \
                 than the {DEFAULT_MAX_FRAME_BODY} a destination accepts",
                config.frame_bytes
            )));
        }
        let session_id = SessionId::random().map_err(|source| TransportError::Connect {
            what: "cannot draw a session id".into(),
            source,
        })?;
        let control = connector.control(config.timeout)?;
        let mut reader = control.reader;
        let writer: SharedWriter = Arc::new(Mutex::new(control.writer));
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: KNOWN_FEATURES,
            page_size: PAGE_SIZE as u32,
            channels,
            session_id,
            layout: layout.clone(),
        });
        write_message(&mut **writer.lock().expect("not poisoned"), &hello)?;
        let mut pending = MessageReader::new();
        match read_message(&mut reader, &mut pending)? {
            Message::Welcome { .. } => {}
            Message::Refuse { reason } => return Err(TransportError::Refused { reason }),
            other => {
                return Err(TransportError::Protocol(format!(
                    "expected Welcome or Refuse, got {}",
                    other.name()
                )));
            }
        }
        let failure = Failure::new(writer.clone(), config.log.clone());
        failure.add_killer(control.killer);

        // Data channels, each with its worker.
        let per_channel = config.inflight_bytes / usize::from(channels);
        let writer_queue = (per_channel / 2).max(1 << 20);
        connector.set_writer_queue(writer_queue);
        let batch_bytes = BATCH_PAGES * PAGE_SIZE;
        let batches_per_channel = (per_channel / 2 / batch_bytes).max(2);
        let stats = Arc::new(SessionStats::new(usize::from(channels)));
        let (pool_tx, pool) = unbounded();
        for _ in 0..batches_per_channel * usize::from(channels) + usize::from(channels) {
            pool_tx
                .send(PageBatch {
                    generation: 0,
                    addrs: Vec::with_capacity(BATCH_PAGES),
                    zero: Vec::with_capacity(BATCH_PAGES),
                    data: Vec::with_capacity(batch_bytes),
                })
                .expect("pool receiver alive");
        }
        let (events_tx, events) = unbounded();
        let receiver_busy: Arc<Vec<AtomicU32>> =
            Arc::new((0..channels).map(|_| AtomicU32::new(NO_FEEDBACK)).collect());
        let mut work = Vec::new();
        let mut threads = Vec::new();
        for channel in 0..channels {
            let (frame_writer, killer) = connector.data(Join {
                version: PROTOCOL_VERSION,
                session_id,
                channel,
            })?;
            failure.add_killer(killer);
            let mut encoder_config = EncoderConfig::new(u32::from(channel), layout.clone());
            encoder_config.dup_cache_bytes = config.dup_cache_bytes / u64::from(channels);
            encoder_config.delta_cache_bytes = config.delta_cache_bytes / u64::from(channels);
            encoder_config.target_frame_bytes = config.frame_bytes;
            // The cache takes memory as it fills; on a link faster than compression the worker
            // stops admitting pages, and then it takes none.
            encoder_config.prefault_caches = false;
            encoder_config.digest_seed =
                u64::from_le_bytes(session_id.0[..8].try_into().expect("8 bytes"))
                    ^ u64::from(channel);
            let encoder = Encoder::new(encoder_config)
                .map_err(|source| TransportError::Encode { channel, source })?;
            let (work_tx, work_rx) = bounded(batches_per_channel);
            work.push(work_tx);
            let worker = Worker {
                channel,
                encoder,
                writer: frame_writer,
                work: work_rx,
                pool: pool_tx.clone(),
                events: events_tx.clone(),
                stats: stats.clone(),
                adaptive: config.compression == Compression::Adaptive,
                window: Window::new(),
                // Adaptive sessions start raw: a full link shows within a few batches and
                // raises the level, while a fast link never pays for compression it does not
                // need.
                level: match config.compression {
                    Compression::Fixed(level) => level.min(MAX_COMPRESSION_LEVEL),
                    Compression::Adaptive => 0,
                },
                receiver_busy: receiver_busy.clone(),
                backlog_full: writer_queue / 2,
                previous_link: LinkState::Unclear,
                pace: CompressPace::default(),
                probing: config.compression == Compression::Adaptive,
                page: Box::new(pagecodec::ZERO_PAGE),
            };
            let failure = failure.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ps-send-{channel}"))
                    .spawn(move || {
                        if let Err(e) = worker.run() {
                            failure.fail(e);
                        }
                    })
                    .map_err(|source| TransportError::Connect {
                        what: "cannot start a channel thread".into(),
                        source,
                    })?,
            );
        }

        let stop = Arc::new(AtomicBool::new(false));
        let last_heard = Arc::new(Mutex::new(Instant::now()));
        let (control_tx, control_events) = unbounded();
        threads.push(
            ControlReader {
                reader,
                pending,
                events: control_tx,
                failure: failure.clone(),
                stop: stop.clone(),
                last_heard: last_heard.clone(),
                timeout: config.timeout,
                receiver_busy,
            }
            .spawn()
            .map_err(|source| TransportError::Connect {
                what: "cannot start the control connection's reader thread".into(),
                source,
            })?,
        );
        let (heartbeat_stop, heartbeat_wake) = bounded(0);
        threads.push(
            spawn_heartbeat(
                writer.clone(),
                failure.clone(),
                stop.clone(),
                heartbeat_wake,
                last_heard,
                config.heartbeat,
                config.timeout,
            )
            .map_err(|source| TransportError::Connect {
                what: "cannot start the heartbeat thread".into(),
                source,
            })?,
        );
        (config.log)(&format!(
            "session {session_id}: {channels} channels over {}",
            connector.backend()
        ));
        Ok(Sender {
            map: ShardMap::new(u32::from(channels)).expect("channels > 0"),
            layout,
            channels,
            generation: 0,
            finished: false,
            batches: (0..channels).map(|_| None).collect(),
            work,
            pool,
            events,
            control: writer,
            control_events,
            failure,
            stats,
            threads,
            stop,
            heartbeat_stop: Some(heartbeat_stop),
            barrier: 0,
            backend: connector.backend(),
            started: Instant::now(),
            session_id,
        })
    }

    fn check(&self) -> Result<(), TransportError> {
        if self.failure.has_failed() {
            return Err(self.failure.error());
        }
        if self.finished {
            return Err(TransportError::Usage(
                "the session is already finished".into(),
            ));
        }
        Ok(())
    }

    /// Pages of pass `generation` come next: passes may not go back.
    fn enter_pass(&mut self, generation: Generation) -> Result<(), TransportError> {
        if generation < self.generation {
            return Err(TransportError::Usage(format!(
                "page of pass {generation} after pass {}: passes may not go back",
                self.generation
            )));
        }
        self.generation = generation;
        Ok(())
    }

    /// Queues one page of pass `generation` for sending; blocks while the memory budget is used
    /// up (the link is slower than the caller).
    pub fn send_page(
        &mut self,
        addr: PageAddr,
        generation: Generation,
        page: &Page,
    ) -> Result<(), TransportError> {
        self.check()?;
        if !self.layout.contains_run(addr, 1) {
            return Err(TransportError::Usage(format!(
                "{addr} is outside guest memory"
            )));
        }
        self.enter_pass(generation)?;
        let channel = self.map.shard_of(addr) as usize;
        if self.batches[channel]
            .as_ref()
            .is_some_and(|b| b.generation != generation)
        {
            self.dispatch(channel)?;
        }
        if self.batches[channel].is_none() {
            let mut batch = select! {
                recv(self.pool) -> batch => batch.expect("the sender holds a pool sender"),
                recv(self.failure.signal()) -> _ => return Err(self.failure.error()),
            };
            batch.generation = generation;
            batch.addrs.clear();
            batch.zero.clear();
            batch.data.clear();
            self.batches[channel] = Some(batch);
        }
        let batch = self.batches[channel].as_mut().expect("just set");
        batch.addrs.push(addr);
        let zero = pagecodec::is_zero_page(page);
        batch.zero.push(zero);
        if !zero {
            batch.data.extend_from_slice(page);
        }
        if batch.addrs.len() == BATCH_PAGES {
            self.dispatch(channel)?;
        }
        Ok(())
    }

    /// Queues the pages at `addrs` of pass `generation` for sending, read from `source` by
    /// the channel workers themselves: the fast path for guest memory the workers can reach
    /// (the caller copies nothing; each page is copied once, by its channel's worker, into the
    /// encoder). Blocks while the memory budget is used up, like [`Sender::send_page`], with
    /// which it can be mixed: every version of a page still goes in the order it was given.
    ///
    /// An address outside guest memory is refused, after every address before it was queued.
    pub fn send_shared(
        &mut self,
        source: &Arc<dyn PageSource>,
        generation: Generation,
        addrs: impl IntoIterator<Item = PageAddr>,
    ) -> Result<(), TransportError> {
        self.check()?;
        self.enter_pass(generation)?;
        // Pages given one by one before these go first.
        self.dispatch_all()?;
        let mut batches: Vec<Vec<PageAddr>> = (0..self.channels)
            .map(|_| Vec::with_capacity(SHARED_BATCH_PAGES))
            .collect();
        let mut refused = None;
        for addr in addrs {
            if !self.layout.contains_run(addr, 1) {
                refused = Some(addr);
                break;
            }
            let channel = self.map.shard_of(addr) as usize;
            batches[channel].push(addr);
            if batches[channel].len() == SHARED_BATCH_PAGES {
                let addrs = std::mem::replace(
                    &mut batches[channel],
                    Vec::with_capacity(SHARED_BATCH_PAGES),
                );
                self.send_shared_batch(channel, source, generation, addrs)?;
            }
        }
        for (channel, addrs) in batches.into_iter().enumerate() {
            if !addrs.is_empty() {
                self.send_shared_batch(channel, source, generation, addrs)?;
            }
        }
        match refused {
            Some(addr) => Err(TransportError::Usage(format!(
                "{addr} is outside guest memory"
            ))),
            None => Ok(()),
        }
    }

    fn send_shared_batch(
        &self,
        channel: usize,
        source: &Arc<dyn PageSource>,
        generation: Generation,
        addrs: Vec<PageAddr>,
    ) -> Result<(), TransportError> {
        let batch = SharedBatch {
            generation,
            source: source.clone(),
            addrs,
        };
        self.send_work(channel, Work::Shared(batch))
    }

    fn dispatch(&mut self, channel: usize) -> Result<(), TransportError> {
        if let Some(batch) = self.batches[channel].take() {
            self.send_work(channel, Work::Pages(batch))?;
        }
        Ok(())
    }

    fn send_work(&self, channel: usize, work: Work) -> Result<(), TransportError> {
        select! {
            send(self.work[channel], work) -> sent => sent.map_err(|_| self.failure.error()),
            recv(self.failure.signal()) -> _ => Err(self.failure.error()),
        }
    }

    fn dispatch_all(&mut self) -> Result<(), TransportError> {
        for channel in 0..self.batches.len() {
            self.dispatch(channel)?;
        }
        Ok(())
    }

    /// Waits for one event from every worker; returns the frame counts per channel.
    fn collect(
        &self,
        want: impl Fn(&WorkerEvent) -> Option<(u16, u64)>,
    ) -> Result<Vec<u64>, TransportError> {
        let mut frames = vec![None; usize::from(self.channels)];
        while frames.iter().any(Option::is_none) {
            let event = select! {
                recv(self.events) -> e => e.map_err(|_| self.failure.error())?,
                recv(self.failure.signal()) -> _ => return Err(self.failure.error()),
            };
            if let Some((channel, count)) = want(&event) {
                frames[usize::from(channel)] = Some(count);
            }
        }
        Ok(frames.into_iter().map(|f| f.expect("all set")).collect())
    }

    /// Ends pass `generation`: every page sent so far is flushed onto the channels and a
    /// barrier goes to the destination, which reports when it has applied them all (see
    /// [`Sender::wait_applied`]). The next pass may start at once.
    pub fn end_pass(&mut self, generation: Generation) -> Result<(), TransportError> {
        self.check()?;
        self.dispatch_all()?;
        self.barrier += 1;
        let id = self.barrier;
        for channel in 0..self.work.len() {
            self.send_work(channel, Work::Barrier(id))?;
        }
        let frames = self.collect(|e| match *e {
            WorkerEvent::Barrier {
                channel,
                id: got,
                frames,
            } if got == id => Some((channel, frames)),
            _ => None,
        })?;
        self.write(&Message::PassEnd { generation, frames })
    }

    /// Waits until the destination has applied every page of pass `generation`.
    pub fn wait_applied(&mut self, generation: Generation) -> Result<(), TransportError> {
        loop {
            let event = select! {
                recv(self.control_events) -> e => e.map_err(|_| self.failure.error())?,
                recv(self.failure.signal()) -> _ => return Err(self.failure.error()),
            };
            if let ControlEvent::PassApplied(g) = event
                && g >= generation
            {
                return Ok(());
            }
        }
    }

    /// Sends opaque data (device state), delivered after every pass ended before it.
    pub fn send_blob(&mut self, tag: u32, data: &[u8]) -> Result<(), TransportError> {
        self.check()?;
        let mut chunks = data.chunks(MAX_BLOB_CHUNK).peekable();
        if chunks.peek().is_none() {
            return self.write(&Message::Blob {
                tag,
                more: false,
                data: Vec::new(),
            });
        }
        while let Some(chunk) = chunks.next() {
            self.write(&Message::Blob {
                tag,
                more: chunks.peek().is_some(),
                data: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    fn write(&self, message: &Message) -> Result<(), TransportError> {
        let result = write_message(&mut **self.control.lock().expect("not poisoned"), message);
        if let Err(e) = result {
            self.failure.fail(e);
            return Err(self.failure.error());
        }
        Ok(())
    }

    /// Sends everything still queued, ends every channel's stream and waits for the
    /// destination to confirm that it applied all of it.
    pub fn finish(mut self) -> Result<SendSummary, TransportError> {
        let result = self.finish_inner();
        if let Err(e) = &result {
            // Make sure the peer hears of it and no thread is left blocked.
            if !self.failure.has_failed() {
                self.failure
                    .fail(TransportError::AlreadyFailed(crate::error::full_message(e)));
            }
        }
        result
    }

    fn finish_inner(&mut self) -> Result<SendSummary, TransportError> {
        self.check()?;
        self.dispatch_all()?;
        for channel in 0..self.work.len() {
            self.send_work(channel, Work::Finish)?;
        }
        let frames = self.collect(|e| match *e {
            WorkerEvent::Finished { channel, frames } => Some((channel, frames)),
            _ => None,
        })?;
        self.write(&Message::Finish { frames })?;
        let pages_applied = loop {
            let event = select! {
                recv(self.control_events) -> e => e.map_err(|_| self.failure.error())?,
                recv(self.failure.signal()) -> _ => return Err(self.failure.error()),
            };
            if let ControlEvent::Complete(pages) = event {
                break pages;
            }
        };
        self.finished = true;
        self.shutdown_threads();
        Ok(SendSummary {
            stats: self.stats.snapshot(),
            elapsed: self.started.elapsed(),
            pages_applied,
            backend: self.backend,
        })
    }

    /// Counters now, for progress displays.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Shared counters, for a progress thread.
    pub fn stats_handle(&self) -> Arc<SessionStats> {
        self.stats.clone()
    }

    /// The data-channel backend in use.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Number of data channels.
    pub fn channels(&self) -> u16 {
        self.channels
    }

    fn shutdown_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.heartbeat_stop.take();
        self.failure.close_all();
        self.work.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if !self.finished && !self.failure.has_failed() {
            self.failure.fail(TransportError::Usage(
                "the source abandoned the session before finishing it".into(),
            ));
        }
        self.shutdown_threads();
    }
}

/// The thread that reads what the destination sends on the control connection.
struct ControlReader {
    reader: Box<dyn Read + Send>,
    pending: MessageReader,
    events: ChannelSender<ControlEvent>,
    failure: Arc<Failure>,
    stop: Arc<AtomicBool>,
    last_heard: Arc<Mutex<Instant>>,
    timeout: Duration,
    receiver_busy: Arc<Vec<AtomicU32>>,
}

impl ControlReader {
    fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        let ControlReader {
            mut reader,
            mut pending,
            events,
            failure,
            stop,
            last_heard,
            timeout,
            receiver_busy,
        } = self;
        std::thread::Builder::new()
            .name("ps-control-in".into())
            .spawn(move || {
                loop {
                    let message = match read_message(&mut reader, &mut pending) {
                        Ok(m) => m,
                        Err(e) => {
                            if !stop.load(Ordering::SeqCst) {
                                failure.fail(timeout_error(e, "destination heartbeat", timeout));
                            }
                            return;
                        }
                    };
                    *last_heard.lock().expect("not poisoned") = Instant::now();
                    let event = match message {
                        Message::PassApplied { generation } => {
                            ControlEvent::PassApplied(generation)
                        }
                        Message::Complete { pages } => {
                            // The session is over: the destination closes its end next, which is no
                            // failure, and the heartbeat must stop writing.
                            stop.store(true, Ordering::SeqCst);
                            let _ = events.send(ControlEvent::Complete(pages));
                            return;
                        }
                        Message::Pong(_) => continue,
                        Message::Feedback { busy_permille } => {
                            for (slot, busy) in receiver_busy.iter().zip(busy_permille) {
                                slot.store(u32::from(busy), Ordering::Relaxed);
                            }
                            continue;
                        }
                        Message::Error { channel, message } => {
                            failure.fail(TransportError::Peer { channel, message });
                            return;
                        }
                        other => {
                            failure.fail(TransportError::Protocol(format!(
                                "unexpected {} from the destination",
                                other.name()
                            )));
                            return;
                        }
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
            })
    }
}

fn spawn_heartbeat(
    writer: SharedWriter,
    failure: Arc<Failure>,
    stop: Arc<AtomicBool>,
    wake: Receiver<()>,
    last_heard: Arc<Mutex<Instant>>,
    interval: Duration,
    timeout: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ps-heartbeat".into())
        .spawn(move || {
            let mut nonce = 0;
            while !stop.load(Ordering::SeqCst) && !failure.has_failed() {
                // Woken at once when the session ends (`wake` disconnects) or fails, so that
                // joining this thread never holds up the end of a session.
                select! {
                    recv(wake) -> _ => return,
                    recv(failure.signal()) -> _ => return,
                    default(interval) => {}
                }
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if last_heard.lock().expect("not poisoned").elapsed() > timeout {
                    failure.fail(TransportError::Timeout {
                        what: "heartbeat",
                        after: timeout,
                    });
                    return;
                }
                nonce += 1;
                let sent = write_message(
                    &mut **writer.lock().expect("not poisoned"),
                    &Message::Ping(nonce),
                );
                if let Err(e) = sent {
                    if !stop.load(Ordering::SeqCst) {
                        failure.fail(e);
                    }
                    return;
                }
            }
        })
}

/// One channel's encoder and writer, on its own thread.
struct Worker {
    channel: u16,
    encoder: Encoder,
    writer: Box<dyn FrameWriter>,
    work: Receiver<Work>,
    pool: ChannelSender<PageBatch>,
    events: ChannelSender<WorkerEvent>,
    stats: Arc<SessionStats>,
    adaptive: bool,
    /// Current compression level (see [`Compression::Fixed`]).
    level: u32,
    window: Window,
    /// Busy share of the destination's decoders, per channel, from its feedback.
    receiver_busy: Arc<Vec<AtomicU32>>,
    /// Backlog that shows a full link: half the writer's queue.
    backlog_full: usize,
    /// What the last window showed.
    previous_link: LinkState,
    /// The pace of this worker's compressor.
    pace: CompressPace,
    /// Whether the encoder compresses a few groups at level 0 to measure that pace.
    probing: bool,
    /// Where pages of shared batches are copied to: one page, hot in the cache for the
    /// encoder's zero test, digest and copy into the frame.
    page: Box<Page>,
}

impl Worker {
    fn run(mut self) -> Result<(), TransportError> {
        let channel = self.channel;
        let mut spare = Vec::new();
        apply_level(&mut self.encoder, self.level, self.probing);
        self.send_frames()?;
        self.stats
            .set_compression_level(usize::from(channel), self.level);
        loop {
            let work = match self.work.try_recv() {
                Ok(work) => work,
                Err(_) => {
                    // Nothing to encode: finish sending what is queued, then wait for work.
                    // Time spent here waits on the link as much as a full queue does.
                    let waiting = Instant::now();
                    self.writer
                        .flush()
                        .map_err(|source| TransportError::Channel { channel, source })?;
                    self.window.blocked += waiting.elapsed();
                    match self.work.recv() {
                        Ok(work) => work,
                        Err(_) => return Ok(()),
                    }
                }
            };
            match work {
                Work::Pages(batch) => {
                    let mut next = 0;
                    for (&addr, &zero) in batch.addrs.iter().zip(&batch.zero) {
                        let page: &Page = if zero {
                            &pagecodec::ZERO_PAGE
                        } else {
                            next += PAGE_SIZE;
                            batch.data[next - PAGE_SIZE..next]
                                .try_into()
                                .expect("page-sized")
                        };
                        self.encoder
                            .encode(addr, batch.generation, page)
                            .map_err(|source| TransportError::Encode { channel, source })?;
                        self.send_frames()?;
                    }
                    let pages = batch.addrs.len();
                    let _ = self.pool.send(batch);
                    self.batch_done(pages, &mut spare);
                }
                Work::Shared(batch) => {
                    for &addr in &batch.addrs {
                        let page = match batch.source.page(addr) {
                            Some(page) => page,
                            None if batch.source.copy_page(addr, &mut self.page) => &self.page,
                            None => return Err(TransportError::NotInSource { channel, addr }),
                        };
                        self.encoder
                            .encode(addr, batch.generation, page)
                            .map_err(|source| TransportError::Encode { channel, source })?;
                        self.send_frames()?;
                    }
                    self.batch_done(batch.addrs.len(), &mut spare);
                }
                Work::Barrier(id) => {
                    self.encoder.flush();
                    self.send_frames()?;
                    let waiting = Instant::now();
                    self.writer
                        .flush()
                        .map_err(|source| TransportError::Channel { channel, source })?;
                    self.window.blocked += waiting.elapsed();
                    let frames = self.encoder.stats().frames;
                    let _ = self.events.send(WorkerEvent::Barrier {
                        channel,
                        id,
                        frames,
                    });
                }
                Work::Finish => {
                    self.encoder
                        .finish()
                        .map_err(|source| TransportError::Encode { channel, source })?;
                    self.send_frames()?;
                    self.writer
                        .finish()
                        .map_err(|source| TransportError::Channel { channel, source })?;
                    self.stats
                        .set_classes(usize::from(channel), self.encoder.stats().classes);
                    let frames = self.encoder.stats().frames;
                    let _ = self.events.send(WorkerEvent::Finished { channel, frames });
                    return Ok(());
                }
            }
        }
    }

    /// Bookkeeping after a batch of `pages` pages: statistics, sent frame buffers back to the
    /// encoder, the compression level.
    fn batch_done(&mut self, pages: usize, spare: &mut Vec<Vec<u8>>) {
        let channel = usize::from(self.channel);
        self.stats.pages(channel, pages as u64);
        self.stats
            .set_classes(channel, self.encoder.stats().classes);
        self.writer.reclaim(spare);
        for buf in spare.drain(..) {
            self.encoder.recycle(buf);
        }
        if self.adaptive {
            self.adapt();
        }
    }

    fn adapt(&mut self) {
        let channel = usize::from(self.channel);
        let busy = self.receiver_busy[channel].load(Ordering::Relaxed);
        let wall = self.window.started.elapsed();
        if wall < WINDOW {
            return;
        }
        let blocked =
            (self.window.blocked.as_nanos() * 1000 / wall.as_nanos().max(1)).min(1000) as u32;
        let link = link_state(blocked, self.writer.backlog(), self.backlog_full);
        let compress_rate = self.pace.update(self.encoder.stats());
        let pays = compression_can_pay(self.window.link_rate(wall), compress_rate);
        let next = next_level(self.level, link, self.previous_link, busy, pays);
        self.previous_link = link;
        self.window = Window::new();
        let probe = self.pace.is_stale();
        if next != self.level || probe != self.probing {
            self.level = next;
            self.probing = probe;
            apply_level(&mut self.encoder, next, probe);
            self.stats.set_compression_level(channel, next);
        }
    }

    /// Submits every ready frame.
    fn send_frames(&mut self) -> Result<(), TransportError> {
        while let Some(frame) = self.encoder.pop_frame() {
            self.stats.frame(usize::from(self.channel), frame.len());
            self.window.wire += frame.len() as u64;
            let waiting = Instant::now();
            self.writer
                .submit(frame)
                .map_err(|source| TransportError::Channel {
                    channel: self.channel,
                    source,
                })?;
            self.window.blocked += waiting.elapsed();
        }
        Ok(())
    }
}
