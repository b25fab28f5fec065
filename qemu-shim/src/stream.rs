//! QEMU's precopy migration stream, parsed as it flows (sans-IO: no sockets, threads or clocks).
//!
//! The source shim feeds the bytes QEMU writes into a [`Parser`], which hands back
//! [`Event`]s: RAM pages (with their block and offset), and everything else as bytes to carry
//! unchanged, in order. The destination shim rebuilds a stream QEMU accepts from those: the bytes
//! as they came, each page as a fresh record ([`write_page_record`]) written before the bytes
//! that followed it. The format is described in `../shared/docs/qemu-migration-stream.md`; the
//! parts this module relies on:
//!
//! ```text
//! header         "QEVM" | be32 3
//! configuration  0x07 | be32 len | machine type | (0x05 subsection)*
//! command        0x08 | be16 cmd | be16 len | data
//! START / FULL   type | be32 section id | u8 len | idstr | be32 instance | be32 version | payload
//! PART / END     type | be32 section id | payload
//! footer         0x7E | be32 section id        (after every START, PART, END, FULL payload)
//! RAM payload    records: be64 offset|flags, [u8 len | block idstr unless CONTINUE], body
//!                MEM_SIZE (START only): the RAM blocks and their used lengths
//!                ZERO: u8 fill byte;  PAGE: 4096 bytes;  EOS: ends the section's records
//! ```
//!
//! The parser never guesses. Whatever it does not understand completely (another iterable
//! device than RAM, postcopy, XBZRLE or compressed pages, an unknown flag, a record that does
//! not fit the RAM blocks) ends parsing: an [`Event::PassThrough`] says why, and every byte from
//! the first one it did not understand comes as [`Event::Bytes`]. The device state after the
//! RAM's END carries no lengths (only the trailing vmdesc JSON describes it), so the parser
//! passes it through too, as expected. What passes through is read for its last bytes
//! (`stream_end.rs`), which say whether QEMU finished the stream or stopped midway.
//!
//! Invariant, relied on by the shims and checked by the tests: every input byte is accounted for
//! exactly once, either inside [`Event::Bytes`] or as the `record_len` of a page event.

use crate::stream_end::{EndWatch, StreamEnd};

/// Page size of the x86-64 targets the shim supports.
pub const TARGET_PAGE_SIZE: usize = 4096;

/// The most bytes one item can need in hand at once (a command with the largest data). The
/// caller must offer at least this much input whenever it has that much, or the parser cannot
/// move on.
pub const MAX_ITEM: usize = 5 + u16::MAX as usize;

pub(crate) const QEVM: &[u8; 4] = b"QEVM";
const STREAM_VERSION: u32 = 3;

pub(crate) const SECTION_EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
pub(crate) const VMDESCRIPTION: u8 = 0x06;
pub(crate) const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
pub(crate) const FOOTER: u8 = 0x7E;

const CMD_OPEN_RETURN_PATH: u16 = 1;
const CMD_PING: u16 = 2;
const CMD_POSTCOPY_RESUME: u16 = 9;
const CMD_RECV_BITMAP: u16 = 10;
const CMD_SWITCHOVER_START: u16 = 11;

/// Whether `head`, a connection's first bytes, opens a postcopy migration resumed after a
/// failure (QMP `migrate` with `resume: true`): the source QEMU sends no header then, and starts
/// with a command, RECV_BITMAP for each RAM block (or POSTCOPY_RESUME when it has none to ask).
pub(crate) fn opens_postcopy_resume(head: &[u8]) -> bool {
    matches!(head, [COMMAND, a, b, ..]
        if matches!(u16::from_be_bytes([*a, *b]), CMD_RECV_BITMAP | CMD_POSTCOPY_RESUME))
}

/// The machine type a stream's configuration section names, if `head` (the stream's first
/// bytes) holds it: header, then `0x07`, be32 length, the name.
pub(crate) fn machine_type(head: &[u8]) -> Option<&str> {
    let rest = head.strip_prefix(QEVM.as_slice())?.get(4..)?;
    let (&CONFIGURATION, rest) = rest.split_first()? else {
        return None;
    };
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    printable(rest.get(4..4 + len)?)
}

/// RAM record flags (the low bits of a record's be64 header).
pub mod flags {
    /// Obsolete full-page marker.
    pub const FULL: u64 = 0x01;
    /// A page filled with one byte (always 0 in practice).
    pub const ZERO: u64 = 0x02;
    /// The RAM block list (START section only).
    pub const MEM_SIZE: u64 = 0x04;
    /// A page's bytes follow.
    pub const PAGE: u64 = 0x08;
    /// End of the section's records.
    pub const EOS: u64 = 0x10;
    /// Same block as the previous record: no idstr.
    pub const CONTINUE: u64 = 0x20;
    /// An XBZRLE delta against the destination's current page.
    pub const XBZRLE: u64 = 0x40;
    /// RDMA hook.
    pub const HOOK: u64 = 0x80;
    /// A zlib-compressed page (QEMU 7.2's `compress` capability).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// multifd flush (QEMU 8.x and later).
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

const FLAG_MASK: u64 = (TARGET_PAGE_SIZE as u64) - 1;

/// RAM section version QEMU 7.2 through 10.x write.
const RAM_SECTION_VERSION: u32 = 4;

/// Largest number of RAM blocks accepted (the codec's region limit).
pub const MAX_RAM_BLOCKS: usize = pagecodec::page::MAX_REGIONS;

/// A RAM block as the stream's START section lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's idstr (`pc.ram`, `/rom@etc/acpi/tables`...).
    pub name: String,
    /// Bytes of the block in use.
    pub used_length: u64,
}

impl RamBlock {
    /// Target pages the block spans.
    pub fn pages(&self) -> u64 {
        self.used_length.div_ceil(TARGET_PAGE_SIZE as u64)
    }
}

/// What the parser found.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Bytes to carry unchanged, in order.
    Bytes(&'a [u8]),
    /// The RAM blocks, from the RAM section's START: known before any page.
    RamBlocks(&'a [RamBlock]),
    /// A page's content: block `block` (index into the RAM blocks), byte `offset` in it.
    Page {
        /// Index of the block.
        block: usize,
        /// Byte offset in the block (page aligned).
        offset: u64,
        /// The page's bytes.
        data: &'a [u8],
        /// Bytes the record took in the stream.
        record_len: usize,
    },
    /// A page filled with one byte (QEMU's ZERO record; the byte is always 0 in practice).
    Fill {
        /// Index of the block.
        block: usize,
        /// Byte offset in the block (page aligned).
        offset: u64,
        /// The fill byte.
        byte: u8,
        /// Bytes the record took in the stream.
        record_len: usize,
    },
    /// The RAM section's end-of-section marker (EOS) was in the bytes emitted just before: the
    /// destination QEMU has loaded every page before it once it reads it (with multifd, a
    /// barrier across all channels).
    RamSectionEnd,
    /// From here on the parser carries everything as bytes. `expected` is true where that is
    /// the normal course of a stream (the device state after RAM, the end of the stream).
    PassThrough {
        /// Why, for people.
        reason: String,
        /// Whether this is the normal course of a stream rather than something unsupported.
        expected: bool,
        /// Stream offset of the first byte carried this way.
        at: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Configuration,
    ConfigSubsections,
    Top,
    /// In a RAM section; `start`: the MEM_SIZE record must come first.
    Records {
        section: u32,
        start: bool,
    },
    /// Reading the RAM block list; `remaining` bytes of RAM still to be listed.
    MemSize {
        section: u32,
        remaining: u64,
    },
    Footer {
        section: u32,
    },
    PassThrough,
}

/// One step's outcome, with offsets relative to the input it looked at.
enum Item {
    /// Not enough input for the next item.
    NeedMore,
    /// `n` bytes to carry as they are.
    Bytes(usize),
    /// `n` bytes to carry, after which the RAM block list is complete.
    BlocksDone(usize),
    /// The `n` bytes of a RAM section's end-of-section record, to carry.
    SectionEnd(usize),
    Page {
        block: usize,
        offset: u64,
        data_at: usize,
        len: usize,
    },
    Fill {
        block: usize,
        offset: u64,
        byte: u8,
        len: usize,
    },
    /// Nothing consumed; pass everything through from here.
    Stop { reason: String, expected: bool },
}

/// A cursor over input that may end early: every read returns `None` when the item is not
/// complete yet.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn be16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_be_bytes(b.try_into().expect("2 bytes")))
    }

    fn be32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    fn be64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    /// A u8-length-prefixed string (QEMU's idstr encoding).
    fn short_str(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }
}

fn stop(reason: impl Into<String>) -> Item {
    Item::Stop {
        reason: reason.into(),
        expected: false,
    }
}

fn printable(name: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(name).ok()?;
    (!s.is_empty() && s.chars().all(|c| !c.is_control())).then_some(s)
}

fn flag_name(flags: u64) -> &'static str {
    let base = flags & !flags::CONTINUE;
    match base {
        flags::FULL => "FULL (obsolete)",
        flags::MEM_SIZE => "MEM_SIZE outside the START section",
        flags::XBZRLE => "XBZRLE (delta against the destination's page)",
        flags::HOOK => "HOOK (RDMA)",
        flags::COMPRESS_PAGE => "COMPRESS_PAGE (zlib, the compress capability)",
        flags::MULTIFD_FLUSH => "MULTIFD_FLUSH",
        _ => "an unknown combination",
    }
}

/// The stream parser of the source shim. See the module documentation.
#[derive(Debug)]
pub struct Parser {
    state: State,
    blocks: Vec<RamBlock>,
    ram_section: Option<u32>,
    /// The block of the previous record: QEMU's loader keeps it across sections.
    last_block: Option<usize>,
    /// Stream bytes consumed so far.
    position: u64,
    /// Once passing through: whether that is the normal course of a stream.
    passed_through_expected: Option<bool>,
    /// Reads what passes through, to tell at the end whether QEMU finished the stream.
    end: EndWatch,
}

/// How far the parser followed a stream that ended ([`Parser::finish`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It ends as a finished migration's stream does (`stream_end.rs`).
    Finished,
    /// Past the RAM phase, in the device state or at the end of the stream, where a
    /// migration's stream ends (the parser follows it no further), and its last bytes do not
    /// say whether it is whole.
    AfterRam,
    /// Before the device state: the source QEMU stopped sending before the end of its
    /// migration, which it cancelled or which failed there. The destination QEMU cannot load
    /// such a stream.
    Early,
    /// The parser had stopped following the stream before, at something it does not
    /// understand, and its last bytes do not say whether it is whole: only the destination
    /// QEMU can tell.
    NotFollowed,
    /// Past where the parser follows the stream, its last bytes are not the end of a
    /// migration (`stream_end.rs`): the source QEMU stopped midway, in its device state
    /// or wherever the parser stopped following.
    Cut,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self {
            state: State::Header,
            blocks: Vec::new(),
            ram_section: None,
            last_block: None,
            position: 0,
            passed_through_expected: None,
            end: EndWatch::watching(),
        }
    }

    /// The RAM blocks listed so far.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Whether the parser has stopped understanding the stream and passes everything through.
    pub fn passing_through(&self) -> bool {
        self.state == State::PassThrough
    }

    /// Stream bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Parses as many whole items of `input` as it holds, calling `emit` for each event, and
    /// returns the bytes consumed. The caller keeps the rest and offers it again with more
    /// input appended (at least [`MAX_ITEM`] bytes at a time when it has them). Consecutive
    /// bytes to carry come as one [`Event::Bytes`]. It returns early right after
    /// [`Event::RamBlocks`], so that the caller can set up for pages before any comes: call it
    /// again until it consumes nothing.
    pub fn parse(&mut self, input: &[u8], emit: &mut dyn FnMut(Event<'_>)) -> usize {
        let mut pos = 0;
        // Start of a run of bytes to carry that has not been emitted yet.
        let mut run = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match self.step(rest) {
                Item::NeedMore => break,
                Item::Bytes(n) => pos += n,
                Item::SectionEnd(n) => {
                    pos += n;
                    emit(Event::Bytes(&input[run..pos]));
                    run = pos;
                    emit(Event::RamSectionEnd);
                }
                Item::BlocksDone(n) => {
                    pos += n;
                    emit(Event::Bytes(&input[run..pos]));
                    run = pos;
                    emit(Event::RamBlocks(&self.blocks));
                    // Let the caller set up for the pages before any comes.
                    break;
                }
                Item::Page {
                    block,
                    offset,
                    data_at,
                    len,
                } => {
                    if run < pos {
                        emit(Event::Bytes(&input[run..pos]));
                    }
                    let data = &rest[data_at..data_at + TARGET_PAGE_SIZE];
                    emit(Event::Page {
                        block,
                        offset,
                        data,
                        record_len: len,
                    });
                    pos += len;
                    run = pos;
                }
                Item::Fill {
                    block,
                    offset,
                    byte,
                    len,
                } => {
                    if run < pos {
                        emit(Event::Bytes(&input[run..pos]));
                    }
                    emit(Event::Fill {
                        block,
                        offset,
                        byte,
                        record_len: len,
                    });
                    pos += len;
                    run = pos;
                }
                Item::Stop { reason, expected } => {
                    if run < pos {
                        emit(Event::Bytes(&input[run..pos]));
                    }
                    run = pos;
                    self.state = State::PassThrough;
                    self.passed_through_expected = Some(expected);
                    emit(Event::PassThrough {
                        reason,
                        expected,
                        at: self.position + pos as u64,
                    });
                }
            }
        }
        if run < pos {
            emit(Event::Bytes(&input[run..pos]));
        }
        self.position += pos as u64;
        pos
    }

    /// Parses every whole item `held` holds, calling [`Parser::parse`] until it consumes nothing
    /// (past the early return after the block list too), and removes what it consumed: the
    /// rest waits in `held` for more input.
    pub fn parse_all(&mut self, held: &mut Vec<u8>, emit: &mut dyn FnMut(Event<'_>)) {
        loop {
            let n = self.parse(held, emit);
            held.drain(..n);
            if n == 0 {
                return;
            }
        }
    }

    /// The stream ended with `rest` not parsed (an item cut short): it is carried as it is, and
    /// the destination QEMU will judge it. Says how far the stream got.
    ///
    /// No [`Event::PassThrough`] announces `rest`: nothing follows it, and a cut item hides no
    /// end-of-section marker (the parser took every whole item before it), so the markers the
    /// parser reported are all the stream has. A consumer that must place barriers at them (the
    /// destination QEMU's multifd channels) can still trust their count; the returned
    /// [`Ending`] tells that the stream stopped early.
    pub fn finish(&mut self, rest: &[u8], emit: &mut dyn FnMut(Event<'_>)) -> Ending {
        let followed = self.passed_through_expected;
        if !rest.is_empty() {
            self.state = State::PassThrough;
            self.end.feed(rest);
            emit(Event::Bytes(rest));
            self.position += rest.len() as u64;
        }
        match (followed, self.end.verdict()) {
            (None, _) => Ending::Early,
            (Some(_), StreamEnd::Finished) => Ending::Finished,
            (Some(_), StreamEnd::Cut) => Ending::Cut,
            (Some(true), StreamEnd::Unknown) => Ending::AfterRam,
            (Some(false), StreamEnd::Unknown) => Ending::NotFollowed,
        }
    }

    fn step(&mut self, rest: &[u8]) -> Item {
        let mut c = Cursor::new(rest);
        match self.state {
            State::PassThrough => {
                self.end.feed(rest);
                Item::Bytes(rest.len())
            }
            State::Header => {
                let Some(head) = c.take(8) else {
                    return if rest.len() >= 4 && &rest[..4] != QEVM {
                        stop("not a QEMU migration stream")
                    } else {
                        Item::NeedMore
                    };
                };
                if &head[..4] != QEVM {
                    return stop("not a QEMU migration stream");
                }
                let version = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
                if version != STREAM_VERSION {
                    return stop(format!("stream version {version} (this parser reads 3)"));
                }
                self.state = State::Configuration;
                Item::Bytes(8)
            }
            State::Configuration => {
                let Some(kind) = c.u8() else {
                    return Item::NeedMore;
                };
                if kind != CONFIGURATION {
                    self.state = State::Top;
                    return Item::Bytes(0);
                }
                let Some(len) = c.be32() else {
                    return Item::NeedMore;
                };
                if len == 0 || len > 255 {
                    return stop(format!("a machine type name of {len} bytes"));
                }
                let Some(name) = c.take(len as usize) else {
                    return Item::NeedMore;
                };
                if printable(name).is_none() {
                    return stop("a machine type name that is not text");
                }
                // QEMU sends the configuration and section footers, or neither.
                self.end.expect_footers();
                self.state = State::ConfigSubsections;
                Item::Bytes(c.at)
            }
            State::ConfigSubsections => {
                let Some(kind) = c.u8() else {
                    return Item::NeedMore;
                };
                if kind != SUBSECTION {
                    self.state = State::Top;
                    return Item::Bytes(0);
                }
                let Some(name) = c.short_str() else {
                    return Item::NeedMore;
                };
                if c.be32().is_none() {
                    return Item::NeedMore;
                }
                match name {
                    b"configuration/target-page-bits" => {
                        let Some(bits) = c.be32() else {
                            return Item::NeedMore;
                        };
                        if bits != 12 {
                            return stop(format!(
                                "target pages of 2^{bits} bytes (this parser reads 4 KiB pages)"
                            ));
                        }
                    }
                    b"configuration/capabilities" => {
                        let Some(count) = c.be32() else {
                            return Item::NeedMore;
                        };
                        if count > 256 {
                            return stop(format!("a list of {count} capabilities"));
                        }
                        for _ in 0..count {
                            if c.short_str().is_none() {
                                return Item::NeedMore;
                            }
                        }
                    }
                    b"configuration/uuid" => {
                        if c.take(16).is_none() {
                            return Item::NeedMore;
                        }
                    }
                    other => {
                        return stop(format!(
                            "an unknown configuration subsection {:?}",
                            String::from_utf8_lossy(other)
                        ));
                    }
                }
                Item::Bytes(c.at)
            }
            State::Top => self.top(&mut c),
            State::Records { section, start } => self.record(&mut c, section, start),
            State::MemSize { section, remaining } => {
                let Some(name) = c.short_str() else {
                    return Item::NeedMore;
                };
                let Some(used_length) = c.be64() else {
                    return Item::NeedMore;
                };
                let Some(name) = printable(name) else {
                    return stop("a RAM block name that is not text");
                };
                if used_length == 0 || used_length > remaining {
                    return stop(format!(
                        "a RAM block list that does not add up (block {name:?} of {used_length} bytes, \
                         {remaining} left): fields of postcopy or x-ignore-shared"
                    ));
                }
                if self.blocks.len() == MAX_RAM_BLOCKS {
                    return stop(format!("more than {MAX_RAM_BLOCKS} RAM blocks"));
                }
                if self.blocks.iter().any(|b| b.name == name) {
                    return stop(format!("RAM block {name:?} listed twice"));
                }
                self.blocks.push(RamBlock {
                    name: name.to_string(),
                    used_length,
                });
                let remaining = remaining - used_length;
                if remaining == 0 {
                    self.state = State::Records {
                        section,
                        start: false,
                    };
                    Item::BlocksDone(c.at)
                } else {
                    self.state = State::MemSize { section, remaining };
                    Item::Bytes(c.at)
                }
            }
            State::Footer { section } => {
                let (Some(kind), Some(id)) = (c.u8(), c.be32()) else {
                    return Item::NeedMore;
                };
                if kind != FOOTER || id != section {
                    return stop(format!(
                        "no footer after RAM section {section} (found {kind:#04x}, id {id})"
                    ));
                }
                self.state = State::Top;
                Item::Bytes(5)
            }
        }
    }

    fn top(&mut self, c: &mut Cursor<'_>) -> Item {
        let Some(kind) = c.u8() else {
            return Item::NeedMore;
        };
        match kind {
            COMMAND => {
                let (Some(cmd), Some(len)) = (c.be16(), c.be16()) else {
                    return Item::NeedMore;
                };
                if c.take(usize::from(len)).is_none() {
                    return Item::NeedMore;
                }
                match cmd {
                    CMD_OPEN_RETURN_PATH | CMD_PING | CMD_SWITCHOVER_START => Item::Bytes(c.at),
                    3 => stop("postcopy (the stream advises it)"),
                    7 => stop("a packaged stream (postcopy)"),
                    8 => stop("COLO"),
                    other => stop(format!("command {other}")),
                }
            }
            SECTION_START | SECTION_FULL => {
                let Some(section) = c.be32() else {
                    return Item::NeedMore;
                };
                let Some(idstr) = c.short_str() else {
                    return Item::NeedMore;
                };
                let (Some(instance), Some(version)) = (c.be32(), c.be32()) else {
                    return Item::NeedMore;
                };
                let name = String::from_utf8_lossy(idstr);
                if kind == SECTION_FULL {
                    return Item::Stop {
                        reason: format!(
                            "device state (from {name:?} on, no lengths in the stream)"
                        ),
                        expected: true,
                    };
                }
                if idstr != b"ram" {
                    return stop(format!("an iterable device other than RAM ({name:?})"));
                }
                if self.ram_section.is_some() {
                    return stop("a second RAM section START");
                }
                if instance != 0 || version != RAM_SECTION_VERSION {
                    return stop(format!(
                        "a RAM section of instance {instance}, version {version} (this parser reads \
                         instance 0, version {RAM_SECTION_VERSION})"
                    ));
                }
                self.ram_section = Some(section);
                self.state = State::Records {
                    section,
                    start: true,
                };
                Item::Bytes(c.at)
            }
            SECTION_PART | SECTION_END => {
                let Some(section) = c.be32() else {
                    return Item::NeedMore;
                };
                if Some(section) != self.ram_section {
                    return stop(format!(
                        "section {section} of an iterable device other than RAM"
                    ));
                }
                self.state = State::Records {
                    section,
                    start: false,
                };
                Item::Bytes(c.at)
            }
            SECTION_EOF => Item::Stop {
                reason: "the end of the stream (the device description follows)".into(),
                expected: true,
            },
            other => stop(format!("a section of unknown type {other:#04x}")),
        }
    }

    fn record(&mut self, c: &mut Cursor<'_>, section: u32, start: bool) -> Item {
        let Some(header) = c.be64() else {
            return Item::NeedMore;
        };
        let (flags, offset) = (header & FLAG_MASK, header & !FLAG_MASK);
        if start {
            if flags != flags::MEM_SIZE || offset == 0 {
                return stop(format!(
                    "a RAM START section without its block list (record flags {flags:#x})"
                ));
            }
            self.state = State::MemSize {
                section,
                remaining: offset,
            };
            return Item::Bytes(8);
        }
        if flags == flags::EOS {
            self.state = State::Footer { section };
            return Item::SectionEnd(8);
        }
        let base = flags & !flags::CONTINUE;
        if base != flags::ZERO && base != flags::PAGE {
            return stop(format!(
                "a RAM record of kind {} (flags {flags:#x})",
                flag_name(flags)
            ));
        }
        let block = if flags & flags::CONTINUE != 0 {
            match self.last_block {
                Some(b) => b,
                None => return stop("a RAM record continuing no block"),
            }
        } else {
            let Some(name) = c.short_str() else {
                return Item::NeedMore;
            };
            match self.blocks.iter().position(|b| b.name.as_bytes() == name) {
                Some(b) => b,
                None => {
                    return stop(format!(
                        "a page of an unknown RAM block {:?}",
                        String::from_utf8_lossy(name)
                    ));
                }
            }
        };
        if offset >= self.blocks[block].used_length {
            return stop(format!(
                "a page at offset {offset:#x} beyond RAM block {:?} ({} bytes)",
                self.blocks[block].name, self.blocks[block].used_length
            ));
        }
        if base == flags::ZERO {
            let Some(byte) = c.u8() else {
                return Item::NeedMore;
            };
            self.last_block = Some(block);
            Item::Fill {
                block,
                offset,
                byte,
                len: c.at,
            }
        } else {
            let data_at = c.at;
            if c.take(TARGET_PAGE_SIZE).is_none() {
                return Item::NeedMore;
            }
            self.last_block = Some(block);
            Item::Page {
                block,
                offset,
                data_at,
                len: c.at,
            }
        }
    }
}

/// Appends a RAM record for one page to `out`: PAGE with `data`, or ZERO when `data` is `None`.
/// The block is always named (never CONTINUE): QEMU's loader keeps the previous record's block
/// across sections, and a rebuilt stream orders records differently from the original.
pub fn write_page_record(out: &mut Vec<u8>, block: &str, offset: u64, data: Option<&[u8]>) {
    debug_assert!(offset & FLAG_MASK == 0 && !block.is_empty() && block.len() <= 255);
    let flag = if data.is_some() {
        flags::PAGE
    } else {
        flags::ZERO
    };
    out.extend_from_slice(&(offset | flag).to_be_bytes());
    out.push(block.len() as u8);
    out.extend_from_slice(block.as_bytes());
    match data {
        Some(page) => out.extend_from_slice(page),
        None => out.push(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds streams in QEMU's format.
    #[derive(Default)]
    pub(crate) struct StreamBuilder {
        pub(crate) bytes: Vec<u8>,
    }

    impl StreamBuilder {
        pub(crate) fn header(mut self) -> Self {
            self.bytes.extend_from_slice(b"QEVM\0\0\0\x03");
            self.bytes.push(CONFIGURATION);
            self.bytes.extend_from_slice(&13u32.to_be_bytes());
            self.bytes.extend_from_slice(b"pc-i440fx-7.2");
            self
        }

        pub(crate) fn command(mut self, cmd: u16, data: &[u8]) -> Self {
            self.bytes.push(COMMAND);
            self.bytes.extend_from_slice(&cmd.to_be_bytes());
            self.bytes
                .extend_from_slice(&(data.len() as u16).to_be_bytes());
            self.bytes.extend_from_slice(data);
            self
        }

        pub(crate) fn ram_start(mut self, id: u32, blocks: &[(&str, u64)]) -> Self {
            self.bytes.push(SECTION_START);
            self.bytes.extend_from_slice(&id.to_be_bytes());
            self.bytes.push(3);
            self.bytes.extend_from_slice(b"ram");
            self.bytes.extend_from_slice(&0u32.to_be_bytes());
            self.bytes.extend_from_slice(&4u32.to_be_bytes());
            let total: u64 = blocks.iter().map(|b| b.1).sum();
            self.bytes
                .extend_from_slice(&(total | flags::MEM_SIZE).to_be_bytes());
            for (name, len) in blocks {
                self.bytes.push(name.len() as u8);
                self.bytes.extend_from_slice(name.as_bytes());
                self.bytes.extend_from_slice(&len.to_be_bytes());
            }
            self.eos_footer(id)
        }

        pub(crate) fn part(mut self, id: u32) -> Self {
            self.bytes.push(SECTION_PART);
            self.bytes.extend_from_slice(&id.to_be_bytes());
            self
        }

        pub(crate) fn end(mut self, id: u32) -> Self {
            self.bytes.push(SECTION_END);
            self.bytes.extend_from_slice(&id.to_be_bytes());
            self
        }

        /// A PAGE record; `block` None means CONTINUE.
        pub(crate) fn page(mut self, block: Option<&str>, offset: u64, fill: u8) -> Self {
            let cont = if block.is_none() { flags::CONTINUE } else { 0 };
            self.bytes
                .extend_from_slice(&(offset | flags::PAGE | cont).to_be_bytes());
            if let Some(name) = block {
                self.bytes.push(name.len() as u8);
                self.bytes.extend_from_slice(name.as_bytes());
            }
            self.bytes
                .extend((0..TARGET_PAGE_SIZE).map(|i| fill ^ (i as u8)));
            self
        }

        pub(crate) fn zero(mut self, block: Option<&str>, offset: u64) -> Self {
            let cont = if block.is_none() { flags::CONTINUE } else { 0 };
            self.bytes
                .extend_from_slice(&(offset | flags::ZERO | cont).to_be_bytes());
            if let Some(name) = block {
                self.bytes.push(name.len() as u8);
                self.bytes.extend_from_slice(name.as_bytes());
            }
            self.bytes.push(0);
            self
        }

        pub(crate) fn raw(mut self, bytes: &[u8]) -> Self {
            self.bytes.extend_from_slice(bytes);
            self
        }

        pub(crate) fn eos_footer(mut self, id: u32) -> Self {
            self.bytes.extend_from_slice(&flags::EOS.to_be_bytes());
            self.bytes.push(FOOTER);
            self.bytes.extend_from_slice(&id.to_be_bytes());
            self
        }

        pub(crate) fn device_state(mut self) -> Self {
            self.bytes.push(SECTION_FULL);
            self.bytes.extend_from_slice(&7u32.to_be_bytes());
            self.bytes.push(5);
            self.bytes.extend_from_slice(b"timer");
            self.bytes.extend_from_slice(&0u32.to_be_bytes());
            self.bytes.extend_from_slice(&2u32.to_be_bytes());
            self.bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
            self.bytes.push(FOOTER);
            self.bytes.extend_from_slice(&7u32.to_be_bytes());
            self.bytes.push(SECTION_EOF);
            self.bytes.push(VMDESCRIPTION);
            self.bytes.extend_from_slice(&2u32.to_be_bytes());
            self.bytes.extend_from_slice(b"{}");
            self
        }
    }

    /// What a parse produced, with bytes runs merged.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(crate) struct Parsed {
        /// (kind, detail) in order; bytes runs merged into one entry each.
        pub(crate) items: Vec<String>,
        pub(crate) pages: Vec<(usize, u64, Vec<u8>)>,
        pub(crate) accounted: usize,
        pub(crate) blocks: Vec<RamBlock>,
        pub(crate) pass_through: Option<(String, bool, u64)>,
        /// The stream rebuilt the way the destination shim does it.
        pub(crate) rebuilt: Vec<u8>,
        /// RAM end-of-section markers seen.
        pub(crate) sections_ended: usize,
        /// What [`Parser::finish`] said.
        pub(crate) ending: Option<Ending>,
    }

    pub(crate) fn parse_in_chunks(stream: &[u8], chunk: usize) -> Parsed {
        let mut parser = Parser::new();
        let mut parsed = Parsed::default();
        let mut held: Vec<u8> = Vec::new();
        let mut blocks: Vec<RamBlock> = Vec::new();
        let emit = |event: Event<'_>, parsed: &mut Parsed, blocks: &mut Vec<RamBlock>| match event {
            Event::Bytes(b) => {
                parsed.accounted += b.len();
                parsed.rebuilt.extend_from_slice(b);
                if parsed.items.last().is_some_and(|l| l.starts_with("bytes ")) {
                    let last = parsed.items.pop().expect("checked");
                    let n: usize = last[6..].parse().expect("a count");
                    parsed.items.push(format!("bytes {}", n + b.len()));
                } else {
                    parsed.items.push(format!("bytes {}", b.len()));
                }
            }
            Event::RamBlocks(list) => {
                *blocks = list.to_vec();
                parsed.blocks = list.to_vec();
                parsed.items.push(format!("blocks {}", list.len()));
            }
            Event::Page {
                block,
                offset,
                data,
                record_len,
            } => {
                parsed.accounted += record_len;
                parsed.pages.push((block, offset, data.to_vec()));
                parsed.items.push(format!("page {block} {offset:#x}"));
                write_page_record(&mut parsed.rebuilt, &blocks[block].name, offset, Some(data));
            }
            Event::Fill {
                block,
                offset,
                byte,
                record_len,
            } => {
                parsed.accounted += record_len;
                parsed
                    .pages
                    .push((block, offset, vec![byte; TARGET_PAGE_SIZE]));
                parsed.items.push(format!("fill {block} {offset:#x}"));
                // QEMU only ever sends 0, but a damaged stream may carry any byte: a
                // non-zero fill is rebuilt as a whole page with the same contents.
                let fill = [byte; TARGET_PAGE_SIZE];
                let data = (byte != 0).then_some(&fill[..]);
                write_page_record(&mut parsed.rebuilt, &blocks[block].name, offset, data);
            }
            Event::RamSectionEnd => {
                parsed.sections_ended += 1;
                // (A damaged stream may carry offset bits beside the flag.)
                let last: [u8; 8] = parsed.rebuilt[parsed.rebuilt.len() - 8..]
                    .try_into()
                    .expect("8 bytes");
                assert_eq!(
                    u64::from_be_bytes(last) & FLAG_MASK,
                    flags::EOS,
                    "the event follows the marker's bytes"
                );
            }
            Event::PassThrough {
                reason,
                expected,
                at,
            } => {
                assert!(parsed.pass_through.is_none(), "a second pass-through");
                parsed.items.push("pass-through".into());
                parsed.pass_through = Some((reason, expected, at));
            }
        };
        for piece in stream.chunks(chunk.max(1)) {
            held.extend_from_slice(piece);
            parser.parse_all(&mut held, &mut |e| emit(e, &mut parsed, &mut blocks));
        }
        parsed.ending = Some(parser.finish(&held, &mut |e| emit(e, &mut parsed, &mut blocks)));
        assert_eq!(parser.position(), stream.len() as u64);
        parsed
    }

    fn typical() -> Vec<u8> {
        typical_ram_phase().device_state().bytes
    }

    /// [`typical`] up to its device state.
    fn typical_ram_phase() -> StreamBuilder {
        StreamBuilder::default()
            .header()
            .command(CMD_OPEN_RETURN_PATH, &[])
            .command(CMD_PING, &1u32.to_be_bytes())
            .ram_start(2, &[("pc.ram", 64 << 12), ("vga.vram", 4 << 12)])
            .part(2)
            .page(Some("pc.ram"), 0, 1)
            .page(None, 1 << 12, 2)
            .zero(None, 2 << 12)
            .zero(Some("vga.vram"), 3 << 12)
            .eos_footer(2)
            .part(2)
            .page(None, 0, 3)
            .page(Some("pc.ram"), 63 << 12, 4)
            .eos_footer(2)
            .end(2)
            .page(Some("pc.ram"), 1 << 12, 5)
            .eos_footer(2)
    }

    #[test]
    fn a_typical_stream_parses_in_any_chunking() {
        let stream = typical();
        let whole = parse_in_chunks(&stream, stream.len());
        assert_eq!(
            whole.blocks,
            vec![
                RamBlock {
                    name: "pc.ram".into(),
                    used_length: 64 << 12
                },
                RamBlock {
                    name: "vga.vram".into(),
                    used_length: 4 << 12
                }
            ]
        );
        let pages: Vec<(usize, u64)> = whole.pages.iter().map(|p| (p.0, p.1)).collect();
        assert_eq!(
            pages,
            vec![
                (0, 0),
                (0, 1 << 12),
                (0, 2 << 12),
                (1, 3 << 12),
                // CONTINUE across sections: the block of the previous record, vga.vram.
                (1, 0),
                (0, 63 << 12),
                (0, 1 << 12)
            ]
        );
        assert_eq!(whole.pages[0].2[5], 1 ^ 5);
        // The START (after the block list), two PARTs and the END each end with a marker.
        assert_eq!(whole.sections_ended, 4);
        let (reason, expected, _) = whole.pass_through.clone().expect("device state");
        assert!(expected && reason.contains("device state"), "{reason}");
        assert_eq!(whole.ending, Some(Ending::Finished));
        assert_eq!(whole.accounted, stream.len());
        for chunk in [1, 2, 7, 13, 4095, 4096, 4097, 65536] {
            assert_eq!(parse_in_chunks(&stream, chunk), whole, "chunks of {chunk}");
        }
    }

    /// A source QEMU that cancels its migration closes the stream wherever it is: anywhere
    /// before the device state, inside an item or between two, the stream ended early. Once
    /// the first device's header is in, the parser follows the stream no further, and its last
    /// bytes tell: cut, unless they are the end of a migration (finished) or a bare EOF byte
    /// (cannot tell).
    #[test]
    fn a_stream_cut_before_its_device_state_ended_early() {
        let stream = typical();
        let ram_phase = typical_ram_phase().bytes.len();
        // The device state's first section header: type, id, name, instance, version.
        let device_header = ram_phase + 1 + 4 + 1 + b"timer".len() + 4 + 4;
        // Right after EOF, before the device description "{}" and its marker's other 5 bytes:
        // what the destination QEMU loads in full.
        let after_eof = stream.len() - 2 - 5;
        let cuts = (1..stream.len())
            .step_by(97)
            .chain(device_header..=stream.len());
        for cut in cuts.chain([ram_phase - 1, ram_phase, device_header - 1]) {
            let parsed = parse_in_chunks(&stream[..cut], 13);
            let expected = if cut < device_header {
                Ending::Early
            } else if cut == after_eof || cut == stream.len() {
                Ending::Finished
            } else {
                Ending::Cut
            };
            assert_eq!(parsed.ending, Some(expected), "cut at {cut} of {ram_phase}");
            assert_eq!(parsed.accounted, cut, "every byte still carried");
        }
        // Without the configuration section (a machine type before 2.4, which writes no
        // section footers either), a cut that ends in a bare 0 cannot be told from EOF.
        let config = 1 + 4 + b"pc-i440fx-7.2".len();
        let mut old = stream[..8].to_vec();
        old.extend_from_slice(&stream[8 + config..]);
        // Inside the last footer's section id (0, 0, 0, 7), before EOF and the description.
        let in_footer = old.len() - 2 - 6 - 2;
        assert_eq!(old[in_footer - 1], 0, "the test needs a bare 0 there");
        let parsed = parse_in_chunks(&old[..in_footer], 13);
        assert_eq!(parsed.ending, Some(Ending::AfterRam));
        let parsed = parse_in_chunks(&old[..in_footer + 2], 13);
        assert_eq!(parsed.ending, Some(Ending::Cut), "after the 7");
    }

    #[test]
    fn the_machine_type_is_read_from_the_configuration() {
        let stream = typical();
        assert_eq!(machine_type(&stream), Some("pc-i440fx-7.2"));
        assert_eq!(machine_type(&stream[..20]), None, "cut inside the name");
        assert_eq!(
            machine_type(b"QEVM\0\0\0\x03\x01"),
            None,
            "no configuration"
        );
        assert_eq!(machine_type(b"QEVX\0\0\0\x03\x07"), None, "not a stream");
    }

    #[test]
    fn a_rebuilt_stream_parses_to_the_same_pages() {
        let stream = typical();
        let first = parse_in_chunks(&stream, 4096);
        let second = parse_in_chunks(&first.rebuilt, 4096);
        assert_eq!(second.pages, first.pages);
        assert_eq!(second.blocks, first.blocks);
        // Rebuilt records name their block: no CONTINUE, so the rebuilt stream is longer.
        assert!(first.rebuilt.len() > stream.len());
        assert_eq!(second.rebuilt, first.rebuilt);
    }

    #[test]
    fn what_it_does_not_understand_passes_through_from_its_first_byte() {
        let head = StreamBuilder::default()
            .header()
            .ram_start(2, &[("pc.ram", 64 << 12)])
            .part(2)
            .page(Some("pc.ram"), 0, 1)
            .bytes;
        let mut xbzrle = Vec::new();
        xbzrle.extend_from_slice(&((5u64 << 12) | flags::XBZRLE | flags::CONTINUE).to_be_bytes());
        xbzrle.extend_from_slice(&[1, 0, 3, 9, 9, 9]);
        let stream = StreamBuilder {
            bytes: head.clone(),
        }
        .raw(&xbzrle)
        .eos_footer(2)
        .device_state()
        .bytes;
        for chunk in [1, 3, 4096, stream.len()] {
            let parsed = parse_in_chunks(&stream, chunk);
            let (reason, expected, at) = parsed.pass_through.clone().expect("passes through");
            assert!(!expected && reason.contains("XBZRLE"), "{reason}");
            assert_eq!(parsed.ending, Some(Ending::Finished));
            assert_eq!(at as usize, head.len());
            assert_eq!(parsed.pages.len(), 1);
            assert_eq!(parsed.accounted, stream.len());
            // Everything from the XBZRLE record on is carried unchanged.
            assert!(parsed.rebuilt.ends_with(&stream[head.len()..]));
        }
        // Cut after its "9": not the end of a migration.
        let cut = &stream[..head.len() + 8 + 4];
        assert_eq!(parse_in_chunks(cut, 5).ending, Some(Ending::Cut));
        // Cut after the XBZRLE record's "1, 0", in a stream without the configuration section
        // (a machine type before 2.4, without section footers too): a bare 0 at the end, as
        // such a stream's EOF: the parser cannot tell.
        let config = 1 + 4 + b"pc-i440fx-7.2".len();
        let mut old = stream[..8].to_vec();
        old.extend_from_slice(&stream[8 + config..head.len() + 8 + 2]);
        assert_eq!(parse_in_chunks(&old, 5).ending, Some(Ending::NotFollowed));
    }

    #[test]
    fn unsupported_streams_are_named() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"GET / HTTP/1.1\r\n".to_vec(),
                "not a QEMU migration stream",
            ),
            (b"QEVM\0\0\0\x02".to_vec(), "version 2"),
            (
                StreamBuilder::default().header().command(3, &[0; 16]).bytes,
                "postcopy",
            ),
            (
                StreamBuilder::default()
                    .header()
                    .raw(&[SECTION_START, 0, 0, 0, 3, 5])
                    .raw(b"block")
                    .raw(&[0, 0, 0, 0, 0, 0, 0, 1])
                    .bytes,
                "other than RAM",
            ),
            (
                StreamBuilder::default()
                    .header()
                    .ram_start(2, &[("pc.ram", 64 << 12)])
                    .part(2)
                    .page(Some("pc.rom"), 0, 1)
                    .bytes,
                "unknown RAM block",
            ),
            (
                StreamBuilder::default()
                    .header()
                    .ram_start(2, &[("pc.ram", 64 << 12)])
                    .part(2)
                    .page(Some("pc.ram"), 64 << 12, 1)
                    .bytes,
                "beyond RAM block",
            ),
            (
                StreamBuilder::default()
                    .header()
                    .ram_start(2, &[("pc.ram", 64 << 12)])
                    .part(3)
                    .bytes,
                "other than RAM",
            ),
        ];
        for (stream, want) in cases {
            let parsed = parse_in_chunks(&stream, 5);
            let (reason, expected, _) = parsed.pass_through.expect("passes through");
            assert!(!expected, "{reason}");
            assert!(reason.contains(want), "{reason:?} should mention {want:?}");
            assert_eq!(parsed.accounted, stream.len());
        }
    }

    #[test]
    fn configuration_subsections_are_read() {
        let mut s = StreamBuilder::default().header();
        for (name, body) in [
            (
                "configuration/target-page-bits",
                12u32.to_be_bytes().to_vec(),
            ),
            ("configuration/capabilities", {
                let mut b = 1u32.to_be_bytes().to_vec();
                b.push(11);
                b.extend_from_slice(b"x-colo-lite");
                b
            }),
            ("configuration/uuid", vec![7; 16]),
        ] {
            s.bytes.push(SUBSECTION);
            s.bytes.push(name.len() as u8);
            s.bytes.extend_from_slice(name.as_bytes());
            s.bytes.extend_from_slice(&1u32.to_be_bytes());
            s.bytes.extend_from_slice(&body);
        }
        let stream = s
            .ram_start(2, &[("pc.ram", 64 << 12)])
            .part(2)
            .zero(Some("pc.ram"), 0)
            .eos_footer(2)
            .device_state()
            .bytes;
        let parsed = parse_in_chunks(&stream, 3);
        assert_eq!(parsed.pages.len(), 1);
        assert!(parsed.pass_through.expect("device state").1);
    }

    #[test]
    fn a_fill_record_with_a_non_zero_byte_fills_the_page_with_it() {
        let mut stream = StreamBuilder::default()
            .header()
            .ram_start(2, &[("pc.ram", 64 << 12)])
            .part(2)
            .zero(Some("pc.ram"), 0x3000)
            .eos_footer(2)
            .bytes;
        // The fill byte is the ZERO record's last byte, just before EOS and the footer.
        let fill_at = stream.len() - 8 - 1 - 4 - 1;
        assert_eq!(stream[fill_at], 0);
        stream[fill_at] = 0x5a;
        let parsed = parse_in_chunks(&stream, 7);
        assert_eq!(
            parsed.pages,
            vec![(0, 0x3000, vec![0x5a; TARGET_PAGE_SIZE])]
        );
        let again = parse_in_chunks(&parsed.rebuilt, 5);
        assert_eq!(again.pages, parsed.pages);
    }

    proptest::proptest! {
        /// Whatever the bytes, in whatever pieces: no panic, every byte accounted for once.
        #[test]
        fn any_input_is_accounted_for(
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            chunk in 1usize..5000,
        ) {
            let parsed = parse_in_chunks(&noise, chunk);
            proptest::prop_assert_eq!(parsed.accounted, noise.len());
        }

        /// A valid stream with bytes flipped, cut or inserted: the same.
        #[test]
        fn damaged_streams_are_accounted_for(
            edits in proptest::collection::vec((0usize..40_000, proptest::num::u8::ANY, 0u8..3), 1..6),
            chunk in 1usize..9000,
        ) {
            let mut stream = typical();
            for (at, byte, how) in edits {
                let at = at % (stream.len() + 1);
                match how {
                    0 if at < stream.len() => stream[at] ^= byte | 1,
                    1 => stream.insert(at, byte),
                    _ => stream.truncate(at),
                }
            }
            let parsed = parse_in_chunks(&stream, chunk);
            proptest::prop_assert_eq!(parsed.accounted, stream.len());
        }
    }

    /// A stream cut inside a RAM item is carried whole and said to have ended early, and no
    /// pass-through says that end-of-section markers may hide in its last bytes: a destination
    /// that places a barrier at each marker still knows how many there were (the destination
    /// shim once blamed a cancelled migration on the parser, and told the user to turn multifd
    /// off).
    #[test]
    fn a_stream_cut_short_is_carried_and_said() {
        let stream = typical();
        let ram_phase = typical_ram_phase().bytes.len();
        let whole = parse_in_chunks(&stream, 1000);
        let mut sections = Vec::new();
        for cut in [ram_phase / 2, ram_phase - 3] {
            let parsed = parse_in_chunks(&stream[..cut], 1000);
            assert_eq!(parsed.accounted, cut);
            assert_eq!(
                parsed.rebuilt.last(),
                stream[..cut].last(),
                "the tail carried"
            );
            assert_eq!(parsed.ending, Some(Ending::Early), "cut at {cut}");
            assert_eq!(parsed.pass_through, None, "cut at {cut}");
            sections.push(parsed.sections_ended);
        }
        assert!(sections[0] < sections[1] && sections[1] <= whole.sections_ended);
    }
}
