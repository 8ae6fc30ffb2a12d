//! The encoding of one key's record in the data file (encoding version [`ENCODING_VERSION`]).
//!
//! A record is one tag byte, then:
//! - [`TAG_VALUE`]: the value's full state in the peer encoding of `latticed-crdt`
//!   (`proto/latticed/crdt.proto`, [`latticed_crdt::wire`]), decoded and validated as a peer's
//!   value is;
//! - [`TAG_TOMBSTONE`]: the time this node wrote the tombstone, milliseconds since the Unix
//!   epoch, 8 bytes little-endian (nothing after).
//!
//! Pure functions: a file's bytes are trusted no more than a peer's, so decoding any bytes
//! returns an error rather than panicking (the `stored_entry` fuzz target holds it to that).
//! This module owns the record layout and nothing else: which keys are written when is the
//! driver's business, the file around the records is [`super::disk`]'s.

use latticed_crdt::{wire, CrdtValue};

use super::Entry;

/// The version of this encoding, kept in the data file's meta table; a file of another
/// encoding is refused (a future one gets a migration here).
pub const ENCODING_VERSION: u64 = 1;

/// First byte of a value's record.
pub const TAG_VALUE: u8 = 1;
/// First byte of a tombstone's record.
pub const TAG_TOMBSTONE: u8 = 2;

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
}

/// Encodes an entry's record; `deleted_at_ms` is used for a tombstone only.
pub fn encode(entry: &Entry, deleted_at_ms: i64) -> Vec<u8> {
    match entry {
        Entry::Value(v) => {
            let body = wire::encode(v);
            let mut out = Vec::with_capacity(body.len() + 1);
            out.push(TAG_VALUE);
            out.extend_from_slice(&body);
            out
        }
        Entry::Deleted => {
            let mut out = Vec::with_capacity(9);
            out.push(TAG_TOMBSTONE);
            out.extend_from_slice(&deleted_at_ms.to_le_bytes());
            out
        }
    }
}

/// Decodes a record, validating its value.
pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
    let (&tag, body) = bytes.split_first().ok_or(RecordError::Empty)?;
    match tag {
        TAG_VALUE => {
            let v = wire::decode(body).map_err(|e| RecordError::BadValue(e.to_string()))?;
            Ok(Record::Value(v.into_state()))
        }
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
