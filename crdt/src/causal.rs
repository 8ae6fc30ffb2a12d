//! `Causal<S>`: a dot store with its causal context; every CRDT value and delta is one.
//!
//! This module owns the top-level join (choosing the scope from whether the other side is a
//! delta) and the in-place join used while applying several operations in a row. The eight
//! types are aliases of `Causal<SomeStore>`; [`crate::CrdtValue`] is `Causal<Store>`, the
//! dynamically typed form the daemon keeps.

use crate::context::CausalContext;
use crate::dotstore::{DotStore, JoinArgs, Scope};

/// A dot store and the dots it has seen: a CRDT value, or a delta of one.
#[derive(Clone, Debug, Default, PartialEq, Hash)]
pub struct Causal<S> {
    pub(crate) store: S,
    pub(crate) ctx: CausalContext,
    pub(crate) delta: bool,
}

impl<S: DotStore> Causal<S> {
    /// The empty value (a full state).
    pub fn new() -> Self {
        Causal {
            store: S::default(),
            ctx: CausalContext::new(),
            delta: false,
        }
    }

    /// A delta from its parts. The caller promises that every dot of `ctx` belongs to an entry
    /// `store` names (see [`crate::dotstore`]).
    pub fn from_delta_parts(store: S, ctx: CausalContext) -> Self {
        Causal {
            store,
            ctx,
            delta: true,
        }
    }

    /// A full state from its parts. Entries holding nothing are dropped.
    pub fn from_state_parts(store: S, ctx: CausalContext) -> Self {
        let mut value = Causal::new();
        let other = Causal {
            store,
            ctx,
            delta: false,
        };
        value.join(&other);
        value
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The causal context.
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }

    /// Whether this is a delta (as opposed to a full state).
    pub fn is_delta(&self) -> bool {
        self.delta
    }

    /// Whether it holds nothing and has seen nothing.
    pub fn is_empty(&self) -> bool {
        self.store.is_bottom() && self.ctx.is_empty()
    }

    /// Joins `other` into `self`; returns whether `self` changed. Costs O(size of `other`)
    /// when `other` is a delta.
    pub fn join(&mut self, other: &Self) -> bool {
        let changed = join_in_place(&mut self.store, &mut self.ctx, self.delta, other);
        let was_delta = self.delta;
        self.delta = self.delta && other.delta;
        changed || was_delta != self.delta
    }

    /// `self ⊔ other`, by value.
    pub fn joined(mut self, other: &Self) -> Self {
        self.join(other);
        self
    }

    /// The value this delta would produce from the empty value (a full state; a state is
    /// returned as is).
    pub fn into_state(self) -> Self {
        if !self.delta {
            return self;
        }
        let mut state = Causal::new();
        state.join(&self);
        state
    }

    /// Maps the store, keeping the context.
    pub(crate) fn map_store<T>(self, f: impl FnOnce(S) -> T) -> Causal<T> {
        Causal {
            store: f(self.store),
            ctx: self.ctx,
            delta: self.delta,
        }
    }
}

/// Joins `other` into the store `store` whose context is `ctx` (itself a delta if
/// `self_is_delta`), updating both.
pub(crate) fn join_in_place<S: DotStore>(
    store: &mut S,
    ctx: &mut CausalContext,
    self_is_delta: bool,
    other: &Causal<S>,
) -> bool {
    let args = JoinArgs {
        self_ctx: ctx,
        other_ctx: &other.ctx,
        scope: if other.delta {
            Scope::Delta
        } else {
            Scope::Full
        },
        keep_bottom: self_is_delta && other.delta,
    };
    let a = store.join(&other.store, &args);
    let b = ctx.join(&other.ctx);
    a || b
}

/// Joins an optional delta into an accumulator of deltas.
pub(crate) fn accumulate<S: DotStore>(acc: &mut Option<Causal<S>>, d: &Causal<S>) {
    match acc {
        Some(a) => {
            a.join(d);
        }
        None => *acc = Some(d.clone()),
    }
}
