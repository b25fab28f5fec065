//! One migration as either shim carries it: its QEMU connections, its byte counts, how its
//! stream ended and what the destination QEMU said, and the summary it reports.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pagestream_transport::net::Log;

use pagecodec::{ClassCounts, PageClass};

use crate::endpoint::Conn;
use crate::link::Moved;
use crate::process_use;
use crate::relay::AFTER_END_WAIT;
use crate::return_path::ReturnPathWatch;
use crate::source::Members;
use crate::stream_end::{EndWatch, StreamEnd};

/// Where a shim hands each migration's summary, besides its log: `(side, summary)`, side being
/// "source shim" or "destination shim".
pub type SummarySink = Arc<dyn Fn(&str, &Summary) + Send + Sync>;

/// How a migration went, as one shim saw it.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The session's id, as hex.
    pub session: String,
    /// How the stream was carried, and why.
    pub mode: String,
    /// QEMU connections carried (1 + multifd channels).
    pub connections: u32,
    /// From the first connection to the last byte.
    pub elapsed: Duration,
    /// Migration stream: bytes QEMU wrote, and bytes on the link.
    pub forward: Moved,
    /// Return path: bytes QEMU wrote back, and bytes on the link.
    pub back: Moved,
    /// Streams this shim received whose length and digest matched the sender's (links), or
    /// whose frames all passed their checksums and counts (parsing mode's pages): one per QEMU
    /// connection when all went well.
    pub verified: u32,
    /// Pages by class (parsing mode): how the page codec sent the main channel's pages.
    pub pages: Option<ClassCounts>,
    /// What the destination QEMU said at the end on its return path (`return-path` or
    /// `postcopy-ram`): it loaded the migration, or it could not. `None`: it said nothing this
    /// shim could read (no return path, QEMU's own TLS, or it never got that far).
    pub destination_loaded: Option<bool>,
    /// Whether the source QEMU finished its migration stream, by its last bytes (see
    /// `stream_end.rs`): `false`, it stopped midway (cancelled, or failed at the source).
    /// `None`: they cannot tell (QEMU's own TLS; a stream that ends in a bare EOF byte; parsing
    /// mode's destination when the source could not tell either).
    pub source_finished: Option<bool>,
    /// Destination: connections the destination QEMU closed once the migration was over,
    /// without reading their last bytes (QEMU 7.2's multifd channels end with a packet the
    /// destination need not read).
    pub closed_after_end: u32,
    /// CPU time the process running this shim spent from the session's start to its summary,
    /// all threads (see `process_use.rs`). `None` where it cannot be read.
    pub process_cpu: Option<Duration>,
    /// The most memory that process has held resident since it started, bytes.
    pub peak_resident: Option<u64>,
    /// The first failure, if any.
    pub error: Option<String>,
}

impl Summary {
    /// The summary as one JSON object, for programs (`--summary-json`).
    pub fn to_json(&self, side: &str) -> serde_json::Value {
        let moved = |m: &Moved| serde_json::json!({ "raw_bytes": m.raw, "wire_bytes": m.wire });
        let pages = self.pages.map(|counts| {
            PageClass::ALL
                .iter()
                .map(|&class| (class.name().to_string(), counts.pages(class).into()))
                .collect::<serde_json::Map<String, serde_json::Value>>()
        });
        serde_json::json!({
            "side": side,
            "session": self.session,
            "completed": self.error.is_none(),
            "mode": self.mode,
            "qemu_connections": self.connections,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "stream": moved(&self.forward),
            "return_path": moved(&self.back),
            "verified_streams": self.verified,
            "pages": pages,
            "destination_loaded": self.destination_loaded,
            "source_finished": self.source_finished,
            "closed_after_end": self.closed_after_end,
            "process": {
                "cpu_s": self.process_cpu.map(|cpu| cpu.as_secs_f64()),
                "peak_resident_bytes": self.peak_resident,
            },
            "error": self.error,
        })
    }

    /// A few lines for people.
    pub fn render(&self, side: &str) -> String {
        let ratio = self.forward.raw as f64 / self.forward.wire.max(1) as f64;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut text = format!(
            "{side}: migration {} {} in {:.2} s, mode {}\n  {} QEMU connection(s); stream {:.1} MiB raw, {:.1} MiB on the wire ({:.2}x), {:.1} MB/s raw\n  return path {} bytes",
            self.session,
            if self.error.is_none() {
                "completed"
            } else {
                "FAILED"
            },
            secs,
            self.mode,
            self.connections,
            self.forward.raw as f64 / (1 << 20) as f64,
            self.forward.wire as f64 / (1 << 20) as f64,
            ratio,
            self.forward.raw as f64 / secs / 1e6,
            self.back.raw,
        );
        if let Some(classes) = &self.pages {
            text.push_str(&format!(
                "\n  pages: {} zero, {} unchanged, {} duplicate, {} delta, {} zstd, {} LZ4, {} raw",
                classes.pages(PageClass::Zero),
                classes.pages(PageClass::Unchanged),
                classes.pages(PageClass::Duplicate),
                classes.pages(PageClass::Delta),
                classes.pages(PageClass::Zstd),
                classes.pages(PageClass::Lz4),
                classes.pages(PageClass::Raw),
            ));
        }
        text.push_str(&format!(
            "\n  {} of {} incoming stream(s) verified end to end (links: length and XXH3-64; \
             parsed pages: frame checksums and counts)",
            self.verified, self.connections
        ));
        if self.source_finished == Some(true) {
            text.push_str(
                "\n  the source QEMU finished its stream (it ends as a whole migration's does)",
            );
        }
        if let Some(loaded) = self.destination_loaded {
            text.push_str(if loaded {
                "\n  the destination QEMU loaded it (it said so on the return path)"
            } else {
                "\n  the destination QEMU did not confirm on its return path that it loaded it"
            });
        }
        if self.closed_after_end > 0 {
            text.push_str(&format!(
                "\n  the destination QEMU closed {} connection(s) once the migration was over, \
                 before reading their last bytes (QEMU 7.2 ends each multifd channel with a \
                 packet it need not read)",
                self.closed_after_end
            ));
        }
        if let Some(cpu) = self.process_cpu {
            text.push_str(&format!(
                "\n  this shim's process: {:.2} CPU-s over the migration",
                cpu.as_secs_f64()
            ));
            if let Some(peak) = self.peak_resident {
                text.push_str(&format!(
                    ", at most {:.0} MiB resident",
                    peak as f64 / (1 << 20) as f64
                ));
            }
        }
        if let Some(e) = &self.error {
            text.push_str(&format!("\n  error: {e}"));
        }
        text
    }
}

/// The mode of a session that nothing else was said of: every connection opaque.
pub const OPAQUE_MODE: &str = "opaque (every QEMU connection carried as a compressed byte stream)";

/// One migration in progress on either shim.
pub(crate) struct Session {
    pub(crate) id: [u8; 16],
    started: Instant,
    /// The process's CPU time when the session started.
    cpu_at_start: Option<Duration>,
    pub(crate) forward_raw: AtomicU64,
    /// Link bytes of the QEMU connections relayed as byte streams (opaque mode, and the
    /// multifd channels of a source QEMU in parsing mode).
    pub(crate) forward_wire: AtomicU64,
    /// Link bytes of parsing mode's main channel (its page transport and blobs), set as they
    /// grow: counted apart so that the relays' additions to [`Session::forward_wire`] beside
    /// it are not overwritten.
    pub(crate) parsed_wire: AtomicU64,
    /// Destination, parsing mode: bytes of the rebuilt main channel written to QEMU, set as
    /// they grow, apart from [`Session::forward_raw`] for the same reason.
    pub(crate) parsed_raw: AtomicU64,
    back_raw: AtomicU64,
    back_wire: AtomicU64,
    connections: AtomicU64,
    pub(crate) verified: AtomicU64,
    /// Connections carried and not yet finished.
    open: Mutex<u32>,
    /// The main channel is connected (destination: to QEMU).
    pub(crate) main_ready: Mutex<bool>,
    pub(crate) changed: Condvar,
    pub(crate) main_done: AtomicBool,
    /// Its summary was printed and handed on.
    reported: AtomicBool,
    error: Mutex<Option<String>>,
    /// Why a migration whose every byte was carried did not end (its stream ended early). It
    /// fails the summary like an error, unless an error came first, but shuts nothing down:
    /// the session winds down in order, return path included.
    unfinished: Mutex<Option<String>>,
    /// Sockets to shut down if the migration fails.
    pub(crate) kill: Mutex<Vec<Box<dyn Fn() + Send>>>,
    /// How the main channel was carried and why; opaque when unset.
    pub(crate) mode: Mutex<Option<String>>,
    /// Pages by class, in parsing mode.
    pub(crate) pages: Mutex<Option<ClassCounts>>,
    /// Destination, parsing mode: where the session's page-transport connections go.
    pub(crate) pages_tx: Mutex<Option<crossbeam_channel::Sender<TcpStream>>>,
    /// Destination, parsing mode: the main QEMU connection, for the return path.
    pub(crate) qemu_main: Mutex<Option<Conn>>,
    /// Source: the QEMU connections taken so far.
    pub(crate) members: Mutex<Members>,
    /// The main channel's return path, read as it passes.
    pub(crate) return_path: Mutex<ReturnPathWatch>,
    /// Opaque mode: the main channel's migration stream, read as it passes for its last bytes.
    pub(crate) stream_end: Mutex<EndWatch>,
    /// Parsing mode: whether the source QEMU finished its stream, as the parser told it (it
    /// reads the stream's last bytes itself).
    pub(crate) stream_told: Mutex<Option<bool>>,
    /// Source: the main channel runs in parsing mode. Its stream showed no postcopy, so its QEMU
    /// opens no [`StreamKind::Unannounced`](crate::link::StreamKind::Unannounced) connection.
    pub(crate) parsing: AtomicBool,
    /// Destination, parsing mode: the stream handed to QEMU ends as a whole migration's does
    /// (its device description, or its last footer and EOF, written).
    pub(crate) stream_delivered: AtomicBool,
    /// Destination, opaque mode: the destination QEMU closed its end of the main channel.
    pub(crate) destination_main_closed: AtomicBool,
    /// Destination: connections that QEMU closed once the migration was over, before reading
    /// their last bytes (`relay::ClosedAfterEnd`).
    pub(crate) closed_after_end: AtomicU64,
    /// How long a connection that QEMU closed waits for the migration to show it was over.
    pub(crate) after_end_wait: Duration,
}

impl Session {
    pub(crate) fn new(id: [u8; 16]) -> Arc<Self> {
        Arc::new(Session {
            id,
            started: Instant::now(),
            cpu_at_start: process_use::process_cpu_time(),
            forward_raw: AtomicU64::new(0),
            forward_wire: AtomicU64::new(0),
            parsed_wire: AtomicU64::new(0),
            parsed_raw: AtomicU64::new(0),
            back_raw: AtomicU64::new(0),
            back_wire: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            open: Mutex::new(0),
            main_ready: Mutex::new(false),
            changed: Condvar::new(),
            main_done: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            error: Mutex::new(None),
            unfinished: Mutex::new(None),
            kill: Mutex::new(Vec::new()),
            mode: Mutex::new(None),
            pages: Mutex::new(None),
            pages_tx: Mutex::new(None),
            qemu_main: Mutex::new(None),
            members: Mutex::new(Members::default()),
            parsing: AtomicBool::new(false),
            return_path: Mutex::new(ReturnPathWatch::default()),
            stream_end: Mutex::new(EndWatch::new()),
            stream_told: Mutex::new(None),
            stream_delivered: AtomicBool::new(false),
            destination_main_closed: AtomicBool::new(false),
            closed_after_end: AtomicU64::new(0),
            after_end_wait: AFTER_END_WAIT,
        })
    }

    /// Whether the migration is over at the destination QEMU: the whole stream was handed to
    /// it (by its last bytes, which both modes read), or, where those cannot be read (QEMU's
    /// own TLS), QEMU closed its main channel.
    pub(crate) fn over_at_destination(&self) -> bool {
        if self.stream_delivered.load(Ordering::SeqCst) {
            return true;
        }
        match self.stream_end.lock().expect("not poisoned").verdict() {
            StreamEnd::Finished => true,
            StreamEnd::Cut => false,
            StreamEnd::Unknown => self.destination_main_closed.load(Ordering::SeqCst),
        }
    }

    /// Shuts `kill` down too if the migration fails.
    pub(crate) fn on_failure(&self, kill: Box<dyn Fn() + Send>) {
        // Under the error's lock, as `fail` runs them: a session that failed already runs it
        // now (a connection opened after the failure must not wait on a peer that is gone).
        let error = self.error.lock().expect("not poisoned");
        if error.is_some() {
            drop(error);
            kill();
            return;
        }
        self.kill.lock().expect("not poisoned").push(kill);
    }

    /// The first failure so far.
    pub(crate) fn failed(&self) -> Option<String> {
        self.error.lock().expect("not poisoned").clone()
    }

    /// Waits until the main channel is connected to the destination QEMU.
    pub(crate) fn wait_main_ready(&self, timeout: Duration) -> Result<(), String> {
        let mut ready = self.main_ready.lock().expect("not poisoned");
        let deadline = Instant::now() + timeout;
        while !*ready {
            if Instant::now() >= deadline {
                return Err("the main channel never came".into());
            }
            if let Some(e) = self.failed() {
                return Err(format!("the session failed: {e}"));
            }
            ready = self
                .changed
                .wait_timeout(ready, Duration::from_millis(50))
                .expect("not poisoned")
                .0;
        }
        Ok(())
    }

    /// Marks the main channel connected to the destination QEMU.
    pub(crate) fn set_main_ready(&self) {
        *self.main_ready.lock().expect("not poisoned") = true;
        self.changed.notify_all();
    }

    /// Link bytes of the migration stream, every connection's.
    pub(crate) fn forward_wire_bytes(&self) -> u64 {
        self.forward_wire.load(Ordering::Relaxed) + self.parsed_wire.load(Ordering::Relaxed)
    }

    /// Raw bytes of the migration stream, every connection's.
    pub(crate) fn forward_raw_bytes(&self) -> u64 {
        self.forward_raw.load(Ordering::Relaxed) + self.parsed_raw.load(Ordering::Relaxed)
    }

    /// The counters of the migration stream (`true`) or of the return path.
    pub(crate) fn direction(&self, forward: bool) -> (&AtomicU64, &AtomicU64) {
        if forward {
            (&self.forward_raw, &self.forward_wire)
        } else {
            (&self.back_raw, &self.back_wire)
        }
    }

    pub(crate) fn hex(&self) -> String {
        self.id[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Records the first failure and shuts every socket of the session down, so that neither
    /// QEMU waits on a migration that cannot finish.
    pub(crate) fn fail(&self, what: String) {
        let mut error = self.error.lock().expect("not poisoned");
        if error.is_none() {
            *error = Some(what);
            for kill in self.kill.lock().expect("not poisoned").iter() {
                kill();
            }
        }
    }

    /// Prints the session's summary and hands it on, once per session whichever of its
    /// connections gets here first.
    pub(crate) fn report(
        &self,
        side: &str,
        log: &Log,
        sink: Option<&SummarySink>,
        done: &std::sync::mpsc::Sender<Summary>,
    ) {
        if self.reported.swap(true, Ordering::SeqCst) {
            return;
        }
        let summary = self.summary();
        log(&summary.render(side));
        if let Some(sink) = sink {
            sink(side, &summary);
        }
        let _ = done.send(summary);
    }

    pub(crate) fn summary(&self) -> Summary {
        let failed = self.failed();
        let destination_loaded = self
            .return_path
            .lock()
            .expect("not poisoned")
            .loaded(failed.is_some());
        let told = *self.stream_told.lock().expect("not poisoned");
        let source_finished = told.or(
            match self.stream_end.lock().expect("not poisoned").verdict() {
                StreamEnd::Finished => Some(true),
                StreamEnd::Cut => Some(false),
                StreamEnd::Unknown => None,
            },
        );
        Summary {
            session: self.hex(),
            mode: self
                .mode
                .lock()
                .expect("not poisoned")
                .clone()
                .unwrap_or_else(|| OPAQUE_MODE.into()),
            connections: self.connections.load(Ordering::Relaxed) as u32,
            elapsed: self.started.elapsed(),
            forward: Moved {
                raw: self.forward_raw_bytes(),
                wire: self.forward_wire_bytes(),
            },
            back: Moved {
                raw: self.back_raw.load(Ordering::Relaxed),
                wire: self.back_wire.load(Ordering::Relaxed),
            },
            verified: self.verified.load(Ordering::Relaxed) as u32,
            pages: *self.pages.lock().expect("not poisoned"),
            destination_loaded,
            source_finished,
            closed_after_end: self.closed_after_end.load(Ordering::Relaxed) as u32,
            process_cpu: process_use::process_cpu_time()
                .zip(self.cpu_at_start)
                .map(|(now, start)| now.saturating_sub(start)),
            peak_resident: process_use::peak_resident_bytes(),
            // What this shim saw first; then how the source's stream ended; then what the
            // destination QEMU said (the only word where the stream's end cannot tell).
            error: failed
                .or_else(|| self.unfinished.lock().expect("not poisoned").clone())
                .or_else(|| (source_finished == Some(false)).then(|| STREAM_CUT.to_string()))
                .or_else(|| {
                    (destination_loaded == Some(false)).then(|| {
                        "the destination QEMU did not confirm on its return path that it \
                         loaded the migration: the source cancelled it, or the destination QEMU \
                         refused what it read (its log says why)"
                            .to_string()
                    })
                }),
        }
    }

    /// Records that the migration did not end although everything was carried (see
    /// `unfinished`).
    pub(crate) fn unfinished(&self, why: String) {
        self.unfinished
            .lock()
            .expect("not poisoned")
            .get_or_insert(why);
    }

    /// A connection of the session that is not one of QEMU's (parsing mode's return path): the
    /// session waits for it, the summary does not count it.
    pub(crate) fn helper_opened(&self) {
        *self.open.lock().expect("not poisoned") += 1;
    }

    pub(crate) fn opened(&self) {
        *self.open.lock().expect("not poisoned") += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, main: bool) {
        *self.open.lock().expect("not poisoned") -= 1;
        if main {
            self.main_done.store(true, Ordering::SeqCst);
        }
        self.changed.notify_all();
    }

    /// Waits until the main channel and every other connection have finished.
    pub(crate) fn wait_finished(&self) {
        let mut open = self.open.lock().expect("not poisoned");
        while !(self.main_done.load(Ordering::SeqCst) && *open == 0) {
            open = self
                .changed
                .wait_timeout(open, Duration::from_millis(100))
                .expect("not poisoned")
                .0;
        }
    }
}

/// Prints a progress line every second while the session runs.
pub(crate) fn progress(session: Arc<Session>, side: &'static str, log: Log) {
    // The stream's raw bytes come from QEMU at the source and go to QEMU at the destination.
    let qemu = if side == "destination" {
        "to QEMU"
    } else {
        "from QEMU"
    };
    let warn = log.clone();
    let spawned = spawn_named("ps-progress", move || {
        let mut last = 0;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            if session.main_done.load(Ordering::SeqCst) {
                return;
            }
            let raw = session.forward_raw_bytes();
            let wire = session.forward_wire_bytes();
            log(&format!(
                "{side} {}: {:.1} MiB {qemu}, {:.1} MiB on the wire ({:.2}x), {:.1} MB/s",
                session.hex(),
                raw as f64 / (1 << 20) as f64,
                wire as f64 / (1 << 20) as f64,
                raw as f64 / wire.max(1) as f64,
                (raw - last) as f64 / 1e6
            ));
            last = raw;
        }
    });
    if let Err(e) = spawned {
        warn(&format!(
            "{side} shim: no progress lines for this migration: cannot start a thread: {e}"
        ));
    }
}

/// Why a migration whose stream the source QEMU stopped midway failed (opaque mode).
const STREAM_CUT: &str = "the source QEMU ended its migration stream midway (its last bytes \
     are not the end of a migration): the migration was cancelled or failed at the source";

/// Starts a thread named `name`: profiles and `top -H` then tell the shims' threads apart.
/// A system out of threads says so (`std::thread::spawn` would panic).
pub(crate) fn spawn_named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When a destination QEMU's closing of a multifd channel comes after the end: the stream
    /// handed to it ends as a finished migration's (parsing mode says so itself), or, where its
    /// bytes say nothing (QEMU's own TLS), QEMU closed its main channel too. A stream that was
    /// cut is never over, whatever QEMU closed.
    #[test]
    fn the_end_at_the_destination_is_told_by_the_stream_or_the_main_channel() {
        use crate::stream::{CONFIGURATION, SECTION_EOF, VMDESCRIPTION};
        let mut opening = b"QEVM\0\0\0\x03".to_vec();
        opening.push(CONFIGURATION);
        opening.extend_from_slice(&4u32.to_be_bytes());
        opening.extend_from_slice(b"pc-q");
        let json = b"{\"page_size\":4096}";
        let mut end = vec![SECTION_EOF, VMDESCRIPTION];
        end.extend_from_slice(&(json.len() as u32).to_be_bytes());
        end.extend_from_slice(json);
        let over = |bytes: &[&[u8]], main_closed: bool| {
            let session = Session::new([2; 16]);
            for b in bytes {
                session.stream_end.lock().unwrap().feed(b);
            }
            session
                .destination_main_closed
                .store(main_closed, Ordering::SeqCst);
            session.over_at_destination()
        };
        assert!(over(&[&opening, &[7; 100], &end], false));
        assert!(!over(&[&opening, &[7; 100]], false));
        assert!(!over(&[&opening, &[7; 100]], true), "a cut stream");
        // TLS records: nothing to read in them.
        let tls = [0x16, 0x03, 0x03, 0x00, 0x40];
        assert!(!over(&[&tls, &[9; 64]], false));
        assert!(over(&[&tls, &[9; 64]], true));
        let parsed = Session::new([3; 16]);
        assert!(!parsed.over_at_destination());
        parsed.stream_delivered.store(true, Ordering::SeqCst);
        assert!(parsed.over_at_destination());
    }

    #[test]
    fn a_summary_reads_the_same_as_json() {
        let mut pages = ClassCounts::default();
        pages.add(PageClass::Zero, 10, 4);
        pages.add(PageClass::Lz4, 3, 5000);
        let summary = Summary {
            session: "0123456789ab".into(),
            mode: "parsing".into(),
            connections: 1,
            elapsed: Duration::from_millis(2500),
            forward: Moved {
                raw: 1000,
                wire: 400,
            },
            back: Moved { raw: 0, wire: 20 },
            verified: 1,
            pages: Some(pages),
            destination_loaded: Some(true),
            source_finished: Some(true),
            closed_after_end: 2,
            process_cpu: Some(Duration::from_millis(1250)),
            peak_resident: Some(150 << 20),
            error: None,
        };
        let json = summary.to_json("source shim");
        assert_eq!(json["side"], "source shim");
        assert_eq!(json["completed"], true);
        assert_eq!(json["elapsed_s"], 2.5);
        assert_eq!(json["stream"]["raw_bytes"], 1000);
        assert_eq!(json["stream"]["wire_bytes"], 400);
        assert_eq!(json["return_path"]["wire_bytes"], 20);
        assert_eq!(json["verified_streams"], 1);
        assert_eq!(json["pages"]["zero"], 10);
        assert_eq!(json["pages"]["lz4"], 3);
        assert_eq!(json["error"], serde_json::Value::Null);
        assert_eq!(json["destination_loaded"], true);
        assert_eq!(json["source_finished"], true);
        assert_eq!(json["closed_after_end"], 2);
        assert_eq!(json["process"]["cpu_s"], 1.25);
        assert_eq!(json["process"]["peak_resident_bytes"], 150 << 20);
        let text = summary.render("source shim");
        assert!(
            text.contains(
                "this shim's process: 1.25 CPU-s over the migration, at most 150 MiB resident"
            ),
            "{text}"
        );
        assert!(
            text.contains("the source QEMU finished its stream"),
            "{text}"
        );
        assert!(
            text.contains("closed 2 connection(s) once the migration was over"),
            "{text}"
        );
        let failed = Summary {
            error: Some("the other shim stopped answering".into()),
            pages: None,
            ..summary
        };
        let json = failed.to_json("destination shim");
        assert_eq!(json["completed"], false);
        assert_eq!(json["error"], "the other shim stopped answering");
        assert_eq!(json["pages"], serde_json::Value::Null);
    }
}
