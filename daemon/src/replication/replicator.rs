//! `Replicator`: the replication state machine, sans IO.
//!
//! Inputs: local writes, frames from peers, membership, and `tick(now)`. Outputs ([`Output`]):
//! frames to send to named peers, completed writes, keys that changed. It owns the [`Store`];
//! it never reads a clock (time is passed in), opens a socket or spawns a task, so the
//! simulation tests drive many replicas in one thread. `docs/replication.md` describes the
//! algorithm, its invariants and its failure cases.
//!
//! In short (Almeida, Shoker, Baquero, "Delta State Replicated Data Types", algorithm 2, with
//! eager push to every peer):
//! - a local write joins its delta into the store and appends it to the delta buffer under a
//!   fresh sequence number;
//! - within `batch_window`, every up peer is sent the deltas it has not been sent, joined per
//!   key, as the interval `from..=to`; it joins them and acks the highest number up to which it
//!   holds every delta (a gap is not acked, so a lost frame is resent after `resend_after`);
//! - the buffer keeps what some up peer has not acked and is bounded in bytes; a peer that falls
//!   behind the bound, or was down while the buffer moved on, gets the full state of the
//!   affected keys instead;
//! - every `anti_entropy_interval` one random up peer is compared bucket by bucket, then key by
//!   key, and the states that differ are exchanged: this repairs anything lost, partitions and
//!   new members;
//! - MAJORITY / ALL writes complete when enough members (self included; every member that has
//!   not left counts, down ones too) acked the write's number, or fail after `write_timeout`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use latticed_crdt::{apply_user_delta, wire, CrdtError, CrdtValue, ReplicaId};
use latticed_membership::MemberState;
use latticed_proto::cloudstate::crdt::CrdtDelta;
use latticed_proto::latticed::peer as pb;
use prost::Message;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::frame::{self, Rejection};
use crate::store::{Entry, Store, StoreError, BUCKETS};

/// A peer, by node name.
pub type PeerId = String;

/// The text of a write that did not reach its consistency in time (CloudState's).
pub const CONSISTENCY_FAILURE: &str = "Failed to update CRDT at requested write consistency";

/// Replication timing and bounds.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// how long local deltas are gathered before they are sent
    pub batch_window: Duration,
    /// how long a sent, unacked interval waits before it is sent again
    pub resend_after: Duration,
    /// how often anti-entropy runs with one random peer
    pub anti_entropy_interval: Duration,
    /// bound of the delta buffer, bytes
    pub buffer_max_bytes: usize,
    /// how long a MAJORITY / ALL write waits for acks
    pub write_timeout: Duration,
    /// ship a key's full state for every write instead of the delta (for comparison only:
    /// `cluster-bench` measures what deltas save)
    pub full_state: bool,
    /// anti-entropy exchanges one key's full state with one peer at most this often, and half
    /// as often each time the key still differs, up to `full_state_backoff_max`: a key written
    /// continuously differs in every round while its deltas are in flight, and the delta path
    /// is what carries it
    pub full_state_backoff: Duration,
    /// upper bound of the backoff above
    pub full_state_backoff_max: Duration,
    /// how long a tombstone is kept after this node learned of it (`None`: forever). A peer
    /// that still holds the value after that may bring it back.
    pub tombstone_ttl: Option<Duration>,
    /// a key changed this recently is *hot*: its differences are most likely deltas in flight,
    /// so anti-entropy leaves it to the delta path, unless it has differed from the same peer
    /// for `full_state_backoff_max`
    pub hot_key_quiet: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            batch_window: Duration::from_millis(2),
            resend_after: Duration::from_secs(1),
            anti_entropy_interval: Duration::from_millis(300),
            buffer_max_bytes: 16 << 20,
            write_timeout: Duration::from_secs(5),
            full_state: false,
            full_state_backoff: Duration::from_secs(5),
            full_state_backoff_max: Duration::from_secs(60),
            hot_key_quiet: Duration::from_secs(1),
            tombstone_ttl: None,
        }
    }
}

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

/// A member as membership reports it.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// node name
    pub name: PeerId,
    /// its state
    pub state: MemberState,
    /// its incarnation (a new one means it restarted, empty)
    pub incarnation: u64,
}

/// Counters for metrics.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// entries sent in delta batches
    pub deltas_sent: u64,
    /// entries received in delta batches
    pub deltas_received: u64,
    /// frame bytes sent
    pub bytes_sent: u64,
    /// frame bytes received
    pub bytes_received: u64,
    /// full states sent (lagging peers and anti-entropy)
    pub full_syncs: u64,
    /// anti-entropy rounds started
    pub anti_entropy_rounds: u64,
    /// MAJORITY / ALL writes that timed out
    pub consistency_failures: u64,
    /// frames or entries dropped, by reason
    pub rejected: BTreeMap<&'static str, u64>,
}

/// What to do after an input.
#[derive(Debug, Default)]
pub struct Output {
    /// frame bodies to send to peers
    pub frames: Vec<(PeerId, Vec<u8>)>,
    /// writes that completed
    pub completed: Vec<(WriteId, Result<(), WriteError>)>,
    /// keys whose value changed
    pub changed: Vec<String>,
    /// time from a write to a peer's ack, one sample per ack that acknowledged something new
    pub ack_latencies: Vec<Duration>,
}

struct Peer {
    incarnation: u64,
    up: bool,
    acked: u64,
    sent_upto: u64,
    last_send: Option<Instant>,
    /// since when something sent has been waiting for an ack
    unacked_since: Option<Instant>,
    /// keys to send in full (deltas for them were dropped before this peer acked them)
    dirty: BTreeSet<String>,
}

struct Buffered {
    seq: u64,
    key: String,
    entry: Entry,
    bytes: usize,
    at: Instant,
}

struct Pending {
    id: WriteId,
    seq: u64,
    needed: usize,
    acked_by: BTreeSet<PeerId>,
    deadline: Instant,
}

struct Round {
    id: u64,
    peer: PeerId,
    started: Instant,
}

/// The replication state machine of one node.
pub struct Replicator {
    replica: ReplicaId,
    store: Store,
    config: ReplicationConfig,
    seq: u64,
    buffer: VecDeque<Buffered>,
    buffer_bytes: usize,
    peers: BTreeMap<PeerId, Peer>,
    /// per sender replica: every delta up to this number is here
    received: HashMap<ReplicaId, u64>,
    pending: Vec<Pending>,
    next_write: u64,
    unflushed_since: Option<Instant>,
    next_anti_entropy: Option<Instant>,
    round: Option<Round>,
    next_round: u64,
    /// (peer, key) -> when anti-entropy last exchanged the key's full state with the peer, and
    /// the wait before the next exchange
    exchanged: HashMap<(PeerId, String), (Instant, Duration)>,
    /// (peer, key) -> since when the key has differed from the peer's
    differing_since: HashMap<(PeerId, String), Instant>,
    /// key -> when it last changed here
    last_change: HashMap<String, Instant>,
    /// deleted key -> when this node learned of the deletion (only with a tombstone lifetime)
    tombstones: BTreeMap<String, Instant>,
    synced: bool,
    rng: StdRng,
    stats: Stats,
    out: Output,
}

fn join_entry(acc: &mut BTreeMap<String, Entry>, key: &str, e: &Entry) {
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

fn entry_bytes(key: &str, e: &Entry) -> usize {
    key.len()
        + match e {
            Entry::Value(v) => wire::to_proto(v).encoded_len(),
            Entry::Deleted => 2,
        }
}

impl Replicator {
    /// A replicator for replica `replica`; `seed` makes its random choices reproducible.
    pub fn new(replica: ReplicaId, config: ReplicationConfig, seed: u64) -> Self {
        Replicator {
            replica,
            store: Store::new(seed ^ replica),
            config,
            seq: 0,
            buffer: VecDeque::new(),
            buffer_bytes: 0,
            peers: BTreeMap::new(),
            received: HashMap::new(),
            pending: Vec::new(),
            next_write: 0,
            unflushed_since: None,
            next_anti_entropy: None,
            round: None,
            next_round: 0,
            exchanged: HashMap::new(),
            differing_since: HashMap::new(),
            last_change: HashMap::new(),
            tombstones: BTreeMap::new(),
            synced: false,
            rng: StdRng::seed_from_u64(seed),
            stats: Stats::default(),
            out: Output::default(),
        }
    }

    /// This replica's id.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// The store (read only).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bytes held by the delta buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// Whether a first complete anti-entropy round with a peer has finished (or there are no
    /// peers to sync with).
    pub fn is_synced(&self) -> bool {
        self.synced || self.peers.is_empty()
    }

    /// Whether a first complete anti-entropy round with a peer has finished.
    pub fn has_synced(&self) -> bool {
        self.synced
    }

    /// Whether every delta this node produced has been acked by every up peer.
    pub fn is_quiet(&self) -> bool {
        self.peers
            .values()
            .filter(|p| p.up)
            .all(|p| p.acked >= self.seq && p.dirty.is_empty())
    }

    /// Takes what accumulated since the last call.
    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }

    /// Membership changed: `members` is every member this node knows (itself excluded).
    pub fn set_members(&mut self, members: &[PeerInfo]) {
        let mut seen = BTreeSet::new();
        for m in members {
            seen.insert(m.name.clone());
            let up = matches!(m.state, MemberState::Up | MemberState::Suspect);
            if m.state == MemberState::Left {
                self.peers.remove(&m.name);
                continue;
            }
            let seq = self.seq;
            let peer = self.peers.entry(m.name.clone()).or_insert_with(|| Peer {
                incarnation: m.incarnation,
                up,
                acked: seq,
                sent_upto: seq,
                last_send: None,
                unacked_since: None,
                dirty: BTreeSet::new(),
            });
            if peer.incarnation != m.incarnation {
                // restarted empty: anti-entropy brings it everything; start from now
                peer.incarnation = m.incarnation;
                peer.acked = seq;
                peer.sent_upto = seq;
                peer.unacked_since = None;
                peer.dirty.clear();
            }
            if up && !peer.up {
                // back from down: resend what it has not acked (and the dirty keys)
                peer.sent_upto = peer.acked;
            }
            peer.up = up;
        }
        self.peers.retain(|name, _| seen.contains(name));
        self.gc();
    }

    /// Applies a user function's delta to `key` as an operation of this replica, with
    /// `now_ms` for LWW clocks. Returns the write's id (its completion arrives in
    /// [`Output::completed`]) and the delta it produced (`None`: nothing changed).
    pub fn write(
        &mut self,
        now: Instant,
        now_ms: i64,
        key: &str,
        delta: &CrdtDelta,
        consistency: Consistency,
    ) -> Result<(WriteId, Option<CrdtValue>), WriteError> {
        if matches!(self.store.get(key), Some(Entry::Deleted)) {
            return Err(WriteError::Deleted);
        }
        let replica = self.replica;
        let d = self
            .store
            .update(key, |v| apply_user_delta(v, delta, replica, now_ms))?;
        let id = match &d {
            Some(d) => {
                self.out.changed.push(key.to_string());
                self.last_change.insert(key.to_string(), now);
                let shipped = match (self.config.full_state, self.store.get(key)) {
                    (true, Some(full)) => full.clone(),
                    _ => Entry::Value(d.clone()),
                };
                self.enqueue(now, key, shipped);
                self.register(now, consistency)
            }
            None => self.register(now, Consistency::Local),
        };
        Ok((id, d))
    }

    /// Deletes `key` for good (a tombstone that replicates).
    pub fn delete(&mut self, now: Instant, key: &str, consistency: Consistency) -> WriteId {
        if matches!(self.store.get(key), Some(Entry::Deleted)) {
            return self.register(now, Consistency::Local);
        }
        if let Ok(true) = self.store.join(key, &Entry::Deleted) {
            self.out.changed.push(key.to_string());
            self.last_change.insert(key.to_string(), now);
            if self.config.tombstone_ttl.is_some() {
                self.tombstones.insert(key.to_string(), now);
            }
        }
        self.enqueue(now, key, Entry::Deleted);
        self.register(now, consistency)
    }

    fn enqueue(&mut self, now: Instant, key: &str, entry: Entry) {
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
    }

    fn drop_front(&mut self) {
        let Some(b) = self.buffer.pop_front() else {
            return;
        };
        self.buffer_bytes -= b.bytes;
        for p in self.peers.values_mut() {
            if p.acked < b.seq {
                p.dirty.insert(b.key.clone());
            }
        }
    }

    fn register(&mut self, now: Instant, consistency: Consistency) -> WriteId {
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

    /// Drops buffered deltas every up peer acked; down peers get the keys as dirty.
    fn gc(&mut self) {
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

    /// Time passes: flush batches, resend, expire writes, run anti-entropy.
    pub fn tick(&mut self, now: Instant) {
        let flush = self
            .unflushed_since
            .is_some_and(|t| now >= t + self.config.batch_window);
        let names: Vec<PeerId> = self.peers.keys().cloned().collect();
        for name in names {
            let due = {
                let Some(p) = self.peers.get_mut(&name) else {
                    continue;
                };
                if !p.up {
                    continue;
                }
                if p.unacked_since
                    .is_some_and(|t| now >= t + self.config.resend_after)
                {
                    // the oldest unacked interval waited too long: send again from the ack
                    p.sent_upto = p.acked;
                    p.unacked_since = None;
                }
                (p.sent_upto < self.seq
                    && (flush
                        || p.last_send
                            .is_none_or(|t| now >= t + self.config.resend_after)))
                    || !p.dirty.is_empty()
            };
            if due {
                self.send_batch(now, &name);
            }
        }
        if flush {
            self.unflushed_since = None;
        }
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
        self.anti_entropy(now);
        if let Some(ttl) = self.config.tombstone_ttl {
            let expired: Vec<String> = self
                .tombstones
                .iter()
                .filter(|(_, at)| now >= **at + ttl)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                self.tombstones.remove(&k);
                self.store.forget(&k);
            }
        }
    }

    fn send_batch(&mut self, now: Instant, name: &str) {
        let Some(p) = self.peers.get(name) else {
            return;
        };
        let from = p.sent_upto + 1;
        let start = self.buffer.partition_point(|b| b.seq < from);
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for b in self.buffer.range(start..) {
            join_entry(&mut entries, &b.key, &b.entry);
        }
        let dirty: Vec<String> = p.dirty.iter().cloned().collect();
        for key in &dirty {
            if let Some(e) = self.store.get(key) {
                entries.insert(key.clone(), e.clone());
            }
        }
        self.stats.full_syncs += dirty.len() as u64;
        self.stats.deltas_sent += entries.len() as u64;
        let frame = frame::frame(pb::frame::Kind::Deltas(pb::Deltas {
            sender: self.replica,
            from,
            to: self.seq,
            entries: entries
                .iter()
                .map(|(k, e)| frame::entry_to_proto(k, e))
                .collect(),
        }));
        self.send(name, &frame);
        if let Some(p) = self.peers.get_mut(name) {
            p.sent_upto = self.seq;
            p.last_send = Some(now);
            if p.acked < p.sent_upto {
                p.unacked_since.get_or_insert(now);
            }
            p.dirty.clear();
        }
    }

    fn send(&mut self, to: &str, f: &pb::Frame) {
        let bytes = frame::encode(f);
        self.stats.bytes_sent += bytes.len() as u64;
        self.out.frames.push((to.to_string(), bytes));
    }

    fn reject(&mut self, r: Rejection) -> Rejection {
        *self.stats.rejected.entry(r.label()).or_default() += 1;
        r
    }

    fn anti_entropy(&mut self, now: Instant) {
        let due = *self
            .next_anti_entropy
            .get_or_insert(now + self.config.anti_entropy_interval);
        if now < due {
            return;
        }
        self.next_anti_entropy = Some(now + self.config.anti_entropy_interval);
        if let Some(r) = &self.round {
            if now < r.started + self.config.anti_entropy_interval * 10 {
                return;
            }
            self.round = None;
        }
        let up: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up)
            .map(|(n, _)| n.clone())
            .collect();
        if up.is_empty() {
            return;
        }
        let peer = up[self.rng.random_range(0..up.len())].clone();
        self.next_round += 1;
        self.round = Some(Round {
            id: self.next_round,
            peer: peer.clone(),
            started: now,
        });
        self.stats.anti_entropy_rounds += 1;
        let f = frame::frame(pb::frame::Kind::DigestRequest(pb::DigestRequest {
            round: self.next_round,
            buckets: {
                let (last, quiet) = (&self.last_change, self.config.hot_key_quiet);
                self.store
                    .buckets(&|k| last.get(k).is_some_and(|at| now < *at + quiet))
            },
        }));
        self.send(&peer, &f);
    }

    /// Handles a frame body (length prefix removed) from peer `from`.
    pub fn handle_frame(&mut self, now: Instant, from: &str, body: &[u8]) -> Result<(), Rejection> {
        self.stats.bytes_received += body.len() as u64;
        let f = match frame::decode(body) {
            Ok(f) => f,
            Err(r) => return Err(self.reject(r)),
        };
        match f.kind {
            Some(pb::frame::Kind::Deltas(d)) => self.on_deltas(now, from, d),
            Some(pb::frame::Kind::Ack(a)) => self.on_ack(now, from, a),
            Some(pb::frame::Kind::DigestRequest(r)) => self.on_digest_request(now, from, r),
            Some(pb::frame::Kind::DigestReply(r)) => self.on_digest_reply(now, from, r),
            Some(pb::frame::Kind::States(s)) => self.on_states(now, from, s),
            Some(pb::frame::Kind::Hello(_)) => Ok(()),
            None => Err(self.reject(Rejection::Malformed)),
        }
    }

    fn join_entries(&mut self, now: Instant, entries: &[pb::Entry]) -> Result<(), Rejection> {
        let mut first_err = None;
        for e in entries {
            let result = frame::entry_from_proto(e).and_then(|(key, entry)| {
                match self.store.join(&key, &entry) {
                    Ok(true) => {
                        self.last_change.insert(key.clone(), now);
                        if self.config.tombstone_ttl.is_some() && entry == Entry::Deleted {
                            self.tombstones.insert(key.clone(), now);
                        }
                        self.out.changed.push(key);
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(StoreError::TypeMismatch { .. }) => Err(Rejection::TypeMismatch),
                }
            });
            if let Err(r) = result {
                self.reject(r);
                first_err.get_or_insert(r);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn on_deltas(&mut self, now: Instant, from: &str, d: pb::Deltas) -> Result<(), Rejection> {
        self.stats.deltas_received += d.entries.len() as u64;
        let joined = self.join_entries(now, &d.entries);
        if d.from == 0 || d.to < d.from {
            return Err(self.reject(Rejection::Malformed));
        }
        let held = self.received.entry(d.sender).or_insert(d.from - 1);
        if d.from <= *held + 1 {
            *held = (*held).max(d.to);
        }
        let upto = *held;
        let f = frame::frame(pb::frame::Kind::Ack(pb::Ack {
            sender: d.sender,
            upto,
        }));
        self.send(from, &f);
        joined
    }

    fn on_ack(&mut self, now: Instant, from: &str, a: pb::Ack) -> Result<(), Rejection> {
        if a.sender != self.replica {
            return Ok(());
        }
        let Some(p) = self.peers.get_mut(from) else {
            return Ok(());
        };
        if a.upto <= p.acked {
            return Ok(());
        }
        let upto = a.upto.min(self.seq);
        p.acked = upto;
        p.sent_upto = p.sent_upto.max(upto);
        // what is still unacked was sent after this ack's interval: restart its clock
        p.unacked_since = (p.acked < p.sent_upto).then_some(now);
        if let Some(b) = self.buffer.iter().rev().find(|b| b.seq <= upto) {
            self.out
                .ack_latencies
                .push(now.saturating_duration_since(b.at));
        }
        let mut i = 0;
        while i < self.pending.len() {
            let w = &mut self.pending[i];
            if w.seq <= upto {
                w.acked_by.insert(from.to_string());
                if 1 + w.acked_by.len() >= w.needed {
                    let done = self.pending.swap_remove(i);
                    self.out.completed.push((done.id, Ok(())));
                    continue;
                }
            }
            i += 1;
        }
        self.gc();
        Ok(())
    }

    fn on_digest_request(
        &mut self,
        now: Instant,
        from: &str,
        r: pb::DigestRequest,
    ) -> Result<(), Rejection> {
        if r.buckets.len() != BUCKETS {
            return Err(self.reject(Rejection::Malformed));
        }
        let (last, quiet) = (&self.last_change, self.config.hot_key_quiet);
        let hot = |k: &str| last.get(k).is_some_and(|at| now < *at + quiet);
        let mine = self.store.buckets(&hot);
        let differing: Vec<u32> = (0..BUCKETS)
            .filter(|b| mine[*b] != r.buckets[*b])
            .map(|b| b as u32)
            .collect();
        let names: Vec<String> = differing
            .iter()
            .flat_map(|b| self.store.bucket_keys(*b as usize))
            .cloned()
            .collect();
        let keys = names
            .into_iter()
            .map(|k| pb::KeyDigest {
                digest: self.store.digest(&k, &hot),
                key: k,
            })
            .collect();
        let f = frame::frame(pb::frame::Kind::DigestReply(pb::DigestReply {
            round: r.round,
            buckets: differing,
            keys,
        }));
        self.send(from, &f);
        Ok(())
    }

    /// Whether anti-entropy may exchange `key`'s full state with `peer` now (and notes it).
    fn may_exchange(&mut self, now: Instant, peer: &str, key: &str) -> bool {
        let slot = (peer.to_string(), key.to_string());
        let wait = match self.exchanged.get(&slot) {
            Some((at, wait)) if now < *at + *wait => return false,
            Some((_, wait)) => (*wait * 2).min(self.config.full_state_backoff_max),
            None => self.config.full_state_backoff,
        };
        self.exchanged.insert(slot, (now, wait));
        true
    }

    fn on_digest_reply(
        &mut self,
        now: Instant,
        from: &str,
        r: pb::DigestReply,
    ) -> Result<(), Rejection> {
        if self
            .round
            .as_ref()
            .is_none_or(|x| x.id != r.round || x.peer != from)
        {
            return Ok(());
        }
        if self.exchanged.len() > 100_000 {
            self.exchanged.retain(|_, (at, wait)| now < *at + *wait);
        }
        if self.differing_since.len() > 100_000 {
            self.differing_since.clear();
        }
        if self.last_change.len() > 100_000 {
            let quiet = self.config.hot_key_quiet;
            self.last_change.retain(|_, at| now < *at + quiet);
        }
        let theirs: BTreeMap<&str, u64> =
            r.keys.iter().map(|k| (k.key.as_str(), k.digest)).collect();
        let mut entries = Vec::new();
        let mut want = Vec::new();
        for b in &r.buckets {
            let b = *b as usize;
            if b >= BUCKETS {
                return Err(self.reject(Rejection::Malformed));
            }
            let names: Vec<String> = self.store.bucket_keys(b).cloned().collect();
            for k in names {
                let slot = (from.to_string(), k.clone());
                let Some(their_digest) = theirs.get(k.as_str()) else {
                    // the peer lacks the key altogether
                    if let Some(e) = self.store.get(&k) {
                        entries.push(frame::entry_to_proto(&k, e));
                    }
                    continue;
                };
                let (last, quiet) = (&self.last_change, self.config.hot_key_quiet);
                let hot_now = |k: &str| last.get(k).is_some_and(|at| now < *at + quiet);
                if *their_digest == self.store.digest(&k, &hot_now) {
                    // agreed: the next difference starts afresh
                    self.exchanged.remove(&slot);
                    self.differing_since.remove(&slot);
                    continue;
                }
                let since = *self.differing_since.entry(slot).or_insert(now);
                let hot = self
                    .last_change
                    .get(&k)
                    .is_some_and(|at| now < *at + self.config.hot_key_quiet);
                let overdue = now >= since + self.config.full_state_backoff_max;
                if (!hot || overdue) && self.may_exchange(now, from, &k) {
                    if let Some(e) = self.store.get(&k) {
                        entries.push(frame::entry_to_proto(&k, e));
                    }
                    want.push(k);
                }
            }
        }
        for k in theirs.keys() {
            if self.store.get(k).is_none() {
                want.push((*k).to_string());
            }
        }
        self.stats.full_syncs += entries.len() as u64;
        let done = want.is_empty();
        let f = frame::frame(pb::frame::Kind::States(pb::States {
            round: r.round,
            entries,
            want,
            last: done,
        }));
        self.send(from, &f);
        if done {
            self.round = None;
            self.synced = true;
        }
        Ok(())
    }

    fn on_states(&mut self, now: Instant, from: &str, s: pb::States) -> Result<(), Rejection> {
        let joined = self.join_entries(now, &s.entries);
        if !s.want.is_empty() {
            let entries: Vec<pb::Entry> = s
                .want
                .iter()
                .filter_map(|k| self.store.get(k).map(|e| frame::entry_to_proto(k, e)))
                .collect();
            self.stats.full_syncs += entries.len() as u64;
            let f = frame::frame(pb::frame::Kind::States(pb::States {
                round: s.round,
                entries,
                want: Vec::new(),
                last: true,
            }));
            self.send(from, &f);
        }
        if s.last
            && self
                .round
                .as_ref()
                .is_some_and(|r| r.id == s.round && r.peer == from)
        {
            self.round = None;
            self.synced = true;
        }
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, GCounterDelta};

    fn inc() -> CrdtDelta {
        CrdtDelta {
            delta: Some(Delta::Gcounter(GCounterDelta { increment: 1 })),
        }
    }

    #[test]
    fn a_tombstone_is_forgotten_after_its_lifetime_when_one_is_set() {
        let config = ReplicationConfig {
            tombstone_ttl: Some(Duration::from_secs(10)),
            ..ReplicationConfig::default()
        };
        let mut r = Replicator::new(1, config, 1);
        let t0 = Instant::now();
        r.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
        r.delete(t0, "k", Consistency::Local);
        assert_eq!(
            r.write(t0, 0, "k", &inc(), Consistency::Local).unwrap_err(),
            WriteError::Deleted
        );
        r.tick(t0 + Duration::from_secs(5));
        assert_eq!(r.store().get("k"), Some(&Entry::Deleted));
        r.tick(t0 + Duration::from_secs(11));
        assert_eq!(r.store().get("k"), None);
        assert!(r.write(t0, 0, "k", &inc(), Consistency::Local).is_ok());
    }

    #[test]
    fn without_a_lifetime_tombstones_stay() {
        let mut r = Replicator::new(1, ReplicationConfig::default(), 1);
        let t0 = Instant::now();
        r.delete(t0, "k", Consistency::Local);
        r.tick(t0 + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(r.store().get("k"), Some(&Entry::Deleted));
    }

    #[test]
    fn garbage_frames_are_rejected_and_counted() {
        let mut r = Replicator::new(1, ReplicationConfig::default(), 1);
        let now = Instant::now();
        assert_eq!(
            r.handle_frame(now, "p", &[0xff, 0x01, 0x02]),
            Err(Rejection::Malformed)
        );
        let bad_value = frame::encode(&frame::frame(pb::frame::Kind::Deltas(pb::Deltas {
            sender: 9,
            from: 1,
            to: 1,
            entries: vec![pb::Entry {
                key: "k".into(),
                value: Some(pb::entry::Value::Crdt(
                    latticed_proto::latticed::crdt::Value::default(),
                )),
            }],
        })));
        assert_eq!(
            r.handle_frame(now, "p", &bad_value),
            Err(Rejection::BadValue)
        );
        assert_eq!(r.store().len(), 0);
        assert_eq!(r.stats().rejected.get("malformed"), Some(&1));
        assert_eq!(r.stats().rejected.get("bad_value"), Some(&1));
    }
}
