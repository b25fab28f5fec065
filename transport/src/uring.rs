//! TCP over io_uring: batched sends and read-ahead receives into a registered buffer.
//!
//! One ring per channel thread. On the sending side a single `SendMsg` is in flight per socket
//! at any time, covering up to [`MAX_IOV`] queued frames (one submission for many frames, and no
//! way for two sends on a stream socket to interleave); a short send resumes where it stopped.
//! On the receiving side a `ReadFixed` into the free tail of a registered buffer is kept in
//! flight while the caller decodes the frame before it.
//!
//! Buffers handed to the kernel stay owned by the writer or reader until their operation has
//! completed; `Drop` shuts the socket down and waits for an operation still in flight.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;

use io_uring::{IoUring, Probe, opcode, types};

use crate::channel::{
    Backlog, ChannelError, FrameAssembler, FrameReader, FrameWriter, closed_mid_frame,
};

/// Most frames covered by one send.
pub const MAX_IOV: usize = 64;
const RING_ENTRIES: u32 = 8;

/// Checks that this kernel (and any seccomp profile around us) lets us create a ring and use the
/// operations the backend needs.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(RING_ENTRIES)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (name, code) in [
        ("SENDMSG", opcode::SendMsg::CODE),
        ("READ_FIXED", opcode::ReadFixed::CODE),
        ("RECV", opcode::Recv::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring on this kernel lacks {name}"),
            ));
        }
    }
    Ok(())
}

/// Submits and waits for at least `want` completions, retrying on signals.
fn submit_and_wait(ring: &IoUring, want: usize) -> io::Result<()> {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A send in flight: the message header and the vectors it points to, at a stable address.
struct SendOp {
    iov: [libc::iovec; MAX_IOV],
    msg: libc::msghdr,
}

/// Sends frames through io_uring.
pub struct UringFrameWriter {
    ring: IoUring,
    stream: TcpStream,
    /// Frames not yet fully sent, oldest first; the first ones may be in flight.
    queue: VecDeque<Vec<u8>>,
    /// Bytes of `queue[0]` already sent.
    offset: usize,
    /// Unsent bytes in `queue`.
    queued: usize,
    /// `submit` blocks while more than this is unsent.
    limit: usize,
    in_flight: Option<Box<SendOp>>,
    done: Vec<Vec<u8>>,
}

// SAFETY: the raw pointers in `in_flight` point into buffers this writer owns (frames in `queue`,
// the `SendOp` box itself); nothing in the writer is tied to the creating thread.
unsafe impl Send for UringFrameWriter {}

impl std::fmt::Debug for UringFrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFrameWriter")
            .field("queued", &self.queued)
            .field("frames", &self.queue.len())
            .finish()
    }
}

impl UringFrameWriter {
    /// A writer on a connected socket that lets up to `limit` unsent bytes queue up.
    pub fn new(stream: TcpStream, limit: usize) -> io::Result<Self> {
        Ok(Self {
            ring: IoUring::new(RING_ENTRIES)?,
            stream,
            queue: VecDeque::new(),
            offset: 0,
            queued: 0,
            limit,
            in_flight: None,
            done: Vec::new(),
        })
    }

    /// Starts a send of the queued frames, if none is in flight.
    fn start_send(&mut self) -> Result<(), ChannelError> {
        if self.in_flight.is_some() || self.queue.is_empty() {
            return Ok(());
        }
        // SAFETY: iovec and msghdr are plain C structs for which all-zero is a valid value.
        let mut op: Box<SendOp> = Box::new(unsafe { std::mem::zeroed() });
        let mut n = 0;
        for (i, frame) in self.queue.iter().take(MAX_IOV).enumerate() {
            let skip = if i == 0 { self.offset } else { 0 };
            op.iov[n] = libc::iovec {
                iov_base: frame[skip..].as_ptr() as *mut libc::c_void,
                iov_len: frame.len() - skip,
            };
            n += 1;
        }
        op.msg.msg_iov = op.iov.as_mut_ptr();
        op.msg.msg_iovlen = n;
        let entry = opcode::SendMsg::new(types::Fd(self.stream.as_raw_fd()), &op.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(1);
        // SAFETY: the message header, its vectors and the frame bytes they point to are owned by
        // this writer and stay where they are until the completion is reaped (`op` is boxed and
        // kept in `in_flight`; frames stay in `queue`, whose elements' heap buffers do not move).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| {
            ChannelError::io("queue a send", io::Error::other("submission queue full"))
        })?;
        self.in_flight = Some(op);
        self.ring
            .submit()
            .map_err(|e| ChannelError::io("submit a send", e))?;
        Ok(())
    }

    /// Reaps the completion of the send in flight, waiting for it if `wait`.
    fn reap(&mut self, wait: bool) -> Result<(), ChannelError> {
        if self.in_flight.is_none() {
            return Ok(());
        }
        if wait {
            submit_and_wait(&self.ring, 1).map_err(|e| ChannelError::io("wait for a send", e))?;
        }
        let Some(cqe) = self.ring.completion().next() else {
            return Ok(());
        };
        self.in_flight = None;
        let res = cqe.result();
        if res < 0 {
            return Err(ChannelError::io("send", io::Error::from_raw_os_error(-res)));
        }
        if res == 0 {
            return Err(ChannelError::io("send", io::ErrorKind::WriteZero.into()));
        }
        self.advance(res as usize);
        Ok(())
    }

    /// Accounts `n` bytes as sent: finished frames move to `done`.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self
                .queue
                .front()
                .expect("sent bytes belong to queued frames");
            let rest = front.len() - self.offset;
            if n >= rest {
                n -= rest;
                self.queued -= rest;
                self.offset = 0;
                let frame = self.queue.pop_front().expect("front exists");
                self.done.push(frame);
            } else {
                self.offset += n;
                self.queued -= n;
                n = 0;
            }
        }
    }
}

impl FrameWriter for UringFrameWriter {
    fn submit(&mut self, frame: Vec<u8>) -> Result<(), ChannelError> {
        if frame.is_empty() {
            return Ok(());
        }
        self.queued += frame.len();
        self.queue.push_back(frame);
        self.reap(false)?;
        self.start_send()?;
        while self.queued > self.limit {
            self.reap(true)?;
            self.start_send()?;
        }
        Ok(())
    }

    fn reclaim(&mut self, out: &mut Vec<Vec<u8>>) {
        out.append(&mut self.done);
    }

    fn queued_bytes(&self) -> usize {
        self.queued
    }

    fn backlog(&self) -> Backlog {
        Backlog::of_socket(self.stream.as_raw_fd(), self.queued)
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        while !self.queue.is_empty() {
            self.start_send()?;
            self.reap(true)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ChannelError> {
        self.flush()?;
        self.stream
            .shutdown(Shutdown::Write)
            .map_err(|e| ChannelError::io("shutdown", e))
    }
}

impl Drop for UringFrameWriter {
    fn drop(&mut self) {
        if self.in_flight.is_some() {
            // Make the send finish now, then wait: the kernel must be done with our buffers.
            let _ = self.stream.shutdown(Shutdown::Both);
            while self.ring.completion().next().is_none() {
                if submit_and_wait(&self.ring, 1).is_err() {
                    // Cannot confirm the kernel is done: leak the buffers rather than free
                    // memory it may still read.
                    std::mem::forget(std::mem::take(&mut self.queue));
                    std::mem::forget(self.in_flight.take());
                    return;
                }
            }
        }
    }
}

/// Receives frames through io_uring, reading ahead while the caller decodes.
pub struct UringFrameReader {
    ring: IoUring,
    stream: TcpStream,
    assembler: FrameAssembler,
    /// Whether the receive buffer is registered (reads are `ReadFixed`), or reads are plain
    /// `Recv` because registration was refused (locked-memory limit).
    fixed: bool,
    in_flight: bool,
    eof: bool,
}

// SAFETY: the only raw pointer use is the read in flight into the assembler's buffer, which this
// reader owns; nothing is tied to the creating thread.
unsafe impl Send for UringFrameReader {}

impl std::fmt::Debug for UringFrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFrameReader")
            .field("fixed", &self.fixed)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl UringFrameReader {
    /// A reader on a connected socket, with a receive buffer of at least `buffer` bytes, for
    /// frame bodies up to `max_body` bytes.
    pub fn new(stream: TcpStream, buffer: usize, max_body: u32) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut assembler = FrameAssembler::new(buffer, max_body);
        let (ptr, len) = assembler.whole_raw();
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        // SAFETY: the buffer is owned by `assembler`, which lives in the reader next to the ring
        // and is dropped after it (field order), so it stays valid while registered.
        let fixed = unsafe { ring.submitter().register_buffers(&[iov]) }.is_ok();
        Ok(Self {
            ring,
            stream,
            assembler,
            fixed,
            in_flight: false,
            eof: false,
        })
    }

    fn submit_read(&mut self) -> Result<(), ChannelError> {
        let (ptr, len) = self.assembler.tail_raw();
        if len == 0 {
            return Ok(());
        }
        let len = len.min(u32::MAX as usize) as u32;
        let fd = types::Fd(self.stream.as_raw_fd());
        let entry = if self.fixed {
            opcode::ReadFixed::new(fd, ptr, len, 0).build()
        } else {
            opcode::Recv::new(fd, ptr, len).build()
        };
        // SAFETY: the read targets the assembler's free tail, which nothing else touches until
        // the completion is reaped (`compact` and drop wait for it, see `in_flight`).
        unsafe { self.ring.submission().push(&entry.user_data(2)) }.map_err(|_| {
            ChannelError::io("queue a receive", io::Error::other("submission queue full"))
        })?;
        self.in_flight = true;
        self.ring
            .submit()
            .map_err(|e| ChannelError::io("submit a receive", e))?;
        Ok(())
    }

    fn reap(&mut self, wait: bool) -> Result<(), ChannelError> {
        if !self.in_flight {
            return Ok(());
        }
        if wait {
            submit_and_wait(&self.ring, 1)
                .map_err(|e| ChannelError::io("wait for a receive", e))?;
        }
        let Some(cqe) = self.ring.completion().next() else {
            return Ok(());
        };
        self.in_flight = false;
        match cqe.result() {
            res if res < 0 => Err(ChannelError::io(
                "receive",
                io::Error::from_raw_os_error(-res),
            )),
            0 => {
                self.eof = true;
                Ok(())
            }
            res => {
                self.assembler.filled(res as usize);
                Ok(())
            }
        }
    }
}

impl FrameReader for UringFrameReader {
    fn next_frame(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        let len = loop {
            self.reap(false)?;
            if let Some(len) = self.assembler.ready()? {
                if !self.in_flight && !self.eof && !self.assembler.tail_too_small() {
                    // Receive the next bytes while the caller decodes this frame.
                    self.submit_read()?;
                }
                break len;
            }
            if self.eof {
                if self.assembler.pending() == 0 {
                    return Ok(None);
                }
                return Err(closed_mid_frame(&self.assembler));
            }
            if !self.in_flight {
                if self.assembler.tail_too_small() {
                    self.assembler.compact();
                }
                self.submit_read()?;
            }
            self.reap(true)?;
        };
        Ok(Some(self.assembler.take(len)))
    }
}

impl Drop for UringFrameReader {
    fn drop(&mut self) {
        if self.in_flight {
            let _ = self.stream.shutdown(Shutdown::Both);
            while self.ring.completion().next().is_none() {
                if submit_and_wait(&self.ring, 1).is_err() {
                    // The kernel may still write into the buffer: never free it.
                    let assembler =
                        std::mem::replace(&mut self.assembler, FrameAssembler::new(0, 0));
                    std::mem::forget(assembler);
                    return;
                }
            }
        }
    }
}
