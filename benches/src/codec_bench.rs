//! `pagestream codec bench`: the codec against per-page zstd-1 and LZ4 on the same image, in the
//! same run, on the same threads.

use std::collections::BTreeMap;
use std::time::Instant;

use pagecodec::{
    ClassCounts, Decoder, DecoderLimits, Encoder, EncoderConfig, MemoryImage, MemoryLayout,
    PAGE_SIZE, Page, PageAddr, PageClass, ShardMap,
};
use serde::Serialize;

use crate::baseline::{self, Baseline, BaselineRun};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct CodecBenchConfig {
    /// Encoder/decoder threads (one stream each); the baselines use as many.
    pub threads: u32,
    /// Runs of each codec; speeds are the median.
    pub repeat: u32,
    /// Content-cache budget for the whole migration (split over the streams).
    pub dup_cache_bytes: u64,
    /// Delta-cache budget for the whole migration (split over the streams).
    pub delta_cache_bytes: u64,
    /// Percentage of compressed page groups that use zstd instead of LZ4 (the encoder's
    /// stronger mode for slow links).
    pub zstd_share: u32,
}

impl Default for CodecBenchConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            repeat: 3,
            dup_cache_bytes: pagecodec::encoder::DEFAULT_DUP_CACHE_BYTES,
            delta_cache_bytes: pagecodec::encoder::DEFAULT_DELTA_CACHE_BYTES,
            zstd_share: 0,
        }
    }
}

/// One class's share of the stream.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ClassReport {
    /// Pages of the class.
    pub pages: u64,
    /// Record bytes they took.
    pub wire_bytes: u64,
}

/// A baseline's figures.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BaselineReport {
    /// Bytes after compression.
    pub wire_bytes: u64,
    /// raw / wire.
    pub ratio: f64,
    /// Compression speed, MB (10^6 bytes) of input per second, median.
    pub encode_mb_s: f64,
    /// Decompression speed, MB of output per second, median.
    pub decode_mb_s: f64,
    /// Whether every page came back intact.
    pub roundtrip_ok: bool,
}

/// The result of `pagestream codec bench`.
#[derive(Clone, Debug, Serialize)]
pub struct CodecBenchReport {
    /// Pages in the image.
    pub pages: u64,
    /// Bytes in the image.
    pub raw_bytes: u64,
    /// Bytes of all frames (headers and checksums included).
    pub wire_bytes: u64,
    /// raw / wire.
    pub ratio: f64,
    /// Encoding speed, MB (10^6 bytes) of input per second, median of the runs; encoder setup
    /// (reported apart) not included.
    pub encode_mb_s: f64,
    /// Milliseconds to create the encoders (mostly making their caches resident), median.
    pub encode_setup_ms: f64,
    /// The slowest setup of the runs: the first run of a process, which takes memory the
    /// process never had (on the development VMs the hypervisor backs it lazily, at about 10 µs
    /// per 4 KiB page).
    pub encode_setup_max_ms: f64,
    /// Decoding speed, MB of output per second, median of the runs.
    pub decode_mb_s: f64,
    /// Whether every run decoded to exactly the input image.
    pub roundtrip_ok: bool,
    /// Threads (streams) used.
    pub threads: u32,
    /// Runs per codec.
    pub repeat: u32,
    /// Pages and bytes per class.
    pub classes: BTreeMap<&'static str, ClassReport>,
    /// Per-page zstd level 1.
    pub zstd1: BaselineReport,
    /// Per-page LZ4 block.
    pub lz4: BaselineReport,
    /// Encode speed over zstd-1's.
    pub encode_speedup_vs_zstd1: f64,
    /// Wire bytes over zstd-1's.
    pub wire_vs_zstd1: f64,
    /// Wire bytes over plain LZ4's.
    pub wire_vs_lz4: f64,
    /// The machine the figures come from.
    pub machine: String,
}

struct CodecRun {
    setup_secs: f64,
    wire_bytes: u64,
    classes: ClassCounts,
    encode_secs: f64,
    decode_secs: f64,
    roundtrip_ok: bool,
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Page indexes of each shard.
fn partition(pages: u64, map: ShardMap) -> Vec<Vec<u64>> {
    let mut shards = vec![Vec::new(); map.shards() as usize];
    for i in 0..pages {
        shards[map.shard_of(PageAddr::new(0, i)) as usize].push(i);
    }
    shards
}

/// Buffers every run reuses, allocated and faulted in once, before any timing.
struct Buffers {
    /// One output arena per thread, for the baselines.
    arenas: Vec<Vec<u8>>,
    /// Frame buffers per thread, for the codec: handed to its encoder, as a transport hands it
    /// the buffers it sends from.
    frame_pools: Vec<Vec<Vec<u8>>>,
    /// The destination image.
    decoded: MemoryImage,
}

impl Buffers {
    fn new(image_len: usize, shards: &[Vec<u64>]) -> Self {
        let mut arenas: Vec<Vec<u8>> = shards
            .iter()
            .map(|pages| vec![0u8; baseline::arena_bytes(pages.len())])
            .collect();
        for arena in &mut arenas {
            arena.fill(0xa5);
        }
        // Enough frame buffers for an incompressible image.
        let capacity = Encoder::new(EncoderConfig::new(
            0,
            MemoryLayout::single(1).expect("layout"),
        ))
        .expect("default config")
        .frame_buffer_capacity();
        let target = pagecodec::encoder::DEFAULT_TARGET_FRAME_BYTES as usize;
        let frame_pools = shards
            .iter()
            .map(|pages| {
                let frames = pages.len() * (PAGE_SIZE + 64) / target + 4;
                (0..frames).map(|_| vec![0xa5u8; capacity]).collect()
            })
            .collect();
        let mut decoded =
            MemoryImage::zeroed(MemoryLayout::single(image_len as u64).expect("one region"));
        Self::poison(&mut decoded);
        Self {
            arenas,
            frame_pools,
            decoded,
        }
    }

    /// Fills the destination with a pattern no image page is likely to hold, so that a page a
    /// codec fails to write shows up in the comparison instead of passing with stale content.
    fn poison(image: &mut MemoryImage) {
        let addrs: Vec<PageAddr> = image.addresses().collect();
        for addr in addrs {
            image.page_mut(addr).expect("own address").fill(0xa5);
        }
    }
}

fn run_codec(
    image: &[u8],
    map: ShardMap,
    shards: &[Vec<u64>],
    config: &CodecBenchConfig,
    buffers: &mut Buffers,
) -> CodecRun {
    let layout = MemoryLayout::single(image.len() as u64).expect("one region");
    let per_stream =
        |bytes: u64| bytes / u64::from(map.shards()) / PAGE_SIZE as u64 * PAGE_SIZE as u64;
    Buffers::poison(&mut buffers.decoded);
    // Setup, timed on its own: an encoder makes its cache memory resident when it is created,
    // before any page flows, as a migration does while it connects.
    let setup = Instant::now();
    let encoders: Vec<Encoder> = shards
        .iter()
        .zip(buffers.frame_pools.iter_mut())
        .enumerate()
        .map(|(id, (_, pool))| {
            let mut ec = EncoderConfig::new(id as u32, layout.clone());
            ec.dup_cache_bytes = per_stream(config.dup_cache_bytes);
            ec.delta_cache_bytes = per_stream(config.delta_cache_bytes);
            ec.digest_seed = 0x5eed ^ id as u64;
            let mut encoder = Encoder::new(ec).expect("valid encoder config");
            encoder.set_zstd_share(config.zstd_share);
            for buf in std::mem::take(pool) {
                encoder.recycle(buf);
            }
            encoder
        })
        .collect();
    let setup_secs = setup.elapsed().as_secs_f64();

    let start = Instant::now();
    let streams: Vec<(Vec<Vec<u8>>, ClassCounts, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .zip(encoders)
            .map(|(pages, mut encoder)| {
                scope.spawn(move || {
                    let mut frames = Vec::new();
                    for &i in pages {
                        let page: &Page = image[i as usize * PAGE_SIZE..][..PAGE_SIZE]
                            .try_into()
                            .expect("page-sized");
                        encoder
                            .encode(PageAddr::new(0, i), 0, page)
                            .expect("address inside the layout");
                        while let Some(f) = encoder.pop_frame() {
                            frames.push(f);
                        }
                    }
                    encoder.finish().expect("not finished before");
                    while let Some(f) = encoder.pop_frame() {
                        frames.push(f);
                    }
                    let stats = encoder.stats();
                    (frames, stats.classes, stats.wire_bytes)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("encoder thread"))
            .collect()
    });
    let encode_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let decode_ok = {
        let writers = buffers.decoded.shard_writers(map);
        std::thread::scope(|scope| {
            let handles: Vec<_> = writers
                .into_iter()
                .zip(&streams)
                .enumerate()
                .map(|(id, (mut writer, (frames, _, _)))| {
                    scope.spawn(move || {
                        let mut decoder = Decoder::new(DecoderLimits {
                            stream_id: Some(id as u32),
                            ..DecoderLimits::default()
                        });
                        frames
                            .iter()
                            .all(|f| decoder.decode(f, &mut writer).is_ok())
                            && decoder.is_complete()
                    })
                })
                .collect();
            handles
                .into_iter()
                .all(|h| h.join().expect("decoder thread"))
        })
    };
    let decode_secs = start.elapsed().as_secs_f64();
    let mut classes = ClassCounts::default();
    for (_, c, _) in &streams {
        classes.merge(c);
    }
    let wire_bytes = streams.iter().map(|s| s.2).sum();
    // Frame buffers go back to the pool for the next run.
    for ((frames, _, _), pool) in streams.into_iter().zip(&mut buffers.frame_pools) {
        *pool = frames;
    }
    CodecRun {
        setup_secs,
        wire_bytes,
        classes,
        encode_secs,
        decode_secs,
        roundtrip_ok: decode_ok && buffers.decoded.region(0) == Some(image),
    }
}

fn baseline_report(raw: u64, runs: &[BaselineRun]) -> BaselineReport {
    let wire_bytes = runs[0].wire_bytes;
    BaselineReport {
        wire_bytes,
        ratio: raw as f64 / wire_bytes as f64,
        encode_mb_s: median(runs.iter().map(|r| mb_s(raw, r.encode_secs)).collect()),
        decode_mb_s: median(runs.iter().map(|r| mb_s(raw, r.decode_secs)).collect()),
        roundtrip_ok: runs.iter().all(|r| r.roundtrip_ok),
    }
}

/// Runs the benchmark on `image` (its length a multiple of the page size), calling `progress`
/// with a short description before each step.
pub fn run(
    image: &[u8],
    config: &CodecBenchConfig,
    mut progress: impl FnMut(&str),
) -> CodecBenchReport {
    assert!(
        image.len().is_multiple_of(PAGE_SIZE),
        "image is whole pages"
    );
    let raw = image.len() as u64;
    let map = ShardMap::new(config.threads.max(1)).expect("at least one shard");
    let shards = partition(raw / PAGE_SIZE as u64, map);
    let repeat = config.repeat.max(1);
    progress("allocating buffers");
    let mut buffers = Buffers::new(image.len(), &shards);
    let (mut codec, mut zstd, mut lz4) = (Vec::new(), Vec::new(), Vec::new());
    // Interleave the three so that a slow phase of a noisy machine hits all of them.
    for i in 1..=repeat {
        progress(&format!("run {i}/{repeat}: pagestream codec"));
        codec.push(run_codec(image, map, &shards, config, &mut buffers));
        progress(&format!("run {i}/{repeat}: zstd level 1, per page"));
        Buffers::poison(&mut buffers.decoded);
        zstd.push(baseline::run(
            Baseline::Zstd1,
            image,
            map,
            &shards,
            &mut buffers.arenas,
            &mut buffers.decoded,
        ));
        progress(&format!("run {i}/{repeat}: LZ4, per page"));
        Buffers::poison(&mut buffers.decoded);
        lz4.push(baseline::run(
            Baseline::Lz4,
            image,
            map,
            &shards,
            &mut buffers.arenas,
            &mut buffers.decoded,
        ));
    }
    let wire_bytes = codec[0].wire_bytes;
    let classes = PageClass::ALL
        .iter()
        .map(|&c| {
            (
                c.name(),
                ClassReport {
                    pages: codec[0].classes.pages(c),
                    wire_bytes: codec[0].classes.wire_bytes(c),
                },
            )
        })
        .collect();
    let encode_mb_s = median(codec.iter().map(|r| mb_s(raw, r.encode_secs)).collect());
    let zstd1 = baseline_report(raw, &zstd);
    let lz4 = baseline_report(raw, &lz4);
    CodecBenchReport {
        pages: raw / PAGE_SIZE as u64,
        raw_bytes: raw,
        wire_bytes,
        ratio: raw as f64 / wire_bytes as f64,
        encode_mb_s,
        encode_setup_ms: median(codec.iter().map(|r| r.setup_secs * 1e3).collect()),
        encode_setup_max_ms: codec.iter().map(|r| r.setup_secs * 1e3).fold(0.0, f64::max),
        decode_mb_s: median(codec.iter().map(|r| mb_s(raw, r.decode_secs)).collect()),
        roundtrip_ok: codec.iter().all(|r| r.roundtrip_ok),
        threads: map.shards(),
        repeat,
        classes,
        encode_speedup_vs_zstd1: encode_mb_s / zstd1.encode_mb_s,
        wire_vs_zstd1: wire_bytes as f64 / zstd1.wire_bytes as f64,
        wire_vs_lz4: wire_bytes as f64 / lz4.wire_bytes as f64,
        zstd1,
        lz4,
        machine: crate::machine::describe(),
    }
}
