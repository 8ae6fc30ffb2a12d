//! The encoding of one key's records in the data file (encoding version [`ENCODING_VERSION`]).
//!
//! A record is one tag byte, then:
//! - [`TAG_VALUE`]: the value's full state in the peer encoding of `latticed-crdt`
//!   (`proto/latticed/crdt.proto`, [`latticed_crdt::wire`]), decoded and validated as a peer's
//!   value is;
//! - [`TAG_TOMBSTONE`]: the time this node wrote the tombstone, milliseconds since the Unix
//!   epoch, 8 bytes little-endian (nothing after);
//! - [`TAG_DELTA`]: a delta of the value, in the same peer encoding (kept a delta: it is joined
//!   into the key's state when the file is loaded, see [`replay`]).
//!
//! A key's state record ([`decode`]: a value or a tombstone) and its delta records
//! ([`decode_delta`]) are kept apart by the data file; each decoder refuses the other's tags.
//! Version 1 had no delta records; its records read the same.
//!
//! Pure functions: a file's bytes are trusted no more than a peer's, so decoding any bytes
//! returns an error rather than panicking (the `stored_entry` fuzz target holds it to that).
//! This module owns the record layout and nothing else: which keys are written when is the
//! driver's business, the file around the records is [`super::disk`]'s.

use latticed_crdt::{wire, CrdtKind, CrdtValue};

use super::Entry;

/// The version of this encoding, kept in the data file's meta table; a file of another
/// encoding is refused (a future one gets a migration here).
pub const ENCODING_VERSION: u64 = 2;

/// First byte of a value's record.
pub const TAG_VALUE: u8 = 1;
/// First byte of a tombstone's record.
pub const TAG_TOMBSTONE: u8 = 2;
/// First byte of a delta's record.
pub const TAG_DELTA: u8 = 3;

/// One key's record as stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// a CRDT value's full state
    Value(CrdtValue),
    /// deleted; when this node wrote the tombstone (ms since the Unix epoch), so a tombstone
    /// lifetime counts from the deletion, not from the last start
    Tombstone {
        /// milliseconds since the Unix epoch
        deleted_at_ms: i64,
    },
}

impl Record {
    /// The store entry this record holds.
    pub fn into_entry(self) -> Entry {
        match self {
            Record::Value(v) => Entry::Value(v),
            Record::Tombstone { .. } => Entry::Deleted,
        }
    }
}

/// Why a record's bytes were not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// no bytes at all
    #[error("empty record")]
    Empty,
    /// a first byte that is no tag of this encoding
    #[error("unknown record tag {0}")]
    UnknownTag(u8),
    /// a tombstone that is not exactly its 8 bytes of time
    #[error("a tombstone record of {0} bytes (9 expected)")]
    BadTombstone(usize),
    /// a value that does not decode or validate
    #[error("bad value: {0}")]
    BadValue(String),
    /// a delta of another type than the state it is joined into
    #[error("a delta of a {delta} for a {state}")]
    DeltaType {
        /// the state's type
        state: CrdtKind,
        /// the delta's type
        delta: CrdtKind,
    },
    /// deltas for a key whose state is a tombstone
    #[error("deltas of a deleted key")]
    DeltaOfTombstone,
}

fn tagged(tag: u8, v: &CrdtValue) -> Vec<u8> {
    // (`encode_into` reserves what the value takes)
    let mut out = vec![tag];
    wire::encode_into(v, &mut out);
    out
}

/// Encodes an entry's record; `deleted_at_ms` is used for a tombstone only.
pub fn encode(entry: &Entry, deleted_at_ms: i64) -> Vec<u8> {
    match entry {
        Entry::Value(v) => tagged(TAG_VALUE, v),
        Entry::Deleted => {
            let mut out = Vec::with_capacity(9);
            out.push(TAG_TOMBSTONE);
            out.extend_from_slice(&deleted_at_ms.to_le_bytes());
            out
        }
    }
}

/// Encodes a delta's record.
pub fn encode_delta(delta: &CrdtValue) -> Vec<u8> {
    tagged(TAG_DELTA, delta)
}

fn decode_value(body: &[u8]) -> Result<CrdtValue, RecordError> {
    wire::decode(body).map_err(|e| RecordError::BadValue(e.to_string()))
}

/// Decodes a delta's record, validating it.
pub fn decode_delta(bytes: &[u8]) -> Result<CrdtValue, RecordError> {
    match bytes.split_first() {
        None => Err(RecordError::Empty),
        Some((&TAG_DELTA, body)) => decode_value(body),
        Some((&other, _)) => Err(RecordError::UnknownTag(other)),
    }
}

/// A key's state record with its deltas joined in, in order: what the key held when the last of
/// them was written. A delta must be of the state's type, and a tombstone has none.
pub fn replay(
    state: Record,
    deltas: impl IntoIterator<Item = CrdtValue>,
) -> Result<Record, RecordError> {
    let mut deltas = deltas.into_iter().peekable();
    match state {
        Record::Tombstone { .. } if deltas.peek().is_some() => Err(RecordError::DeltaOfTombstone),
        Record::Tombstone { .. } => Ok(state),
        Record::Value(mut v) => {
            for d in deltas {
                if d.kind() != v.kind() {
                    return Err(RecordError::DeltaType {
                        state: v.kind(),
                        delta: d.kind(),
                    });
                }
                v.join(&d);
            }
            Ok(Record::Value(v))
        }
    }
}

/// Decodes a state record (a value or a tombstone), validating its value.
pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
    let (&tag, body) = bytes.split_first().ok_or(RecordError::Empty)?;
    match tag {
        TAG_VALUE => Ok(Record::Value(decode_value(body)?.into_state())),
        TAG_TOMBSTONE => {
            let time: [u8; 8] = body
                .try_into()
                .map_err(|_| RecordError::BadTombstone(bytes.len()))?;
            Ok(Record::Tombstone {
                deleted_at_ms: i64::from_le_bytes(time),
            })
        }
        other => Err(RecordError::UnknownTag(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latticed_crdt::{apply_user_delta, Element};
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, OrSetDelta};

    #[test]
    fn records_round_trip() {
        let mut v = None;
        let d = CrdtDelta {
            delta: Some(Delta::Orset(OrSetDelta {
                cleared: false,
                removed: vec![],
                added: vec![Element::string("x").to_any()],
            })),
        };
        apply_user_delta(&mut v, &d, 7, 0).unwrap();
        let v = v.unwrap();
        let bytes = encode(&Entry::Value(v.clone()), 0);
        assert_eq!(decode(&bytes), Ok(Record::Value(v)));
        let bytes = encode(&Entry::Deleted, 1_700_000_000_123);
        assert_eq!(
            decode(&bytes),
            Ok(Record::Tombstone {
                deleted_at_ms: 1_700_000_000_123
            })
        );
    }

    #[test]
    fn deltas_round_trip_and_replay_onto_their_state() {
        let mut v = None;
        let add = |x: &str| CrdtDelta {
            delta: Some(Delta::Orset(OrSetDelta {
                cleared: false,
                removed: vec![],
                added: vec![Element::string(x).to_any()],
            })),
        };
        apply_user_delta(&mut v, &add("x"), 7, 0).unwrap();
        let state = v.clone().unwrap();
        let d = apply_user_delta(&mut v, &add("y"), 7, 0).unwrap().unwrap();
        let bytes = encode_delta(&d);
        assert_eq!(decode_delta(&bytes), Ok(d.clone()));
        assert_eq!(decode(&bytes), Err(RecordError::UnknownTag(TAG_DELTA)));
        let state_bytes = encode(&Entry::Value(state.clone()), 0);
        assert_eq!(
            decode_delta(&state_bytes),
            Err(RecordError::UnknownTag(TAG_VALUE))
        );
        assert_eq!(
            replay(Record::Value(state), [d.clone()]),
            Ok(Record::Value(v.unwrap()))
        );
        let tomb = Record::Tombstone { deleted_at_ms: 1 };
        assert_eq!(replay(tomb.clone(), []), Ok(tomb.clone()));
        assert_eq!(
            replay(tomb, [d.clone()]),
            Err(RecordError::DeltaOfTombstone)
        );
        let counter = CrdtValue::empty(latticed_crdt::CrdtKind::GCounter);
        assert!(matches!(
            replay(Record::Value(counter), [d]),
            Err(RecordError::DeltaType { .. })
        ));
    }

    #[test]
    fn bad_records_are_errors() {
        assert_eq!(decode(&[]), Err(RecordError::Empty));
        assert_eq!(decode(&[9, 1, 2]), Err(RecordError::UnknownTag(9)));
        assert_eq!(
            decode(&[TAG_TOMBSTONE, 1]),
            Err(RecordError::BadTombstone(2))
        );
        assert!(matches!(
            decode(&[TAG_VALUE, 0xff, 0xff]),
            Err(RecordError::BadValue(_))
        ));
    }
}
