//! Dots and the causal context.
//!
//! A *dot* `(replica, n)` names the n-th event of a replica. A *causal context* is the set of dots
//! a value has seen, kept as a compact version vector (every dot `(r, 1..=v[r])`) plus a *dot
//! cloud* of dots beyond it. Because the cloud records gaps exactly, deltas can be joined in any
//! order and duplicated without a causal-delivery layer; the cloud collapses into the vector as
//! the gaps fill.
//!
//! The dot and the version vector are the `crdts` crate's (`OrdDot`, `VClock`); `crdts` has no
//! dot cloud, which this module adds. It owns no CRDT semantics.

use std::collections::BTreeSet;

use crdts::{CvRDT, VClock};

/// A replica: one incarnation of one daemon. 64 bits, chosen at random at start.
pub type ReplicaId = u64;

/// A dot: `(replica, counter)`, ordered by replica then counter.
pub type Dot = crdts::OrdDot<ReplicaId>;

/// The dot `(replica, counter)`.
pub fn dot(replica: ReplicaId, counter: u64) -> Dot {
    Dot {
        actor: replica,
        counter,
    }
}

/// The dots a value has seen: a compact version vector plus a cloud of dots beyond it.
///
/// Always kept compact: no cloud dot is already covered by, or directly follows, the vector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CausalContext {
    version: VClock<ReplicaId>,
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// The empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// A context from its parts, compacted.
    pub fn from_parts(
        version: impl IntoIterator<Item = (ReplicaId, u64)>,
        cloud: impl IntoIterator<Item = Dot>,
    ) -> Self {
        let mut ctx = CausalContext::new();
        for (replica, counter) in version {
            if counter > ctx.version.get(&replica) {
                ctx.version.dots.insert(replica, counter);
            }
        }
        ctx.cloud
            .extend(cloud.into_iter().filter(|d| d.counter > 0));
        ctx.compact();
        ctx
    }

    /// Whether the context has seen `d`.
    pub fn contains(&self, d: &Dot) -> bool {
        d.counter <= self.version.get(&d.actor) || self.cloud.contains(d)
    }

    /// The highest counter of `replica` this context has seen.
    pub fn max_counter(&self, replica: ReplicaId) -> u64 {
        let compact = self.version.get(&replica);
        let cloud = self
            .cloud
            .range(dot(replica, 0)..=dot(replica, u64::MAX))
            .next_back()
            .map_or(0, |d| d.counter);
        compact.max(cloud)
    }

    /// The next dot of `replica`: one past everything seen of it.
    pub fn next_dot(&self, replica: ReplicaId) -> Dot {
        dot(replica, self.max_counter(replica).saturating_add(1))
    }

    /// Adds one dot.
    pub fn insert(&mut self, d: Dot) {
        if d.counter > 0 && !self.contains(&d) {
            self.cloud.insert(d);
            self.compact();
        }
    }

    /// Joins another context into this one; returns whether it grew.
    pub fn join(&mut self, other: &CausalContext) -> bool {
        let grows = other
            .version
            .dots
            .iter()
            .any(|(r, c)| *c > self.version.get(r))
            || other.cloud.iter().any(|d| !self.contains(d));
        if !grows {
            return false;
        }
        if !other.version.is_empty() {
            self.version.merge(other.version.clone());
        }
        self.cloud.extend(other.cloud.iter().cloned());
        self.compact();
        true
    }

    /// Whether the context has seen nothing.
    pub fn is_empty(&self) -> bool {
        self.version.is_empty() && self.cloud.is_empty()
    }

    /// The compact part: `(replica, counter)` meaning every dot up to `counter`.
    pub fn version(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.version.dots.iter().map(|(r, c)| (*r, *c))
    }

    /// The dots beyond the compact part.
    pub fn cloud(&self) -> impl Iterator<Item = &Dot> + '_ {
        self.cloud.iter()
    }

    /// Drops the cloud's dots the vector covers and folds in those that extend it, replica by
    /// replica, stopping at each replica's first gap: what lies beyond a gap is not visited, so
    /// joining a one-dot delta into a context whose cloud holds many dots costs a few lookups,
    /// not a rebuild of the cloud (a buffer of deltas joins hundreds in a row).
    fn compact(&mut self) {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut next = self.cloud.first().map(|d| d.actor);
        while let Some(replica) = next {
            let had = self.version.get(&replica);
            let mut v = had;
            while let Some(d) = self
                .cloud
                .range(dot(replica, 0)..=dot(replica, u64::MAX))
                .next()
                .cloned()
            {
                match v.checked_add(1) {
                    Some(n) if d.counter > n => break,
                    Some(n) if d.counter == n => v = n,
                    _ => {}
                }
                self.cloud.remove(&d);
            }
            if v > had {
                self.version.dots.insert(replica, v);
            }
            next = self
                .cloud
                .range((Excluded(dot(replica, u64::MAX)), Unbounded))
                .next()
                .map(|d| d.actor);
        }
    }
}

/// The context of a delta that removes `covered`: those dots, plus a fresh dot of `replica` for
/// the removal itself. Every change mints a dot, so the context of a value names every change
/// it reflects (two replicas that applied the same changes, in any order, have equal contexts
/// and equal values). A context is not a digest of the value, though: a replica that missed a
/// delta superseded by a later one it did receive has the same context with different
/// contents, which is why anti-entropy compares content digests.
pub fn removal_context(
    ctx: &CausalContext,
    replica: ReplicaId,
    covered: impl IntoIterator<Item = Dot>,
) -> CausalContext {
    CausalContext::from_parts([], covered.into_iter().chain([ctx.next_dot(replica)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_collapses_as_gaps_fill() {
        let mut ctx = CausalContext::new();
        ctx.insert(dot(1, 3));
        ctx.insert(dot(1, 2));
        assert!(ctx.contains(&dot(1, 3)));
        assert!(!ctx.contains(&dot(1, 1)));
        assert_eq!(ctx.max_counter(1), 3);
        ctx.insert(dot(1, 1));
        assert_eq!(ctx.cloud().count(), 0);
        assert_eq!(ctx.version().collect::<Vec<_>>(), vec![(1, 3)]);
        assert_eq!(ctx.next_dot(1), dot(1, 4));
        assert_eq!(ctx.next_dot(2), dot(2, 1));
    }

    #[test]
    fn join_is_order_independent() {
        let a = CausalContext::from_parts([(1, 2)], [dot(2, 5)]);
        let b = CausalContext::from_parts([(2, 4)], [dot(1, 4)]);
        let mut ab = a.clone();
        ab.join(&b);
        let mut ba = b.clone();
        ba.join(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.version().collect::<Vec<_>>(), vec![(1, 2), (2, 5)]);
        assert_eq!(ab.cloud().cloned().collect::<Vec<_>>(), vec![dot(1, 4)]);
    }

    /// The dots a context has seen, listed one by one.
    fn seen(ctx: &CausalContext) -> BTreeSet<Dot> {
        ctx.version()
            .flat_map(|(r, c)| (1..=c).map(move |n| dot(r, n)))
            .chain(ctx.cloud().cloned())
            .collect()
    }

    proptest::proptest! {
        /// Joining contexts one after another (a buffer of deltas) sees exactly the union of
        /// their dots, and stays compact: no cloud dot is covered by the vector or follows it.
        #[test]
        fn joins_see_the_union_and_stay_compact(
            parts in proptest::collection::vec(
                (
                    proptest::collection::vec((0u64..3, 0u64..6), 0..3),
                    proptest::collection::vec((0u64..3, 0u64..12), 0..6),
                ),
                1..12,
            )
        ) {
            let mut acc = CausalContext::new();
            let mut union = BTreeSet::new();
            for (version, cloud) in parts {
                let ctx = CausalContext::from_parts(
                    version,
                    cloud.into_iter().map(|(r, c)| dot(r, c)),
                );
                union.extend(seen(&ctx));
                acc.join(&ctx);
                proptest::prop_assert_eq!(&seen(&acc), &union);
                for d in acc.cloud() {
                    proptest::prop_assert!(d.counter > acc.version.get(&d.actor) + 1);
                }
            }
        }
    }
}
