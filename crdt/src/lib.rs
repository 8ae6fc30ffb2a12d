//! latticed-crdt: the eight CloudState CRDTs as delta-state CRDTs.
//!
//! GCounter, PNCounter, GSet, ORSet, LWWRegister, Flag, ORMap and Vote, after Almeida, Shoker
//! and Baquero, "Delta State Replicated Data Types" (JPDC 2018): every mutator returns a *delta*
//! that is itself a value of the type; `join` is commutative, associative and idempotent, and
//! joining deltas in any order, duplicated, gives the state that joining them in order gives.
//!
//! Every value is a dot store with a causal context ([`Causal`], [`dotstore`], [`context`]), so
//! removals travel in deltas (no full state needed), values nested in an [`ORMap`] reset when
//! their key is removed, and a one-element delta joins in O(delta).
//!
//! What comes from the `crdts` crate: the dot ([`Dot`] is `crdts::OrdDot`) and the compact
//! version vector (`crdts::VClock`) inside [`CausalContext`]. `crdts` (7.3) has no delta
//! support, its `Orswot::merge` needs two full states and costs O(set), and its counters cannot
//! be reset inside a map; the dot cloud, the dot stores, the delta mutators and all eight types
//! are written here.
//!
//! Beyond the CRDTs, this crate owns the two conversions the entity runtime needs, both pure:
//! - [`apply_user_delta`]: a user function's CloudState `CrdtDelta` applied as an operation of
//!   this replica, returning the delta to replicate ([`operation`]);
//! - [`diff`] and [`initial_delta`]: what a user function holding one plain value
//!   ([`UserValue`]) must be sent to hold another ([`user`]);
//!
//! and latticed's peer encoding of values and deltas ([`wire`]).
//!
//! This crate does no IO, reads no clock (callers pass the time) and knows nothing of peers.

#![forbid(unsafe_code)]

pub mod causal;
pub mod context;
pub mod counter;
pub mod dotstore;
pub mod element;
pub mod error;
pub mod flag;
pub mod footprint;
pub mod map;
pub mod operation;
pub mod register;
pub mod set;
pub mod user;
pub mod value;
pub mod vote;
pub mod wire;

pub use causal::Causal;
pub use context::{dot, CausalContext, Dot, ReplicaId};
pub use counter::{GCounter, PNCounter};
pub use element::Element;
pub use error::{CrdtError, Result};
pub use flag::Flag;
pub use footprint::{update_part, Footprint};
pub use map::ORMap;
pub use operation::apply_user_delta;
pub use register::{Clock, LwwRegister};
pub use set::{GSet, ORSet};
pub use user::{delta_kind, diff, initial_delta, Origin, UserValue};
pub use value::{CrdtKind, CrdtValue, Store};
pub use vote::{Vote, VoteTally, Voters};
