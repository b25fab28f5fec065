//! The connection between the two shims: a handshake (version, mutual authentication, which
//! QEMU connection it carries), then frames in both directions.
//!
//! ```text
//!  source → dest   "PSSH" | u16 version | u8 has_key | nonce_c[32]
//!  dest → source   "PSSH" | u16 version | u8 status  | nonce_s[32] | mac_s[32]
//!                  status 0: no key, 1: keyed (mac_s = HMAC(key, "pagestream-shim dest" | nonce_c | nonce_s)),
//!                  2: refused, followed by u16 length and the reason
//!  source → dest   mac_c[32] (HMAC(key, "pagestream-shim source" | nonce_s | nonce_c), zeros without key)
//!                  | session[16] | u8 kind | u8 multifd channel id
//!                  kind 1: QEMU's main channel, 2: a multifd channel (both carried opaque);
//!                  3: a page-transport connection of parsing mode, 4: its return path
//!  dest → source   u8 status (0 accepted, 2 refused + u16 length + reason)
//!
//!  frames, both directions, until each side sends its end marker:
//!    u32 header: bit 31 = LZ4 block, bit 30 = zstd stream, bits 0..=29 = payload length;
//!                0 = end of this direction, followed by u64 stream length | u64 XXH3-64 of the
//!                    stream: the receiver checks both against what it handed its QEMU
//!    compressed payload: u32 original length | LZ4 block, or | zstd stream data
//!
//!  The zstd frames of one direction form one zstd stream, flushed at the end of every frame:
//!  the receiver decodes each frame as it arrives, the compressor keeps its history across
//!  frames. LZ4 and raw frames do not pass through it, on either end.
//! ```
//!
//! The end marker's digest verifies each direction end to end: the bytes one QEMU wrote are the
//! bytes the other QEMU read, whatever compression, framing or the link did in between. LZ4
//! blocks carry no checksum and TCP's is 16 bits; without it a corrupted page would reach the
//! guest silently.
//!
//! The destination proves it knows the key before the source sends anything of the VM's; the
//! source then proves it, so neither end feeds memory to, or accepts memory from, a stranger.
//! MACs are compared in constant time.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use xxhash_rust::xxh3::Xxh3;

/// Magic of the shim link.
pub const LINK_MAGIC: [u8; 4] = *b"PSSH";
/// Link protocol version.
pub const LINK_VERSION: u16 = 2;
/// Largest chunk of a QEMU stream in one frame.
pub const MAX_CHUNK: usize = 256 << 10;
/// Largest frame payload accepted (a compressed chunk can be a little larger than the chunk).
pub const MAX_FRAME: usize = MAX_CHUNK + MAX_CHUNK / 64 + 64;
const LZ4: u32 = 1 << 31;
const ZSTD: u32 = 1 << 30;
const LENGTH: u32 = ZSTD - 1;

/// How a link compresses what it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A share of the chunks with zstd, the rest with LZ4: the share grows while the link is the
    /// bottleneck (writes to it block) and shrinks while compression is.
    Auto,
    /// Always LZ4 (fast; for fast links).
    Lz4,
    /// Always zstd (level 1, streaming: tighter; for slow links).
    Zstd,
}

/// Chunks per decision of [`Compression::Auto`].
const CHOICE_WINDOW: u32 = 16;

/// How long the other shim may stay unreachable before a link to it is given up (the default of
/// `--link-timeout`).
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets an integer socket option.
pub(crate) fn set_socket_option(
    stream: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the descriptor is the open socket `stream` borrows; the option value is a c_int
    // that lives across the call, and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets a socket hold at most about `bytes` not yet sent (`TCP_NOTSENT_LOWAT`: a write waits
/// while the kernel holds that much unsent), and leaves its send buffer to the kernel's
/// autotuning. What waits unsent on the source when QEMU stops its guest lengthens the
/// downtime; bytes already sent and not yet acknowledged are the path's bandwidth-delay
/// product, which the window must cover. A fixed send buffer (`SO_SNDBUF`, 256 KiB for parsing
/// mode's page channels until the ninth session) counts both, and held each page channel to
/// about 512 KiB per round trip: at 10 ms, under 50 MB/s per channel (docs/benchmarks.md,
/// `bench qemu --rtt`).
pub(crate) fn limit_unsent(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).map_err(io::Error::other)?;
    set_socket_option(stream, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, value)
}

/// Gives a socket a receive buffer of `bytes` (the kernel doubles it for its bookkeeping)
/// instead of the kernel's autotuning, which keeps growing it on a path with a round trip when
/// the application reads slower than the link delivers. Returns whether it could.
///
/// A plain `SO_RCVBUF` is clamped to `net.core.rmem_max`, 208 KiB on a stock Debian host: a
/// window that small would hold a link to a fraction of its rate at any round trip, worse than
/// the autotuning. So the size is forced (`SO_RCVBUFFORCE`, for a shim with `CAP_NET_ADMIN`),
/// or asked for where the host allows it, or else the autotuning stays.
pub(crate) fn limit_receive_buffer(stream: &TcpStream, bytes: usize) -> io::Result<bool> {
    let value = libc::c_int::try_from(bytes).map_err(io::Error::other)?;
    match set_socket_option(stream, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, value) {
        Ok(()) => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => return Err(e),
    }
    let allowed = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok());
    if allowed.is_some_and(|max| max >= bytes) {
        set_socket_option(stream, libc::SOL_SOCKET, libc::SO_RCVBUF, value)?;
        return Ok(true);
    }
    Ok(false)
}

/// Makes the kernel give up a link whose other end stops answering, after about `timeout`,
/// so that a silent network partition (no reset ever arrives) fails the migration instead of
/// leaving both shims and both QEMUs waiting for ever.
///
/// Two kernel mechanisms cover the two ways a link can be waiting. Bytes sent and not
/// acknowledged for `timeout` end the connection (`TCP_USER_TIMEOUT`): the sending side of a
/// busy link. A link with nothing to send (the return path most of a migration, the
/// destination's side of every stream) is probed once it was silent for a third of `timeout`,
/// then every sixth (`SO_KEEPALIVE`), and the user timeout also bounds those probes: it ends
/// once nothing came back for `timeout`. The user timeout bounds the probing of a closed
/// receive window as well: a peer whose kernel still answers but whose process stopped reading
/// for all of `timeout` (stopped, hung) is given up too. A peer that is slow but reading keeps
/// acknowledging and reopening its window, and is never mistaken for a gone one.
pub fn watch_liveness(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let secs = |d: Duration| libc::c_int::try_from(d.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    set_socket_option(stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_socket_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        secs(timeout / 3),
    )?;
    set_socket_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        secs(timeout / 6),
    )?;
    set_socket_option(stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, millis)
}

/// What an error on a link to the other shim means, in words: a link that [`watch_liveness`]
/// gave up says so, rather than the bare "connection timed out".
pub fn link_error(e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ETIMEDOUT) {
        "the other shim stopped answering (nothing acknowledged or answered within \
         --link-timeout): the network between the hosts, or the other host, is down"
            .into()
    } else {
        e.to_string()
    }
}

/// Which QEMU connection a link carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The main migration channel (it starts with "QEVM").
    Main,
    /// A multifd channel, by its channel id.
    Multifd(u8),
    /// Parsing mode: a connection of the page transport (control or data channel) carrying the
    /// main channel's pages and the rest of its stream.
    Pages,
    /// Parsing mode: the main channel's return path, from the destination QEMU back.
    ReturnPath,
    /// The connection QEMU opens without announcing it: `postcopy-preempt`'s channel, silent
    /// until postcopy asks for pages. The destination QEMU knows it by its order (after the main
    /// channel).
    Unannounced,
}

/// What a link is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkHeader {
    /// The migration it belongs to.
    pub session: [u8; 16],
    /// Which of its connections.
    pub kind: StreamKind,
}

/// A pre-shared key, at least 16 bytes.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Reads a key file: its bytes, trailing whitespace trimmed.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        if bytes.len() < 16 {
            return Err(format!(
                "key file {} holds {} bytes; a key needs at least 16",
                path.display(),
                bytes.len()
            ));
        }
        Ok(Key(bytes))
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(a);
        mac.update(b);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32], tag: &[u8; 32]) -> bool {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(a);
        mac.update(b);
        mac.verify_slice(tag).is_ok()
    }
}

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer is not a pagestream shim, or speaks another version.
    #[error("{0}")]
    Protocol(String),
    /// The peer refused us.
    #[error("the other shim refused: {0}")]
    Refused(String),
    /// Authentication failed.
    #[error("authentication failed: {0}")]
    Auth(String),
}

fn random32() -> io::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn read_reason(r: &mut impl Read) -> io::Result<String> {
    let len = u16::from_le_bytes(read_array(r)?) as usize;
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn refuse(w: &mut impl Write, reason: &str) -> io::Result<()> {
    let reason = &reason.as_bytes()[..reason.len().min(1024)];
    let mut out = vec![2u8];
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    w.write_all(&out)?;
    w.flush()
}

/// The source side of the handshake.
pub fn connect_handshake(
    stream: &mut (impl Read + Write),
    key: Option<&Key>,
    header: LinkHeader,
) -> Result<(), LinkError> {
    let nonce_c = random32()?;
    let mut hello = Vec::with_capacity(39);
    hello.extend_from_slice(&LINK_MAGIC);
    hello.extend_from_slice(&LINK_VERSION.to_le_bytes());
    hello.push(u8::from(key.is_some()));
    hello.extend_from_slice(&nonce_c);
    stream.write_all(&hello)?;
    stream.flush()?;

    let magic: [u8; 4] = read_array(stream)?;
    if magic != LINK_MAGIC {
        return Err(LinkError::Protocol(format!(
            "the destination is not a pagestream shim (it answered {magic:02x?})"
        )));
    }
    let version = u16::from_le_bytes(read_array(stream)?);
    let status: [u8; 1] = read_array(stream)?;
    if status[0] == 2 {
        return Err(LinkError::Refused(read_reason(stream)?));
    }
    if version != LINK_VERSION {
        return Err(LinkError::Protocol(format!(
            "the destination shim speaks link version {version}, this one {LINK_VERSION}"
        )));
    }
    let nonce_s: [u8; 32] = read_array(stream)?;
    let mac_s: [u8; 32] = read_array(stream)?;
    let mac_c = match (key, status[0]) {
        (Some(key), 1) => {
            if !key.verify(b"pagestream-shim dest", &nonce_c, &nonce_s, &mac_s) {
                return Err(LinkError::Auth(
                    "the destination shim does not know the key".into(),
                ));
            }
            key.mac(b"pagestream-shim source", &nonce_s, &nonce_c)
        }
        (Some(_), _) => {
            return Err(LinkError::Auth(
                "this shim has a key but the destination shim has none".into(),
            ));
        }
        (None, _) => [0u8; 32],
    };
    let mut rest = Vec::with_capacity(50);
    rest.extend_from_slice(&mac_c);
    rest.extend_from_slice(&header.session);
    match header.kind {
        StreamKind::Main => rest.extend_from_slice(&[1, 0]),
        StreamKind::Multifd(id) => rest.extend_from_slice(&[2, id]),
        StreamKind::Pages => rest.extend_from_slice(&[3, 0]),
        StreamKind::ReturnPath => rest.extend_from_slice(&[4, 0]),
        StreamKind::Unannounced => rest.extend_from_slice(&[5, 0]),
    }
    stream.write_all(&rest)?;
    stream.flush()?;
    let status: [u8; 1] = read_array(stream)?;
    match status[0] {
        0 => Ok(()),
        2 => Err(LinkError::Refused(read_reason(stream)?)),
        other => Err(LinkError::Protocol(format!(
            "unknown handshake status {other}"
        ))),
    }
}

/// The destination side of the handshake; `peer_is_trusted` says whether an unauthenticated peer
/// may connect (loopback, or explicitly allowed). Once the peer is authenticated and has said
/// what the connection carries, `admit` decides whether this shim takes it: its refusal (a
/// reason) goes back to the source shim, which reports it.
pub fn accept_handshake<T>(
    stream: &mut (impl Read + Write),
    key: Option<&Key>,
    peer_is_trusted: bool,
    admit: impl FnOnce(&LinkHeader) -> Result<T, String>,
) -> Result<(LinkHeader, T), LinkError> {
    let magic: [u8; 4] = read_array(stream)?;
    if magic != LINK_MAGIC {
        return Err(LinkError::Protocol(format!(
            "not a pagestream shim (it opened with {magic:02x?})"
        )));
    }
    let version = u16::from_le_bytes(read_array(stream)?);
    let has_key: [u8; 1] = read_array(stream)?;
    let nonce_c: [u8; 32] = read_array(stream)?;
    let mut reply = Vec::with_capacity(71);
    reply.extend_from_slice(&LINK_MAGIC);
    reply.extend_from_slice(&LINK_VERSION.to_le_bytes());
    let refusal = if version != LINK_VERSION {
        Some(format!(
            "link version {version} is not supported (this shim speaks {LINK_VERSION})"
        ))
    } else {
        match (key, has_key[0] != 0) {
            (Some(_), false) => Some("this destination requires a key (--key-file)".to_string()),
            (None, true) => {
                Some("this destination has no key; start it with the same --key-file".to_string())
            }
            (None, false) if !peer_is_trusted => Some(
                "without a key this destination accepts only loopback peers (use --key-file)"
                    .to_string(),
            ),
            _ => None,
        }
    };
    if let Some(reason) = refusal {
        stream.write_all(&reply)?;
        refuse(stream, &reason)?;
        return Err(LinkError::Refused(reason));
    }
    let nonce_s = random32()?;
    reply.push(u8::from(key.is_some()));
    reply.extend_from_slice(&nonce_s);
    match key {
        Some(key) => reply.extend_from_slice(&key.mac(b"pagestream-shim dest", &nonce_c, &nonce_s)),
        None => reply.extend_from_slice(&[0u8; 32]),
    }
    stream.write_all(&reply)?;
    stream.flush()?;
    let mac_c: [u8; 32] = read_array(stream)?;
    let session: [u8; 16] = read_array(stream)?;
    let kind: [u8; 2] = read_array(stream)?;
    if let Some(key) = key
        && !key.verify(b"pagestream-shim source", &nonce_s, &nonce_c, &mac_c)
    {
        refuse(stream, "authentication failed")?;
        return Err(LinkError::Auth(
            "the source shim does not know the key".into(),
        ));
    }
    let kind = match kind {
        [1, _] => StreamKind::Main,
        [2, id] => StreamKind::Multifd(id),
        [3, _] => StreamKind::Pages,
        [4, _] => StreamKind::ReturnPath,
        [5, _] => StreamKind::Unannounced,
        other => {
            refuse(stream, "unknown stream kind")?;
            return Err(LinkError::Protocol(format!(
                "unknown stream kind {other:?}"
            )));
        }
    };
    let header = LinkHeader { session, kind };
    let admitted = match admit(&header) {
        Ok(admitted) => admitted,
        Err(reason) => {
            refuse(stream, &reason)?;
            return Err(LinkError::Refused(reason));
        }
    };
    stream.write_all(&[0])?;
    stream.flush()?;
    Ok((header, admitted))
}

/// Bytes moved in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Bytes of the QEMU stream.
    pub raw: u64,
    /// Bytes on the link.
    pub wire: u64,
}

/// How [`from_link`] ended: what moved, and the stream's verified digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes moved.
    pub moved: Moved,
    /// XXH3-64 of the stream, equal on both ends.
    pub digest: u64,
}

/// A writer that hashes exactly the bytes its inner writer accepted.
struct Hashing<'a, W> {
    inner: &'a mut W,
    digest: Xxh3,
}

impl<W: Write> Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Copies a QEMU stream into link frames until it ends, then sends the end marker. Chunks are
/// forwarded as soon as they are read (QEMU's device state and return-path messages must not
/// wait for more data), compressed when that makes them smaller. `on_frame(raw, wire)` is called
/// for every frame sent.
///
/// With [`Compression::Auto`] the share of chunks compressed with zstd follows the bottleneck:
/// every `CHOICE_WINDOW` (16) chunks it grows by a quarter when writes to the link blocked for more
/// than 30% of the time (the link is slower than compression, zstd's tighter output pays), and
/// shrinks by a quarter under 10% (compression is the limit, LZ4's speed pays). zstd costs
/// several times LZ4's CPU, so on a machine that also runs the VMs the best mix is often neither
/// end.
pub fn to_link(
    from: &mut impl Read,
    link: &mut impl Write,
    compression: Compression,
    mut on_frame: impl FnMut(u64, u64),
) -> io::Result<Moved> {
    let mut buf = vec![0u8; MAX_CHUNK];
    let bound = lz4_flex::block::get_maximum_output_size(MAX_CHUNK)
        .max(zstd::zstd_safe::compress_bound(MAX_CHUNK) + 4096);
    let mut out = vec![0u8; 8 + bound];
    let mut table = lz4_flex::block::CompressTable::large();
    let mut zstd_stream: Option<zstd::stream::raw::Encoder<'static>> = None;
    // Quarters of the chunks that go to zstd (0 to 4), and the credit that spreads them.
    let mut zstd_quarters: u32 = if compression == Compression::Zstd {
        4
    } else {
        0
    };
    let mut credit = 0;
    let (mut waited, mut busy, mut chunks) = (Duration::ZERO, Duration::ZERO, 0);
    let mut moved = Moved::default();
    let mut digest = Xxh3::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        let started = Instant::now();
        digest.update(chunk);
        credit += zstd_quarters;
        let use_zstd = credit >= 4;
        if use_zstd {
            credit -= 4;
        }
        let frame_len = if use_zstd {
            let encoder = match &mut zstd_stream {
                Some(e) => e,
                None => zstd_stream.insert(zstd::stream::raw::Encoder::new(1)?),
            };
            let c = zstd_compress(encoder, chunk, &mut out[8..])?;
            out[..4].copy_from_slice(&((c as u32 + 4) | ZSTD).to_le_bytes());
            out[4..8].copy_from_slice(&(n as u32).to_le_bytes());
            8 + c
        } else if n >= 256 {
            let c = lz4_flex::block::compress_into_with_table(chunk, &mut out[8..], &mut table)
                .expect("output holds the worst case");
            if c + 4 < n {
                out[..4].copy_from_slice(&((c as u32 + 4) | LZ4).to_le_bytes());
                out[4..8].copy_from_slice(&(n as u32).to_le_bytes());
                8 + c
            } else {
                0
            }
        } else {
            0
        };
        busy += started.elapsed();
        let writing = Instant::now();
        let wire = if frame_len > 0 {
            link.write_all(&out[..frame_len])?;
            frame_len
        } else {
            link.write_all(&(n as u32).to_le_bytes())?;
            link.write_all(chunk)?;
            4 + n
        };
        waited += writing.elapsed();
        moved.wire += wire as u64;
        moved.raw += n as u64;
        on_frame(n as u64, wire as u64);
        chunks += 1;
        if compression == Compression::Auto && chunks == CHOICE_WINDOW {
            let share = waited.as_secs_f64() / (waited + busy).as_secs_f64().max(1e-9);
            if share > 0.3 {
                zstd_quarters = (zstd_quarters + 1).min(4);
            } else if share < 0.1 {
                zstd_quarters = zstd_quarters.saturating_sub(1);
            }
            (waited, busy, chunks) = (Duration::ZERO, Duration::ZERO, 0);
        }
    }
    let mut end = [0u8; 20];
    end[4..12].copy_from_slice(&moved.raw.to_le_bytes());
    end[12..].copy_from_slice(&digest.digest().to_le_bytes());
    link.write_all(&end)?;
    link.flush()?;
    moved.wire += end.len() as u64;
    Ok(moved)
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Copies link frames into a QEMU stream until the end marker, calling `on_frame(raw, wire)`
/// for each. Returns `Ok` only for a stream that ended with its marker and whose length and
/// digest match what the sender read from its QEMU: a link that breaks, or a stream that
/// arrived different, is an error.
pub fn from_link(
    link: &mut impl Read,
    to: &mut impl Write,
    mut on_frame: impl FnMut(u64, u64),
) -> io::Result<Received> {
    let mut to = Hashing {
        inner: to,
        digest: Xxh3::new(),
    };
    let mut payload = vec![0u8; MAX_FRAME];
    let mut plain = vec![0u8; MAX_CHUNK];
    let mut zstd_stream: Option<zstd::stream::raw::Decoder<'static>> = None;
    let mut moved = Moved::default();
    loop {
        let header = match read_array::<4>(link) {
            Ok(h) => u32::from_le_bytes(h),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other shim's connection ended without its end marker",
                ));
            }
            Err(e) => return Err(e),
        };
        moved.wire += 4;
        if header == 0 {
            let end = read_array::<16>(link)?;
            moved.wire += 16;
            let length = u64::from_le_bytes(end[..8].try_into().expect("8 bytes"));
            let expected = u64::from_le_bytes(end[8..].try_into().expect("8 bytes"));
            let got = to.digest.digest();
            if length != moved.raw || expected != got {
                return Err(invalid(format!(
                    "the stream arrived corrupted: the source shim read {length} bytes from its \
                     QEMU (XXH3 {expected:016x}), this shim delivered {} (XXH3 {got:016x})",
                    moved.raw
                )));
            }
            return Ok(Received { moved, digest: got });
        }
        let len = (header & LENGTH) as usize;
        if len > MAX_FRAME {
            return Err(invalid(format!(
                "frame of {len} bytes from the other shim exceeds the limit of {MAX_FRAME}"
            )));
        }
        link.read_exact(&mut payload[..len])?;
        moved.wire += len as u64;
        let raw = if header & (LZ4 | ZSTD) == 0 {
            to.write_all(&payload[..len])?;
            len
        } else {
            if len < 4 {
                return Err(invalid("compressed frame too short"));
            }
            let raw = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
            if raw > MAX_CHUNK {
                return Err(invalid("compressed frame too large"));
            }
            if header & ZSTD != 0 {
                let decoder = match &mut zstd_stream {
                    Some(d) => d,
                    None => zstd_stream.insert(zstd::stream::raw::Decoder::new()?),
                };
                let produced = zstd_decompress(decoder, &payload[4..len], &mut plain, &mut to)?;
                if produced != raw {
                    return Err(invalid(format!(
                        "zstd frame decoded to {produced} bytes, announced {raw}"
                    )));
                }
            } else {
                let n = lz4_flex::block::decompress_into(&payload[4..len], &mut plain[..raw])
                    .map_err(|e| invalid(format!("bad LZ4 data: {e}")))?;
                if n != raw {
                    return Err(invalid("LZ4 data of the wrong length"));
                }
                to.write_all(&plain[..raw])?;
            }
            raw
        };
        moved.raw += raw as u64;
        on_frame(raw as u64, 4 + len as u64);
    }
}

/// Feeds `chunk` into the zstd stream and flushes it into `out`; returns the bytes written.
fn zstd_compress(
    encoder: &mut zstd::stream::raw::Encoder<'static>,
    chunk: &[u8],
    out: &mut [u8],
) -> io::Result<usize> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut input = InBuffer::around(chunk);
    let mut output = OutBuffer::around(out);
    while input.pos() < chunk.len() {
        encoder.run(&mut input, &mut output)?;
    }
    while encoder.flush(&mut output)? > 0 {
        if output.pos() == output.capacity() {
            return Err(io::Error::other("zstd output exceeds its bound"));
        }
    }
    Ok(output.pos())
}

/// Decodes one zstd frame's data and writes what it yields to `to`; returns the bytes written.
fn zstd_decompress(
    decoder: &mut zstd::stream::raw::Decoder<'static>,
    mut input: &[u8],
    plain: &mut [u8],
    to: &mut impl Write,
) -> io::Result<usize> {
    use zstd::stream::raw::Operation;
    let mut produced = 0;
    loop {
        let status = decoder
            .run_on_buffers(input, plain)
            .map_err(|e| invalid(format!("bad zstd data: {e}")))?;
        to.write_all(&plain[..status.bytes_written])?;
        produced += status.bytes_written;
        input = &input[status.bytes_read..];
        if input.is_empty() && status.bytes_written < plain.len() {
            return Ok(produced);
        }
        if status.bytes_read == 0 && status.bytes_written == 0 {
            return Err(invalid("zstd data does not advance"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn socket_option(stream: &TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the descriptor is the open socket `stream` borrows; the kernel writes at most
        // `len` bytes into `value`, which lives across the call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast::<libc::c_void>(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    #[test]
    fn a_link_holds_little_unsent_and_leaves_its_window_to_the_kernel() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
        let stream = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let kernels = socket_option(&stream, libc::SOL_SOCKET, libc::SO_SNDBUF);
        limit_unsent(&stream, 128 << 10).expect("set the option");
        assert_eq!(
            socket_option(&stream, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
            128 << 10
        );
        // A send buffer set by hand would cap the bytes in flight, and with them the window.
        assert_eq!(
            socket_option(&stream, libc::SOL_SOCKET, libc::SO_SNDBUF),
            kernels,
            "the send buffer stays the kernel's to size"
        );
    }

    #[test]
    fn a_link_receive_buffer_is_the_size_asked_for() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
        let stream = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        // Tests run as root (CAP_NET_ADMIN), so the size is forced whatever rmem_max says.
        assert!(limit_receive_buffer(&stream, 2 << 20).expect("set the option"));
        // The kernel reports the doubled size it keeps.
        assert_eq!(
            socket_option(&stream, libc::SOL_SOCKET, libc::SO_RCVBUF),
            4 << 20
        );
    }

    fn key(byte: u8) -> Key {
        Key(vec![byte; 32])
    }

    fn handshake(
        src_key: Option<Key>,
        dst_key: Option<Key>,
        trusted: bool,
    ) -> (Result<(), LinkError>, Result<LinkHeader, LinkError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let header = LinkHeader {
            session: [7; 16],
            kind: StreamKind::Multifd(3),
        };
        let dst = std::thread::spawn(move || {
            accept_handshake(&mut b, dst_key.as_ref(), trusted, |_| Ok(())).map(|(h, ())| h)
        });
        let src = connect_handshake(&mut a, src_key.as_ref(), header);
        // A source that gives up closes its end, which ends the destination's wait too.
        drop(a);
        (src, dst.join().unwrap())
    }

    #[test]
    fn handshakes() {
        let (src, dst) = handshake(Some(key(1)), Some(key(1)), false);
        assert!(src.is_ok(), "{src:?}");
        assert_eq!(dst.unwrap().kind, StreamKind::Multifd(3));
        let (src, dst) = handshake(Some(key(1)), Some(key(2)), true);
        assert!(
            src.unwrap_err()
                .to_string()
                .contains("does not know the key")
        );
        assert!(dst.is_err());
        let (src, _) = handshake(None, Some(key(1)), true);
        assert!(src.unwrap_err().to_string().contains("requires a key"));
        let (src, _) = handshake(None, None, false);
        assert!(src.unwrap_err().to_string().contains("only loopback peers"));
        let (src, dst) = handshake(None, None, true);
        assert!(src.is_ok() && dst.is_ok());
    }

    #[test]
    fn a_connection_the_destination_does_not_admit_is_refused_with_its_reason() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let dst = std::thread::spawn(move || {
            accept_handshake(&mut b, None, true, |h| -> Result<(), String> {
                Err(format!("busy with another migration than {:?}", h.kind))
            })
        });
        let header = LinkHeader {
            session: [7; 16],
            kind: StreamKind::Main,
        };
        let err = connect_handshake(&mut a, None, header).unwrap_err();
        assert!(
            matches!(&err, LinkError::Refused(why) if why == "busy with another migration than Main"),
            "{err}"
        );
        assert!(matches!(dst.join().unwrap(), Err(LinkError::Refused(_))));
    }

    #[test]
    fn frames_carry_a_stream_exactly() {
        let mut data = Vec::new();
        for i in 0..700_000u32 {
            data.push((i % 251) as u8 ^ if i % 5000 < 100 { (i * 7) as u8 } else { 0 });
        }
        for compression in [Compression::Lz4, Compression::Zstd, Compression::Auto] {
            let mut link = Vec::new();
            // Small reads, so that the stream spans many frames.
            let mut source = Chunked(&data[..], 100_000);
            let moved = to_link(&mut source, &mut link, compression, |_, _| {}).unwrap();
            assert_eq!(moved.raw, data.len() as u64);
            assert!(moved.wire < moved.raw, "{compression:?}: not compressed");
            let mut out = Vec::new();
            let back = from_link(&mut &link[..], &mut out, |_, _| {}).unwrap();
            assert!(out == data, "{compression:?}: stream differs");
            assert_eq!(back.moved.raw, moved.raw);
            assert_eq!(back.digest, xxhash_rust::xxh3::xxh3_64(&data));
            // A link cut short is an error, never a clean end.
            let mut out = Vec::new();
            assert!(from_link(&mut &link[..link.len() - 10], &mut out, |_, _| {}).is_err());
        }
    }

    #[test]
    fn a_stream_changed_on_the_way_is_refused() {
        let data = b"QEVM and a few bytes of device state".to_vec();
        let mut link = Vec::new();
        to_link(&mut &data[..], &mut link, Compression::Lz4, |_, _| {}).unwrap();
        // A short chunk travels raw: its bytes follow the 4-byte header.
        let mut flipped = link.clone();
        flipped[4 + 7] ^= 0x20;
        let err = from_link(&mut &flipped[..], &mut Vec::new(), |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("arrived corrupted"), "{err}");
        // A frame that went missing, end marker intact.
        let mut dropped = Vec::new();
        dropped.extend_from_slice(&link[4 + data.len()..]);
        let err = from_link(&mut &dropped[..], &mut Vec::new(), |_, _| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("read {} bytes", data.len())),
            "{err}"
        );
    }

    /// A reader that hands out at most `n` bytes per read.
    struct Chunked<'a>(&'a [u8], usize);

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
}
