//! # pagecodec: the page codec of pagestream
//!
//! Live migration sends guest memory as a stream of 4 KiB pages, most of them several times.
//! This crate turns such a stream into compact, checksummed frames and back, choosing for each
//! page the cheapest form that is still exact:
//!
//! 1. **zero**: runs of all-zero pages cost a couple of bytes per run;
//! 2. **unchanged**: content equal to what the stream already delivered for that address (dirty
//!    tracking's false positives, pages rewritten with the same bytes), judged by a seeded
//!    XXH3-128 digest, costs a run marker;
//! 3. **duplicate**: content equal to a page in a bounded content cache that both ends keep
//!    identical, confirmed byte for byte by the encoder, costs a slot number;
//! 4. **delta**: XOR against the cached previous version of the same page, then LZ4;
//! 5. **LZ4** block compression;
//! 6. **raw** otherwise.
//!
//! The crate is sans-IO: no sockets, threads or clocks. An [`Encoder`] takes pages and yields
//! frames; a [`Decoder`] takes frames and hands pages to a [`PageSink`]. For parallelism a
//! migration is split into independent streams by a [`ShardMap`]; each stream has its own
//! encoder, decoder and caches, and all versions of one page travel in the same stream.
//!
//! The wire format is specified in [`wire`].

mod cache;
mod cpu_clock;
pub mod decoder;
pub mod encoder;
mod history;
pub mod image;
pub mod page;
pub mod shard;
pub mod wire;

pub use decoder::{
    DecodeError, Decoder, DecoderLimits, DecoderStats, FrameInfo, PageSink, RecordProblem,
    SinkError,
};
pub use encoder::{EncodeError, Encoder, EncoderConfig, EncoderStats};
pub use image::{MemoryImage, ShardWriter};
pub use page::{
    ClassCounts, Generation, LayoutError, MemoryLayout, PAGE_SIZE, Page, PageAddr, PageClass,
    ZERO_PAGE, is_zero_page,
};
pub use shard::ShardMap;
pub use wire::{FrameHeader, FrameKind, HeaderError};
