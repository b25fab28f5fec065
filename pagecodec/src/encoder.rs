//! Turning pages into frames.
//!
//! The encoder is a plain state machine: pages go in through [`Encoder::encode`], finished frames
//! come out of [`Encoder::pop_frame`]. It does no I/O and starts no thread, and reads no clock but
//! its thread's CPU clock, to time its compressors ([`EncoderStats::compress_nanos`]); a caller
//! that wants parallelism runs one encoder per shard (see [`ShardMap`](crate::ShardMap)).
//!
//! Pages that end up LZ4-compressed are gathered into groups of up to [`MAX_GROUP_PAGES`]
//! consecutive pages and compressed as one block: LZ4 then finds matches across neighbouring
//! pages, which makes it both faster and tighter than page by page. Zero and unchanged pages are
//! gathered into runs the same way. At most one run or group is pending at a time, and it is
//! written before any other record, so records reach the decoder in the order the encoder made
//! its cache decisions.
//!
//! For links slower than the CPUs, a share of the groups can be compressed with zstd (level 1)
//! instead ([`Encoder::set_zstd_share`]): about a quarter fewer bytes on guest memory, at several
//! times LZ4's CPU cost.

use std::collections::VecDeque;

use lz4_flex::block::{CompressTable, compress_into_with_table, get_maximum_output_size};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::cache::{DeltaCache, DupIndex};
use crate::cpu_clock::CpuInstant;
use crate::history::DeliveredDigests;
use crate::page::{
    ClassCounts, Generation, MemoryLayout, PAGE_SIZE, Page, PageAddr, PageClass, ZERO_PAGE,
    is_zero_page,
};
use crate::wire::{
    self, FEATURE_DELTA, FEATURE_DUP_CACHE, FEATURE_ZSTD, FrameHeader, FrameKind, HEADER_LEN,
    MAX_FRAME_BODY, MAX_FRAME_PAGES, MAX_GROUP_PAGES, MAX_RECORD_OVERHEAD, MAX_RUN_PAGES,
    TRAILER_LEN, put_varint, record, varint_len,
};

/// Default budget of the content (duplicate) cache, per side.
pub const DEFAULT_DUP_CACHE_BYTES: u64 = 64 << 20;
/// Default budget of the delta cache, per side.
pub const DEFAULT_DELTA_CACHE_BYTES: u64 = 64 << 20;
/// Default size at which a frame is closed.
pub const DEFAULT_TARGET_FRAME_BYTES: u32 = 256 << 10;
/// Largest cache budget (in pages) a stream may ask for.
pub const MAX_CACHE_SLOTS: u64 = u32::MAX as u64;

/// A delta record this small is taken without also trying plain LZ4 on the page: LZ4 of a whole
/// page cannot be much smaller, and skipping it saves the most expensive step.
const SMALL_DELTA: usize = 64;

const GROUP_BYTES: usize = MAX_GROUP_PAGES as usize * PAGE_SIZE;
const LZ4_BOUND: usize = GROUP_BYTES * 110 / 100 + 20;

/// Most bytes that writing the pending run or group can add to a frame: a group that does not
/// compress is written as one raw record per page.
const MAX_PENDING_LEN: usize = MAX_GROUP_PAGES as usize * (MAX_RECORD_OVERHEAD + PAGE_SIZE);

/// How an encoder is set up.
#[derive(Clone, Debug)]
pub struct EncoderConfig {
    /// Identifies the stream to its decoder.
    pub stream_id: u32,
    /// The regions pages may be addressed in.
    pub layout: MemoryLayout,
    /// Budget of the content cache for duplicate detection (0 turns it off), capped at the size
    /// of guest memory. The decoder keeps an identical cache, so this costs memory on both ends;
    /// the encoder makes its cache memory resident when it is created.
    pub dup_cache_bytes: u64,
    /// Budget of the delta cache (0 turns deltas off); also kept on both ends.
    pub delta_cache_bytes: u64,
    /// A frame is closed once its body reaches this size.
    pub target_frame_bytes: u32,
    /// Seed of the content digests. Pass a per-migration random value: a guest that could
    /// predict digests could make the cache index degrade.
    pub digest_seed: u64,
    /// Make the content cache's memory resident at creation, so that filling it never stalls
    /// the page stream (a page fault per 4 KiB otherwise, expensive on some VMs). Off, memory is
    /// taken as the cache fills, or never if admission is switched off.
    pub prefault_caches: bool,
    /// Allow zstd records (declared in the stream's features; used once
    /// [`Encoder::set_zstd_share`] asks for them).
    pub allow_zstd: bool,
}

impl EncoderConfig {
    /// The default configuration for stream `stream_id` over `layout`.
    pub fn new(stream_id: u32, layout: MemoryLayout) -> Self {
        Self {
            stream_id,
            layout,
            dup_cache_bytes: DEFAULT_DUP_CACHE_BYTES,
            delta_cache_bytes: DEFAULT_DELTA_CACHE_BYTES,
            target_frame_bytes: DEFAULT_TARGET_FRAME_BYTES,
            digest_seed: 0,
            prefault_caches: true,
            allow_zstd: true,
        }
    }
}

/// What went wrong while encoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The page's address is not in the stream's memory layout.
    #[error("{addr} is outside the stream's memory layout")]
    AddressOutsideLayout {
        /// The address given.
        addr: PageAddr,
    },
    /// Pages of an earlier pass after pages of a later one.
    #[error(
        "page of generation {generation} after generation {current}: generations may not go back"
    )]
    GenerationWentBack {
        /// The page's generation.
        generation: Generation,
        /// The stream's current generation.
        current: Generation,
    },
    /// The stream was already finished.
    #[error("the stream is already finished")]
    Finished,
    /// A cache budget beyond what the format can express.
    #[error("{cache} cache budget of {bytes} bytes exceeds the limit of {} bytes", MAX_CACHE_SLOTS * PAGE_SIZE as u64)]
    CacheTooLarge {
        /// Which cache.
        cache: &'static str,
        /// Budget asked for.
        bytes: u64,
    },
    /// A frame size the format cannot carry.
    #[error("target frame size {bytes} must be between 1 and {} bytes", MAX_FRAME_BODY as usize - MAX_PENDING_LEN - MAX_RECORD_OVERHEAD - PAGE_SIZE)]
    BadFrameTarget {
        /// Size asked for.
        bytes: u32,
    },
}

/// Totals of one encoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncoderStats {
    /// Pages accepted.
    pub pages: u64,
    /// Pages and record bytes by class.
    pub classes: ClassCounts,
    /// Frames produced, including Start and End.
    pub frames: u64,
    /// Bytes of all frames produced.
    pub wire_bytes: u64,
    /// Page bytes given to the group compressors (LZ4 or zstd).
    pub compressed_input: u64,
    /// CPU time the encoding thread spent in the group compressors, nanoseconds (its CPU
    /// clock, so that time spent waiting for a CPU does not count): with `compressed_input`,
    /// the pace at which this encoder compresses, which tells a caller whether compressing can
    /// keep up with its link.
    pub compress_nanos: u64,
}

/// Consecutive pages not yet written: a run of zero or unchanged pages, or a group of pages to
/// compress together.
#[derive(Debug, Clone, Copy)]
enum Pending {
    None,
    Run {
        kind: u8,
        start: PageAddr,
        count: u64,
    },
    Group {
        start: PageAddr,
        count: u32,
        admit_dup: bool,
        admit_delta: bool,
    },
}

impl Pending {
    /// The address right after the pending pages.
    fn next_addr(&self) -> Option<PageAddr> {
        match *self {
            Pending::None => None,
            Pending::Run { start, count, .. } => {
                Some(PageAddr::new(start.region, start.index + count))
            }
            Pending::Group { start, count, .. } => {
                Some(PageAddr::new(start.region, start.index + u64::from(count)))
            }
        }
    }
}

/// The Pages frame being built.
#[derive(Debug)]
struct OpenFrame {
    /// Header space, then the body so far; longer than `pos` (never shrunk, to avoid re-zeroing).
    buf: Vec<u8>,
    pos: usize,
    records: u32,
    /// Pages written or pending in this frame.
    pages: u64,
    /// Address right after the last record's last page: where a NEXT record starts.
    next_addr: Option<PageAddr>,
    pending: Pending,
}

/// LZ4's hash table, kept between blocks so that each compression does not allocate one.
struct Lz4Table(CompressTable);

impl std::fmt::Debug for Lz4Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lz4Table")
    }
}

/// Scratch buffers of the encoder.
#[derive(Debug)]
struct Scratch {
    /// Pages of the pending group, back to back.
    group: Box<[u8; GROUP_BYTES]>,
    /// LZ4 output.
    lz4: Box<[u8; LZ4_BOUND]>,
    /// LZ4 output of a delta.
    delta: Box<[u8; LZ4_BOUND]>,
    /// Page XOR its previous version.
    xor: Box<Page>,
    table: Lz4Table,
    /// zstd output of a group.
    zstd_out: Vec<u8>,
    /// zstd's compression context, made at the first zstd group.
    zstd: Option<ZstdContext>,
}

/// zstd's compression context (level 1).
struct ZstdContext(zstd::bulk::Compressor<'static>);

impl std::fmt::Debug for ZstdContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZstdContext")
    }
}

impl Scratch {
    /// LZ4-compresses `input` into `out`.
    fn compress(table: &mut Lz4Table, input: &[u8], out: &mut [u8]) -> usize {
        compress_into_with_table(input, out, &mut table.0)
            .expect("output buffer holds LZ4's worst case")
    }
}

/// The encoding state of one stream.
#[derive(Debug)]
pub struct Encoder {
    stream_id: u32,
    features: u16,
    layout: MemoryLayout,
    target_frame_bytes: usize,
    digest_seed: u64,
    zero_digest: u128,
    generation: Generation,
    next_seq: u64,
    page_frames: u64,
    finished: bool,
    frame: OpenFrame,
    ready: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    delivered: DeliveredDigests,
    dup: Option<DupIndex>,
    delta: Option<DeltaCache>,
    scratch: Scratch,
    /// Percentage of LZ4 groups that are compressed; the others go raw.
    lz4_share: u32,
    /// Whether new content enters the content cache.
    admit_dup: bool,
    /// Accumulates `lz4_share` per group; a group is compressed when it reaches 100.
    lz4_credit: u32,
    /// Percentage of compressed groups that use zstd rather than LZ4.
    zstd_share: u32,
    /// Accumulates `zstd_share` per compressed group.
    zstd_credit: u32,
    stats: EncoderStats,
}

fn clamp_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn cache_slots(cache: &'static str, bytes: u64) -> Result<u32, EncodeError> {
    let slots = bytes / PAGE_SIZE as u64;
    u32::try_from(slots).map_err(|_| EncodeError::CacheTooLarge { cache, bytes })
}

/// The largest frame body an encoder closing frames at `target_frame_bytes` can produce: a
/// frame is closed as soon as its body reaches the target, and what is written before that
/// check is at most the pending pages plus one record. A receiver whose frame limit is below
/// this cannot take such a stream.
pub fn max_frame_body(target_frame_bytes: u32) -> usize {
    target_frame_bytes as usize + MAX_PENDING_LEN + MAX_RECORD_OVERHEAD + PAGE_SIZE
}

impl Encoder {
    /// A new stream; its Start frame is ready at once.
    pub fn new(config: EncoderConfig) -> Result<Self, EncodeError> {
        debug_assert!(get_maximum_output_size(GROUP_BYTES) <= LZ4_BOUND);
        let max_target =
            MAX_FRAME_BODY as usize - MAX_PENDING_LEN - MAX_RECORD_OVERHEAD - PAGE_SIZE;
        if config.target_frame_bytes == 0 || config.target_frame_bytes as usize > max_target {
            return Err(EncodeError::BadFrameTarget {
                bytes: config.target_frame_bytes,
            });
        }
        // A cache larger than guest memory cannot hold anything more useful than one that size.
        let guest_pages = config.layout.total_pages();
        let dup_slots = cache_slots("content", config.dup_cache_bytes)?.min(clamp_u32(guest_pages));
        let delta_slots =
            cache_slots("delta", config.delta_cache_bytes)?.min(clamp_u32(guest_pages));
        let mut features = 0;
        if dup_slots > 0 {
            features |= FEATURE_DUP_CACHE;
        }
        if delta_slots > 0 {
            features |= FEATURE_DELTA;
        }
        if config.allow_zstd {
            features |= FEATURE_ZSTD;
        }
        let mut encoder = Self {
            stream_id: config.stream_id,
            features,
            target_frame_bytes: config.target_frame_bytes as usize,
            digest_seed: config.digest_seed,
            zero_digest: xxh3_128_with_seed(&ZERO_PAGE, config.digest_seed),
            generation: 0,
            next_seq: 0,
            page_frames: 0,
            finished: false,
            frame: OpenFrame {
                buf: Vec::new(),
                pos: HEADER_LEN,
                records: 0,
                pages: 0,
                next_addr: None,
                pending: Pending::None,
            },
            ready: VecDeque::new(),
            spare: Vec::new(),
            delivered: DeliveredDigests::default(),
            dup: (dup_slots > 0).then(|| DupIndex::new(dup_slots)),
            delta: (delta_slots > 0).then(|| DeltaCache::new(delta_slots)),
            scratch: Scratch {
                group: Box::new([0; GROUP_BYTES]),
                lz4: Box::new([0; LZ4_BOUND]),
                delta: Box::new([0; LZ4_BOUND]),
                xor: Box::new(ZERO_PAGE),
                // The 32-bit table: faster and tighter than the 16-bit one even on single pages.
                table: Lz4Table(CompressTable::large()),
                zstd_out: Vec::new(),
                zstd: None,
            },
            lz4_share: 100,
            lz4_credit: 0,
            zstd_share: 0,
            zstd_credit: 0,
            admit_dup: true,
            stats: EncoderStats::default(),
            layout: config.layout,
        };
        // Touch the content cache's memory now, during setup: acquiring fresh memory is a page
        // fault per 4 KiB (1.4 to 10 µs each on the development VMs), which would otherwise stall
        // the page stream until the cache is full. The delta cache only fills in later passes,
        // at a slower pace: it takes its memory as it goes.
        if config.prefault_caches
            && let Some(dup) = &mut encoder.dup
        {
            dup.prefault();
        }
        encoder.frame.buf = encoder.new_frame_buffer();
        encoder.push_start_frame(dup_slots, delta_slots);
        Ok(encoder)
    }

    /// Bytes a frame buffer needs: a header, the largest body, the trailer.
    fn frame_capacity(&self) -> usize {
        HEADER_LEN + max_frame_body(self.target_frame_bytes as u32) + TRAILER_LEN
    }

    fn new_frame_buffer(&mut self) -> Vec<u8> {
        let capacity = self.frame_capacity();
        let mut buf = self.spare.pop().unwrap_or_default();
        if buf.len() < capacity {
            buf.resize(capacity, 0);
        }
        buf
    }

    fn push_start_frame(&mut self, dup_slots: u32, delta_slots: u32) {
        let regions = self.layout.region_pages();
        let mut body = Vec::with_capacity(16 + 8 * regions.len());
        body.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        body.extend_from_slice(&dup_slots.to_le_bytes());
        body.extend_from_slice(&delta_slots.to_le_bytes());
        body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        for pages in regions {
            body.extend_from_slice(&pages.to_le_bytes());
        }
        self.push_control_frame(FrameKind::Start, &body);
    }

    /// Queues a Start or End frame.
    fn push_control_frame(&mut self, kind: FrameKind, body: &[u8]) {
        let mut frame = vec![0u8; HEADER_LEN + body.len() + TRAILER_LEN];
        frame[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
        self.seal(kind, 0, &mut frame, HEADER_LEN + body.len());
        self.ready.push_back(frame);
    }

    /// Writes the header and checksum of a frame whose body ends at `end`, and counts it.
    fn seal(&mut self, kind: FrameKind, records: u32, buf: &mut [u8], end: usize) {
        let header = FrameHeader {
            kind,
            features: self.features,
            stream_id: self.stream_id,
            generation: self.generation,
            seq: self.next_seq,
            records,
            body_len: (end - HEADER_LEN) as u32,
        };
        header.write(buf);
        let checksum = wire::frame_checksum(&buf[..end]);
        buf[end..end + TRAILER_LEN].copy_from_slice(&checksum.to_le_bytes());
        self.next_seq += 1;
        self.stats.frames += 1;
        self.stats.wire_bytes += (end + TRAILER_LEN) as u64;
    }

    /// Encodes one page of generation `generation` at `addr`. The form it takes shows in
    /// [`Encoder::stats`] once its record is written (pages wait in runs and LZ4 groups).
    pub fn encode(
        &mut self,
        addr: PageAddr,
        generation: Generation,
        page: &Page,
    ) -> Result<(), EncodeError> {
        if self.finished {
            return Err(EncodeError::Finished);
        }
        if !self.layout.contains_run(addr, 1) {
            return Err(EncodeError::AddressOutsideLayout { addr });
        }
        if generation < self.generation {
            return Err(EncodeError::GenerationWentBack {
                generation,
                current: self.generation,
            });
        }
        if generation > self.generation {
            // A frame carries one generation.
            self.flush();
            self.generation = generation;
        }
        self.stats.pages += 1;

        let zero = is_zero_page(page);
        let digest = if zero {
            self.zero_digest
        } else {
            xxh3_128_with_seed(page, self.digest_seed)
        };
        let previous = self.delivered.replace(addr, digest);
        if previous == Some(digest) {
            self.add_to_run(record::UNCHANGED_RUN, addr);
        } else if zero {
            self.add_to_run(record::ZERO_RUN, addr);
            if let Some(delta) = &mut self.delta {
                delta.update(addr, &ZERO_PAGE, false);
            }
        } else {
            self.content_page(addr, page, digest, previous.is_some());
        }
        if self.frame.pages >= MAX_FRAME_PAGES {
            self.close_frame();
        }
        Ok(())
    }

    /// Adds a page to the pending run of `kind`, or starts one.
    fn add_to_run(&mut self, kind: u8, addr: PageAddr) {
        let next = self.frame.pending.next_addr();
        match &mut self.frame.pending {
            Pending::Run { kind: k, count, .. }
                if *k == kind && next == Some(addr) && *count < MAX_RUN_PAGES =>
            {
                *count += 1;
            }
            _ => {
                self.write_pending();
                self.frame.pending = Pending::Run {
                    kind,
                    start: addr,
                    count: 1,
                };
            }
        }
        self.frame.pages += 1;
    }

    /// Encodes a page whose content the decoder must be given: duplicate, delta or LZ4 (or raw,
    /// if LZ4 does not help).
    fn content_page(&mut self, addr: PageAddr, page: &Page, digest: u128, resent: bool) {
        // Admit pages into the delta cache once they are sent a second time: pages the guest
        // keeps rewriting are the ones worth a delta, a single full pass is not.
        let delta_slot = self.delta.as_ref().and_then(|d| d.slot_of(addr));
        let admit_delta = self.delta.is_some() && delta_slot.is_none() && resent;

        let hit = self.dup.as_ref().and_then(|dup| dup.find(digest, page));
        if let Some(slot) = hit {
            let dup = self.dup.as_mut().expect("the hit came from the cache");
            dup.touch(slot);
            self.write_pending();
            let tag = record::DUPLICATE | if admit_delta { record::ADMIT_DELTA } else { 0 };
            let start = self.frame.pos;
            let pos = self.record_head(tag, addr);
            self.frame.pos = put_varint(&mut self.frame.buf, pos, u64::from(slot));
            if let Some(delta) = &mut self.delta {
                delta.update(addr, page, admit_delta);
            }
            self.frame.pages += 1;
            self.record_done(addr, 1, PageClass::Duplicate, start);
            self.close_frame_if_full();
            return;
        }

        if let Some(slot) = delta_slot
            && self.try_delta(addr, page, slot)
        {
            return;
        }
        if self.lz4_share == 0 {
            // Nothing will be compressed: write the page straight into the frame rather than
            // gathering it into a group first (one copy fewer on the fastest links).
            self.raw_record(addr, page, digest, admit_delta);
        } else {
            self.add_to_group(addr, page, digest, admit_delta);
        }
    }

    /// Writes a page as a raw record of its own, with its cache side effects.
    fn raw_record(&mut self, addr: PageAddr, page: &Page, digest: u128, admit_delta: bool) {
        self.write_pending();
        let mut flags = if admit_delta { record::ADMIT_DELTA } else { 0 };
        if self.dup.is_some() && self.admit_dup {
            flags |= record::ADMIT_DUP;
        }
        let start = self.frame.pos;
        let pos = self.record_head(record::RAW | flags, addr);
        self.frame.buf[pos..pos + PAGE_SIZE].copy_from_slice(page);
        self.frame.pos = pos + PAGE_SIZE;
        // Cache side effects, in the order the format fixes (see `wire`).
        if flags & record::ADMIT_DUP != 0
            && let Some(dup) = &mut self.dup
        {
            dup.insert(digest, page);
        }
        if let Some(delta) = &mut self.delta {
            delta.update(addr, page, admit_delta);
        }
        self.frame.pages += 1;
        self.record_done(addr, 1, PageClass::Raw, start);
        self.close_frame_if_full();
    }

    /// Writes `page` as a delta against its cached previous version if that beats LZ4 of the
    /// page alone; returns whether it did.
    fn try_delta(&mut self, addr: PageAddr, page: &Page, slot: u32) -> bool {
        let s = &mut self.scratch;
        let delta = self.delta.as_ref().expect("slot came from the delta cache");
        for ((x, a), b) in s
            .xor
            .iter_mut()
            .zip(page.iter())
            .zip(delta.page(slot).iter())
        {
            *x = a ^ b;
        }
        let len = Scratch::compress(&mut s.table, &s.xor[..], &mut s.delta[..]);
        let delta_cost = varint_len(len as u64) + len;
        if len >= PAGE_SIZE {
            return false;
        }
        if delta_cost > SMALL_DELTA {
            let alone = Scratch::compress(&mut s.table, page, &mut s.lz4[..]);
            // As an LZ4 record of one page: count, length, data.
            let alone_cost = varint_len(1) + varint_len(alone as u64) + alone;
            if alone_cost <= delta_cost {
                return false;
            }
        }
        self.write_pending();
        // No ADMIT_DUP: a hot page's latest version is rarely another page's twin, and caching
        // every version would push real duplicates out of the content cache.
        let start = self.frame.pos;
        let mut pos = self.record_head(record::DELTA, addr);
        let buf = &mut self.frame.buf;
        pos = put_varint(buf, pos, len as u64);
        buf[pos..pos + len].copy_from_slice(&self.scratch.delta[..len]);
        self.frame.pos = pos + len;
        // Cache side effects, in the order the format fixes (see `wire`).
        let delta = self.delta.as_mut().expect("slot came from the delta cache");
        delta.touch(slot);
        delta.update(addr, page, false);
        self.frame.pages += 1;
        self.record_done(addr, 1, PageClass::Delta, start);
        self.close_frame_if_full();
        true
    }

    /// Adds a page to the pending LZ4 group, starting a new group when the page does not follow
    /// the pending one. The page's cache side effects happen now, which is where the decoder will
    /// perform them: nothing is written between now and the group's record.
    fn add_to_group(&mut self, addr: PageAddr, page: &Page, digest: u128, admit_delta: bool) {
        let next = self.frame.pending.next_addr();
        let admit_dup = self.admit_dup;
        let joins = matches!(
            self.frame.pending,
            Pending::Group { count, admit_dup: d, admit_delta: a, .. }
                if next == Some(addr) && a == admit_delta && d == admit_dup && count < MAX_GROUP_PAGES
        );
        if !joins {
            self.write_pending();
            self.frame.pending = Pending::Group {
                start: addr,
                count: 0,
                admit_dup,
                admit_delta,
            };
        }
        let Pending::Group { count, .. } = &mut self.frame.pending else {
            unreachable!("a group is pending")
        };
        let at = *count as usize * PAGE_SIZE;
        self.scratch.group[at..at + PAGE_SIZE].copy_from_slice(page);
        *count += 1;
        let full = *count == MAX_GROUP_PAGES;
        if self.admit_dup
            && let Some(dup) = &mut self.dup
        {
            dup.insert(digest, page);
        }
        if let Some(delta) = &mut self.delta {
            delta.update(addr, page, admit_delta);
        }
        self.frame.pages += 1;
        if full {
            self.write_pending();
        }
    }

    /// Writes the pending run or group, if any, as records, then closes the frame if it is full.
    fn write_pending(&mut self) {
        match std::mem::replace(&mut self.frame.pending, Pending::None) {
            Pending::None => return,
            Pending::Run { kind, start, count } => {
                let begin = self.frame.pos;
                let pos = self.record_head(kind, start);
                self.frame.pos = put_varint(&mut self.frame.buf, pos, count);
                let class = if kind == record::ZERO_RUN {
                    PageClass::Zero
                } else {
                    PageClass::Unchanged
                };
                self.record_done(start, count, class, begin);
            }
            Pending::Group {
                start,
                count,
                admit_dup,
                admit_delta,
            } => self.write_group(start, count, admit_dup, admit_delta),
        }
        self.close_frame_if_full();
    }

    fn write_group(&mut self, start: PageAddr, count: u32, admit_dup: bool, admit_delta: bool) {
        let mut flags = if self.dup.is_some() && admit_dup {
            record::ADMIT_DUP
        } else {
            0
        };
        if admit_delta {
            flags |= record::ADMIT_DELTA;
        }
        let raw_len = count as usize * PAGE_SIZE;
        self.lz4_credit += self.lz4_share;
        let compress = self.lz4_credit >= 100;
        if compress {
            self.lz4_credit -= 100;
        }
        let timer = compress.then(CpuInstant::now);
        let zstd_len = if compress && self.features & FEATURE_ZSTD != 0 {
            self.zstd_credit += self.zstd_share;
            if self.zstd_credit >= 100 {
                self.zstd_credit -= 100;
                self.zstd_group(raw_len)
            } else {
                None
            }
        } else {
            None
        };
        let s = &mut self.scratch;
        let (kind, class, len) = match zstd_len {
            Some(len) => (record::ZSTD, PageClass::Zstd, len),
            None if compress => (
                record::LZ4,
                PageClass::Lz4,
                Scratch::compress(&mut s.table, &s.group[..raw_len], &mut s.lz4[..]),
            ),
            None => (record::LZ4, PageClass::Lz4, raw_len),
        };
        if let Some(timer) = timer {
            self.stats.compressed_input += raw_len as u64;
            self.stats.compress_nanos += timer.elapsed_nanos();
        }
        let cost = varint_len(u64::from(count)) + varint_len(len as u64) + len;
        if cost < raw_len {
            let begin = self.frame.pos;
            let mut pos = self.record_head(kind | flags, start);
            let buf = &mut self.frame.buf;
            pos = put_varint(buf, pos, u64::from(count));
            pos = put_varint(buf, pos, len as u64);
            let data = if kind == record::ZSTD {
                &self.scratch.zstd_out[..len]
            } else {
                &self.scratch.lz4[..len]
            };
            buf[pos..pos + len].copy_from_slice(data);
            self.frame.pos = pos + len;
            self.record_done(start, u64::from(count), class, begin);
        } else {
            // Incompressible: one raw record per page, each with the group's flags, so the
            // decoder's cache operations come in the same order.
            for i in 0..count {
                let addr = PageAddr::new(start.region, start.index + u64::from(i));
                let begin = self.frame.pos;
                let pos = self.record_head(record::RAW | flags, addr);
                let at = i as usize * PAGE_SIZE;
                self.frame.buf[pos..pos + PAGE_SIZE]
                    .copy_from_slice(&self.scratch.group[at..at + PAGE_SIZE]);
                self.frame.pos = pos + PAGE_SIZE;
                self.record_done(addr, 1, PageClass::Raw, begin);
            }
        }
    }

    /// zstd-compresses the pending group into `scratch.zstd_out`; `None` if zstd is not
    /// available (the group then goes to LZ4).
    fn zstd_group(&mut self, raw_len: usize) -> Option<usize> {
        let s = &mut self.scratch;
        if s.zstd.is_none() {
            let mut compressor = zstd::bulk::Compressor::new(1).ok()?;
            // Frames hold their content size, which the decoder checks; no zstd checksum (the
            // frame has its own).
            compressor.include_checksum(false).ok()?;
            compressor.include_contentsize(true).ok()?;
            s.zstd = Some(ZstdContext(compressor));
            s.zstd_out = vec![0; zstd::zstd_safe::compress_bound(GROUP_BYTES)];
        }
        let compressor = &mut s.zstd.as_mut()?.0;
        compressor
            .compress_to_buffer(&s.group[..raw_len], &mut s.zstd_out[..])
            .ok()
    }

    /// Writes a record's tag and address, returns the position after them.
    fn record_head(&mut self, tag: u8, addr: PageAddr) -> usize {
        let buf = &mut self.frame.buf;
        let mut pos = self.frame.pos;
        if self.frame.next_addr == Some(addr) {
            buf[pos] = tag | record::NEXT;
            pos += 1;
        } else {
            buf[pos] = tag;
            pos = put_varint(buf, pos + 1, u64::from(addr.region));
            pos = put_varint(buf, pos, addr.index);
        }
        pos
    }

    /// Accounts a record of `pages` pages written from `start` to the current position.
    fn record_done(&mut self, addr: PageAddr, pages: u64, class: PageClass, start: usize) {
        self.frame.records += 1;
        self.frame.next_addr = Some(PageAddr::new(addr.region, addr.index + pages));
        self.stats
            .classes
            .add(class, pages, (self.frame.pos - start) as u64);
    }

    fn close_frame_if_full(&mut self) {
        if self.frame.pos - HEADER_LEN >= self.target_frame_bytes {
            self.close_frame();
        }
    }

    /// Writes what is pending, closes the open Pages frame (if it holds anything) and queues it.
    fn close_frame(&mut self) {
        // Writing the pending pages may itself close the frame (when it fills up); then there is
        // nothing left to close here.
        self.write_pending();
        if self.frame.records == 0 {
            return;
        }
        let end = self.frame.pos;
        let records = self.frame.records;
        let mut buf = std::mem::take(&mut self.frame.buf);
        self.seal(FrameKind::Pages, records, &mut buf, end);
        buf.truncate(end + TRAILER_LEN);
        self.ready.push_back(buf);
        self.page_frames += 1;
        self.frame.buf = self.new_frame_buffer();
        self.frame.pos = HEADER_LEN;
        self.frame.records = 0;
        self.frame.pages = 0;
        self.frame.next_addr = None;
    }

    /// Closes the frame being built, so that every page encoded so far is in a ready frame.
    /// Call it at barriers (end of a pass); frames are otherwise closed when full.
    pub fn flush(&mut self) {
        self.close_frame();
    }

    /// Flushes and appends the End frame. No page may be encoded afterwards.
    pub fn finish(&mut self) -> Result<(), EncodeError> {
        if self.finished {
            return Err(EncodeError::Finished);
        }
        self.flush();
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&self.page_frames.to_le_bytes());
        body[8..].copy_from_slice(&self.stats.pages.to_le_bytes());
        self.push_control_frame(FrameKind::End, &body);
        self.finished = true;
        Ok(())
    }

    /// The oldest finished frame, if any.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        self.ready.pop_front()
    }

    /// Number of finished frames waiting to be taken.
    pub fn ready_frames(&self) -> usize {
        self.ready.len()
    }

    /// Sets the percentage (0 to 100) of LZ4 groups that are compressed; the others are sent as
    /// raw pages. Zero, unchanged, duplicate and delta detection are not affected. For links
    /// faster than compression: a transport lowers the share while its link waits for the
    /// encoder, and raises it when the encoder waits for the link. The default is 100.
    pub fn set_lz4_share(&mut self, percent: u32) {
        self.lz4_share = percent.min(100);
    }

    /// Whether new content enters the content cache (default: yes). Off, pages still find
    /// duplicates among what the cache holds, but none are copied into it: for links so fast
    /// that sending a page costs less than caching it.
    pub fn set_dup_admission(&mut self, admit: bool) {
        self.admit_dup = admit;
    }

    /// The current share of LZ4 groups that are compressed, in percent.
    pub fn lz4_share(&self) -> u32 {
        self.lz4_share
    }

    /// Sets the percentage (0 to 100) of compressed groups that use zstd (level 1) rather than
    /// LZ4: tighter output for slow links, at several times the CPU. The default is 0; it has no
    /// effect in a stream made without [`EncoderConfig::allow_zstd`].
    pub fn set_zstd_share(&mut self, percent: u32) {
        self.zstd_share = percent.min(100);
    }

    /// The current share of compressed groups that use zstd, in percent.
    pub fn zstd_share(&self) -> u32 {
        self.zstd_share
    }

    /// Hands a frame buffer (one that was sent, or a fresh one) to the encoder for reuse; new
    /// frames are built in such buffers before any new one is allocated. The encoder keeps every
    /// buffer it is given that can hold a frame, so the caller decides how many circulate: a
    /// transport hands back each buffer once its send completed.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= self.frame_capacity() {
            self.spare.push(buf);
        }
    }

    /// Bytes of capacity a buffer needs to be reused through [`Encoder::recycle`].
    pub fn frame_buffer_capacity(&self) -> usize {
        self.frame_capacity()
    }

    /// Whether the End frame was produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The stream's id.
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// Totals so far.
    pub fn stats(&self) -> &EncoderStats {
        &self.stats
    }
}
