//! Encode and decode speed per page class: `cargo bench -p pagecodec`.
//!
//! Each case encodes 256 pages that all take one form. The state a form needs (the earlier pass
//! for "unchanged", the originals for "duplicate", two earlier versions for "delta") is built in
//! the untimed setup, so only the class's own work is measured.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
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

/// An encoder that has encoded `case.before`, and the frames it produced.
fn prepared(case: &Case) -> (Encoder, Vec<Vec<u8>>) {
    let mut encoder = Encoder::new(EncoderConfig::new(0, layout())).expect("valid config");
    for (generation, addr, page) in &case.before {
        encoder
            .encode(*addr, *generation, page)
            .expect("valid page");
    }
    encoder.flush();
    let frames = std::iter::from_fn(|| encoder.pop_frame()).collect();
    (encoder, frames)
}

fn encode(encoder: &mut Encoder, case: &Case) {
    for (addr, page) in &case.measured {
        encoder
            .encode(*addr, case.generation, page)
            .expect("valid page");
    }
    encoder.flush();
    while let Some(frame) = encoder.pop_frame() {
        black_box(&frame);
    }
}

fn bench(c: &mut Criterion) {
    for case in cases() {
        let mut group = c.benchmark_group(case.name);
        group.throughput(Throughput::Bytes(PAGES * PAGE_SIZE as u64));
        group.bench_function("encode", |b| {
            b.iter_batched(
                || prepared(&case).0,
                |mut e| encode(&mut e, &case),
                BatchSize::PerIteration,
            )
        });
        // Decode: a decoder that applied the setup frames, and the measured pages' frames.
        let (mut encoder, before) = prepared(&case);
        for (addr, page) in &case.measured {
            encoder
                .encode(*addr, case.generation, page)
                .expect("valid page");
        }
        encoder.flush();
        let measured: Vec<Vec<u8>> = std::iter::from_fn(|| encoder.pop_frame()).collect();
        group.bench_function("decode", |b| {
            b.iter_batched(
                || {
                    let mut image = MemoryImage::zeroed(layout());
                    let mut decoder = Decoder::new(DecoderLimits::default());
                    for frame in &before {
                        decoder.decode(frame, &mut image).expect("valid frame");
                    }
                    (decoder, image)
                },
                |(mut decoder, mut image)| {
                    for frame in &measured {
                        decoder.decode(frame, &mut image).expect("valid frame");
                    }
                    black_box(image)
                },
                BatchSize::PerIteration,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
