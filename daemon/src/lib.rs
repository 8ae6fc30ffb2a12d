//! latticed, the daemon: the shell around the sans-IO cores.
//!
//! - [`cli`]: the command-line entry point (`src/main.rs` calls it).
//! - [`config`]: flags and environment.
//! - [`certs`]: `latticed certs`, loading and generating TLS material.
//! - [`transport`]: the QUIC endpoint with mutual TLS and cached peer connections.
//! - [`cluster`]: drives SWIM membership (`latticed-membership`) over the transport.
//! - [`store`]: key → CRDT value or tombstone; the only owner of replicated state, and its data
//!   file (`--data-dir`).
//! - [`replication`]: the sans-IO replication core and its driver (write, read, subscribe).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/v1/members`, `/v1/keys`.
//! - [`metrics`]: the Prometheus recorder and metric names.
//! - [`userfn`]: discovery and validation of user functions.
//! - [`entity`]: the entity runtime (`Crdt/handle` streams to a user function).
//! - [`frontend`]: the user functions' gRPC services, served to clients on `--listen`.
//! - [`memory`]: giving freed memory back to the OS after entities end.
//! - [`node`]: one running node, its startup and shutdown.
//!
//! CRDT and SWIM logic live in `latticed-crdt` and `latticed-membership`; the replication core
//! (`replication::replicator`) and the store are sans-IO; the rest does IO.

// one audited exception, `memory::give_back` (an FFI call); denied everywhere else
#![deny(unsafe_code)]

pub mod admin;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod entity;
pub mod error;
pub mod frontend;
#[doc(hidden)]
pub mod fuzzing;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod replication;
pub mod routing;
pub mod store;
pub mod transport;
pub mod userfn;

pub use error::DaemonError;
pub use node::Node;
