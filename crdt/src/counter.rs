//! GCounter and PNCounter.
//!
//! Each replica's contribution is one entry `(increments, decrements)` of a [`DotFun`], tagged
//! with the dot of its latest write; a write replaces the replica's entry and its delta covers
//! the old dot. A counter nested in an ORMap is thereby reset when its key is removed (a
//! concurrent update keeps the updating replica's whole contribution). The `crdts` crate's
//! counters are plain version vectors, which cannot be reset inside a map; hence this shape.

use crate::causal::Causal;
use crate::context::{CausalContext, ReplicaId};
use crate::dotstore::store_newtype;
use crate::dotstore::DotFun;
use crate::error::{CrdtError, Result};

/// Per replica: (increments, decrements), tagged with the dot of the replica's latest write.
pub type CounterStore = DotFun<(u64, u64)>;

store_newtype!(
    /// The store of a [`GCounter`].
    GCounterStore(CounterStore)
);
store_newtype!(
    /// The store of a [`PNCounter`].
    PNCounterStore(CounterStore)
);

/// A grow-only counter.
pub type GCounter = Causal<GCounterStore>;
/// A counter that goes up and down.
pub type PNCounter = Causal<PNCounterStore>;

/// Sum of increments and of decrements over every replica's latest entry.
pub(crate) fn totals(store: &CounterStore) -> (u128, u128) {
    store
        .latest_per_replica()
        .fold((0u128, 0u128), |(i, d), (_, (inc, dec))| {
            (i + u128::from(*inc), d + u128::from(*dec))
        })
}

/// The delta adding `inc` increments and `dec` decrements for `replica`; `None` when both are 0.
pub(crate) fn add(
    store: &CounterStore,
    ctx: &CausalContext,
    replica: ReplicaId,
    inc: u64,
    dec: u64,
) -> Result<Option<Causal<CounterStore>>> {
    if inc == 0 && dec == 0 {
        return Ok(None);
    }
    let (old_dot, (i, d)) = match store.latest_of(replica) {
        Some((dot, v)) => (Some(dot.clone()), *v),
        None => (None, (0, 0)),
    };
    let new = (
        i.checked_add(inc).ok_or(CrdtError::Overflow)?,
        d.checked_add(dec).ok_or(CrdtError::Overflow)?,
    );
    let z = ctx.next_dot(replica);
    let mut delta_store = CounterStore::default();
    delta_store.insert(z.clone(), new);
    let delta_ctx = CausalContext::from_parts([], old_dot.into_iter().chain([z]));
    Ok(Some(Causal::from_delta_parts(delta_store, delta_ctx)))
}

impl GCounter {
    /// The counter's value (saturating at `u64::MAX`).
    pub fn value(&self) -> u64 {
        u64::try_from(totals(&self.store.0).0).unwrap_or(u64::MAX)
    }

    /// The delta of `replica` adding `n`; `None` for 0.
    pub fn increment(&self, replica: ReplicaId, n: u64) -> Result<Option<GCounter>> {
        Ok(add(&self.store.0, &self.ctx, replica, n, 0)?.map(|d| d.map_store(GCounterStore)))
    }
}

impl PNCounter {
    /// The counter's value (clamped to the `i64` range).
    pub fn value(&self) -> i64 {
        let (i, d) = totals(&self.store.0);
        clamp_i64(i as i128 - d as i128)
    }

    /// The delta of `replica` adding `by` (negative to decrement); `None` for 0.
    pub fn change(&self, replica: ReplicaId, by: i64) -> Result<Option<PNCounter>> {
        let (inc, dec) = split(by);
        Ok(add(&self.store.0, &self.ctx, replica, inc, dec)?.map(|d| d.map_store(PNCounterStore)))
    }
}

/// A signed change as (increments, decrements).
pub(crate) fn split(by: i64) -> (u64, u64) {
    if by >= 0 {
        (by.unsigned_abs(), 0)
    } else {
        (0, by.unsigned_abs())
    }
}

pub(crate) fn clamp_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increments_from_two_replicas_add_up() -> Result<()> {
        let mut a = GCounter::new();
        let d1 = a.increment(1, 5)?.ok_or(CrdtError::Overflow)?;
        a.join(&d1);
        let mut b = GCounter::new();
        let d2 = b.increment(2, 7)?.ok_or(CrdtError::Overflow)?;
        b.join(&d2);
        a.join(&b);
        b.join(&d1);
        assert_eq!(a.value(), 12);
        assert_eq!(a, b);
        assert_eq!(a.increment(1, 0)?, None);
        Ok(())
    }

    #[test]
    fn pncounter_goes_both_ways() -> Result<()> {
        let mut c = PNCounter::new();
        for by in [1, -2, 3] {
            if let Some(d) = c.change(9, by)? {
                c.join(&d);
            }
        }
        assert_eq!(c.value(), 2);
        Ok(())
    }

    #[test]
    fn overflow_is_an_error() -> Result<()> {
        let mut c = GCounter::new();
        let d = c.increment(1, u64::MAX)?.ok_or(CrdtError::Overflow)?;
        c.join(&d);
        assert_eq!(c.increment(1, 1), Err(CrdtError::Overflow));
        Ok(())
    }
}
