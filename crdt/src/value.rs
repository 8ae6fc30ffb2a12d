//! `CrdtValue`: any of the eight CRDTs, typed at run time.
//!
//! The daemon keeps one `CrdtValue` per key and does not know its type statically; this module
//! owns the [`Store`] enum over the eight stores, the [`CrdtKind`] names, and reading a value as
//! a user function would see it ([`crate::UserValue`]).

use std::fmt;

use crate::causal::Causal;
use crate::context::{CausalContext, Dot};
use crate::counter::{self, GCounterStore, PNCounterStore};
use crate::dotstore::{DotStore, JoinArgs};
use crate::flag::FlagStore;
use crate::map::{self, MapStore};
use crate::register::{self, RegisterStore};
use crate::set::{self, GSetStore, ORSetStore};
use crate::user::UserValue;
use crate::vote::{self, VoteStore, Voters};

/// The eight CloudState CRDT types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CrdtKind {
    /// grow-only counter
    GCounter,
    /// positive-negative counter
    PNCounter,
    /// grow-only set
    GSet,
    /// observed-remove set (add-wins)
    ORSet,
    /// last-writer-wins register
    LwwRegister,
    /// enable-wins flag
    Flag,
    /// observed-remove map of CRDTs
    ORMap,
    /// vote among live replicas
    Vote,
}

impl CrdtKind {
    /// All eight, in CloudState's `CrdtDelta` field order.
    pub const ALL: [CrdtKind; 8] = [
        CrdtKind::GCounter,
        CrdtKind::PNCounter,
        CrdtKind::GSet,
        CrdtKind::ORSet,
        CrdtKind::LwwRegister,
        CrdtKind::Flag,
        CrdtKind::ORMap,
        CrdtKind::Vote,
    ];

    /// The lower-case name used in logs and the admin API (`gcounter`, `lwwregister`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CrdtKind::GCounter => "gcounter",
            CrdtKind::PNCounter => "pncounter",
            CrdtKind::GSet => "gset",
            CrdtKind::ORSet => "orset",
            CrdtKind::LwwRegister => "lwwregister",
            CrdtKind::Flag => "flag",
            CrdtKind::ORMap => "ormap",
            CrdtKind::Vote => "vote",
        }
    }
}

impl fmt::Display for CrdtKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The store of any of the eight types.
#[derive(Clone, PartialEq, Hash, Debug)]
pub enum Store {
    /// a GCounter's
    GCounter(GCounterStore),
    /// a PNCounter's
    PNCounter(PNCounterStore),
    /// a GSet's
    GSet(GSetStore),
    /// an ORSet's
    ORSet(ORSetStore),
    /// an LWWRegister's
    LwwRegister(RegisterStore),
    /// a Flag's
    Flag(FlagStore),
    /// an ORMap's
    ORMap(MapStore),
    /// a Vote's
    Vote(VoteStore),
}

impl Default for Store {
    fn default() -> Self {
        Store::GCounter(GCounterStore::default())
    }
}

macro_rules! each_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            Store::GCounter($s) => $body,
            Store::PNCounter($s) => $body,
            Store::GSet($s) => $body,
            Store::ORSet($s) => $body,
            Store::LwwRegister($s) => $body,
            Store::Flag($s) => $body,
            Store::ORMap($s) => $body,
            Store::Vote($s) => $body,
        }
    };
}

impl Store {
    /// The empty store of a type.
    pub fn empty(kind: CrdtKind) -> Store {
        match kind {
            CrdtKind::GCounter => Store::GCounter(Default::default()),
            CrdtKind::PNCounter => Store::PNCounter(Default::default()),
            CrdtKind::GSet => Store::GSet(Default::default()),
            CrdtKind::ORSet => Store::ORSet(Default::default()),
            CrdtKind::LwwRegister => Store::LwwRegister(Default::default()),
            CrdtKind::Flag => Store::Flag(Default::default()),
            CrdtKind::ORMap => Store::ORMap(Default::default()),
            CrdtKind::Vote => Store::Vote(Default::default()),
        }
    }

    /// Its type.
    pub fn kind(&self) -> CrdtKind {
        match self {
            Store::GCounter(_) => CrdtKind::GCounter,
            Store::PNCounter(_) => CrdtKind::PNCounter,
            Store::GSet(_) => CrdtKind::GSet,
            Store::ORSet(_) => CrdtKind::ORSet,
            Store::LwwRegister(_) => CrdtKind::LwwRegister,
            Store::Flag(_) => CrdtKind::Flag,
            Store::ORMap(_) => CrdtKind::ORMap,
            Store::Vote(_) => CrdtKind::Vote,
        }
    }

    /// The value as a user function holds it; `voters` is needed for votes.
    pub fn read(&self, voters: &Voters) -> UserValue {
        match self {
            Store::GCounter(s) => {
                UserValue::GCounter(u64::try_from(counter::totals(&s.0).0).unwrap_or(u64::MAX))
            }
            Store::PNCounter(s) => {
                let (i, d) = counter::totals(&s.0);
                UserValue::PNCounter(counter::clamp_i64(i as i128 - d as i128))
            }
            Store::GSet(s) => UserValue::GSet(set::elements(&s.0).cloned().collect()),
            Store::ORSet(s) => UserValue::ORSet(set::elements(&s.0).cloned().collect()),
            Store::LwwRegister(s) => {
                UserValue::LwwRegister(register::current(s).map(|(_, v)| v.clone()))
            }
            Store::Flag(s) => UserValue::Flag(!s.is_bottom()),
            // A register whose writes were all removed (a key removal concurrent with a write
            // that lost) has no value to show: the key reads as absent until written again.
            Store::ORMap(s) => UserValue::ORMap(
                map::visible_entries(s)
                    .map(|(k, v)| (k.clone(), v.read(voters)))
                    .filter(|(_, v)| *v != UserValue::LwwRegister(None))
                    .collect(),
            ),
            Store::Vote(s) => UserValue::Vote(vote::tally(s, voters)),
        }
    }
}

impl DotStore for Store {
    fn is_bottom(&self) -> bool {
        each_store!(self, s => s.is_bottom())
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(&Dot)) {
        each_store!(self, s => s.for_each_dot(f))
    }
    fn skeleton(&self) -> Self {
        match self {
            Store::GCounter(s) => Store::GCounter(s.skeleton()),
            Store::PNCounter(s) => Store::PNCounter(s.skeleton()),
            Store::GSet(s) => Store::GSet(s.skeleton()),
            Store::ORSet(s) => Store::ORSet(s.skeleton()),
            Store::LwwRegister(s) => Store::LwwRegister(s.skeleton()),
            Store::Flag(s) => Store::Flag(s.skeleton()),
            Store::ORMap(s) => Store::ORMap(s.skeleton()),
            Store::Vote(s) => Store::Vote(s.skeleton()),
        }
    }
    fn empty_like(&self) -> Self {
        Store::empty(self.kind())
    }
    fn join(&mut self, other: &Self, args: &JoinArgs<'_>) -> bool {
        match (&mut *self, other) {
            (Store::GCounter(a), Store::GCounter(b)) => a.join(b, args),
            (Store::PNCounter(a), Store::PNCounter(b)) => a.join(b, args),
            (Store::GSet(a), Store::GSet(b)) => a.join(b, args),
            (Store::ORSet(a), Store::ORSet(b)) => a.join(b, args),
            (Store::LwwRegister(a), Store::LwwRegister(b)) => a.join(b, args),
            (Store::Flag(a), Store::Flag(b)) => a.join(b, args),
            (Store::ORMap(a), Store::ORMap(b)) => a.join(b, args),
            (Store::Vote(a), Store::Vote(b)) => a.join(b, args),
            // Two types under one key cannot be built by this crate (map keys include the
            // type, the daemon checks a key's type before joining, the decoder validates).
            // Should it happen anyway, stay deterministic: the greater type wins.
            _ => {
                if other.kind() > self.kind() {
                    let mut taken = other.empty_like();
                    taken.join(other, args);
                    *self = taken;
                    return true;
                }
                false
            }
        }
    }
}

/// Any of the eight CRDTs, or a delta of one.
pub type CrdtValue = Causal<Store>;

impl CrdtValue {
    /// The empty value of a type.
    pub fn empty(kind: CrdtKind) -> Self {
        Causal {
            store: Store::empty(kind),
            ctx: CausalContext::new(),
            delta: false,
        }
    }

    /// The delta that creates an empty value of a type (and changes nothing else).
    pub fn empty_delta(kind: CrdtKind) -> Self {
        Causal::from_delta_parts(Store::empty(kind), CausalContext::new())
    }

    /// Its type.
    pub fn kind(&self) -> CrdtKind {
        self.store.kind()
    }

    /// The value as a user function holds it.
    pub fn read(&self, voters: &Voters) -> UserValue {
        self.store.read(voters)
    }

    /// For a GSet or ORSet: whether `e` is an element (O(log n)). False for other types.
    pub fn contains_element(&self, e: &crate::Element) -> bool {
        match &self.store {
            Store::GSet(s) => set::contains(&s.0, e),
            Store::ORSet(s) => set::contains(&s.0, e),
            _ => false,
        }
    }

    /// For a GCounter or PNCounter: each replica's (increments, decrements). Empty for other
    /// types. (Monitoring and benchmarks use it to tell which replica's writes arrived.)
    pub fn counter_contributions(&self) -> Vec<(crate::ReplicaId, u64, u64)> {
        let entries = match &self.store {
            Store::GCounter(s) => &s.0,
            Store::PNCounter(s) => &s.0,
            _ => return Vec::new(),
        };
        entries
            .latest_per_replica()
            .map(|(d, (i, dec))| (d.actor, *i, *dec))
            .collect()
    }
}

macro_rules! typed_conversions {
    ($($variant:ident($store:ty)),* $(,)?) => {$(
        impl From<Causal<$store>> for CrdtValue {
            fn from(v: Causal<$store>) -> CrdtValue {
                v.map_store(Store::$variant)
            }
        }
    )*};
}

typed_conversions!(
    GCounter(GCounterStore),
    PNCounter(PNCounterStore),
    GSet(GSetStore),
    ORSet(ORSetStore),
    LwwRegister(RegisterStore),
    Flag(FlagStore),
    ORMap(MapStore),
    Vote(VoteStore),
);
