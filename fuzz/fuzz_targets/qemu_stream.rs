//! Feeds arbitrary bytes to the QEMU stream parser of the shim, in pieces.
//!
//! The first input byte sets the piece size, so that items split at every possible place. The
//! parser must never panic or hang, and must account for every byte exactly once: as bytes to
//! carry, or as the record of a page it took out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagestream_qemu_shim::stream::{Event, Parser};

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece) * 37 + 1;
    let mut parser = Parser::new();
    let mut accounted = 0usize;
    let mut held = Vec::new();
    let mut emit = |event: Event<'_>| match event {
        Event::Bytes(b) => accounted += b.len(),
        Event::Page {
            data, record_len, ..
        } => {
            assert_eq!(data.len(), 4096);
            accounted += record_len;
        }
        Event::Fill { record_len, .. } => accounted += record_len,
        Event::RamBlocks(_) | Event::RamSectionEnd | Event::PassThrough { .. } => {}
    };
    for chunk in stream.chunks(piece) {
        held.extend_from_slice(chunk);
        parser.parse_all(&mut held, &mut emit);
    }
    parser.finish(&held, &mut emit);
    assert_eq!(accounted, stream.len());
});
