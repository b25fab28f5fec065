//! # pagestream-transport: pages from one host to another, over several channels
//!
//! A session has one control connection and N data channels. Pages are spread over the
//! channels by address ([`pagecodec::ShardMap`]), each channel carrying one pagecodec stream,
//! so every version of a page travels in order on one channel and channels need no ordering
//! between them; barriers (end of a pass, end of the session) and opaque data (device state)
//! go over the control connection. See `DESIGN.md` for the protocol and the pipeline.
//!
//! - Source: [`Sender::connect`], then [`Sender::send_page`] for every page of a pass (or
//!   [`Sender::send_shared`], where the workers can read guest memory themselves through a
//!   [`PageSource`]), [`Sender::end_pass`], [`Sender::send_blob`], [`Sender::finish`].
//! - Destination: [`accept`] (handshake), then [`PendingSession::run`] with one
//!   [`pagecodec::PageSink`] per channel.
//! - Backends: io_uring TCP ([`uring`]) with a blocking-socket fallback ([`tcp`]), in-memory
//!   ([`memory`]) for tests; all behind [`channel::FrameWriter`] and [`channel::FrameReader`].

mod adaptive;
pub mod channel;
pub mod control;
pub mod error;
mod failure;
pub mod memory;
pub mod net;
pub mod receiver;
pub mod sender;
pub mod stats;
pub mod tcp;
pub mod uring;

pub use error::TransportError;
pub use net::{
    Acceptor, Connector, StreamAcceptor, StreamSetup, TcpAcceptor, TcpBackend, TcpConnector,
    memory_network,
};
pub use receiver::{PendingSession, ReceiveSummary, ReceiverConfig, ReceiverEvent, accept};
pub use sender::{Compression, PageSource, SendSummary, Sender, SenderConfig, default_channels};
pub use stats::{SessionStats, StatsSnapshot};
