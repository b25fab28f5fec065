//! Parsing mode at the destination: the stream the destination QEMU reads, rebuilt from the
//! staged pages and the source's blobs in the order QEMU's loader needs.

use std::io::{self, BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use pagecodec::{MemoryLayout, PAGE_SIZE};
use pagestream_transport::channel::DEFAULT_MAX_FRAME_BODY;
use pagestream_transport::error::full_message;
use pagestream_transport::net::Acceptor as _;
use pagestream_transport::{
    ReceiverConfig, ReceiverEvent, SessionStats, StreamAcceptor, TcpBackend, accept,
};

use super::staging::{Bucket, Staging, StagingSink, WriterWork};
use super::{
    BLOB_BLOCKS, BLOB_BYTES, BLOB_BYTES_THEN_PAGES, BLOB_ENDED_EARLY, BLOB_FINISHED, BLOB_MODE,
    SECTIONS_UNKNOWN, UNPARSED_FOR_MULTIFD, decode_blocks, mode_text,
};
use crate::destination::{DestinationConfig, QEMU_READY_TIMEOUT};
use crate::endpoint::{Conn, connect_qemu};
use crate::link::{self, Compression};
use crate::multifd::{self, MultifdOut};
use crate::relay::{Watch, WatchedReader};
use crate::session::Session;
use crate::stream::{self, RamBlock};
use crate::stream_end::{EndWatch, StreamEnd};

/// How long a destination QEMU with multifd may take to start reading its main channel once
/// the shim opened all its channels.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(10);

/// What a writer of the destination returns when the session ended before its stream did: the
/// echo of a failure reported elsewhere.
const SESSION_ENDED_EARLY: &str = "the session ended early";

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
    use super::*;
    use crate::parsed::encode_blocks;

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
