//! Peer frames: encoding and decoding of `proto/latticed/peer.proto`, and the length prefix.
//!
//! Pure functions; nothing a peer sends can make them panic or allocate beyond the frame's own
//! size. The length prefix is the transport's (`transport::MAX_FRAME` bounds it). Owns the
//! protocol version range and its negotiation, and the rejection reasons.

use latticed_crdt::wire;
use latticed_proto::latticed::peer as pb;
use prost::Message;

use crate::store::Entry;

/// The highest replication protocol version this node speaks (announced in `Hello`).
///
/// Version 2 scopes sequence numbers and acknowledgements by epochs; version 1 did not, and is
/// not spoken any more. Version 3 adds received-only acks (`Ack.received_only`), sent only to
/// peers that speak it.
pub const PROTOCOL_VERSION: u32 = 3;

/// The lowest replication protocol version this node speaks. A later release that changes the
/// protocol keeps speaking the versions of the release before it, so a rolling upgrade never
/// splits the cluster: two nodes talk in the highest version both speak.
pub const MIN_PROTOCOL_VERSION: u32 = 2;

/// Why a frame was dropped (also the `reason` label of `latticed_rejected_frames_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// the bytes are not a frame
    Malformed,
    /// a CRDT value inside did not validate
    BadValue,
    /// a value of another type than the stored one
    TypeMismatch,
    /// a Hello with no protocol version in common
    Version,
    /// a frame whose sender (replica or epoch) is not the one its stream's hello named
    Sender,
    /// a frame addressed to a previous life of this node
    Stale,
    /// a frame from a peer whose hello was not seen
    UnknownPeer,
    /// a Hello whose node name is not the name in the peer's certificate
    Identity,
}

impl Rejection {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::BadValue => "bad_value",
            Rejection::TypeMismatch => "type_mismatch",
            Rejection::Version => "version",
            Rejection::Sender => "sender",
            Rejection::Stale => "stale_epoch",
            Rejection::UnknownPeer => "unknown_peer",
            Rejection::Identity => "identity",
        }
    }
}

/// Encodes a frame body (the transport adds the length prefix).
pub fn encode(frame: &pb::Frame) -> Vec<u8> {
    frame.encode_to_vec()
}

/// The `Hello` that opens every stream this node writes (`epoch`: this life of the node).
pub fn hello(replica: u64, epoch: u64, node_name: &str) -> Vec<u8> {
    encode(&self::frame(pb::frame::Kind::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        replica,
        epoch,
        node_name: node_name.to_string(),
    })))
}

/// The protocol version to speak with the sender of `h`: the highest both sides speak, if any.
pub fn negotiate(h: &pb::Hello) -> Result<u32, Rejection> {
    let theirs_min = if h.min_version == 0 {
        h.protocol_version
    } else {
        h.min_version
    };
    let version = h.protocol_version.min(PROTOCOL_VERSION);
    if version >= theirs_min.max(MIN_PROTOCOL_VERSION) {
        Ok(version)
    } else {
        Err(Rejection::Version)
    }
}

/// Decodes every entry of a frame, or rejects the whole frame: nothing of a frame with one bad
/// entry is joined.
pub fn entries_from_proto(entries: &[pb::Entry]) -> Result<Vec<(String, Entry)>, Rejection> {
    entries.iter().map(entry_from_proto).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_with(min_version: u32, protocol_version: u32) -> pb::Hello {
        pb::Hello {
            protocol_version,
            min_version,
            ..pb::Hello::default()
        }
    }

    #[test]
    fn versions_are_negotiated_over_overlapping_ranges() {
        // a newer peer that still speaks this version
        assert_eq!(
            negotiate(&hello_with(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 3)),
            Ok(PROTOCOL_VERSION)
        );
        // an older peer whose range reaches this one
        assert_eq!(
            negotiate(&hello_with(1, PROTOCOL_VERSION)),
            Ok(PROTOCOL_VERSION)
        );
        // version 1 alone (no range: a release before epochs)
        assert_eq!(negotiate(&hello_with(0, 1)), Err(Rejection::Version));
        // a peer that dropped this version
        assert_eq!(
            negotiate(&hello_with(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2)),
            Err(Rejection::Version)
        );
    }
}
