//! The baselines the codec is measured against: every page compressed on its own by zstd level 1
//! or by plain LZ4 block compression, with no zero, duplicate or unchanged detection. Both write
//! decoded pages into a memory image exactly as the codec's decoder does, so the comparison
//! covers the same work.

use std::time::Instant;

use lz4_flex::block::{CompressTable, compress_into_with_table, decompress_into};
use pagecodec::{MemoryImage, PAGE_SIZE, Page, PageAddr, PageSink, ShardMap};

/// A per-page baseline codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// zstd at level 1.
    Zstd1,
    /// LZ4 block format (lz4_flex, the codec's own LZ4, with the same hash table).
    Lz4,
}

/// Wire size and timings of one baseline run.
#[derive(Clone, Copy, Debug)]
pub struct BaselineRun {
    /// Sum of compressed page sizes (no per-page framing counted).
    pub wire_bytes: u64,
    /// Seconds to compress every page.
    pub encode_secs: f64,
    /// Seconds to decompress every page into the image.
    pub decode_secs: f64,
    /// Whether the decoded image equals the input.
    pub roundtrip_ok: bool,
}

enum Compressor {
    Zstd(
        zstd::bulk::Compressor<'static>,
        zstd::bulk::Decompressor<'static>,
    ),
    Lz4(Box<CompressTable>),
}

impl Compressor {
    fn new(kind: Baseline) -> Self {
        match kind {
            Baseline::Zstd1 => Compressor::Zstd(
                zstd::bulk::Compressor::new(1).expect("zstd context"),
                zstd::bulk::Decompressor::new().expect("zstd context"),
            ),
            // The 32-bit table, as the codec uses: faster and tighter than lz4_flex's default
            // 16-bit table on 4 KiB inputs, so the baseline is LZ4 at its best.
            Baseline::Lz4 => Compressor::Lz4(Box::new(CompressTable::large())),
        }
    }

    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> usize {
        match self {
            Compressor::Zstd(c, _) => c.compress_to_buffer(page, out).expect("zstd compress"),
            Compressor::Lz4(table) => {
                compress_into_with_table(page, out, table).expect("output holds the worst case")
            }
        }
    }

    fn decompress(&mut self, data: &[u8], out: &mut Page) -> bool {
        match self {
            Compressor::Zstd(_, d) => d
                .decompress_to_buffer(data, &mut out[..])
                .is_ok_and(|n| n == PAGE_SIZE),
            Compressor::Lz4(_) => decompress_into(data, &mut out[..]).is_ok_and(|n| n == PAGE_SIZE),
        }
    }
}

/// Compresses the pages of `shards` (one list of page indexes per thread) from `image` into the
/// threads' `arenas`, then decompresses them into `decoded` and compares it with `image`.
/// Buffers come from the caller, already faulted in, so that the timings measure the codec and
/// not the kernel handing out fresh memory.
pub fn run(
    kind: Baseline,
    image: &[u8],
    map: ShardMap,
    shards: &[Vec<u64>],
    arenas: &mut [Vec<u8>],
    decoded: &mut MemoryImage,
) -> BaselineRun {
    let bound = zstd::zstd_safe::compress_bound(PAGE_SIZE).max(PAGE_SIZE * 110 / 100 + 20);
    let page_at = |i: u64| -> &Page {
        image[i as usize * PAGE_SIZE..][..PAGE_SIZE]
            .try_into()
            .expect("page-sized slice")
    };

    // Compression: each thread packs its compressed pages back to back in its arena.
    let start = Instant::now();
    let lens: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .zip(arenas.iter_mut())
            .map(|(pages, out)| {
                assert!(out.len() >= pages.len() * bound, "arena too small");
                scope.spawn(move || {
                    let mut c = Compressor::new(kind);
                    let mut lens = Vec::with_capacity(pages.len());
                    let mut pos = 0;
                    for &i in pages {
                        let n = c.compress(page_at(i), &mut out[pos..pos + bound]);
                        lens.push(n as u32);
                        pos += n;
                    }
                    lens
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("baseline thread"))
            .collect()
    });
    let encode_secs = start.elapsed().as_secs_f64();
    let wire_bytes = lens.iter().flatten().map(|&n| u64::from(n)).sum();

    // Decompression into the image, through the same sink the codec's decoder uses.
    let start = Instant::now();
    let all_ok = {
        let writers = decoded.shard_writers(map);
        let arenas = &*arenas;
        std::thread::scope(|scope| {
            let handles: Vec<_> = writers
                .into_iter()
                .zip(shards)
                .zip(arenas.iter().zip(&lens))
                .map(|((mut writer, pages), (data, lens))| {
                    scope.spawn(move || {
                        let mut c = Compressor::new(kind);
                        let mut page = Box::new([0u8; PAGE_SIZE]);
                        let mut pos = 0;
                        let mut ok = true;
                        for (&i, &len) in pages.iter().zip(lens) {
                            let len = len as usize;
                            ok &= c.decompress(&data[pos..pos + len], &mut page);
                            ok &= writer.data(PageAddr::new(0, i), 0, &page).is_ok();
                            pos += len;
                        }
                        ok
                    })
                })
                .collect();
            handles
                .into_iter()
                .all(|h| h.join().expect("baseline thread"))
        })
    };
    let decode_secs = start.elapsed().as_secs_f64();
    let roundtrip_ok = all_ok && decoded.region(0) == Some(image);
    BaselineRun {
        wire_bytes,
        encode_secs,
        decode_secs,
        roundtrip_ok,
    }
}

/// Bytes of output arena one thread needs for `pages` pages, whichever codec runs.
pub fn arena_bytes(pages: usize) -> usize {
    let bound = zstd::zstd_safe::compress_bound(PAGE_SIZE).max(PAGE_SIZE * 110 / 100 + 20);
    pages * bound + (1 << 20)
}
