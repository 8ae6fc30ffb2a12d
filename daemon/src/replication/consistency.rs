//! Write consistency: MAJORITY / ALL writes waiting for enough members' acks.
//!
//! Owns the pending writes: each needs `N/2 + 1` (MAJORITY) or `N` (ALL) members, itself
//! included, where `N` counts every member that has not left; an ack from a peer counts for a
//! write when it covers the write's number and the write came after the exchange with that
//! peer's life started. A write that misses its consistency within `write_timeout` fails with
//! [`CONSISTENCY_FAILURE`]; the write itself stays.

use std::collections::BTreeSet;
use std::time::Instant;

use latticed_crdt::CrdtError;

use super::replicator::{PeerId, Replicator};

/// The text of a write that did not reach its consistency in time (CloudState's).
pub const CONSISTENCY_FAILURE: &str = "Failed to update CRDT at requested write consistency";

/// CloudState write consistency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// complete after the local join
    Local,
    /// complete when a majority of the members acked
    Majority,
    /// complete when every member acked
    All,
}

/// Names a write until it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// the key was deleted
    #[error("Entity deleted")]
    Deleted,
    /// the user function's delta cannot be applied (the value is unchanged)
    #[error("{0}")]
    Invalid(#[from] CrdtError),
    /// not enough members acked in time (the write stays and still replicates)
    #[error("Failed to update CRDT at requested write consistency")]
    Consistency,
}

pub(super) struct Pending {
    pub(super) id: WriteId,
    pub(super) seq: u64,
    pub(super) needed: usize,
    pub(super) acked_by: BTreeSet<PeerId>,
    pub(super) deadline: Instant,
}

impl Replicator {
    pub(super) fn register(&mut self, now: Instant, consistency: Consistency) -> WriteId {
        self.next_write += 1;
        let id = WriteId(self.next_write);
        let n = 1 + self.peers.len();
        let needed = match consistency {
            Consistency::Local => 1,
            Consistency::Majority => n / 2 + 1,
            Consistency::All => n,
        };
        if needed <= 1 {
            self.out.completed.push((id, Ok(())));
        } else {
            self.pending.push(Pending {
                id,
                seq: self.seq,
                needed,
                acked_by: BTreeSet::new(),
                deadline: now + self.config.write_timeout,
            });
        }
        id
    }

    /// `from` (in the life the exchange with it started at `base`) holds every delta up to
    /// `upto`: it counts for the writes numbered in `base + 1 ..= upto`.
    pub(super) fn count_ack(&mut self, from: &str, base: u64, upto: u64) {
        let mut i = 0;
        while i < self.pending.len() {
            let w = &mut self.pending[i];
            if base < w.seq && w.seq <= upto {
                w.acked_by.insert(from.to_string());
                if 1 + w.acked_by.len() >= w.needed {
                    let done = self.pending.swap_remove(i);
                    self.out.completed.push((done.id, Ok(())));
                    continue;
                }
            }
            i += 1;
        }
    }

    /// Fails the writes whose time is up.
    pub(super) fn expire_writes(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline <= now {
                let p = self.pending.swap_remove(i);
                self.stats.consistency_failures += 1;
                self.out
                    .completed
                    .push((p.id, Err(WriteError::Consistency)));
            } else {
                i += 1;
            }
        }
    }
}
