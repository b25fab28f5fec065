//! The boundary between the session and a channel backend.
//!
//! A backend moves whole pagecodec frames from a [`FrameWriter`] on the source to a
//! [`FrameReader`] on the destination, in order. Everything above (encoding, sessions, barriers,
//! failure handling) is the same for every backend: TCP with io_uring, blocking TCP, in-memory
//! queues, and later RDMA.

use std::io;

use pagecodec::HeaderError;
use pagecodec::wire::{FrameHeader, HEADER_LEN, MAX_FRAME_BODY};

/// What went wrong on one channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The operating system refused an operation.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({have} of {need} bytes received)")]
    ClosedMidFrame {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame has.
        need: usize,
    },
    /// The byte stream is not a sequence of frames.
    #[error("the byte stream is not a sequence of pagestream frames")]
    BadFrame(#[source] HeaderError),
}

impl ChannelError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        ChannelError::Io { op, source }
    }
}

/// The sending end of a channel.
pub trait FrameWriter: Send {
    /// Queues a whole frame for sending, in order after every frame submitted before. Blocks
    /// while the backend holds more than its limit of unsent bytes: that is the backpressure
    /// that slows encoding down to the link's pace.
    fn submit(&mut self, frame: Vec<u8>) -> Result<(), ChannelError>;

    /// Moves the buffers of frames that are fully sent into `out`, for reuse.
    fn reclaim(&mut self, out: &mut Vec<Vec<u8>>);

    /// Bytes submitted but not yet handed to the network.
    fn queued_bytes(&self) -> usize;

    /// Bytes submitted that the peer has not taken yet, and where they are (see [`Backlog`]).
    fn backlog(&self) -> Backlog {
        Backlog {
            queued: self.queued_bytes(),
            kernel_unsent: None,
            in_flight: 0,
        }
    }

    /// Waits until every submitted frame is handed to the network.
    fn flush(&mut self) -> Result<(), ChannelError>;

    /// Flushes, then tells the peer that nothing more will come.
    fn finish(&mut self) -> Result<(), ChannelError>;
}

/// The receiving end of a channel.
pub trait FrameReader: Send {
    /// The next whole frame, valid until the next call; `None` once the peer finished and every
    /// frame was read. Frames longer than the reader's limit are an error.
    fn next_frame(&mut self) -> Result<Option<&[u8]>, ChannelError>;
}

/// Bytes a channel holds that the peer has not taken yet, by where they wait.
///
/// Where they wait tells a full link from a slow peer. Bytes that wait to get on the link (in
/// the writer's queue, or unsent in the kernel's socket) show that the link takes them slower
/// than they come. Bytes on the wire that the peer has not acknowledged show only that
/// acknowledgements come late, which a receiver short of CPU causes as much as a slow link
/// does: on a fast link between two busy ends they pile up while the link itself idles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Submitted, not yet handed to the kernel (or, in process, to the peer).
    pub queued: usize,
    /// Handed to a kernel socket that has not sent them yet; `None` for backends without one.
    pub kernel_unsent: Option<usize>,
    /// Sent, not yet acknowledged by the peer (0 where the backend cannot tell).
    pub in_flight: usize,
}

impl Backlog {
    /// Bytes that wait to get on the link.
    pub fn unsent(&self) -> usize {
        self.queued + self.kernel_unsent.unwrap_or(0)
    }

    /// Every byte the peer has not taken yet.
    pub fn total(&self) -> usize {
        self.unsent() + self.in_flight
    }

    /// The backlog of a writer that has `queued` bytes not yet handed to the TCP socket `fd`:
    /// the kernel says how many of its bytes it has not sent (`SIOCOUTQNSD`) and how many the
    /// peer has not acknowledged (`TIOCOUTQ`, sent or not). A kernel that does not say counts
    /// as holding none.
    pub(crate) fn of_socket(fd: std::os::fd::RawFd, queued: usize) -> Self {
        let ioctl_int = |request: libc::Ioctl| {
            let mut value: libc::c_int = 0;
            // SAFETY: both requests write one int through the pointer, which points at a live
            // local; a bad descriptor or request only makes the call fail.
            let rc = unsafe { libc::ioctl(fd, request, &mut value) };
            if rc == 0 { value.max(0) as usize } else { 0 }
        };
        let unacknowledged = ioctl_int(libc::TIOCOUTQ);
        let unsent = ioctl_int(libc::SIOCOUTQNSD as libc::Ioctl).min(unacknowledged);
        Self {
            queued,
            kernel_unsent: Some(unsent),
            in_flight: unacknowledged - unsent,
        }
    }
}

/// Default limit on a frame body accepted by readers: the encoder's frames are a quarter of that.
pub const DEFAULT_MAX_FRAME_BODY: u32 = 1 << 20;

/// A receive buffer that turns a byte stream, received in pieces of any size, into whole frames.
///
/// Bytes `start..end` have been received but not yet taken; `end..capacity` is free. The free
/// tail can be filled through a raw pointer (an io_uring read in flight) while a frame before
/// `end` is being decoded: the buffer is kept as a raw allocation and slices are made over
/// exactly the ranges in use, so the two never overlap.
pub struct FrameAssembler {
    ptr: *mut u8,
    capacity: usize,
    start: usize,
    end: usize,
    max_body: u32,
}

// SAFETY: the assembler owns its allocation exclusively (like a Box<[u8]>); nothing in it is tied
// to the thread that created it.
unsafe impl Send for FrameAssembler {}

impl std::fmt::Debug for FrameAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameAssembler")
            .field("capacity", &self.capacity)
            .field("start", &self.start)
            .field("end", &self.end)
            .finish()
    }
}

impl FrameAssembler {
    /// A buffer of `capacity` bytes for frames with bodies up to `max_body` bytes. The capacity
    /// is raised to hold at least two of the largest frames.
    pub fn new(capacity: usize, max_body: u32) -> Self {
        let max_body = max_body.min(MAX_FRAME_BODY);
        let capacity = capacity.max(2 * (max_body as usize + HEADER_LEN + 8));
        let buf = vec![0u8; capacity].into_boxed_slice();
        Self {
            ptr: Box::into_raw(buf).cast::<u8>(),
            capacity,
            start: 0,
            end: 0,
            max_body,
        }
    }

    /// Length of the whole frame at the front, if all of it has arrived.
    pub fn ready(&self) -> Result<Option<usize>, ChannelError> {
        let available = self.end - self.start;
        if available < HEADER_LEN {
            return Ok(None);
        }
        let header = FrameHeader::parse(self.range(self.start, HEADER_LEN), self.max_body)
            .map_err(ChannelError::BadFrame)?;
        let len = header.frame_len();
        Ok((available >= len).then_some(len))
    }

    /// Takes the `len`-byte frame at the front (as [`FrameAssembler::ready`] announced it).
    pub fn take(&mut self, len: usize) -> &[u8] {
        assert!(
            len <= self.end - self.start,
            "taking more than was received"
        );
        let start = self.start;
        self.start += len;
        self.range(start, len)
    }

    /// Moves unread bytes to the front, making the whole tail free. Only while nothing writes
    /// into the tail.
    pub fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        let len = self.end - self.start;
        // SAFETY: both ranges lie inside the allocation; `copy` handles the overlap.
        unsafe { std::ptr::copy(self.ptr.add(self.start), self.ptr, len) };
        self.start = 0;
        self.end = len;
    }

    /// Whether the free tail is smaller than one more frame needs, so that a `compact` is due.
    pub fn tail_too_small(&self) -> bool {
        self.capacity - self.end < self.max_body as usize + HEADER_LEN + 8
    }

    /// The free tail, for a synchronous read.
    pub fn tail(&mut self) -> &mut [u8] {
        // SAFETY: `end..capacity` is inside the allocation, and `&mut self` guarantees no other
        // slice of the buffer is alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(self.end), self.capacity - self.end) }
    }

    /// The free tail as a raw pointer and length, for an asynchronous read. The caller must not
    /// `compact` or drop the assembler until that read completed.
    pub fn tail_raw(&mut self) -> (*mut u8, usize) {
        // SAFETY: `end <= capacity`, so the offset stays inside (or one past) the allocation.
        (unsafe { self.ptr.add(self.end) }, self.capacity - self.end)
    }

    /// The whole allocation, for registering it with the kernel.
    pub fn whole_raw(&mut self) -> (*mut u8, usize) {
        (self.ptr, self.capacity)
    }

    /// Records that `n` bytes were written at the start of the tail.
    pub fn filled(&mut self, n: usize) {
        assert!(n <= self.capacity - self.end, "filled past the buffer");
        self.end += n;
    }

    /// Bytes received but not yet taken.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// The length the frame at the front announces, if its header has arrived; for reporting a
    /// connection that closed mid-frame.
    pub fn announced_len(&self) -> Option<usize> {
        (self.pending() >= HEADER_LEN)
            .then(|| FrameHeader::parse(self.range(self.start, HEADER_LEN), self.max_body).ok())
            .flatten()
            .map(|h| h.frame_len())
    }

    fn range(&self, start: usize, len: usize) -> &[u8] {
        debug_assert!(start + len <= self.end);
        // SAFETY: `start..start + len` lies within received bytes `..end`, inside the allocation;
        // the asynchronous reader only ever writes at or after `end`.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) }
    }
}

impl Drop for FrameAssembler {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `capacity` came from `Box::into_raw` of a boxed slice of exactly that
        // length, and are freed only here.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.capacity)) });
    }
}

/// The error for a stream that ended while `assembler` still held part of a frame.
pub(crate) fn closed_mid_frame(assembler: &FrameAssembler) -> ChannelError {
    ChannelError::ClosedMidFrame {
        have: assembler.pending(),
        need: assembler.announced_len().unwrap_or(HEADER_LEN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecodec::{Encoder, EncoderConfig, MemoryLayout, PAGE_SIZE, PageAddr};

    fn frames() -> Vec<Vec<u8>> {
        let mut e =
            Encoder::new(EncoderConfig::new(0, MemoryLayout::new(vec![8]).unwrap())).unwrap();
        for i in 0..8 {
            e.encode(PageAddr::new(0, i), 0, &[i as u8 + 1; PAGE_SIZE])
                .unwrap();
        }
        e.finish().unwrap();
        std::iter::from_fn(|| e.pop_frame()).collect()
    }

    #[test]
    fn frames_come_out_whole_whatever_the_fragmentation() {
        let frames = frames();
        let bytes: Vec<u8> = frames.iter().flatten().copied().collect();
        for piece in [1, 7, 31, 4096, bytes.len()] {
            let mut asm = FrameAssembler::new(0, DEFAULT_MAX_FRAME_BODY);
            let mut out = Vec::new();
            for chunk in bytes.chunks(piece) {
                if asm.tail_too_small() {
                    asm.compact();
                }
                asm.tail()[..chunk.len()].copy_from_slice(chunk);
                asm.filled(chunk.len());
                while let Some(len) = asm.ready().unwrap() {
                    out.push(asm.take(len).to_vec());
                }
            }
            assert_eq!(out, frames, "pieces of {piece}");
            assert_eq!(asm.pending(), 0);
        }
    }

    #[test]
    fn garbage_and_oversized_frames_are_refused() {
        let mut asm = FrameAssembler::new(0, 1024);
        asm.tail()[..40].copy_from_slice(&[0x55; 40]);
        asm.filled(40);
        assert!(matches!(asm.ready(), Err(ChannelError::BadFrame(_))));

        let big = frames().remove(1);
        let mut asm = FrameAssembler::new(0, 16);
        asm.tail()[..64].copy_from_slice(&big[..64]);
        asm.filled(64);
        assert!(matches!(
            asm.ready(),
            Err(ChannelError::BadFrame(HeaderError::BodyTooLarge { .. }))
        ));
    }
}
