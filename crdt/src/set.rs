//! GSet and ORSet: sets of [`Element`]s.
//!
//! Both are a [`DotMap`] from element to the [`DotSet`] of the adds that put it there. ORSet is
//! add-wins: an add mints a fresh dot (and covers the element's older ones), a remove covers the
//! element's dots, so an add concurrent with a remove survives. A GSet never removes; its dots
//! only matter when it is nested in an ORMap whose key is removed. `crdts::Orswot` keeps the same
//! information but its merge needs both full states; this representation joins a delta in
//! O(delta) (see [`crate::dotstore`]).

use crate::causal::Causal;
use crate::context::{removal_context, CausalContext, ReplicaId};
use crate::dotstore::{store_newtype, DotMap, DotSet, DotStore};
use crate::element::Element;

/// Element → the dots of the adds that put it in the set.
pub type ElementSet = DotMap<Element, DotSet>;

store_newtype!(
    /// The store of a [`GSet`].
    GSetStore(ElementSet)
);
store_newtype!(
    /// The store of an [`ORSet`].
    ORSetStore(ElementSet)
);

/// A grow-only set.
pub type GSet = Causal<GSetStore>;
/// An add-wins observed-remove set.
pub type ORSet = Causal<ORSetStore>;

/// The elements present (a delta's named-but-removed entries are skipped).
pub(crate) fn elements(set: &ElementSet) -> impl Iterator<Item = &Element> {
    set.iter().filter(|(_, d)| !d.is_empty()).map(|(e, _)| e)
}

pub(crate) fn contains(set: &ElementSet, e: &Element) -> bool {
    set.get(e).is_some_and(|d| !d.is_empty())
}

/// Adds `e` with a fresh dot, covering its older dots. With `only_if_absent`, an element already
/// present gives no delta (GSet).
pub(crate) fn add(
    set: &ElementSet,
    ctx: &CausalContext,
    replica: ReplicaId,
    e: &Element,
    only_if_absent: bool,
) -> Option<Causal<ElementSet>> {
    let existing = set.get(e);
    if only_if_absent && existing.is_some_and(|d| !d.is_empty()) {
        return None;
    }
    let z = ctx.next_dot(replica);
    let covered = existing.into_iter().flat_map(DotSet::iter).cloned();
    let delta_ctx = CausalContext::from_parts([], covered.chain([z.clone()]));
    let mut store = ElementSet::default();
    store.insert(e.clone(), DotSet::One(z));
    Some(Causal::from_delta_parts(store, delta_ctx))
}

/// Removes `e`; `None` if it is absent. Like every change, the removal mints a dot of its own
/// (so that two replicas that have seen the same dots hold the same value).
pub(crate) fn remove(
    set: &ElementSet,
    ctx: &CausalContext,
    replica: ReplicaId,
    e: &Element,
) -> Option<Causal<ElementSet>> {
    let dots = set.get(e).filter(|d| !d.is_empty())?;
    let mut store = ElementSet::default();
    store.insert(e.clone(), DotSet::Empty);
    let delta_ctx = removal_context(ctx, replica, dots.iter().cloned());
    Some(Causal::from_delta_parts(store, delta_ctx))
}

/// Removes everything; `None` if the set is empty.
pub(crate) fn clear(
    set: &ElementSet,
    ctx: &CausalContext,
    replica: ReplicaId,
) -> Option<Causal<ElementSet>> {
    if set.is_bottom() {
        return None;
    }
    let delta_ctx = removal_context(ctx, replica, set.dots());
    Some(Causal::from_delta_parts(set.skeleton(), delta_ctx))
}

impl GSet {
    /// The delta of `replica` adding `e`; `None` if `e` is present.
    pub fn add(&self, replica: ReplicaId, e: &Element) -> Option<GSet> {
        add(&self.store.0, &self.ctx, replica, e, true).map(|d| d.map_store(GSetStore))
    }
    /// Whether `e` is in the set.
    pub fn contains(&self, e: &Element) -> bool {
        contains(&self.store.0, e)
    }
    /// The elements, in (type URL, bytes) order.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        elements(&self.store.0)
    }
    /// How many elements.
    pub fn len(&self) -> usize {
        self.elements().count()
    }
}

impl ORSet {
    /// The delta of `replica` adding `e` (a fresh dot, even if `e` is present: add wins over
    /// removes concurrent with it).
    pub fn add(&self, replica: ReplicaId, e: &Element) -> ORSet {
        let d = add(&self.store.0, &self.ctx, replica, e, false);
        // `add` with only_if_absent = false always yields a delta.
        d.map_or_else(ORSet::new, |d| d.map_store(ORSetStore))
    }
    /// The delta of `replica` removing `e`; `None` if absent.
    pub fn remove(&self, replica: ReplicaId, e: &Element) -> Option<ORSet> {
        remove(&self.store.0, &self.ctx, replica, e).map(|d| d.map_store(ORSetStore))
    }
    /// The delta of `replica` removing every element; `None` if empty.
    pub fn clear(&self, replica: ReplicaId) -> Option<ORSet> {
        clear(&self.store.0, &self.ctx, replica).map(|d| d.map_store(ORSetStore))
    }
    /// Whether `e` is in the set.
    pub fn contains(&self, e: &Element) -> bool {
        contains(&self.store.0, e)
    }
    /// The elements, in (type URL, bytes) order.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        elements(&self.store.0)
    }
    /// How many elements.
    pub fn len(&self) -> usize {
        if self.delta {
            self.elements().count()
        } else {
            self.store.0.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Element {
        Element::string(x)
    }

    #[test]
    fn add_wins_over_concurrent_remove() {
        let mut a = ORSet::new();
        let d = a.add(1, &s("x"));
        a.join(&d);
        let mut b = a.clone();
        let rm = a.remove(1, &s("x")).expect("present");
        a.join(&rm);
        let re_add = b.add(2, &s("x"));
        b.join(&re_add);
        a.join(&b);
        b.join(&rm);
        assert!(a.contains(&s("x")));
        assert_eq!(a, b);
    }

    #[test]
    fn remove_then_add_in_one_batch() {
        let mut a = ORSet::new();
        let d = a.add(1, &s("x"));
        a.join(&d);
        let stale = a.clone();
        let rm = a.remove(1, &s("x")).expect("present");
        a.join(&rm);
        let add_y = a.add(1, &s("y"));
        a.join(&add_y);
        let batch = rm.joined(&add_y);
        let mut c = stale;
        c.join(&batch);
        assert_eq!(c.elements().collect::<Vec<_>>(), vec![&s("y")]);
        assert_eq!(c, a);
    }

    #[test]
    fn gset_add_of_present_element_is_no_delta() {
        let mut g = GSet::new();
        let d = g.add(1, &s("a")).expect("absent");
        g.join(&d);
        assert!(g.add(2, &s("a")).is_none());
        assert_eq!(g.len(), 1);
    }
}
