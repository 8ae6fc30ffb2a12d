//! User functions: discovering what each serves.
//!
//! - [`spec`]: validating an `EntitySpec` into a model of entities and methods, and entity-id
//!   extraction (pure).
//! - [`discovery`]: dialling the user function and running discovery with backoff.
//!
//! Status: discovery and validation are built and tested; wiring them into the node (the
//! `--user-function` flag, readiness, the gRPC front-end and the entity runtime) is the rest of
//! the CloudState protocol work.

pub mod discovery;
pub mod spec;

pub use discovery::Discovery;
pub use spec::{validate, EntityModel, MethodModel, UserFunctionModel};
