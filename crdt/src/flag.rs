//! Flag: a boolean that can only be switched on (enable-wins).
//!
//! The store is the [`DotSet`] of the enables; the flag is on while it holds a dot. It can be
//! switched off only by removing its key from an ORMap.

use crate::causal::Causal;
use crate::context::{CausalContext, ReplicaId};
use crate::dotstore::{DotSet, DotStore};

/// The dots of the writes that enabled the flag.
pub type FlagStore = DotSet;

/// An enable-wins flag.
pub type Flag = Causal<FlagStore>;

/// The delta of `replica` enabling the flag; `None` if it is on.
pub(crate) fn enable(
    store: &FlagStore,
    ctx: &CausalContext,
    replica: ReplicaId,
) -> Option<Causal<FlagStore>> {
    if !store.is_bottom() {
        return None;
    }
    let z = ctx.next_dot(replica);
    Some(Causal::from_delta_parts(
        DotSet::One(z.clone()),
        CausalContext::from_parts([], [z]),
    ))
}

impl Flag {
    /// Whether the flag is on.
    pub fn value(&self) -> bool {
        !self.store.is_bottom()
    }

    /// The delta of `replica` enabling the flag; `None` if it is on.
    pub fn enable(&self, replica: ReplicaId) -> Option<Flag> {
        enable(&self.store, &self.ctx, replica)
    }
}
