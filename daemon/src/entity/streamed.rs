//! A server-streamed call as its client holds it: the outcomes arriving, and the guard that
//! tells the entity when the client drops the call (a cancellation).
//!
//! Owns the client side of one streamed call. It must not know the CloudState protocol: the
//! entity machine decides what a cancellation means.

use tokio::sync::{mpsc, oneshot};

use super::router::EntityMsg;
use super::status::{Headers, Status, StreamItem};

/// How many messages a streamed call buffers for a client that reads slowly; one more slot is
/// kept for the failure that ends the call when the client does not keep up.
pub const CLIENT_BUFFER: usize = 64;

/// A server-streamed call in progress: its outcomes, and a guard that tells the entity when
/// the caller drops it (the client cancelled).
pub struct StreamedCall {
    /// the messages (`Ok(None)`: an empty element, nothing for the client), then the end
    /// (closed channel: OK) or a failure
    pub outcomes: mpsc::Receiver<StreamItem>,
    /// the response headers, from the call's first reply (closed without: none, or the call
    /// failed before any reply)
    pub headers: oneshot::Receiver<Headers>,
    pub(crate) _guard: CallGuard,
}

/// What ends a streamed call when its client drops it.
pub(crate) enum CallGuard {
    /// a call on a local entity: tell it
    Entity {
        /// tells the entity on drop
        _cancel: CancelGuard,
    },
    /// a call routed to another node: stop the task that relays it (its exchange closes, and
    /// the serving node cancels the call)
    Relay(tokio::task::AbortHandle),
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let CallGuard::Relay(task) = self {
            task.abort();
        }
    }
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
    tx: mpsc::Sender<StreamItem>,
    headers: Option<oneshot::Sender<Headers>>,
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
    /// A call's channel: the sink, the receiver the client reads and the response headers.
    pub(crate) fn channel() -> (
        StreamSink,
        mpsc::Receiver<StreamItem>,
        oneshot::Receiver<Headers>,
    ) {
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER + 1);
        let (headers, headers_rx) = oneshot::channel();
        let sink = StreamSink {
            tx,
            headers: Some(headers),
        };
        (sink, rx, headers_rx)
    }

    /// Sets the call's response headers (the first time only: later replies' are ignored).
    pub(crate) fn send_headers(&mut self, headers: Headers) {
        if let Some(tx) = self.headers.take() {
            let _ = tx.send(headers);
        }
    }

    /// Sends a message without waiting: a slow client loses its call, never the entity.
    pub(crate) fn send(&self, outcome: StreamItem) -> Sent {
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
    pub(crate) fn sender(&self) -> mpsc::Sender<StreamItem> {
        self.tx.clone()
    }
}
