//! User functions: discovering what each serves.
//!
//! - [`spec`]: validating an `EntitySpec` into a model of entities and methods, and entity-id
//!   extraction (pure).
//! - [`discovery`]: dialling the user function and running discovery with backoff.
//! - [`pool`]: the HTTP/2 connections its entities' streams share.
//! - [`check`]: `latticed check-uf`, a read-only probe of a user function as latticed uses it.
//! - [`register`]: `latticed register`, a client keeping a user function registered with a
//!   daemon (a sidecar for user functions that do not register themselves).
//!
//! The node runs discovery for every `--user-function` before it binds the front-end; the
//! entity runtime ([`crate::entity`]) keeps watching each user function's spec afterwards.

pub mod check;
pub mod discovery;
pub mod pool;
pub mod register;
pub mod spec;

pub use discovery::Discovery;
pub use spec::{validate, EntityModel, MethodModel, UserFunctionModel};
