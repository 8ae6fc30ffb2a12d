//! A server-streamed call as its client holds it: the outcomes arriving, and the guard that
//! tells the entity when the client drops the call (a cancellation).
//!
//! Owns the client side of one streamed call. It must not know the CloudState protocol: the
//! entity machine decides what a cancellation means.

use tokio::sync::mpsc;

use super::router::EntityMsg;
use super::status::{Outcome, Status};

/// How many messages a streamed call buffers for a client that reads slowly; one more slot is
/// kept for the failure that ends the call when the client does not keep up.
pub const CLIENT_BUFFER: usize = 64;

/// A server-streamed call in progress: its outcomes, and a guard that tells the entity when
/// the caller drops it (the client cancelled).
pub struct StreamedCall {
    /// the messages (`Ok(None)`: an empty element, nothing for the client), then the end
    /// (closed channel: OK) or a failure
    pub outcomes: mpsc::Receiver<Outcome>,
    pub(crate) _guard: CancelGuard,
}

/// Tells the entity that the client of the streamed call `token` went away.
pub(crate) struct CancelGuard {
    pub(crate) entity: mpsc::Sender<EntityMsg>,
    pub(crate) token: u64,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let _ = self.entity.try_send(EntityMsg::Cancel(self.token));
    }
}

/// The entity's end of a streamed call.
pub(crate) struct StreamSink {
    tx: mpsc::Sender<Outcome>,
}

/// Whether the client is still there after a send.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// delivered (or buffered)
    Delivered,
    /// the client went away, or did not keep up (its call now ends with RESOURCE_EXHAUSTED)
    Gone,
}

impl StreamSink {
    /// A call's channel: the sink and the receiver the client reads.
    pub(crate) fn channel() -> (StreamSink, mpsc::Receiver<Outcome>) {
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER + 1);
        (StreamSink { tx }, rx)
    }

    /// Sends a message without waiting: a slow client loses its call, never the entity.
    pub(crate) fn send(&self, outcome: Outcome) -> Sent {
        if self.tx.is_closed() {
            return Sent::Gone;
        }
        if self.tx.capacity() <= 1 {
            let _ = self.tx.try_send(Err(Status::resource_exhausted(format!(
                "the client did not keep up with the stream ({CLIENT_BUFFER} messages behind)"
            ))));
            return Sent::Gone;
        }
        match self.tx.try_send(outcome) {
            Ok(()) => Sent::Delivered,
            Err(_) => Sent::Gone,
        }
    }

    /// Ends the call with a failure (a full buffer keeps its reserved slot for it).
    pub(crate) fn fail(&self, status: Status) {
        let _ = self.tx.try_send(Err(status));
    }

    /// A sender for a forward's outcome, delivered by another task.
    pub(crate) fn sender(&self) -> mpsc::Sender<Outcome> {
        self.tx.clone()
    }
}
