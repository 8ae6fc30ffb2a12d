//! The outcome of a command for its client: a reply with its headers, or a gRPC status code and
//! message.
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

/// Response headers a reply asks for: the string entries of its CloudState metadata (protocol
/// spec §3 Reply: only a call's first reply's count).
pub type Headers = Vec<(String, String)>;

/// A reply for a unary client: the message's bytes (none: no message) and its headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientReply {
    /// the reply message (none: no message)
    pub message: Option<Vec<u8>>,
    /// response headers
    pub headers: Headers,
}

/// What a command produced for a unary client.
pub type Outcome = Result<ClientReply, Status>;

/// One element of a streamed call: a message (none: an empty element, nothing for the
/// client), or the failure that ends the call.
pub type StreamItem = Result<Option<Vec<u8>>, Status>;
