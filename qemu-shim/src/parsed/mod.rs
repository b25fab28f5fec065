//! Parsing mode: QEMU's main channel with its RAM pages taken out of the stream and sent through
//! the page codec and the multi-channel transport; everything else carried in order on the
//! transport's control connection; a stream QEMU accepts rebuilt on the destination.
//!
//! Source (`source.rs`): the [`Parser`](crate::stream::Parser) reads the stream until the RAM
//! block list. Nothing leaves the host before that, so a stream it cannot read is still carried
//! whole in opaque mode. Then a transport session opens (the block list as its memory layout,
//! every connection through the shims' keyed handshake), plus one link for the return path. Each
//! page goes to [`Sender::send_page`](pagestream_transport::Sender::send_page); the bytes between
//! pages are collected and, as soon as a page or the end of what QEMU wrote so far comes, sent as
//! a blob, after a barrier ([`Sender::end_pass`](pagestream_transport::Sender::end_pass)) when
//! pages came before them. A blob's tag is the number of passes ended before it.
//!
//! Destination: the channels decode pages into a bounded staging area (`staging.rs`), by channel
//! and pass. One writer thread rebuilds QEMU's stream from it (`destination.rs`). A blob with tag
//! `t` arrives only after every page of the passes below `t` was applied; the writer writes those
//! pages as fresh RAM records, then the blob's bytes. So every page reaches QEMU before the bytes
//! that followed it at the source (its section's end marker above all) and after the bytes that
//! preceded it (its section's header): the order QEMU's loader needs. The source marks the last
//! blob before a pass's pages ([`BLOB_BYTES_THEN_PAGES`]); once that is written, the pass's pages
//! are written as they arrive, without waiting for the pass to end, so the destination QEMU loads
//! while the link carries. Pages of later passes wait in the staging area, and when it and the
//! writer hold [`STAGED_LIMIT`](staging::STAGED_LIMIT) bytes between them the channels stop
//! reading (pages the writer may write only while it has others to write): the source feels the
//! destination's pace through the link, and the destination never lags far behind (which would
//! lengthen the downtime). Pages the codec found unchanged are not written at all: the
//! destination QEMU already holds that content.

mod destination;
mod source;
mod staging;

use pagecodec::{MemoryLayout, PAGE_SIZE};

use crate::stream::{MAX_RAM_BLOCKS, RamBlock, TARGET_PAGE_SIZE};

pub(crate) use destination::{destination_main, destination_return_path, qemu_write_error};
pub(crate) use source::{SourceOutcome, hand_over, source_main};

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
/// ([`stream::Ending::Early`](crate::stream::Ending::Early)), and why, in words. The
/// destination still hands its QEMU every byte (QEMU fails on the cut stream as it would without
/// the shims), then reports the migration failed for this reason rather than complete
/// (`Session::unfinished`: nothing is shut down, so that both return paths end in order and no
/// echo of a failure hides why).
const BLOB_ENDED_EARLY: u8 = 5;

/// First byte of a blob, empty otherwise: the source QEMU's stream ended as a finished
/// migration's does ([`stream::Ending::Finished`](crate::stream::Ending::Finished)), for the
/// destination's summary.
const BLOB_FINISHED: u8 = 6;

/// Why a stream the source stopped parsing cannot feed a destination QEMU's multifd channels.
pub(crate) const UNPARSED_FOR_MULTIFD: &str = "the source shim stopped parsing QEMU's stream before its device state (see its summary): \
     the destination QEMU's multifd channels cannot be given their barriers; run the \
     destination shim without --qemu-multifd (and the destination QEMU without multifd)";

const _: () = assert!(TARGET_PAGE_SIZE == PAGE_SIZE);

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
