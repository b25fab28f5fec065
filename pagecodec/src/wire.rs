//! The pagestream frame format, version 1.
//!
//! A codec *stream* is the sequence of frames one [`Encoder`](crate::Encoder) produces and one
//! [`Decoder`](crate::Decoder) consumes, in order. Several streams may make up one migration
//! (one per shard of guest memory, see [`ShardMap`](crate::ShardMap)); each is self-contained.
//!
//! # Frame
//!
//! Every frame starts with the same fixed 32-byte header and ends with a checksum. All integers
//! are little-endian.
//!
//! ```text
//!  0        4     5     6         8           12           16                     24          28          32
//!  +--------+-----+-----+---------+-----------+------------+----------------------+-----------+-----------+
//!  | "PSGF" | ver | kind| features| stream id | generation | sequence number      | records   | body len  |
//!  |  magic | u8  | u8  |   u16   |    u32    |    u32     |        u64           |   u32     |   u32     |
//!  +--------+-----+-----+---------+-----------+------------+----------------------+-----------+-----------+
//!  | body: `body len` bytes, laid out according to `kind`                                                |
//!  +------------------------------------------------------------------------------------------------------+
//!  | checksum: u64, XXH3-64 of the header and the body                                                   |
//!  +------------------------------------------------------------------------------------------------------+
//! ```
//!
//! - **magic** `PSGF` and **version** `1` come first so that anything else is refused at once.
//! - **kind**: `1` Start, `2` Pages, `3` End; `0` and anything else are invalid.
//! - **features**: bit 0 content (duplicate) cache, bit 1 delta cache, bit 2 zstd records may
//!   appear; other bits must be zero.
//!   Every frame repeats the features of its stream's Start frame.
//! - **stream id** names the stream; a decoder refuses frames of another stream.
//! - **generation**: the pass over memory the frame's pages belong to; never decreases.
//! - **sequence number**: 0 for the Start frame, then +1 per frame, with no gaps; a lost,
//!   repeated or reordered frame is detected before anything in it is applied.
//! - **records**: number of records in a Pages frame, 0 for other kinds.
//! - **body len** is checked against [`MAX_FRAME_BODY`] (and the decoder's own, possibly lower,
//!   limit) before any buffer is sized from it.
//!
//! # Start frame body
//!
//! ```text
//!  u32 page size (4096) | u32 content-cache slots | u32 delta-cache slots | u32 region count
//!  | region count x u64 region size in pages
//! ```
//!
//! The cache sizes are in pages. The encoder and decoder run identical caches with identical,
//! deterministic eviction (CLOCK, see the `cache` module), so the decoder must be able to
//! afford them: it refuses a Start frame whose caches exceed its limit.
//!
//! # Pages frame body
//!
//! A sequence of records, one or more pages each:
//!
//! ```text
//!  tag u8 | [address: varint region, varint page index] | payload
//!
//!  tag bits 0-2  kind: 1 zero run, 2 unchanged run, 3 duplicate, 4 delta, 5 LZ4, 6 raw,
//!                7 zstd (only in streams with feature bit 2)
//!  tag bit 3     NEXT: the record starts at the page after the previous record's last page
//!                (same region); without it an explicit address follows the tag
//!  tag bit 4     ADMIT_DUP: after applying, insert the page into the content cache
//!  tag bit 5     ADMIT_DELTA: after applying, start caching this address for deltas
//!  tag bits 6-7  reserved, zero
//!
//!  zero run       varint page count (1..=MAX_RUN_PAGES): pages whose bytes are all zero
//!  unchanged run  varint page count: pages whose content equals what this stream already
//!                 delivered at the same addresses; nothing to write
//!  duplicate      varint slot: the page equals content-cache slot `slot`
//!  delta          varint length (1..4096) + LZ4 block of (page XOR previous version of it)
//!  LZ4            varint page count n (1..=MAX_GROUP_PAGES) + varint length (1..n*4096)
//!                 + one LZ4 block of the n consecutive pages, back to back
//!  raw            4096 bytes
//!  zstd           varint page count n (1..=MAX_GROUP_PAGES) + varint length (1..n*4096)
//!                 + one zstd frame of the n consecutive pages, back to back
//! ```
//!
//! Varints are unsigned LEB128, at most 10 bytes, no overlong encodings of values that do not
//! fit in 64 bits. The first record of a frame always carries an explicit address, so frames
//! can be parsed independently; the caches are the only state carried between frames.
//!
//! An LZ4 record compresses up to [`MAX_GROUP_PAGES`] consecutive pages as one block so that
//! LZ4 finds matches across neighbouring pages; its flags apply to each of its pages. A zstd
//! record is the same with a zstd frame (level 1 from this encoder): about a quarter smaller on
//! guest memory and several times slower, for links slower than the CPUs. Each record is
//! compressed on its own, so frames still decode independently of each other's bytes.
//!
//! Cache side effects, applied by both ends in this order for every record (for an LZ4 record,
//! steps 2 and 3 for each of its pages in address order; a zstd record likewise):
//! 1. a duplicate record marks its content-cache slot referenced; a delta record marks its
//!    delta-cache slot referenced;
//! 2. `ADMIT_DUP`: the page's content is inserted into the content cache;
//! 3. if the address is in the delta cache, its cached copy becomes the page's new content
//!    (zero runs included); otherwise `ADMIT_DELTA` inserts it.
//!
//! # End frame body
//!
//! ```text
//!  u64 Pages frames in the stream | u64 pages in the stream
//! ```
//!
//! A decoder declares the stream complete only after an End frame whose counts match what it
//! applied.

use xxhash_rust::xxh3::xxh3_64;

/// The first four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"PSGF";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes in the fixed frame header.
pub const HEADER_LEN: usize = 32;
/// Bytes in the checksum trailer.
pub const TRAILER_LEN: usize = 8;
/// Largest frame body the format allows (a decoder may set a lower limit).
pub const MAX_FRAME_BODY: u32 = 16 << 20;
/// Most pages one run record may cover (256 MiB of memory).
pub const MAX_RUN_PAGES: u64 = 1 << 16;
/// Most pages one LZ4 record may carry (64 KiB of memory).
pub const MAX_GROUP_PAGES: u32 = 16;
/// Most pages one Pages frame may carry: bounds the work a small frame can ask for.
pub const MAX_FRAME_PAGES: u64 = 1 << 20;

/// Feature bit: the content (duplicate) cache is in use.
pub const FEATURE_DUP_CACHE: u16 = 1 << 0;
/// Feature bit: the delta cache is in use.
pub const FEATURE_DELTA: u16 = 1 << 1;
/// Feature bit: zstd records may appear.
pub const FEATURE_ZSTD: u16 = 1 << 2;
/// Every feature bit this version knows.
pub const KNOWN_FEATURES: u16 = FEATURE_DUP_CACHE | FEATURE_DELTA | FEATURE_ZSTD;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Opens a stream: page size, cache sizes, memory layout.
    Start = 1,
    /// Page records.
    Pages = 2,
    /// Closes a stream with its totals.
    End = 3,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Start),
            2 => Some(Self::Pages),
            3 => Some(Self::End),
            _ => None,
        }
    }
}

/// Kinds of page records (tag bits 0-2).
pub(crate) mod record {
    pub const ZERO_RUN: u8 = 1;
    pub const UNCHANGED_RUN: u8 = 2;
    pub const DUPLICATE: u8 = 3;
    pub const DELTA: u8 = 4;
    pub const LZ4: u8 = 5;
    pub const RAW: u8 = 6;
    pub const ZSTD: u8 = 7;

    pub const KIND_MASK: u8 = 0b0000_0111;
    pub const NEXT: u8 = 1 << 3;
    pub const ADMIT_DUP: u8 = 1 << 4;
    pub const ADMIT_DELTA: u8 = 1 << 5;
    pub const RESERVED: u8 = 0b1100_0000;
}

/// A fixed frame header, as read from the first [`HEADER_LEN`] bytes of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Feature bits of the stream.
    pub features: u16,
    /// Which stream the frame belongs to.
    pub stream_id: u32,
    /// Pass over memory of the frame's pages.
    pub generation: u32,
    /// Position of the frame in its stream.
    pub seq: u64,
    /// Records in a Pages frame.
    pub records: u32,
    /// Bytes between the header and the checksum.
    pub body_len: u32,
}

/// A frame header that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("frame header is truncated: {len} of {HEADER_LEN} bytes")]
    Truncated {
        /// Bytes available.
        len: usize,
    },
    /// Not a pagestream frame.
    #[error("not a pagestream frame: magic bytes are {found:02x?}, expected \"PSGF\"")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A format version this build does not read.
    #[error(
        "frame format version {version} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// Version byte found.
        version: u8,
    },
    /// A frame kind this version does not define.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// Kind byte found.
        kind: u8,
    },
    /// Feature bits this version does not know.
    #[error("frame uses unknown feature bits {bits:#06x}")]
    UnknownFeatures {
        /// The unknown bits.
        bits: u16,
    },
    /// A body longer than the format or the reader allows.
    #[error("frame body of {len} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// Body length claimed.
        len: u32,
        /// The limit in force.
        limit: u32,
    },
}

impl FrameHeader {
    /// Parses and checks a header; `max_body` is the caller's limit on the body length (at most
    /// [`MAX_FRAME_BODY`] applies in any case).
    pub fn parse(bytes: &[u8], max_body: u32) -> Result<Self, HeaderError> {
        let Some(bytes) = bytes.get(..HEADER_LEN) else {
            return Err(HeaderError::Truncated { len: bytes.len() });
        };
        let mut r = Reader::new(bytes);
        // `Reader` over exactly HEADER_LEN bytes: none of these reads can run short.
        let magic: [u8; 4] = r.array().expect("header length checked");
        if magic != FRAME_MAGIC {
            return Err(HeaderError::BadMagic { found: magic });
        }
        let version = r.u8().expect("header length checked");
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion { version });
        }
        let kind_byte = r.u8().expect("header length checked");
        let kind =
            FrameKind::from_u8(kind_byte).ok_or(HeaderError::UnknownKind { kind: kind_byte })?;
        let features = r.u16().expect("header length checked");
        if features & !KNOWN_FEATURES != 0 {
            return Err(HeaderError::UnknownFeatures {
                bits: features & !KNOWN_FEATURES,
            });
        }
        let stream_id = r.u32().expect("header length checked");
        let generation = r.u32().expect("header length checked");
        let seq = r.u64().expect("header length checked");
        let records = r.u32().expect("header length checked");
        let body_len = r.u32().expect("header length checked");
        let limit = max_body.min(MAX_FRAME_BODY);
        if body_len > limit {
            return Err(HeaderError::BodyTooLarge {
                len: body_len,
                limit,
            });
        }
        Ok(Self {
            kind,
            features,
            stream_id,
            generation,
            seq,
            records,
            body_len,
        })
    }

    /// Length of the whole frame: header, body and checksum.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize + TRAILER_LEN
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub(crate) fn write(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out[0..4].copy_from_slice(&FRAME_MAGIC);
        out[4] = FORMAT_VERSION;
        out[5] = self.kind as u8;
        out[6..8].copy_from_slice(&self.features.to_le_bytes());
        out[8..12].copy_from_slice(&self.stream_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.generation.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..28].copy_from_slice(&self.records.to_le_bytes());
        out[28..32].copy_from_slice(&self.body_len.to_le_bytes());
    }
}

/// The checksum of a frame's header and body.
pub(crate) fn frame_checksum(header_and_body: &[u8]) -> u64 {
    xxh3_64(header_and_body)
}

/// Recomputes the checksum trailer of `frame` (header, body, trailer) in place, whatever its
/// content. For tests and fuzzing, which need frames that are wrong inside but pass the checksum,
/// so that the checks behind it get exercised. Frames too short to hold a trailer are left alone.
pub fn reseal(frame: &mut [u8]) {
    if let Some(end) = frame
        .len()
        .checked_sub(TRAILER_LEN)
        .filter(|&e| e >= HEADER_LEN)
    {
        let sum = frame_checksum(&frame[..end]);
        frame[end..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Bytes a varint of `value` takes.
pub(crate) fn varint_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

/// Appends `value` as an unsigned LEB128 varint at `buf[pos..]`; returns the new position.
#[inline]
pub(crate) fn put_varint(buf: &mut [u8], mut pos: usize, mut value: u64) -> usize {
    while value >= 0x80 {
        buf[pos] = (value as u8) | 0x80;
        value >>= 7;
        pos += 1;
    }
    buf[pos] = value as u8;
    pos + 1
}

/// Most bytes a record's tag, address, count and length prefixes can take.
pub(crate) const MAX_RECORD_OVERHEAD: usize = 1 + 10 + 10 + 10 + 10;

/// Why bytes could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// The input ended early.
    Truncated,
    /// A varint longer than 10 bytes or beyond 64 bits.
    VarintOverflow,
}

/// A bounds-checked cursor over a byte slice.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Result<&'a [u8], ReadError> {
        let end = self.pos.checked_add(len).ok_or(ReadError::Truncated)?;
        let out = self.bytes.get(self.pos..end).ok_or(ReadError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        Ok(self.bytes(N)?.try_into().expect("slice of length N"))
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn varint(&mut self) -> Result<u64, ReadError> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(ReadError::VarintOverflow);
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ReadError::VarintOverflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_roundtrip() {
        let mut buf = [0u8; 10];
        for value in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let len = put_varint(&mut buf, 0, value);
            assert_eq!(len, varint_len(value));
            let mut r = Reader::new(&buf[..len]);
            assert_eq!(r.varint(), Ok(value));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn varint_rejects_overflow_and_truncation() {
        let eleven = [0xffu8; 11];
        assert_eq!(
            Reader::new(&eleven).varint(),
            Err(ReadError::VarintOverflow)
        );
        let mut too_big = [0xffu8; 10];
        too_big[9] = 0x02;
        assert_eq!(
            Reader::new(&too_big).varint(),
            Err(ReadError::VarintOverflow)
        );
        assert_eq!(
            Reader::new(&[0x80, 0x80]).varint(),
            Err(ReadError::Truncated)
        );
    }

    #[test]
    fn header_roundtrip_and_checks() {
        let header = FrameHeader {
            kind: FrameKind::Pages,
            features: KNOWN_FEATURES,
            stream_id: 7,
            generation: 3,
            seq: 99,
            records: 12,
            body_len: 4000,
        };
        let mut buf = [0u8; HEADER_LEN];
        header.write(&mut buf);
        assert_eq!(FrameHeader::parse(&buf, MAX_FRAME_BODY), Ok(header));
        assert_eq!(
            FrameHeader::parse(&buf, 100),
            Err(HeaderError::BodyTooLarge {
                len: 4000,
                limit: 100
            })
        );
        assert!(matches!(
            FrameHeader::parse(&buf[..10], MAX_FRAME_BODY),
            Err(HeaderError::Truncated { len: 10 })
        ));
        let mut bad = buf;
        bad[4] = 2;
        assert_eq!(
            FrameHeader::parse(&bad, MAX_FRAME_BODY),
            Err(HeaderError::UnsupportedVersion { version: 2 })
        );
        let mut bad = buf;
        bad[5] = 0;
        assert_eq!(
            FrameHeader::parse(&bad, MAX_FRAME_BODY),
            Err(HeaderError::UnknownKind { kind: 0 })
        );
        let mut bad = buf;
        bad[6] = 0x80;
        assert!(matches!(
            FrameHeader::parse(&bad, MAX_FRAME_BODY),
            Err(HeaderError::UnknownFeatures { .. })
        ));
        let mut bad = buf;
        bad[0] = b'X';
        assert!(matches!(
            FrameHeader::parse(&bad, MAX_FRAME_BODY),
            Err(HeaderError::BadMagic { .. })
        ));
    }
}
