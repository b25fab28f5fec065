//! The control protocol: messages between the two ends of a session, as bytes.
//!
//! Sans-IO: [`Message::encode`] appends a message to a buffer, [`MessageReader`] pulls whole
//! messages out of whatever bytes arrive. Every message is framed the same way, little-endian:
//!
//! ```text
//!  u32 length of (type + payload) | u8 type | payload
//! ```
//!
//! The length is checked against [`MAX_MESSAGE_LEN`] before anything is allocated. The first
//! message on the control connection is `Hello`; the first on a data connection is `Join`.
//! Type 0 is invalid.

use std::fmt;

use pagecodec::{MemoryLayout, PAGE_SIZE};

/// Magic bytes at the start of `Hello` and `Join`.
pub const MAGIC: [u8; 4] = *b"PSTP";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Feature bits this build knows. None are defined yet in version 1.
pub const KNOWN_FEATURES: u32 = 0;
/// Largest control message (type and payload).
pub const MAX_MESSAGE_LEN: u32 = 8 << 20;
/// Largest blob payload in one message; larger blobs are sent in chunks.
pub const MAX_BLOB_CHUNK: usize = 4 << 20;
/// Most data channels a session may have.
pub const MAX_CHANNELS: u16 = 256;
/// Bytes of a session id.
pub const SESSION_ID_LEN: usize = 16;

/// A session's random identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; SESSION_ID_LEN]);

impl SessionId {
    /// A fresh random id, from the kernel's random source.
    pub fn random() -> std::io::Result<Self> {
        use std::io::Read;
        let mut id = [0u8; SESSION_ID_LEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
        Ok(Self(id))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Opens a session (source to destination, first message on the control connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the source.
    pub version: u16,
    /// Feature bits the source requires.
    pub features: u32,
    /// Page size of the guest.
    pub page_size: u32,
    /// Data channels the source will open.
    pub channels: u16,
    /// The session's id; data channels present it.
    pub session_id: SessionId,
    /// Guest memory regions, in pages.
    pub layout: MemoryLayout,
}

/// Joins a data connection to a session (first message on a data connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Join {
    /// Protocol version of the source.
    pub version: u16,
    /// The session joined.
    pub session_id: SessionId,
    /// Index of this channel, below the session's channel count.
    pub channel: u16,
}

/// A control or data-connection message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// The destination accepts the session.
    Welcome {
        /// Protocol version the destination speaks.
        version: u16,
    },
    /// The destination refuses the session.
    Refuse {
        /// Why, in words.
        reason: String,
    },
    /// See [`Join`].
    Join(Join),
    /// End of a pass: every channel has sent `frames[i]` frames so far.
    PassEnd {
        /// The pass.
        generation: u32,
        /// Frames sent on each channel (its next sequence number).
        frames: Vec<u64>,
    },
    /// The destination applied every page of the pass.
    PassApplied {
        /// The pass.
        generation: u32,
    },
    /// Opaque data (device state, configuration), ordered after every barrier before it.
    Blob {
        /// Caller-defined kind of blob.
        tag: u32,
        /// Whether more chunks of the same blob follow.
        more: bool,
        /// The data.
        data: Vec<u8>,
    },
    /// The source has sent everything: `frames[i]` frames on channel `i`, End frames included.
    Finish {
        /// Frames per channel.
        frames: Vec<u64>,
    },
    /// The destination applied everything and every stream ended correctly.
    Complete {
        /// Pages applied.
        pages: u64,
    },
    /// The session failed.
    Error {
        /// The channel concerned, if any.
        channel: Option<u16>,
        /// What happened, in words.
        message: String,
    },
    /// Heartbeat.
    Ping(u64),
    /// Heartbeat answer.
    Pong(u64),
    /// How busy the destination's decoder of each channel was recently, in thousandths of the
    /// time: tells the source whether the far end or the link holds it back.
    Feedback {
        /// Busy share per channel, 0 to 1000.
        busy_permille: Vec<u16>,
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const JOIN: u8 = 4;
    pub const PASS_END: u8 = 5;
    pub const PASS_APPLIED: u8 = 6;
    pub const BLOB: u8 = 7;
    pub const FINISH: u8 = 8;
    pub const COMPLETE: u8 = 9;
    pub const ERROR: u8 = 10;
    pub const PING: u8 = 11;
    pub const PONG: u8 = 12;
    pub const FEEDBACK: u8 = 13;
}

/// A message that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    /// Longer than [`MAX_MESSAGE_LEN`].
    #[error("control message of {len} bytes exceeds the limit of {MAX_MESSAGE_LEN}")]
    TooLong {
        /// Length announced.
        len: u32,
    },
    /// A type this version does not define.
    #[error("unknown control message type {kind}")]
    UnknownKind {
        /// Type byte.
        kind: u8,
    },
    /// The payload does not match its type.
    #[error("malformed {what} message: {problem}")]
    Malformed {
        /// Message type.
        what: &'static str,
        /// What was wrong.
        problem: String,
    },
    /// Not a pagestream peer.
    #[error("peer is not a pagestream transport (magic {found:02x?})")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
}

struct Cursor<'a> {
    what: &'static str,
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn malformed(&self, problem: impl Into<String>) -> MessageError {
        MessageError::Malformed {
            what: self.what,
            problem: problem.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        if self.bytes.len() < n {
            return Err(self.malformed("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, MessageError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn magic(&mut self) -> Result<(), MessageError> {
        let found: [u8; 4] = self.take(4)?.try_into().expect("4 bytes");
        if found != MAGIC {
            return Err(MessageError::BadMagic { found });
        }
        Ok(())
    }

    fn session_id(&mut self) -> Result<SessionId, MessageError> {
        Ok(SessionId(
            self.take(SESSION_ID_LEN)?.try_into().expect("id length"),
        ))
    }

    fn string(&mut self) -> Result<String, MessageError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// A count followed by that many u64, the count capped by what the message can hold.
    fn u64_list(&mut self) -> Result<Vec<u64>, MessageError> {
        let n = self.u16()? as usize;
        if n > self.bytes.len() / 8 {
            return Err(self.malformed(format!("list of {n} entries does not fit")));
        }
        (0..n).map(|_| self.u64()).collect()
    }

    fn end(&self) -> Result<(), MessageError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} trailing bytes", self.bytes.len())))
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    // Messages are capped; so are the strings in them.
    let s = &s.as_bytes()[..s.len().min(64 << 10)];
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_u64_list(out: &mut Vec<u8>, list: &[u64]) {
    out.extend_from_slice(&(list.len() as u16).to_le_bytes());
    for v in list {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Refuse { .. } => "Refuse",
            Message::Join(_) => "Join",
            Message::PassEnd { .. } => "PassEnd",
            Message::PassApplied { .. } => "PassApplied",
            Message::Blob { .. } => "Blob",
            Message::Finish { .. } => "Finish",
            Message::Complete { .. } => "Complete",
            Message::Error { .. } => "Error",
            Message::Ping(_) => "Ping",
            Message::Pong(_) => "Pong",
            Message::Feedback { .. } => "Feedback",
        }
    }

    /// Appends the framed message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Message::Hello(h) => {
                out.push(kind::HELLO);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&h.features.to_le_bytes());
                out.extend_from_slice(&h.page_size.to_le_bytes());
                out.extend_from_slice(&h.channels.to_le_bytes());
                out.extend_from_slice(&h.session_id.0);
                out.extend_from_slice(&(h.layout.region_count() as u32).to_le_bytes());
                for pages in h.layout.region_pages() {
                    out.extend_from_slice(&pages.to_le_bytes());
                }
            }
            Message::Welcome { version } => {
                out.push(kind::WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
            }
            Message::Refuse { reason } => {
                out.push(kind::REFUSE);
                put_string(out, reason);
            }
            Message::Join(j) => {
                out.push(kind::JOIN);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&j.version.to_le_bytes());
                out.extend_from_slice(&j.session_id.0);
                out.extend_from_slice(&j.channel.to_le_bytes());
            }
            Message::PassEnd { generation, frames } => {
                out.push(kind::PASS_END);
                out.extend_from_slice(&generation.to_le_bytes());
                put_u64_list(out, frames);
            }
            Message::PassApplied { generation } => {
                out.push(kind::PASS_APPLIED);
                out.extend_from_slice(&generation.to_le_bytes());
            }
            Message::Blob { tag, more, data } => {
                out.push(kind::BLOB);
                out.extend_from_slice(&tag.to_le_bytes());
                out.push(u8::from(*more));
                out.extend_from_slice(data);
            }
            Message::Finish { frames } => {
                out.push(kind::FINISH);
                put_u64_list(out, frames);
            }
            Message::Complete { pages } => {
                out.push(kind::COMPLETE);
                out.extend_from_slice(&pages.to_le_bytes());
            }
            Message::Error { channel, message } => {
                out.push(kind::ERROR);
                out.extend_from_slice(&channel.unwrap_or(u16::MAX).to_le_bytes());
                put_string(out, message);
            }
            Message::Ping(nonce) => {
                out.push(kind::PING);
                out.extend_from_slice(&nonce.to_le_bytes());
            }
            Message::Pong(nonce) => {
                out.push(kind::PONG);
                out.extend_from_slice(&nonce.to_le_bytes());
            }
            Message::Feedback { busy_permille } => {
                out.push(kind::FEEDBACK);
                out.extend_from_slice(&(busy_permille.len() as u16).to_le_bytes());
                for v in busy_permille {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes one message from its type byte and payload (the length prefix removed).
    pub fn decode(kind_byte: u8, payload: &[u8]) -> Result<Message, MessageError> {
        let name = match kind_byte {
            kind::HELLO => "Hello",
            kind::WELCOME => "Welcome",
            kind::REFUSE => "Refuse",
            kind::JOIN => "Join",
            kind::PASS_END => "PassEnd",
            kind::PASS_APPLIED => "PassApplied",
            kind::BLOB => "Blob",
            kind::FINISH => "Finish",
            kind::COMPLETE => "Complete",
            kind::ERROR => "Error",
            kind::PING => "Ping",
            kind::PONG => "Pong",
            kind::FEEDBACK => "Feedback",
            _ => return Err(MessageError::UnknownKind { kind: kind_byte }),
        };
        let mut c = Cursor {
            what: name,
            bytes: payload,
        };
        let message = match kind_byte {
            kind::HELLO => {
                c.magic()?;
                let version = c.u16()?;
                let features = c.u32()?;
                let page_size = c.u32()?;
                let channels = c.u16()?;
                let session_id = c.session_id()?;
                let regions = c.u32()? as usize;
                if regions > pagecodec::page::MAX_REGIONS || regions > c.bytes.len() / 8 {
                    return Err(c.malformed(format!("{regions} memory regions")));
                }
                let pages = (0..regions)
                    .map(|_| c.u64())
                    .collect::<Result<Vec<_>, _>>()?;
                let layout = MemoryLayout::new(pages).map_err(|e| c.malformed(e.to_string()))?;
                Message::Hello(Hello {
                    version,
                    features,
                    page_size,
                    channels,
                    session_id,
                    layout,
                })
            }
            kind::WELCOME => Message::Welcome { version: c.u16()? },
            kind::REFUSE => Message::Refuse {
                reason: c.string()?,
            },
            kind::JOIN => {
                c.magic()?;
                Message::Join(Join {
                    version: c.u16()?,
                    session_id: c.session_id()?,
                    channel: c.u16()?,
                })
            }
            kind::PASS_END => Message::PassEnd {
                generation: c.u32()?,
                frames: c.u64_list()?,
            },
            kind::PASS_APPLIED => Message::PassApplied {
                generation: c.u32()?,
            },
            kind::BLOB => {
                let tag = c.u32()?;
                let more = match c.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(c.malformed(format!("chunk flag {other}"))),
                };
                let data = std::mem::take(&mut c.bytes).to_vec();
                Message::Blob { tag, more, data }
            }
            kind::FINISH => Message::Finish {
                frames: c.u64_list()?,
            },
            kind::COMPLETE => Message::Complete { pages: c.u64()? },
            kind::ERROR => {
                let channel = c.u16()?;
                Message::Error {
                    channel: (channel != u16::MAX).then_some(channel),
                    message: c.string()?,
                }
            }
            kind::PING => Message::Ping(c.u64()?),
            kind::PONG => Message::Pong(c.u64()?),
            kind::FEEDBACK => {
                let n = c.u16()? as usize;
                if n > c.bytes.len() / 2 {
                    return Err(c.malformed(format!("list of {n} entries does not fit")));
                }
                let busy_permille = (0..n)
                    .map(|_| c.u16().map(|v| v.min(1000)))
                    .collect::<Result<_, _>>()?;
                Message::Feedback { busy_permille }
            }
            _ => unreachable!("kind checked above"),
        };
        c.end()?;
        Ok(message)
    }
}

/// Pulls whole messages out of a byte stream fed in pieces.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
}

impl MessageReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// How many more bytes are needed before the next message can be decoded (0 if one is
    /// ready). Fails at once if the announced length is over the limit.
    pub fn needed(&self) -> Result<usize, MessageError> {
        if self.buf.len() < 5 {
            return Ok(5 - self.buf.len());
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_MESSAGE_LEN {
            return Err(MessageError::TooLong { len });
        }
        Ok((4 + len as usize).saturating_sub(self.buf.len()))
    }

    /// The next whole message, if it has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, MessageError> {
        if self.needed()? > 0 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        let message = Message::decode(self.buf[4], &self.buf[5..4 + len]);
        self.buf.drain(..4 + len);
        message.map(Some)
    }
}

/// Limits a destination puts on the sessions it accepts.
#[derive(Clone, Debug)]
pub struct AcceptLimits {
    /// Most data channels.
    pub max_channels: u16,
    /// Largest guest memory, in bytes.
    pub max_memory_bytes: u64,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            max_channels: 64,
            max_memory_bytes: 16 << 40,
        }
    }
}

/// Checks a `Hello` against what this build and `limits` accept; `Err` is the reason to refuse.
pub fn check_hello(hello: &Hello, limits: &AcceptLimits) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not supported (this destination speaks version {PROTOCOL_VERSION})",
            hello.version
        ));
    }
    let unknown = hello.features & !KNOWN_FEATURES;
    if unknown != 0 {
        return Err(format!(
            "feature bits {unknown:#x} are not supported by this destination"
        ));
    }
    if hello.page_size as usize != PAGE_SIZE {
        return Err(format!(
            "page size {} is not supported (this destination handles {PAGE_SIZE})",
            hello.page_size
        ));
    }
    if hello.channels == 0 || hello.channels > limits.max_channels.min(MAX_CHANNELS) {
        return Err(format!(
            "{} data channels requested; this destination accepts 1 to {}",
            hello.channels,
            limits.max_channels.min(MAX_CHANNELS)
        ));
    }
    let memory = u128::from(hello.layout.total_pages()) * PAGE_SIZE as u128;
    if memory > u128::from(limits.max_memory_bytes) {
        return Err(format!(
            "guest memory of {memory} bytes exceeds this destination's limit of {} bytes",
            limits.max_memory_bytes
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            page_size: PAGE_SIZE as u32,
            channels: 4,
            session_id: SessionId([7; SESSION_ID_LEN]),
            layout: MemoryLayout::new(vec![100, 200]).unwrap(),
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(hello()),
            Message::Welcome { version: 1 },
            Message::Refuse {
                reason: "no".into(),
            },
            Message::Join(Join {
                version: 1,
                session_id: SessionId([3; SESSION_ID_LEN]),
                channel: 2,
            }),
            Message::PassEnd {
                generation: 3,
                frames: vec![1, 2, 3],
            },
            Message::PassApplied { generation: 3 },
            Message::Blob {
                tag: 9,
                more: true,
                data: vec![1, 2, 3],
            },
            Message::Finish { frames: vec![5, 6] },
            Message::Complete { pages: 77 },
            Message::Error {
                channel: Some(1),
                message: "boom".into(),
            },
            Message::Error {
                channel: None,
                message: String::new(),
            },
            Message::Ping(1),
            Message::Pong(2),
            Message::Feedback {
                busy_permille: vec![0, 500, 1000],
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_byte_stream() {
        let mut bytes = Vec::new();
        for m in all_messages() {
            m.encode(&mut bytes);
        }
        let mut reader = MessageReader::new();
        let mut decoded = Vec::new();
        // Feed byte by byte: messages must come out whole, whatever the fragmentation.
        for b in bytes {
            reader.feed(&[b]);
            while let Some(m) = reader.next_message().unwrap() {
                decoded.push(m);
            }
        }
        assert_eq!(decoded, all_messages());
    }

    #[test]
    fn bad_messages_are_refused() {
        let mut reader = MessageReader::new();
        reader.feed(&u32::MAX.to_le_bytes());
        reader.feed(&[1]);
        assert!(matches!(
            reader.next_message(),
            Err(MessageError::TooLong { .. })
        ));
        assert!(matches!(
            Message::decode(99, &[]),
            Err(MessageError::UnknownKind { kind: 99 })
        ));
        assert!(matches!(
            Message::decode(kind::HELLO, b"XXXX"),
            Err(MessageError::BadMagic { .. })
        ));
        assert!(matches!(
            Message::decode(kind::PING, &[1, 2]),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            Message::decode(kind::PONG, &[0; 9]),
            Err(MessageError::Malformed { .. })
        ));
        // A list that claims more entries than the message holds.
        assert!(matches!(
            Message::decode(kind::FINISH, &[0xff, 0xff, 0, 0]),
            Err(MessageError::Malformed { .. })
        ));
    }

    #[test]
    fn hello_checks() {
        let limits = AcceptLimits::default();
        assert_eq!(check_hello(&hello(), &limits), Ok(()));
        let mut h = hello();
        h.version = 2;
        assert!(
            check_hello(&h, &limits)
                .unwrap_err()
                .contains("protocol version 2")
        );
        let mut h = hello();
        h.features = 4;
        assert!(
            check_hello(&h, &limits)
                .unwrap_err()
                .contains("feature bits 0x4")
        );
        let mut h = hello();
        h.page_size = 65536;
        assert!(check_hello(&h, &limits).unwrap_err().contains("page size"));
        let mut h = hello();
        h.channels = 0;
        assert!(
            check_hello(&h, &limits)
                .unwrap_err()
                .contains("data channels")
        );
        let small = AcceptLimits {
            max_memory_bytes: 4096,
            ..AcceptLimits::default()
        };
        assert!(
            check_hello(&hello(), &small)
                .unwrap_err()
                .contains("exceeds")
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(kind in proptest::prelude::any::<u8>(), payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = Message::decode(kind, &payload);
        }
    }
}
