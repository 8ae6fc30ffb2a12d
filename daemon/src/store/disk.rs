//! The data file under `--data-dir`: `DIR/latticed.redb`, a redb database (pure Rust, ACID).
//!
//! Three tables:
//! - `entries`: key → record ([`super::record`]): every key's state (as of its last compaction)
//!   or tombstone;
//! - `deltas`: (key, number) → delta record: what a key's later batches changed, joined into its
//!   state in order when the file is loaded. A batch writes a key that has a stored value as a
//!   delta. Once a key's deltas outgrow its state (their bytes exceed [`LOG_PER_STATE`] times
//!   the state's, and [`MIN_LOG_BYTES`]) or number [`MAX_DELTAS`], its log is full: the commit
//!   reports the key ([`Durable::commit`]) and the next batch that changes it carries its whole
//!   value, taken from memory, which replaces its state and drops its deltas (compaction), so
//!   the file writes a large value about once per [`LOG_PER_STATE`] times its size of changes,
//!   without reading it back. Only
//!   a log that reaches twice its bound first (a batch that did not follow the report) is
//!   compacted here, by joining the deltas into the stored state. A key's whole entry (a
//!   tombstone, a value whose changes were not tracked) replaces its state and drops its
//!   deltas, as its removal does;
//! - `meta`: what the file is and whose it is: data format version ([`FORMAT_VERSION`]),
//!   encoding version ([`super::record::ENCODING_VERSION`]), cluster identity (the SHA-256
//!   fingerprints of the cluster CA certificates, or `lone` for a node on an ephemeral
//!   certificate), node name, replica id (a fresh one after a life that did not end cleanly:
//!   see [`Loaded::replaced`]), creation time, `alive_at` (the last commit: every
//!   batch and a heartbeat write it), the number of lives (starts) and whether the last life
//!   ended cleanly.
//!
//! Opening checks, in order, and refuses with a [`DiskError`] naming the file: a file of an
//! unknown format or encoding (format 1, encoding 1, the layout without deltas, is migrated:
//! it reads the same); another node's file; another cluster's file; a file last alive
//! longer ago than the tombstone lifetime (its deleted keys would come back, or its tombstones
//! delete keys written again since); a corrupt or truncated file (redb's own checks, an
//! undecodable record, deltas without a value to join into, a missing meta entry). A file
//! another process holds is [`DiskError::Held`]: [`open_waiting`] waits for it.
//!
//! Every write transaction is committed with `Durability::Immediate` (fsync before commit
//! returns). This module owns the file's layout and checks; when batches are written is the
//! committer's and the driver's business.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{
    Database, DatabaseError, Durability, ReadableTable, ReadableTableMetadata, StorageError,
    TableDefinition, TableError,
};

use latticed_crdt::CrdtValue;

use super::record::{self, Record, ENCODING_VERSION};
use super::{Batch, Change, Durable, Entry};

/// The data file's name inside `--data-dir`.
pub const DATA_FILE: &str = "latticed.redb";

/// The version of the file's layout (tables and meta entries). A file of another version is
/// refused: a later release that changes the layout migrates older versions it knows (version
/// 1, without the `deltas` table, is read as is and marked version 2 when opened).
pub const FORMAT_VERSION: u64 = 2;

/// The format and encoding versions of files this release migrates.
const MIGRATED: (u64, u64) = (1, 1);

/// A key's delta log is full once its bytes would exceed both [`LOG_PER_STATE`] times its
/// state's and this ...
pub const MIN_LOG_BYTES: u64 = 4096;
/// ... or their number this.
pub const MAX_DELTAS: u64 = 4096;
/// How many times its state's bytes a key's deltas may take: a large value is written once
/// per this many times its size of changes (its encoding is the compaction's main cost), and a
/// load reads and joins at most this much more than the state.
pub const LOG_PER_STATE: u64 = 4;

/// When a key's delta log is full (see [`MIN_LOG_BYTES`]), or, at twice that, compacted by
/// the file itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LogBound {
    min_bytes: u64,
    max_deltas: u64,
    per_state: u64,
}

impl Default for LogBound {
    fn default() -> Self {
        LogBound {
            min_bytes: MIN_LOG_BYTES,
            max_deltas: MAX_DELTAS,
            per_state: LOG_PER_STATE,
        }
    }
}

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const DELTAS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("deltas");

const K_FORMAT: &str = "format_version";
const K_ENCODING: &str = "encoding_version";
const K_NODE: &str = "node_name";
const K_CLUSTER: &str = "cluster";
const K_REPLICA: &str = "replica_id";
const K_CREATED: &str = "created_at_ms";
const K_ALIVE: &str = "alive_at_ms";
/// How often, at most, a batch with records writes `alive_at` (ms).
const ALIVE_EVERY_MS: i64 = 1_000;
const K_LIVES: &str = "lives";
const K_CLEAN: &str = "clean_shutdown";

/// redb's page cache (its default, 1 GiB, is more than a daemon should take by itself).
const CACHE_BYTES: usize = 64 << 20;

/// Which cluster a file belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterId {
    /// the SHA-256 fingerprints (hex) of the CA certificates given with `--ca-cert` (several
    /// while a new CA rolls in)
    Ca(BTreeSet<String>),
    /// a node alone on an ephemeral self-signed certificate: no cluster. Its file may later be
    /// adopted by a cluster (the node given a CA keeps its data); a cluster's file is never
    /// opened by a lone node.
    Lone,
}

impl ClusterId {
    /// The identity of the CA certificates (DER).
    pub fn of_cas<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> ClusterId {
        ClusterId::Ca(ders.into_iter().map(fingerprint).collect())
    }

    fn encode(&self) -> String {
        match self {
            ClusterId::Lone => "lone".to_string(),
            ClusterId::Ca(fps) => format!(
                "ca:{}",
                fps.iter().map(String::as_str).collect::<Vec<_>>().join(",")
            ),
        }
    }

    fn decode(s: &str) -> Option<ClusterId> {
        if s == "lone" {
            return Some(ClusterId::Lone);
        }
        let fps = s.strip_prefix("ca:")?;
        Some(ClusterId::Ca(
            fps.split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect(),
        ))
    }
}

/// SHA-256 of `der`, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What the node starting expects of its data file.
#[derive(Clone, Debug)]
pub struct Expect {
    /// this node's name
    pub node_name: String,
    /// this node's cluster
    pub cluster: ClusterId,
    /// the tombstone lifetime (`None`: forever)
    pub tombstone_ttl: Option<Duration>,
    /// now, ms since the Unix epoch
    pub now_ms: i64,
    /// the replica id to take if the file is new, or its previous life did not end cleanly
    pub new_replica: u64,
}

/// What an opened file held.
#[derive(Debug)]
pub struct Loaded {
    /// this node's replica id: the stored one after a clean shutdown, else the new one
    pub replica: u64,
    /// the replica id of the previous life, when this life took a new one because that life
    /// did not end cleanly (its deltas may have left the node before they were committed)
    pub replaced: Option<u64>,
    /// every key's record
    pub records: Vec<(String, Record)>,
    /// the file was created now
    pub created: bool,
    /// starts of this node with this file, this one included
    pub lives: u64,
    /// the previous life ended with a clean shutdown (`false` after a crash or kill -9)
    pub clean: bool,
}

/// Why the data file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// another process holds the file
    #[error("data file {path}: held by another process (another latticed on this data dir?)")]
    Held {
        /// the file
        path: PathBuf,
    },
    /// the file is damaged
    #[error(
        "data file {path} is corrupt or truncated: {reason}; move it away (or restore a \
             backup) to start, this node then catches up from its peers"
    )]
    Corrupt {
        /// the file
        path: PathBuf,
        /// what is wrong
        reason: String,
    },
    /// a file of a format or encoding this release does not read
    #[error(
        "data file {path}: {what} {found}, this latticed reads {known} only (written by \
             another release?)"
    )]
    UnknownFormat {
        /// the file
        path: PathBuf,
        /// `format version` or `encoding version`
        what: &'static str,
        /// in the file
        found: u64,
        /// this release's
        known: u64,
    },
    /// another node's file
    #[error(
        "data file {path} belongs to node {stored}, not to {ours}: each node needs its own \
             --data-dir"
    )]
    OtherNode {
        /// the file
        path: PathBuf,
        /// the name in the file
        stored: String,
        /// this node's name
        ours: String,
    },
    /// another cluster's file
    #[error(
        "data file {path} belongs to another cluster ({stored}) than this node's \
             ({ours}); a node never brings one cluster's data into another"
    )]
    OtherCluster {
        /// the file
        path: PathBuf,
        /// the identity in the file
        stored: String,
        /// this node's
        ours: String,
    },
    /// too old for the tombstone lifetime
    #[error(
        "data file {path} was last written {age:?} ago, longer than --tombstone-ttl \
             {ttl:?}: the cluster may have forgotten deletes it missed (its deleted keys would \
             come back) or written keys it holds tombstones of; move it away to start empty \
             (the node then catches up from its peers)"
    )]
    TooOld {
        /// the file
        path: PathBuf,
        /// since its last write
        age: Duration,
        /// the lifetime
        ttl: Duration,
    },
    /// an IO or database failure (also a failed commit: fatal)
    #[error("data file {path}: {what}: {reason}")]
    Failed {
        /// the file
        path: PathBuf,
        /// what was being done
        what: &'static str,
        /// the error
        reason: String,
    },
}

/// The open data file.
pub struct DataFile {
    db: Database,
    path: PathBuf,
    /// what the file holds of each key's deltas, for the keys that have some
    logs: HashMap<String, DeltaLog>,
    bound: LogBound,
    /// the `alive_at` the file holds (`None`: not written in this life yet)
    alive_written_ms: Option<i64>,
    /// compactions done (for tests)
    #[cfg(test)]
    compactions: std::cell::Cell<u64>,
}

/// What the file holds of one key's deltas.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct DeltaLog {
    /// the size of the key's state record
    state_bytes: u64,
    /// the number the next delta takes
    next: u64,
    /// how many deltas
    count: u64,
    /// their bytes
    bytes: u64,
}

impl DeltaLog {
    /// Whether adding a delta of `bytes` takes the log past `times` its `bound`.
    fn full_with(&self, bytes: u64, bound: LogBound, times: u64) -> bool {
        self.count.saturating_add(1) > bound.max_deltas.saturating_mul(times)
            || self.bytes.saturating_add(bytes)
                > (self.state_bytes.saturating_mul(bound.per_state))
                    .max(bound.min_bytes)
                    .saturating_mul(times)
    }
}

/// The two tables of records, open in a write transaction.
struct Tables<'t> {
    entries: redb::Table<'t, &'static str, &'static [u8]>,
    deltas: redb::Table<'t, (&'static str, u64), &'static [u8]>,
}

impl std::fmt::Debug for DataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFile")
            .field("path", &self.path)
            .finish()
    }
}

fn u64_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn i64_of(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_le_bytes(bytes.try_into().ok()?))
}

impl DataFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (or creates) `DIR/latticed.redb`, checks it against `expect`, reads every record,
    /// and records this start (a new life, not yet ended cleanly). One attempt: a file held by
    /// another process is [`DiskError::Held`].
    pub fn open(dir: &Path, expect: &Expect) -> Result<(DataFile, Loaded), DiskError> {
        let path = dir.join(DATA_FILE);
        // redb checks what it reads, but a damaged file may still trip an assertion inside it:
        // that is a corrupt file too, never a crash without a word
        match std::panic::catch_unwind(AssertUnwindSafe(|| Self::open_inner(dir, &path, expect))) {
            Ok(r) => r,
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the database library panicked".to_string());
                Err(DiskError::Corrupt { path, reason })
            }
        }
    }

    fn open_inner(
        dir: &Path,
        path: &Path,
        expect: &Expect,
    ) -> Result<(DataFile, Loaded), DiskError> {
        let failed = |what: &'static str| {
            let path = path.to_path_buf();
            move |e: &dyn std::fmt::Display| DiskError::Failed {
                path: path.clone(),
                what,
                reason: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| failed("creating the data dir")(&e))?;
        let exists = match std::fs::metadata(path) {
            Ok(m) if m.len() == 0 => {
                // redb would take an empty file for a new database: never silently
                return Err(DiskError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "the file is empty".into(),
                });
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(failed("reading its metadata")(&e)),
        };
        let mut builder = Database::builder();
        builder
            .set_cache_size(CACHE_BYTES)
            .create_with_file_format_v3(true);
        let opened = if exists {
            builder.open(path)
        } else {
            builder.create(path)
        };
        let db = opened.map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => DiskError::Held {
                path: path.to_path_buf(),
            },
            DatabaseError::Storage(StorageError::Corrupted(reason)) => DiskError::Corrupt {
                path: path.to_path_buf(),
                reason,
            },
            DatabaseError::Storage(StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                DiskError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("it ends early ({io})"),
                }
            }
            other => failed("opening it")(&other),
        })?;
        let mut file = DataFile {
            db,
            path: path.to_path_buf(),
            logs: HashMap::new(),
            bound: LogBound::default(),
            alive_written_ms: None,
            #[cfg(test)]
            compactions: Default::default(),
        };
        let loaded = file.check_and_load(expect)?;
        Ok((file, loaded))
    }

    fn corrupt(&self, reason: impl Into<String>) -> DiskError {
        DiskError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn failed(&self, what: &'static str, e: impl std::fmt::Display) -> DiskError {
        // redb says "corrupted" for damage it finds while reading
        let reason = e.to_string();
        if reason.to_ascii_lowercase().contains("corrupt") {
            return self.corrupt(reason);
        }
        DiskError::Failed {
            path: self.path.clone(),
            what,
            reason,
        }
    }

    fn check_and_load(&mut self, expect: &Expect) -> Result<Loaded, DiskError> {
        let read = self
            .db
            .begin_read()
            .map_err(|e| self.failed("reading", e))?;
        let meta = match read.open_table(META) {
            Ok(t) => Some(t),
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(self.failed("reading the meta table", e)),
        };
        let Some(meta) = meta else {
            // a new file (or one whose creation stopped before its first commit): it must hold
            // no records
            let holds_records = match read.open_table(ENTRIES) {
                Ok(t) => t.len().map_err(|e| self.failed("reading", e))? > 0,
                Err(_) => false,
            };
            if holds_records {
                return Err(self.corrupt("records without a meta table"));
            }
            drop(read);
            self.init(expect)?;
            return Ok(Loaded {
                replica: expect.new_replica,
                replaced: None,
                records: Vec::new(),
                created: true,
                lives: 1,
                clean: true,
            });
        };
        let get = |k: &'static str| -> Result<Vec<u8>, DiskError> {
            meta.get(k)
                .map_err(|e| self.failed("reading the meta table", e))?
                .map(|v| v.value().to_vec())
                .ok_or_else(|| self.corrupt(format!("no `{k}` in the meta table")))
        };
        let number = |k: &'static str| -> Result<u64, DiskError> {
            u64_of(&get(k)?).ok_or_else(|| self.corrupt(format!("a bad `{k}`")))
        };
        let time = |k: &'static str| -> Result<i64, DiskError> {
            i64_of(&get(k)?).ok_or_else(|| self.corrupt(format!("a bad `{k}`")))
        };
        let text = |k: &'static str| -> Result<String, DiskError> {
            String::from_utf8(get(k)?).map_err(|_| self.corrupt(format!("a bad `{k}`")))
        };
        let versions = (number(K_FORMAT)?, number(K_ENCODING)?);
        if versions != MIGRATED {
            for (what, found, known) in [
                ("format version", versions.0, FORMAT_VERSION),
                ("encoding version", versions.1, ENCODING_VERSION),
            ] {
                if found != known {
                    return Err(DiskError::UnknownFormat {
                        path: self.path.clone(),
                        what,
                        found,
                        known,
                    });
                }
            }
        }
        let node = text(K_NODE)?;
        if node != expect.node_name {
            return Err(DiskError::OtherNode {
                path: self.path.clone(),
                stored: node,
                ours: expect.node_name.clone(),
            });
        }
        let stored_cluster = text(K_CLUSTER)?;
        let cluster = ClusterId::decode(&stored_cluster)
            .ok_or_else(|| self.corrupt(format!("a bad `{K_CLUSTER}`")))?;
        let same_cluster = match (&cluster, &expect.cluster) {
            (ClusterId::Lone, _) => true,
            (ClusterId::Ca(_), ClusterId::Lone) => false,
            // a CA rolling in or out keeps at least one CA in common
            (ClusterId::Ca(a), ClusterId::Ca(b)) => !a.is_disjoint(b),
        };
        if !same_cluster {
            return Err(DiskError::OtherCluster {
                path: self.path.clone(),
                stored: stored_cluster,
                ours: expect.cluster.encode(),
            });
        }
        if let Some(ttl) = expect.tombstone_ttl {
            let alive = time(K_ALIVE)?;
            let age = Duration::from_millis(expect.now_ms.saturating_sub(alive).max(0) as u64);
            if age > ttl {
                return Err(DiskError::TooOld {
                    path: self.path.clone(),
                    age,
                    ttl,
                });
            }
        }
        let stored_replica = number(K_REPLICA)?;
        let lives = number(K_LIVES)?.saturating_add(1);
        let clean = get(K_CLEAN)? == [1];
        // deltas leave a node before their commit: a life that did not end cleanly may have
        // sent dots and counter values the file does not hold, so this one must never issue
        // them again, as the same replica would
        let (replica, replaced) = if clean {
            (stored_replica, None)
        } else {
            (expect.new_replica, Some(stored_replica))
        };
        time(K_CREATED)?;
        let mut deltas = self.read_deltas(&read)?;
        let mut records = Vec::new();
        match read.open_table(ENTRIES) {
            Ok(entries) => {
                for row in entries.iter().map_err(|e| self.failed("reading", e))? {
                    let (k, v) = row.map_err(|e| self.failed("reading a record", e))?;
                    let key = k.value().to_string();
                    let bad = |e: record::RecordError| {
                        self.corrupt(format!("the record of key {key:?}: {e}"))
                    };
                    let mut r = record::decode(v.value()).map_err(bad)?;
                    if let Some((log, ds)) = deltas.remove(&key) {
                        r = record::replay(r, ds).map_err(bad)?;
                        let state_bytes = v.value().len() as u64;
                        self.logs
                            .insert(key.clone(), DeltaLog { state_bytes, ..log });
                    }
                    records.push((key, r));
                }
            }
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(self.failed("reading the records", e)),
        }
        if let Some(key) = deltas.keys().min() {
            return Err(self.corrupt(format!("deltas of key {key:?}, which has no record")));
        }
        drop(meta);
        drop(read);
        // this life starts: count it, not clean until it ends so; the cluster's identity
        // follows its CAs as they roll; an older layout becomes this one
        self.write_meta(&[
            (K_REPLICA, replica.to_le_bytes().to_vec()),
            (K_LIVES, lives.to_le_bytes().to_vec()),
            (K_CLEAN, vec![0]),
            (K_ALIVE, expect.now_ms.to_le_bytes().to_vec()),
            (K_CLUSTER, expect.cluster.encode().into_bytes()),
            (K_FORMAT, FORMAT_VERSION.to_le_bytes().to_vec()),
            (K_ENCODING, ENCODING_VERSION.to_le_bytes().to_vec()),
        ])?;
        Ok(Loaded {
            replica,
            replaced,
            records,
            created: false,
            lives,
            clean,
        })
    }

    /// Every key's deltas, decoded, in order, with what the file holds of them (but the size of
    /// the state, read with it).
    #[allow(clippy::type_complexity)]
    fn read_deltas(
        &self,
        read: &redb::ReadTransaction,
    ) -> Result<HashMap<String, (DeltaLog, Vec<CrdtValue>)>, DiskError> {
        let mut out: HashMap<String, (DeltaLog, Vec<CrdtValue>)> = HashMap::new();
        let table = match read.open_table(DELTAS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(out),
            Err(e) => return Err(self.failed("reading the deltas", e)),
        };
        for row in table.iter().map_err(|e| self.failed("reading", e))? {
            let (k, v) = row.map_err(|e| self.failed("reading a delta", e))?;
            let (key, n) = k.value();
            let d = record::decode_delta(v.value())
                .map_err(|e| self.corrupt(format!("delta {n} of key {key:?}: {e}")))?;
            let (log, ds) = out.entry(key.to_string()).or_default();
            // the numbers come from the file: the last one would leave none for the next
            log.next = n
                .checked_add(1)
                .filter(|next| *next < u64::MAX)
                .ok_or_else(|| self.corrupt(format!("delta {n} of key {key:?}: out of range")))?;
            log.count = log.count.saturating_add(1);
            log.bytes = log.bytes.saturating_add(v.value().len() as u64);
            ds.push(d);
        }
        Ok(out)
    }

    fn init(&self, expect: &Expect) -> Result<(), DiskError> {
        self.write_meta(&[
            (K_FORMAT, FORMAT_VERSION.to_le_bytes().to_vec()),
            (K_ENCODING, ENCODING_VERSION.to_le_bytes().to_vec()),
            (K_NODE, expect.node_name.clone().into_bytes()),
            (K_CLUSTER, expect.cluster.encode().into_bytes()),
            (K_REPLICA, expect.new_replica.to_le_bytes().to_vec()),
            (K_CREATED, expect.now_ms.to_le_bytes().to_vec()),
            (K_ALIVE, expect.now_ms.to_le_bytes().to_vec()),
            (K_LIVES, 1u64.to_le_bytes().to_vec()),
            (K_CLEAN, vec![0]),
        ])
    }

    /// One durable transaction: `meta` entries set, and `f` run on the records tables.
    fn transaction(
        &self,
        meta: &[(&str, Vec<u8>)],
        f: impl FnOnce(&mut Tables<'_>) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| self.failed("starting a transaction", e))?;
        txn.set_durability(Durability::Immediate);
        {
            let mut tables = Tables {
                entries: txn
                    .open_table(ENTRIES)
                    .map_err(|e| self.failed("opening the records", e))?,
                deltas: txn
                    .open_table(DELTAS)
                    .map_err(|e| self.failed("opening the deltas", e))?,
            };
            f(&mut tables)?;
            drop(tables);
            let mut m = txn
                .open_table(META)
                .map_err(|e| self.failed("opening the meta table", e))?;
            for (k, v) in meta {
                m.insert(*k, v.as_slice())
                    .map_err(|e| self.failed("writing the meta table", e))?;
            }
        }
        txn.commit().map_err(|e| self.failed("committing", e))
    }

    fn write_meta(&self, meta: &[(&str, Vec<u8>)]) -> Result<(), DiskError> {
        self.transaction(meta, |_| Ok(()))
    }

    /// Writes `key`'s state record, dropping its deltas.
    fn put_state(
        &self,
        t: &mut Tables<'_>,
        logs: &mut HashMap<String, DeltaLog>,
        key: &str,
        bytes: &[u8],
    ) -> Result<(), DiskError> {
        let w = |e| self.failed("writing records", e);
        t.entries.insert(key, bytes).map_err(w)?;
        self.drop_deltas(t, logs, key)
    }

    fn drop_deltas(
        &self,
        t: &mut Tables<'_>,
        logs: &mut HashMap<String, DeltaLog>,
        key: &str,
    ) -> Result<(), DiskError> {
        if logs.remove(key).is_some() {
            t.deltas
                .retain_in((key, 0)..=(key, u64::MAX), |_, _| false)
                .map_err(|e| self.failed("dropping deltas", e))?;
        }
        Ok(())
    }

    /// Writes a delta of `key`: appended to its deltas if it has a stored value (and `key`
    /// added to `full` if that takes them past their bound; compacted with them into its state
    /// if it takes them past twice the bound), else its value from nothing.
    fn put_delta(
        &self,
        t: &mut Tables<'_>,
        logs: &mut HashMap<String, DeltaLog>,
        key: &str,
        d: &CrdtValue,
        full: &mut Vec<String>,
    ) -> Result<(), DiskError> {
        let r = |e| self.failed("reading records", e);
        let bad = |e: record::RecordError| self.corrupt(format!("the record of key {key:?}: {e}"));
        let log = match logs.get(key) {
            Some(log) => *log,
            None => {
                let stored = t.entries.get(key).map_err(r)?;
                match stored.map(|g| {
                    (
                        g.value().first() == Some(&record::TAG_VALUE),
                        g.value().len(),
                    )
                }) {
                    Some((true, len)) => DeltaLog {
                        state_bytes: len as u64,
                        ..DeltaLog::default()
                    },
                    // nothing to build on: the delta is the value
                    _ => {
                        let whole = Entry::Value(d.clone().into_state());
                        return self.put_state(t, logs, key, &record::encode(&whole, 0));
                    }
                }
            }
        };
        let bytes = record::encode_delta(d);
        let size = bytes.len() as u64;
        if !log.full_with(size, self.bound, 2) {
            if log.full_with(size, self.bound, 1) {
                full.push(key.to_string());
            }
            t.deltas
                .insert((key, log.next), bytes.as_slice())
                .map_err(|e| self.failed("writing deltas", e))?;
            let next = log.next.checked_add(1).ok_or_else(|| {
                self.corrupt(format!(
                    "key {key:?}: no delta number left after {}",
                    log.next
                ))
            })?;
            logs.insert(
                key.to_string(),
                DeltaLog {
                    next,
                    count: log.count.saturating_add(1),
                    bytes: log.bytes.saturating_add(size),
                    ..log
                },
            );
            return Ok(());
        }
        // the batches did not follow the report: the state with every delta joined in
        // replaces them
        let state = match t.entries.get(key).map_err(r)? {
            Some(g) => record::decode(g.value()).map_err(bad)?,
            None => return Err(bad(record::RecordError::Empty)),
        };
        let mut deltas = Vec::with_capacity(log.count as usize + 1);
        for row in t.deltas.range((key, 0)..=(key, u64::MAX)).map_err(r)? {
            let (_, v) = row.map_err(r)?;
            deltas.push(record::decode_delta(v.value()).map_err(bad)?);
        }
        deltas.push(d.clone());
        #[cfg(test)]
        self.compactions.set(self.compactions.get() + 1);
        let joined = record::replay(state, deltas).map_err(bad)?.into_entry();
        self.put_state(t, logs, key, &record::encode(&joined, 0))
    }

    /// Records that this life ends cleanly (the last write of an orderly shutdown).
    pub fn mark_clean(&self, now_ms: i64) -> Result<(), DiskError> {
        self.write_meta(&[(K_CLEAN, vec![1]), (K_ALIVE, now_ms.to_le_bytes().to_vec())])
    }
}

impl Durable for DataFile {
    fn commit(&mut self, batch: &Batch) -> Result<Vec<String>, DiskError> {
        // (a failed commit ends the process: what `logs` says of it does not matter)
        let mut logs = std::mem::take(&mut self.logs);
        let mut full = Vec::new();
        let removes = batch.removes.iter().map(|k| (k, &Change::Removed));
        let changes = batch.puts.iter().map(|(k, c)| (k, c)).chain(removes);
        // `alive_at` needs no more than second precision (it is held against the tombstone
        // lifetime): a busy node writes it once a second, not in every batch (one table fewer
        // in most commits); an empty batch (the heartbeat) always writes it
        let alive_due = batch.puts.is_empty() && batch.removes.is_empty()
            || self
                .alive_written_ms
                .is_none_or(|t| batch.alive_at_ms >= t.saturating_add(ALIVE_EVERY_MS));
        let alive = [(K_ALIVE, batch.alive_at_ms.to_le_bytes().to_vec())];
        let meta: &[(&str, Vec<u8>)] = if alive_due { &alive } else { &[] };
        let done = self.transaction(meta, |t| {
            for (k, change) in changes {
                match change {
                    Change::Delta(d) => self.put_delta(t, &mut logs, k, d, &mut full)?,
                    Change::Whole(e) => {
                        let bytes = record::encode(e, batch.alive_at_ms);
                        self.put_state(t, &mut logs, k, &bytes)?;
                    }
                    Change::Removed => {
                        t.entries
                            .remove(k.as_str())
                            .map_err(|e| self.failed("removing records", e))?;
                        self.drop_deltas(t, &mut logs, k)?;
                    }
                }
            }
            Ok(())
        });
        self.logs = logs;
        if done.is_ok() && alive_due {
            self.alive_written_ms = Some(batch.alive_at_ms);
        }
        done.map(|()| full)
    }

    fn close(&mut self, now_ms: i64) -> Result<(), DiskError> {
        self.mark_clean(now_ms)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// How often [`open_waiting`] says it is still waiting.
pub const WAIT_LOG_EVERY: Duration = Duration::from_secs(5);

/// [`DataFile::open`], waiting (up to `limit`) while another process holds the file (two pods
/// overlapping in a rolling update): polls with a backoff up to 1 s, and logs when it starts
/// waiting and every [`WAIT_LOG_EVERY`] after.
pub fn open_waiting(
    dir: &Path,
    expect: &Expect,
    limit: Duration,
) -> Result<(DataFile, Loaded), DiskError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    let mut last_log: Option<Instant> = None;
    loop {
        match DataFile::open(dir, expect) {
            Err(DiskError::Held { path }) => {
                let waited = start.elapsed();
                if waited >= limit {
                    tracing::error!(file = %path.display(), ?waited, "data file still held by another process; giving up");
                    return Err(DiskError::Held { path });
                }
                if last_log.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                    last_log = Some(Instant::now());
                    tracing::warn!(file = %path.display(), waited_s = waited.as_secs(), limit_s = limit.as_secs(),
                        "data file held by another process (a latticed still running on this data dir?): waiting for it to exit");
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Ok(opened) => {
                if last_log.is_some() {
                    tracing::info!(file = %opened.0.path.display(), waited_ms = start.elapsed().as_millis() as u64,
                        "data file released by the other process: opened");
                }
                return Ok(opened);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Entry, Store};
    use latticed_crdt::{apply_user_delta, CrdtKind, CrdtValue, Element};
    use latticed_proto::cloudstate::crdt::{
        crdt_delta::Delta, CrdtDelta, GCounterDelta, OrSetDelta,
    };
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::collections::BTreeMap;

    fn expect(name: &str) -> Expect {
        Expect {
            node_name: name.into(),
            cluster: ClusterId::of_cas([b"ca-1".as_slice()]),
            tombstone_ttl: None,
            now_ms: 1_000_000,
            new_replica: 42,
        }
    }

    fn value() -> Entry {
        Entry::Value(CrdtValue::empty_delta(CrdtKind::GCounter).into_state())
    }

    fn batch(n: u64, puts: &[(&str, Option<&Entry>)]) -> Batch {
        let mut b = Batch::new(n, 2_000_000);
        for (k, e) in puts {
            let change = e.map_or(Change::Removed, |e| Change::Whole(e.clone()));
            b.put(k.to_string(), change);
        }
        b
    }

    /// A log past its bound is reported at each commit and not compacted by the file until it
    /// is twice full; a whole value (the driver following the report) replaces it.
    #[test]
    fn a_full_log_is_reported_and_compacted_by_the_file_only_at_twice_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        f.bound = LogBound {
            min_bytes: 1 << 20,
            max_deltas: 2,
            per_state: 1,
        };
        let mut mem = Store::new(1);
        let mut one = || {
            let inc = CrdtDelta {
                delta: Some(Delta::Gcounter(GCounterDelta { increment: 1 })),
            };
            mem.update("a", |v| apply_user_delta(v, &inc, 1, 0))
                .unwrap();
            mem.take_change("a")
        };
        let mut n = 0;
        let mut commit = |f: &mut DataFile, change: Change| {
            n += 1;
            let mut b = Batch::new(n, 2_000_000);
            b.put("a".to_string(), change);
            f.commit(&b).unwrap()
        };
        // the value, then deltas 1..=2 within the bound, 3..=4 past it, the 5th past twice it
        let reports: Vec<Vec<String>> = (0..6).map(|_| commit(&mut f, one())).collect();
        let a = vec!["a".to_string()];
        assert_eq!(
            reports,
            [vec![], vec![], vec![], a.clone(), a.clone(), vec![]]
        );
        assert_eq!(
            f.compactions.take(),
            1,
            "compacted by the file at twice the bound"
        );
        assert_eq!(f.logs.get("a").map(|l| l.count), None);
        for _ in 0..3 {
            commit(&mut f, one());
        }
        assert_eq!(f.logs.get("a").map(|l| l.count), Some(3));
        // the driver follows the report: the whole value replaces the log
        let whole = Entry::Value(CrdtValue::empty_delta(CrdtKind::GCounter).into_state());
        assert!(commit(&mut f, Change::Whole(whole)).is_empty());
        assert_eq!(f.logs.get("a"), None, "the log is dropped");
        assert_eq!(f.compactions.take(), 0, "without reading the file");
    }

    /// The `alive_at` a file holds.
    fn alive_at(f: &DataFile) -> i64 {
        let read = f.db.begin_read().unwrap();
        let meta = read.open_table(META).unwrap();
        let v = meta.get(K_ALIVE).unwrap().unwrap();
        i64::from_le_bytes(v.value().try_into().unwrap())
    }

    #[test]
    fn a_busy_file_writes_alive_at_once_a_second_and_a_heartbeat_always() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        let v = value();
        let at = |n: u64, ms: i64, puts: &[(&str, Option<&Entry>)]| {
            let mut b = batch(n, puts);
            b.alive_at_ms = ms;
            b
        };
        f.commit(&at(1, 10_000, &[("a", Some(&v))])).unwrap();
        assert_eq!(alive_at(&f), 10_000);
        f.commit(&at(2, 10_500, &[("a", Some(&v))])).unwrap();
        assert_eq!(alive_at(&f), 10_000, "within a second: not again");
        f.commit(&at(3, 11_000, &[("a", Some(&v))])).unwrap();
        assert_eq!(alive_at(&f), 11_000);
        f.commit(&at(4, 11_100, &[])).unwrap();
        assert_eq!(alive_at(&f), 11_100, "a heartbeat always writes it");
    }

    fn injected() -> DiskError {
        DiskError::Failed {
            path: "test".into(),
            what: "testing",
            reason: "injected".into(),
        }
    }

    fn insert(t: &mut Tables<'_>, key: &str, bytes: &[u8]) -> Result<(), DiskError> {
        t.entries.insert(key, bytes).map_err(|_| injected())?;
        Ok(())
    }

    #[test]
    fn records_and_the_replica_id_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, l) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        assert!(l.created && l.records.is_empty() && l.replica == 42);
        let v = value();
        f.commit(&batch(1, &[("a", Some(&v)), ("b", Some(&Entry::Deleted))]))
            .unwrap();
        f.commit(&batch(2, &[("c", Some(&v))])).unwrap();
        f.commit(&batch(3, &[("c", None)])).unwrap();
        drop(f);
        let mut again = expect("n1");
        again.new_replica = 7;
        let (f, l) = DataFile::open(dir.path(), &again).unwrap();
        assert!(!l.created);
        assert_eq!(l.lives, 2);
        assert!(!l.clean, "the first life did not end cleanly");
        assert_eq!(
            (l.replica, l.replaced),
            (7, Some(42)),
            "after an unclean end, a fresh replica id"
        );
        let entries: Vec<(String, Entry)> = l
            .records
            .into_iter()
            .map(|(k, r)| (k, r.into_entry()))
            .collect();
        assert_eq!(
            entries,
            vec![("a".to_string(), v), ("b".to_string(), Entry::Deleted)]
        );
        f.mark_clean(3_000_000).unwrap();
        drop(f);
        again.new_replica = 9;
        let (_f, l) = DataFile::open(dir.path(), &again).unwrap();
        assert!(l.clean && l.lives == 3);
        assert_eq!(
            (l.replica, l.replaced),
            (7, None),
            "after a clean end, the stored replica id"
        );
    }

    /// A batch is one transaction: a failure in its middle leaves none of it.
    #[test]
    fn a_failed_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        let v = value();
        let r = f.transaction(&[], |t| {
            insert(t, "x", &record::encode(&v, 0))?;
            insert(t, "y", &record::encode(&v, 0))?;
            Err(injected())
        });
        assert!(r.is_err());
        drop(f);
        let (_f, l) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        assert!(l.records.is_empty(), "{:?}", l.records);
    }

    #[test]
    fn a_file_is_refused_to_another_node_cluster_format_or_past_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        drop(f);
        let err = DataFile::open(dir.path(), &expect("n2")).unwrap_err();
        assert!(matches!(err, DiskError::OtherNode { .. }), "{err}");
        assert!(err.to_string().contains(DATA_FILE), "{err}");
        let mut other = expect("n1");
        other.cluster = ClusterId::of_cas([b"ca-2".as_slice()]);
        let err = DataFile::open(dir.path(), &other).unwrap_err();
        assert!(matches!(err, DiskError::OtherCluster { .. }), "{err}");
        let mut lone = expect("n1");
        lone.cluster = ClusterId::Lone;
        let err = DataFile::open(dir.path(), &lone).unwrap_err();
        assert!(matches!(err, DiskError::OtherCluster { .. }), "{err}");
        // a CA rolling in: the old one and the new one
        let mut rolling = expect("n1");
        rolling.cluster = ClusterId::of_cas([b"ca-1".as_slice(), b"ca-2".as_slice()]);
        drop(DataFile::open(dir.path(), &rolling).unwrap());
        // ... and the old one gone
        drop(DataFile::open(dir.path(), &other).unwrap());
        let mut late = other.clone();
        late.tombstone_ttl = Some(Duration::from_secs(60));
        late.now_ms += 61_000;
        let err = DataFile::open(dir.path(), &late).unwrap_err();
        assert!(matches!(err, DiskError::TooOld { .. }), "{err}");
        late.now_ms -= 2_000;
        drop(DataFile::open(dir.path(), &late).unwrap());
        // an unknown format
        let (f, _) = DataFile::open(dir.path(), &other).unwrap();
        f.write_meta(&[(K_FORMAT, 99u64.to_le_bytes().to_vec())])
            .unwrap();
        drop(f);
        let err = DataFile::open(dir.path(), &other).unwrap_err();
        assert!(
            matches!(err, DiskError::UnknownFormat { found: 99, .. }),
            "{err}"
        );
    }

    /// A random write to `key` (an ORSet add or remove, or a GCounter increment, by key) as
    /// replica `replica`.
    fn random_write(store: &mut Store, rng: &mut StdRng, key: &str, replica: u64) {
        let delta = if key.starts_with("set") {
            let e = Element::string(&format!("e{}", rng.random_range(0..12))).to_any();
            let (added, removed) = if rng.random_range(0..3) == 0 {
                (vec![], vec![e])
            } else {
                (vec![e], vec![])
            };
            Delta::Orset(OrSetDelta {
                cleared: rng.random_range(0..40) == 0,
                removed,
                added,
            })
        } else {
            Delta::Gcounter(GCounterDelta {
                increment: rng.random_range(1..5),
            })
        };
        let d = CrdtDelta { delta: Some(delta) };
        let _ = store.update(key, |v| apply_user_delta(v, &d, replica, 0));
    }

    fn loaded(l: Loaded) -> BTreeMap<String, Entry> {
        l.records
            .into_iter()
            .map(|(k, r)| (k, r.into_entry()))
            .collect()
    }

    /// Any sequence of local writes, peers' deltas and full states, deletes, forgotten
    /// tombstones, commits (of deltas, of whole entries, with compactions from memory when a
    /// batch follows the file's report of a full log, and by the file itself when it does not)
    /// and reopenings of the file (the node keeping its memory, or restarting from what it
    /// loaded) loads what the memory store held at the last commit.
    #[test]
    fn deltas_and_compactions_load_what_was_committed() {
        const KEYS: [&str; 4] = ["set-a", "set-b", "count-a", "count-b"];
        let (mut compactions, mut from_memory) = (0, 0);
        for seed in 0..16 {
            let mut rng = StdRng::seed_from_u64(seed);
            let dir = tempfile::tempdir().unwrap();
            let bound = LogBound {
                min_bytes: rng.random_range(0..400),
                max_deltas: rng.random_range(1..8),
                per_state: rng.random_range(1..3),
            };
            let (mut f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
            f.bound = bound;
            let mut mem = Store::new(1);
            let mut peer = Store::new(2);
            let mut dirty: BTreeSet<String> = BTreeSet::new();
            let mut full: BTreeSet<String> = BTreeSet::new();
            let mut committed = BTreeMap::new();
            let mut n = 0;
            for _ in 0..300 {
                let key = KEYS[rng.random_range(0..KEYS.len())];
                match rng.random_range(0..100) {
                    0..=49 => random_write(&mut mem, &mut rng, key, 1),
                    50..=64 => {
                        random_write(&mut peer, &mut rng, key, 2);
                        // the peer ships its delta, or (anti-entropy) its whole value
                        let shipped = match (rng.random_range(0..4), peer.get(key)) {
                            (0, Some(whole)) => Some(whole.clone()),
                            _ => match peer.take_change(key) {
                                Change::Delta(d) => Some(Entry::Value(d)),
                                Change::Whole(e) => Some(e),
                                Change::Removed => None,
                            },
                        };
                        if let Some(e) = shipped {
                            let _ = mem.join(key, &e);
                        }
                    }
                    65..=67 => {
                        mem.join(key, &Entry::Deleted).unwrap();
                        // its tombstone soon past its lifetime
                        if rng.random_range(0..2) == 0 {
                            mem.forget(key);
                        }
                    }
                    69..=89 => {
                        n += 1;
                        let mut b = Batch::new(n, 2_000_000);
                        for k in std::mem::take(&mut dirty) {
                            // the driver follows the report; here, not always
                            let change = if full.remove(&k) && rng.random_range(0..4) > 0 {
                                from_memory += 1;
                                mem.take_whole(&k)
                            } else {
                                mem.take_change(&k)
                            };
                            b.put(k.clone(), change);
                        }
                        full.extend(f.commit(&b).unwrap());
                        committed = mem.iter().map(|(k, e)| (k.clone(), e.clone())).collect();
                        compactions += f.compactions.take();
                        continue;
                    }
                    _ => {
                        drop(f);
                        let l;
                        (f, l) = DataFile::open(dir.path(), &expect("n1")).unwrap();
                        f.bound = bound;
                        let l = loaded(l);
                        assert_eq!(l, committed, "seed {seed}: reloaded");
                        if rng.random_range(0..2) == 0 {
                            // a restart: memory is what was loaded, changes since are lost
                            mem = Store::new(1);
                            for (k, e) in l {
                                mem.load(k, e);
                            }
                            dirty.clear();
                            full.clear();
                        }
                        continue;
                    }
                }
                dirty.insert(key.to_string());
            }
            drop(f);
            let (_, l) = DataFile::open(dir.path(), &expect("n1")).unwrap();
            assert_eq!(loaded(l), committed, "seed {seed}: at the end");
        }
        assert!(
            compactions > 10,
            "only {compactions} compactions by the file"
        );
        assert!(
            from_memory > 10,
            "only {from_memory} compactions from memory"
        );
    }

    #[test]
    fn a_format_1_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        let v = value();
        f.commit(&batch(1, &[("a", Some(&v))])).unwrap();
        f.write_meta(&[
            (K_FORMAT, 1u64.to_le_bytes().to_vec()),
            (K_ENCODING, 1u64.to_le_bytes().to_vec()),
        ])
        .unwrap();
        drop(f);
        let (f, l) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        assert_eq!(loaded(l), BTreeMap::from([("a".to_string(), v)]));
        let read = f.db.begin_read().unwrap();
        let meta = read.open_table(META).unwrap();
        let version = |k| u64_of(meta.get(k).unwrap().unwrap().value());
        assert_eq!(version(K_FORMAT), Some(FORMAT_VERSION));
        assert_eq!(version(K_ENCODING), Some(ENCODING_VERSION));
        drop((meta, read, f));
        // format 2 with encoding 1 never existed
        let (f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        f.write_meta(&[(K_ENCODING, 1u64.to_le_bytes().to_vec())])
            .unwrap();
        drop(f);
        let err = DataFile::open(dir.path(), &expect("n1")).unwrap_err();
        assert!(
            matches!(err, DiskError::UnknownFormat { found: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn deltas_without_a_value_are_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        let d = record::encode_delta(&CrdtValue::empty_delta(CrdtKind::GCounter));
        f.transaction(&[], |t| {
            t.deltas
                .insert(("ghost", 0), d.as_slice())
                .map_err(|_| injected())?;
            Ok(())
        })
        .unwrap();
        drop(f);
        let err = DataFile::open(dir.path(), &expect("n1")).unwrap_err();
        assert!(
            matches!(&err, DiskError::Corrupt { reason, .. } if reason.contains("\"ghost\"")),
            "{err}"
        );
    }

    #[test]
    fn a_lone_nodes_file_is_adopted_by_a_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let mut lone = expect("n1");
        lone.cluster = ClusterId::Lone;
        drop(DataFile::open(dir.path(), &lone).unwrap());
        drop(DataFile::open(dir.path(), &expect("n1")).unwrap());
        let err = DataFile::open(dir.path(), &lone).unwrap_err();
        assert!(matches!(err, DiskError::OtherCluster { .. }), "{err}");
    }

    #[test]
    fn damaged_files_are_clear_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        let v = value();
        for i in 0..200 {
            f.commit(&batch(i, &[(&format!("key-{i}"), Some(&v))]))
                .unwrap();
        }
        drop(f);
        let path = dir.path().join(DATA_FILE);
        let full = std::fs::read(&path).unwrap();
        // an undecodable record
        {
            let (f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
            f.transaction(&[], |t| insert(t, "bad", &[9u8, 9])).unwrap();
        }
        let err = DataFile::open(dir.path(), &expect("n1")).unwrap_err();
        assert!(
            matches!(&err, DiskError::Corrupt { reason, .. } if reason.contains("\"bad\"")),
            "{err}"
        );
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("truncated", full[..full.len() / 3].to_vec()),
            ("garbage", vec![0x5a; full.len()]),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let err = DataFile::open(dir.path(), &expect("n1"))
                .map(|_| ())
                .expect_err(what);
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
            assert!(
                matches!(err, DiskError::Corrupt { .. } | DiskError::Failed { .. }),
                "{what}: {msg}"
            );
        }
    }

    /// A delta numbered at the end of the range (only a damaged or forged file has one) is a
    /// clear error at open, not an overflow.
    #[test]
    fn a_delta_number_out_of_range_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
            let Entry::Value(v) = value() else {
                unreachable!()
            };
            let state = record::encode(&Entry::Value(v.clone()), 0);
            let delta = record::encode_delta(&v);
            f.transaction(&[], |t| {
                insert(t, "k", &state)?;
                t.deltas
                    .insert(("k", u64::MAX), delta.as_slice())
                    .map_err(|_| injected())?;
                Ok(())
            })
            .unwrap();
        }
        let err = DataFile::open(dir.path(), &expect("n1"))
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(&err, DiskError::Corrupt { reason, .. } if reason.contains("out of range")),
            "{err}"
        );
    }

    #[test]
    fn a_held_file_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = DataFile::open(dir.path(), &expect("n1")).unwrap();
        let err = DataFile::open(dir.path(), &expect("n1")).unwrap_err();
        assert!(matches!(err, DiskError::Held { .. }), "{err}");
        let err = open_waiting(dir.path(), &expect("n1"), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, DiskError::Held { .. }), "{err}");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(f);
        });
        let (_f, l) = open_waiting(dir.path(), &expect("n1"), Duration::from_secs(20)).unwrap();
        assert_eq!(l.lives, 2);
        release.join().unwrap();
    }
}
