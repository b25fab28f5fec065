//! Feeds arbitrary bytes to the frame decoder as a stream of frames.
//!
//! The first input byte picks a mode: even, frames are decoded as they are, so the checksum
//! guards everything behind it; odd, every frame's checksum is recomputed first, so that the
//! fuzzer reaches the record parser with content no encoder would produce. Either way the
//! decoder must answer with an error or a correct page, never a panic, a hang or an allocation
//! sized by the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagecodec::wire::{HEADER_LEN, reseal};
use pagecodec::{Decoder, DecoderLimits, MemoryImage, MemoryLayout};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let limits = DecoderLimits {
        max_frame_body: 1 << 20,
        max_cache_bytes: 1 << 20,
        max_memory_bytes: 1 << 24,
        stream_id: None,
    };
    let mut decoder = Decoder::new(limits);
    // The sink covers what the streams in the seed corpus declare; pages beyond it are refused.
    let mut image = MemoryImage::zeroed(MemoryLayout::new(vec![256, 64]).expect("valid layout"));
    while !rest.is_empty() {
        // A frame is as long as its header says, or the rest of the input if that is unusable.
        let len = decoder
            .frame_len(rest)
            .ok()
            .filter(|&len| len <= rest.len())
            .unwrap_or(rest.len());
        let mut frame = rest[..len].to_vec();
        rest = &rest[len..];
        if mode & 1 == 1 && frame.len() >= HEADER_LEN {
            reseal(&mut frame);
        }
        if decoder.decode(&frame, &mut image).is_err() {
            break;
        }
    }
});
