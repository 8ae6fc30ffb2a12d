//! `Replicator`: the replication state machine, sans IO; this file composes it.
//!
//! Inputs: local writes, frames from peers, membership, and `tick(now)`. Outputs ([`Output`]):
//! frames to send to named peers, completed writes, keys that changed. It owns the [`Store`];
//! it never reads a clock (time is passed in), opens a socket or spawns a task, so the
//! simulation tests drive many replicas in one thread. `docs/replication.md` describes the
//! algorithm, its invariants and its failure cases.
//!
//! This file owns the state machine's inputs and outputs, its configuration, membership and the
//! dispatch of frames. Each concept has a file of its own, whose `impl Replicator` block works
//! on the fields declared here:
//! - [`super::delta_buffer`]: this node's deltas until every up peer acked them;
//! - [`super::acks`]: intervals pushed to peers and acks, scoped by epochs;
//! - [`super::consistency`]: MAJORITY / ALL writes waiting for acks;
//! - [`super::anti_entropy`]: digest comparison and repair.
//!
//! In short (Almeida, Shoker, Baquero, "Delta State Replicated Data Types", algorithm 2, with
//! eager push to every peer):
//! - a local write joins its delta into the store and appends it to the delta buffer under a
//!   fresh sequence number;
//! - at once to a peer with nothing in flight, else within `batch_window` or when the ack of
//!   the interval in flight comes back, every up peer is sent the deltas it has not been sent,
//!   joined per key, as the interval `from..=to` of this life (epoch); it joins them and acks
//!   the highest number up to which it holds every delta (a gap is not acked, so a lost frame is
//!   resent after `resend_after`);
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

use latticed_crdt::{apply_user_delta, CrdtValue, Footprint, ReplicaId};
use latticed_membership::MemberState;
use latticed_proto::cloudstate::crdt::CrdtDelta;
use latticed_proto::latticed::peer as pb;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::acks::{Link, Peer};
use super::anti_entropy::Round;
use super::consistency::Pending;
pub use super::consistency::{Consistency, WriteError, WriteId, CONSISTENCY_FAILURE};
use super::delta_buffer::Buffered;
use super::frame::{self, Rejection};
use crate::store::record::Record;
use crate::store::{Entry, Store, StoreError};

/// A peer, by node name.
pub type PeerId = String;

/// How often a node with nothing to send within the batch window ticks
/// ([`Replicator::wants_batch_tick`]): well under `resend_after`, the anti-entropy interval and
/// the write timeout, whose deadlines the tick checks.
pub const IDLE_TICK: Duration = Duration::from_millis(50);

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
    /// this node's acks leave only once what they acknowledge is committed (a data file): it
    /// also sends received-only acks at once, so its peers' deltas keep flowing meanwhile
    pub acks_wait_for_commit: bool,
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
            acks_wait_for_commit: false,
        }
    }
}

/// A member as membership reports it.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// node name
    pub name: PeerId,
    /// its state
    pub state: MemberState,
    /// its SWIM incarnation (informative: a paused member comes back with a new incarnation
    /// but the same life; what names a life is the epoch in its hello)
    pub incarnation: u64,
}

/// Who this replicator is: what its hello says.
#[derive(Clone, Debug)]
pub struct Identity {
    /// node name (the name in its certificate)
    pub name: PeerId,
    /// replica id: the actor of this node's CRDT operations
    pub replica: ReplicaId,
    /// this life of the process: random per start, it scopes sequence numbers and acks
    pub epoch: u64,
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
    /// frame bodies to send to peers; with a data file they may leave before the changes they
    /// carry are committed (a node takes a fresh replica id after an unclean stop, so it never
    /// issues again what it may have sent and not kept)
    pub frames: Vec<(PeerId, Vec<u8>)>,
    /// acks to send to peers: an ack says "I hold it" (MAJORITY / ALL count it), so with a data
    /// file it leaves only once what it acknowledges is committed
    pub acks: Vec<(PeerId, Vec<u8>)>,
    /// writes that completed
    pub completed: Vec<(WriteId, Result<(), WriteError>)>,
    /// keys whose value changed, each with the part of the value the change can have touched
    pub changed: Vec<(String, Footprint)>,
    /// time from a write to a peer's ack, one sample per ack that acknowledged something new
    pub ack_latencies: Vec<Duration>,
    /// keys forgotten (tombstones past their lifetime): gone from the store
    pub forgotten: Vec<String>,
}

impl Output {
    /// Every frame to send, acks last, taken out (for callers that commit nothing first).
    pub fn all_frames(&mut self) -> Vec<(PeerId, Vec<u8>)> {
        let mut all = std::mem::take(&mut self.frames);
        all.append(&mut self.acks);
        all
    }
}

/// The replication state machine of one node.
pub struct Replicator {
    pub(super) name: PeerId,
    pub(super) replica: ReplicaId,
    pub(super) epoch: u64,
    pub(super) store: Store,
    pub(super) config: ReplicationConfig,
    pub(super) seq: u64,
    pub(super) buffer: VecDeque<Buffered>,
    pub(super) buffer_bytes: usize,
    pub(super) peers: BTreeMap<PeerId, Peer>,
    /// per peer name: its current life (from its hello) and what this node holds of it
    pub(super) links: HashMap<PeerId, Link>,
    /// the names membership reported last time
    pub(super) members: BTreeSet<PeerId>,
    pub(super) pending: Vec<Pending>,
    pub(super) next_write: u64,
    pub(super) unflushed_since: Option<Instant>,
    /// send pending deltas at the next tick whatever the batch window
    pub(super) flush_now: bool,
    pub(super) next_anti_entropy: Option<Instant>,
    pub(super) round: Option<Round>,
    pub(super) next_round: u64,
    /// (peer, key) -> when anti-entropy last exchanged the key's full state with the peer, and
    /// the wait before the next exchange
    pub(super) exchanged: HashMap<(PeerId, String), (Instant, Duration)>,
    /// (peer, key) -> since when the key has differed from the peer's
    pub(super) differing_since: HashMap<(PeerId, String), Instant>,
    /// key -> when it last changed here
    pub(super) last_change: HashMap<String, Instant>,
    /// deleted key -> when this node learned of the deletion (only with a tombstone lifetime)
    pub(super) tombstones: BTreeMap<String, Instant>,
    pub(super) synced: bool,
    pub(super) rng: StdRng,
    pub(super) stats: Stats,
    pub(super) out: Output,
}

impl Replicator {
    /// A replicator for `identity`; `seed` makes its random choices reproducible (give each
    /// node its own: the stand-in digests of hot keys come from it, and must differ between
    /// nodes).
    pub fn new(identity: Identity, config: ReplicationConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Replicator {
            name: identity.name,
            replica: identity.replica,
            epoch: identity.epoch,
            store: Store::new(rng.random()),
            config,
            seq: 0,
            buffer: VecDeque::new(),
            buffer_bytes: 0,
            peers: BTreeMap::new(),
            links: HashMap::new(),
            members: BTreeSet::new(),
            pending: Vec::new(),
            next_write: 0,
            unflushed_since: None,
            flush_now: false,
            next_anti_entropy: None,
            round: None,
            next_round: 0,
            exchanged: HashMap::new(),
            differing_since: HashMap::new(),
            last_change: HashMap::new(),
            tombstones: BTreeMap::new(),
            synced: false,
            rng,
            stats: Stats::default(),
            out: Output::default(),
        }
    }

    /// Puts back what the data file held, before any other input: no output, no change notice
    /// (nothing changed). With a tombstone lifetime, a tombstone keeps the age its record says
    /// (`now_ms`: the wall clock now), and one already past it is forgotten (reported in
    /// [`Output::forgotten`], so that the file forgets it too).
    pub fn restore(&mut self, now: Instant, now_ms: i64, records: Vec<(String, Record)>) {
        for (key, record) in records {
            if let (Some(ttl), Record::Tombstone { deleted_at_ms }) =
                (self.config.tombstone_ttl, &record)
            {
                let age =
                    Duration::from_millis(now_ms.saturating_sub(*deleted_at_ms).max(0) as u64);
                if age >= ttl {
                    self.out.forgotten.push(key);
                    continue;
                }
                self.tombstones
                    .insert(key.clone(), now.checked_sub(age).unwrap_or(now));
            }
            self.store.load(key, record.into_entry());
        }
    }

    /// This replica's id.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// This life's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The hello that opens every stream this node writes (and greets peers).
    pub fn hello(&self) -> Vec<u8> {
        frame::hello(self.replica, self.epoch, &self.name)
    }

    /// The replica id of a peer's current life, from its hello.
    pub fn peer_replica(&self, name: &str) -> Option<ReplicaId> {
        self.links.get(name).map(|l| l.replica)
    }

    /// The store (read only).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What changed under `key` since it was last taken, for the data file
    /// ([`Store::take_change`]).
    pub fn take_change(&mut self, key: &str) -> crate::store::Change {
        self.store.take_change(key)
    }

    /// The key's whole entry for the data file ([`Store::take_whole`]).
    pub fn take_whole(&mut self, key: &str) -> crate::store::Change {
        self.store.take_whole(key)
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
            .all(|p| p.acked >= self.seq && p.dirty.is_empty() && p.dirty_sent.is_empty())
    }

    /// Takes what accumulated since the last call.
    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }

    /// Membership changed: `members` is every member this node knows (itself excluded).
    ///
    /// A member's SWIM incarnation does not matter here: a member that was paused past the
    /// suspect timeout comes back with a new incarnation but the same life, and picks up where
    /// it was; a new life announces itself with a new epoch in its hello.
    pub fn set_members(&mut self, members: &[PeerInfo]) {
        let mut seen = BTreeSet::new();
        let mut greet = Vec::new();
        for m in members {
            seen.insert(m.name.clone());
            if m.state == MemberState::Left {
                self.peers.remove(&m.name);
                continue;
            }
            let up = matches!(m.state, MemberState::Up | MemberState::Suspect);
            let (seq, epoch) = (self.seq, self.links.get(&m.name).map(|l| l.epoch));
            let peer = self
                .peers
                .entry(m.name.clone())
                .or_insert_with(|| Peer::new(seq, epoch));
            if up && !peer.up {
                // (back) up: resend what it has not acked (and the dirty keys), and greet it
                peer.resend_from_ack();
                greet.push(m.name.clone());
            }
            peer.up = up;
        }
        self.peers.retain(|name, _| seen.contains(name));
        // forget the lives of members membership forgot (a name never reported yet is a peer
        // whose hello beat SWIM: keep it)
        let gone = std::mem::replace(&mut self.members, seen);
        self.links
            .retain(|name, _| self.members.contains(name) || !gone.contains(name));
        self.exchanged
            .retain(|(name, _), _| self.members.contains(name));
        self.differing_since
            .retain(|(name, _), _| self.members.contains(name));
        for name in greet {
            let hello = self.hello();
            self.send_bytes(&name, hello);
        }
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
                self.out.changed.push((key.to_string(), Footprint::of(d)));
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
            self.out.changed.push((key.to_string(), Footprint::All));
            self.last_change.insert(key.to_string(), now);
            if self.config.tombstone_ttl.is_some() {
                self.tombstones.insert(key.to_string(), now);
            }
        }
        self.enqueue(now, key, Entry::Deleted);
        self.register(now, consistency)
    }

    /// Sends every pending delta now, without waiting for the batch window (before a leave).
    pub fn flush(&mut self, now: Instant) {
        self.flush_now = true;
        self.tick(now);
    }

    /// Whether the next [`Replicator::tick`] has something to send within the batch window:
    /// deltas gathered while an interval was in flight, a flush asked for, or keys owed to a
    /// peer. Otherwise ticks only resend, expire writes and run anti-entropy, whose deadlines
    /// are coarser ([`IDLE_TICK`] is enough for them), so a quiet node need not wake every
    /// batch window.
    pub fn wants_batch_tick(&self) -> bool {
        self.flush_now
            || self.unflushed_since.is_some()
            || self.peers.values().any(|p| p.up && !p.dirty.is_empty())
    }

    /// Time passes: flush batches, resend, expire writes, run anti-entropy.
    pub fn tick(&mut self, now: Instant) {
        let flush = std::mem::take(&mut self.flush_now)
            || self
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
                if p.epoch.is_none() {
                    // nothing is sent before its hello names its life; greet it again in case
                    // ours was lost
                    if p.last_hello
                        .is_none_or(|t| now >= t + self.config.resend_after)
                    {
                        p.last_hello = Some(now);
                        let hello = self.hello();
                        self.send_bytes(&name, hello);
                    }
                    continue;
                }
                if p.unacked_since
                    .is_some_and(|t| now >= t + self.config.resend_after)
                {
                    // the oldest unacked interval waited too long: send again from the ack
                    p.resend_from_ack();
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
        self.expire_writes(now);
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
                self.out.forgotten.push(k);
            }
        }
    }

    pub(super) fn send(&mut self, to: &str, f: &pb::Frame) {
        self.send_bytes(to, frame::encode(f));
    }

    pub(super) fn send_bytes(&mut self, to: &str, bytes: Vec<u8>) {
        self.stats.bytes_sent += bytes.len() as u64;
        self.out.frames.push((to.to_string(), bytes));
    }

    pub(super) fn reject(&mut self, r: Rejection) -> Rejection {
        *self.stats.rejected.entry(r.label()).or_default() += 1;
        r
    }

    /// Handles a frame body (length prefix removed) from peer `from`.
    pub fn handle_frame(&mut self, now: Instant, from: &str, body: &[u8]) -> Result<(), Rejection> {
        self.handle_decoded(now, from, body.len(), frame::decode(body))
    }

    /// [`Replicator::handle_frame`] for a frame its caller already decoded (the driver looks at
    /// every frame for a hello first; decoding once saves the second pass): `len` is the body's
    /// length, `decoded` what [`frame::decode`] made of it.
    pub fn handle_decoded(
        &mut self,
        now: Instant,
        from: &str,
        len: usize,
        decoded: Result<pb::Frame, Rejection>,
    ) -> Result<(), Rejection> {
        self.stats.bytes_received += len as u64;
        let f = match decoded {
            Ok(f) => f,
            Err(r) => return Err(self.reject(r)),
        };
        if let Some(pb::frame::Kind::Hello(h)) = f.kind {
            return self.on_hello(from, h);
        }
        if !self.links.contains_key(from) {
            return Err(self.reject(Rejection::UnknownPeer));
        }
        match f.kind {
            Some(pb::frame::Kind::Deltas(d)) => self.on_deltas(now, from, d),
            Some(pb::frame::Kind::Ack(a)) => self.on_ack(now, from, a),
            Some(pb::frame::Kind::DigestRequest(r)) => self.on_digest_request(now, from, r),
            Some(pb::frame::Kind::DigestReply(r)) => self.on_digest_reply(now, from, r),
            Some(pb::frame::Kind::States(s)) => self.on_states(now, from, s),
            Some(pb::frame::Kind::Hello(_)) | None => Err(self.reject(Rejection::Malformed)),
        }
    }

    /// Joins decoded entries; a value of another type than the stored one is dropped and
    /// counted (the rest is joined: a conflict on one key must not stall the others).
    pub(super) fn join_entries(
        &mut self,
        now: Instant,
        entries: Vec<(String, Entry)>,
    ) -> Result<(), Rejection> {
        let mut first_err = None;
        for (key, entry) in entries {
            match self.store.join(&key, &entry) {
                Ok(true) => {
                    self.last_change.insert(key.clone(), now);
                    if self.config.tombstone_ttl.is_some() && entry == Entry::Deleted {
                        self.tombstones.insert(key.clone(), now);
                    }
                    let footprint = match &entry {
                        Entry::Value(v) => Footprint::of(v),
                        Entry::Deleted => Footprint::All,
                    };
                    self.out.changed.push((key, footprint));
                }
                Ok(false) => {}
                Err(StoreError::TypeMismatch { .. }) => {
                    self.reject(Rejection::TypeMismatch);
                    first_err.get_or_insert(Rejection::TypeMismatch);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Decodes every entry of a frame, or rejects (and counts) the whole frame.
    pub(super) fn decode_entries(
        &mut self,
        entries: &[pb::Entry],
    ) -> Result<Vec<(String, Entry)>, Rejection> {
        frame::entries_from_proto(entries).map_err(|r| self.reject(r))
    }
}

#[cfg(test)]
mod tests;
