//! Property tests of the CRDT laws, for all eight types, driven through the same path the
//! daemon uses: random CloudState deltas applied by random replicas with `apply_user_delta`,
//! interleaved with state exchanges.
//!
//! For every history: join is commutative, associative and idempotent on the replicas' states;
//! a state joined with a delta only grows; every delta ever produced, joined in order, equals
//! them joined shuffled, duplicated and batched, and equals the join of all replica states;
//! `diff(a, b)` applied to `a` by a support-library-style applier gives `b`; the wire encoding
//! round-trips; an operation that fails leaves the state unchanged; a delta changes a value only
//! within its footprint, so comparing that part alone tells a user function the whole change.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use latticed_crdt::{
    apply_user_delta, diff, initial_delta, update_part, wire, CrdtKind, CrdtValue, Element,
    Footprint, Origin, UserValue, Voters,
};
use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, CrdtDelta, FlagDelta, GCounterDelta, GSetDelta, LwwRegisterDelta,
    OrMapDelta, OrMapEntryDelta, OrSetDelta, PnCounterDelta, VoteDelta,
};
use proptest::prelude::*;

fn wrap(d: Delta) -> CrdtDelta {
    CrdtDelta { delta: Some(d) }
}

fn elem() -> impl Strategy<Value = prost_types::Any> {
    prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(|s| Element::string(s).to_any())
}

fn key() -> impl Strategy<Value = prost_types::Any> {
    prop::sample::select(vec!["k0", "k1", "k2"]).prop_map(|s| Element::string(s).to_any())
}

fn kind() -> impl Strategy<Value = CrdtKind> {
    prop::sample::select(CrdtKind::ALL.to_vec())
}

/// A random user-function delta of `kind`; ORMaps nest up to `depth` levels.
fn delta_for(kind: CrdtKind, depth: u32) -> BoxedStrategy<CrdtDelta> {
    match kind {
        CrdtKind::GCounter => (0u64..5)
            .prop_map(|increment| wrap(Delta::Gcounter(GCounterDelta { increment })))
            .boxed(),
        CrdtKind::PNCounter => (-5i64..5)
            .prop_map(|change| wrap(Delta::Pncounter(PnCounterDelta { change })))
            .boxed(),
        CrdtKind::GSet => prop::collection::vec(elem(), 0..3)
            .prop_map(|added| wrap(Delta::Gset(GSetDelta { added })))
            .boxed(),
        CrdtKind::ORSet => (
            prop::bool::weighted(0.15),
            prop::collection::vec(elem(), 0..3),
            prop::collection::vec(elem(), 0..3),
        )
            .prop_map(|(cleared, removed, added)| {
                wrap(Delta::Orset(OrSetDelta {
                    cleared,
                    removed,
                    added,
                }))
            })
            .boxed(),
        CrdtKind::LwwRegister => (elem(), 0i32..4, -3i64..3)
            .prop_map(|(v, clock, custom_clock_value)| {
                wrap(Delta::Lwwregister(LwwRegisterDelta {
                    value: Some(v),
                    clock,
                    custom_clock_value,
                }))
            })
            .boxed(),
        CrdtKind::Flag => prop::bool::weighted(0.8)
            .prop_map(|value| wrap(Delta::Flag(FlagDelta { value })))
            .boxed(),
        CrdtKind::Vote => any::<bool>()
            .prop_map(|self_vote| {
                wrap(Delta::Vote(VoteDelta {
                    self_vote,
                    votes_for: 0,
                    total_voters: 0,
                }))
            })
            .boxed(),
        CrdtKind::ORMap => {
            let nested_kinds: Vec<CrdtKind> = CrdtKind::ALL
                .iter()
                .copied()
                .filter(|k| depth > 1 || *k != CrdtKind::ORMap)
                .collect();
            let entry = (key(), prop::sample::select(nested_kinds))
                .prop_flat_map(move |(k, nk)| {
                    delta_for(nk, depth.saturating_sub(1)).prop_map(move |d| OrMapEntryDelta {
                        key: Some(k.clone()),
                        delta: Some(d),
                    })
                })
                .boxed();
            (
                prop::bool::weighted(0.1),
                prop::collection::vec(key(), 0..2),
                prop::collection::vec(entry.clone(), 0..2),
                prop::collection::vec(entry, 0..3),
            )
                .prop_map(|(cleared, removed, updated, added)| {
                    wrap(Delta::Ormap(OrMapDelta {
                        cleared,
                        removed,
                        updated,
                        added,
                    }))
                })
                .boxed()
        }
    }
}

#[derive(Clone, Debug)]
enum Event {
    /// replica applies a user delta at a time
    Op(usize, CrdtDelta, i64),
    /// the second replica joins the first one's full state
    Sync(usize, usize),
}

const REPLICAS: usize = 3;

fn rid(i: usize) -> u64 {
    // distinct, far apart, not in index order
    [0x9e37_79b9_7f4a_7c15, 7, 0x1234_5678][i]
}

fn history() -> impl Strategy<Value = (CrdtKind, Vec<Event>, u64)> {
    kind().prop_flat_map(|k| {
        let event = prop_oneof![
            3 => (0..REPLICAS, delta_for(k, 2), 0i64..1000).prop_map(|(r, d, t)| Event::Op(r, d, t)),
            1 => (0..REPLICAS, 0..REPLICAS).prop_map(|(a, b)| Event::Sync(a, b)),
        ];
        (Just(k), prop::collection::vec(event, 1..40), any::<u64>())
    })
}

struct Run {
    states: Vec<Option<CrdtValue>>,
    deltas: Vec<CrdtValue>,
}

fn run(events: &[Event]) -> Run {
    let mut states: Vec<Option<CrdtValue>> = vec![None; REPLICAS];
    let mut deltas = Vec::new();
    for ev in events {
        match ev {
            Event::Op(r, d, now) => {
                let before = states[*r].clone();
                match apply_user_delta(&mut states[*r], d, rid(*r), *now) {
                    Ok(Some(delta)) => {
                        assert!(delta.is_delta());
                        // the state is exactly the old state joined with the delta
                        let expected = match before {
                            Some(b) => b.joined(&delta),
                            None => delta.clone().into_state(),
                        };
                        assert_eq!(states[*r].as_ref(), Some(&expected));
                        deltas.push(delta);
                    }
                    Ok(None) => assert_eq!(states[*r], before),
                    Err(_) => assert_eq!(states[*r], before, "a failed operation changed state"),
                }
            }
            Event::Sync(from, to) => {
                if let Some(s) = states[*from].clone() {
                    match &mut states[*to] {
                        Some(t) => {
                            t.join(&s);
                        }
                        none => *none = Some(s),
                    }
                }
            }
        }
    }
    Run { states, deltas }
}

/// A small deterministic generator for shuffles.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn join_all<'a>(kind: CrdtKind, values: impl IntoIterator<Item = &'a CrdtValue>) -> CrdtValue {
    let mut acc = CrdtValue::empty(kind);
    for v in values {
        acc.join(v);
    }
    acc
}

fn voters(i: usize) -> Voters {
    Voters {
        me: rid(i),
        live: (0..REPLICAS).map(rid).collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn join_is_commutative_associative_idempotent((k, events, _) in history()) {
        let r = run(&events);
        let s: Vec<CrdtValue> = r.states.iter().map(|s| s.clone().unwrap_or_else(|| CrdtValue::empty(k))).collect();
        let (a, b, c) = (&s[0], &s[1], &s[2]);
        prop_assert_eq!(a.clone().joined(b), b.clone().joined(a));
        prop_assert_eq!(a.clone().joined(b).joined(c), a.clone().joined(&b.clone().joined(c)));
        prop_assert_eq!(a.clone().joined(a), a.clone());
        // the same laws on deltas, which keep what they name
        if r.deltas.len() >= 3 {
            let (x, y, z) = (&r.deltas[0], &r.deltas[r.deltas.len() / 2], &r.deltas[r.deltas.len() - 1]);
            prop_assert_eq!(x.clone().joined(y), y.clone().joined(x));
            prop_assert_eq!(x.clone().joined(y).joined(z), x.clone().joined(&y.clone().joined(z)));
            prop_assert_eq!(x.clone().joined(x), x.clone());
        }
    }

    #[test]
    fn state_joined_with_a_delta_only_grows((_, events, _) in history()) {
        let r = run(&events);
        for s in r.states.iter().flatten() {
            for d in &r.deltas {
                let grown = s.clone().joined(d);
                prop_assert_eq!(grown.clone().joined(s), grown);
            }
        }
    }

    #[test]
    fn deltas_in_any_order_duplicated_and_batched_equal_in_order((k, events, seed) in history()) {
        let r = run(&events);
        let in_order = join_all(k, &r.deltas);
        // every replica state's join: nothing produced is lost, nothing else appears
        let all_states = join_all(k, r.states.iter().flatten());
        prop_assert_eq!(&all_states, &in_order);

        let mut rng = SplitMix(seed);
        let mut shuffled: Vec<&CrdtValue> = r.deltas.iter().collect();
        for _ in 0..r.deltas.len() / 2 + 1 {
            if !r.deltas.is_empty() {
                shuffled.push(&r.deltas[rng.below(r.deltas.len())]);
            }
        }
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rng.below(i + 1));
        }
        prop_assert_eq!(&join_all(k, shuffled.iter().copied()), &in_order);

        // delta-intervals: random batches joined first, applied in random order
        let mut batches: Vec<CrdtValue> = Vec::new();
        for d in &shuffled {
            if batches.is_empty() || rng.below(3) == 0 {
                batches.push((*d).clone());
            } else {
                let i = rng.below(batches.len());
                batches[i].join(d);
            }
        }
        for b in &batches {
            prop_assert!(b.is_delta());
        }
        prop_assert_eq!(&join_all(k, &batches), &in_order);
    }

    #[test]
    fn diff_applied_by_a_support_library_gives_the_new_value((k, events, _) in history()) {
        let r = run(&events);
        if r.states.iter().all(Option::is_none) {
            // no value was ever created: nothing a user function could be sent
            return Ok(());
        }
        let converged = join_all(k, r.states.iter().flatten());
        for (i, s) in r.states.iter().enumerate() {
            let new = converged.read(&voters(i));
            // what init sends for the converged value rebuilds it
            let rebuilt = UserValue::from_delta(&initial_delta(&new), Origin::Proxy).unwrap_or_else(|e| panic!("{e}: {new:?} from {converged:?}"));
            prop_assert_eq!(&rebuilt, &new);
            let Some(s) = s else { continue };
            let old = s.read(&voters(i));
            let mut view = old.clone();
            match diff(&old, &new).unwrap() {
                Some(d) => view.apply(&d, Origin::Proxy).unwrap(),
                None => prop_assert_eq!(&old, &new),
            }
            prop_assert_eq!(view, new);
        }
    }

    #[test]
    fn a_delta_changes_a_value_only_within_its_footprint((_, events, _) in history()) {
        // what the entity runtime does for a change from a peer: compare and replace only the
        // part the delta names, and the user function ends up holding the joined value
        let r = run(&events);
        let Some(state) = r.states.iter().flatten().next() else { return Ok(()) };
        let v = voters(0);
        for d in &r.deltas {
            let fp = Footprint::of(d);
            let before = state.clone();
            let after = before.clone().joined(d);
            let old = before.read(&v);
            let new_part = after.part(&fp).read(&v);
            prop_assert_eq!(&new_part, &after.read(&v).part(&fp));
            let mut replaced = old.clone();
            replaced.replace_part(&fp, new_part.clone());
            prop_assert_eq!(&replaced, &after.read(&v), "outside the footprint {:?}", fp);
            let mut view = old.clone();
            let told = update_part(&mut view, &fp, new_part);
            prop_assert_eq!(&view, &after.read(&v));
            // exactly what comparing the whole values tells
            let whole = diff(&old, &after.read(&v));
            prop_assert_eq!(told.as_ref().ok(), whole.as_ref().ok(), "footprint {:?}", fp);
            prop_assert_eq!(told.is_err(), whole.is_err());
        }
    }

    #[test]
    fn values_with_equal_contexts_are_equal((_, events, _) in history()) {
        // every change mints a dot: replicas that applied the same changes (here: every state
        // is built from operations and full-state exchanges) hold equal values
        let mut snapshots: Vec<CrdtValue> = Vec::new();
        for i in 1..=events.len() {
            snapshots.extend(run(&events[..i]).states.into_iter().flatten());
        }
        for a in &snapshots {
            for b in &snapshots {
                if a.context() == b.context() {
                    prop_assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn wire_encoding_round_trips((_, events, _) in history()) {
        let r = run(&events);
        for v in r.states.iter().flatten().chain(&r.deltas) {
            let bytes = wire::encode(v);
            // written directly, the bytes are prost's own (digests hash them)
            prop_assert_eq!(&bytes, &prost::Message::encode_to_vec(&wire::to_proto(v)));
            prop_assert_eq!(wire::encoded_len(v), bytes.len());
            let decoded = wire::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, v);
        }
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = wire::decode(&bytes);
    }

    #[test]
    fn decoding_mutated_encodings_never_panics((_, events, seed) in history()) {
        let r = run(&events);
        let mut rng = SplitMix(seed);
        for v in r.states.iter().flatten() {
            let mut bytes = wire::encode(v);
            if bytes.is_empty() { continue; }
            for _ in 0..4 {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            if let Ok(x) = wire::decode(&bytes) {
                // whatever decodes is a value join can handle
                let _ = x.clone().joined(v);
            }
            bytes.truncate(rng.below(bytes.len()));
            let _ = wire::decode(&bytes);
        }
    }
}

/// ORSet: a remove concurrent with an add of the same element loses.
#[test]
fn orset_add_wins_under_concurrent_add_and_remove() {
    proptest!(|(others in prop::collection::vec(elem(), 0..4))| {
        let x = Element::string("x").to_any();
        let mut added = others.clone();
        added.push(x.clone());
        let create = wrap(Delta::Orset(OrSetDelta { cleared: false, removed: vec![], added }));
        let mut a = None;
        apply_user_delta(&mut a, &create, 1, 0).unwrap();
        let mut b = a.clone();
        let rm = apply_user_delta(&mut a, &wrap(Delta::Orset(OrSetDelta { cleared: true, removed: vec![x.clone()], added: vec![] })), 1, 0).unwrap().unwrap();
        let add = apply_user_delta(&mut b, &wrap(Delta::Orset(OrSetDelta { cleared: false, removed: vec![], added: vec![x.clone()] })), 2, 0).unwrap().unwrap();
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        a.join(&add);
        b.join(&rm);
        prop_assert_eq!(&a, &b);
        match a.read(&Voters::alone(1)) {
            UserValue::ORSet(s) => prop_assert_eq!(s.into_iter().collect::<Vec<_>>(), vec![Element::from(&x)]),
            other => prop_assert!(false, "not an ORSet: {other:?}"),
        }
    });
}

/// ORMap: removing a key concurrently with an update of it keeps the key.
#[test]
fn ormap_add_wins_under_concurrent_update_and_remove() {
    proptest!(|(inc in 1u64..10)| {
        let k = Element::string("k").to_any();
        let entry = |increment| OrMapEntryDelta { key: Some(k.clone()), delta: Some(wrap(Delta::Gcounter(GCounterDelta { increment }))) };
        let mut a = None;
        apply_user_delta(&mut a, &wrap(Delta::Ormap(OrMapDelta { added: vec![entry(5)], ..Default::default() })), 1, 0).unwrap();
        let mut b = a.clone();
        let rm = apply_user_delta(&mut a, &wrap(Delta::Ormap(OrMapDelta { removed: vec![k.clone()], ..Default::default() })), 1, 0).unwrap().unwrap();
        let up = apply_user_delta(&mut b, &wrap(Delta::Ormap(OrMapDelta { updated: vec![entry(inc)], ..Default::default() })), 2, 0).unwrap().unwrap();
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        a.join(&up);
        b.join(&rm);
        prop_assert_eq!(&a, &b);
        match a.read(&Voters::alone(1)) {
            // the removal reset what it saw (5); the concurrent update's contribution stays
            UserValue::ORMap(m) => prop_assert_eq!(m.get(&Element::from(&k)), Some(&UserValue::GCounter(inc))),
            other => prop_assert!(false, "not an ORMap: {other:?}"),
        }
    });
}
