//! The value and delta expectations of `spec/conformance.md`, items 18–25 (per-type model
//! transcripts) and 47–53 (the reference proxy's per-type specs), one test per item, named
//! after it. They exercise what the entity runtime builds on: `apply_user_delta` (a user
//! function's update as an operation of this replica), joins of remote deltas, and the
//! user-function view kept with `initial_delta` / `diff`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};

use latticed_crdt::{
    apply_user_delta, diff, initial_delta, CrdtError, CrdtValue, Element, Origin, UserValue,
    VoteTally, Voters,
};
use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, CrdtClock, CrdtDelta, FlagDelta, GCounterDelta, GSetDelta, LwwRegisterDelta,
    OrMapDelta, OrMapEntryDelta, OrSetDelta, PnCounterDelta, VoteDelta,
};

fn e(x: &str) -> Element {
    Element::string(x)
}
fn any(x: &str) -> prost_types::Any {
    e(x).to_any()
}
fn anys(xs: &[&str]) -> Vec<prost_types::Any> {
    xs.iter().map(|x| any(x)).collect()
}
fn set(xs: &[&str]) -> BTreeSet<Element> {
    xs.iter().map(|x| e(x)).collect()
}
fn wrap(d: Delta) -> CrdtDelta {
    CrdtDelta { delta: Some(d) }
}
fn gc(increment: u64) -> CrdtDelta {
    wrap(Delta::Gcounter(GCounterDelta { increment }))
}
fn pn(change: i64) -> CrdtDelta {
    wrap(Delta::Pncounter(PnCounterDelta { change }))
}
fn gset(added: &[&str]) -> CrdtDelta {
    wrap(Delta::Gset(GSetDelta { added: anys(added) }))
}
fn orset(cleared: bool, removed: &[&str], added: &[&str]) -> CrdtDelta {
    wrap(Delta::Orset(OrSetDelta {
        cleared,
        removed: anys(removed),
        added: anys(added),
    }))
}
fn lww(v: &str, clock: CrdtClock, custom_clock_value: i64) -> CrdtDelta {
    wrap(Delta::Lwwregister(LwwRegisterDelta {
        value: Some(any(v)),
        clock: clock as i32,
        custom_clock_value,
    }))
}
fn flag(value: bool) -> CrdtDelta {
    wrap(Delta::Flag(FlagDelta { value }))
}
fn vote(self_vote: bool) -> CrdtDelta {
    wrap(Delta::Vote(VoteDelta {
        self_vote,
        votes_for: 0,
        total_voters: 0,
    }))
}
fn entries(es: Vec<(&str, CrdtDelta)>) -> Vec<OrMapEntryDelta> {
    es.into_iter()
        .map(|(k, d)| OrMapEntryDelta {
            key: Some(any(k)),
            delta: Some(d),
        })
        .collect()
}
fn ormap(
    cleared: bool,
    removed: &[&str],
    updated: Vec<(&str, CrdtDelta)>,
    added: Vec<(&str, CrdtDelta)>,
) -> CrdtDelta {
    wrap(Delta::Ormap(OrMapDelta {
        cleared,
        removed: anys(removed),
        updated: entries(updated),
        added: entries(added),
    }))
}
fn umap(es: Vec<(&str, UserValue)>) -> UserValue {
    UserValue::ORMap(
        es.into_iter()
            .map(|(k, v)| (e(k), v))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// One daemon's side of one entity: the replicated value and the user-function view.
struct Node {
    replica: u64,
    value: Option<CrdtValue>,
    view: Option<UserValue>,
    voters: Voters,
    now: i64,
}

impl Node {
    fn new(replica: u64) -> Node {
        Node {
            replica,
            value: None,
            view: None,
            voters: Voters::alone(replica),
            now: 1_000,
        }
    }

    /// What `init` carries (and the view it starts).
    fn init(&mut self) -> Option<CrdtDelta> {
        self.view = self.value.as_ref().map(|v| v.read(&self.voters));
        self.view.as_ref().map(initial_delta)
    }

    /// A user function's update: applied to the replicated value (and, as the user function
    /// did, to its view). Returns the delta to replicate.
    fn uf(&mut self, d: &CrdtDelta) -> Result<Option<CrdtValue>, CrdtError> {
        self.now += 1;
        let out = apply_user_delta(&mut self.value, d, self.replica, self.now)?;
        match &mut self.view {
            Some(v) => v.apply(d, Origin::UserFunction)?,
            None => self.view = Some(UserValue::from_delta(d, Origin::UserFunction)?),
        }
        Ok(out)
    }

    /// A user function's update that must succeed.
    fn ok(&mut self, d: &CrdtDelta) -> Option<CrdtValue> {
        self.uf(d).expect("update applies")
    }

    /// A delta replicated from elsewhere.
    fn remote(&mut self, d: &CrdtValue) {
        match &mut self.value {
            Some(v) => {
                v.join(d);
            }
            None => self.value = Some(d.clone().into_state()),
        }
    }

    /// What the daemon pushes to the user function now; the view follows.
    fn push(&mut self) -> Option<CrdtDelta> {
        let new = self.value.as_ref()?.read(&self.voters);
        let d = match &self.view {
            None => Some(initial_delta(&new)),
            Some(old) => diff(old, &new).expect("diffable"),
        };
        // A support library applying the pushed delta ends up holding the new value.
        let mut check = self.view.clone();
        if let Some(d) = &d {
            match &mut check {
                Some(v) => v.apply(d, Origin::Proxy).expect("applies"),
                None => check = Some(UserValue::from_delta(d, Origin::Proxy).expect("applies")),
            }
        }
        assert_eq!(check.as_ref(), Some(&new));
        self.view = Some(new);
        d
    }

    fn read(&self) -> UserValue {
        self.value.as_ref().expect("has a value").read(&self.voters)
    }
}

fn read_delta(d: &CrdtValue) -> UserValue {
    d.clone().into_state().read(&Voters::alone(0))
}

#[test]
fn conformance_18_gcounter() {
    let mut a = Node::new(1);
    let mut b = Node::new(2);
    let d = a.ok(&gc(42)).unwrap();
    assert_eq!(read_delta(&d), UserValue::GCounter(42));
    // 1,2,3 in one command arrive as one increment of 6
    a.ok(&gc(6));
    assert_eq!(a.read(), UserValue::GCounter(48));
    assert_eq!(
        a.push(),
        None,
        "the user function is never echoed its own change"
    );
    // init with 42, then +123
    let mut c = Node::new(3);
    c.remote(&d);
    assert_eq!(c.init(), Some(gc(42)));
    c.ok(&gc(123));
    assert_eq!(c.read(), UserValue::GCounter(165));
    // mixed: local 1, remote 2 and 3, read 6, local 4, remote 5, local 6 -> 21
    let mut m = Node::new(4);
    m.ok(&gc(1));
    let r2 = b.ok(&gc(2)).unwrap();
    let r3 = b.ok(&gc(3)).unwrap();
    m.remote(&r2);
    m.remote(&r3);
    assert_eq!(m.push(), Some(gc(5)));
    assert_eq!(m.read(), UserValue::GCounter(6));
    m.ok(&gc(4));
    let r5 = b.ok(&gc(5)).unwrap();
    m.remote(&r5);
    assert_eq!(m.push(), Some(gc(5)));
    let d6 = m.ok(&gc(6)).unwrap();
    assert_eq!(m.read(), UserValue::GCounter(21));
    assert_eq!(m.push(), None);
    // the replicated delta of the last command carries m's whole contribution (1+4+6)
    assert_eq!(read_delta(&d6), UserValue::GCounter(11));
}

#[test]
fn conformance_19_pncounter() {
    let mut a = Node::new(1);
    a.ok(&pn(2));
    assert_eq!(a.read(), UserValue::PNCounter(2));
    a.ok(&pn(-5));
    assert_eq!(a.read(), UserValue::PNCounter(-3));
    // init 42 then -123
    let mut src = Node::new(9);
    let d = src.ok(&pn(42)).unwrap();
    let mut b = Node::new(2);
    b.remote(&d);
    assert_eq!(b.init(), Some(pn(42)));
    b.ok(&pn(-123));
    assert_eq!(b.read(), UserValue::PNCounter(-81));
    // replicated -42 then +123
    let mut c = Node::new(3);
    c.init();
    let mut src2 = Node::new(8);
    let r = src2.ok(&pn(-42)).unwrap();
    c.remote(&r);
    assert_eq!(c.push(), Some(pn(-42)));
    c.ok(&pn(123));
    assert_eq!(c.read(), UserValue::PNCounter(81));
    // mixed, ending at -3
    let mut m = Node::new(4);
    m.ok(&pn(1));
    m.remote(&src2.ok(&pn(-2)).unwrap());
    assert_eq!(m.push(), Some(pn(-44)));
    m.ok(&pn(40));
    assert_eq!(m.read(), UserValue::PNCounter(-3));
}

#[test]
fn conformance_20_gset() {
    let mut a = Node::new(1);
    let d = a.ok(&gset(&["a", "b"])).unwrap();
    assert_eq!(read_delta(&d), UserValue::GSet(set(&["a", "b"])));
    let d = a.ok(&gset(&["b", "c"])).unwrap();
    assert_eq!(
        read_delta(&d),
        UserValue::GSet(set(&["c"])),
        "only what is new replicates"
    );
    assert_eq!(
        a.ok(&gset(&["c", "a"])),
        None,
        "adding present elements changes nothing"
    );
    // init {a,b,c} + add c,d,e
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(gset(&["a", "b", "c"])));
    let d = b.ok(&gset(&["c", "d", "e"])).unwrap();
    assert_eq!(read_delta(&d), UserValue::GSet(set(&["d", "e"])));
    // a remote re-add of an existing element is harmless
    let mut c = Node::new(3);
    let again = c.ok(&gset(&["a"])).unwrap();
    b.remote(&again);
    assert_eq!(b.push(), None);
    assert_eq!(b.read(), UserValue::GSet(set(&["a", "b", "c", "d", "e"])));
}

#[test]
fn conformance_21_orset() {
    let mut a = Node::new(1);
    a.ok(&orset(false, &[], &["a", "b"]));
    a.ok(&orset(false, &[], &["c"]));
    assert_eq!(a.read(), UserValue::ORSet(set(&["a", "b", "c"])));
    a.ok(&orset(false, &["b"], &[]));
    assert_eq!(a.read(), UserValue::ORSet(set(&["a", "c"])));
    // removing an absent element is a no-op
    assert_eq!(a.ok(&orset(false, &["d"], &[])), None);
    // remove c + add b,c in one delta: c stays, b is back
    a.ok(&orset(false, &["c", "d"], &["b", "c"]));
    assert_eq!(a.read(), UserValue::ORSet(set(&["a", "b", "c"])));
    assert_eq!(a.push(), None);
    a.ok(&orset(true, &[], &[]));
    assert_eq!(a.read(), UserValue::ORSet(set(&[])));
    a.ok(&orset(true, &[], &["x"]));
    assert_eq!(a.read(), UserValue::ORSet(set(&["x"])));
    // rehydrated {b,c}; a remote clear + add p,q; then the user function adds y
    let mut src = Node::new(7);
    src.ok(&orset(false, &[], &["b", "c"]));
    let mut b = Node::new(2);
    b.remote(src.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(orset(false, &[], &["b", "c"])));
    let remote = src.ok(&orset(true, &[], &["p", "q"])).unwrap();
    b.remote(&remote);
    assert_eq!(b.push(), Some(orset(true, &[], &["p", "q"])));
    b.ok(&orset(false, &[], &["y"]));
    assert_eq!(b.read(), UserValue::ORSet(set(&["p", "q", "y"])));
}

#[test]
fn conformance_22_lwwregister() {
    let mut a = Node::new(1);
    a.ok(&lww("one", CrdtClock::Default, 0));
    assert_eq!(a.read(), UserValue::LwwRegister(Some(e("one"))));
    // REVERSE over a value loses; the old value goes back to the user function
    assert_eq!(a.ok(&lww("A", CrdtClock::Reverse, 0)), None);
    assert_eq!(a.push(), Some(lww("one", CrdtClock::Default, 0)));
    // CUSTOM below the wall-clock timestamp of "one" loses too
    assert_eq!(a.ok(&lww("A", CrdtClock::Custom, 123)), None);
    a.push();
    let mut custom = Node::new(5);
    let d = custom.ok(&lww("A", CrdtClock::Custom, 123)).unwrap();
    assert_eq!(read_delta(&d), UserValue::LwwRegister(Some(e("A"))));
    // the same value again with CUSTOM_AUTO_INCREMENT still replicates, twice
    assert!(custom
        .ok(&lww("A", CrdtClock::CustomAutoIncrement, 456))
        .is_some());
    assert!(custom
        .ok(&lww("A", CrdtClock::CustomAutoIncrement, 456))
        .is_some());
    assert_eq!(custom.read(), UserValue::LwwRegister(Some(e("A"))));
    // a remote write replaces the value; a remote write of the current value is harmless
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    let r = b.ok(&lww("B", CrdtClock::Default, 0)).unwrap();
    a.remote(&r);
    assert_eq!(a.push(), Some(lww("B", CrdtClock::Default, 0)));
    let same = b.ok(&lww("B", CrdtClock::Default, 0)).unwrap();
    a.remote(&same);
    assert_eq!(a.push(), None);
}

#[test]
fn conformance_23_flag() {
    let mut a = Node::new(1);
    assert_eq!(a.init(), None);
    a.ok(&flag(false));
    assert_eq!(a.read(), UserValue::Flag(false));
    a.ok(&flag(true));
    assert_eq!(a.read(), UserValue::Flag(true));
    assert_eq!(
        a.ok(&flag(true)),
        None,
        "enabling an enabled flag changes nothing"
    );
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(flag(true)));
    // a support library ignores a remote false after true
    let mut uf = UserValue::Flag(true);
    uf.apply(&flag(false), Origin::Proxy).unwrap();
    assert_eq!(uf, UserValue::Flag(true));
}

#[test]
fn conformance_24_ormap() {
    let mut a = Node::new(1);
    a.ok(&ormap(
        false,
        &[],
        vec![],
        vec![("PNCounter-1", pn(0)), ("ORSet-1", orset(false, &[], &[]))],
    ));
    assert_eq!(
        a.read(),
        umap(vec![
            ("ORSet-1", UserValue::ORSet(set(&[]))),
            ("PNCounter-1", UserValue::PNCounter(0))
        ])
    );
    // an update of a missing key, reported under added, creates it
    a.ok(&ormap(
        false,
        &[],
        vec![],
        vec![("LWWRegister-1", lww("zero", CrdtClock::Default, 0))],
    ));
    a.ok(&ormap(
        false,
        &[],
        vec![
            ("PNCounter-1", pn(5)),
            ("ORSet-1", orset(false, &[], &["x"])),
        ],
        vec![],
    ));
    assert_eq!(
        a.read(),
        umap(vec![
            ("LWWRegister-1", UserValue::LwwRegister(Some(e("zero")))),
            ("ORSet-1", UserValue::ORSet(set(&["x"]))),
            ("PNCounter-1", UserValue::PNCounter(5)),
        ])
    );
    // an update of a missing key under `updated` is ignored
    assert_eq!(
        a.ok(&ormap(false, &[], vec![("Missing-1", pn(1))], vec![])),
        None
    );
    a.ok(&ormap(
        false,
        &["ORSet-1"],
        vec![],
        vec![("GCounter-9", gc(2))],
    ));
    assert_eq!(
        a.read(),
        umap(vec![
            ("GCounter-9", UserValue::GCounter(2)),
            ("LWWRegister-1", UserValue::LwwRegister(Some(e("zero")))),
            ("PNCounter-1", UserValue::PNCounter(5)),
        ])
    );
    a.ok(&ormap(true, &[], vec![], vec![("GCounter-1", gc(123))]));
    assert_eq!(
        a.read(),
        umap(vec![("GCounter-1", UserValue::GCounter(123))])
    );
    // nested maps
    a.ok(&ormap(
        false,
        &[],
        vec![],
        vec![(
            "ORMap-1",
            ormap(
                false,
                &[],
                vec![],
                vec![
                    ("PNCounter-1", pn(-1)),
                    ("LWWRegister-1", lww("n", CrdtClock::Default, 0)),
                ],
            ),
        )],
    ));
    a.ok(&ormap(
        false,
        &[],
        vec![(
            "ORMap-1",
            ormap(false, &[], vec![("PNCounter-1", pn(-2))], vec![]),
        )],
        vec![],
    ));
    let nested = umap(vec![
        ("LWWRegister-1", UserValue::LwwRegister(Some(e("n")))),
        ("PNCounter-1", UserValue::PNCounter(-3)),
    ]);
    assert_eq!(
        a.read(),
        umap(vec![
            ("GCounter-1", UserValue::GCounter(123)),
            ("ORMap-1", nested.clone())
        ])
    );
    assert_eq!(a.push(), None);
    // remote deltas may add nested maps, remove keys, clear and add in one delta
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    b.init();
    let r = a
        .ok(&ormap(
            true,
            &[],
            vec![],
            vec![(
                "ORMap-2",
                ormap(false, &[], vec![], vec![("GCounter-1", gc(1))]),
            )],
        ))
        .unwrap();
    b.remote(&r);
    let pushed = b.push().unwrap();
    assert_eq!(
        pushed,
        ormap(
            false,
            // keys in (type URL, bytes) order: "ORMap-1" encodes shorter
            &["ORMap-1", "GCounter-1"],
            vec![],
            vec![(
                "ORMap-2",
                ormap(false, &[], vec![], vec![("GCounter-1", gc(1))])
            )]
        )
    );
}

#[test]
fn conformance_25_vote() {
    let mut a = Node::new(1);
    a.ok(&vote(true));
    assert_eq!(
        a.read(),
        UserValue::Vote(VoteTally {
            self_vote: true,
            votes_for: 1,
            total_voters: 1
        })
    );
    assert_eq!(a.ok(&vote(true)), None);
    a.ok(&vote(false));
    assert_eq!(
        a.read(),
        UserValue::Vote(VoteTally {
            self_vote: false,
            votes_for: 0,
            total_voters: 1
        })
    );
    // three live replicas, two (this one included) voting true; this one votes false
    let mut n = Node::new(1);
    n.voters = Voters {
        me: 1,
        live: [1, 2, 3].into(),
    };
    let mut other = Node::new(2);
    n.remote(&other.ok(&vote(true)).unwrap());
    n.ok(&vote(true));
    let init = n.init().unwrap();
    assert_eq!(
        init,
        wrap(Delta::Vote(VoteDelta {
            self_vote: true,
            votes_for: 2,
            total_voters: 3
        }))
    );
    n.ok(&vote(false));
    assert_eq!(
        n.read(),
        UserValue::Vote(VoteTally {
            self_vote: false,
            votes_for: 1,
            total_voters: 3
        })
    );
    assert_eq!(
        n.push(),
        None,
        "the user function computed the same tally itself"
    );
    // five live replicas, three others voting true; this one votes true
    let mut f = Node::new(1);
    f.voters = Voters {
        me: 1,
        live: [1, 2, 3, 4, 5].into(),
    };
    f.init();
    for r in [2, 3, 4] {
        f.remote(&Node::new(r).ok(&vote(true)).unwrap());
    }
    assert_eq!(
        f.push(),
        Some(wrap(Delta::Vote(VoteDelta {
            self_vote: false,
            votes_for: 3,
            total_voters: 5
        })))
    );
    f.ok(&vote(true));
    assert_eq!(
        f.read(),
        UserValue::Vote(VoteTally {
            self_vote: true,
            votes_for: 4,
            total_voters: 5
        })
    );
    // membership alone changes the tally: replica 2 goes down
    f.voters.live.remove(&2);
    assert_eq!(
        f.push(),
        Some(wrap(Delta::Vote(VoteDelta {
            self_vote: true,
            votes_for: 3,
            total_voters: 4
        })))
    );
}

#[test]
fn conformance_47_gcounter() {
    // a user-function update on a nonexistent value creates it
    let mut zero = Node::new(1);
    let created = zero.ok(&gc(0)).unwrap();
    assert_eq!(read_delta(&created), UserValue::GCounter(0));
    let mut peer = Node::new(2);
    peer.remote(&created);
    assert_eq!(
        peer.init(),
        Some(gc(0)),
        "init of an existing empty counter carries 0"
    );
    assert_eq!(Node::new(3).init(), None, "no value: no delta in init");
    let mut a = Node::new(1);
    a.ok(&gc(5));
    assert_eq!(a.read(), UserValue::GCounter(5));
    // a remote change before any local value pushes the full state
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.push(), Some(gc(5)));
    let r = Node::new(7).ok(&gc(3)).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(gc(3)));
    b.ok(&gc(3));
    assert_eq!(b.read(), UserValue::GCounter(11));
    assert_eq!(b.push(), None);
    // a negative increment (as CloudState libraries encode -3) fails and changes nothing
    let before = b.value.clone();
    assert_eq!(
        b.uf(&gc((-3i64) as u64)),
        Err(CrdtError::NegativeIncrement((-3i64) as u64))
    );
    assert_eq!(b.value, before);
}

#[test]
fn conformance_48_pncounter() {
    let mut a = Node::new(1);
    a.ok(&pn(5));
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(pn(5)));
    let r = a.ok(&pn(-3)).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(pn(-3)));
    b.ok(&pn(-3));
    assert_eq!(b.read(), UserValue::PNCounter(-1));
    assert_eq!(b.push(), None);
    let created = Node::new(3).ok(&pn(0)).unwrap();
    assert_eq!(read_delta(&created), UserValue::PNCounter(0));
}

#[test]
fn conformance_49_gset() {
    let mut a = Node::new(1);
    let created = a.ok(&gset(&[])).unwrap();
    assert_eq!(read_delta(&created), UserValue::GSet(set(&[])));
    a.ok(&gset(&["e1", "e2"]));
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(gset(&["e1", "e2"])));
    let r = a.ok(&gset(&["e3"])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(gset(&["e3"])));
    b.ok(&gset(&["e4"]));
    assert_eq!(b.read(), UserValue::GSet(set(&["e1", "e2", "e3", "e4"])));
    assert_eq!(b.push(), None);
}

#[test]
fn conformance_50_orset() {
    // opaque Anys: any type URL and bytes are elements, compared by bytes
    let el = |n: u8| prost_types::Any {
        type_url: format!("element{n}"),
        value: vec![b'0' + n],
    };
    let od = |cleared: bool, removed: Vec<prost_types::Any>, added: Vec<prost_types::Any>| {
        wrap(Delta::Orset(OrSetDelta {
            cleared,
            removed,
            added,
        }))
    };
    let mut a = Node::new(1);
    a.ok(&od(false, vec![], vec![el(1)]));
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(od(false, vec![], vec![el(1)])));
    let r = a.ok(&od(false, vec![], vec![el(2)])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(od(false, vec![], vec![el(2)])));
    let r = a.ok(&od(false, vec![el(2)], vec![el(3)])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(od(false, vec![el(2)], vec![el(3)])));
    let r = a.ok(&od(false, vec![el(1)], vec![])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(od(false, vec![el(1)], vec![])));
    let r = a.ok(&od(true, vec![], vec![])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(od(true, vec![], vec![])));
    let r = a.ok(&od(true, vec![], vec![el(3)])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(od(false, vec![], vec![el(3)])));
    let r = a.ok(&od(false, vec![], vec![el(1), el(2)])).unwrap();
    b.remote(&r);
    b.push();
    // {e1,e2,e3} minus e1,e2: clearing and re-adding e3 is cheaper than two removes
    let r = a.ok(&od(false, vec![el(1), el(2)], vec![])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(od(true, vec![], vec![el(3)])));
    // user-function deltas apply in the order clear, remove, add
    let mut c = Node::new(3);
    c.ok(&od(false, vec![], vec![el(1), el(2)]));
    c.ok(&od(true, vec![el(3)], vec![el(3)]));
    c.ok(&od(false, vec![el(3)], vec![el(4)]));
    let view: BTreeSet<Element> = [Element::from(&el(4))].into();
    assert_eq!(c.read(), UserValue::ORSet(view));
    assert_eq!(c.push(), None);
}

#[test]
fn conformance_51_lwwregister() {
    let mut a = Node::new(1);
    a.ok(&lww("one", CrdtClock::Default, 0));
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(lww("one", CrdtClock::Default, 0)));
    let r = a.ok(&lww("two", CrdtClock::Default, 0)).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(lww("two", CrdtClock::Default, 0)));
    b.ok(&lww("three", CrdtClock::Default, 0));
    assert_eq!(b.push(), None);
    // REVERSE loses to the existing value, which is pushed back
    assert_eq!(b.ok(&lww("rev", CrdtClock::Reverse, 0)), None);
    assert_eq!(b.read(), UserValue::LwwRegister(Some(e("three"))));
    assert_eq!(b.push(), Some(lww("three", CrdtClock::Default, 0)));
    // CUSTOM below the current custom timestamp loses likewise
    let mut c = Node::new(3);
    c.ok(&lww("c100", CrdtClock::Custom, 100));
    assert_eq!(c.ok(&lww("c50", CrdtClock::Custom, 50)), None);
    assert_eq!(c.push(), Some(lww("c100", CrdtClock::Default, 0)));
    // CUSTOM_AUTO_INCREMENT below it still wins; nothing is pushed back
    assert!(c
        .ok(&lww("auto", CrdtClock::CustomAutoIncrement, 50))
        .is_some());
    assert_eq!(c.read(), UserValue::LwwRegister(Some(e("auto"))));
    assert_eq!(c.push(), None);
}

#[test]
fn conformance_52_flag() {
    let mut a = Node::new(1);
    let created = a.ok(&flag(false)).unwrap();
    assert_eq!(read_delta(&created), UserValue::Flag(false));
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(b.init(), Some(flag(false)));
    let r = a.ok(&flag(true)).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(flag(true)));
    let before = b.value.clone();
    assert_eq!(b.uf(&flag(false)), Err(CrdtError::FlagDisabled));
    assert_eq!(b.value, before);
    assert_eq!(b.read(), UserValue::Flag(true));
}

#[test]
fn conformance_53_ormap() {
    let mut a = Node::new(1);
    let created = a.ok(&ormap(false, &[], vec![], vec![])).unwrap();
    assert_eq!(read_delta(&created), umap(vec![]));
    a.ok(&ormap(
        false,
        &[],
        vec![],
        vec![("one", gc(1)), ("two", gc(2))],
    ));
    let mut b = Node::new(2);
    b.remote(a.value.as_ref().unwrap());
    assert_eq!(
        b.init(),
        Some(ormap(
            false,
            &[],
            vec![],
            vec![("one", gc(1)), ("two", gc(2))]
        ))
    );
    let r = a
        .ok(&ormap(false, &[], vec![], vec![("three", gc(3))]))
        .unwrap();
    b.remote(&r);
    assert_eq!(
        b.push(),
        Some(ormap(false, &[], vec![], vec![("three", gc(3))]))
    );
    let r = a.ok(&ormap(false, &["one"], vec![], vec![])).unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(ormap(false, &["one"], vec![], vec![])));
    let r = a
        .ok(&ormap(false, &[], vec![("two", gc(7))], vec![]))
        .unwrap();
    b.remote(&r);
    assert_eq!(
        b.push(),
        Some(ormap(false, &[], vec![("two", gc(7))], vec![]))
    );
    let r = a
        .ok(&ormap(
            false,
            &["three"],
            vec![("two", gc(1))],
            vec![("four", gc(4))],
        ))
        .unwrap();
    b.remote(&r);
    assert_eq!(
        b.push(),
        Some(ormap(
            false,
            &["three"],
            vec![("two", gc(1))],
            vec![("four", gc(4))]
        ))
    );
    // a type change: removed and added again as a PNCounter 5
    let r = a
        .ok(&ormap(false, &["four"], vec![], vec![("four", pn(5))]))
        .unwrap();
    b.remote(&r);
    assert_eq!(
        b.push(),
        Some(ormap(false, &["four"], vec![], vec![("four", pn(5))]))
    );
    // an incompatible change: a counter 10 removed and re-added as 3
    let r = a
        .ok(&ormap(false, &["two"], vec![], vec![("two", gc(3))]))
        .unwrap();
    b.remote(&r);
    assert_eq!(
        b.push(),
        Some(ormap(false, &["two"], vec![], vec![("two", gc(3))]))
    );
    // removal of all keys: cleared only
    let r = a
        .ok(&ormap(false, &["two", "four"], vec![], vec![]))
        .unwrap();
    b.remote(&r);
    assert_eq!(b.push(), Some(ormap(true, &[], vec![], vec![])));
    // user-function deltas: clear + add + update + remove, in that order
    let mut c = Node::new(3);
    c.ok(&ormap(false, &[], vec![], vec![("x", gc(1)), ("y", gc(1))]));
    c.ok(&ormap(true, &["y"], vec![("x", gc(5))], vec![("z", gc(2))]));
    assert_eq!(c.read(), umap(vec![("z", UserValue::GCounter(2))]));
    assert_eq!(c.push(), None);
}

#[test]
fn ormap_concurrent_creation_with_two_types_reads_alike_everywhere() {
    let mut a = Node::new(1);
    let mut b = Node::new(2);
    let da = a
        .ok(&ormap(false, &[], vec![], vec![("k", gc(1))]))
        .unwrap();
    let db = b
        .ok(&ormap(
            false,
            &[],
            vec![],
            vec![("k", orset(false, &[], &["x"]))],
        ))
        .unwrap();
    a.remote(&db);
    b.remote(&da);
    assert_eq!(a.value, b.value);
    assert_eq!(a.read(), b.read());
    // the next update through the visible type removes the other type's entry
    let visible_is_set = matches!(a.read(), UserValue::ORMap(m) if matches!(m.get(&e("k")), Some(UserValue::ORSet(_))));
    let (writer, upd) = if visible_is_set {
        (&mut a, orset(false, &[], &["y"]))
    } else {
        (&mut a, gc(1))
    };
    let d = writer
        .ok(&ormap(false, &[], vec![("k", upd)], vec![]))
        .unwrap();
    b.remote(&d);
    assert_eq!(a.value, b.value);
    let entries = match a.value.as_ref().unwrap().store() {
        latticed_crdt::Store::ORMap(m) => m.len(),
        _ => 0,
    };
    assert_eq!(entries, 1);
}
