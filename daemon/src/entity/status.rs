//! The outcome of a command for its client: a gRPC status code and message.
//!
//! Owns the codes the entity runtime answers with (UNKNOWN for user-function failures, as
//! CloudState does; INVALID_ARGUMENT, UNIMPLEMENTED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
//! UNAVAILABLE for the runtime's own refusals). It does not know how a front-end encodes them.

/// A failure for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// the gRPC status code
    pub code: tonic::Code,
    /// the description
    pub message: String,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }

    /// UNKNOWN: what CloudState uses for the user function's failures.
    pub fn unknown(message: impl Into<String>) -> Self {
        Status::new(tonic::Code::Unknown, message)
    }

    /// INVALID_ARGUMENT: the request cannot be routed (no entity id).
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Status::new(tonic::Code::InvalidArgument, message)
    }

    /// UNIMPLEMENTED: no such method.
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Status::new(tonic::Code::Unimplemented, message)
    }

    /// RESOURCE_EXHAUSTED: a bound was reached.
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Status::new(tonic::Code::ResourceExhausted, message)
    }

    /// DEADLINE_EXCEEDED: no answer in time (the outcome is unknown).
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Status::new(tonic::Code::DeadlineExceeded, message)
    }

    /// UNAVAILABLE: try again (elsewhere).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Status::new(tonic::Code::Unavailable, message)
    }
}

impl From<Status> for tonic::Status {
    fn from(s: Status) -> Self {
        tonic::Status::new(s.code, s.message)
    }
}

/// What a command produced for the client: the reply message's bytes (none: no message).
pub type Outcome = Result<Option<Vec<u8>>, Status>;
