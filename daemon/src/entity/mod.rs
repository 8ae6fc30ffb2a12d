//! The entity runtime: one state machine per active (service, entity id), speaking
//! `Crdt/handle` to the user function (protocol spec §7 and §11).
//!
//! - [`router`]: the active entities of one user function, starting them on demand, routing
//!   commands, forwards and side effects to them;
//! - [`machine`]: the sans-IO state machine of one entity (the CloudState rules, its
//!   lifecycle, the ordering guarantees);
//! - [`task`]: the tokio shell that moves one machine's messages;
//! - [`streamed`]: a server-streamed call as the client holds it;
//! - [`status`]: what a client gets: a reply with its headers, or a failure.
//!
//! `docs/cloudstate.md` describes the runtime as built.

pub mod machine;
pub mod router;
pub mod status;
pub mod streamed;
pub(crate) mod task;

pub use machine::{Config, ENTITY_DELETED, ENTITY_TERMINATING};
pub use router::Entities;
pub use status::{ClientReply, Headers, Outcome, Status, StreamItem};
pub use streamed::StreamedCall;
