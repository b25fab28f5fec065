//! Errors of a transport session.

use std::io;
use std::time::Duration;

use pagecodec::{DecodeError, EncodeError};

use crate::channel::ChannelError;
use crate::control::MessageError;

/// Why a session failed. Every variant says which end, channel or step it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Setting up a connection failed.
    #[error("{what}")]
    Connect {
        /// What was being connected, and to where.
        what: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The control connection failed.
    #[error("control connection: {what}")]
    Control {
        /// What was being done.
        what: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The peer sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A control message could not be decoded.
    #[error("bad control message from the peer")]
    BadMessage(#[source] MessageError),
    /// The destination refused the session.
    #[error("the destination refused the session: {reason}")]
    Refused {
        /// The destination's reason.
        reason: String,
    },
    /// A data channel failed.
    #[error("channel {channel}")]
    Channel {
        /// Channel index.
        channel: u16,
        /// What happened.
        #[source]
        source: ChannelError,
    },
    /// A channel's codec stream was refused by the decoder.
    #[error("channel {channel}: bad data")]
    Decode {
        /// Channel index.
        channel: u16,
        /// What the decoder found.
        #[source]
        source: DecodeError,
    },
    /// A channel's codec stream ended before its End frame.
    #[error("channel {channel}: the stream ended before its End frame ({frames} frames received)")]
    Truncated {
        /// Channel index.
        channel: u16,
        /// Frames received.
        frames: u64,
    },
    /// Encoding failed (a page outside the layout, a generation going back).
    #[error("channel {channel}: cannot encode")]
    Encode {
        /// Channel index.
        channel: u16,
        /// Why.
        #[source]
        source: EncodeError,
    },
    /// A page given to [`crate::Sender::send_shared`] is not in its [`crate::PageSource`].
    #[error("channel {channel}: {addr} is not in the memory the pages are read from")]
    NotInSource {
        /// Channel index.
        channel: u16,
        /// The page.
        addr: pagecodec::PageAddr,
    },
    /// The peer reported a failure.
    #[error("the peer reported a failure{}: {message}", channel.map(|c| format!(" on channel {c}")).unwrap_or_default())]
    Peer {
        /// The channel concerned, if any.
        channel: Option<u16>,
        /// The peer's description.
        message: String,
    },
    /// The peer stopped answering.
    #[error("no answer from the peer for {} s ({what})", .after.as_secs_f32())]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The caller used the session wrongly (a page outside memory, a finished session).
    #[error("{0}")]
    Usage(String),
    /// The session had already failed.
    #[error("the session already failed: {0}")]
    AlreadyFailed(String),
}

impl TransportError {
    /// The channel the error concerns, if any.
    pub fn channel(&self) -> Option<u16> {
        match self {
            TransportError::Channel { channel, .. }
            | TransportError::Decode { channel, .. }
            | TransportError::Truncated { channel, .. }
            | TransportError::Encode { channel, .. }
            | TransportError::NotInSource { channel, .. } => Some(*channel),
            TransportError::Peer { channel, .. } => *channel,
            _ => None,
        }
    }
}

/// The error with its chain of causes, on one line: what is sent to the peer and logged.
pub fn full_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
