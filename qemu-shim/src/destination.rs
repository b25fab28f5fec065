//! The destination shim: it takes the source shim's links, connects each one to the destination
//! QEMU, the main channel first (QEMU takes its first connection as the main one), and carries
//! it on in the mode the source chose.

use std::net::{Shutdown, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagestream_transport::net::Log;

use crate::endpoint::{Conn, Endpoint, Listener, accept_or_done, connect_qemu};
use crate::link::{self, Compression, Key, LinkHeader, StreamKind};
use crate::multifd::QemuMultifd;
use crate::parsed;
use crate::relay::relay;
use crate::session::{Session, Summary, SummarySink, progress, spawn_named};

/// How long a destination link other than the main channel waits for the main channel's
/// connection to the destination QEMU (QEMU takes its first connection as the main channel).
pub(crate) const QEMU_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The receive buffer of every link the destination shim accepts
/// ([`link::limit_receive_buffer`]). The kernel sizes a receive buffer from the pace at which
/// the application reads in one round trip, and never shrinks it: over a path with a round
/// trip, a destination slower than the link (its QEMU writing fresh memory on CPUs the shims
/// share) left tens of megabytes waiting in its sockets, which the source QEMU took for
/// bytes delivered. Measured with `bench qemu --rtt 10` at 1 Gbit/s (`ss` every 50 ms): up
/// to 30 MB waiting in the destination's page channels, and in 2 of 40 runs a downtime of
/// 2.2-2.8 s against the source QEMU's own 120 ms, the time the destination took to drain
/// them; with 2 MiB (the kernel doubles it, and advertises most of that as the window), at
/// most 5.8 MB waited, downtimes 105-122 ms, total times unchanged (4.68-4.73 s against
/// 4.08-4.86 s). A window of a few megabytes still covers 1 Gbit/s up to a round trip of about
/// 25 ms per link; parsing mode's `--channels` multiplies it.
const LINK_RECEIVE_BUFFER: usize = 2 << 20;

/// What the destination shim needs.
#[derive(Clone)]
pub struct DestinationConfig {
    /// Where the source shim connects.
    pub listen: String,
    /// The destination QEMU's incoming socket.
    pub qemu: Endpoint,
    /// Pre-shared key, if any.
    pub key: Option<Key>,
    /// Accept unauthenticated peers that are not on loopback.
    pub allow_remote_without_key: bool,
    /// How the return path is compressed.
    pub compression: Compression,
    /// The destination QEMU loads pages over its own multifd channels (parsing mode only).
    pub qemu_multifd: Option<QemuMultifd>,
    /// How long the source shim may stay unreachable before the migration fails
    /// ([`link::watch_liveness`]; default [`link::DEFAULT_LINK_TIMEOUT`]).
    pub link_timeout: Duration,
    /// Also hands each summary here (`--summary-json`).
    pub on_summary: Option<SummarySink>,
    /// Exit after one migration.
    pub once: bool,
    /// Progress and summaries.
    pub log: Log,
}

impl std::fmt::Debug for DestinationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationConfig")
            .field("listen", &self.listen)
            .field("qemu", &self.qemu)
            .finish()
    }
}

/// Runs the destination shim until killed (or, with `once`, until one migration ended).
pub fn run_destination(config: DestinationConfig) -> Result<Vec<Summary>, String> {
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    run_destination_on(listener, config)
}

/// Like [`run_destination`], on a bound listener.
pub fn run_destination_on(
    listener: TcpListener,
    config: DestinationConfig,
) -> Result<Vec<Summary>, String> {
    (config.log)(&format!(
        "destination shim: listening on {}; QEMU at {}; {}",
        listener.local_addr().map_err(|e| e.to_string())?,
        config.qemu,
        if config.key.is_some() {
            "authenticated"
        } else {
            "no key"
        }
    ));
    let sessions: Arc<Mutex<Vec<Arc<Session>>>> = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Summary>();
    let mut summaries = Vec::new();
    let listener = Listener::Tcp(listener);
    loop {
        if config.once && !summaries.is_empty() {
            return Ok(summaries);
        }
        let conn = match accept_or_done(&listener, &done_rx, &mut summaries, config.once)? {
            Some(conn) => conn,
            None => return Ok(summaries),
        };
        let Conn::Tcp(mut link) = conn else {
            unreachable!("the destination listens on TCP");
        };
        let (config, sessions, done_tx) = (config.clone(), sessions.clone(), done_tx.clone());
        let log = config.log.clone();
        let spawned = spawn_named("ps-dst-conn", move || {
            let peer = link.peer_addr().ok();
            let trusted =
                config.allow_remote_without_key || peer.is_some_and(|p| p.ip().is_loopback());
            match link::watch_liveness(&link, config.link_timeout)
                .and_then(|()| link::limit_receive_buffer(&link, LINK_RECEIVE_BUFFER))
            {
                Ok(true) => {}
                Ok(false) => (config.log)(&format!(
                    "destination shim: a link's receive buffer stays the kernel's to size                      (net.core.rmem_max is under {} KiB and the shim lacks CAP_NET_ADMIN): over                      a long path the source QEMU may then switch over early, with a longer                      downtime",
                    LINK_RECEIVE_BUFFER >> 10
                )),
                Err(e) => {
                    (config.log)(&format!(
                        "destination shim: cannot set up a link's socket: {e}"
                    ));
                    return;
                }
            }
            let _ = link.set_read_timeout(Some(config.link_timeout));
            // One migration at a time: this shim feeds one QEMU, which takes one incoming
            // migration. A connection of another session while one is under way is refused
            // (the other source shim says why), rather than fed to the same QEMU.
            let admit = |header: &LinkHeader| {
                let mut all = sessions.lock().expect("not poisoned");
                all.retain(|s| !s.main_done.load(Ordering::SeqCst));
                if let Some(s) = all.iter().find(|s| s.id == header.session) {
                    return Ok(s.clone());
                }
                // A failed session is being torn down; it holds nothing up.
                if let Some(busy) = all.iter().find(|s| s.failed().is_none()) {
                    return Err(format!(
                        "the destination shim is feeding migration {} to its QEMU ({}) and takes \
                         one migration at a time",
                        busy.hex(),
                        config.qemu
                    ));
                }
                let s = Session::new(header.session);
                all.push(s.clone());
                Ok(s)
            };
            let (header, session) =
                match link::accept_handshake(&mut link, config.key.as_ref(), trusted, admit) {
                    Ok(admitted) => admitted,
                    Err(e) => {
                        let why = match e {
                            link::LinkError::Refused(reason) => reason,
                            other => other.to_string(),
                        };
                        (config.log)(&format!(
                            "destination shim: refused {}: {why}",
                            peer.map_or("a peer".into(), |p| p.to_string())
                        ));
                        return;
                    }
                };
            let _ = link.set_read_timeout(None);
            let main = matches!(header.kind, StreamKind::Main | StreamKind::Pages);
            // Logs the session's summary and hands it on; whichever connection ends the session
            // says so (the session reports once).
            let report = |session: &Session| {
                session.report(
                    "destination shim",
                    &config.log,
                    config.on_summary.as_ref(),
                    &done_tx,
                )
            };
            match header.kind {
                StreamKind::Pages => {
                    if session.failed().is_some() {
                        // Too late: the session's transport gave up waiting for connections.
                        return;
                    }
                    // The first page-transport connection of a session carries the session; the
                    // others join it through its acceptor.
                    let rx = {
                        let mut tx = session.pages_tx.lock().expect("not poisoned");
                        if let Some(tx) = tx.as_ref() {
                            parsed::hand_over(&session, tx, link);
                            return;
                        }
                        let (new_tx, rx) = crossbeam_channel::unbounded();
                        parsed::hand_over(&session, &new_tx, link);
                        *tx = Some(new_tx);
                        rx
                    };
                    session.opened();
                    progress(session.clone(), "destination", config.log.clone());
                    if let Err(why) = parsed::destination_main(&session, &config, rx) {
                        session.fail(format!("main channel (parsing mode): {why}"));
                    }
                    session.closed(true);
                    session.wait_finished();
                    report(&session);
                    return;
                }
                StreamKind::ReturnPath => {
                    if let Err(why) = parsed::destination_return_path(&session, link) {
                        // The return path seldom fails on its own account: when the destination
                        // QEMU or the main stream fails, its break is the echo. Let the main
                        // channel's explanation be recorded first.
                        if session.failed().is_none() {
                            std::thread::sleep(ECHO_GRACE);
                        }
                        session.fail(format!("return path (parsing mode): {why}"));
                    }
                    return;
                }
                // Relayed to the destination QEMU as they are, once its main channel is
                // connected.
                StreamKind::Main | StreamKind::Multifd(_) | StreamKind::Unannounced => {}
            }
            if config.qemu_multifd.is_some() {
                // The destination QEMU waits for multifd channels that only this shim's
                // parsing mode opens, with barriers only it knows where to put.
                let why = match header.kind {
                    StreamKind::Multifd(_) => {
                        "the source QEMU migrates with multifd itself: its channels go to the \
                         destination QEMU as they are, so run the destination shim without \
                         --qemu-multifd"
                    }
                    _ => {
                        "the source shim carries QEMU's main channel opaque (its summary says \
                         why), and only parsing mode can feed the destination QEMU's multifd \
                         channels: run the destination shim without --qemu-multifd (and the \
                         destination QEMU without multifd)"
                    }
                };
                session.opened();
                session.fail(format!("{:?} channel: {why}", header.kind));
                if let Ok(clone) = link.try_clone() {
                    let _ = clone.shutdown(Shutdown::Both);
                }
                session.closed(main);
                // The session failed for good: say so now, whether its main channel came yet
                // or not (if it never comes, nothing else would).
                report(&session);
                return;
            }
            session.opened();
            if main {
                progress(session.clone(), "destination", config.log.clone());
            }
            let result = (|| -> Result<(), String> {
                if !main {
                    // QEMU takes its first connection as the main channel: wait for it.
                    session.wait_main_ready(QEMU_READY_TIMEOUT)?;
                }
                let qemu = connect_qemu(&config.qemu)?;
                if main {
                    session.set_main_ready();
                }
                relay(
                    qemu,
                    Vec::new(),
                    link,
                    &session,
                    false,
                    main,
                    config.compression,
                )
            })();
            if let Err(why) = result {
                session.fail(format!("{:?} channel: {why}", header.kind));
            }
            session.closed(main);
            if main {
                session.wait_finished();
                report(&session);
            }
        });
        if let Err(e) = spawned {
            // The connection closes with the thread's closure: its QEMU's migration fails.
            log(&format!(
                "destination shim: refused a connection: cannot start a thread: {e}"
            ));
        }
    }
}

/// How long a failure that is probably the echo of another waits before it is recorded.
const ECHO_GRACE: Duration = Duration::from_millis(250);
