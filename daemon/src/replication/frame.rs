//! Peer frames: encoding and decoding of `proto/latticed/peer.proto`, and the length prefix.
//!
//! Pure functions; nothing a peer sends can make them panic or allocate beyond the frame's own
//! size. The length prefix is the transport's (`transport::MAX_FRAME` bounds it).

use latticed_crdt::wire;
use latticed_proto::latticed::peer as pb;
use prost::Message;

use crate::store::Entry;

/// The replication protocol version spoken in `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Why a frame was dropped (also the `reason` label of `latticed_rejected_frames_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// the bytes are not a frame
    Malformed,
    /// a CRDT value inside did not validate
    BadValue,
    /// a value of another type than the stored one
    TypeMismatch,
    /// a Hello with another protocol version
    Version,
}

impl Rejection {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::BadValue => "bad_value",
            Rejection::TypeMismatch => "type_mismatch",
            Rejection::Version => "version",
        }
    }
}

/// Encodes a frame body (the transport adds the length prefix).
pub fn encode(frame: &pb::Frame) -> Vec<u8> {
    frame.encode_to_vec()
}

/// The `Hello` that opens every stream this node writes.
pub fn hello(replica: u64, node_name: &str) -> Vec<u8> {
    encode(&self::frame(pb::frame::Kind::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        replica,
        node_name: node_name.to_string(),
    })))
}

/// Decodes a frame body (without the prefix).
pub fn decode(body: &[u8]) -> Result<pb::Frame, Rejection> {
    pb::Frame::decode(body).map_err(|_| Rejection::Malformed)
}

/// An entry as its message.
pub fn entry_to_proto(key: &str, e: &Entry) -> pb::Entry {
    pb::Entry {
        key: key.to_string(),
        value: Some(match e {
            Entry::Value(v) => pb::entry::Value::Crdt(wire::to_proto(v)),
            Entry::Deleted => pb::entry::Value::Deleted(true),
        }),
    }
}

/// An entry from its message, validated.
pub fn entry_from_proto(e: &pb::Entry) -> Result<(String, Entry), Rejection> {
    let entry = match &e.value {
        Some(pb::entry::Value::Crdt(v)) => {
            Entry::Value(wire::from_proto(v).map_err(|_| Rejection::BadValue)?)
        }
        Some(pb::entry::Value::Deleted(true)) => Entry::Deleted,
        _ => return Err(Rejection::Malformed),
    };
    Ok((e.key.clone(), entry))
}

/// A frame of one kind.
pub fn frame(kind: pb::frame::Kind) -> pb::Frame {
    pb::Frame { kind: Some(kind) }
}
