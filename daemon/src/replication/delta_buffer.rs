//! The delta buffer: this node's deltas by sequence number, until every up peer acked them.
//!
//! Owns [`Buffered`] entries, their byte bound (`buffer_max_bytes`: past it the oldest deltas
//! go, and every peer that had not acked them gets their keys marked dirty, to be sent in full)
//! and garbage collection (deltas every up peer acked go). Sequence numbers count within this
//! life (epoch) of the node.

use std::collections::BTreeMap;
use std::time::Instant;

use latticed_crdt::wire;

use super::replicator::Replicator;
use crate::store::Entry;

pub(super) struct Buffered {
    pub(super) seq: u64,
    pub(super) key: String,
    pub(super) entry: Entry,
    pub(super) bytes: usize,
    pub(super) at: Instant,
}

pub(super) fn join_entry(acc: &mut BTreeMap<String, Entry>, key: &str, e: &Entry) {
    match (acc.get_mut(key), e) {
        (Some(Entry::Deleted), _) => {}
        (Some(slot), Entry::Deleted) => *slot = Entry::Deleted,
        (Some(Entry::Value(a)), Entry::Value(b)) if a.kind() == b.kind() => {
            a.join(b);
        }
        (Some(slot), Entry::Value(b)) => *slot = Entry::Value(b.clone()),
        (None, e) => {
            acc.insert(key.to_string(), e.clone());
        }
    }
}

pub(super) fn entry_bytes(key: &str, e: &Entry) -> usize {
    key.len()
        + match e {
            Entry::Value(v) => wire::encoded_len(v),
            Entry::Deleted => 2,
        }
}

impl Replicator {
    pub(super) fn enqueue(&mut self, now: Instant, key: &str, entry: Entry) {
        self.seq += 1;
        let bytes = entry_bytes(key, &entry);
        self.buffer.push_back(Buffered {
            seq: self.seq,
            key: key.to_string(),
            entry,
            bytes,
            at: now,
        });
        self.buffer_bytes += bytes;
        self.unflushed_since.get_or_insert(now);
        while self.buffer_bytes > self.config.buffer_max_bytes && self.buffer.len() > 1 {
            self.drop_front();
        }
        self.send_to_idle(now);
    }

    pub(super) fn drop_front(&mut self) {
        let Some(b) = self.buffer.pop_front() else {
            return;
        };
        self.buffer_bytes -= b.bytes;
        for p in self.peers.values_mut() {
            if p.acked < b.seq {
                p.dirty.insert(b.key.clone(), b.seq);
            }
        }
    }

    /// Drops buffered deltas every up peer acked; down peers get the keys as dirty.
    pub(super) fn gc(&mut self) {
        let floor = self
            .peers
            .values()
            .filter(|p| p.up)
            .map(|p| p.acked)
            .min()
            .unwrap_or(self.seq);
        while self.buffer.front().is_some_and(|b| b.seq <= floor) {
            self.drop_front();
        }
    }
}
