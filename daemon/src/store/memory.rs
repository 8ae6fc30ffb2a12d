//! The in-memory store: key → CRDT value or tombstone. The only owner of replicated state
//! while the node runs (the data file, when there is one, is a copy of it written in batches).
//!
//! Keys are `persistence_id + "-" + entity_id`. A tombstone wins over any value, concurrent or
//! later: a deleted key stays deleted (the reference proxy's semantics; the lifetime is forever).
//! The store also keeps the digests anti-entropy compares: a per-key digest of the value's
//! content (`latticed_crdt::wire::digest`: FNV-1a over its canonical peer encoding) and [`BUCKETS`] bucket hashes, each the XOR of its
//! keys' mixed digests. A change only marks its key and bucket stale; digests are recomputed
//! when anti-entropy asks, so a hot key costs one digest per round, not one per write, and
//! comparing two stores that agree costs O(buckets) whatever the number of keys.
//!
//! With a data file, the store also tracks what changed under each key since the key was last
//! handed to it ([`Store::take_change`]): the join of the deltas applied since, so that a batch
//! writes a hot key's delta rather than its whole state. Tracking starts at the first
//! [`Store::take_change`]; a store nobody takes changes from (memory only) keeps nothing.
//!
//! Sans-IO: no clock, no sockets. It must not know about peers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use latticed_crdt::wire::{self, Fnv};
use latticed_crdt::{CrdtKind, CrdtValue, Footprint};

use super::Change;

/// Number of anti-entropy buckets.
pub const BUCKETS: usize = 256;

/// What the store holds under a key.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// a CRDT value (or, in flight, a delta of one)
    Value(CrdtValue),
    /// deleted, for good
    Deleted,
}

impl Entry {
    /// The part within `fp` (a copy; see [`latticed_crdt::footprint`]); a tombstone is whole.
    pub fn part(&self, fp: &Footprint) -> Entry {
        match self {
            Entry::Value(v) => Entry::Value(v.part(fp)),
            Entry::Deleted => Entry::Deleted,
        }
    }

    /// The CRDT type, if not deleted.
    pub fn kind(&self) -> Option<CrdtKind> {
        match self {
            Entry::Value(v) => Some(v.kind()),
            Entry::Deleted => None,
        }
    }
}

/// Why an incoming entry was not joined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A value of another type than the stored one.
    #[error("key {key}: a {incoming} cannot be joined into a {stored}")]
    TypeMismatch {
        /// the key
        key: String,
        /// stored type
        stored: CrdtKind,
        /// incoming type
        incoming: CrdtKind,
    },
}

/// key → entry, with anti-entropy digests.
#[derive(Debug)]
pub struct Store {
    /// stands in for the digest of a hot key (see [`Store::digest`]); random per store, so two
    /// stores' stand-ins never agree
    salt: u64,
    entries: BTreeMap<String, Entry>,
    /// per key: its digest, `None` when stale
    digests: BTreeMap<String, Option<u64>>,
    /// per bucket: its hash, `None` when stale
    buckets: Vec<Option<u64>>,
    bucket_keys: Vec<BTreeSet<String>>,
    /// per key changed since its change was last taken: the join of its deltas since, or
    /// `None` when only its whole entry will do (it was forgotten, or joined a full state,
    /// meanwhile); `None` for the map itself until the first [`Store::take_change`]
    untaken: Option<HashMap<String, Option<CrdtValue>>>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            salt: 0,
            entries: BTreeMap::new(),
            digests: BTreeMap::new(),
            buckets: vec![Some(0); BUCKETS],
            bucket_keys: vec![BTreeSet::new(); BUCKETS],
            untaken: None,
        }
    }
}

const DELETED_DIGEST: u64 = 0x6465_6c65_7465_6421;

fn key_hash(key: &str) -> u64 {
    let mut h = Fnv::new();
    h.write(key.as_bytes());
    h.finish()
}

/// The bucket of a key.
pub fn bucket_of(key: &str) -> usize {
    (key_hash(key) % BUCKETS as u64) as usize
}

fn entry_digest(e: &Entry) -> u64 {
    match e {
        Entry::Value(v) => wire::digest(v),
        Entry::Deleted => DELETED_DIGEST,
    }
}

fn mix(key: &str, digest: u64) -> u64 {
    let mut h = Fnv::new();
    h.write(&key_hash(key).to_le_bytes());
    h.write(&digest.to_le_bytes());
    h.finish()
}

impl Store {
    /// An empty store; `salt` should be random per process.
    pub fn new(salt: u64) -> Self {
        Store {
            salt,
            ..Self::default()
        }
    }

    /// The entry under `key`.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every key with its entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// Keys from `after` (exclusive), at most `limit`.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Vec<(&String, &Entry)> {
        match after {
            Some(a) => self
                .entries
                .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .take(limit)
                .collect(),
            None => self.entries.iter().take(limit).collect(),
        }
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The digest of a key (0 if absent), recomputed if stale. A stale key that `hot` says is
    /// being written right now is not hashed (its value moves on before any comparison could
    /// settle); it gets a stand-in that matches no other store's, so it shows as differing.
    pub fn digest(&mut self, key: &str, hot: &dyn Fn(&str) -> bool) -> u64 {
        let Some(slot) = self.digests.get_mut(key) else {
            return 0;
        };
        if let Some(d) = slot {
            return *d;
        }
        if hot(key) {
            return mix(key, self.salt);
        }
        let d = self.entries.get(key).map_or(0, entry_digest);
        *slot = Some(d);
        d
    }

    /// The bucket hashes, recomputing stale ones (hot keys as in [`Store::digest`]).
    pub fn buckets(&mut self, hot: &dyn Fn(&str) -> bool) -> Vec<u64> {
        let mut out = Vec::with_capacity(BUCKETS);
        for b in 0..BUCKETS {
            if let Some(h) = self.buckets[b] {
                out.push(h);
                continue;
            }
            let keys: Vec<String> = self.bucket_keys[b].iter().cloned().collect();
            let mut h = 0u64;
            let mut settled = true;
            for k in keys {
                settled &= self.digests.get(&k).is_some_and(Option::is_some) || !hot(&k);
                h ^= mix(&k, self.digest(&k, hot));
            }
            if settled {
                self.buckets[b] = Some(h);
            }
            out.push(h);
        }
        out
    }

    /// The keys of a bucket.
    pub fn bucket_keys(&self, bucket: usize) -> impl Iterator<Item = &String> {
        self.bucket_keys.get(bucket).into_iter().flatten()
    }

    /// Mutates a value in place (a local write), then refreshes its digest. `f` must leave the
    /// value of the same type and return the delta it applied (`None`: nothing changed), which
    /// is returned.
    pub fn update<E>(
        &mut self,
        key: &str,
        f: impl FnOnce(&mut Option<CrdtValue>) -> Result<Option<CrdtValue>, E>,
    ) -> Result<Option<CrdtValue>, E> {
        let (r, present) = match self.entries.get_mut(key) {
            Some(Entry::Deleted) => return f(&mut None),
            Some(Entry::Value(v)) => {
                // changed in place: the key's slot is neither removed nor allocated again
                let empty = CrdtValue::empty(v.kind());
                let mut slot = Some(std::mem::replace(v, empty));
                let r = f(&mut slot);
                match slot {
                    Some(changed) => {
                        *v = changed;
                        (r, true)
                    }
                    None => {
                        self.entries.remove(key);
                        self.unindex(key);
                        (r, false)
                    }
                }
            }
            None => {
                let mut slot = None;
                let r = f(&mut slot);
                let present = slot.is_some();
                if let Some(v) = slot {
                    self.entries.insert(key.to_string(), Entry::Value(v));
                }
                (r, present)
            }
        };
        if present {
            self.refresh(key);
        }
        if let Ok(Some(d)) = &r {
            self.track(key, d);
        }
        r
    }

    /// Notes a delta joined into `key` for [`Store::take_change`]. A full state (a peer's,
    /// by anti-entropy) makes the change the whole entry: as a delta it would be as large, and
    /// soon compacted.
    fn track(&mut self, key: &str, d: &CrdtValue) {
        let Some(untaken) = &mut self.untaken else {
            return;
        };
        if !d.is_delta() {
            untaken.insert(key.to_string(), None);
            return;
        }
        match untaken.get_mut(key) {
            Some(Some(acc)) => {
                acc.join(d);
            }
            Some(None) => {}
            None => {
                untaken.insert(key.to_string(), Some(d.clone()));
            }
        }
    }

    /// What changed under `key` since the last call for it: the join of its deltas since, its
    /// whole entry (a tombstone; a key forgotten and written again; a key that joined a full
    /// state; any key before the first call, when tracking starts), or its removal. Joined into
    /// what the last change left, a delta gives the value now.
    pub fn take_change(&mut self, key: &str) -> Change {
        let untaken = self.untaken.get_or_insert_with(HashMap::new).remove(key);
        match (self.entries.get(key), untaken) {
            (None, _) => Change::Removed,
            (Some(Entry::Value(_)), Some(Some(d))) => Change::Delta(d),
            (Some(e), _) => Change::Whole(e.clone()),
        }
    }

    /// The key's whole entry (or its removal), in place of what changed since the last call
    /// for it: what the data file writes to compact the key's delta log from the value here,
    /// rather than by reading and joining what it holds.
    pub fn take_whole(&mut self, key: &str) -> Change {
        self.untaken.get_or_insert_with(HashMap::new).remove(key);
        match self.entries.get(key) {
            None => Change::Removed,
            Some(e) => Change::Whole(e.clone()),
        }
    }

    /// Joins an incoming entry (a delta, a full state or a tombstone). Returns whether the key
    /// changed.
    pub fn join(&mut self, key: &str, incoming: &Entry) -> Result<bool, StoreError> {
        let changed = match (self.entries.get_mut(key), incoming) {
            (Some(Entry::Deleted), _) => false,
            (Some(e @ Entry::Value(_)), Entry::Deleted) => {
                *e = Entry::Deleted;
                true
            }
            (Some(Entry::Value(v)), Entry::Value(d)) => {
                if v.kind() != d.kind() {
                    return Err(StoreError::TypeMismatch {
                        key: key.to_string(),
                        stored: v.kind(),
                        incoming: d.kind(),
                    });
                }
                v.join(d)
            }
            (None, Entry::Deleted) => {
                self.entries.insert(key.to_string(), Entry::Deleted);
                true
            }
            (None, Entry::Value(d)) => {
                self.entries
                    .insert(key.to_string(), Entry::Value(d.clone().into_state()));
                true
            }
        };
        if changed {
            match incoming {
                Entry::Value(d) => self.track(key, d),
                // its change is the tombstone, whatever came before
                Entry::Deleted => {
                    if let Some(untaken) = &mut self.untaken {
                        untaken.remove(key);
                    }
                }
            }
            self.refresh(key);
        }
        Ok(changed)
    }

    /// Puts a value or tombstone read back from the data file (at startup, before any write).
    pub fn load(&mut self, key: String, entry: Entry) {
        let entry = match entry {
            Entry::Value(v) => Entry::Value(v.into_state()),
            Entry::Deleted => Entry::Deleted,
        };
        self.entries.insert(key.clone(), entry);
        self.refresh(&key);
    }

    /// Forgets a key entirely (a tombstone past its lifetime). Should it be written again
    /// before its change is taken, the change is its whole entry (what the file holds of the
    /// key is not what the new writes build on).
    pub fn forget(&mut self, key: &str) {
        if let Some(untaken) = &mut self.untaken {
            untaken.insert(key.to_string(), None);
        }
        if self.entries.remove(key).is_some() {
            self.unindex(key);
        }
    }

    /// Drops a removed key's digest and its place in its bucket.
    fn unindex(&mut self, key: &str) {
        let b = bucket_of(key);
        self.digests.remove(key);
        self.bucket_keys[b].remove(key);
        self.buckets[b] = None;
    }

    fn refresh(&mut self, key: &str) {
        let b = bucket_of(key);
        match self.digests.get_mut(key) {
            Some(digest) => *digest = None,
            None => {
                self.digests.insert(key.to_string(), None);
                self.bucket_keys[b].insert(key.to_string());
            }
        }
        self.buckets[b] = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latticed_crdt::{apply_user_delta, Element};
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, GSetDelta};

    fn add(
        v: &mut Option<CrdtValue>,
        replica: u64,
        x: &str,
    ) -> Result<Option<CrdtValue>, latticed_crdt::CrdtError> {
        let d = CrdtDelta {
            delta: Some(Delta::Gset(GSetDelta {
                added: vec![Element::string(x).to_any()],
            })),
        };
        apply_user_delta(v, &d, replica, 0)
    }

    fn cold(_: &str) -> bool {
        false
    }

    #[test]
    fn hot_keys_differ_until_they_cool() {
        let mut a = Store::new(1);
        let mut b = Store::new(2);
        let d = a.update("k", |v| add(v, 1, "x")).unwrap().unwrap();
        b.join("k", &Entry::Value(d)).unwrap();
        let hot = |_: &str| true;
        assert_ne!(a.buckets(&hot), b.buckets(&hot));
        assert_eq!(a.buckets(&cold), b.buckets(&cold));
        assert_eq!(
            a.digest("k", &hot),
            b.digest("k", &hot),
            "computed digests are kept"
        );
    }

    #[test]
    fn buckets_agree_exactly_when_contents_agree() {
        let mut a = Store::new(1);
        let mut b = Store::new(2);
        let d1 = a.update("k1", |v| add(v, 1, "x")).unwrap().unwrap();
        let d2 = a.update("k2", |v| add(v, 1, "y")).unwrap().unwrap();
        assert_ne!(a.buckets(&cold), b.buckets(&cold));
        b.join("k2", &Entry::Value(d2)).unwrap();
        b.join("k1", &Entry::Value(d1.clone())).unwrap();
        assert_eq!(a.buckets(&cold), b.buckets(&cold));
        assert!(
            !b.join("k1", &Entry::Value(d1)).unwrap(),
            "a duplicate changes nothing"
        );
        b.join("k1", &Entry::Deleted).unwrap();
        assert_ne!(a.buckets(&cold), b.buckets(&cold));
        a.join("k1", &Entry::Deleted).unwrap();
        assert_eq!(a.buckets(&cold), b.buckets(&cold));
    }

    #[test]
    fn a_change_is_what_happened_since_the_last_one() {
        let mut s = Store::new(1);
        s.update("k", |v| add(v, 1, "x")).unwrap();
        let Change::Whole(Entry::Value(stored)) = s.take_change("k") else {
            panic!("before tracking starts, a change is the whole entry");
        };
        s.update("k", |v| add(v, 1, "y")).unwrap();
        let mut peer = Store::new(2);
        let d = peer.update("k", |v| add(v, 2, "z")).unwrap().unwrap();
        assert!(s.join("k", &Entry::Value(d)).unwrap());
        let Change::Delta(d) = s.take_change("k") else {
            panic!("a tracked change is a delta");
        };
        assert_eq!(
            Some(&Entry::Value(stored.clone().joined(&d))),
            s.get("k"),
            "what was taken, joined with the delta, is the value now"
        );
        assert_eq!(
            s.take_change("k"),
            Change::Whole(s.get("k").unwrap().clone()),
            "nothing tracked since: the whole entry"
        );
        peer.update("k", |v| add(v, 2, "u")).unwrap();
        s.join("k", peer.get("k").unwrap()).unwrap();
        assert_eq!(
            s.take_change("k"),
            Change::Whole(s.get("k").unwrap().clone()),
            "a full state joined: the whole entry"
        );
        s.update("k", |v| add(v, 1, "w")).unwrap();
        s.join("k", &Entry::Deleted).unwrap();
        assert_eq!(s.take_change("k"), Change::Whole(Entry::Deleted));
        s.forget("k");
        assert_eq!(s.take_change("k"), Change::Removed);
        s.join("k", &Entry::Deleted).unwrap();
        s.forget("k");
        s.update("k", |v| add(v, 1, "v")).unwrap();
        assert!(
            matches!(s.take_change("k"), Change::Whole(Entry::Value(_))),
            "written again after it was forgotten: the whole value"
        );
    }

    #[test]
    fn tombstones_win_and_types_must_match() {
        let mut s = Store::new(1);
        let d = s.update("k", |v| add(v, 1, "x")).unwrap().unwrap();
        s.join("k", &Entry::Deleted).unwrap();
        assert!(!s.join("k", &Entry::Value(d)).unwrap());
        assert_eq!(s.get("k"), Some(&Entry::Deleted));
        let mut t = Store::new(2);
        t.update("k", |v| add(v, 1, "x")).unwrap();
        let counter = CrdtValue::empty_delta(CrdtKind::GCounter);
        assert!(matches!(
            t.join("k", &Entry::Value(counter)),
            Err(StoreError::TypeMismatch { .. })
        ));
    }

    #[test]
    fn updates_change_values_in_place_and_leave_tombstones_alone() {
        let mut s = Store::new(1);
        s.update("k", |v| add(v, 1, "x")).unwrap();
        let first = s.digest("k", &cold);
        assert_ne!(first, 0, "a new key has a digest");
        s.update("k", |v| add(v, 1, "y")).unwrap();
        assert_ne!(s.digest("k", &cold), first, "the digest follows the change");
        let Some(Entry::Value(v)) = s.get("k") else {
            panic!("a value")
        };
        assert_eq!(v.clone().into_state(), {
            let mut w = None;
            add(&mut w, 1, "x").unwrap();
            add(&mut w, 1, "y").unwrap();
            w.unwrap()
        });
        // a failed update leaves what the closure left
        let before = s.get("k").cloned();
        assert!(s.update("k", |_| Err::<Option<CrdtValue>, ()>(())).is_err());
        assert_eq!(s.get("k").cloned(), before);
        // an update that takes the value out removes the key, and its digest
        s.update("k", |v| {
            Ok::<_, ()>(v.take().map(|_| CrdtValue::empty_delta(CrdtKind::GSet)))
        })
        .unwrap();
        assert_eq!(s.get("k"), None);
        assert_eq!(s.digest("k", &cold), 0, "no digest for a key not there");
        assert_eq!(
            s.buckets(&cold),
            Store::new(1).buckets(&cold),
            "its bucket no longer counts it"
        );
        // a tombstone is never written through
        s.join("t", &Entry::Deleted).unwrap();
        let seen = s.update("t", |v| {
            assert!(v.is_none(), "a deleted key shows as absent");
            add(v, 1, "z")
        });
        assert!(seen.is_ok());
        assert_eq!(s.get("t"), Some(&Entry::Deleted));
    }
}
