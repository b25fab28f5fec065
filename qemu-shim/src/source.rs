//! The source shim: it listens where QEMU migrates to, tells QEMU's connections apart by their
//! first bytes (the main channel starts with `QEVM`, a multifd channel with its own magic and
//! channel id), groups them into a migration session, and opens one authenticated link per
//! connection to the destination shim: the main channel in parsing mode (`parsed/`) whenever
//! its stream can be parsed, every other connection relayed opaque (`relay.rs`).

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecodec::decoder::DEFAULT_MAX_CACHE_BYTES;
use pagestream_transport::net::Log;

use crate::endpoint::{Conn, Endpoint, Listener, accept_or_done};
use crate::link::{self, Compression, Key, LinkHeader, StreamKind};
use crate::parsed;
use crate::relay::relay;
use crate::session::{OPAQUE_MODE, Session, Summary, SummarySink, progress, spawn_named};
use crate::stream;

/// How the source shim carries QEMU's main channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Parsing mode whenever the stream can be parsed, opaque otherwise.
    Auto,
    /// Always opaque.
    Opaque,
}

/// The bytes an opaque link's socket may hold unsent on the source ([`link::limit_unsent`]).
/// QEMU takes the pace of its own writes for the link's bandwidth and stops its guest when what
/// remains looks short; megabytes waiting in the socket (its autotuned send buffer held
/// 2.5-2.8 MB unsent whenever writes blocked) made that pace look faster than the link. Five
/// alternating rounds of `bench qemu --methods shim-opaque,shim-multifd` at 1 Gbit/s: opaque
/// mode's downtime 97-309 ms (median 252) before, 92-234 ms (median 120) with 256 KiB, at
/// 3.15-4.69 s (median 3.90) against 3.27-4.13 s (3.63).
const OPAQUE_UNSENT_BYTES: usize = 256 << 10;

/// What the source shim needs.
#[derive(Clone)]
pub struct SourceConfig {
    /// Where QEMU migrates to.
    pub listen: Endpoint,
    /// The destination shim.
    pub to: String,
    /// Pre-shared key, if any.
    pub key: Option<Key>,
    /// How the migration stream is compressed (opaque mode).
    pub compression: Compression,
    /// Parsing mode when possible, or always opaque.
    pub mode: Mode,
    /// Data channels of parsing mode's page transport.
    pub channels: u16,
    /// Parsing mode: the page codec's content cache (duplicates), bytes in all, at each end (the
    /// destination's decoders take the sizes the source's encoders announce); 0 turns duplicate
    /// detection off. Default [`pagecodec::encoder::DEFAULT_DUP_CACHE_BYTES`].
    pub dup_cache_bytes: u64,
    /// Parsing mode: the delta cache (previous versions of pages sent more than once), likewise;
    /// 0 turns deltas off. Default [`pagecodec::encoder::DEFAULT_DELTA_CACHE_BYTES`].
    pub delta_cache_bytes: u64,
    /// How long the destination shim may stay unreachable before the migration fails
    /// ([`link::watch_liveness`]; default [`link::DEFAULT_LINK_TIMEOUT`]).
    pub link_timeout: Duration,
    /// Also hands each summary here (`--summary-json`).
    pub on_summary: Option<SummarySink>,
    /// Exit after one migration.
    pub once: bool,
    /// Progress and summaries.
    pub log: Log,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("listen", &self.listen)
            .field("to", &self.to)
            .finish()
    }
}

/// Checks the page caches a source shim was given against what any destination shim gives
/// them: its decoders refuse a stream whose caches exceed [`DEFAULT_MAX_CACHE_BYTES`], and
/// the migration would fail only once it started.
fn check_page_caches(dup_cache_bytes: u64, delta_cache_bytes: u64) -> Result<(), String> {
    if dup_cache_bytes.saturating_add(delta_cache_bytes) > DEFAULT_MAX_CACHE_BYTES {
        return Err(format!(
            "page caches of {} MiB for duplicates and {} MiB for deltas: together they may take \
             at most {} MiB, what a destination shim gives them",
            dup_cache_bytes >> 20,
            delta_cache_bytes >> 20,
            DEFAULT_MAX_CACHE_BYTES >> 20
        ));
    }
    Ok(())
}

/// What a QEMU connection's first bytes say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opening {
    Plain(StreamKind),
    /// A TLS handshake (QEMU's `tls-creds`): which channel it is, only the order tells.
    Tls,
    /// Nothing that says what it is, from the QEMU whose main channel is carried opaque:
    /// postcopy-preempt's channel (see [`StreamKind::Unannounced`]).
    Unannounced,
    /// The main channel of a postcopy migration resumed after a failure: no header, a command
    /// first ([`stream::opens_postcopy_resume`]).
    Resumed,
}

/// How long a connection must stay silent, once the migration's main channel has spoken, to be
/// taken for its unannounced one. QEMU's main and multifd channels and TLS handshakes all
/// speak as soon as they connect, and the main channel's first bytes come only after QEMU's
/// setup (its other channels are connected by then).
const UNANNOUNCED_AFTER: Duration = Duration::from_millis(200);

/// How long a connection may stay silent otherwise before it is refused.
const OPENING_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the first bytes of a QEMU connection and says what it is. Returns the bytes read, which
/// must be forwarded first. `takes_unannounced` says whether a migration is under way that this
/// connection can be the unannounced channel of (asked again while it stays silent).
fn classify(
    conn: &mut Conn,
    takes_unannounced: &dyn Fn() -> bool,
) -> Result<(Opening, Vec<u8>), String> {
    const TICK: Duration = Duration::from_millis(20);
    conn.set_read_timeout(Some(TICK))
        .map_err(|e| e.to_string())?;
    let opened = Instant::now();
    // Since when this connection could have been the unannounced one.
    let mut could_be: Option<Instant> = None;
    let mut head = vec![0u8; 4];
    let mut got = 0;
    while got < 4 {
        match conn.read(&mut head[got..]) {
            Ok(0) => return Err("QEMU closed it without a stream header".into()),
            Ok(n) => {
                got += n;
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("QEMU sent no stream header ({e})")),
        }
        if got == 0 && takes_unannounced() {
            let since = *could_be.get_or_insert_with(Instant::now);
            if since.elapsed() >= UNANNOUNCED_AFTER {
                conn.set_read_timeout(None).map_err(|e| e.to_string())?;
                return Ok((Opening::Unannounced, Vec::new()));
            }
        } else {
            could_be = None;
        }
        if opened.elapsed() >= OPENING_TIMEOUT {
            return Err(format!(
                "QEMU sent no stream header in {} s",
                OPENING_TIMEOUT.as_secs()
            ));
        }
    }
    conn.set_read_timeout(Some(OPENING_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let kind = if head == b"QEVM" {
        Opening::Plain(StreamKind::Main)
    } else if u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) == crate::multifd::MAGIC {
        // be32 version, 16-byte uuid, then the channel id.
        let mut rest = vec![0u8; 21];
        conn.read_exact(&mut rest)
            .map_err(|e| format!("truncated multifd header ({e})"))?;
        head.extend_from_slice(&rest);
        Opening::Plain(StreamKind::Multifd(head[24]))
    } else if is_tls_handshake(&head) {
        Opening::Tls
    } else if stream::opens_postcopy_resume(&head) {
        Opening::Resumed
    } else if takes_unannounced() {
        // postcopy-preempt's channel, opened when postcopy starts (QEMU 8.0 on) and used at
        // once: its first bytes are a page record.
        Opening::Unannounced
    } else {
        return Err(format!(
            "not a QEMU migration stream (it starts with {:02x?})",
            &head[..4]
        ));
    };
    conn.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((kind, head))
}

/// Whether `head` starts a TLS record of the handshake (content type 22, protocol version
/// 3.x: SSL 3.0 to TLS 1.3, whose records all say 3.1 to 3.3), as QEMU's `tls-creds` open a
/// migration connection.
fn is_tls_handshake(head: &[u8]) -> bool {
    matches!(head, [0x16, 0x03, 0x00..=0x04, ..])
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut id);
    }
    id
}

/// Runs the source shim until killed (or, with `once`, until one migration ended). Returns the
/// summaries of the migrations it carried.
pub fn run_source(config: SourceConfig) -> Result<Vec<Summary>, String> {
    check_page_caches(config.dup_cache_bytes, config.delta_cache_bytes)?;
    let listener = Listener::bind(&config.listen)?;
    let to: SocketAddr = config
        .to
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the destination shim {}: {e}", config.to))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", config.to))?;
    (config.log)(&format!(
        "source shim: QEMU migrates to {}; destination shim {to}; {}",
        config.listen,
        if config.key.is_some() {
            "authenticated"
        } else {
            "no key"
        }
    ));
    let current: Arc<Mutex<Option<Arc<Session>>>> = Arc::new(Mutex::new(None));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Summary>();
    let mut summaries = Vec::new();
    loop {
        if config.once && !summaries.is_empty() {
            return Ok(summaries);
        }
        // With `once`, stop accepting as soon as the session is over.
        let conn = match accept_or_done(&listener, &done_rx, &mut summaries, config.once)? {
            Some(conn) => conn,
            None => return Ok(summaries),
        };
        let (config, current, done_tx) = (config.clone(), current.clone(), done_tx.clone());
        let log = config.log.clone();
        let spawned = spawn_named("ps-src-conn", move || {
            let mut conn = conn;
            let pid = conn.peer_pid();
            let takes_unannounced = || {
                let current = current.lock().expect("not poisoned");
                current.as_ref().is_some_and(|s| s.takes_unannounced(pid))
            };
            let (opening, prefix) = match classify(&mut conn, &takes_unannounced) {
                Ok(c) => c,
                Err(why) => {
                    (config.log)(&format!("source shim: refused a connection: {why}"));
                    return;
                }
            };
            // A migration's connections arrive together, in no fixed order (QEMU 7.2 opens its
            // multifd channels before the main channel sends anything): the first one opens the
            // session, the others join it until it is over. One migration at a time: a
            // connection that cannot be this migration's is closed, which fails its QEMU's
            // migration at once.
            let (session, kind) = {
                let mut current = current.lock().expect("not poisoned");
                match current.as_ref() {
                    Some(s) if !s.main_done.load(Ordering::SeqCst) && s.failed().is_none() => {
                        let mut members = s.members.lock().expect("not poisoned");
                        let kind = members.kind_of(opening, false);
                        let admitted = members.admit(kind, pid);
                        drop(members);
                        if let Err(why) = admitted {
                            (config.log)(&format!(
                                "source shim: refused a connection: {why}; a shim pair carries \
                                 one migration at a time (migrate the VMs one after another, or \
                                 through another shim pair on another socket and port)"
                            ));
                            return;
                        }
                        (s.clone(), kind)
                    }
                    _ if opening == Opening::Unannounced => {
                        (config.log)(
                            "source shim: refused a connection: it does not say what it is, and \
                             the migration it belonged to is over",
                        );
                        return;
                    }
                    _ => {
                        let s = Session::new(random_id());
                        let mut members = s.members.lock().expect("not poisoned");
                        let kind = members.kind_of(opening, true);
                        let admitted = members.admit(kind, pid);
                        drop(members);
                        debug_assert!(admitted.is_ok(), "a new session takes any connection");
                        *current = Some(s.clone());
                        progress(s.clone(), "source", config.log.clone());
                        (s, kind)
                    }
                }
            };
            let main = kind == StreamKind::Main;
            session.opened();
            let result = (|| -> Result<(), String> {
                let mut prefix = prefix;
                if main && opening == Opening::Tls {
                    *session.mode.lock().expect("not poisoned") = Some(format!(
                        "{OPAQUE_MODE}: QEMU's TLS encrypts the stream between the two QEMUs"
                    ));
                } else if main && opening == Opening::Resumed {
                    *session.mode.lock().expect("not poisoned") = Some(format!(
                        "{OPAQUE_MODE}: a postcopy migration resumed after a failure"
                    ));
                } else if main && config.mode == Mode::Auto {
                    match parsed::source_main(
                        conn.try_clone().map_err(|e| e.to_string())?,
                        prefix,
                        &session,
                        &config,
                        to,
                    )? {
                        parsed::SourceOutcome::Carried => return Ok(()),
                        parsed::SourceOutcome::Opaque { read, why } => {
                            (config.log)(&format!(
                                "source shim: main channel carried opaque: {why}"
                            ));
                            *session.mode.lock().expect("not poisoned") = Some(format!(
                                "opaque (the main channel's stream cannot be parsed: {why})"
                            ));
                            prefix = read;
                        }
                    }
                } else if main {
                    *session.mode.lock().expect("not poisoned") =
                        Some(format!("{OPAQUE_MODE}, as asked (--mode opaque)"));
                }
                // A resumed postcopy waits for the destination shim as long as a lost link
                // would: QEMU 7.2's source, its resume connection closed unanswered, stays in
                // postcopy-recover for good, so the shims may be restarted in any order.
                let patience = if opening == Opening::Resumed {
                    config.link_timeout
                } else {
                    Duration::ZERO
                };
                let mut link = connect_destination(to, patience)?;
                link.set_nodelay(true).map_err(|e| e.to_string())?;
                link::watch_liveness(&link, config.link_timeout).map_err(|e| e.to_string())?;
                link::limit_unsent(&link, OPAQUE_UNSENT_BYTES).map_err(|e| e.to_string())?;
                link.set_read_timeout(Some(config.link_timeout))
                    .map_err(|e| e.to_string())?;
                link::connect_handshake(
                    &mut link,
                    config.key.as_ref(),
                    LinkHeader {
                        session: session.id,
                        kind,
                    },
                )
                .map_err(|e| e.to_string())?;
                link.set_read_timeout(None).map_err(|e| e.to_string())?;
                relay(conn, prefix, link, &session, true, main, config.compression)
            })();
            if let Err(why) = result {
                session.fail(format!("{kind:?} channel: {why}"));
            }
            session.closed(main);
            if main {
                session.wait_finished();
                session.report(
                    "source shim",
                    &config.log,
                    config.on_summary.as_ref(),
                    &done_tx,
                );
            }
        });
        if let Err(e) = spawned {
            // The connection closes with the thread's closure: its QEMU's migration fails.
            log(&format!(
                "source shim: refused a connection: cannot start a thread: {e}"
            ));
        }
    }
}

/// Connects to the destination shim, trying again for `patience` while it refuses (not yet
/// started).
pub(crate) fn connect_destination(to: SocketAddr, patience: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + patience;
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(link) => return Ok(link),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("cannot reach the destination shim {to}: {e}")),
        }
    }
}

/// The QEMU connections a source session took: whose they are, and which. A source shim
/// carries one migration at a time, and a connection of another QEMU must not join it: its
/// pages would reach the wrong VM.
#[derive(Debug, Default)]
pub(crate) struct Members {
    /// The QEMU process they come from, where the socket says so (unix sockets).
    pid: Option<u32>,
    main: bool,
    multifd: std::collections::BTreeSet<u8>,
    unannounced: bool,
}

impl Members {
    /// Takes a connection of `kind` from process `pid` (if known), or says why it cannot be
    /// part of this migration. Over TCP, where the process is unknown, a second main channel or
    /// a second multifd channel with the same id still shows another QEMU.
    fn admit(&mut self, kind: StreamKind, pid: Option<u32>) -> Result<(), String> {
        if let (Some(ours), Some(theirs)) = (self.pid, pid)
            && ours != theirs
        {
            return Err(format!(
                "it comes from QEMU process {theirs}, and QEMU process {ours} is migrating"
            ));
        }
        match kind {
            StreamKind::Main if self.main => {
                return Err("a second main channel: another QEMU is migrating".into());
            }
            StreamKind::Main => self.main = true,
            StreamKind::Multifd(id) if !self.multifd.insert(id) => {
                return Err(format!(
                    "a second multifd channel {id}: another QEMU is migrating"
                ));
            }
            StreamKind::Unannounced if self.unannounced => {
                return Err(
                    "a second connection that does not say what it is (QEMU opens one, for \
                     postcopy-preempt)"
                        .into(),
                );
            }
            StreamKind::Unannounced => self.unannounced = true,
            _ => {}
        }
        self.pid = self.pid.or(pid);
        Ok(())
    }

    /// The kind of a connection that opened as `opening`. A TLS handshake hides what it is:
    /// the one that opens a session is the main channel (QEMU connects its multifd channels
    /// only once the main channel's handshake is done), the others are multifd channels,
    /// numbered in the order they come (the destination QEMU reads each one's real id inside
    /// TLS).
    fn kind_of(&self, opening: Opening, opens_session: bool) -> StreamKind {
        match opening {
            Opening::Plain(kind) => kind,
            Opening::Unannounced => StreamKind::Unannounced,
            Opening::Resumed => StreamKind::Main,
            Opening::Tls if opens_session => StreamKind::Main,
            Opening::Tls => {
                StreamKind::Multifd(u8::try_from(self.multifd.len()).unwrap_or(u8::MAX))
            }
        }
    }
}

/// What only the source shim asks of a session.
impl Session {
    /// Whether a connection of QEMU process `pid` (if known) that does not say what it is can be
    /// this migration's [`StreamKind::Unannounced`] one: the main channel has spoken, from the
    /// same QEMU, and is carried opaque (a parsed stream showed no postcopy), and no such
    /// connection came yet.
    fn takes_unannounced(&self, pid: Option<u32>) -> bool {
        let members = self.members.lock().expect("not poisoned");
        let same_qemu = match (members.pid, pid) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => true,
        };
        let decided = self.mode.lock().expect("not poisoned").is_some();
        members.main
            && same_qemu
            && !members.unannounced
            && decided
            && !self.parsing.load(Ordering::SeqCst)
            && !self.main_done.load(Ordering::SeqCst)
            && self.failed().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn page_caches_are_checked_against_what_a_destination_gives_them() {
        assert!(check_page_caches(64 << 20, 64 << 20).is_ok());
        assert!(check_page_caches(0, 0).is_ok());
        assert!(check_page_caches(DEFAULT_MAX_CACHE_BYTES, 0).is_ok());
        let err = check_page_caches(DEFAULT_MAX_CACHE_BYTES, 1 << 20).unwrap_err();
        assert!(err.contains("at most 1024 MiB"), "{err}");
        assert!(check_page_caches(u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn a_migration_takes_only_its_own_qemus_connections() {
        // Over a unix socket the process tells.
        let mut m = Members::default();
        m.admit(StreamKind::Multifd(0), Some(10)).unwrap();
        m.admit(StreamKind::Main, Some(10)).unwrap();
        m.admit(StreamKind::Multifd(1), Some(10)).unwrap();
        let err = m.admit(StreamKind::Main, Some(11)).unwrap_err();
        assert!(
            err.contains("QEMU process 11") && err.contains("process 10"),
            "{err}"
        );
        assert!(m.admit(StreamKind::Multifd(2), Some(11)).is_err());
        // Over TCP the process is unknown: a repeated channel still shows another QEMU.
        let mut m = Members::default();
        m.admit(StreamKind::Main, None).unwrap();
        m.admit(StreamKind::Multifd(0), None).unwrap();
        assert!(
            m.admit(StreamKind::Main, None)
                .unwrap_err()
                .contains("second main channel")
        );
        let err = m.admit(StreamKind::Multifd(0), None).unwrap_err();
        assert!(err.contains("second multifd channel 0"), "{err}");
        m.admit(StreamKind::Multifd(1), None).unwrap();
    }

    #[test]
    fn tls_connections_are_told_apart_by_their_order() {
        // A ClientHello record (TLS 1.0 to 1.3 all write 3.1 in the record layer), and the
        // plain openings that are not one.
        assert!(is_tls_handshake(&[0x16, 0x03, 0x01, 0x02]));
        assert!(is_tls_handshake(&[0x16, 0x03, 0x03, 0x00]));
        assert!(!is_tls_handshake(b"QEVM"));
        assert!(!is_tls_handshake(&crate::multifd::MAGIC.to_be_bytes()));
        assert!(!is_tls_handshake(&[0x17, 0x03, 0x03, 0x00]));
        let mut m = Members::default();
        let main = m.kind_of(Opening::Tls, true);
        assert_eq!(main, StreamKind::Main);
        m.admit(main, Some(7)).unwrap();
        for id in 0..3 {
            let kind = m.kind_of(Opening::Tls, false);
            assert_eq!(kind, StreamKind::Multifd(id));
            m.admit(kind, Some(7)).unwrap();
        }
        // Another QEMU's encrypted connection is refused like any other.
        assert!(m.admit(m.kind_of(Opening::Tls, false), Some(8)).is_err());
        // Plain connections say what they are, whatever the order.
        let plain = Opening::Plain(StreamKind::Multifd(9));
        assert_eq!(m.kind_of(plain, true), StreamKind::Multifd(9));
    }

    #[test]
    fn a_silent_connection_is_the_unannounced_one_only_while_a_migration_can_take_it() {
        let pair = || {
            let (a, b) = UnixStream::pair().unwrap();
            (a, Conn::Unix(b))
        };
        // Silent, with a migration that can take it: after the grace, not before.
        let (_qemu, mut conn) = pair();
        let started = Instant::now();
        let (opening, prefix) = classify(&mut conn, &|| true).unwrap();
        assert_eq!(opening, Opening::Unannounced);
        assert!(prefix.is_empty());
        assert!(started.elapsed() >= UNANNOUNCED_AFTER);
        // The grace counts from when a migration could take it, not from the connection.
        let (_qemu, mut conn) = pair();
        let asked = Instant::now();
        let (opening, _) =
            classify(&mut conn, &|| asked.elapsed() >= Duration::from_millis(150)).unwrap();
        assert_eq!(opening, Opening::Unannounced);
        assert!(asked.elapsed() >= Duration::from_millis(150) + UNANNOUNCED_AFTER);
        // A main channel slow to speak is still the main channel.
        let (mut qemu, mut conn) = pair();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            qemu.write_all(b"QEVM\0\0\0\x03").unwrap();
            qemu
        });
        let (opening, prefix) = classify(&mut conn, &|| false).unwrap();
        assert_eq!(opening, Opening::Plain(StreamKind::Main));
        assert_eq!(prefix, b"QEVM");
        drop(writer.join());
        // Bytes that are no opening: a page record on postcopy-preempt's channel, opened when
        // postcopy starts, if a migration can take it; refused otherwise, and kept either way.
        for takes in [true, false] {
            let (mut qemu, mut conn) = pair();
            qemu.write_all(&[0, 0, 0, 0, 0, 0x10, 0, 0x08]).unwrap();
            match classify(&mut conn, &|| takes) {
                Ok((opening, prefix)) => {
                    assert!(takes);
                    assert_eq!(opening, Opening::Unannounced);
                    assert_eq!(prefix, [0, 0, 0, 0]);
                }
                Err(why) => {
                    assert!(!takes);
                    assert!(why.contains("not a QEMU migration stream"), "{why}");
                }
            }
        }
        // A closed connection is refused at once.
        let (qemu, mut conn) = pair();
        drop(qemu);
        assert!(classify(&mut conn, &|| false).is_err());
        // QEMU opens one such connection per migration.
        let mut m = Members::default();
        m.admit(StreamKind::Main, Some(3)).unwrap();
        let kind = m.kind_of(Opening::Unannounced, false);
        assert_eq!(kind, StreamKind::Unannounced);
        m.admit(kind, Some(3)).unwrap();
        assert!(m.admit(kind, Some(3)).unwrap_err().contains("a second"));
    }
}
