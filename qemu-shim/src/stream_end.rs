//! How a migration stream ended, told from its last bytes: whether the source QEMU finished its
//! migration or stopped midway (cancelled, or failed at the source).
//!
//! QEMU ends every migration stream the same way (`migration/savevm.c`): precopy with the
//! non-iterable device state, then EOF (`0x00`), then the device description (`0x06`, a be32
//! length and that much JSON, an object), unless the machine suppresses it; postcopy, and a
//! postcopy migration resumed after a failure, with the RAM section's END, its footer (`0x7E`
//! and a be32 section id) and EOF. A stream QEMU stopped midway ends wherever its last write did.
//! A shim that carries the stream opaque (QEMU's multifd, XBZRLE, postcopy, `--mode opaque`)
//! cannot follow it to its end, and parsing mode follows it only up to the device state, whose
//! sections carry no length: both learn from the last bytes whether the migration was whole.
//!
//! The watch never reports a whole stream as cut: a stream that ends in the device
//! description's JSON exactly where its length says, or in a footer then EOF, is finished; one
//! that ends in any other byte than EOF's is cut. One that ends in a bare EOF byte is cut if
//! the stream writes section footers, and cannot be told otherwise. A stream writes footers if
//! it opens with a configuration section after its header: QEMU turns both off together, for
//! machine types before 2.4 and under Xen (`hw_compat_2_3`, the Xen accelerator's compat
//! properties). The watch looks only at a stream that opens as QEMU's does (the `QEVM` header,
//! or a resumed postcopy's command): QEMU's own TLS shows it nothing to read.
//!
//! Cost: one `memmem` pass for the marker's first two bytes (tens of GB/s), no copy.

use memchr::memmem;

use crate::stream::{CONFIGURATION, FOOTER, QEVM, SECTION_EOF as EOF, VMDESCRIPTION};

/// Bytes that tell a stream's opening: the header (magic, version) and the next section type.
const OPENING: usize = 9;
/// Bytes of the device description's marker before its JSON: EOF, VMDESCRIPTION, be32 length.
const MARKER: usize = 6;
/// Bytes a marker must show to be taken for one: the marker and the JSON's opening brace.
const MARKER_AND_BRACE: usize = MARKER + 1;
/// Longest device description taken for one (QEMU writes a few KiB to a few hundred).
const MAX_VMDESC: u32 = 64 << 20;
/// Possible device descriptions remembered at once (random bytes make one about every 30 MiB).
const MAX_CANDIDATES: usize = 1024;

/// What a stream's last bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The end of a finished migration.
    Finished,
    /// Not the end of a migration: QEMU stopped writing midway.
    Cut,
    /// Cannot be told: a stream that does not open as QEMU's (its own TLS), one that ended
    /// before it said, or one without section footers that ends in a bare EOF byte.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opening {
    /// Its first bytes will say whether it is QEMU's stream.
    Judging,
    Watched,
    Ignored,
}

/// Reads a stream's bytes, in order and in pieces of any size, to say at its end how it ended.
#[derive(Debug)]
pub(crate) struct EndWatch {
    opening: Opening,
    /// The first bytes, while judging the opening.
    head: Vec<u8>,
    /// The stream writes section footers: the end of a finished one is never a bare EOF.
    footers: bool,
    /// Bytes read (while watched).
    position: u64,
    /// The last up to [`MARKER`] bytes, oldest first: where a marker that a later piece
    /// completes may start. Every marker start before them has been looked at.
    recent: [u8; MARKER],
    recent_len: usize,
    /// Stream offsets where possible device descriptions end, per their markers: not yet
    /// passed.
    vmdesc_ends: Vec<u64>,
    /// Finds the marker's first two bytes.
    finder: memmem::Finder<'static>,
}

impl EndWatch {
    /// A watch for a whole connection, from its first byte: it judges the opening.
    pub(crate) fn new() -> Self {
        Self::with_opening(Opening::Judging)
    }

    /// A watch for bytes known to be part of QEMU's stream (parsing mode, past the point it
    /// follows).
    pub(crate) fn watching() -> Self {
        Self::with_opening(Opening::Watched)
    }

    /// The stream writes section footers (the parser saw its configuration section).
    pub(crate) fn expect_footers(&mut self) {
        self.footers = true;
    }

    fn with_opening(opening: Opening) -> Self {
        Self {
            opening,
            head: Vec::new(),
            footers: false,
            position: 0,
            recent: [0; MARKER],
            recent_len: 0,
            vmdesc_ends: Vec::new(),
            finder: memmem::Finder::new(&[EOF, VMDESCRIPTION]).into_owned(),
        }
    }

    /// Reads `bytes`, the next ones of the stream.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        match self.opening {
            Opening::Ignored => {}
            Opening::Watched => self.scan(bytes),
            Opening::Judging => {
                let take = (OPENING - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..take]);
                let head = &self.head;
                let qemus = head.starts_with(QEVM);
                if head.len() < 4 || (qemus && head.len() < OPENING) {
                    return;
                }
                if qemus {
                    self.footers = head[8] == CONFIGURATION;
                } else if !crate::stream::opens_postcopy_resume(head) {
                    self.opening = Opening::Ignored;
                    self.head = Vec::new();
                    return;
                }
                self.opening = Opening::Watched;
                let head = std::mem::take(&mut self.head);
                self.scan(&head);
                self.scan(&bytes[take..]);
            }
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // Markers that start in the last bytes of earlier pieces and that this one completes.
        let mut junction = [0u8; 2 * MARKER];
        let head = bytes.len().min(MARKER);
        junction[..self.recent_len].copy_from_slice(&self.recent[..self.recent_len]);
        junction[self.recent_len..self.recent_len + head].copy_from_slice(&bytes[..head]);
        let joined = &junction[..self.recent_len + head];
        let recent_start = self.position - self.recent_len as u64;
        for i in 0..self.recent_len {
            if i + MARKER_AND_BRACE <= joined.len()
                && let Some(end) = vmdesc_end(&joined[i..], recent_start + i as u64)
            {
                remember(&mut self.vmdesc_ends, end);
            }
        }
        // Markers inside this piece; those that run past its end are looked at with the next.
        for at in self.finder.find_iter(bytes) {
            if at + MARKER_AND_BRACE > bytes.len() {
                break;
            }
            if let Some(end) = vmdesc_end(&bytes[at..], self.position + at as u64) {
                remember(&mut self.vmdesc_ends, end);
            }
        }
        // Keep the last bytes.
        if bytes.len() >= MARKER {
            self.recent.copy_from_slice(&bytes[bytes.len() - MARKER..]);
            self.recent_len = MARKER;
        } else {
            let keep = (self.recent_len + bytes.len()).min(MARKER);
            let mut last = [0u8; MARKER];
            let joined = [&self.recent[..self.recent_len], bytes].concat();
            last[..keep].copy_from_slice(&joined[joined.len() - keep..]);
            self.recent = last;
            self.recent_len = keep;
        }
        self.position += bytes.len() as u64;
        let position = self.position;
        self.vmdesc_ends.retain(|&end| end >= position);
    }

    /// How the stream ended, if it has: called once it has.
    pub(crate) fn verdict(&self) -> StreamEnd {
        if self.opening != Opening::Watched || self.recent_len == 0 {
            return StreamEnd::Unknown;
        }
        let recent = &self.recent[..self.recent_len];
        let last = recent[recent.len() - 1];
        if last == b'}' && self.vmdesc_ends.contains(&self.position) {
            return StreamEnd::Finished;
        }
        if recent.len() == MARKER && recent[0] == FOOTER && last == EOF {
            return StreamEnd::Finished;
        }
        if last == EOF && !self.footers {
            return StreamEnd::Unknown;
        }
        StreamEnd::Cut
    }
}

/// If `bytes`, at stream offset `at` with at least [`MARKER_AND_BRACE`] bytes, open like a
/// device description, where its JSON would end.
fn vmdesc_end(bytes: &[u8], at: u64) -> Option<u64> {
    if bytes[0] != EOF || bytes[1] != VMDESCRIPTION || bytes[MARKER] != b'{' {
        return None;
    }
    let len = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    (2..=MAX_VMDESC)
        .contains(&len)
        .then(|| at + MARKER as u64 + u64::from(len))
}

fn remember(ends: &mut Vec<u64>, end: u64) {
    if ends.len() == MAX_CANDIDATES {
        ends.remove(0);
    }
    ends.push(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's end as QEMU writes it in precopy: a device section's footer, EOF, the
    /// device description.
    fn precopy_end(json: &[u8]) -> Vec<u8> {
        let mut end = vec![FOOTER, 0, 0, 0, 3, EOF, VMDESCRIPTION];
        end.extend_from_slice(&(json.len() as u32).to_be_bytes());
        end.extend_from_slice(json);
        end
    }

    /// A stream with a configuration section (footers on), `body` and `end`.
    fn stream(body: &[u8], end: &[u8]) -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.push(CONFIGURATION);
        s.extend_from_slice(&14u32.to_be_bytes());
        s.extend_from_slice(b"pc-i440fx-10.2");
        s.extend_from_slice(body);
        s.extend_from_slice(end);
        s
    }

    /// Feeds `bytes` in pieces of `piece` bytes.
    fn verdict_in_pieces(bytes: &[u8], piece: usize) -> StreamEnd {
        let mut watch = EndWatch::new();
        for chunk in bytes.chunks(piece) {
            watch.feed(chunk);
        }
        watch.verdict()
    }

    /// Bytes that look like guest memory, with markers of device descriptions that are not at
    /// the end among them.
    fn body() -> Vec<u8> {
        let mut body = Vec::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..40_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.push(if i % 7 == 0 { 0 } else { x as u8 });
            if i % 5000 == 0 {
                // A false marker whose JSON would end exactly where the body does, and one
                // whose length runs past the stream.
                body.extend_from_slice(&[EOF, VMDESCRIPTION, 0, 0, 0, 9, b'{']);
                body.extend_from_slice(&[EOF, VMDESCRIPTION, 0, 1, 0, 0, b'{', b'}']);
            }
        }
        body
    }

    #[test]
    fn a_finished_precopy_stream_is_told_in_any_pieces() {
        let json = br#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]}"#;
        let whole = stream(&body(), &precopy_end(json));
        for piece in [1, 2, 3, 5, 6, 7, 13, 4096, whole.len()] {
            assert_eq!(
                verdict_in_pieces(&whole, piece),
                StreamEnd::Finished,
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn a_finished_postcopy_stream_is_told() {
        // RAM's END section, its EOS, its footer, EOF.
        let mut end = vec![0x03, 0, 0, 0, 2];
        end.extend_from_slice(&0x10u64.to_be_bytes());
        end.extend_from_slice(&[FOOTER, 0, 0, 0, 2, EOF]);
        let whole = stream(&body(), &end);
        assert_eq!(verdict_in_pieces(&whole, 1000), StreamEnd::Finished);
        // A resumed postcopy migration opens with a command, not a header.
        let mut resumed = vec![0x08, 0, 10, 0, 4, b'p', b'c', b'.', b'r'];
        resumed.extend_from_slice(&body());
        resumed.extend_from_slice(&end);
        assert_eq!(verdict_in_pieces(&resumed, 3), StreamEnd::Finished);
    }

    #[test]
    fn a_stream_cut_anywhere_else_is_cut_or_unknown_never_finished() {
        let json = br#"{"page_size": 4096, "devices": []}"#;
        let whole = stream(&body(), &precopy_end(json));
        // Cut right after EOF, before the device description: the destination QEMU loads
        // that (the description is only for tools), so that is a finished migration too.
        let after_eof = whole.len() - json.len() - MARKER + 1;
        for cut in (29..whole.len())
            .step_by(97)
            .chain(whole.len() - 60..whole.len())
        {
            let part = &whole[..cut];
            let want = if cut == after_eof {
                StreamEnd::Finished
            } else {
                StreamEnd::Cut
            };
            assert_eq!(
                verdict_in_pieces(part, 777),
                want,
                "cut at {cut} of {}",
                whole.len()
            );
            // Without a configuration section (a machine type before 2.4: no footers either),
            // a cut that ends in a bare 0 cannot be told from EOF.
            let mut old = b"QEVM\0\0\0\x03\x01".to_vec();
            old.extend_from_slice(&part[9 + 5 + 14..]);
            let want = match want {
                StreamEnd::Cut if part[cut - 1] == EOF => StreamEnd::Unknown,
                want => want,
            };
            assert_eq!(
                verdict_in_pieces(&old, 777),
                want,
                "old machine, cut at {cut}"
            );
        }
    }

    #[test]
    fn what_is_not_qemus_stream_is_not_judged() {
        // A TLS handshake record, as QEMU's own TLS opens every connection.
        let mut tls = vec![0x16, 0x03, 0x01, 0x02, 0x00];
        tls.extend_from_slice(&body());
        assert_eq!(verdict_in_pieces(&tls, 100), StreamEnd::Unknown);
        assert_eq!(verdict_in_pieces(b"QEV", 1), StreamEnd::Unknown);
        assert_eq!(verdict_in_pieces(b"QEVM\0\0\0", 1), StreamEnd::Unknown);
        assert_eq!(EndWatch::new().verdict(), StreamEnd::Unknown);
    }

    #[test]
    fn a_watch_started_midway_judges_the_end_alone() {
        let json = br#"{"devices": []}"#;
        let mut watch = EndWatch::watching();
        watch.feed(&precopy_end(json));
        assert_eq!(watch.verdict(), StreamEnd::Finished);
        let mut watch = EndWatch::watching();
        watch.feed(&[1, 2, 3]);
        assert_eq!(watch.verdict(), StreamEnd::Cut);
        let mut watch = EndWatch::watching();
        watch.feed(&[1, 2, 0]);
        assert_eq!(watch.verdict(), StreamEnd::Unknown);
        watch.expect_footers();
        assert_eq!(watch.verdict(), StreamEnd::Cut);
    }

    proptest::proptest! {
        /// The verdict does not depend on how the bytes were cut into pieces, wherever markers
        /// fall: the watch sees every marker start once.
        #[test]
        fn any_pieces_give_the_same_verdict(
            body in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::num::u8::ANY,
                    proptest::strategy::Just(EOF),
                    proptest::strategy::Just(VMDESCRIPTION),
                    proptest::strategy::Just(b'{'),
                    proptest::strategy::Just(b'}'),
                ],
                0..300,
            ),
            json_len in 2u32..40,
            pieces in proptest::collection::vec(1usize..20, 1..40),
        ) {
            // Sometimes a real ending, so that Finished shows up too.
            let mut json = vec![b'x'; json_len as usize];
            json[0] = b'{';
            json[json_len as usize - 1] = b'}';
            for whole in [stream(&body, &[]), stream(&body, &precopy_end(&json))] {
                let mut once = EndWatch::new();
                once.feed(&whole);
                let mut watch = EndWatch::new();
                let mut at = 0;
                for &n in pieces.iter().cycle() {
                    if at >= whole.len() {
                        break;
                    }
                    let end = (at + n).min(whole.len());
                    watch.feed(&whole[at..end]);
                    at = end;
                }
                proptest::prop_assert_eq!(watch.verdict(), once.verdict());
            }
            let mut finished = EndWatch::new();
            finished.feed(&stream(&body, &precopy_end(&json)));
            proptest::prop_assert_eq!(finished.verdict(), StreamEnd::Finished);
        }
    }
}
