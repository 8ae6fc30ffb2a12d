//! The user function's side of the CloudState protocol: plain values, applying deltas to them
//! as a support library does, and `diff`.
//!
//! A user function holds a plain value, not a CRDT. The entity runtime keeps a [`UserValue`]
//! per entity (the "user-function view", protocol spec §11.1) and tells the user function what
//! changed with [`diff`]; a value's first appearance is sent with [`initial_delta`]. This module
//! owns those conversions; it knows nothing of dots or replication.

use std::collections::{BTreeMap, BTreeSet};

use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, CrdtClock, CrdtDelta, FlagDelta, GCounterDelta, GSetDelta, LwwRegisterDelta,
    OrMapDelta, OrMapEntryDelta, OrSetDelta, PnCounterDelta, VoteDelta,
};

use crate::element::Element;
use crate::error::{CrdtError, Result};
use crate::value::CrdtKind;
use crate::vote::VoteTally;

/// A CRDT's value as a user function holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserValue {
    /// counter value
    GCounter(u64),
    /// counter value
    PNCounter(i64),
    /// elements
    GSet(BTreeSet<Element>),
    /// elements
    ORSet(BTreeSet<Element>),
    /// the value, if ever set
    LwwRegister(Option<Element>),
    /// on or off
    Flag(bool),
    /// key → nested value
    ORMap(BTreeMap<Element, UserValue>),
    /// the tally
    Vote(VoteTally),
}

/// Who sent a delta: CloudState vote deltas from the proxy are absolute, a user function's own
/// are relative (protocol spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// sent by the proxy (latticed) to the user function
    Proxy,
    /// sent by the user function in a state action
    UserFunction,
}

/// The type of a CloudState delta; an empty delta is an error.
pub fn delta_kind(delta: &CrdtDelta) -> Result<CrdtKind> {
    Ok(match delta.delta.as_ref().ok_or(CrdtError::EmptyDelta)? {
        Delta::Gcounter(_) => CrdtKind::GCounter,
        Delta::Pncounter(_) => CrdtKind::PNCounter,
        Delta::Gset(_) => CrdtKind::GSet,
        Delta::Orset(_) => CrdtKind::ORSet,
        Delta::Lwwregister(_) => CrdtKind::LwwRegister,
        Delta::Flag(_) => CrdtKind::Flag,
        Delta::Ormap(_) => CrdtKind::ORMap,
        Delta::Vote(_) => CrdtKind::Vote,
    })
}

fn anys<'a>(elements: impl IntoIterator<Item = &'a Element>) -> Vec<prost_types::Any> {
    elements.into_iter().map(Element::to_any).collect()
}

fn wrap(d: Delta) -> CrdtDelta {
    CrdtDelta { delta: Some(d) }
}

impl UserValue {
    /// The empty value of a type (a new Vote counts this replica alone).
    pub fn empty(kind: CrdtKind) -> UserValue {
        match kind {
            CrdtKind::GCounter => UserValue::GCounter(0),
            CrdtKind::PNCounter => UserValue::PNCounter(0),
            CrdtKind::GSet => UserValue::GSet(BTreeSet::new()),
            CrdtKind::ORSet => UserValue::ORSet(BTreeSet::new()),
            CrdtKind::LwwRegister => UserValue::LwwRegister(None),
            CrdtKind::Flag => UserValue::Flag(false),
            CrdtKind::ORMap => UserValue::ORMap(BTreeMap::new()),
            CrdtKind::Vote => UserValue::Vote(VoteTally {
                self_vote: false,
                votes_for: 0,
                total_voters: 1,
            }),
        }
    }

    /// Its type.
    pub fn kind(&self) -> CrdtKind {
        match self {
            UserValue::GCounter(_) => CrdtKind::GCounter,
            UserValue::PNCounter(_) => CrdtKind::PNCounter,
            UserValue::GSet(_) => CrdtKind::GSet,
            UserValue::ORSet(_) => CrdtKind::ORSet,
            UserValue::LwwRegister(_) => CrdtKind::LwwRegister,
            UserValue::Flag(_) => CrdtKind::Flag,
            UserValue::ORMap(_) => CrdtKind::ORMap,
            UserValue::Vote(_) => CrdtKind::Vote,
        }
    }

    /// The value a user function builds from a first delta (an `init` or a first `delta`).
    pub fn from_delta(delta: &CrdtDelta, origin: Origin) -> Result<UserValue> {
        let mut v = UserValue::empty(delta_kind(delta)?);
        v.apply(delta, origin)?;
        Ok(v)
    }

    /// Applies a delta as a CloudState support library does. On error the value is unchanged.
    pub fn apply(&mut self, delta: &CrdtDelta, origin: Origin) -> Result<()> {
        let kind = delta_kind(delta)?;
        if kind != self.kind() {
            return Err(CrdtError::WrongType {
                value: self.kind(),
                delta: kind,
            });
        }
        let Some(d) = delta.delta.as_ref() else {
            return Err(CrdtError::EmptyDelta);
        };
        match (self, d) {
            (UserValue::GCounter(v), Delta::Gcounter(g)) => {
                *v = v.checked_add(g.increment).ok_or(CrdtError::Overflow)?;
            }
            (UserValue::PNCounter(v), Delta::Pncounter(p)) => {
                *v = v.checked_add(p.change).ok_or(CrdtError::Overflow)?;
            }
            (UserValue::GSet(s), Delta::Gset(g)) => s.extend(g.added.iter().map(Element::from)),
            (UserValue::ORSet(s), Delta::Orset(o)) => {
                if o.cleared {
                    s.clear();
                }
                for e in &o.removed {
                    s.remove(&Element::from(e));
                }
                s.extend(o.added.iter().map(Element::from));
            }
            (UserValue::LwwRegister(v), Delta::Lwwregister(l)) => {
                *v = Some(Element::from(
                    l.value.as_ref().ok_or(CrdtError::MissingRegisterValue)?,
                ));
            }
            (UserValue::Flag(v), Delta::Flag(f)) => *v = *v || f.value,
            (UserValue::ORMap(m), Delta::Ormap(o)) => {
                // Work on a copy so that a bad nested delta leaves the map unchanged.
                let mut next = m.clone();
                apply_map(&mut next, o, origin)?;
                *m = next;
            }
            (UserValue::Vote(t), Delta::Vote(v)) => match origin {
                Origin::Proxy => {
                    *t = VoteTally {
                        self_vote: v.self_vote,
                        votes_for: u32::try_from(v.votes_for).unwrap_or(0),
                        total_voters: u32::try_from(v.total_voters).unwrap_or(0),
                    }
                }
                Origin::UserFunction => {
                    if v.self_vote != t.self_vote {
                        t.self_vote = v.self_vote;
                        t.votes_for = if v.self_vote {
                            t.votes_for.saturating_add(1)
                        } else {
                            t.votes_for.saturating_sub(1)
                        };
                    }
                }
            },
            // delta_kind matched the value's kind above
            _ => {}
        }
        Ok(())
    }
}

fn entry_parts(e: &OrMapEntryDelta) -> Result<(Element, &CrdtDelta)> {
    let key = e
        .key
        .as_ref()
        .ok_or(CrdtError::IncompleteMapEntry("a key"))?;
    let delta = e
        .delta
        .as_ref()
        .ok_or(CrdtError::IncompleteMapEntry("a delta"))?;
    Ok((Element::from(key), delta))
}

fn apply_map(m: &mut BTreeMap<Element, UserValue>, o: &OrMapDelta, origin: Origin) -> Result<()> {
    if o.cleared {
        m.clear();
    }
    for k in &o.removed {
        m.remove(&Element::from(k));
    }
    for e in &o.updated {
        let (key, delta) = entry_parts(e)?;
        if let Some(v) = m.get_mut(&key) {
            if v.kind() == delta_kind(delta)? {
                v.apply(delta, origin)?;
            }
        }
    }
    for e in &o.added {
        let (key, delta) = entry_parts(e)?;
        let kind = delta_kind(delta)?;
        match m.get_mut(&key) {
            Some(v) if v.kind() == kind => v.apply(delta, origin)?,
            _ => {
                m.insert(key, UserValue::from_delta(delta, origin)?);
            }
        }
    }
    Ok(())
}

/// The delta that builds `v` from the empty value (CloudState's "initial delta", sent in
/// `init` and for map entries that appear).
pub fn initial_delta(v: &UserValue) -> CrdtDelta {
    wrap(match v {
        UserValue::GCounter(n) => Delta::Gcounter(GCounterDelta { increment: *n }),
        UserValue::PNCounter(n) => Delta::Pncounter(PnCounterDelta { change: *n }),
        UserValue::GSet(s) => Delta::Gset(GSetDelta { added: anys(s) }),
        UserValue::ORSet(s) => Delta::Orset(OrSetDelta {
            cleared: false,
            removed: Vec::new(),
            added: anys(s),
        }),
        UserValue::LwwRegister(v) => Delta::Lwwregister(LwwRegisterDelta {
            value: v.as_ref().map(Element::to_any),
            clock: CrdtClock::Default as i32,
            custom_clock_value: 0,
        }),
        UserValue::Flag(b) => Delta::Flag(FlagDelta { value: *b }),
        UserValue::ORMap(m) => Delta::Ormap(OrMapDelta {
            cleared: false,
            removed: Vec::new(),
            updated: Vec::new(),
            added: m
                .iter()
                .map(|(k, v)| map_entry(k, initial_delta(v)))
                .collect(),
        }),
        UserValue::Vote(t) => Delta::Vote(vote_delta(t)),
    })
}

fn vote_delta(t: &VoteTally) -> VoteDelta {
    VoteDelta {
        self_vote: t.self_vote,
        votes_for: i32::try_from(t.votes_for).unwrap_or(i32::MAX),
        total_voters: i32::try_from(t.total_voters).unwrap_or(i32::MAX),
    }
}

fn map_entry(k: &Element, delta: CrdtDelta) -> OrMapEntryDelta {
    OrMapEntryDelta {
        key: Some(k.to_any()),
        delta: Some(delta),
    }
}

/// What a user function holding `old` must be sent to hold `new` (protocol spec §7.4); `None`
/// if they are equal. A change a user function cannot be told (a GCounter or GSet that shrank, a
/// Flag switched off, a change of type) is an error; inside an ORMap such an entry is sent as
/// removed and added again instead.
pub fn diff(old: &UserValue, new: &UserValue) -> Result<Option<CrdtDelta>> {
    diff_with(old, new, Whole::Yes)
}

/// Whether a diff compares whole values or parts of them (see [`crate::footprint`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Whole {
    /// whole values: an emptied set or map may be told as `cleared`
    Yes,
    /// parts: never `cleared`
    No,
}

pub(crate) fn diff_with(
    old: &UserValue,
    new: &UserValue,
    whole: Whole,
) -> Result<Option<CrdtDelta>> {
    if old == new {
        return Ok(None);
    }
    let d = match (old, new) {
        (UserValue::GCounter(a), UserValue::GCounter(b)) => {
            let increment = b
                .checked_sub(*a)
                .ok_or(CrdtError::ImpossibleChange("a GCounter decreased"))?;
            Delta::Gcounter(GCounterDelta { increment })
        }
        (UserValue::PNCounter(a), UserValue::PNCounter(b)) => Delta::Pncounter(PnCounterDelta {
            change: b.checked_sub(*a).ok_or(CrdtError::Overflow)?,
        }),
        (UserValue::GSet(a), UserValue::GSet(b)) => {
            if !a.is_subset(b) {
                return Err(CrdtError::ImpossibleChange("a GSet lost elements"));
            }
            Delta::Gset(GSetDelta {
                added: anys(b.difference(a)),
            })
        }
        (UserValue::ORSet(a), UserValue::ORSet(b)) => Delta::Orset(diff_orset(a, b, whole)),
        (UserValue::LwwRegister(_), UserValue::LwwRegister(b)) => {
            let value = b
                .as_ref()
                .ok_or(CrdtError::ImpossibleChange("an LWWRegister lost its value"))?;
            Delta::Lwwregister(LwwRegisterDelta {
                value: Some(value.to_any()),
                clock: CrdtClock::Default as i32,
                custom_clock_value: 0,
            })
        }
        (UserValue::Flag(_), UserValue::Flag(b)) => {
            if !*b {
                return Err(CrdtError::ImpossibleChange("a Flag was switched off"));
            }
            Delta::Flag(FlagDelta { value: true })
        }
        (UserValue::ORMap(a), UserValue::ORMap(b)) => Delta::Ormap(diff_ormap(a, b, whole)?),
        (UserValue::Vote(_), UserValue::Vote(b)) => Delta::Vote(vote_delta(b)),
        _ => return Err(CrdtError::ImpossibleChange("the value changed type")),
    };
    Ok(Some(wrap(d)))
}

fn diff_orset(a: &BTreeSet<Element>, b: &BTreeSet<Element>, whole: Whole) -> OrSetDelta {
    if whole == Whole::Yes && b.is_empty() {
        return OrSetDelta {
            cleared: true,
            removed: Vec::new(),
            added: Vec::new(),
        };
    }
    let removed: Vec<&Element> = a.difference(b).collect();
    let added: Vec<&Element> = b.difference(a).collect();
    if whole == Whole::Yes && removed.len() + added.len() > b.len() {
        OrSetDelta {
            cleared: true,
            removed: Vec::new(),
            added: anys(b),
        }
    } else {
        OrSetDelta {
            cleared: false,
            removed: anys(removed),
            added: anys(added),
        }
    }
}

fn diff_ormap(
    a: &BTreeMap<Element, UserValue>,
    b: &BTreeMap<Element, UserValue>,
    whole: Whole,
) -> Result<OrMapDelta> {
    let mut out = OrMapDelta::default();
    if whole == Whole::Yes && b.is_empty() {
        out.cleared = true;
        return Ok(out);
    }
    for (k, old) in a {
        match b.get(k) {
            None => out.removed.push(k.to_any()),
            Some(new) => match diff(old, new) {
                Ok(None) => {}
                Ok(Some(d)) => out.updated.push(map_entry(k, d)),
                // a type change, or a reset that shrank the value: remove and add again
                Err(CrdtError::ImpossibleChange(_)) => {
                    out.removed.push(k.to_any());
                    out.added.push(map_entry(k, initial_delta(new)));
                }
                Err(e) => return Err(e),
            },
        }
    }
    for (k, new) in b {
        if !a.contains_key(k) {
            out.added.push(map_entry(k, initial_delta(new)));
        }
    }
    Ok(out)
}
