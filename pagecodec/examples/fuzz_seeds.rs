//! Writes the seed corpus of the `frame_decoder` fuzz target:
//! `cargo run -p pagecodec --example fuzz_seeds -- fuzz/corpus/frame_decoder`.
//!
//! Each seed is a mode byte (see the fuzz target) followed by a whole encoded stream that uses
//! every record kind: zero and unchanged runs, duplicates, deltas, LZ4 groups and raw pages, in
//! two regions over three generations.

use std::path::PathBuf;

use pagecodec::{Encoder, EncoderConfig, MemoryLayout, PAGE_SIZE, Page, PageAddr};

fn page(seed: u64, compressible: bool) -> Page {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = [0u8; PAGE_SIZE];
    for chunk in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = if compressible { x % 7 } else { x };
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    p
}

fn stream(dup: u64, delta: u64, frame_bytes: u32) -> Vec<u8> {
    let layout = MemoryLayout::new(vec![256, 64]).expect("valid layout");
    let mut config = EncoderConfig::new(0, layout);
    config.dup_cache_bytes = dup * PAGE_SIZE as u64;
    config.delta_cache_bytes = delta * PAGE_SIZE as u64;
    config.target_frame_bytes = frame_bytes;
    let mut encoder = Encoder::new(config).expect("valid config");
    for generation in 0..3u32 {
        for i in 0..10u64 {
            let addr = PageAddr::new((i % 5 == 4) as u32, i * 3 % 40);
            let content = match (i + u64::from(generation) * (i % 3)) % 6 {
                0 => [0u8; PAGE_SIZE],
                1 | 2 => page(i, true),
                3 => page(i % 4, false),
                _ => {
                    let mut p = page(i, true);
                    p[generation as usize * 8] ^= 0xff;
                    p
                }
            };
            encoder
                .encode(addr, generation, &content)
                .expect("valid page");
        }
    }
    encoder.finish().expect("first finish");
    std::iter::from_fn(|| encoder.pop_frame())
        .flatten()
        .collect()
}

fn main() -> std::io::Result<()> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| "fuzz/corpus/frame_decoder".into());
    std::fs::create_dir_all(&dir)?;
    let streams = [
        ("all-features", stream(64, 64, 16 << 10)),
        ("no-caches", stream(0, 0, 16 << 10)),
        ("tiny-caches-small-frames", stream(2, 2, 600)),
    ];
    for (name, bytes) in streams {
        for mode in [0u8, 1] {
            let mut seed = vec![mode];
            seed.extend_from_slice(&bytes);
            std::fs::write(dir.join(format!("{name}-mode{mode}")), seed)?;
        }
    }
    Ok(())
}
