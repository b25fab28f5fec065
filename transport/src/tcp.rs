//! Blocking TCP sockets: the fallback backend where io_uring is not available.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;

use crate::channel::{
    Backlog, ChannelError, FrameAssembler, FrameReader, FrameWriter, closed_mid_frame,
};

/// Writes frames with `write_all`; a frame is sent (as far as this end can tell) when the call
/// returns, so backpressure is the socket buffer filling up.
#[derive(Debug)]
pub struct TcpFrameWriter {
    stream: TcpStream,
    sent: Vec<Vec<u8>>,
}

impl TcpFrameWriter {
    /// A writer on a connected socket.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            sent: Vec::new(),
        }
    }
}

impl FrameWriter for TcpFrameWriter {
    fn submit(&mut self, frame: Vec<u8>) -> Result<(), ChannelError> {
        self.stream
            .write_all(&frame)
            .map_err(|e| ChannelError::io("send", e))?;
        self.sent.push(frame);
        Ok(())
    }

    fn reclaim(&mut self, out: &mut Vec<Vec<u8>>) {
        out.append(&mut self.sent);
    }

    fn queued_bytes(&self) -> usize {
        0
    }

    fn backlog(&self) -> Backlog {
        Backlog::of_socket(self.stream.as_raw_fd(), 0)
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        self.stream.flush().map_err(|e| ChannelError::io("send", e))
    }

    fn finish(&mut self) -> Result<(), ChannelError> {
        self.flush()?;
        self.stream
            .shutdown(Shutdown::Write)
            .map_err(|e| ChannelError::io("shutdown", e))
    }
}

/// Reads as much as the socket has into a frame assembler, hands out whole frames.
#[derive(Debug)]
pub struct TcpFrameReader {
    stream: TcpStream,
    assembler: FrameAssembler,
}

impl TcpFrameReader {
    /// A reader on a connected socket, for frame bodies up to `max_body` bytes.
    pub fn new(stream: TcpStream, buffer: usize, max_body: u32) -> Self {
        Self {
            stream,
            assembler: FrameAssembler::new(buffer, max_body),
        }
    }
}

impl FrameReader for TcpFrameReader {
    fn next_frame(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        let len = loop {
            if let Some(len) = self.assembler.ready()? {
                break len;
            }
            if self.assembler.tail_too_small() {
                self.assembler.compact();
            }
            let n = match self.stream.read(self.assembler.tail()) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ChannelError::io("receive", e)),
            };
            if n == 0 {
                if self.assembler.pending() == 0 {
                    return Ok(None);
                }
                return Err(closed_mid_frame(&self.assembler));
            }
            self.assembler.filled(n);
        };
        Ok(Some(self.assembler.take(len)))
    }
}
