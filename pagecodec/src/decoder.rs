//! Turning frames back into pages.
//!
//! A [`Decoder`] consumes the frames of one stream, in order, and hands every page to a
//! [`PageSink`]. Frames come from the network, so nothing in them is trusted: the header is
//! checked before the body is looked at, the checksum before any record is parsed, every length
//! against a cap before it is used, every address against the stream's memory layout before a
//! page is written. The first error ends the stream: the decoder refuses every later frame and
//! never reports the stream complete, because its caches may no longer match the encoder's.
//!
//! A frame is applied record by record, so a frame that fails part-way has applied the records
//! before the failing one; those are exactly the pages the (checksum-verified) sender encoded.

use std::error::Error as StdError;

use lz4_flex::block::decompress_into;

use crate::cache::{DeltaCache, DupSlots};
use crate::history::DeliveredSet;
use crate::page::{
    ClassCounts, Generation, LayoutError, MemoryLayout, PAGE_SIZE, Page, PageAddr, PageClass,
    ZERO_PAGE,
};
use crate::wire::{
    self, FEATURE_DELTA, FEATURE_DUP_CACHE, FEATURE_ZSTD, FrameHeader, FrameKind, HEADER_LEN,
    HeaderError, MAX_FRAME_BODY, MAX_FRAME_PAGES, MAX_GROUP_PAGES, MAX_RUN_PAGES, ReadError,
    Reader, TRAILER_LEN, record,
};

/// An error returned by a [`PageSink`].
pub type SinkError = Box<dyn StdError + Send + Sync>;

/// Where decoded pages go: guest memory, a memory image, a rebuilt QEMU stream.
///
/// The decoder calls it once per page, in stream order. Pages of different streams never share
/// an address, so sinks for different streams may run concurrently.
pub trait PageSink {
    /// The page at `addr` is all zero bytes.
    fn zero(&mut self, addr: PageAddr, generation: Generation) -> Result<(), SinkError>;

    /// The page at `addr` now holds `page`.
    fn data(
        &mut self,
        addr: PageAddr,
        generation: Generation,
        page: &Page,
    ) -> Result<(), SinkError>;

    /// The page at `addr` keeps the content the stream delivered for it before. Nothing needs
    /// writing; the default does nothing.
    fn unchanged(&mut self, addr: PageAddr, generation: Generation) -> Result<(), SinkError> {
        let _ = (addr, generation);
        Ok(())
    }

    /// Time this sink spent waiting for room further on (a bounded queue towards the
    /// application) since the last call, as measured by the sink. It is not decoding work: a
    /// transport that reports how busy its decoders are counts it as waiting. The default has
    /// none.
    fn take_stalled(&mut self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// The most memory a decoder gives a stream's caches unless told otherwise
/// ([`DecoderLimits::max_cache_bytes`]): what a source may ask of any destination.
pub const DEFAULT_MAX_CACHE_BYTES: u64 = 1 << 30;

/// Limits a decoder enforces on what a stream may make it allocate or do.
#[derive(Clone, Debug)]
pub struct DecoderLimits {
    /// Largest frame body accepted (at most [`MAX_FRAME_BODY`]).
    pub max_frame_body: u32,
    /// Largest total of both cache budgets a stream may ask for, in bytes.
    pub max_cache_bytes: u64,
    /// Largest guest memory a stream's layout may describe, in bytes.
    pub max_memory_bytes: u64,
    /// The stream id expected, if the caller knows it.
    pub stream_id: Option<u32>,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        Self {
            max_frame_body: MAX_FRAME_BODY,
            max_cache_bytes: DEFAULT_MAX_CACHE_BYTES,
            max_memory_bytes: 16 << 40,
            stream_id: None,
        }
    }
}

/// What was wrong with a record.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordProblem {
    /// The record runs past the end of the body.
    #[error("it is truncated")]
    Truncated,
    /// A varint beyond 64 bits.
    #[error("it has an overlong varint")]
    VarintOverflow,
    /// Reserved tag bits set.
    #[error("tag {tag:#04x} has reserved bits set")]
    ReservedBits {
        /// The tag.
        tag: u8,
    },
    /// A kind the format does not define.
    #[error("tag {tag:#04x} has unknown record kind {kind}")]
    UnknownKind {
        /// The tag.
        tag: u8,
        /// Its kind bits.
        kind: u8,
    },
    /// A flag that this kind of record, or this stream, does not allow.
    #[error("tag {tag:#04x} sets a cache flag this record kind or stream does not allow")]
    FlagNotAllowed {
        /// The tag.
        tag: u8,
    },
    /// NEXT on the first record of a frame.
    #[error("it continues from a previous record, but it is the first of its frame")]
    NoPreviousRecord,
    /// A region index beyond 32 bits.
    #[error("region {region} does not exist")]
    BadRegion {
        /// Region found.
        region: u64,
    },
    /// The pages are not all inside the layout.
    #[error("{count} page(s) from {addr} are outside the memory layout")]
    OutsideLayout {
        /// First page.
        addr: PageAddr,
        /// Pages in the record.
        count: u64,
    },
    /// A run of 0 pages or more than [`MAX_RUN_PAGES`].
    #[error("run of {count} pages (allowed: 1 to {MAX_RUN_PAGES})")]
    BadRunLength {
        /// Pages claimed.
        count: u64,
    },
    /// The frame would carry more than [`MAX_FRAME_PAGES`] pages.
    #[error("the frame carries more than {MAX_FRAME_PAGES} pages")]
    TooManyPages,
    /// A compressed length out of range.
    #[error("payload length {len} is out of range (1 to {max})")]
    BadLength {
        /// Length claimed.
        len: u64,
        /// Largest length allowed.
        max: u64,
    },
    /// An LZ4 group of 0 pages or more than [`MAX_GROUP_PAGES`].
    #[error("LZ4 group of {count} pages (allowed: 1 to {MAX_GROUP_PAGES})")]
    BadGroupSize {
        /// Pages claimed.
        count: u64,
    },
    /// LZ4 data that does not decompress to exactly the pages it claims.
    #[error("its LZ4 data is corrupt or does not make exactly the pages it claims")]
    BadLz4,
    /// zstd data that does not decompress to exactly the pages it claims.
    #[error("its zstd data is corrupt or does not make exactly the pages it claims")]
    BadZstd,
    /// A duplicate of a cache slot that holds nothing.
    #[error("it refers to content-cache slot {slot}, which is empty")]
    EmptySlot {
        /// Slot referred to.
        slot: u64,
    },
    /// A delta for a page with no cached previous version.
    #[error("it is a delta for {addr}, which has no cached previous version")]
    NoDeltaBase {
        /// The page.
        addr: PageAddr,
    },
    /// "Unchanged" for a page the stream never delivered.
    #[error("it marks {addr} unchanged, but this stream never delivered that page")]
    NeverDelivered {
        /// The page.
        addr: PageAddr,
    },
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The header is unusable.
    #[error("bad frame header")]
    Header(#[source] HeaderError),
    /// Fewer or more bytes than the header announces.
    #[error("frame is {len} bytes but its header announces {expected}")]
    WrongLength {
        /// Bytes given.
        len: usize,
        /// Bytes the header announces.
        expected: usize,
    },
    /// The checksum does not match: corruption in transit.
    #[error(
        "checksum mismatch in frame {seq} of stream {stream_id}: frame says {stored:#018x}, content gives {computed:#018x}"
    )]
    Checksum {
        /// Stream of the frame.
        stream_id: u32,
        /// Sequence number of the frame.
        seq: u64,
        /// Checksum in the frame.
        stored: u64,
        /// Checksum of the content.
        computed: u64,
    },
    /// A frame of another stream.
    #[error("frame belongs to stream {found}, expected stream {expected}")]
    WrongStream {
        /// The stream being decoded.
        expected: u32,
        /// The frame's stream.
        found: u32,
    },
    /// A lost, repeated or reordered frame.
    #[error("frame {found} of stream {stream_id} arrived where frame {expected} was due")]
    OutOfSequence {
        /// Stream of the frame.
        stream_id: u32,
        /// Sequence number due.
        expected: u64,
        /// Sequence number found.
        found: u64,
    },
    /// A frame that cannot come at this point of the stream.
    #[error("unexpected {kind:?} frame {when}")]
    UnexpectedFrame {
        /// The frame's kind.
        kind: FrameKind,
        /// Where the stream was.
        when: &'static str,
    },
    /// Features that differ from the stream's.
    #[error("frame has feature bits {found:#06x}, but the stream started with {expected:#06x}")]
    FeatureMismatch {
        /// Features of the stream.
        expected: u16,
        /// Features of the frame.
        found: u16,
    },
    /// A frame of an earlier pass after a later one.
    #[error("frame of generation {found} after generation {current}")]
    GenerationWentBack {
        /// The stream's generation.
        current: Generation,
        /// The frame's.
        found: Generation,
    },
    /// A Start frame that cannot be accepted.
    #[error("bad Start frame: {reason}")]
    BadStart {
        /// What was wrong.
        reason: String,
    },
    /// The memory layout in the Start frame is unusable.
    #[error("bad memory layout in the Start frame")]
    BadLayout(#[source] LayoutError),
    /// A malformed record.
    #[error(
        "record {index} (byte {offset} of the body) of frame {seq} of stream {stream_id} is malformed: {problem}"
    )]
    Record {
        /// Stream of the frame.
        stream_id: u32,
        /// Sequence number of the frame.
        seq: u64,
        /// Record's index in the frame.
        index: u32,
        /// Offset of the record in the body.
        offset: usize,
        /// What was wrong.
        problem: RecordProblem,
    },
    /// The header's record count does not match the body.
    #[error("frame {seq} header announces {announced} records, body holds {found}")]
    RecordCount {
        /// Sequence number of the frame.
        seq: u64,
        /// Count in the header.
        announced: u32,
        /// Records parsed.
        found: u32,
    },
    /// The End frame's totals do not match what was decoded.
    #[error("stream {stream_id} ended claiming {claimed} {what}, but {decoded} were decoded")]
    EndMismatch {
        /// The stream.
        stream_id: u32,
        /// What was counted.
        what: &'static str,
        /// Count in the End frame.
        claimed: u64,
        /// Count decoded.
        decoded: u64,
    },
    /// An earlier error ended the stream.
    #[error("stream already failed; no further frames are accepted")]
    Failed,
    /// The sink refused a page.
    #[error("applying the page at {addr} failed")]
    Sink {
        /// The page.
        addr: PageAddr,
        /// The sink's error.
        #[source]
        source: SinkError,
    },
}

/// What one decoded frame held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// The frame's kind.
    pub kind: FrameKind,
    /// Its sequence number.
    pub seq: u64,
    /// Its generation.
    pub generation: Generation,
    /// Pages it carried.
    pub pages: u64,
}

/// Totals of one decoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Pages applied, by class.
    pub classes: ClassCounts,
    /// Frames accepted.
    pub frames: u64,
    /// Bytes of frames accepted.
    pub wire_bytes: u64,
}

#[derive(Debug)]
struct Stream {
    stream_id: u32,
    features: u16,
    layout: MemoryLayout,
    generation: Generation,
    next_seq: u64,
    page_frames: u64,
    pages: u64,
    dup: Option<DupSlots>,
    delta: Option<DeltaCache>,
    delivered: DeliveredSet,
}

#[derive(Debug)]
enum State {
    AwaitingStart,
    Streaming(Box<Stream>),
    Complete(Box<Stream>),
    Failed,
}

/// The decoding state of one stream.
#[derive(Debug)]
pub struct Decoder {
    limits: DecoderLimits,
    state: State,
    /// Decompression buffers.
    scratch: DecodeScratch,
    stats: DecoderStats,
}

const GROUP_BYTES: usize = MAX_GROUP_PAGES as usize * PAGE_SIZE;

/// Where records are decompressed.
struct DecodeScratch {
    /// One group of pages, or one page.
    pages: Box<[u8; GROUP_BYTES]>,
    /// zstd's decompression context, made at the first zstd record.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for DecodeScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecodeScratch")
    }
}

impl Decoder {
    /// A decoder waiting for a stream's Start frame.
    pub fn new(limits: DecoderLimits) -> Self {
        Self {
            limits,
            state: State::AwaitingStart,
            scratch: DecodeScratch {
                pages: Box::new([0; GROUP_BYTES]),
                zstd: None,
            },
            stats: DecoderStats::default(),
        }
    }

    /// The length of the frame whose header starts `bytes`, checked against this decoder's
    /// limits: how many bytes a reader must collect before calling [`Decoder::decode`].
    pub fn frame_len(&self, header: &[u8]) -> Result<usize, DecodeError> {
        FrameHeader::parse(header, self.limits.max_frame_body)
            .map(|h| h.frame_len())
            .map_err(DecodeError::Header)
    }

    /// Decodes one whole frame and applies its pages to `sink`.
    pub fn decode(
        &mut self,
        frame: &[u8],
        sink: &mut impl PageSink,
    ) -> Result<FrameInfo, DecodeError> {
        if matches!(self.state, State::Failed) {
            return Err(DecodeError::Failed);
        }
        let result = self.decode_inner(frame, sink);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn decode_inner(
        &mut self,
        frame: &[u8],
        sink: &mut impl PageSink,
    ) -> Result<FrameInfo, DecodeError> {
        let header =
            FrameHeader::parse(frame, self.limits.max_frame_body).map_err(DecodeError::Header)?;
        if frame.len() != header.frame_len() {
            return Err(DecodeError::WrongLength {
                len: frame.len(),
                expected: header.frame_len(),
            });
        }
        let body_end = HEADER_LEN + header.body_len as usize;
        let stored = u64::from_le_bytes(
            frame[body_end..body_end + TRAILER_LEN]
                .try_into()
                .expect("trailer is 8 bytes"),
        );
        let computed = wire::frame_checksum(&frame[..body_end]);
        if stored != computed {
            return Err(DecodeError::Checksum {
                stream_id: header.stream_id,
                seq: header.seq,
                stored,
                computed,
            });
        }
        if let Some(expected) = self.limits.stream_id
            && expected != header.stream_id
        {
            return Err(DecodeError::WrongStream {
                expected,
                found: header.stream_id,
            });
        }
        let body = &frame[HEADER_LEN..body_end];

        let info = match std::mem::replace(&mut self.state, State::Failed) {
            State::AwaitingStart => {
                let stream = self.start(&header, body)?;
                self.state = State::Streaming(stream);
                FrameInfo {
                    kind: FrameKind::Start,
                    seq: 0,
                    generation: header.generation,
                    pages: 0,
                }
            }
            State::Streaming(mut stream) => {
                check_continues(&stream, &header)?;
                stream.next_seq += 1;
                stream.generation = header.generation;
                match header.kind {
                    FrameKind::Start => {
                        return Err(DecodeError::UnexpectedFrame {
                            kind: FrameKind::Start,
                            when: "after the stream started",
                        });
                    }
                    FrameKind::Pages => {
                        let pages = apply_records(
                            &mut stream,
                            &header,
                            body,
                            &mut self.scratch,
                            &mut self.stats.classes,
                            sink,
                        )?;
                        stream.page_frames += 1;
                        stream.pages += pages;
                        self.state = State::Streaming(stream);
                        FrameInfo {
                            kind: FrameKind::Pages,
                            seq: header.seq,
                            generation: header.generation,
                            pages,
                        }
                    }
                    FrameKind::End => {
                        check_end(&stream, body)?;
                        self.state = State::Complete(stream);
                        FrameInfo {
                            kind: FrameKind::End,
                            seq: header.seq,
                            generation: header.generation,
                            pages: 0,
                        }
                    }
                }
            }
            State::Complete(_) => {
                return Err(DecodeError::UnexpectedFrame {
                    kind: header.kind,
                    when: "after the stream's End frame",
                });
            }
            State::Failed => return Err(DecodeError::Failed),
        };
        self.stats.frames += 1;
        self.stats.wire_bytes += frame.len() as u64;
        Ok(info)
    }

    fn start(&self, header: &FrameHeader, body: &[u8]) -> Result<Box<Stream>, DecodeError> {
        if header.kind != FrameKind::Start {
            return Err(DecodeError::UnexpectedFrame {
                kind: header.kind,
                when: "before the stream's Start frame",
            });
        }
        if header.seq != 0 {
            return Err(DecodeError::OutOfSequence {
                stream_id: header.stream_id,
                expected: 0,
                found: header.seq,
            });
        }
        let bad = |reason: String| DecodeError::BadStart { reason };
        let mut r = Reader::new(body);
        let truncated = |_| bad("body is truncated".into());
        let page_size = r.u32().map_err(truncated)?;
        if page_size as usize != PAGE_SIZE {
            return Err(bad(format!(
                "page size {page_size} (this build handles {PAGE_SIZE})"
            )));
        }
        let dup_slots = r.u32().map_err(truncated)?;
        let delta_slots = r.u32().map_err(truncated)?;
        if (dup_slots > 0) != (header.features & FEATURE_DUP_CACHE != 0)
            || (delta_slots > 0) != (header.features & FEATURE_DELTA != 0)
        {
            return Err(bad("cache sizes disagree with the feature bits".into()));
        }
        let cache_bytes = (u64::from(dup_slots) + u64::from(delta_slots)) * PAGE_SIZE as u64;
        if cache_bytes > self.limits.max_cache_bytes {
            return Err(bad(format!(
                "caches of {cache_bytes} bytes exceed this decoder's limit of {} bytes",
                self.limits.max_cache_bytes
            )));
        }
        let regions = r.u32().map_err(truncated)? as usize;
        if regions > crate::page::MAX_REGIONS {
            return Err(DecodeError::BadLayout(LayoutError::TooManyRegions {
                count: regions,
            }));
        }
        let mut region_pages = Vec::with_capacity(regions);
        for _ in 0..regions {
            region_pages.push(r.u64().map_err(truncated)?);
        }
        if !r.is_empty() {
            return Err(bad("trailing bytes after the region list".into()));
        }
        let layout = MemoryLayout::new(region_pages).map_err(DecodeError::BadLayout)?;
        let memory = u128::from(layout.total_pages()) * PAGE_SIZE as u128;
        if memory > u128::from(self.limits.max_memory_bytes) {
            return Err(bad(format!(
                "memory layout of {memory} bytes exceeds this decoder's limit of {} bytes",
                self.limits.max_memory_bytes
            )));
        }
        Ok(Box::new(Stream {
            stream_id: header.stream_id,
            features: header.features,
            layout,
            generation: header.generation,
            next_seq: 1,
            page_frames: 0,
            pages: 0,
            dup: (dup_slots > 0).then(|| DupSlots::new(dup_slots)),
            delta: (delta_slots > 0).then(|| DeltaCache::new(delta_slots)),
            delivered: DeliveredSet::default(),
        }))
    }

    /// Whether the stream's End frame was decoded and matched everything before it.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, State::Complete(_))
    }

    /// Whether an error ended the stream.
    pub fn has_failed(&self) -> bool {
        matches!(self.state, State::Failed)
    }

    /// The memory layout of the stream, once its Start frame was decoded.
    pub fn layout(&self) -> Option<&MemoryLayout> {
        match &self.state {
            State::Streaming(s) | State::Complete(s) => Some(&s.layout),
            _ => None,
        }
    }

    /// Distinct pages the stream has delivered content for.
    pub fn delivered_pages(&self) -> u64 {
        match &self.state {
            State::Streaming(s) | State::Complete(s) => s.delivered.len(),
            _ => 0,
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> &DecoderStats {
        &self.stats
    }
}

fn check_continues(stream: &Stream, header: &FrameHeader) -> Result<(), DecodeError> {
    if header.stream_id != stream.stream_id {
        return Err(DecodeError::WrongStream {
            expected: stream.stream_id,
            found: header.stream_id,
        });
    }
    if header.seq != stream.next_seq {
        return Err(DecodeError::OutOfSequence {
            stream_id: stream.stream_id,
            expected: stream.next_seq,
            found: header.seq,
        });
    }
    if header.features != stream.features {
        return Err(DecodeError::FeatureMismatch {
            expected: stream.features,
            found: header.features,
        });
    }
    if header.generation < stream.generation {
        return Err(DecodeError::GenerationWentBack {
            current: stream.generation,
            found: header.generation,
        });
    }
    Ok(())
}

fn check_end(stream: &Stream, body: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(body);
    let (Ok(page_frames), Ok(pages), true) = (r.u64(), r.u64(), body.len() == 16) else {
        return Err(DecodeError::UnexpectedFrame {
            kind: FrameKind::End,
            when: "with a body that is not 16 bytes",
        });
    };
    for (what, claimed, decoded) in [
        ("Pages frames", page_frames, stream.page_frames),
        ("pages", pages, stream.pages),
    ] {
        if claimed != decoded {
            return Err(DecodeError::EndMismatch {
                stream_id: stream.stream_id,
                what,
                claimed,
                decoded,
            });
        }
    }
    Ok(())
}

impl From<ReadError> for RecordProblem {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Truncated => RecordProblem::Truncated,
            ReadError::VarintOverflow => RecordProblem::VarintOverflow,
        }
    }
}

/// A record's payload, parsed but not yet applied.
enum Payload<'a> {
    Run(u64),
    Slot(u64),
    Delta(&'a [u8]),
    Lz4 { count: u64, data: &'a [u8] },
    Zstd { count: u64, data: &'a [u8] },
    Raw(&'a Page),
}

/// Applies every record of a Pages frame; returns the pages applied.
fn apply_records(
    stream: &mut Stream,
    header: &FrameHeader,
    body: &[u8],
    scratch: &mut DecodeScratch,
    classes: &mut ClassCounts,
    sink: &mut impl PageSink,
) -> Result<u64, DecodeError> {
    let mut r = Reader::new(body);
    let mut next_addr: Option<PageAddr> = None;
    let mut index = 0u32;
    let mut pages = 0u64;
    while !r.is_empty() {
        let offset = r.position();
        let at = |problem: RecordProblem| DecodeError::Record {
            stream_id: header.stream_id,
            seq: header.seq,
            index,
            offset,
            problem,
        };
        let (addr, count) = apply_record(stream, header, &mut r, next_addr, scratch, classes, sink)
            .map_err(|e| match e {
                RecordFailure::Problem(p) => at(p),
                RecordFailure::Sink(addr, source) => DecodeError::Sink { addr, source },
            })?;
        pages += count;
        if pages > MAX_FRAME_PAGES {
            return Err(at(RecordProblem::TooManyPages));
        }
        next_addr = Some(PageAddr::new(addr.region, addr.index + count));
        index += 1;
    }
    if index != header.records {
        return Err(DecodeError::RecordCount {
            seq: header.seq,
            announced: header.records,
            found: index,
        });
    }
    Ok(pages)
}

enum RecordFailure {
    Problem(RecordProblem),
    Sink(PageAddr, SinkError),
}

impl From<RecordProblem> for RecordFailure {
    fn from(p: RecordProblem) -> Self {
        RecordFailure::Problem(p)
    }
}

impl From<ReadError> for RecordFailure {
    fn from(e: ReadError) -> Self {
        RecordFailure::Problem(e.into())
    }
}

/// Parses, checks and applies one record; returns its first address and page count.
fn apply_record(
    stream: &mut Stream,
    header: &FrameHeader,
    r: &mut Reader<'_>,
    next_addr: Option<PageAddr>,
    scratch: &mut DecodeScratch,
    classes: &mut ClassCounts,
    sink: &mut impl PageSink,
) -> Result<(PageAddr, u64), RecordFailure> {
    let start = r.position();
    let tag = r.u8()?;
    if tag & record::RESERVED != 0 {
        return Err(RecordProblem::ReservedBits { tag }.into());
    }
    let kind = tag & record::KIND_MASK;
    let addr = if tag & record::NEXT != 0 {
        next_addr.ok_or(RecordProblem::NoPreviousRecord)?
    } else {
        let region = r.varint()?;
        let region = u32::try_from(region).map_err(|_| RecordProblem::BadRegion { region })?;
        PageAddr::new(region, r.varint()?)
    };
    let admit_dup = tag & record::ADMIT_DUP != 0;
    let admit_delta = tag & record::ADMIT_DELTA != 0;
    let flags_ok = (!admit_dup
        || (stream.dup.is_some()
            && matches!(
                kind,
                record::DELTA | record::LZ4 | record::ZSTD | record::RAW
            )))
        && (!admit_delta
            || (stream.delta.is_some()
                && matches!(
                    kind,
                    record::DUPLICATE | record::LZ4 | record::ZSTD | record::RAW
                )));
    if !flags_ok {
        return Err(RecordProblem::FlagNotAllowed { tag }.into());
    }

    let payload = match kind {
        record::ZERO_RUN | record::UNCHANGED_RUN => {
            let count = r.varint()?;
            if count == 0 || count > MAX_RUN_PAGES {
                return Err(RecordProblem::BadRunLength { count }.into());
            }
            Payload::Run(count)
        }
        record::DUPLICATE => Payload::Slot(r.varint()?),
        record::DELTA => Payload::Delta(compressed(r, PAGE_SIZE as u64)?),
        record::LZ4 => {
            let count = r.varint()?;
            if count == 0 || count > u64::from(MAX_GROUP_PAGES) {
                return Err(RecordProblem::BadGroupSize { count }.into());
            }
            let data = compressed(r, count * PAGE_SIZE as u64)?;
            Payload::Lz4 { count, data }
        }
        record::ZSTD if stream.features & FEATURE_ZSTD != 0 => {
            let count = r.varint()?;
            if count == 0 || count > u64::from(MAX_GROUP_PAGES) {
                return Err(RecordProblem::BadGroupSize { count }.into());
            }
            let data = compressed(r, count * PAGE_SIZE as u64)?;
            Payload::Zstd { count, data }
        }
        record::RAW => Payload::Raw(r.bytes(PAGE_SIZE)?.try_into().expect("page-sized")),
        _ => return Err(RecordProblem::UnknownKind { tag, kind }.into()),
    };
    let count = match payload {
        Payload::Run(count) | Payload::Lz4 { count, .. } | Payload::Zstd { count, .. } => count,
        _ => 1,
    };
    if !stream.layout.contains_run(addr, count) {
        return Err(RecordProblem::OutsideLayout { addr, count }.into());
    }
    let generation = header.generation;
    let record_bytes = (r.position() - start) as u64;
    let page_addr = |i: u64| PageAddr::new(addr.region, addr.index + i);
    let sink_error = |addr: PageAddr| move |e| RecordFailure::Sink(addr, e);

    match payload {
        Payload::Run(count) if kind == record::ZERO_RUN => {
            for i in 0..count {
                let at = page_addr(i);
                sink.zero(at, generation).map_err(sink_error(at))?;
                stream.delivered.insert(at);
                if let Some(delta) = &mut stream.delta {
                    delta.update(at, &ZERO_PAGE, false);
                }
            }
            classes.add(PageClass::Zero, count, record_bytes);
        }
        Payload::Run(count) => {
            for i in 0..count {
                let at = page_addr(i);
                if !stream.delivered.contains(at) {
                    return Err(RecordProblem::NeverDelivered { addr: at }.into());
                }
                sink.unchanged(at, generation).map_err(sink_error(at))?;
            }
            classes.add(PageClass::Unchanged, count, record_bytes);
        }
        Payload::Slot(slot) => {
            let empty = RecordProblem::EmptySlot { slot };
            let dup = stream.dup.as_mut().ok_or(empty.clone())?;
            let slot32 = u32::try_from(slot).map_err(|_| empty.clone())?;
            let page = first_page(&mut scratch.pages);
            page.copy_from_slice(dup.get(slot32).ok_or(empty)?);
            dup.touch(slot32);
            apply_content(stream, addr, generation, page, false, admit_delta, sink)?;
            classes.add(PageClass::Duplicate, 1, record_bytes);
        }
        Payload::Delta(data) => {
            let page = first_page(&mut scratch.pages);
            decompress_exact(data, page)?;
            let delta = stream
                .delta
                .as_mut()
                .ok_or(RecordProblem::NoDeltaBase { addr })?;
            let slot = delta
                .slot_of(addr)
                .ok_or(RecordProblem::NoDeltaBase { addr })?;
            for (x, b) in page.iter_mut().zip(delta.page(slot).iter()) {
                *x ^= b;
            }
            delta.touch(slot);
            apply_content(stream, addr, generation, page, admit_dup, false, sink)?;
            classes.add(PageClass::Delta, 1, record_bytes);
        }
        Payload::Lz4 { count, data } | Payload::Zstd { count, data } => {
            let pages = &mut scratch.pages[..count as usize * PAGE_SIZE];
            let class = if matches!(payload, Payload::Zstd { .. }) {
                let zstd = match &mut scratch.zstd {
                    Some(z) => z,
                    None => scratch.zstd.insert(
                        zstd::bulk::Decompressor::new().map_err(|_| RecordProblem::BadZstd)?,
                    ),
                };
                match zstd.decompress_to_buffer(data, pages) {
                    Ok(n) if n == pages.len() => {}
                    _ => return Err(RecordProblem::BadZstd.into()),
                }
                PageClass::Zstd
            } else {
                decompress_exact(data, pages)?;
                PageClass::Lz4
            };
            for (i, page) in pages.chunks_exact(PAGE_SIZE).enumerate() {
                let page = page.try_into().expect("page-sized chunk");
                apply_content(
                    stream,
                    page_addr(i as u64),
                    generation,
                    page,
                    admit_dup,
                    admit_delta,
                    sink,
                )?;
            }
            classes.add(class, count, record_bytes);
        }
        Payload::Raw(page) => {
            apply_content(stream, addr, generation, page, admit_dup, admit_delta, sink)?;
            classes.add(PageClass::Raw, 1, record_bytes);
        }
    }
    Ok((addr, count))
}

/// Reads a varint length (1 to `max - 1`) and that many bytes.
fn compressed<'a>(r: &mut Reader<'a>, max: u64) -> Result<&'a [u8], RecordFailure> {
    let len = r.varint()?;
    if len == 0 || len >= max {
        return Err(RecordProblem::BadLength { len, max: max - 1 }.into());
    }
    Ok(r.bytes(len as usize)?)
}

/// Decompresses an LZ4 block that must fill `out` exactly.
fn decompress_exact(data: &[u8], out: &mut [u8]) -> Result<(), RecordProblem> {
    match decompress_into(data, out) {
        Ok(n) if n == out.len() => Ok(()),
        _ => Err(RecordProblem::BadLz4),
    }
}

fn first_page(scratch: &mut [u8; GROUP_BYTES]) -> &mut Page {
    (&mut scratch[..PAGE_SIZE]).try_into().expect("page-sized")
}

/// Hands a page with content to the sink and performs its cache side effects.
fn apply_content(
    stream: &mut Stream,
    addr: PageAddr,
    generation: Generation,
    page: &Page,
    admit_dup: bool,
    admit_delta: bool,
    sink: &mut impl PageSink,
) -> Result<(), RecordFailure> {
    sink.data(addr, generation, page)
        .map_err(|e| RecordFailure::Sink(addr, e))?;
    stream.delivered.insert(addr);
    if admit_dup && let Some(dup) = &mut stream.dup {
        dup.insert(page);
    }
    if let Some(delta) = &mut stream.delta {
        delta.update(addr, page, admit_delta);
    }
    Ok(())
}
