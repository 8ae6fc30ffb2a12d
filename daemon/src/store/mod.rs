//! The store: the only owner of replicated state, durable when asked.
//!
//! - [`memory`]: key → CRDT value or tombstone, with the anti-entropy digests ([`Store`]). The
//!   replicator owns one; every read and write goes to it.
//! - The narrow interface to durability, here: a [`Batch`] of keys' [`Change`]s (what changed
//!   since the key's last batch: a delta, or the whole entry) and removals, written by a
//!   [`Durable`] in one transaction; what was stored is read back once, at startup
//!   ([`disk::Loaded`]). Replication and the entity runtime know
//!   nothing of disks: the replication driver only hands batches to the [`committer`] and waits
//!   for them to be committed before anything of them leaves the node.
//! - [`record`]: the encoding of one key's record (pure; fuzzed).
//! - [`disk`]: the data file (redb) under `--data-dir`: its meta table and the checks made when
//!   it is opened.
//! - [`committer`]: the thread that commits batches, one transaction and one fsync each.
//!
//! Nothing here knows about peers or tokio tasks.

pub mod committer;
pub mod disk;
pub mod memory;
pub mod record;

use latticed_crdt::CrdtValue;

pub use memory::{bucket_of, Entry, Store, StoreError, BUCKETS};

/// What became of a key since it was last handed to the data file ([`Store::take_change`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// a delta of everything that changed since (joined into what the file holds, it gives the
    /// value now; from nothing, the whole value)
    Delta(CrdtValue),
    /// the key's whole entry, to be written in place of whatever the file holds (a tombstone,
    /// a value whose changes were not tracked, or a value whose delta log in the file is full)
    Whole(Entry),
    /// the key is gone (a tombstone past its lifetime)
    Removed,
}

/// What one transaction writes: each changed key's change (or its removal: a tombstone past
/// its lifetime), and the time this node was last known alive.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// the batch's number, increasing from 1 within a life
    pub number: u64,
    /// key → what changed (encoded by the committer, off the replication task)
    pub puts: Vec<(String, Change)>,
    /// keys to remove
    pub removes: Vec<String>,
    /// now, ms since the Unix epoch (the data file's `alive_at`)
    pub alive_at_ms: i64,
}

impl Batch {
    /// An empty batch.
    pub fn new(number: u64, alive_at_ms: i64) -> Batch {
        Batch {
            number,
            alive_at_ms,
            ..Batch::default()
        }
    }

    /// Adds a key's change; a tombstone records `alive_at_ms` as its time.
    pub fn put(&mut self, key: String, change: Change) {
        match change {
            Change::Removed => self.removes.push(key),
            c => self.puts.push((key, c)),
        }
    }

    /// Whether it writes no key (a heartbeat).
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.removes.is_empty()
    }
}

/// A node's durable state as replication takes it at startup: what the data file held, where
/// batches go, and what to do when a commit fails.
pub struct Persistence {
    /// every key's record, as loaded
    pub records: Vec<(String, record::Record)>,
    /// where batches are committed (the data file)
    pub durable: Box<dyn Durable>,
    /// called once if a commit fails (the node exits non-zero)
    pub on_fatal: committer::FatalHandler,
}

/// Where batches are committed: one transaction per batch, durable when `commit` returns.
pub trait Durable: Send + 'static {
    /// Writes the batch atomically and makes it durable (fsync). An error is fatal for the
    /// process: it must not be retried (after a failed fsync, what is on disk is unknown).
    ///
    /// Returns the keys whose delta logs are full: the next batch that changes one of them
    /// should carry its whole value ([`Change::Whole`], from memory), which replaces the log.
    /// The file compacts a log itself (reading and joining what it holds) only if that does
    /// not come before the log is twice full.
    fn commit(&mut self, batch: &Batch) -> Result<Vec<String>, disk::DiskError>;

    /// Records that this life ends cleanly: the last write of an orderly shutdown.
    fn close(&mut self, now_ms: i64) -> Result<(), disk::DiskError>;

    /// Where it writes (for messages).
    fn describe(&self) -> String;
}
