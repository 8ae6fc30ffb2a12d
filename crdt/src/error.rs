//! The errors of this crate: what a caller did wrong or what bytes could not be trusted.

use crate::value::CrdtKind;

/// Why a CloudState delta could not be applied, a diff could not be computed, or bytes could not
/// be decoded. Every variant leaves the value it was about unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// The `CrdtDelta` had no delta set (an empty oneof).
    #[error("empty CRDT delta")]
    EmptyDelta,
    /// The delta's type is not the stored value's type.
    #[error("a {delta} delta cannot be applied to a {value}")]
    WrongType {
        /// the stored value's type
        value: CrdtKind,
        /// the delta's type
        delta: CrdtKind,
    },
    /// A GCounter increment that is negative when read as the signed 64-bit number CloudState
    /// libraries send (>= 2^63).
    #[error("GCounter increment {0} is negative as a signed 64-bit value")]
    NegativeIncrement(u64),
    /// A counter would leave the 64-bit range.
    #[error("counter overflow")]
    Overflow,
    /// A Flag delta tried to switch an enabled flag off.
    #[error("a Flag cannot be switched off")]
    FlagDisabled,
    /// An LWWRegister delta without a value.
    #[error("LWWRegister delta without a value")]
    MissingRegisterValue,
    /// An LWWRegister delta with a clock number CloudState does not define.
    #[error("unknown LWWRegister clock {0}")]
    UnknownClock(i32),
    /// An ORMap entry delta without a key or without a nested delta.
    #[error("ORMap entry delta without {0}")]
    IncompleteMapEntry(&'static str),
    /// `diff` was asked for a change a user function cannot be told (a counter, set or flag that
    /// shrank, or a change of type).
    #[error("impossible change for a user function: {0}")]
    ImpossibleChange(&'static str),
    /// Bytes from a peer that do not decode to a valid value.
    #[error("invalid encoded CRDT: {0}")]
    Decode(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = CrdtError> = std::result::Result<T, E>;
