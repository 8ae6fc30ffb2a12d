//! Applying a user function's `CrdtDelta` as an operation of this replica.
//!
//! A user function reports its change as a CloudState delta relative to its plain value. Here
//! that delta becomes operations on the replicated CRDT performed by this replica (fresh dots,
//! this replica's counter entry, an LWW write with the requested clock, ...), so that two nodes
//! creating or changing the same entity concurrently merge instead of overwriting each other.
//! The result is the delta to replicate. Nothing here does IO or reads the clock: the caller
//! passes the time.
//!
//! Errors (a delta of the wrong type, a negative GCounter increment, a Flag switched off, an
//! empty delta, ...) leave the value unchanged: leaf types are validated before anything is
//! applied, and an ORMap delta is applied to a scratch copy of the keys it touches and only then
//! joined into the value.

use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtClock, CrdtDelta, OrMapDelta};

use crate::causal::{accumulate, join_in_place, Causal};
use crate::context::{CausalContext, ReplicaId};
use crate::counter::{self, GCounterStore, PNCounterStore};
use crate::dotstore::DotStore;
use crate::element::Element;
use crate::error::{CrdtError, Result};
use crate::flag;
use crate::map::{self, MapKey, MapStore};
use crate::register::{self, Clock};
use crate::set::{self, GSetStore, ORSetStore};
use crate::user::delta_kind;
use crate::value::{CrdtKind, CrdtValue, Store};
use crate::vote;

/// Applies a user function's delta to `value` (absent: the entity has no value yet, and the
/// delta creates it) as an operation of `replica` at `now_ms` (milliseconds since the Unix
/// epoch, for LWW clocks). Returns the delta to replicate: `None` when nothing changed (for
/// example an LWW write that loses to the current timestamp). On error `value` is unchanged.
pub fn apply_user_delta(
    value: &mut Option<CrdtValue>,
    delta: &CrdtDelta,
    replica: ReplicaId,
    now_ms: i64,
) -> Result<Option<CrdtValue>> {
    let kind = delta_kind(delta)?;
    let op = Op { replica, now_ms };
    match value {
        None => {
            let mut fresh = CrdtValue::empty(kind);
            let d = op.apply(&mut fresh.store, &mut fresh.ctx, delta)?;
            *value = Some(fresh);
            // Creating the value is itself a change to replicate, even with nothing in it.
            Ok(Some(d.unwrap_or_else(|| CrdtValue::empty_delta(kind))))
        }
        Some(v) if v.kind() != kind => Err(CrdtError::WrongType {
            value: v.kind(),
            delta: kind,
        }),
        Some(v) => match (&v.store, &delta.delta) {
            (Store::ORMap(m), Some(Delta::Ormap(o))) => {
                let mut scratch = Store::ORMap(map_scratch(m, o));
                let mut ctx = v.ctx.clone();
                let d = op.apply(&mut scratch, &mut ctx, delta)?;
                if let Some(d) = &d {
                    v.join(d);
                }
                Ok(d)
            }
            _ => op.apply(&mut v.store, &mut v.ctx, delta),
        },
    }
}

fn map_scratch(m: &MapStore, o: &OrMapDelta) -> MapStore {
    let keys: Vec<Element> = o
        .removed
        .iter()
        .map(Element::from)
        .chain(
            o.updated
                .iter()
                .chain(&o.added)
                .filter_map(|e| e.key.as_ref().map(Element::from)),
        )
        .collect();
    map::scratch(m, o.cleared, keys.iter())
}

fn clock_of(clock: i32, custom: i64) -> Result<Clock> {
    Ok(match CrdtClock::try_from(clock) {
        Ok(CrdtClock::Default) => Clock::Default,
        Ok(CrdtClock::Reverse) => Clock::Reverse,
        Ok(CrdtClock::Custom) => Clock::Custom(custom),
        Ok(CrdtClock::CustomAutoIncrement) => Clock::CustomAutoIncrement(custom),
        Err(_) => return Err(CrdtError::UnknownClock(clock)),
    })
}

struct Op {
    replica: ReplicaId,
    now_ms: i64,
}

/// Joins a step's delta into the store it was computed from and into the accumulated delta.
fn step<S: DotStore>(
    store: &mut S,
    ctx: &mut CausalContext,
    acc: &mut Option<Causal<Store>>,
    d: Option<Causal<S>>,
    wrap: fn(S) -> Store,
) {
    if let Some(d) = d {
        join_in_place(store, ctx, false, &d);
        accumulate(acc, &d.map_store(wrap));
    }
}

impl Op {
    /// Applies `delta` to `store` (whose context is `ctx`), in place, returning the delta.
    fn apply(
        &self,
        store: &mut Store,
        ctx: &mut CausalContext,
        delta: &CrdtDelta,
    ) -> Result<Option<Causal<Store>>> {
        let kind = delta_kind(delta)?;
        if kind != store.kind() {
            return Err(CrdtError::WrongType {
                value: store.kind(),
                delta: kind,
            });
        }
        let r = self.replica;
        let mut acc = None;
        match (store, delta.delta.as_ref()) {
            (Store::GCounter(s), Some(Delta::Gcounter(g))) => {
                if i64::try_from(g.increment).is_err() {
                    return Err(CrdtError::NegativeIncrement(g.increment));
                }
                let d = counter::add(&s.0, ctx, r, g.increment, 0)?;
                step(
                    s,
                    ctx,
                    &mut acc,
                    d.map(|d| d.map_store(GCounterStore)),
                    Store::GCounter,
                );
            }
            (Store::PNCounter(s), Some(Delta::Pncounter(p))) => {
                let (inc, dec) = counter::split(p.change);
                let d = counter::add(&s.0, ctx, r, inc, dec)?;
                step(
                    s,
                    ctx,
                    &mut acc,
                    d.map(|d| d.map_store(PNCounterStore)),
                    Store::PNCounter,
                );
            }
            (Store::GSet(s), Some(Delta::Gset(g))) => {
                for e in &g.added {
                    let d = set::add(&s.0, ctx, r, &Element::from(e), true);
                    step(
                        s,
                        ctx,
                        &mut acc,
                        d.map(|d| d.map_store(GSetStore)),
                        Store::GSet,
                    );
                }
            }
            (Store::ORSet(s), Some(Delta::Orset(o))) => {
                if o.cleared {
                    let d = set::clear(&s.0, ctx, r);
                    step(
                        s,
                        ctx,
                        &mut acc,
                        d.map(|d| d.map_store(ORSetStore)),
                        Store::ORSet,
                    );
                }
                for e in &o.removed {
                    let d = set::remove(&s.0, ctx, r, &Element::from(e));
                    step(
                        s,
                        ctx,
                        &mut acc,
                        d.map(|d| d.map_store(ORSetStore)),
                        Store::ORSet,
                    );
                }
                for e in &o.added {
                    let d = set::add(&s.0, ctx, r, &Element::from(e), false);
                    step(
                        s,
                        ctx,
                        &mut acc,
                        d.map(|d| d.map_store(ORSetStore)),
                        Store::ORSet,
                    );
                }
            }
            (Store::LwwRegister(s), Some(Delta::Lwwregister(l))) => {
                let value = l.value.as_ref().ok_or(CrdtError::MissingRegisterValue)?;
                let clock = clock_of(l.clock, l.custom_clock_value)?;
                let d = register::set(s, ctx, r, &Element::from(value), clock, self.now_ms);
                step(s, ctx, &mut acc, d, Store::LwwRegister);
            }
            (Store::Flag(s), Some(Delta::Flag(f))) => {
                if f.value {
                    let d = flag::enable(s, ctx, r);
                    step(s, ctx, &mut acc, d, Store::Flag);
                } else if !s.is_bottom() {
                    return Err(CrdtError::FlagDisabled);
                }
            }
            (Store::Vote(s), Some(Delta::Vote(v))) => {
                let d = vote::set(s, ctx, r, v.self_vote);
                step(s, ctx, &mut acc, d, Store::Vote);
            }
            (Store::ORMap(m), Some(Delta::Ormap(o))) => {
                self.apply_map(m, ctx, o, &mut acc)?;
            }
            // the kinds matched above
            _ => {}
        }
        Ok(acc)
    }

    /// ORMap: clear, then removed, then updated (absent keys and other types ignored), then
    /// added (merged into a present key of the same type, else the key is created anew).
    fn apply_map(
        &self,
        m: &mut MapStore,
        ctx: &mut CausalContext,
        o: &OrMapDelta,
        acc: &mut Option<Causal<Store>>,
    ) -> Result<()> {
        if o.cleared {
            let d = map::clear(m, ctx, self.replica);
            step(m, ctx, acc, d, Store::ORMap);
        }
        for k in &o.removed {
            let d = map::remove_key(m, ctx, self.replica, &Element::from(k));
            step(m, ctx, acc, d, Store::ORMap);
        }
        for e in &o.updated {
            let key = Element::from(
                e.key
                    .as_ref()
                    .ok_or(CrdtError::IncompleteMapEntry("a key"))?,
            );
            let nested = e
                .delta
                .as_ref()
                .ok_or(CrdtError::IncompleteMapEntry("a delta"))?;
            let kind = delta_kind(nested)?;
            if map::visible(m, &key).is_some_and(|(k, _)| k.kind == kind) {
                self.apply_entry(m, ctx, key, kind, nested, acc)?;
            }
        }
        for e in &o.added {
            let key = Element::from(
                e.key
                    .as_ref()
                    .ok_or(CrdtError::IncompleteMapEntry("a key"))?,
            );
            let nested = e
                .delta
                .as_ref()
                .ok_or(CrdtError::IncompleteMapEntry("a delta"))?;
            let kind = delta_kind(nested)?;
            if map::visible(m, &key).is_none_or(|(k, _)| k.kind != kind) {
                let d = map::create(m, ctx, self.replica, &key, kind);
                step(m, ctx, acc, Some(d), Store::ORMap);
            }
            self.apply_entry(m, ctx, key, kind, nested, acc)?;
        }
        Ok(())
    }

    /// Applies a nested delta to the entry `(key, kind)`, which is present.
    fn apply_entry(
        &self,
        m: &mut MapStore,
        ctx: &mut CausalContext,
        key: Element,
        kind: CrdtKind,
        nested: &CrdtDelta,
        acc: &mut Option<Causal<Store>>,
    ) -> Result<()> {
        // Resolve a concurrent creation with another type in favour of this one.
        let d = map::remove_other_kinds(m, ctx, self.replica, &key, kind);
        step(m, ctx, acc, d, Store::ORMap);
        let mk = MapKey { key, kind };
        // An update re-asserts the key if a concurrent removal took its presence dot.
        if m.get(&mk).is_none_or(|e| e.presence.is_empty()) {
            let d = map::presence(ctx, self.replica, &mk.key, kind);
            step(m, ctx, acc, Some(d), Store::ORMap);
        }
        let Some(mut entry) = m.remove(&mk) else {
            return Ok(());
        };
        let result = self.apply(&mut entry.value, ctx, nested);
        m.insert(mk.clone(), entry);
        if let Some(nd) = result? {
            accumulate(acc, &map::lift(mk, nd).map_store(Store::ORMap));
        }
        Ok(())
    }
}
