//! Dot stores: the shapes every CRDT value is built from, and their join.
//!
//! A value is a *dot store* plus a [`CausalContext`] (Almeida, Shoker, Baquero, "Delta State
//! Replicated Data Types", §6). Everything a value holds is tagged with the dot of the write that
//! put it there; joining `(s, c) ⊔ (t, d)` keeps what both hold, plus what either holds that the
//! other has not seen. So a delta removes things simply by having seen their dots, and a nested
//! value inside a map is reset when its key is removed.
//!
//! Three shapes:
//! - [`DotSet`]: a set of dots (a flag; the dots of one set element).
//! - [`DotFun`]: dot → value (counter contributions, votes, register writes).
//! - [`DotMap`]: key → nested dot store, all sharing one context (set elements, map entries).
//!
//! ## Joining deltas in O(delta)
//! A join has a [`Scope`]. A full state's context covers dots of entries it no longer holds, so a
//! `Full` join must visit every entry. A *delta* is built so that every dot in its context belongs
//! to an entry it names (possibly with nothing left in it: a removal names what it removes); a
//! `Delta` join visits only the entries the delta names, so joining a one-element delta into a
//! 10k-element set costs one lookup. Deltas keep named-but-empty entries (`keep_bottom`) when
//! joined with each other, so the property survives batching; states drop them.

use std::collections::BTreeMap;
use std::fmt::Debug;

use crate::context::{CausalContext, Dot};

/// Which entries of the other side a join must consider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The other side is a full state: every entry of both sides.
    Full,
    /// The other side is a delta: only the entries it names.
    Delta,
}

/// The contexts and options of one join.
#[derive(Clone, Copy, Debug)]
pub struct JoinArgs<'a> {
    /// the context of the store being joined into
    pub self_ctx: &'a CausalContext,
    /// the context of the store joined in
    pub other_ctx: &'a CausalContext,
    /// which entries to visit
    pub scope: Scope,
    /// keep entries that end up empty (true when the result is itself a delta)
    pub keep_bottom: bool,
}

impl JoinArgs<'_> {
    fn full(self) -> Self {
        JoinArgs {
            scope: Scope::Full,
            ..self
        }
    }
}

/// A dot store: what a CRDT value holds, its pieces tagged with dots.
pub trait DotStore: Clone + Default + PartialEq + Debug {
    /// Whether it holds nothing.
    fn is_bottom(&self) -> bool;
    /// Calls `f` with every dot held.
    fn for_each_dot(&self, f: &mut dyn FnMut(&Dot));
    /// The same entries, every dot dropped: what a removal of all of it names.
    fn skeleton(&self) -> Self;
    /// An empty store of the same shape (for an enum of stores: the same variant).
    fn empty_like(&self) -> Self {
        Self::default()
    }
    /// Joins `other` into `self`; returns whether `self` changed. Costs O(what is visited).
    fn join(&mut self, other: &Self, args: &JoinArgs<'_>) -> bool;
    /// Joins the empty store into `self`: drops every dot `args.other_ctx` has seen.
    fn join_bottom(&mut self, args: &JoinArgs<'_>) -> bool {
        let bottom = self.empty_like();
        self.join(&bottom, &args.full())
    }
    /// Every dot held, collected.
    fn dots(&self) -> Vec<Dot> {
        let mut out = Vec::new();
        self.for_each_dot(&mut |d| out.push(d.clone()));
        out
    }
    /// The greatest dot held, ordered by (counter, replica): a deterministic "latest write".
    fn max_dot(&self) -> Option<Dot> {
        let mut best: Option<Dot> = None;
        self.for_each_dot(&mut |d| {
            let better = match &best {
                None => true,
                Some(b) => (d.counter, d.actor) > (b.counter, b.actor),
            };
            if better {
                best = Some(d.clone());
            }
        });
        best
    }
}

/// A set of dots, stored inline when it holds one (the common case for a set element).
#[derive(Clone, Default, PartialEq, Eq, Hash, Debug)]
pub enum DotSet {
    /// no dots
    #[default]
    Empty,
    /// one dot
    One(Dot),
    /// two or more dots, sorted, no duplicates
    Many(Vec<Dot>),
}

impl DotSet {
    /// A set from any dots.
    pub fn from_dots(mut dots: Vec<Dot>) -> Self {
        dots.sort();
        dots.dedup();
        match dots.len() {
            0 => DotSet::Empty,
            1 => DotSet::One(dots.remove(0)),
            _ => DotSet::Many(dots),
        }
    }

    /// The dots.
    pub fn iter(&self) -> impl Iterator<Item = &Dot> {
        let (one, many): (Option<&Dot>, &[Dot]) = match self {
            DotSet::Empty => (None, &[]),
            DotSet::One(d) => (Some(d), &[]),
            DotSet::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter())
    }

    /// Its one dot (`Some(None)`: empty), or `None` if it holds more.
    fn at_most_one(&self) -> Option<Option<&Dot>> {
        match self {
            DotSet::Empty => Some(None),
            DotSet::One(d) => Some(Some(d)),
            DotSet::Many(_) => None,
        }
    }

    /// Whether `d` is in the set.
    pub fn contains(&self, d: &Dot) -> bool {
        match self {
            DotSet::Empty => false,
            DotSet::One(x) => x == d,
            DotSet::Many(v) => v.binary_search(d).is_ok(),
        }
    }

    /// How many dots.
    pub fn len(&self) -> usize {
        match self {
            DotSet::Empty => 0,
            DotSet::One(_) => 1,
            DotSet::Many(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        matches!(self, DotSet::Empty)
    }
}

impl DotStore for DotSet {
    fn is_bottom(&self) -> bool {
        self.is_empty()
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(&Dot)) {
        self.iter().for_each(f);
    }
    fn skeleton(&self) -> Self {
        DotSet::Empty
    }
    fn join(&mut self, other: &Self, args: &JoinArgs<'_>) -> bool {
        // (s ∩ t) ∪ (s \ other_ctx) ∪ (t \ self_ctx)
        if self == other {
            return false;
        }
        if let (Some(mine), Some(theirs)) = (self.at_most_one(), other.at_most_one()) {
            // the common case (a set element has one dot): the same join without a vector
            let mine = mine.filter(|d| theirs == Some(*d) || !args.other_ctx.contains(d));
            let theirs = theirs.filter(|d| !args.self_ctx.contains(d));
            let joined = match (mine, theirs) {
                (None, None) => DotSet::Empty,
                (Some(d), None) | (None, Some(d)) => DotSet::One(d.clone()),
                (Some(a), Some(b)) if a == b => DotSet::One(a.clone()),
                (Some(a), Some(b)) => DotSet::Many(if a < b {
                    vec![a.clone(), b.clone()]
                } else {
                    vec![b.clone(), a.clone()]
                }),
            };
            let changed = joined != *self;
            *self = joined;
            return changed;
        }
        let mut out: Vec<Dot> = self
            .iter()
            .filter(|d| other.contains(d) || !args.other_ctx.contains(d))
            .cloned()
            .collect();
        out.extend(other.iter().filter(|d| !args.self_ctx.contains(d)).cloned());
        let joined = DotSet::from_dots(out);
        let changed = joined != *self;
        *self = joined;
        changed
    }
}

/// A map from dots to values: each value was written by the event its dot names.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct DotFun<V> {
    entries: BTreeMap<Dot, V>,
}

impl<V> Default for DotFun<V> {
    fn default() -> Self {
        DotFun {
            entries: BTreeMap::new(),
        }
    }
}

impl<V: Clone + Ord + Debug> DotFun<V> {
    /// The entries, ordered by dot.
    pub fn iter(&self) -> impl Iterator<Item = (&Dot, &V)> {
        self.entries.iter()
    }

    /// Adds an entry.
    pub fn insert(&mut self, d: Dot, v: V) {
        self.entries.insert(d, v);
    }

    /// The latest entry of each replica (the one with its highest counter).
    pub fn latest_per_replica(&self) -> impl Iterator<Item = (&Dot, &V)> {
        let mut iter = self.entries.iter().peekable();
        std::iter::from_fn(move || loop {
            let (d, v) = iter.next()?;
            match iter.peek() {
                Some((next, _)) if next.actor == d.actor => continue,
                _ => return Some((d, v)),
            }
        })
    }

    /// The latest entry of one replica.
    pub fn latest_of(&self, replica: u64) -> Option<(&Dot, &V)> {
        self.entries
            .range(crate::context::dot(replica, 0)..=crate::context::dot(replica, u64::MAX))
            .next_back()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<V: Clone + Ord + Debug> DotStore for DotFun<V> {
    fn is_bottom(&self) -> bool {
        self.entries.is_empty()
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(&Dot)) {
        self.entries.keys().for_each(f);
    }
    fn skeleton(&self) -> Self {
        DotFun::default()
    }
    fn join(&mut self, other: &Self, args: &JoinArgs<'_>) -> bool {
        // Dot functions are small (one entry per writer): always visit everything.
        let before = self.entries.len();
        self.entries
            .retain(|d, _| other.entries.contains_key(d) || !args.other_ctx.contains(d));
        let mut changed = self.entries.len() != before;
        for (d, v) in &other.entries {
            match self.entries.get_mut(d) {
                // Same dot, same write: values agree unless a peer lied; keep the larger so
                // that join stays commutative anyway.
                Some(mine) => {
                    if v > mine {
                        *mine = v.clone();
                        changed = true;
                    }
                }
                None => {
                    if !args.self_ctx.contains(d) {
                        self.entries.insert(d.clone(), v.clone());
                        changed = true;
                    }
                }
            }
        }
        changed
    }
}

/// A map from keys to nested dot stores sharing one causal context.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct DotMap<K: Ord, V> {
    entries: BTreeMap<K, V>,
}

impl<K: Ord, V> Default for DotMap<K, V> {
    fn default() -> Self {
        DotMap {
            entries: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone + Debug, V: DotStore> DotMap<K, V> {
    /// The entries, ordered by key (a delta may hold empty ones).
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter()
    }

    /// The nested store under `k`.
    pub fn get(&self, k: &K) -> Option<&V> {
        self.entries.get(k)
    }

    /// Entries within a key range.
    pub fn range<R: std::ops::RangeBounds<K>>(&self, r: R) -> impl Iterator<Item = (&K, &V)> {
        self.entries.range(r)
    }

    /// Sets the nested store under `k`.
    pub fn insert(&mut self, k: K, v: V) {
        self.entries.insert(k, v);
    }

    /// Takes the nested store under `k` out.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.entries.remove(k)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn join_entry(&mut self, k: &K, theirs: &V, args: &JoinArgs<'_>) -> bool {
        match self.entries.get_mut(k) {
            Some(mine) => {
                let changed = mine.join(theirs, args);
                if !args.keep_bottom && mine.is_bottom() {
                    self.entries.remove(k);
                    return true;
                }
                changed
            }
            None => {
                let mut mine = theirs.empty_like();
                mine.join(theirs, args);
                if args.keep_bottom || !mine.is_bottom() {
                    self.entries.insert(k.clone(), mine);
                    return true;
                }
                false
            }
        }
    }
}

impl<K: Ord + Clone + Debug, V: DotStore> DotStore for DotMap<K, V> {
    fn is_bottom(&self) -> bool {
        self.entries.values().all(DotStore::is_bottom)
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(&Dot)) {
        for v in self.entries.values() {
            v.for_each_dot(f);
        }
    }
    fn skeleton(&self) -> Self {
        DotMap {
            entries: self
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), v.skeleton()))
                .collect(),
        }
    }
    fn join(&mut self, other: &Self, args: &JoinArgs<'_>) -> bool {
        let mut changed = false;
        if args.scope == Scope::Full {
            let keep_bottom = args.keep_bottom;
            self.entries.retain(|k, mine| {
                if other.entries.contains_key(k) {
                    return true;
                }
                changed |= mine.join_bottom(args);
                let keep = keep_bottom || !mine.is_bottom();
                changed |= !keep;
                keep
            });
        }
        for (k, theirs) in &other.entries {
            changed |= self.join_entry(k, theirs, args);
        }
        changed
    }
}

/// Declares a store type that wraps another and forwards [`DotStore`] to it (so that, say, a
/// GSet and an ORSet are distinct types over the same shape).
macro_rules! store_newtype {
    ($(#[$meta:meta])* $name:ident($inner:ty)) => {
        $(#[$meta])*
        #[derive(Clone, Default, PartialEq, Hash, Debug)]
        pub struct $name(pub(crate) $inner);

        impl $crate::dotstore::DotStore for $name {
            fn is_bottom(&self) -> bool {
                $crate::dotstore::DotStore::is_bottom(&self.0)
            }
            fn for_each_dot(&self, f: &mut dyn FnMut(&$crate::context::Dot)) {
                $crate::dotstore::DotStore::for_each_dot(&self.0, f)
            }
            fn skeleton(&self) -> Self {
                $name($crate::dotstore::DotStore::skeleton(&self.0))
            }
            fn join(&mut self, other: &Self, args: &$crate::dotstore::JoinArgs<'_>) -> bool {
                $crate::dotstore::DotStore::join(&mut self.0, &other.0, args)
            }
        }
    };
}
pub(crate) use store_newtype;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::dot;
    use proptest::prelude::*;

    fn dots() -> impl Strategy<Value = Vec<Dot>> {
        prop::collection::vec((1u64..3, 1u64..4).prop_map(|(r, c)| dot(r, c)), 0..3)
    }

    proptest! {
        /// The one-dot fast path of `DotSet::join` gives the general formula's result:
        /// (s ∩ t) ∪ (s \ other_ctx) ∪ (t \ self_ctx).
        #[test]
        fn dot_set_join_is_the_formula(
            s in dots(), t in dots(), sc in dots(), tc in dots(), scope_full in any::<bool>()
        ) {
            let (s, t) = (DotSet::from_dots(s), DotSet::from_dots(t));
            // a context covers its own store's dots
            let self_ctx = CausalContext::from_parts([], sc.into_iter().chain(s.iter().cloned()));
            let other_ctx = CausalContext::from_parts([], tc.into_iter().chain(t.iter().cloned()));
            let args = JoinArgs {
                self_ctx: &self_ctx,
                other_ctx: &other_ctx,
                scope: if scope_full { Scope::Full } else { Scope::Delta },
                keep_bottom: false,
            };
            let expected = DotSet::from_dots(
                s.iter()
                    .filter(|d| t.contains(d) || !other_ctx.contains(d))
                    .chain(t.iter().filter(|d| !self_ctx.contains(d)))
                    .cloned()
                    .collect(),
            );
            let mut joined = s.clone();
            let changed = joined.join(&t, &args);
            prop_assert_eq!(&joined, &expected);
            prop_assert_eq!(changed, expected != s);
        }
    }
}
