//! The framing of routing exchanges: protobuf messages, length-delimited (tokio-util's
//! `LengthDelimitedCodec`, 4-byte big-endian length) on one bidirectional QUIC stream.
//!
//! Owns the bytes of one exchange; it knows nothing of what the messages mean.

use bytes::Bytes;
use futures_util::SinkExt;
use prost::Message;
use tokio_stream::StreamExt;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// Largest message of an exchange: a command carries a request of at most the front-end's
/// limit (12 MiB) plus its names; a services answer carries the specs of a node's user
/// functions.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// What went wrong on an exchange.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// the stream failed (the peer went away, reset it, or the frame was too long)
    #[error("the exchange failed: {0}")]
    Io(#[from] std::io::Error),
    /// a frame that is not the expected message
    #[error("an undecodable message: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// One exchange: our writer and the peer's.
pub struct Exchange {
    send: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
    recv: FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_MESSAGE)
        .new_codec()
}

impl Exchange {
    /// Frames a stream pair.
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Exchange {
            send: FramedWrite::new(send, codec()),
            recv: FramedRead::new(recv, codec()),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &impl Message) -> Result<(), WireError> {
        self.send
            .send(Bytes::from(message.encode_to_vec()))
            .await
            .map_err(WireError::Io)
    }

    /// The next message (none: the peer finished its side).
    pub async fn next<M: Message + Default>(&mut self) -> Result<Option<M>, WireError> {
        match self.recv.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(M::decode(frame?)?)),
        }
    }

    /// Ends our side: nothing more will be sent.
    pub fn finish(&mut self) {
        let _ = self.send.get_mut().finish();
    }

    /// Resolves when the peer stops reading (it went away, or dropped the exchange).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stopped = self.send.get_ref().stopped();
        async move {
            let _ = stopped.await;
        }
    }
}
