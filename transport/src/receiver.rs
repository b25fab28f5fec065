//! The destination end of a session.
//!
//! [`accept`] performs the handshake and returns the session's parameters, so that the caller can
//! set up guest memory of the right layout; [`PendingSession::run`] then accepts the data
//! channels, decodes each on its own thread into the caller's sink for that channel, and serves
//! the control connection (barriers, blobs, the end of the session) on the calling thread.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded, select};

use pagecodec::{Decoder, DecoderLimits, MemoryLayout, PageSink, ShardMap};

use crate::channel::{DEFAULT_MAX_FRAME_BODY, FrameReader};
use crate::control::{AcceptLimits, Hello, Message, MessageReader, PROTOCOL_VERSION, check_hello};
use crate::error::TransportError;
use crate::failure::{Failure, SharedWriter};
use crate::net::{
    Acceptor, ControlConn, Incoming, Killer, Log, read_message, stderr_log, timeout_error,
    write_message,
};
use crate::stats::{SessionStats, StatsSnapshot};

/// How a destination behaves.
#[derive(Clone)]
pub struct ReceiverConfig {
    /// Waiting for connections, and for the source's heartbeats, gives up after this long.
    pub timeout: Duration,
    /// What sessions are accepted.
    pub limits: AcceptLimits,
    /// Largest total cache budget a channel's stream may ask for.
    pub max_cache_bytes: u64,
    /// Where log lines go.
    pub log: Log,
    /// Called once when the session ends, failed or finished, before the channel threads are
    /// joined: a sink that waits on the application (for room in a bounded queue, say) must
    /// stop waiting then, or the session cannot end.
    pub on_end: Option<Killer>,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("timeout", &self.timeout)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            limits: AcceptLimits::default(),
            max_cache_bytes: 1 << 30,
            log: stderr_log(),
            on_end: None,
        }
    }
}

/// Something the source sent besides pages, handed to the caller as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Every page of this pass has been applied.
    PassApplied(u32),
    /// A blob, delivered after every pass that ended before it was applied.
    Blob {
        /// The sender's tag.
        tag: u32,
        /// The data.
        data: Vec<u8>,
    },
}

/// What a finished session received.
#[derive(Clone, Debug)]
pub struct ReceiveSummary {
    /// Counters at the end.
    pub stats: StatsSnapshot,
    /// From the handshake to `Complete`.
    pub elapsed: Duration,
    /// The data-channel backend.
    pub backend: &'static str,
}

/// A session whose handshake is done: its parameters are known, its data has not started.
pub struct PendingSession {
    hello: Hello,
    control: ControlConn,
    log: Log,
    config: ReceiverConfig,
    started: Instant,
}

impl std::fmt::Debug for PendingSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSession")
            .field("hello", &self.hello)
            .finish()
    }
}

/// Waits for a source to open a session, checks its `Hello` and accepts or refuses it. A
/// refused session is an error here too (the source gets the same reason).
pub fn accept(
    acceptor: &mut dyn Acceptor,
    config: &ReceiverConfig,
) -> Result<PendingSession, TransportError> {
    loop {
        match acceptor.accept(config.timeout)? {
            Incoming::Control(mut conn, Message::Hello(hello)) => {
                return match check_hello(&hello, &config.limits) {
                    Ok(()) => {
                        write_message(
                            &mut *conn.writer,
                            &Message::Welcome {
                                version: PROTOCOL_VERSION,
                            },
                        )?;
                        Ok(PendingSession {
                            hello,
                            control: conn,
                            log: config.log.clone(),
                            config: config.clone(),
                            started: Instant::now(),
                        })
                    }
                    Err(reason) => {
                        let _ = write_message(
                            &mut *conn.writer,
                            &Message::Refuse {
                                reason: reason.clone(),
                            },
                        );
                        (config.log)(&format!("refused a session: {reason}"));
                        Err(TransportError::Refused { reason })
                    }
                };
            }
            Incoming::Control(conn, other) => {
                (config.log)(&format!(
                    "ignored a control connection that opened with {}",
                    other.name()
                ));
                (conn.killer)();
            }
            Incoming::Data(join, _, killer) => {
                (config.log)(&format!(
                    "ignored data channel {} of session {} before any session was opened",
                    join.channel, join.session_id
                ));
                killer();
            }
        }
    }
}

/// Progress of each channel's decoder, for barriers and feedback.
struct Progress {
    frames: Mutex<Vec<u64>>,
    done: Mutex<Vec<bool>>,
    changed: Condvar,
    /// Nanoseconds each channel spent waiting for the next frame.
    wait_nanos: Vec<AtomicU64>,
}

/// How often the destination tells the source how busy its decoders are.
pub const FEEDBACK_INTERVAL: Duration = Duration::from_millis(50);

impl PendingSession {
    /// Guest memory layout of the session.
    pub fn layout(&self) -> &MemoryLayout {
        &self.hello.layout
    }

    /// Number of data channels.
    pub fn channels(&self) -> u16 {
        self.hello.channels
    }

    /// How pages are spread over the channels: sink `i` of [`PendingSession::run`] receives the
    /// pages of shard `i`.
    pub fn shard_map(&self) -> ShardMap {
        ShardMap::new(u32::from(self.hello.channels)).expect("checked: channels > 0")
    }

    /// Accepts the data channels and receives the session into `sinks` (one per channel, in
    /// channel order), calling `on_event` for barriers and blobs. Returns once the source
    /// finished and every channel's stream ended correctly, or with the first failure.
    pub fn run<S: PageSink + Send>(
        self,
        acceptor: &mut dyn Acceptor,
        sinks: Vec<S>,
        on_event: impl FnMut(ReceiverEvent),
    ) -> Result<ReceiveSummary, TransportError> {
        let stats = Arc::new(SessionStats::new(usize::from(self.hello.channels)));
        self.run_with_stats(acceptor, sinks, stats, on_event)
    }

    /// Like [`PendingSession::run`], with counters the caller can watch from another thread.
    pub fn run_with_stats<S: PageSink + Send>(
        self,
        acceptor: &mut dyn Acceptor,
        sinks: Vec<S>,
        stats: Arc<SessionStats>,
        mut on_event: impl FnMut(ReceiverEvent),
    ) -> Result<ReceiveSummary, TransportError> {
        let channels = usize::from(self.hello.channels);
        if sinks.len() != channels {
            return Err(TransportError::Usage(format!(
                "{} sinks for {channels} channels",
                sinks.len()
            )));
        }
        let PendingSession {
            hello,
            control,
            log,
            config,
            started,
        } = self;
        let writer: SharedWriter = Arc::new(Mutex::new(control.writer));
        let failure = Failure::new(writer.clone(), log.clone());
        failure.add_killer(control.killer);
        if let Some(on_end) = &config.on_end {
            failure.add_killer(on_end.clone());
        }

        let readers = match accept_channels(acceptor, &hello, &config, &failure) {
            Ok(readers) => readers,
            Err(e) => {
                failure.fail(e);
                return Err(failure.error());
            }
        };
        let progress = Arc::new(Progress {
            frames: Mutex::new(vec![0; channels]),
            done: Mutex::new(vec![false; channels]),
            changed: Condvar::new(),
            wait_nanos: (0..channels).map(|_| AtomicU64::new(0)).collect(),
        });
        // Dropped when the control connection is done, which ends the feedback thread.
        let (serving_tx, serving) = bounded::<()>(0);
        let limits = DecoderLimits {
            max_frame_body: DEFAULT_MAX_FRAME_BODY,
            max_cache_bytes: config.max_cache_bytes,
            max_memory_bytes: config.limits.max_memory_bytes,
            stream_id: None,
        };
        let result = std::thread::scope(|scope| {
            let mut threads: Vec<std::thread::ScopedJoinHandle<'_, ()>> = Vec::new();
            for (channel, (reader, sink)) in readers.into_iter().zip(sinks).enumerate() {
                let limits = DecoderLimits {
                    stream_id: Some(channel as u32),
                    ..limits.clone()
                };
                let (channel_failure, progress, stats) =
                    (failure.clone(), progress.clone(), stats.clone());
                let named = std::thread::Builder::new().name(format!("ps-recv-{channel}"));
                let spawned = named.spawn_scoped(scope, move || {
                    let result = receive_channel(channel, reader, sink, limits, &progress, &stats);
                    if let Err(e) = result {
                        channel_failure.fail(e);
                    }
                    // Wake a barrier waiting on this channel, whatever happened.
                    progress.changed.notify_all();
                });
                match spawned {
                    Ok(handle) => threads.push(handle),
                    Err(source) => {
                        failure.fail(TransportError::Connect {
                            what: "cannot start a channel thread".into(),
                            source,
                        });
                        return Err(failure.error());
                    }
                }
            }
            {
                let (writer, progress, failure_ref) = (&writer, &progress, &failure);
                let spawned = std::thread::Builder::new()
                    .name("ps-feedback".into())
                    .spawn_scoped(scope, move || {
                        send_feedback(writer, progress, failure_ref, serving)
                    });
                if let Err(source) = spawned {
                    failure.fail(TransportError::Connect {
                        what: "cannot start the feedback thread".into(),
                        source,
                    });
                    return Err(failure.error());
                }
            }
            let result = serve_control(
                control.reader,
                &writer,
                &failure,
                &progress,
                &stats,
                config.timeout,
                &mut on_event,
            );
            drop(serving_tx);
            match &result {
                Ok(()) => failure.close_all(),
                Err(e) if !failure.has_failed() => {
                    failure.fail(TransportError::AlreadyFailed(crate::error::full_message(e)))
                }
                Err(_) => {}
            }
            for thread in threads {
                let _ = thread.join();
            }
            result
        });
        match result {
            Ok(()) => Ok(ReceiveSummary {
                stats: stats.snapshot(),
                elapsed: started.elapsed(),
                backend: acceptor.backend(),
            }),
            Err(_) => Err(failure.error()),
        }
    }
}

/// Accepts the session's data channels, ignoring connections that do not belong to it.
fn accept_channels(
    acceptor: &mut dyn Acceptor,
    hello: &Hello,
    config: &ReceiverConfig,
    failure: &Failure,
) -> Result<Vec<Box<dyn FrameReader>>, TransportError> {
    let channels = usize::from(hello.channels);
    let mut readers: Vec<Option<Box<dyn FrameReader>>> = (0..channels).map(|_| None).collect();
    let deadline = Instant::now() + config.timeout;
    while readers.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let missing: Vec<usize> = (0..channels).filter(|&c| readers[c].is_none()).collect();
            return Err(TransportError::Protocol(format!(
                "data channels {missing:?} did not join within {} s",
                config.timeout.as_secs()
            )));
        }
        match acceptor.accept(left)? {
            Incoming::Data(join, reader, killer) => {
                let index = usize::from(join.channel);
                let problem = if join.session_id != hello.session_id {
                    Some(format!(
                        "belongs to session {}, not {}",
                        join.session_id, hello.session_id
                    ))
                } else if join.version != PROTOCOL_VERSION {
                    Some(format!("speaks protocol version {}", join.version))
                } else if index >= channels {
                    Some(format!(
                        "has index {index}, but the session has {channels} channels"
                    ))
                } else if readers[index].is_some() {
                    Some(format!("is a second channel {index}"))
                } else {
                    None
                };
                match problem {
                    Some(why) => {
                        (config.log)(&format!("refused a data connection: it {why}"));
                        killer();
                    }
                    None => {
                        failure.add_killer(killer);
                        readers[index] = Some(reader);
                    }
                }
            }
            Incoming::Control(mut conn, _) => {
                let _ = write_message(
                    &mut *conn.writer,
                    &Message::Refuse {
                        reason: "this destination is busy with another session".into(),
                    },
                );
                (conn.killer)();
            }
        }
    }
    Ok(readers
        .into_iter()
        .map(|r| r.expect("all joined"))
        .collect())
}

/// Decodes one channel until its stream ends.
fn receive_channel(
    channel: usize,
    mut reader: Box<dyn FrameReader>,
    mut sink: impl PageSink,
    limits: DecoderLimits,
    progress: &Progress,
    stats: &SessionStats,
) -> Result<(), TransportError> {
    let index = channel as u16;
    let mut decoder = Decoder::new(limits);
    let mut frames = 0u64;
    loop {
        let waiting = Instant::now();
        let frame = reader
            .next_frame()
            .map_err(|source| TransportError::Channel {
                channel: index,
                source,
            })?;
        progress.wait_nanos[channel]
            .fetch_add(waiting.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let Some(frame) = frame else {
            if !decoder.is_complete() {
                return Err(TransportError::Truncated {
                    channel: index,
                    frames,
                });
            }
            progress.done.lock().expect("not poisoned")[channel] = true;
            return Ok(());
        };
        let info = decoder
            .decode(frame, &mut sink)
            .map_err(|source| TransportError::Decode {
                channel: index,
                source,
            })?;
        // Time the sink waited for the application counts as waiting, not decoding: the
        // source must not take backpressure from the application for a busy decoder.
        progress.wait_nanos[channel]
            .fetch_add(sink.take_stalled().as_nanos() as u64, Ordering::Relaxed);
        frames += 1;
        stats.frame(channel, frame.len());
        if info.pages > 0 {
            stats.pages(channel, info.pages);
            stats.set_classes(channel, decoder.stats().classes);
        }
        progress.frames.lock().expect("not poisoned")[channel] = frames;
        progress.changed.notify_all();
    }
}

/// Tells the source, every [`FEEDBACK_INTERVAL`], how busy each channel's decoder was, so that
/// it can tell a slow link (compress more) from a busy destination (compress less).
fn send_feedback(
    writer: &SharedWriter,
    progress: &Progress,
    failure: &Failure,
    serving: Receiver<()>,
) {
    let mut last: Vec<u64> = progress
        .wait_nanos
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect();
    let mut last_at = Instant::now();
    loop {
        // Woken at once when the session ends (`serving` disconnects) or fails, so that
        // joining this thread never holds up the end of a session.
        select! {
            recv(serving) -> _ => return,
            recv(failure.signal()) -> _ => return,
            default(FEEDBACK_INTERVAL) => {}
        }
        let wall = last_at.elapsed().as_nanos().max(1) as u64;
        last_at = Instant::now();
        // Busy = not waiting for data: decoding, applying, or waiting for a CPU. Data that is
        // always there when the decoder asks means this end, not the link, is the bottleneck.
        let busy_permille = progress
            .wait_nanos
            .iter()
            .zip(&mut last)
            .map(|(wait, last)| {
                let now = wait.load(Ordering::Relaxed);
                let waited = ((now - *last) * 1000 / wall).min(1000) as u16;
                *last = now;
                1000 - waited
            })
            .collect();
        let sent = write_message(
            &mut **writer.lock().expect("not poisoned"),
            &Message::Feedback { busy_permille },
        );
        if sent.is_err() {
            return;
        }
    }
}

/// Waits until `ready` holds for the progress, or the session fails.
fn wait_progress(
    progress: &Progress,
    failure: &Failure,
    ready: impl Fn(&[u64], &[bool]) -> bool,
) -> Result<(), TransportError> {
    let mut frames = progress.frames.lock().expect("not poisoned");
    loop {
        if failure.has_failed() {
            return Err(failure.error());
        }
        let done = progress.done.lock().expect("not poisoned").clone();
        if ready(&frames, &done) {
            return Ok(());
        }
        frames = progress
            .changed
            .wait_timeout(frames, Duration::from_millis(50))
            .expect("not poisoned")
            .0;
    }
}

fn serve_control(
    mut reader: Box<dyn Read + Send>,
    writer: &SharedWriter,
    failure: &Failure,
    progress: &Progress,
    stats: &SessionStats,
    timeout: Duration,
    on_event: &mut impl FnMut(ReceiverEvent),
) -> Result<(), TransportError> {
    let mut pending = MessageReader::new();
    let mut blob: Option<(u32, Vec<u8>)> = None;
    let send = |message: &Message| -> Result<(), TransportError> {
        write_message(&mut **writer.lock().expect("not poisoned"), message)
    };
    loop {
        if failure.has_failed() {
            return Err(failure.error());
        }
        let message = read_message(&mut reader, &mut pending)
            .map_err(|e| timeout_error(e, "source heartbeat", timeout))?;
        match message {
            Message::Ping(nonce) => send(&Message::Pong(nonce))?,
            Message::PassEnd { generation, frames } => {
                check_counts("PassEnd", &frames, progress)?;
                wait_progress(progress, failure, |got, _| {
                    got.iter().zip(&frames).all(|(got, want)| got >= want)
                })?;
                send(&Message::PassApplied { generation })?;
                on_event(ReceiverEvent::PassApplied(generation));
            }
            Message::Blob { tag, more, data } => {
                let (blob_tag, mut bytes) = blob.take().unwrap_or((tag, Vec::new()));
                if blob_tag != tag {
                    return Err(TransportError::Protocol(format!(
                        "blob {tag} started before blob {blob_tag} ended"
                    )));
                }
                bytes.extend_from_slice(&data);
                if more {
                    blob = Some((tag, bytes));
                } else {
                    on_event(ReceiverEvent::Blob { tag, data: bytes });
                }
            }
            Message::Finish { frames } => {
                check_counts("Finish", &frames, progress)?;
                wait_progress(progress, failure, |_, done| done.iter().all(|&d| d))?;
                let got = progress.frames.lock().expect("not poisoned").clone();
                if got != frames {
                    return Err(TransportError::Protocol(format!(
                        "the source finished after {frames:?} frames per channel, but {got:?} arrived"
                    )));
                }
                let pages = stats.snapshot().pages();
                send(&Message::Complete { pages })?;
                return Ok(());
            }
            Message::Error { channel, message } => {
                failure.fail(TransportError::Peer { channel, message });
                return Err(failure.error());
            }
            other => {
                return Err(TransportError::Protocol(format!(
                    "unexpected {} from the source",
                    other.name()
                )));
            }
        }
    }
}

fn check_counts(what: &str, frames: &[u64], progress: &Progress) -> Result<(), TransportError> {
    let channels = progress.frames.lock().expect("not poisoned").len();
    if frames.len() != channels {
        return Err(TransportError::Protocol(format!(
            "{what} lists {} channels, the session has {channels}",
            frames.len()
        )));
    }
    Ok(())
}
