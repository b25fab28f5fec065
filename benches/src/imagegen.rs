//! Synthetic guest-memory images that look like the real thing to a compressor.
//!
//! Memory of a running guest is a patchwork: large free (zero) areas, the page cache (text,
//! binaries), heaps full of structures (small integers, pointers), code, compressed or encrypted
//! data that looks random, and the same content at several places (shared libraries loaded twice,
//! copies of buffers). The generator lays out *extents* of one kind at a time, of varied length,
//! in proportions set by a [`Mix`], and is deterministic for a given seed.

use std::fmt;
use std::str::FromStr;

use pagecodec::PAGE_SIZE;

/// A small, fast, deterministic random generator (xoshiro256**).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A value of roughly geometric distribution: small values are common, large ones rare.
    pub fn small(&mut self, max_bits: u32) -> u64 {
        let bits = self.below(u64::from(max_bits) + 1) as u32;
        if bits == 0 {
            0
        } else {
            self.next_u64() & ((1u64 << bits) - 1)
        }
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Kinds of memory content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentKind {
    /// Free memory.
    Zero,
    /// Prose, logs and configuration text, as in the page cache.
    Text,
    /// Arrays and structures of small integers.
    Ints,
    /// Heap objects: pointers mixed with small fields.
    Pointers,
    /// x86-64 machine code.
    Code,
    /// Compressed or encrypted data.
    Random,
    /// A copy of content that appears earlier in the image.
    Dup,
}

impl ContentKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [ContentKind; 7] = [
        ContentKind::Zero,
        ContentKind::Text,
        ContentKind::Ints,
        ContentKind::Pointers,
        ContentKind::Code,
        ContentKind::Random,
        ContentKind::Dup,
    ];

    /// The name used in `--mix`.
    pub fn name(self) -> &'static str {
        match self {
            ContentKind::Zero => "zero",
            ContentKind::Text => "text",
            ContentKind::Ints => "ints",
            ContentKind::Pointers => "ptrs",
            ContentKind::Code => "code",
            ContentKind::Random => "random",
            ContentKind::Dup => "dup",
        }
    }
}

/// Proportions of each kind of content, in percent of pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(ContentKind, u32)>,
}

/// A `--mix` that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MixError {
    /// Not `kind=weight`.
    #[error("mix entry '{0}' is not of the form kind=weight (for example text=20)")]
    Syntax(String),
    /// An unknown kind.
    #[error("unknown content kind '{0}' (known: zero, text, ints, ptrs, code, random, dup)")]
    UnknownKind(String),
    /// All weights zero.
    #[error("the mix has no content: every weight is zero")]
    Empty,
}

impl Mix {
    /// The default mix: a guest with half of its memory in use, running ordinary services.
    pub fn realistic() -> Self {
        "zero=30,text=16,ints=12,ptrs=12,code=10,random=8,dup=12"
            .parse()
            .expect("built-in mix parses")
    }

    /// The same mix without duplicated regions.
    pub fn realistic_no_dup() -> Self {
        "zero=30,text=18,ints=14,ptrs=14,code=14,random=10"
            .parse()
            .expect("built-in mix parses")
    }

    /// Weights by kind.
    pub fn weights(&self) -> &[(ContentKind, u32)] {
        &self.weights
    }

    fn pick(&self, rng: &mut Rng) -> ContentKind {
        let total: u32 = self.weights.iter().map(|w| w.1).sum();
        let mut x = rng.below(u64::from(total)) as u32;
        for &(kind, weight) in &self.weights {
            if x < weight {
                return kind;
            }
            x -= weight;
        }
        unreachable!("x < total")
    }
}

impl FromStr for Mix {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Self, MixError> {
        let mut weights = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, weight) = entry
                .split_once('=')
                .ok_or_else(|| MixError::Syntax(entry.to_string()))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| MixError::Syntax(entry.to_string()))?;
            let kind = ContentKind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| MixError::UnknownKind(name.trim().to_string()))?;
            weights.retain(|w: &(ContentKind, u32)| w.0 != kind);
            weights.push((kind, weight));
        }
        if weights.iter().all(|w| w.1 == 0) {
            return Err(MixError::Empty);
        }
        Ok(Mix { weights })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (kind, weight)) in self.weights.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}", kind.name(), weight)?;
        }
        Ok(())
    }
}

/// Parses sizes such as `4096`, `64K`, `256M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 64K, 256M, 1G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M, G or T)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// How many pages of each kind an image holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageComposition {
    /// Pages by kind, in [`ContentKind::ALL`] order.
    pub pages: [u64; 7],
}

/// Generates an image of `bytes` bytes (rounded up to whole pages), calling `progress` with the
/// bytes done so far now and then.
pub fn generate(
    mix: &Mix,
    bytes: u64,
    seed: u64,
    mut progress: impl FnMut(u64),
) -> (Vec<u8>, ImageComposition) {
    let pages = bytes.div_ceil(PAGE_SIZE as u64) as usize;
    let mut image = vec![0u8; pages * PAGE_SIZE];
    let mut rng = Rng::new(seed);
    let mut composition = ImageComposition::default();
    let mut text = TextGen::new();
    let mut page = 0;
    let mut last_report = 0;
    while page < pages {
        let kind = mix.pick(&mut rng);
        // Extents from one page to a few megabytes, most of them short.
        let len = (1 + rng.small(10) as usize).min(pages - page);
        let extent = &mut image[page * PAGE_SIZE..(page + len) * PAGE_SIZE];
        let kind = match kind {
            ContentKind::Dup if page == 0 => ContentKind::Random,
            k => k,
        };
        match kind {
            ContentKind::Zero => {}
            ContentKind::Text => text.fill(&mut rng, extent),
            ContentKind::Ints => fill_ints(&mut rng, extent),
            ContentKind::Pointers => fill_pointers(&mut rng, extent),
            ContentKind::Code => fill_code(&mut rng, extent),
            ContentKind::Random => rng.fill(extent),
            ContentKind::Dup => {
                let from = rng.below(page as u64) as usize;
                let n = len.min(page - from);
                image.copy_within(from * PAGE_SIZE..(from + n) * PAGE_SIZE, page * PAGE_SIZE);
                let idx = ContentKind::ALL.iter().position(|k| *k == kind).unwrap();
                composition.pages[idx] += n as u64;
                page += n;
                continue;
            }
        }
        let idx = ContentKind::ALL.iter().position(|k| *k == kind).unwrap();
        composition.pages[idx] += len as u64;
        page += len;
        if page - last_report >= 4096 {
            last_report = page;
            progress((page * PAGE_SIZE) as u64);
        }
    }
    progress((pages * PAGE_SIZE) as u64);
    (image, composition)
}

/// Fills `out` (whole pages) with fresh content of `kind`; [`ContentKind::Dup`] has no content
/// of its own and gives random bytes here.
pub fn fill(kind: ContentKind, rng: &mut Rng, out: &mut [u8]) {
    match kind {
        ContentKind::Zero => out.fill(0),
        ContentKind::Text => TextGen::new().fill(rng, out),
        ContentKind::Ints => fill_ints(rng, out),
        ContentKind::Pointers => fill_pointers(rng, out),
        ContentKind::Code => fill_code(rng, out),
        ContentKind::Random | ContentKind::Dup => rng.fill(out),
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "memory",
    "page",
    "system",
    "process",
    "server",
    "request",
    "value",
    "file",
    "data",
    "user",
    "error",
    "table",
    "network",
    "connection",
    "kernel",
    "thread",
    "buffer",
    "service",
    "config",
    "default",
    "return",
    "function",
    "struct",
    "static",
    "const",
    "include",
    "define",
    "module",
    "version",
    "interface",
    "address",
    "device",
    "driver",
    "migration",
    "virtual",
    "machine",
    "storage",
    "started",
    "stopped",
    "completed",
    "failed",
    "received",
    "sent",
    "bytes",
    "seconds",
    "between",
    "through",
    "during",
    "without",
    "against",
    "because",
    "however",
    "therefore",
    "government",
    "development",
    "information",
    "management",
    "performance",
    "application",
];

const LOG_LEVELS: &[&str] = &["INFO", "DEBUG", "WARN", "INFO", "INFO", "ERROR", "TRACE"];
const COMPONENTS: &[&str] = &[
    "nginx",
    "sshd",
    "kernel",
    "systemd",
    "postgres",
    "app-worker",
    "cron",
    "dbus",
    "containerd",
];

/// Text in three styles: prose (Zipf-distributed words), log lines and key=value configuration.
#[derive(Debug)]
struct TextGen {
    line: Vec<u8>,
}

impl TextGen {
    fn new() -> Self {
        Self {
            line: Vec::with_capacity(256),
        }
    }

    fn word(rng: &mut Rng) -> &'static str {
        // Zipf-like: the square of a uniform value in [0, 1) favours the first (most common)
        // words. Fixed point: u and its square are fractions of 2^16.
        let u = rng.below(1 << 16);
        let skewed = (u * u) >> 16;
        WORDS[(skewed as usize * WORDS.len()) >> 16]
    }

    fn fill(&mut self, rng: &mut Rng, out: &mut [u8]) {
        let style = rng.below(3);
        let mut pos = 0;
        let mut clock = rng.below(86_400_000);
        while pos < out.len() {
            self.line.clear();
            match style {
                0 => {
                    let words = 6 + rng.below(14);
                    for w in 0..words {
                        let word = Self::word(rng);
                        if w == 0 {
                            let mut first = word.as_bytes().to_vec();
                            first[0] = first[0].to_ascii_uppercase();
                            self.line.extend_from_slice(&first);
                        } else {
                            self.line.push(b' ');
                            self.line.extend_from_slice(word.as_bytes());
                        }
                        if w + 1 < words && rng.chance(8) {
                            self.line.push(b',');
                        }
                    }
                    self.line
                        .extend_from_slice(if rng.chance(85) { b".\n" } else { b".\n\n" });
                }
                1 => {
                    clock += rng.small(12);
                    let (h, m, s, ms) = (
                        clock / 3_600_000 % 24,
                        clock / 60_000 % 60,
                        clock / 1000 % 60,
                        clock % 1000,
                    );
                    let level = LOG_LEVELS[rng.below(LOG_LEVELS.len() as u64) as usize];
                    let comp = COMPONENTS[rng.below(COMPONENTS.len() as u64) as usize];
                    let pid = 100 + rng.below(40_000);
                    self.line.extend_from_slice(
                        format!(
                            "2026-11-26T{h:02}:{m:02}:{s:02}.{ms:03}Z {level} {comp}[{pid}]: {} {} {} id={:08x} in {}ms\n",
                            Self::word(rng),
                            Self::word(rng),
                            Self::word(rng),
                            rng.next_u64() as u32,
                            rng.small(10),
                        )
                        .as_bytes(),
                    );
                }
                _ => {
                    let key = format!(
                        "{}_{}",
                        Self::word(rng),
                        WORDS[rng.below(WORDS.len() as u64) as usize]
                    );
                    let value = match rng.below(3) {
                        0 => rng.small(16).to_string(),
                        1 => Self::word(rng).to_string(),
                        _ => format!("/var/lib/{}/{}", Self::word(rng), Self::word(rng)),
                    };
                    self.line
                        .extend_from_slice(format!("{key} = {value}\n").as_bytes());
                }
            }
            let n = self.line.len().min(out.len() - pos);
            out[pos..pos + n].copy_from_slice(&self.line[..n]);
            pos += n;
        }
    }
}

/// Heap data of small integers: counter arrays, index tables, small records.
fn fill_ints(rng: &mut Rng, out: &mut [u8]) {
    for page in out.chunks_exact_mut(PAGE_SIZE) {
        match rng.below(3) {
            0 => {
                // u32 counters, mostly small.
                for w in page.chunks_exact_mut(4) {
                    w.copy_from_slice(&(rng.small(12) as u32).to_le_bytes());
                }
            }
            1 => {
                // u64 index table: increasing values with small steps.
                let mut v = rng.small(20);
                for w in page.chunks_exact_mut(8) {
                    v += rng.small(6);
                    w.copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                // 32-byte records: id, flags, count, size.
                let mut id = rng.small(16) as u32;
                for rec in page.chunks_exact_mut(32) {
                    id += 1 + rng.small(3) as u32;
                    rec[0..4].copy_from_slice(&id.to_le_bytes());
                    rec[4..8].copy_from_slice(&((1u32 << rng.below(8)) | 1).to_le_bytes());
                    rec[8..16].copy_from_slice(&rng.small(14).to_le_bytes());
                    rec[16..24].copy_from_slice(&(rng.small(4) * 4096).to_le_bytes());
                    rec[24..32].copy_from_slice(&rng.small(8).to_le_bytes());
                }
            }
        }
    }
}

/// Heap objects: linked nodes with pointers into a few arenas, reference counts, flags.
fn fill_pointers(rng: &mut Rng, out: &mut [u8]) {
    let kernel = rng.below(2) == 0;
    let arena: u64 = if kernel {
        0xffff_8880_0000_0000 + (rng.below(1 << 20) << 12)
    } else {
        0x0000_5555_0000_0000 + (rng.below(1 << 20) << 12)
    };
    let object = [32usize, 64, 128, 192][rng.below(4) as usize];
    let ptr = |rng: &mut Rng| arena + (rng.small(22) & !0xf);
    for page in out.chunks_exact_mut(PAGE_SIZE) {
        for obj in page.chunks_exact_mut(object) {
            for (i, w) in obj.chunks_exact_mut(8).enumerate() {
                let v = match i % 6 {
                    0 | 1 => ptr(rng),
                    2 => rng.small(5) | (rng.small(3) << 32),
                    3 if rng.chance(50) => ptr(rng),
                    3 => 0,
                    4 => rng.small(16),
                    _ => 0,
                };
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// x86-64 code: functions built from common instruction encodings.
fn fill_code(rng: &mut Rng, out: &mut [u8]) {
    let mut pos = 0;
    let mut buf = Vec::with_capacity(64);
    while pos < out.len() {
        buf.clear();
        if rng.chance(6) {
            // Function boundary: epilogue, int3 padding to 16 bytes, prologue.
            buf.extend_from_slice(&[0x5d, 0xc3]); // pop rbp; ret
            let pad = (16 - (pos + buf.len()) % 16) % 16;
            buf.extend(std::iter::repeat_n(0xcc, pad));
            buf.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5]); // push rbp; mov rbp,rsp
            if rng.chance(60) {
                buf.extend_from_slice(&[0x48, 0x83, 0xec, (rng.below(16) * 8) as u8]);
            }
        } else {
            let reg = rng.below(8) as u8;
            let reg2 = rng.below(8) as u8;
            match rng.below(12) {
                0 => buf.extend_from_slice(&[0x48, 0x89, 0xc0 | (reg << 3) | reg2]),
                1 => buf.extend_from_slice(&[
                    0x48,
                    0x8b,
                    0x45 | (reg << 3),
                    (0x100 - 8 * (1 + rng.below(12))) as u8,
                ]),
                2 => buf.extend_from_slice(&[
                    0x48,
                    0x89,
                    0x45 | (reg << 3),
                    (0x100 - 8 * (1 + rng.below(12))) as u8,
                ]),
                3 => {
                    buf.push(0xe8);
                    let rel = (rng.below(1 << 20) as i32 - (1 << 19)).to_le_bytes();
                    buf.extend_from_slice(&rel);
                }
                4 => buf.extend_from_slice(&[0x48, 0x85, 0xc0 | (reg << 3) | reg]),
                5 => buf.extend_from_slice(&[0x74 + rng.below(2) as u8, rng.below(64) as u8]),
                6 => {
                    buf.extend_from_slice(&[0x48, 0x8d, 0x05 | (reg << 3)]);
                    buf.extend_from_slice(&(rng.below(1 << 16) as u32).to_le_bytes());
                }
                7 => buf.extend_from_slice(&[0xb8 | reg, rng.small(8) as u8, 0, 0, 0]),
                8 => buf.extend_from_slice(&[0x48, 0x83, 0xc0 | reg, rng.small(6) as u8]),
                9 => buf.extend_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]),
                10 => buf.extend_from_slice(&[
                    0x48,
                    0x8b,
                    0x40 | (reg << 3) | reg2,
                    (rng.below(8) * 8) as u8,
                ]),
                _ => buf.extend_from_slice(&[0x31, 0xc0 | (reg << 3) | reg]),
            }
        }
        let n = buf.len().min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&buf[..n]);
        pos += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parsing() {
        let mix: Mix = "zero=1, text=2".parse().unwrap();
        assert_eq!(mix.to_string(), "zero=1,text=2");
        assert_eq!("zero".parse::<Mix>(), Err(MixError::Syntax("zero".into())));
        assert_eq!(
            "foo=1".parse::<Mix>(),
            Err(MixError::UnknownKind("foo".into()))
        );
        assert_eq!("zero=0".parse::<Mix>(), Err(MixError::Empty));
        Mix::realistic();
        Mix::realistic_no_dup();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn generation_is_deterministic_and_follows_the_mix() {
        let mix = Mix::realistic();
        let (a, comp) = generate(&mix, 8 << 20, 7, |_| {});
        let (b, _) = generate(&mix, 8 << 20, 7, |_| {});
        assert_eq!(a, b);
        assert_eq!(a.len(), 8 << 20);
        let total: u64 = comp.pages.iter().sum();
        assert_eq!(total, 2048);
        // Every kind of the mix shows up.
        assert!(comp.pages.iter().all(|&p| p > 0), "{comp:?}");
        let (c, _) = generate(&mix, 8 << 20, 8, |_| {});
        assert_ne!(a, c);
    }
}
