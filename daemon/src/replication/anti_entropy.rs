//! Anti-entropy: periodic digest comparison with one random up peer, and the exchange of the
//! states that differ.
//!
//! Owns the rounds (one at a time), the per (peer, key) backoff of full-state exchanges and the
//! rule for hot keys (changed within `hot_key_quiet`: left to the delta path unless they keep
//! differing for `full_state_backoff_max`, or the node has not synced yet: its first round
//! pulls every key that differs). A round that completes marks the node synced.

use std::collections::BTreeMap;
use std::time::Instant;

use latticed_proto::latticed::peer as pb;
use rand::RngExt;

use super::frame::{self, Rejection};
use super::replicator::{PeerId, Replicator};
use crate::store::BUCKETS;

pub(super) struct Round {
    pub(super) id: u64,
    pub(super) peer: PeerId,
    pub(super) started: Instant,
}

impl Replicator {
    pub(super) fn anti_entropy(&mut self, now: Instant) {
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

    pub(super) fn on_digest_request(
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
    pub(super) fn may_exchange(&mut self, now: Instant, peer: &str, key: &str) -> bool {
        let slot = (peer.to_string(), key.to_string());
        let wait = match self.exchanged.get(&slot) {
            Some((at, wait)) if now < *at + *wait => return false,
            Some((_, wait)) => (*wait * 2).min(self.config.full_state_backoff_max),
            None => self.config.full_state_backoff,
        };
        self.exchanged.insert(slot, (now, wait));
        true
    }

    pub(super) fn on_digest_reply(
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
                // a node that has not completed a first sync pulls every key that differs, hot
                // or not: a new life is sent only the deltas made after it appeared, so of a
                // key written all along it may hold just the recent part (a rolling restart
                // under writes lost acknowledged data that way)
                let first = !self.synced;
                if first || ((!hot || overdue) && self.may_exchange(now, from, &k)) {
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

    pub(super) fn on_states(
        &mut self,
        now: Instant,
        from: &str,
        s: pb::States,
    ) -> Result<(), Rejection> {
        let entries = self.decode_entries(&s.entries)?;
        let joined = self.join_entries(now, entries);
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
