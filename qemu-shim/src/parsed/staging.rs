//! Parsing mode at the destination: the staging area where the channels' decoded pages wait,
//! by channel and pass, until the rebuilding writes them to QEMU; bounded, so that a slow
//! destination QEMU slows the link down rather than filling the shim's memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pagecodec::{Generation, PAGE_SIZE, Page, PageAddr, PageSink, SinkError};

/// Page bytes the destination holds for passes it may not write yet, before the channels wait.
/// It bounds how far the destination QEMU lags behind the link: what is held here must still be
/// written when the source stops its guest, and a short lag keeps the downtime short. The
/// channels' waiting reaches the source as a full link, then QEMU as a slow socket, so QEMU's
/// bandwidth estimate (which decides when it stops the guest) sees the real pace.
pub(super) const STAGED_LIMIT: usize = 16 << 20;

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
pub(super) struct Bucket {
    /// Address and whether the page is zero (no bytes in `chunks`).
    pub(super) records: Vec<(PageAddr, bool)>,
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
    pub(super) fn pages(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().flat_map(|c| c.chunks_exact(PAGE_SIZE))
    }
}

/// Decoded pages and stream bytes on their way from the channels to the writer of QEMU's stream.
#[derive(Default)]
pub(super) struct Staging {
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
pub(super) enum WriterWork {
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
    pub(super) fn push(
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
    pub(super) fn blob(&self, tag: u32, data: Vec<u8>) {
        self.state
            .lock()
            .expect("not poisoned")
            .blobs
            .push_back((tag, data));
        self.work.notify_one();
    }

    pub(super) fn set_channels(&self, channels: usize) {
        self.state.lock().expect("not poisoned").buckets =
            (0..channels).map(|_| BTreeMap::new()).collect();
    }

    /// The transport delivered everything.
    pub(super) fn finish(&self) {
        self.state.lock().expect("not poisoned").finished = true;
        self.work.notify_one();
    }

    /// The transport's session ended (its last act before it joins the channel threads):
    /// channels stop waiting for room; the writer goes on with what it has.
    pub(super) fn release_channels(&self) {
        self.state.lock().expect("not poisoned").released = true;
        self.room.notify_all();
    }

    /// Everyone stops waiting, now and later.
    pub(super) fn stop(&self) {
        self.state.lock().expect("not poisoned").stopped = true;
        self.work.notify_all();
        self.room.notify_all();
    }

    /// The writer's next work; waits for it.
    pub(super) fn next(&self) -> WriterWork {
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
    pub(super) fn batch_written(&self, buckets: Vec<Bucket>) {
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
    pub(super) fn written_through(&self, tag: u32) {
        let mut state = self.state.lock().expect("not poisoned");
        state.writable = Some(state.writable.map_or(tag, |w| w.max(tag)));
        if state.channels_waiting > 0 {
            self.room.notify_all();
        }
    }
}

/// A channel's decoded pages, into the staging.
pub(super) struct StagingSink {
    pub(super) staging: Arc<Staging>,
    pub(super) channel: usize,
    /// Time spent waiting for room, not yet reported.
    pub(super) stalled: Duration,
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

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::parsed::{BLOB_BYTES, BLOB_BYTES_THEN_PAGES};

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
}
