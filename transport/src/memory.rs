//! In-memory channels, for tests: bounded queues of frames with injectable faults, and a duplex
//! byte stream for the control connection.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, select, unbounded};

use crate::channel::{ChannelError, FrameReader, FrameWriter};

/// Faults to inject into an in-memory data channel.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// The writer fails (and the channel breaks) when it is given frame number `n` (0-based).
    pub kill_at_frame: Option<u64>,
    /// Frame number `n` has one byte in its body flipped on the way.
    pub corrupt_frame: Option<u64>,
    /// The reader waits this long before handing out each frame: a slow receiver.
    pub receive_delay: Option<Duration>,
}

/// Sending end of an in-memory data channel.
#[derive(Debug)]
pub struct MemFrameWriter {
    tx: Option<Sender<Vec<u8>>>,
    returned: Receiver<Vec<u8>>,
    killed: Receiver<()>,
    _switch: KillSwitch,
    frames: u64,
    faults: FaultPlan,
}

/// Receiving end of an in-memory data channel.
#[derive(Debug)]
pub struct MemFrameReader {
    rx: Receiver<Vec<u8>>,
    give_back: Sender<Vec<u8>>,
    killed: Receiver<()>,
    _switch: KillSwitch,
    current: Option<Vec<u8>>,
    delay: Option<Duration>,
}

/// Breaks a pipe from any thread, as shutting down a socket does: both ends unblock.
pub type PipeKiller = Arc<dyn Fn() + Send + Sync>;

/// The sender half of a pipe's kill channel. Nothing is ever sent on it: taking it out (the
/// killer does) disconnects the channel, which wakes both ends. Both ends hold the switch too,
/// so that dropping the killer alone breaks nothing.
type KillSwitch = Arc<Mutex<Option<Sender<()>>>>;

/// A data channel holding up to `capacity` frames in flight, and the switch that breaks it.
pub fn frame_pipe(
    capacity: usize,
    faults: FaultPlan,
) -> (MemFrameWriter, MemFrameReader, PipeKiller) {
    let (tx, rx) = bounded(capacity.max(1));
    let (give_back, returned) = unbounded();
    let (kill_tx, killed) = bounded::<()>(0);
    let switch: KillSwitch = Arc::new(Mutex::new(Some(kill_tx)));
    let killer: PipeKiller = {
        let switch = switch.clone();
        Arc::new(move || {
            switch.lock().expect("not poisoned").take();
        })
    };
    let delay = faults.receive_delay;
    (
        MemFrameWriter {
            tx: Some(tx),
            returned,
            killed: killed.clone(),
            _switch: switch.clone(),
            frames: 0,
            faults,
        },
        MemFrameReader {
            rx,
            give_back,
            killed,
            _switch: switch,
            current: None,
            delay,
        },
        killer,
    )
}

fn broken(what: &str) -> ChannelError {
    ChannelError::io(
        "send",
        io::Error::new(io::ErrorKind::BrokenPipe, what.to_string()),
    )
}

impl FrameWriter for MemFrameWriter {
    fn submit(&mut self, mut frame: Vec<u8>) -> Result<(), ChannelError> {
        let n = self.frames;
        self.frames += 1;
        if self.faults.kill_at_frame == Some(n) {
            self.tx = None;
            return Err(broken("channel killed by fault injection"));
        }
        if self.faults.corrupt_frame == Some(n) && frame.len() > 40 {
            let at = 32 + (frame.len() - 40) / 2;
            frame[at] ^= 0x40;
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| broken("channel already closed"))?;
        select! {
            send(tx, frame) -> sent => sent.map_err(|_| broken("receiver is gone")),
            recv(self.killed) -> _ => Err(broken("channel shut down")),
        }
    }

    fn reclaim(&mut self, out: &mut Vec<Vec<u8>>) {
        out.extend(self.returned.try_iter());
    }

    fn queued_bytes(&self) -> usize {
        self.tx.as_ref().map_or(0, Sender::len)
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ChannelError> {
        self.tx = None;
        Ok(())
    }
}

impl FrameReader for MemFrameReader {
    fn next_frame(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        if let Some(done) = self.current.take() {
            let _ = self.give_back.send(done);
        }
        let received = select! {
            recv(self.rx) -> frame => frame.ok(),
            recv(self.killed) -> _ => {
                return Err(ChannelError::io(
                    "receive",
                    io::Error::new(io::ErrorKind::ConnectionAborted, "channel shut down"),
                ));
            }
        };
        match received {
            Some(frame) => {
                if let Some(delay) = self.delay {
                    std::thread::sleep(delay);
                }
                Ok(Some(self.current.insert(frame).as_slice()))
            }
            // The writer is gone: finished, or killed. The codec tells the two apart (a finished
            // stream ended with its End frame).
            None => Ok(None),
        }
    }
}

/// One end of an in-memory duplex byte stream.
#[derive(Debug)]
pub struct MemStream {
    rx: Receiver<Vec<u8>>,
    tx: Arc<Mutex<Option<Sender<Vec<u8>>>>>,
    peer_tx: Arc<Mutex<Option<Sender<Vec<u8>>>>>,
    pending: Vec<u8>,
    read_timeout: Option<Duration>,
}

/// Two connected in-memory byte streams.
pub fn duplex() -> (MemStream, MemStream) {
    let (a_tx, a_rx) = unbounded();
    let (b_tx, b_rx) = unbounded();
    let a_tx = Arc::new(Mutex::new(Some(a_tx)));
    let b_tx = Arc::new(Mutex::new(Some(b_tx)));
    (
        MemStream {
            rx: b_rx,
            tx: a_tx.clone(),
            peer_tx: b_tx.clone(),
            pending: Vec::new(),
            read_timeout: None,
        },
        MemStream {
            rx: a_rx,
            tx: b_tx,
            peer_tx: a_tx,
            pending: Vec::new(),
            read_timeout: None,
        },
    )
}

impl MemStream {
    /// A second handle on the writing side, for another thread.
    pub fn writer(&self) -> MemStreamWriter {
        MemStreamWriter {
            tx: self.tx.clone(),
        }
    }

    /// Closes both directions, as `shutdown(Both)` on a socket: blocked reads on both ends
    /// return end-of-stream.
    pub fn closer(&self) -> impl Fn() + Send + Sync + 'static {
        let (tx, peer_tx) = (self.tx.clone(), self.peer_tx.clone());
        move || {
            tx.lock().expect("not poisoned").take();
            peer_tx.lock().expect("not poisoned").take();
        }
    }

    /// Makes reads fail with `TimedOut` after waiting `timeout`.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            let chunk = match self.read_timeout {
                Some(t) => match self.rx.recv_timeout(t) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(0),
                },
                None => match self.rx.recv() {
                    Ok(c) => c,
                    Err(_) => return Ok(0),
                },
            };
            self.pending = chunk;
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writing side of a [`MemStream`], usable from another thread.
#[derive(Debug, Clone)]
pub struct MemStreamWriter {
    tx: Arc<Mutex<Option<Sender<Vec<u8>>>>>,
}

impl Write for MemStreamWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let guard = self.tx.lock().expect("not poisoned");
        let tx = guard.as_ref().ok_or(io::ErrorKind::BrokenPipe)?;
        tx.send(buf.to_vec())
            .map_err(|_| io::ErrorKind::BrokenPipe)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplex_carries_bytes_and_closes() {
        let (mut a, mut b) = duplex();
        a.write_all(b"hello").unwrap();
        let mut buf = [0u8; 3];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hel");
        let close = a.closer();
        close();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"lo");
        assert!(b.write_all(b"x").is_err());
        b.set_read_timeout(Some(Duration::from_millis(10)));
        assert_eq!(b.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn faults_fire() {
        let (mut w, mut r, _) = frame_pipe(
            4,
            FaultPlan {
                kill_at_frame: Some(2),
                corrupt_frame: Some(1),
                receive_delay: None,
            },
        );
        w.submit(vec![1; 50]).unwrap();
        w.submit(vec![1; 50]).unwrap();
        assert!(w.submit(vec![1; 50]).is_err());
        assert_eq!(r.next_frame().unwrap().unwrap(), &[1; 50][..]);
        assert_ne!(r.next_frame().unwrap().unwrap(), &[1; 50][..]);
        assert!(r.next_frame().unwrap().is_none());
    }
}
