//! Replication: how CRDT state moves between daemons.
//!
//! - [`replicator`]: the sans-IO state machine, composed of [`delta_buffer`], [`acks`],
//!   [`consistency`] and [`anti_entropy`] (one concept each). No tokio, no sockets, no clock.
//! - [`frame`]: the peer wire (`proto/latticed/peer.proto`), length-prefixed.
//! - [`driver`]: the tokio shell that runs a [`Replicator`] over the QUIC transport and serves
//!   the API the entity runtime uses (write, read, subscribe).
//!
//! `docs/replication.md` has the algorithm, its invariants and its failure cases.

pub mod acks;
pub mod anti_entropy;
pub mod consistency;
pub mod delta_buffer;
pub mod driver;
pub mod frame;
pub mod replicator;

pub use driver::{
    HandleError, KeyChanges, Replication, ReplicationHandle, WriteCompletion, Writer,
};
pub use replicator::{
    Consistency, Identity, Output, PeerId, PeerInfo, ReplicationConfig, Replicator, Stats,
    WriteError, WriteId, CONSISTENCY_FAILURE,
};
