//! Footprints: the part of a value a delta can change, so that a change is told to a user
//! function in O(delta), not O(value).
//!
//! A delta names what it touches (see [`crate::dotstore`]): the elements of a set, the keys of
//! a map. Joining it can change the value only there. [`Footprint::of`] collects those names;
//! [`CrdtValue::part`] and [`UserValue::part`] cut a value down to them,
//! [`UserValue::replace_part`] puts a part back, and [`update_part`] does both and tells the
//! change exactly as a whole-value `diff` would. Counters, registers, flags and votes are small
//! (their size is the number of replicas at most): their footprint is the whole value. So is a
//! full state's, and a footprint that grows past [`MAX_ELEMENTS`] names.
//!
//! This module owns those operations and nothing else; it does no IO.

use std::collections::BTreeSet;

use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, OrMapDelta, OrSetDelta};

use crate::context::CausalContext;
use crate::element::Element;
use crate::error::Result;
use crate::map;
use crate::set::{ElementSet, GSetStore, ORSetStore};
use crate::user::{diff_with, UserValue, Whole};
use crate::value::{CrdtValue, Store};

/// Past this many names a footprint is the whole value: comparing it whole is then about as
/// cheap, and a footprint stays small.
pub const MAX_ELEMENTS: usize = 256;

/// The part of a value that changes may have touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Footprint {
    /// anything
    All,
    /// only these set elements or map keys (for a GSet, ORSet or ORMap)
    Elements(BTreeSet<Element>),
}

impl Footprint {
    /// Nothing at all (the identity of [`Footprint::union`]).
    pub fn none() -> Footprint {
        Footprint::Elements(BTreeSet::new())
    }

    /// What joining `delta` can change: the entries it names when it is a delta of a set or a
    /// map, the whole value otherwise.
    pub fn of(delta: &CrdtValue) -> Footprint {
        if !delta.is_delta() {
            return Footprint::All;
        }
        let names: BTreeSet<Element> = match delta.store() {
            Store::GSet(s) => s.0.iter().map(|(e, _)| e.clone()).collect(),
            Store::ORSet(s) => s.0.iter().map(|(e, _)| e.clone()).collect(),
            Store::ORMap(s) => s.iter().map(|(k, _)| k.key.clone()).collect(),
            _ => return Footprint::All,
        };
        Footprint::Elements(names).capped()
    }

    /// Whether it covers the whole value.
    pub fn is_all(&self) -> bool {
        matches!(self, Footprint::All)
    }

    /// Grows to cover `other` too.
    pub fn union(&mut self, other: &Footprint) {
        match (&mut *self, other) {
            (Footprint::All, _) => {}
            (_, Footprint::All) => *self = Footprint::All,
            (Footprint::Elements(a), Footprint::Elements(b)) => {
                a.extend(b.iter().cloned());
                if a.len() > MAX_ELEMENTS {
                    *self = Footprint::All;
                }
            }
        }
    }

    fn capped(self) -> Footprint {
        match self {
            Footprint::Elements(e) if e.len() > MAX_ELEMENTS => Footprint::All,
            f => f,
        }
    }
}

fn set_part(set: &ElementSet, names: &BTreeSet<Element>) -> ElementSet {
    let mut out = ElementSet::default();
    for e in names {
        if let Some(d) = set.get(e) {
            out.insert(e.clone(), d.clone());
        }
    }
    out
}

impl CrdtValue {
    /// The part of this value within `fp`, as a value that reads (see [`CrdtValue::read`]) as
    /// that part of this one's reading. Costs O(size of the part).
    pub fn part(&self, fp: &Footprint) -> CrdtValue {
        let Footprint::Elements(names) = fp else {
            return self.clone();
        };
        let store = match self.store() {
            Store::GSet(s) => Store::GSet(GSetStore(set_part(&s.0, names))),
            Store::ORSet(s) => Store::ORSet(ORSetStore(set_part(&s.0, names))),
            Store::ORMap(s) => Store::ORMap(map::scratch(s, false, names.iter())),
            _ => return self.clone(),
        };
        // reading needs no context
        CrdtValue::from_delta_parts(store, CausalContext::new())
    }
}

impl UserValue {
    /// The part of this value within `fp`.
    pub fn part(&self, fp: &Footprint) -> UserValue {
        let Footprint::Elements(names) = fp else {
            return self.clone();
        };
        match self {
            UserValue::GSet(s) => {
                UserValue::GSet(names.iter().filter(|e| s.contains(*e)).cloned().collect())
            }
            UserValue::ORSet(s) => {
                UserValue::ORSet(names.iter().filter(|e| s.contains(*e)).cloned().collect())
            }
            UserValue::ORMap(m) => UserValue::ORMap(
                names
                    .iter()
                    .filter_map(|k| m.get(k).map(|v| (k.clone(), v.clone())))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Replaces the part of this value within `fp` by `part` (a value of the same type, as
    /// [`UserValue::part`] or [`CrdtValue::part`] give). A part of another type replaces the
    /// whole value.
    pub fn replace_part(&mut self, fp: &Footprint, part: UserValue) {
        let Footprint::Elements(names) = fp else {
            *self = part;
            return;
        };
        match (&mut *self, part) {
            (UserValue::GSet(s), UserValue::GSet(p))
            | (UserValue::ORSet(s), UserValue::ORSet(p)) => {
                for e in names {
                    s.remove(e);
                }
                s.extend(p);
            }
            (UserValue::ORMap(m), UserValue::ORMap(p)) => {
                for k in names {
                    m.remove(k);
                }
                m.extend(p);
            }
            (me, part) => *me = part,
        }
    }
}

/// Replaces the part of `view` within `fp` by `part` (the replicated value's part there) and
/// returns what a user function holding the old view must be sent: exactly
/// `diff(old view, new view)` (protocol spec §7.4, conformance 50 and 53), in O(size of the
/// part) — plus O(size of the value) only when the answer is itself that large (a set sent as
/// `cleared` and all its elements). The view is replaced even when the change cannot be told
/// (the error `diff` gives).
pub fn update_part(
    view: &mut UserValue,
    fp: &Footprint,
    part: UserValue,
) -> Result<Option<CrdtDelta>> {
    if fp.is_all() {
        let d = crate::diff(view, &part);
        *view = part;
        return d;
    }
    let d = diff_with(&view.part(fp), &part, Whole::No);
    view.replace_part(fp, part);
    let Some(mut d) = d? else { return Ok(None) };
    // the rules that look at the whole new value
    match (&*view, d.delta.as_mut()) {
        (UserValue::ORSet(all), Some(Delta::Orset(s))) => {
            if all.is_empty() {
                *s = OrSetDelta {
                    cleared: true,
                    ..Default::default()
                };
            } else if s.removed.len() + s.added.len() > all.len() {
                *s = OrSetDelta {
                    cleared: true,
                    removed: Vec::new(),
                    added: all.iter().map(Element::to_any).collect(),
                };
            }
        }
        (UserValue::ORMap(all), Some(Delta::Ormap(m))) if all.is_empty() => {
            *m = OrMapDelta {
                cleared: true,
                ..Default::default()
            };
        }
        _ => {}
    }
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CrdtKind, ReplicaId, Voters};

    const R: ReplicaId = 7;

    fn el(s: &str) -> Element {
        Element::string(s)
    }

    #[test]
    fn a_set_delta_names_its_elements_and_a_state_is_all() {
        let set = crate::ORSet::new();
        let d: CrdtValue = set.add(R, &el("a")).into();
        assert_eq!(
            Footprint::of(&d),
            Footprint::Elements([el("a")].into_iter().collect())
        );
        assert_eq!(Footprint::of(&d.clone().into_state()), Footprint::All);
        let counter: CrdtValue = CrdtValue::empty_delta(CrdtKind::GCounter);
        assert_eq!(Footprint::of(&counter), Footprint::All);
    }

    #[test]
    fn a_union_past_the_cap_is_all() {
        let mut fp = Footprint::none();
        for i in 0..=MAX_ELEMENTS {
            fp.union(&Footprint::Elements(
                [el(&i.to_string())].into_iter().collect(),
            ));
        }
        assert!(fp.is_all());
    }

    #[test]
    fn a_part_change_is_told_as_the_whole_value_diff_tells_it() {
        let fp = Footprint::Elements([el("a")].into_iter().collect());
        // one element of two removed: `removed [a]`
        let old = UserValue::ORSet([el("a"), el("b")].into_iter().collect());
        let mut view = old.clone();
        let d = update_part(&mut view, &fp, UserValue::ORSet(BTreeSet::new())).expect("diff");
        let new = UserValue::ORSet([el("b")].into_iter().collect());
        assert_eq!(d, crate::diff(&old, &new).expect("diff"));
        assert_eq!(view, new);
        // the last element removed: `cleared` only
        let mut view = UserValue::ORSet([el("a")].into_iter().collect());
        let d = update_part(&mut view, &fp, UserValue::ORSet(BTreeSet::new())).expect("diff");
        let cleared = OrSetDelta {
            cleared: true,
            ..Default::default()
        };
        assert_eq!(d.and_then(|d| d.delta), Some(Delta::Orset(cleared)));
    }

    #[test]
    fn a_value_part_reads_as_the_part_of_its_reading() {
        let mut set = crate::ORSet::new();
        for s in ["a", "b", "c"] {
            let d = set.add(R, &el(s));
            set.join(&d);
        }
        let value: CrdtValue = set.into();
        let fp = Footprint::Elements([el("b"), el("z")].into_iter().collect());
        let voters = Voters::default();
        assert_eq!(value.part(&fp).read(&voters), value.read(&voters).part(&fp));
    }
}
