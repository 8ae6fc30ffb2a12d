//! ORMap: an add-wins map from [`Element`] keys to nested CRDTs of any of the eight types.
//!
//! The store is a [`DotMap`] from `(key, type)` to a [`MapEntry`]: a *presence* dot set (the
//! writes that created the key) and the nested value's store, all sharing the map's causal
//! context. Removing a key covers every dot under it, so the nested value is reset: a key
//! removed and added again starts from empty, even when a peer receives the removal and the
//! re-add in one batch. A write concurrent with the removal survives (add-wins), keeping what
//! that write contributed.
//!
//! Types under one key:
//! - a key removed and added again as another type is simply that new type;
//! - two replicas creating one key concurrently with two types leave two entries; the key reads
//!   as the type whose entry holds the greatest dot, ordered by (counter, replica), which every
//!   replica computes alike. The next update of the key through its visible type removes the
//!   other type's entry; an `added` of another type replaces it.

use std::ops::RangeInclusive;

use crate::causal::Causal;
use crate::context::{removal_context, CausalContext, Dot, ReplicaId};
use crate::dotstore::{DotMap, DotSet, DotStore, JoinArgs};
use crate::element::Element;
use crate::value::{CrdtKind, Store};

/// A map key together with the type of the value under it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MapKey {
    /// the key
    pub key: Element,
    /// the nested value's type
    pub kind: CrdtKind,
}

/// What the map holds under one `(key, type)`.
#[derive(Clone, Debug, Default, PartialEq, Hash)]
pub struct MapEntry {
    /// dots of the writes that created the key
    pub presence: DotSet,
    /// the nested value
    pub value: Store,
}

impl DotStore for MapEntry {
    fn is_bottom(&self) -> bool {
        self.presence.is_bottom() && self.value.is_bottom()
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(&Dot)) {
        self.presence.for_each_dot(f);
        self.value.for_each_dot(f);
    }
    fn skeleton(&self) -> Self {
        MapEntry {
            presence: DotSet::Empty,
            value: self.value.skeleton(),
        }
    }
    fn empty_like(&self) -> Self {
        MapEntry {
            presence: DotSet::Empty,
            value: self.value.empty_like(),
        }
    }
    fn join(&mut self, other: &Self, args: &JoinArgs<'_>) -> bool {
        let a = self.presence.join(&other.presence, args);
        let b = self.value.join(&other.value, args);
        a || b
    }
}

/// `(key, type)` → entry.
pub type MapStore = DotMap<MapKey, MapEntry>;

/// An add-wins map of CRDTs.
pub type ORMap = Causal<MapStore>;

fn key_range(key: &Element) -> RangeInclusive<MapKey> {
    MapKey {
        key: key.clone(),
        kind: CrdtKind::GCounter,
    }..=MapKey {
        key: key.clone(),
        kind: CrdtKind::Vote,
    }
}

fn rank(e: &MapEntry) -> Option<(u64, ReplicaId)> {
    e.max_dot().map(|d| (d.counter, d.actor))
}

/// The entry a key reads as (see the module docs), if the key is present.
pub(crate) fn visible<'a>(map: &'a MapStore, key: &Element) -> Option<(&'a MapKey, &'a MapEntry)> {
    map.range(key_range(key))
        .filter(|(_, e)| !e.is_bottom())
        .max_by_key(|(_, e)| rank(e))
}

/// Every present key with the value it reads as, in key order.
pub(crate) fn visible_entries(map: &MapStore) -> impl Iterator<Item = (&Element, &Store)> {
    let mut iter = map.iter().filter(|(_, e)| !e.is_bottom()).peekable();
    std::iter::from_fn(move || {
        let (mut best_key, mut best) = iter.next()?;
        while let Some((k, e)) = iter.peek() {
            if k.key != best_key.key {
                break;
            }
            if rank(e) > rank(best) {
                best_key = k;
                best = e;
            }
            iter.next();
        }
        Some((&best_key.key, &best.value))
    })
}

/// The delta removing `entries`; with `minter`, the removal mints a dot of its own (see
/// [`removal_context`]).
fn cover(
    entries: Vec<(MapKey, &MapEntry)>,
    minter: Option<(&CausalContext, ReplicaId)>,
) -> Option<Causal<MapStore>> {
    if entries.is_empty() {
        return None;
    }
    let mut store = MapStore::default();
    let mut dots = Vec::new();
    for (k, e) in entries {
        e.for_each_dot(&mut |d| dots.push(d.clone()));
        store.insert(k, e.skeleton());
    }
    let ctx = match minter {
        Some((ctx, replica)) => removal_context(ctx, replica, dots),
        None => CausalContext::from_parts([], dots),
    };
    Some(Causal::from_delta_parts(store, ctx))
}

fn entries_of<'a>(
    map: &'a MapStore,
    key: &Element,
) -> impl Iterator<Item = (MapKey, &'a MapEntry)> {
    map.range(key_range(key))
        .filter(|(_, e)| !e.is_bottom())
        .map(|(k, e)| (k.clone(), e))
}

/// Removes `key` (every type under it); `None` if absent.
pub(crate) fn remove_key(
    map: &MapStore,
    ctx: &CausalContext,
    replica: ReplicaId,
    key: &Element,
) -> Option<Causal<MapStore>> {
    cover(entries_of(map, key).collect(), Some((ctx, replica)))
}

/// Removes entries of `key` whose type is not `kind`; `None` if there are none.
pub(crate) fn remove_other_kinds(
    map: &MapStore,
    ctx: &CausalContext,
    replica: ReplicaId,
    key: &Element,
    kind: CrdtKind,
) -> Option<Causal<MapStore>> {
    cover(
        entries_of(map, key)
            .filter(|(k, _)| k.kind != kind)
            .collect(),
        Some((ctx, replica)),
    )
}

/// Removes every key; `None` if the map is empty.
pub(crate) fn clear(
    map: &MapStore,
    ctx: &CausalContext,
    replica: ReplicaId,
) -> Option<Causal<MapStore>> {
    cover(
        map.iter()
            .filter(|(_, e)| !e.is_bottom())
            .map(|(k, e)| (k.clone(), e))
            .collect(),
        Some((ctx, replica)),
    )
}

/// Creates `key` as an empty value of `kind`, replacing whatever the key held.
pub(crate) fn create(
    map: &MapStore,
    ctx: &CausalContext,
    replica: ReplicaId,
    key: &Element,
    kind: CrdtKind,
) -> Causal<MapStore> {
    // the presence dot is this change's own dot
    let mut delta = cover(entries_of(map, key).collect(), None)
        .unwrap_or_else(|| Causal::from_delta_parts(MapStore::default(), CausalContext::new()));
    delta.join(&presence(ctx, replica, key, kind));
    delta
}

/// A fresh presence dot for `(key, kind)`.
pub(crate) fn presence(
    ctx: &CausalContext,
    replica: ReplicaId,
    key: &Element,
    kind: CrdtKind,
) -> Causal<MapStore> {
    let z = ctx.next_dot(replica);
    let mut store = MapStore::default();
    store.insert(
        MapKey {
            key: key.clone(),
            kind,
        },
        MapEntry {
            presence: DotSet::One(z.clone()),
            value: Store::empty(kind),
        },
    );
    Causal::from_delta_parts(store, CausalContext::from_parts([], [z]))
}

/// A nested delta under `key` as a delta of the map.
pub(crate) fn lift(key: MapKey, nested: Causal<Store>) -> Causal<MapStore> {
    let mut store = MapStore::default();
    store.insert(
        key,
        MapEntry {
            presence: DotSet::Empty,
            value: nested.store,
        },
    );
    Causal::from_delta_parts(store, nested.ctx)
}

/// The part of `map` that operations on `keys` read: their entries (all of them if `all`).
pub(crate) fn scratch<'a>(
    map: &MapStore,
    all: bool,
    keys: impl Iterator<Item = &'a Element>,
) -> MapStore {
    if all {
        return map.clone();
    }
    let mut out = MapStore::default();
    for key in keys {
        for (k, e) in map.range(key_range(key)) {
            out.insert(k.clone(), e.clone());
        }
    }
    out
}

impl ORMap {
    /// The value under `key`, if present.
    pub fn get(&self, key: &Element) -> Option<&Store> {
        visible(&self.store, key).map(|(_, e)| &e.value)
    }

    /// The present keys with their values, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&Element, &Store)> {
        visible_entries(&self.store)
    }

    /// How many keys are present.
    pub fn len(&self) -> usize {
        self.entries().count()
    }

    /// The delta of `replica` removing `key`; `None` if absent.
    pub fn remove(&self, replica: ReplicaId, key: &Element) -> Option<ORMap> {
        remove_key(&self.store, &self.ctx, replica, key)
    }

    /// The delta of `replica` removing every key; `None` if empty.
    pub fn clear(&self, replica: ReplicaId) -> Option<ORMap> {
        clear(&self.store, &self.ctx, replica)
    }
}
