//! Delta-intervals and acknowledgements between lives of nodes.
//!
//! Owns, per peer, what this node pushes to it ([`Peer`]: the peer's epoch, the `base` the
//! exchange with that life started at, what was sent and acked, dirty keys owed in full) and
//! what it holds of the peer's deltas ([`Link`]: the peer's life from its hello, `held`, and
//! intervals received beyond a gap). Epochs scope both sides: a hello with a new epoch starts a
//! new exchange, and frames of another life are rejected. Also the push itself: at once to a
//! peer with nothing in flight, in batches otherwise. `docs/replication.md` (Epochs) has the
//! reasoning.

use std::collections::BTreeMap;
use std::time::Instant;

use latticed_crdt::ReplicaId;
use latticed_proto::latticed::peer as pb;

use super::delta_buffer::join_entry;
use super::frame::{self, Rejection};
use super::replicator::{PeerId, Replicator};
use crate::store::Entry;

/// What this node sends to one peer: the interval of deltas in flight to its current life.
pub(super) struct Peer {
    /// the peer's epoch, from its hello; nothing is sent before it is known
    pub(super) epoch: Option<u64>,
    pub(super) up: bool,
    /// this exchange with the peer's life started after this number: the peer is sent nothing
    /// numbered up to it (anti-entropy carries that), and its acks count for writes after it
    pub(super) base: u64,
    pub(super) acked: u64,
    /// the highest number the peer said arrived (its received-only acks, and its acks): flow
    /// control only, it counts for nothing else
    pub(super) received: u64,
    pub(super) sent_upto: u64,
    pub(super) last_send: Option<Instant>,
    /// since when something sent has been waiting for an ack
    pub(super) unacked_since: Option<Instant>,
    /// keys to send in full (deltas for them were dropped before this peer acked them), with
    /// the highest dropped number: an ack covering it makes the key no longer owed
    pub(super) dirty: BTreeMap<String, u64>,
    /// dirty keys sent in full, with the number up to which the frame that carried them
    /// claimed its interval: they stay owed until an ack covers that number (a lost frame is
    /// resent from the ack, and the buffer no longer has the deltas they stand for)
    pub(super) dirty_sent: BTreeMap<String, u64>,
    /// when a hello was last sent while the peer's epoch is unknown
    pub(super) last_hello: Option<Instant>,
}

impl Peer {
    pub(super) fn new(seq: u64, epoch: Option<u64>) -> Peer {
        Peer {
            epoch,
            up: false,
            base: seq,
            acked: seq,
            received: seq,
            sent_upto: seq,
            last_send: None,
            unacked_since: None,
            dirty: BTreeMap::new(),
            dirty_sent: BTreeMap::new(),
            last_hello: None,
        }
    }

    /// Nothing sent to it is still on its way: the next write may go at once.
    pub(super) fn is_idle(&self) -> bool {
        self.acked.max(self.received) >= self.sent_upto
    }

    /// Sends again from the last ack: unacked dirty keys are owed again.
    pub(super) fn resend_from_ack(&mut self) {
        self.sent_upto = self.acked;
        self.received = self.acked;
        self.unacked_since = None;
        let owed = std::mem::take(&mut self.dirty_sent);
        self.dirty.extend(owed);
    }

    /// Starts a new exchange with a new life of the peer, after number `seq`.
    pub(super) fn restart(&mut self, seq: u64, epoch: u64) {
        let up = self.up;
        *self = Peer::new(seq, Some(epoch));
        self.up = up;
    }
}

/// What this node knows of one peer's current life, from its hello, and what it holds of that
/// life's deltas.
pub(super) struct Link {
    pub(super) replica: ReplicaId,
    pub(super) epoch: u64,
    /// the protocol version spoken with it
    pub(super) version: u32,
    /// every delta of this life numbered up to this is here (`None`: no interval yet)
    pub(super) held: Option<u64>,
    /// intervals joined beyond a gap (from -> to), at most [`AHEAD`]: when the gap fills,
    /// `held` moves past them without waiting for their resend
    pub(super) ahead: BTreeMap<u64, u64>,
}

/// How many intervals beyond a gap a link remembers.
pub(super) const AHEAD: usize = 32;

impl Link {
    /// Notes that the interval `from..=to` (after `base`) is here; returns `held`.
    pub(super) fn receive(&mut self, base: u64, from: u64, to: u64) -> u64 {
        let mut held = self.held.unwrap_or(0).max(base);
        if from > held.saturating_add(1) {
            self.ahead.insert(from, to);
            while self.ahead.len() > AHEAD {
                self.ahead.pop_last();
            }
        } else {
            held = held.max(to);
        }
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() > held.saturating_add(1) {
                break;
            }
            held = held.max(entry.remove());
        }
        self.held = Some(held);
        held
    }
}

impl Replicator {
    /// Sends what is pending at once to every up peer with nothing in flight: a quiet node
    /// does not wait for the batch window. Peers with something in flight gather new deltas
    /// until its ack comes back or the window passes (Nagle's algorithm, bounded).
    pub(super) fn send_to_idle(&mut self, now: Instant) {
        let seq = self.seq;
        let idle: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up && p.epoch.is_some() && p.is_idle() && p.sent_upto < seq)
            .map(|(n, _)| n.clone())
            .collect();
        for name in idle {
            self.send_batch(now, &name);
        }
        // every peer that takes deltas has them all: nothing waits for the batch window
        if self
            .peers
            .values()
            .all(|p| !p.up || p.epoch.is_none() || p.sent_upto >= seq)
        {
            self.unflushed_since = None;
        }
    }

    pub(super) fn send_batch(&mut self, now: Instant, name: &str) {
        let Some(p) = self.peers.get(name) else {
            return;
        };
        let (Some(receiver_epoch), base) = (p.epoch, p.base) else {
            return;
        };
        // an interval is never empty: dirty keys with nothing new to send go out with a resend
        // from the ack (dirty keys imply an unacked number)
        let from = if p.sent_upto >= self.seq {
            p.acked + 1
        } else {
            p.sent_upto + 1
        };
        if from > self.seq {
            // everything is acked: nothing is owed
            if let Some(p) = self.peers.get_mut(name) {
                p.dirty.clear();
            }
            return;
        }
        let start = self.buffer.partition_point(|b| b.seq < from);
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for b in self.buffer.range(start..) {
            join_entry(&mut entries, &b.key, &b.entry);
        }
        let dirty: Vec<String> = p.dirty.keys().cloned().collect();
        for key in &dirty {
            if let Some(e) = self.store.get(key) {
                entries.insert(key.clone(), e.clone());
            }
        }
        self.stats.full_syncs += dirty.len() as u64;
        self.stats.deltas_sent += entries.len() as u64;
        let frame = frame::frame(pb::frame::Kind::Deltas(pb::Deltas {
            sender: self.replica,
            epoch: self.epoch,
            receiver_epoch,
            base,
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
            let to = self.seq;
            p.dirty_sent
                .extend(std::mem::take(&mut p.dirty).into_keys().map(|k| (k, to)));
        }
    }

    /// A peer's hello: the life it speaks for. A new life starts a new exchange both ways, and
    /// is greeted back (it does not know this node's life yet).
    pub(super) fn on_hello(&mut self, from: &str, h: pb::Hello) -> Result<(), Rejection> {
        let version = match frame::negotiate(&h) {
            Ok(v) => v,
            Err(r) => return Err(self.reject(r)),
        };
        if self
            .links
            .get(from)
            .is_some_and(|l| l.replica == h.replica && l.epoch == h.epoch && l.version == version)
        {
            return Ok(());
        }
        self.links.insert(
            from.to_string(),
            Link {
                replica: h.replica,
                epoch: h.epoch,
                version,
                held: None,
                ahead: BTreeMap::new(),
            },
        );
        let seq = self.seq;
        if let Some(p) = self.peers.get_mut(from) {
            match p.epoch {
                // its first hello: what was kept for it since it appeared is still to be sent
                None => p.epoch = Some(h.epoch),
                Some(e) if e != h.epoch => p.restart(seq, h.epoch),
                Some(_) => {}
            }
        }
        let hello = self.hello();
        self.send_bytes(from, hello);
        Ok(())
    }

    /// A delta-interval. Checked whole before anything of it is joined: the sender must be
    /// the life the stream's hello named, the interval must make sense, it must be addressed to
    /// this life, and every entry must decode.
    pub(super) fn on_deltas(
        &mut self,
        now: Instant,
        from: &str,
        d: pb::Deltas,
    ) -> Result<(), Rejection> {
        let Some(link) = self.links.get(from) else {
            return Err(self.reject(Rejection::UnknownPeer));
        };
        if d.sender != link.replica || d.epoch != link.epoch {
            return Err(self.reject(Rejection::Sender));
        }
        if d.from <= d.base || d.to < d.from {
            return Err(self.reject(Rejection::Malformed));
        }
        if d.receiver_epoch != self.epoch {
            // meant for a previous life of this node: tell the sender who is here now
            let hello = self.hello();
            self.send_bytes(from, hello);
            return Err(self.reject(Rejection::Stale));
        }
        let entries = self.decode_entries(&d.entries)?;
        self.stats.deltas_received += entries.len() as u64;
        let joined = self.join_entries(now, entries);
        let Some(link) = self.links.get_mut(from) else {
            return joined;
        };
        let held = link.receive(d.base, d.from, d.to);
        let speaks_received_only = link.version >= 3;
        let epoch = self.epoch;
        let ack = |received_only| {
            frame::encode(&frame::frame(pb::frame::Kind::Ack(pb::Ack {
                sender: d.sender,
                sender_epoch: d.epoch,
                epoch,
                upto: held,
                received_only,
            })))
        };
        if self.config.acks_wait_for_commit && speaks_received_only {
            // the ack waits for the commit; this one lets the sender go on meanwhile
            let bytes = ack(true);
            self.send_bytes(from, bytes);
        }
        let bytes = ack(false);
        self.stats.bytes_sent += bytes.len() as u64;
        self.out.acks.push((from.to_string(), bytes));
        joined
    }

    /// An ack from `from`. It counts only if it acknowledges this life's deltas and comes from
    /// the peer's current life, and only for writes numbered after the exchange with that life
    /// started.
    pub(super) fn on_ack(&mut self, now: Instant, from: &str, a: pb::Ack) -> Result<(), Rejection> {
        if a.sender != self.replica || a.sender_epoch != self.epoch {
            return Ok(());
        }
        if a.upto > self.seq {
            // acknowledges what was never sent
            return Err(self.reject(Rejection::Malformed));
        }
        let Some(p) = self.peers.get_mut(from) else {
            return Ok(());
        };
        if a.received_only {
            // flow control only: what it acknowledges is not held durably yet
            if p.epoch == Some(a.epoch) && a.upto > p.received {
                p.received = a.upto;
                if p.is_idle() {
                    self.send_to_idle(now);
                }
            }
            return Ok(());
        }
        if p.epoch != Some(a.epoch) || a.upto <= p.acked {
            return Ok(());
        }
        let (upto, base) = (a.upto, p.base);
        let idle = upto >= p.sent_upto;
        p.acked = upto;
        p.dirty.retain(|_, dropped| *dropped > upto);
        p.dirty_sent.retain(|_, to| *to > upto);
        p.sent_upto = p.sent_upto.max(upto);
        // what is still unacked was sent after this ack's interval: restart its clock
        p.unacked_since = (p.acked < p.sent_upto).then_some(now);
        if let Some(b) = self.buffer.iter().rev().find(|b| b.seq <= upto) {
            self.out
                .ack_latencies
                .push(now.saturating_duration_since(b.at));
        }
        self.count_ack(from, base, upto);
        self.gc();
        if idle {
            // what gathered while this interval was in flight goes now
            self.send_to_idle(now);
        }
        Ok(())
    }
}
