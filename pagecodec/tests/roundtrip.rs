//! Property tests: whatever pages, generations, cache sizes and shard counts, decoding gives back
//! exactly the memory image that was encoded; whatever bytes a decoder is fed, it answers with an
//! error rather than a panic or a wrong page.

use pagecodec::{
    DecodeError, Decoder, DecoderLimits, Encoder, EncoderConfig, MemoryImage, MemoryLayout,
    PAGE_SIZE, Page, PageAddr, PageClass, ShardMap,
};
use proptest::prelude::*;

/// A recipe for page content, chosen so that sequences hit every page class: zero pages,
/// repeats (unchanged), the same content at several addresses (duplicates), small edits of
/// earlier content (deltas), compressible and incompressible pages.
#[derive(Clone, Debug)]
enum Content {
    Zero,
    Fill(u8),
    Noise(u8),
    Text(u8),
    Edit { base: u8, at: u16, byte: u8 },
}

fn noise(seed: u8, page: &mut Page) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed).wrapping_mul(0x1234_5678_9abc_def1);
    for chunk in page.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

impl Content {
    fn page(&self) -> Page {
        let mut page = [0u8; PAGE_SIZE];
        match *self {
            Content::Zero => {}
            Content::Fill(b) => page.fill(b),
            Content::Noise(seed) => noise(seed, &mut page),
            Content::Text(seed) => {
                let words = [&b"page "[..], b"stream ", b"migrate ", b"dirty ", b"vm "];
                let mut i = seed as usize;
                let mut pos = 0;
                while pos < PAGE_SIZE {
                    let w = words[i % words.len()];
                    let n = w.len().min(PAGE_SIZE - pos);
                    page[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                    i = i.wrapping_mul(7).wrapping_add(3);
                }
            }
            Content::Edit { base, at, byte } => {
                noise(base, &mut page);
                page[at as usize % PAGE_SIZE] = byte;
            }
        }
        page
    }
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        3 => Just(Content::Zero),
        1 => (0u8..3).prop_map(Content::Fill),
        2 => (0u8..6).prop_map(Content::Noise),
        2 => (0u8..4).prop_map(Content::Text),
        3 => (0u8..3, any::<u16>(), any::<u8>())
            .prop_map(|(base, at, byte)| Content::Edit { base, at, byte }),
    ]
}

#[derive(Clone, Debug)]
struct Write {
    region: usize,
    index: u64,
    next_generation: bool,
    content: Content,
}

#[derive(Clone, Debug)]
struct Scenario {
    regions: Vec<u64>,
    writes: Vec<Write>,
    dup_slots: u64,
    delta_slots: u64,
    frame_bytes: u32,
    shards: u32,
    sequential_runs: bool,
    lz4_share: u32,
    zstd_share: u32,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(1u64..300, 1..4),
        prop::collection::vec(
            (
                any::<usize>(),
                any::<u64>(),
                prop::bool::weighted(0.05),
                content(),
            ),
            0..400,
        ),
        0u64..10,
        0u64..10,
        prop_oneof![Just(64u32), 1u32..20_000, Just(256 << 10)],
        1u32..5,
        any::<bool>(),
        prop_oneof![Just(100u32), 0u32..=100],
        prop_oneof![Just(0u32), Just(100u32), 0u32..=100],
    )
        .prop_map(
            |(
                regions,
                writes,
                dup_slots,
                delta_slots,
                frame_bytes,
                shards,
                sequential_runs,
                lz4_share,
                zstd_share,
            )| {
                Scenario {
                    writes: writes
                        .into_iter()
                        .map(|(region, index, next_generation, content)| Write {
                            region,
                            index,
                            next_generation,
                            content,
                        })
                        .collect(),
                    regions,
                    dup_slots,
                    delta_slots,
                    frame_bytes,
                    shards,
                    sequential_runs,
                    lz4_share,
                    zstd_share,
                }
            },
        )
}

struct Encoded {
    layout: MemoryLayout,
    expected: MemoryImage,
    streams: Vec<Vec<Vec<u8>>>,
    map: ShardMap,
}

fn encode(s: &Scenario) -> Encoded {
    let layout = MemoryLayout::new(s.regions.clone()).unwrap();
    let map = ShardMap::new(s.shards).unwrap();
    let mut encoders: Vec<Encoder> = (0..s.shards)
        .map(|id| {
            let mut config = EncoderConfig::new(id, layout.clone());
            config.dup_cache_bytes = s.dup_slots * PAGE_SIZE as u64;
            config.delta_cache_bytes = s.delta_slots * PAGE_SIZE as u64;
            config.target_frame_bytes = s.frame_bytes;
            config.digest_seed = u64::from(id) * 77;
            let mut encoder = Encoder::new(config).unwrap();
            encoder.set_lz4_share(s.lz4_share);
            encoder.set_zstd_share(s.zstd_share);
            encoder.set_dup_admission(!s.lz4_share.is_multiple_of(3));
            encoder
        })
        .collect();
    let mut expected = MemoryImage::zeroed(layout.clone());
    let mut generation = 0;
    let mut cursor = PageAddr::new(0, 0);
    for w in &s.writes {
        let region = w.region % s.regions.len();
        let addr = if s.sequential_runs {
            // Walk memory in order, as a migration pass does, so runs form.
            let pages = s.regions[cursor.region as usize];
            let next = if cursor.index + 1 < pages {
                PageAddr::new(cursor.region, cursor.index + 1)
            } else {
                PageAddr::new((cursor.region + 1) % s.regions.len() as u32, 0)
            };
            std::mem::replace(&mut cursor, next)
        } else {
            PageAddr::new(region as u32, w.index % s.regions[region])
        };
        if w.next_generation {
            generation += 1;
        }
        let page = w.content.page();
        let shard = map.shard_of(addr) as usize;
        encoders[shard].encode(addr, generation, &page).unwrap();
        expected.page_mut(addr).unwrap().copy_from_slice(&page);
    }
    let streams = encoders
        .iter_mut()
        .map(|e| {
            e.finish().unwrap();
            std::iter::from_fn(|| e.pop_frame()).collect()
        })
        .collect();
    Encoded {
        layout,
        expected,
        streams,
        map,
    }
}

/// Decodes every stream, interleaving their frames as parallel channels would deliver them.
/// Succeeds only if every stream decoded and reached its End frame.
fn decode(enc: &Encoded) -> Result<MemoryImage, String> {
    let mut image = MemoryImage::zeroed(enc.layout.clone());
    let mut decoders: Vec<Decoder> = (0..enc.streams.len())
        .map(|id| {
            Decoder::new(DecoderLimits {
                stream_id: Some(id as u32),
                ..DecoderLimits::default()
            })
        })
        .collect();
    {
        let mut writers = image.shard_writers(enc.map);
        let longest = enc.streams.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            for (stream, frames) in enc.streams.iter().enumerate() {
                if let Some(frame) = frames.get(i) {
                    decoders[stream]
                        .decode(frame, &mut writers[stream])
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    if !decoders.iter().all(Decoder::is_complete) {
        return Err("a stream did not reach its End frame".into());
    }
    Ok(image)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn decode_restores_the_image(s in scenario()) {
        let enc = encode(&s);
        let image = decode(&enc).unwrap();
        prop_assert!(image == enc.expected, "decoded image differs");
    }

    #[test]
    fn flipped_bits_are_refused(s in scenario(), frame_pick in any::<usize>(), bit_pick in any::<usize>()) {
        let mut enc = encode(&s);
        let frames: usize = enc.streams.iter().map(Vec::len).sum();
        let mut pick = frame_pick % frames;
        let stream = enc.streams.iter().position(|f| {
            if pick < f.len() { true } else { pick -= f.len(); false }
        }).unwrap();
        let frame = &mut enc.streams[stream][pick];
        let bit = bit_pick % (frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&enc).is_err(), "a flipped bit went unnoticed");
    }

    #[test]
    fn truncated_frames_are_refused(s in scenario(), frame_pick in any::<usize>(), cut in any::<usize>()) {
        let mut enc = encode(&s);
        let frames = &mut enc.streams[0];
        let i = frame_pick % frames.len();
        let keep = cut % frames[i].len();
        frames[i].truncate(keep);
        prop_assert!(decode(&enc).is_err());
    }

    #[test]
    fn dropped_or_repeated_frames_are_refused(s in scenario(), frame_pick in any::<usize>(), repeat in any::<bool>()) {
        let mut enc = encode(&s);
        let frames = &mut enc.streams[0];
        let i = frame_pick % frames.len();
        if repeat {
            let f = frames[i].clone();
            frames.insert(i, f);
        } else {
            frames.remove(i);
        }
        prop_assert!(decode(&enc).is_err());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        let mut image = MemoryImage::zeroed(MemoryLayout::new(vec![16]).unwrap());
        let mut decoder = Decoder::new(DecoderLimits::default());
        prop_assert!(decoder.decode(&bytes, &mut image).is_err());
    }

    /// Bodies rewritten with a valid checksum: past the checksum, every parser check must hold
    /// on its own. Nothing may panic and nothing may be reported complete unless it decoded.
    #[test]
    fn corrupt_bodies_with_valid_checksums_never_panic(
        s in scenario(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mut enc = encode(&s);
        for frames in &mut enc.streams {
            for frame in frames.iter_mut().skip(1) {
                let body_end = frame.len() - 8;
                if body_end <= 32 { continue; }
                for &(at, byte) in &edits {
                    let at = 32 + at % (body_end - 32);
                    frame[at] = byte;
                }
                pagecodec::wire::reseal(frame);
            }
        }
        let _ = decode_lenient(&enc);
    }
}

/// Like [`decode`] but without asserting completion: used where corruption may or may not be
/// caught by a parser check.
fn decode_lenient(enc: &Encoded) -> Result<(), DecodeError> {
    let mut image = MemoryImage::zeroed(enc.layout.clone());
    let mut writers = image.shard_writers(enc.map);
    for (stream, frames) in enc.streams.iter().enumerate() {
        let mut decoder = Decoder::new(DecoderLimits::default());
        for frame in frames {
            decoder.decode(frame, &mut writers[stream])?;
        }
    }
    Ok(())
}

#[test]
fn every_class_appears_and_round_trips() {
    let layout = MemoryLayout::new(vec![64]).unwrap();
    let mut encoder = Encoder::new(EncoderConfig::new(0, layout.clone())).unwrap();
    let mut expected = MemoryImage::zeroed(layout.clone());
    let mut write = |encoder: &mut Encoder, index: u64, generation, page: &Page| {
        encoder
            .encode(PageAddr::new(0, index), generation, page)
            .unwrap();
        expected
            .page_mut(PageAddr::new(0, index))
            .unwrap()
            .copy_from_slice(page);
    };
    let text = Content::Text(1).page();
    let noise_page = Content::Noise(1).page();
    write(&mut encoder, 0, 0, &[0; PAGE_SIZE]);
    write(&mut encoder, 1, 0, &text);
    write(&mut encoder, 2, 0, &text);
    write(&mut encoder, 4, 0, &noise_page);
    write(&mut encoder, 6, 0, &Content::Noise(2).page());
    // Second pass: page 1 rewritten unchanged, page 4 edited twice (admitted, then a delta).
    write(&mut encoder, 1, 1, &text);
    let mut edited = noise_page;
    edited[100] ^= 0xff;
    write(&mut encoder, 4, 1, &edited);
    edited[200] ^= 0xff;
    write(&mut encoder, 4, 2, &edited);
    encoder.finish().unwrap();
    let classes = encoder.stats().classes;
    let expect = [
        (PageClass::Zero, 1),
        (PageClass::Lz4, 1),
        (PageClass::Duplicate, 1),
        (PageClass::Raw, 3),
        (PageClass::Unchanged, 1),
        (PageClass::Delta, 1),
    ];
    for (class, pages) in expect {
        assert_eq!(classes.pages(class), pages, "{class}");
    }
    let mut image = MemoryImage::zeroed(layout);
    let mut decoder = Decoder::new(DecoderLimits::default());
    while let Some(frame) = encoder.pop_frame() {
        decoder.decode(&frame, &mut image).unwrap();
    }
    assert!(decoder.is_complete());
    assert!(image == expected);
    for class in PageClass::ALL {
        assert_eq!(
            decoder.stats().classes.pages(class),
            encoder.stats().classes.pages(class),
            "{class}"
        );
    }
}

#[test]
fn zstd_groups_round_trip_smaller_than_lz4_and_only_where_declared() {
    let layout = MemoryLayout::new(vec![256]).unwrap();
    let pages: Vec<Page> = (0..256u64).map(|i| Content::Text(i as u8).page()).collect();
    let wire = |allow_zstd: bool, zstd_share: u32| {
        let mut config = EncoderConfig::new(0, layout.clone());
        config.allow_zstd = allow_zstd;
        config.dup_cache_bytes = 0;
        let mut encoder = Encoder::new(config).unwrap();
        encoder.set_zstd_share(zstd_share);
        for (i, page) in pages.iter().enumerate() {
            encoder.encode(PageAddr::new(0, i as u64), 0, page).unwrap();
        }
        encoder.finish().unwrap();
        let mut image = MemoryImage::zeroed(layout.clone());
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut bytes = 0;
        while let Some(frame) = encoder.pop_frame() {
            bytes += frame.len();
            decoder.decode(&frame, &mut image).unwrap();
        }
        assert!(decoder.is_complete());
        for (i, page) in pages.iter().enumerate() {
            assert!(image.page(PageAddr::new(0, i as u64)).unwrap() == page);
        }
        let classes = decoder.stats().classes;
        assert_eq!(
            classes.pages(PageClass::Zstd),
            encoder.stats().classes.pages(PageClass::Zstd)
        );
        (
            bytes,
            classes.pages(PageClass::Zstd),
            classes.pages(PageClass::Lz4),
        )
    };
    let (lz4_bytes, zstd_pages, _) = wire(true, 0);
    assert_eq!(zstd_pages, 0);
    let (zstd_bytes, zstd_pages, lz4_pages) = wire(true, 100);
    assert_eq!((zstd_pages, lz4_pages), (256, 0));
    assert!(
        zstd_bytes < lz4_bytes,
        "zstd {zstd_bytes} vs LZ4 {lz4_bytes}"
    );
    let (_, half, _) = wire(true, 50);
    assert_eq!(half, 128);
    // Without the feature declared, the share asks for nothing.
    let (_, zstd_pages, _) = wire(false, 100);
    assert_eq!(zstd_pages, 0);
}

#[test]
fn huge_length_is_refused_before_allocating() {
    let layout = MemoryLayout::new(vec![1]).unwrap();
    let mut encoder = Encoder::new(EncoderConfig::new(0, layout.clone())).unwrap();
    let mut frame = encoder.pop_frame().unwrap();
    frame[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    let decoder = Decoder::new(DecoderLimits::default());
    let err = decoder.frame_len(&frame).unwrap_err();
    assert!(err.to_string().contains("header"), "{err}");
    let mut image = MemoryImage::zeroed(layout);
    let mut decoder = Decoder::new(DecoderLimits::default());
    let err = decoder.decode(&frame, &mut image).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Header(pagecodec::HeaderError::BodyTooLarge { .. })
        ),
        "{err}"
    );
}

#[test]
fn oversized_caches_and_layouts_are_refused() {
    let layout = MemoryLayout::new(vec![1 << 30]).unwrap();
    let mut encoder = Encoder::new(EncoderConfig::new(0, layout.clone())).unwrap();
    let start = encoder.pop_frame().unwrap();
    let mut image = MemoryImage::zeroed(MemoryLayout::new(vec![1]).unwrap());
    let mut decoder = Decoder::new(DecoderLimits {
        max_memory_bytes: 1 << 30,
        ..DecoderLimits::default()
    });
    let err = decoder.decode(&start, &mut image).unwrap_err();
    assert!(
        err.to_string().contains("exceeds this decoder's limit"),
        "{err}"
    );
    let mut decoder = Decoder::new(DecoderLimits {
        max_cache_bytes: 1 << 20,
        ..DecoderLimits::default()
    });
    let err = decoder.decode(&start, &mut image).unwrap_err();
    assert!(err.to_string().contains("caches of"), "{err}");
    // A failed stream refuses everything after.
    assert!(matches!(
        decoder.decode(&start, &mut image),
        Err(DecodeError::Failed)
    ));
}

#[test]
fn encoder_rejects_bad_input() {
    let layout = MemoryLayout::new(vec![4]).unwrap();
    let mut encoder = Encoder::new(EncoderConfig::new(0, layout)).unwrap();
    let page = [1u8; PAGE_SIZE];
    assert!(encoder.encode(PageAddr::new(0, 4), 0, &page).is_err());
    assert!(encoder.encode(PageAddr::new(1, 0), 0, &page).is_err());
    encoder.encode(PageAddr::new(0, 0), 3, &page).unwrap();
    assert!(encoder.encode(PageAddr::new(0, 1), 2, &page).is_err());
    encoder.finish().unwrap();
    assert!(encoder.encode(PageAddr::new(0, 1), 3, &page).is_err());
    assert!(encoder.finish().is_err());
}
