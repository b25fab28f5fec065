//! Encode and decode speed per page class: `cargo bench -p pagecodec`.
//!
//! Each case encodes 256 pages that all take one form. The state a form needs (the earlier pass
//! for "unchanged", the originals for "duplicate", two earlier versions for "delta") is built in
//! the untimed setup, so only the class's own work is measured (`iter_custom` times exactly
//! that; freeing caches and buffers happens outside the timing too).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pagecodec::{
    Decoder, DecoderLimits, Encoder, EncoderConfig, MemoryImage, MemoryLayout, PAGE_SIZE, Page,
    PageAddr,
};

const PAGES: u64 = 256;

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn random_page(seed: u64) -> Page {
    let mut next = xorshift(seed);
    let mut page = [0u8; PAGE_SIZE];
    for chunk in page.chunks_exact_mut(8) {
        chunk.copy_from_slice(&next().to_le_bytes());
    }
    page
}

fn text_page(seed: u64) -> Page {
    const WORDS: [&str; 12] = [
        "the ",
        "memory ",
        "page ",
        "of ",
        "migration ",
        "and ",
        "a ",
        "guest ",
        "is ",
        "dirty ",
        "to ",
        "sent. ",
    ];
    let mut next = xorshift(seed);
    let mut page = [0u8; PAGE_SIZE];
    let mut pos = 0;
    while pos < PAGE_SIZE {
        let w = WORDS[(next() % WORDS.len() as u64) as usize].as_bytes();
        let n = w.len().min(PAGE_SIZE - pos);
        page[pos..pos + n].copy_from_slice(&w[..n]);
        pos += n;
    }
    page
}

fn edited(mut page: Page, seed: u64) -> Page {
    let at = (seed as usize * 8 * 61) % (PAGE_SIZE - 8);
    page[at..at + 8].copy_from_slice(&seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    page
}

/// One benchmark case: what to encode before the measured pages, and the measured pages.
struct Case {
    name: &'static str,
    /// Passes encoded in setup: (generation, address, page).
    before: Vec<(u32, PageAddr, Page)>,
    /// The measured pages, all of one generation.
    measured: Vec<(PageAddr, Page)>,
    generation: u32,
}

fn cases() -> Vec<Case> {
    let addr = |i: u64| PageAddr::new(0, i);
    let texts: Vec<Page> = (0..PAGES).map(|i| text_page(i + 1)).collect();
    let randoms: Vec<Page> = (0..PAGES).map(|i| random_page(i + 1)).collect();
    let first_pass = |pages: &[Page]| -> Vec<(u32, PageAddr, Page)> {
        pages
            .iter()
            .enumerate()
            .map(|(i, p)| (0, addr(i as u64), *p))
            .collect()
    };
    let mut delta_before = first_pass(&randoms);
    delta_before.extend(
        randoms
            .iter()
            .enumerate()
            .map(|(i, p)| (1, addr(i as u64), edited(*p, 1))),
    );
    vec![
        Case {
            name: "zero",
            before: vec![],
            measured: (0..PAGES).map(|i| (addr(i), [0; PAGE_SIZE])).collect(),
            generation: 0,
        },
        Case {
            name: "unchanged",
            before: first_pass(&texts),
            measured: texts
                .iter()
                .enumerate()
                .map(|(i, p)| (addr(i as u64), *p))
                .collect(),
            generation: 1,
        },
        Case {
            name: "duplicate",
            before: first_pass(&randoms),
            measured: randoms
                .iter()
                .enumerate()
                .map(|(i, p)| (addr(PAGES + i as u64), *p))
                .collect(),
            generation: 0,
        },
        Case {
            name: "delta",
            before: delta_before,
            measured: randoms
                .iter()
                .enumerate()
                .map(|(i, p)| (addr(i as u64), edited(*p, 2)))
                .collect(),
            generation: 2,
        },
        Case {
            name: "lz4",
            before: vec![],
            measured: texts
                .iter()
                .enumerate()
                .map(|(i, p)| (addr(i as u64), *p))
                .collect(),
            generation: 0,
        },
        Case {
            name: "raw",
            before: vec![],
            measured: randoms
                .iter()
                .enumerate()
                .map(|(i, p)| (addr(i as u64), *p))
                .collect(),
            generation: 0,
        },
    ]
}

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![2 * PAGES]).expect("valid layout")
}

/// An encoder that has encoded `case.before`, and the frames it produced. Its caches are sized
/// for the case (1 MiB each), so that setups stay small and the measured work runs warm.
fn prepared(case: &Case) -> (Encoder, Vec<Vec<u8>>) {
    let mut config = EncoderConfig::new(0, layout());
    config.dup_cache_bytes = PAGES * PAGE_SIZE as u64;
    config.delta_cache_bytes = PAGES * PAGE_SIZE as u64;
    let mut encoder = Encoder::new(config).expect("valid config");
    for (generation, addr, page) in &case.before {
        encoder
            .encode(*addr, *generation, page)
            .expect("valid page");
    }
    encoder.flush();
    let frames = std::iter::from_fn(|| encoder.pop_frame()).collect();
    // A spare frame buffer, as a transport keeps them circulating: the measured flush must not
    // pay for fresh memory.
    encoder.recycle(vec![0xa5; encoder.frame_buffer_capacity()]);
    (encoder, frames)
}

/// Encodes the measured pages; returns the encoder and the frames, so that freeing them
/// (unmapping caches and buffers) is left out of the measurement.
fn encode(mut encoder: Encoder, case: &Case) -> (Encoder, Vec<Vec<u8>>) {
    for (addr, page) in &case.measured {
        encoder
            .encode(*addr, case.generation, page)
            .expect("valid page");
    }
    encoder.flush();
    let frames = std::iter::from_fn(|| encoder.pop_frame()).collect();
    (encoder, frames)
}

/// A destination image, resident before the clock starts as guest memory is.
fn resident_image() -> MemoryImage {
    let mut image = MemoryImage::zeroed(layout());
    let addrs: Vec<PageAddr> = image.addresses().collect();
    for addr in addrs {
        image.page_mut(addr).expect("own page").fill(0xa5);
    }
    image
}

fn bench(c: &mut Criterion) {
    for case in cases() {
        let mut group = c.benchmark_group(case.name);
        group.throughput(Throughput::Bytes(PAGES * PAGE_SIZE as u64));
        group.bench_function("encode", |b| {
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let encoder = prepared(&case).0;
                    let start = Instant::now();
                    let out = encode(encoder, &case);
                    measured += start.elapsed();
                    drop(black_box(out));
                }
                measured
            })
        });
        // Decode: a decoder that applied the setup frames, then the measured pages' frames.
        let (encoder, before) = prepared(&case);
        let (_, measured_frames) = encode(encoder, &case);
        group.bench_function("decode", |b| {
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let mut image = resident_image();
                    let mut decoder = Decoder::new(DecoderLimits::default());
                    for frame in &before {
                        decoder.decode(frame, &mut image).expect("valid frame");
                    }
                    let start = Instant::now();
                    for frame in &measured_frames {
                        decoder.decode(frame, &mut image).expect("valid frame");
                    }
                    measured += start.elapsed();
                    drop(black_box((decoder, image)));
                }
                measured
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
