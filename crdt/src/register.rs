//! LWWRegister: a last-writer-wins register of one [`Element`].
//!
//! Writes are entries of a [`DotFun`] `dot → (clock, value)`; a write covers every entry it has
//! seen, so concurrent writes coexist until the next write and the value read is the one with the
//! greatest timestamp `(clock, writing replica)`: ties cannot diverge. The four CloudState clocks
//! (protocol spec §7.3) pick the clock of a write; a write whose timestamp is not greater than
//! the current one (REVERSE, or a lower CUSTOM value) does not take effect.

use crate::causal::Causal;
use crate::context::{CausalContext, Dot, ReplicaId};
use crate::dotstore::{DotFun, DotStore};
use crate::element::Element;

/// dot → (clock, value); the timestamp of an entry is (clock, dot's replica).
pub type RegisterStore = DotFun<(i64, Element)>;

/// A last-writer-wins register.
pub type LwwRegister = Causal<RegisterStore>;

/// How a write's clock is chosen (CloudState `CrdtClock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// `max(now_ms, current + 1)`: the write wins.
    Default,
    /// `min(-now_ms, current - 1)`: first write wins; a write over a value loses.
    Reverse,
    /// The given clock; loses if not above the current one.
    Custom(i64),
    /// The given clock, bumped to `current + 1` if not above the current one: the write wins.
    CustomAutoIncrement(i64),
}

/// The timestamp of a write: (clock, replica).
pub type Timestamp = (i64, ReplicaId);

/// The winning entry: its timestamp and value.
pub(crate) fn current(store: &RegisterStore) -> Option<(Timestamp, &Element)> {
    store
        .iter()
        .map(|(d, (clock, v))| ((*clock, d.actor), d.counter, v))
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
        .map(|(ts, _, v)| (ts, v))
}

/// The delta of `replica` writing `value` with `clock` at `now_ms`; `None` if the write loses.
pub(crate) fn set(
    store: &RegisterStore,
    ctx: &CausalContext,
    replica: ReplicaId,
    value: &Element,
    clock: Clock,
    now_ms: i64,
) -> Option<Causal<RegisterStore>> {
    let cur = current(store).map(|(ts, _)| ts);
    let cur_clock = cur.map(|(c, _)| c);
    let t = match clock {
        Clock::Default => cur_clock.map_or(now_ms, |c| now_ms.max(c.saturating_add(1))),
        Clock::Reverse => {
            let rev = now_ms.saturating_neg();
            cur_clock.map_or(rev, |c| rev.min(c.saturating_sub(1)))
        }
        Clock::Custom(v) => v,
        Clock::CustomAutoIncrement(v) => {
            cur_clock.map_or(v, |c| if v <= c { c.saturating_add(1) } else { v })
        }
    };
    if let Some(cur) = cur {
        if (t, replica) <= cur {
            return None;
        }
    }
    let z = ctx.next_dot(replica);
    let covered: Vec<Dot> = store.dots();
    let mut delta_store = RegisterStore::default();
    delta_store.insert(z.clone(), (t, value.clone()));
    Some(Causal::from_delta_parts(
        delta_store,
        CausalContext::from_parts([], covered.into_iter().chain([z])),
    ))
}

impl LwwRegister {
    /// The current value, if ever written.
    pub fn value(&self) -> Option<&Element> {
        current(&self.store).map(|(_, v)| v)
    }

    /// The timestamp of the current value.
    pub fn timestamp(&self) -> Option<Timestamp> {
        current(&self.store).map(|(ts, _)| ts)
    }

    /// The delta of `replica` writing `value`; `None` if the write loses (see [`Clock`]).
    pub fn set(
        &self,
        replica: ReplicaId,
        value: &Element,
        clock: Clock,
        now_ms: i64,
    ) -> Option<LwwRegister> {
        set(&self.store, &self.ctx, replica, value, clock, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(r: &mut LwwRegister, replica: u64, v: &str, clock: Clock, now: i64) -> bool {
        match r.set(replica, &Element::string(v), clock, now) {
            Some(d) => {
                r.join(&d);
                true
            }
            None => false,
        }
    }

    #[test]
    fn clocks_behave_as_cloudstate_says() {
        let mut r = LwwRegister::new();
        assert!(write(&mut r, 1, "one", Clock::Default, 1000));
        // REVERSE over a value loses
        assert!(!write(&mut r, 1, "rev", Clock::Reverse, 2000));
        assert_eq!(r.value(), Some(&Element::string("one")));
        // DEFAULT with a clock behind wins anyway (current + 1)
        assert!(write(&mut r, 1, "two", Clock::Default, 10));
        assert_eq!(r.timestamp(), Some((1001, 1)));
        // CUSTOM lower loses, higher wins
        assert!(!write(&mut r, 1, "low", Clock::Custom(5), 0));
        assert!(write(&mut r, 1, "high", Clock::Custom(5000), 0));
        // CUSTOM_AUTO_INCREMENT lower still wins, bumped
        assert!(write(&mut r, 1, "auto", Clock::CustomAutoIncrement(3), 0));
        assert_eq!(r.timestamp(), Some((5001, 1)));
        assert_eq!(r.value(), Some(&Element::string("auto")));
    }

    #[test]
    fn reverse_on_empty_register_takes_effect_and_first_write_wins() {
        let mut a = LwwRegister::new();
        let mut b = LwwRegister::new();
        assert!(write(&mut a, 1, "first", Clock::Reverse, 100));
        assert!(write(&mut b, 2, "second", Clock::Reverse, 200));
        a.join(&b);
        assert_eq!(a.value(), Some(&Element::string("first")));
    }

    #[test]
    fn equal_clocks_break_ties_by_replica() {
        let mut a = LwwRegister::new();
        let mut b = LwwRegister::new();
        assert!(write(&mut a, 1, "a", Clock::Custom(7), 0));
        assert!(write(&mut b, 2, "b", Clock::Custom(7), 0));
        let mut ab = a.clone();
        ab.join(&b);
        b.join(&a);
        assert_eq!(ab.value(), Some(&Element::string("b")));
        assert_eq!(ab, b);
    }
}
