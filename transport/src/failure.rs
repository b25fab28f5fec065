//! The first failure of a session, and what it sets off.
//!
//! Any thread that hits an error calls [`Failure::fail`]. The first call wins: its error is kept
//! for the caller of the session, reported to the peer as an `Error` message, and every
//! connection of the session is shut down so that no thread stays blocked on a socket. Later
//! errors (mostly consequences of the shutdown) are ignored.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::control::Message;
use crate::error::{TransportError, full_message};
use crate::net::{Killer, Log, write_message};

/// The control connection's sending side, shared by the threads of one end.
pub(crate) type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// How long a connection error waits for the peer's explanation (see `fail_connection`).
pub(crate) const EXPLANATION_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `err` may be the consequence of the peer's failure rather than a cause of its own.
pub(crate) fn is_connection_error(err: &TransportError) -> bool {
    matches!(
        err,
        TransportError::Channel { .. } | TransportError::Truncated { .. }
    )
}

pub(crate) struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<TransportError>>,
    message: Mutex<String>,
    killers: Mutex<Vec<Killer>>,
    control: SharedWriter,
    log: Log,
    /// Disconnected on failure, so that `select!` waits can watch it.
    signal_tx: Mutex<Option<Sender<()>>>,
    signal_rx: Receiver<()>,
}

impl Failure {
    pub(crate) fn new(control: SharedWriter, log: Log) -> Arc<Self> {
        let (tx, rx) = bounded(0);
        Arc::new(Self {
            failed: AtomicBool::new(false),
            first: Mutex::new(None),
            message: Mutex::new(String::new()),
            killers: Mutex::new(Vec::new()),
            control,
            log,
            signal_tx: Mutex::new(Some(tx)),
            signal_rx: rx,
        })
    }

    /// Adds a connection to shut down on failure (at once, if the session already failed).
    pub(crate) fn add_killer(&self, killer: Killer) {
        if self.has_failed() {
            killer();
        }
        self.killers.lock().expect("not poisoned").push(killer);
    }

    /// Records `err` if it is the first failure, tells the peer (unless the peer told us),
    /// and shuts every connection down.
    ///
    /// A broken connection or a stream that ended early may only be the echo of a failure at
    /// the peer, which explains its failures on the control connection before it shuts its
    /// sockets; that explanation can arrive after a data channel noticed the shutdown. So such
    /// errors wait up to [`EXPLANATION_GRACE`] for another failure to be recorded first, and are
    /// reported only if none comes.
    pub(crate) fn fail(&self, err: TransportError) {
        if is_connection_error(&err) && !self.has_failed() {
            return self.fail_connection_now(err);
        }
        self.record(err);
    }

    fn fail_connection_now(&self, err: TransportError) {
        // Only data-channel threads get here, never the control reader, which is the thread
        // that records the peer's explanation.
        let deadline = std::time::Instant::now() + EXPLANATION_GRACE;
        while !self.has_failed() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.record(err);
    }

    fn record(&self, err: TransportError) {
        let mut first = self.first.lock().expect("not poisoned");
        if self.failed.swap(true, Ordering::SeqCst) {
            return;
        }
        let text = full_message(&err);
        (self.log)(&format!("session failed: {text}"));
        if !matches!(err, TransportError::Peer { .. }) {
            let message = Message::Error {
                channel: err.channel(),
                message: text.clone(),
            };
            // Best effort: if another thread is in the middle of a write (blocked on a dead
            // peer, say), the shutdown below tells the peer instead.
            if let Ok(mut writer) = self.control.try_lock() {
                let _ = write_message(&mut **writer, &message);
            }
        }
        *self.message.lock().expect("not poisoned") = text;
        *first = Some(err);
        drop(first);
        for killer in self.killers.lock().expect("not poisoned").iter() {
            killer();
        }
        self.signal_tx.lock().expect("not poisoned").take();
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The error to return to the caller: the first one, once; afterwards a reference to it.
    /// Called when the caller saw a sign of failure (a worker gone, a channel closed), which can
    /// come just before the failure is recorded (a connection error waits for the peer's
    /// explanation first): so it waits for the record, a little longer than that grace.
    pub(crate) fn error(&self) -> TransportError {
        let deadline = std::time::Instant::now() + EXPLANATION_GRACE * 2;
        while !self.has_failed() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if let Some(err) = self.first.lock().expect("not poisoned").take() {
            return err;
        }
        TransportError::AlreadyFailed(self.message.lock().expect("not poisoned").clone())
    }

    /// Becomes ready (disconnected) when the session fails.
    pub(crate) fn signal(&self) -> &Receiver<()> {
        &self.signal_rx
    }

    /// Shuts every connection down without recording a failure: the end of a session.
    pub(crate) fn close_all(&self) {
        for killer in self.killers.lock().expect("not poisoned").iter() {
            killer();
        }
    }
}
