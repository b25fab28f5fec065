//! QEMU's return path, read as it passes through a shim: what the destination QEMU says of its
//! migration when it is done.
//!
//! With the `return-path` or `postcopy-ram` capability, the destination QEMU writes messages back
//! on the main channel's connection: be16 type, be16 length, then that many bytes. The first is
//! the PONG to the PING the source sends right after opening the return path; the last, once it
//! has loaded the whole migration, is SHUT with a be32 0 (QEMU 7.2 exits without one when it
//! fails to load, as on a cut stream; a SHUT of 1 also says it failed). The source QEMU waits for
//! SHUT before it reports "completed", and takes a return path that ends without it as a failed
//! migration. The shims relay those bytes untouched; this watch reads them on the way, so that a
//! shim hears the destination QEMU's own word, besides what the stream's last bytes say of the
//! source's (`stream_end.rs`), and even under QEMU's own TLS, where those say nothing.
//!
//! One message is followed by bytes that are not messages: a postcopy migration resumed after a
//! failure asks for the destination's received-page bitmap of each RAM block, and the
//! destination answers RECV_BITMAP (the block's name), then writes the bitmap itself on the
//! return path: be64 size, that many bytes, be64 0x0123456789abcdef (`ramblock_recv_bitmap_send`
//! in QEMU's `migration/ram.c`). The watch steps over it and reads on.
//!
//! The watch never guesses: bytes that are not a well-formed message (a TLS record, with QEMU's
//! own TLS) end it, and it then says nothing.

/// Message types QEMU 7.2 to 10.x send on the return path: SHUT, PONG, REQ_PAGES_ID, REQ_PAGES,
/// RECV_BITMAP, RESUME_ACK, SWITCHOVER_ACK.
const KNOWN_TYPES: std::ops::RangeInclusive<u16> = 1..=7;
const SHUT: u16 = 1;
const RECV_BITMAP: u16 = 5;
/// The be64 that ends a received-page bitmap.
const BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;

/// Where the watch is in a received-page bitmap that follows a RECV_BITMAP message.
#[derive(Debug)]
enum Bitmap {
    /// Reading its be64 size (the bytes so far, and how many).
    Size([u8; 8], usize),
    /// Stepping over its bytes: this many left.
    Bits(u64),
    /// Reading its be64 ending.
    Ending([u8; 8], usize),
}

/// Reads QEMU's return-path messages from the bytes fed to it, in order, in pieces of any size.
#[derive(Debug, Default)]
pub(crate) struct ReturnPathWatch {
    /// The message header being read, and how much of it.
    head: [u8; 4],
    have: usize,
    /// Body bytes of the current message still to come.
    body_left: usize,
    /// The current message is a SHUT, and its value's bytes so far.
    shut: Option<Vec<u8>>,
    /// The current message's type.
    kind: u16,
    /// In the raw bitmap after a RECV_BITMAP message.
    bitmap: Option<Bitmap>,
    /// Whole messages read.
    messages: u64,
    said: Option<u32>,
    lost: bool,
}

impl ReturnPathWatch {
    /// Reads `bytes`, the next ones of the return path.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.bitmap.is_some() {
                bytes = self.step_over_bitmap(bytes);
                continue;
            }
            if self.body_left == 0 {
                let take = (4 - self.have).min(bytes.len());
                self.head[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have < 4 {
                    return;
                }
                self.have = 0;
                let kind = u16::from_be_bytes([self.head[0], self.head[1]]);
                let len = usize::from(u16::from_be_bytes([self.head[2], self.head[3]]));
                if !KNOWN_TYPES.contains(&kind) || (kind == SHUT && len != 4) {
                    self.lost = true;
                    return;
                }
                self.body_left = len;
                self.kind = kind;
                self.shut = (kind == SHUT).then(Vec::new);
                if len == 0 {
                    self.message_read();
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            if let Some(value) = &mut self.shut {
                value.extend_from_slice(&bytes[..take]);
            }
            self.body_left -= take;
            bytes = &bytes[take..];
            if self.body_left == 0 {
                self.message_read();
            }
        }
    }

    /// Reads what it can of the bitmap from `bytes`, returns the rest.
    fn step_over_bitmap<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let be64 = |buf: &mut [u8; 8], have: &mut usize, bytes: &'a [u8]| {
            let take = (8 - *have).min(bytes.len());
            buf[*have..*have + take].copy_from_slice(&bytes[..take]);
            *have += take;
            (
                (*have == 8).then(|| u64::from_be_bytes(*buf)),
                &bytes[take..],
            )
        };
        match self.bitmap.as_mut() {
            Some(Bitmap::Size(buf, have)) => {
                let (size, rest) = be64(buf, have, bytes);
                if let Some(size) = size {
                    self.bitmap = Some(Bitmap::Bits(size));
                }
                rest
            }
            Some(Bitmap::Bits(left)) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                if *left == 0 {
                    self.bitmap = Some(Bitmap::Ending([0; 8], 0));
                }
                &bytes[take as usize..]
            }
            Some(Bitmap::Ending(buf, have)) => {
                let (ending, rest) = be64(buf, have, bytes);
                match ending {
                    Some(BITMAP_ENDING) => self.bitmap = None,
                    Some(_) => self.lost = true,
                    None => {}
                }
                rest
            }
            None => bytes,
        }
    }

    fn message_read(&mut self) {
        self.messages += 1;
        if self.kind == RECV_BITMAP {
            self.bitmap = Some(Bitmap::Size([0; 8], 0));
        }
        if let Some(value) = self.shut.take() {
            self.said = Some(u32::from_be_bytes(
                value.try_into().expect("SHUT's length was checked"),
            ));
        }
    }

    /// What the destination QEMU said, asked once the return path is over: `Some(true)` it
    /// loaded the migration (SHUT 0), `Some(false)` it could not (SHUT 1, or its return path
    /// ended without SHUT), `None` it said nothing this watch could read (no return path, one
    /// that ended before its first message, or bytes that were not return-path messages).
    /// `cut`: the shims' own path failed, so an end without SHUT is not QEMU's word.
    pub(crate) fn loaded(&self, cut: bool) -> Option<bool> {
        if self.lost {
            return None;
        }
        match self.said {
            Some(value) => Some(value == 0),
            None if self.messages > 0 && !cut => Some(false),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = kind.to_be_bytes().to_vec();
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn return_path(shut: u32) -> Vec<u8> {
        let mut bytes = message(2, &7u32.to_be_bytes()); // PONG
        // REQ_PAGES_ID: start, length, block name.
        let mut req = 0x2000u64.to_be_bytes().to_vec();
        req.extend_from_slice(&4096u32.to_be_bytes());
        req.push(6);
        req.extend_from_slice(b"pc.ram");
        bytes.extend(message(3, &req));
        bytes.extend(message(4, &[0; 12])); // REQ_PAGES
        bytes.extend(message(1, &shut.to_be_bytes()));
        bytes
    }

    #[test]
    fn shut_says_whether_the_destination_loaded_the_migration() {
        for (shut, loaded) in [(0, true), (1, false)] {
            let bytes = return_path(shut);
            let mut whole = ReturnPathWatch::default();
            whole.feed(&bytes);
            assert_eq!(whole.loaded(false), Some(loaded));
            // What QEMU said stands even when the path broke afterwards.
            assert_eq!(whole.loaded(true), Some(loaded));
            // The same, a byte at a time.
            let mut split = ReturnPathWatch::default();
            for b in &bytes {
                split.feed(std::slice::from_ref(b));
            }
            assert_eq!(split.loaded(false), Some(loaded));
        }
    }

    #[test]
    fn a_return_path_that_ends_without_shut_says_the_destination_failed() {
        // QEMU 7.2 exits without SHUT when it cannot load the stream.
        let mut pong_only = ReturnPathWatch::default();
        pong_only.feed(&message(2, &1u32.to_be_bytes()));
        assert_eq!(pong_only.loaded(false), Some(false));
        // Cut in the middle of SHUT itself.
        let shut = message(1, &0u32.to_be_bytes());
        let mut cut = ReturnPathWatch::default();
        cut.feed(&message(2, &1u32.to_be_bytes()));
        cut.feed(&shut[..6]);
        assert_eq!(cut.loaded(false), Some(false));
        // Unless the shims' own path was cut: then QEMU never got to say.
        assert_eq!(cut.loaded(true), None);
        // A message with no body (SWITCHOVER_ACK) counts like any other.
        let mut ack = ReturnPathWatch::default();
        ack.feed(&message(7, &[]));
        assert_eq!(ack.loaded(false), Some(false));
        ack.feed(&shut);
        assert_eq!(ack.loaded(false), Some(true));
    }

    /// A resumed postcopy migration's return path: the destination answers RECV_BITMAP with the
    /// block's name, then the bitmap itself, raw; then RESUME_ACK, page requests and SHUT.
    fn resumed(ending: u64) -> Vec<u8> {
        let mut bytes = message(5, b"\x06pc.ram");
        bytes.extend_from_slice(&24u64.to_be_bytes());
        // Bitmap bytes that would read as messages (a SHUT 1 among them).
        bytes.extend_from_slice(&message(1, &1u32.to_be_bytes()));
        bytes.extend_from_slice(&[0xff; 16]);
        bytes.extend_from_slice(&ending.to_be_bytes());
        bytes.extend(message(6, &1u32.to_be_bytes())); // RESUME_ACK
        bytes.extend(message(4, &[0; 12])); // REQ_PAGES
        bytes.extend(message(1, &0u32.to_be_bytes()));
        bytes
    }

    #[test]
    fn a_resumed_migrations_bitmap_is_stepped_over() {
        let bytes = resumed(BITMAP_ENDING);
        for piece in [1, 3, 7, bytes.len()] {
            let mut watch = ReturnPathWatch::default();
            for chunk in bytes.chunks(piece) {
                watch.feed(chunk);
            }
            assert_eq!(watch.loaded(false), Some(true), "pieces of {piece}");
        }
        // A bitmap without its ending is not what the watch thinks: it says nothing.
        let mut watch = ReturnPathWatch::default();
        watch.feed(&resumed(7));
        assert_eq!(watch.loaded(false), None);
    }

    #[test]
    fn bytes_that_are_not_return_path_messages_say_nothing() {
        // QEMU's TLS: a handshake record, then anything, even what looks like a SHUT.
        let mut tls = ReturnPathWatch::default();
        tls.feed(&[0x16, 0x03, 0x03, 0x00, 0x2a]);
        tls.feed(&message(1, &1u32.to_be_bytes()));
        assert_eq!(tls.loaded(false), None);
        // An unknown message type, and a SHUT of the wrong length.
        for bytes in [message(9, &[0; 4]), message(1, &[0; 8])] {
            let mut w = ReturnPathWatch::default();
            w.feed(&bytes);
            w.feed(&message(1, &0u32.to_be_bytes()));
            assert_eq!(w.loaded(false), None);
        }
        // Nothing at all.
        assert_eq!(ReturnPathWatch::default().loaded(false), None);
    }
}
