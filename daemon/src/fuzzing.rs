//! Fuzz harnesses: one function per fuzz target, shared by the targets in `fuzz/` and by the
//! corpus replay in `daemon/tests/fuzz_corpus.rs` (so CI runs every committed input through
//! exactly what the fuzzer ran). Not part of the daemon's API.
//!
//! Each harness takes arbitrary bytes and must never panic, except on a broken property, which
//! it asserts. Inputs are a sequence of *steps*: an opcode byte, then for steps that carry bytes
//! a little-endian `u16` length and that many bytes (see [`Steps`]). `docs/fuzzing.md` says how
//! to run the fuzzers.
//!
//! - [`peer_frame`]: frames from a peer through a fresh [`Replicator`] (decode and apply),
//!   with a second replicator answering what it sends;
//! - [`swim_datagram`]: SWIM datagrams and timers through a [`Membership`];
//! - [`crdt_wire`]: the CRDT peer encoding (`latticed_crdt::wire`): decode, re-encode, join;
//! - [`uf_message`]: user-function messages through the entity state machine, its writes
//!   applied to a replicated value as the runtime applies them;
//! - [`user_delta`]: CloudState deltas applied to a user-function view ([`UserValue::apply`])
//!   and to a replicated value ([`apply_user_delta`]);
//! - [`stored_entry`]: a key's record as the data file holds it (`store::record`: a state, a
//!   tombstone or a delta), loaded into a store as a restarting node loads it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a panic is the finding

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use latticed_crdt::{
    apply_user_delta, diff, initial_delta, wire, CrdtValue, Footprint, Origin, UserValue, Voters,
};
use latticed_membership::{MemberState, Membership, MembershipConfig, NodeId, TimerEvent};
use latticed_proto::cloudstate::crdt::{CrdtDelta, CrdtStreamOut};
use prost::Message;

use crate::entity::machine::{
    ClientId, CommandIn, Config as MachineConfig, Input, Machine, Output as MachineOutput, UfEnd,
    WriteFailure,
};
use crate::replication::frame::Rejection;
use crate::replication::{Consistency, PeerInfo, ReplicationConfig, Replicator};
use crate::store::record::{self, Record};
use crate::store::{Entry, Store};

/// Whether `FUZZ_TRACE` is set: [`uf_message`] then prints its steps and the machine's
/// outputs (to read a crash).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// The fuzz targets, by name (each a function of this module, and a binary in `fuzz/`).
pub const TARGETS: [&str; 6] = [
    "peer_frame",
    "swim_datagram",
    "crdt_wire",
    "uf_message",
    "user_delta",
    "stored_entry",
];

/// A fuzz input read as steps: `next()` gives an opcode, `bytes()` the length-prefixed bytes
/// that follow it (a `u16` LE length, cut short at the end of the input).
pub struct Steps<'a> {
    data: &'a [u8],
}

impl<'a> Steps<'a> {
    /// Steps of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Steps { data }
    }

    /// The next opcode, if any input is left.
    pub fn op(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    /// The next length-prefixed bytes (empty at the end of the input).
    pub fn bytes(&mut self) -> &'a [u8] {
        let len = match self.data {
            [a, b, rest @ ..] => {
                self.data = rest;
                usize::from(u16::from_le_bytes([*a, *b]))
            }
            _ => {
                self.data = &[];
                0
            }
        };
        let len = len.min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }
}

/// Builds an input from steps (for seeds and tests): each `(op, Some(bytes))` is written as
/// the opcode and the length-prefixed bytes, `(op, None)` as the opcode alone.
pub fn steps_input(steps: &[(u8, Option<&[u8]>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (op, bytes) in steps {
        out.push(*op);
        if let Some(b) = bytes {
            let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&b[..usize::from(len)]);
        }
    }
    out
}

fn gcounter(n: u64) -> CrdtDelta {
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, GCounterDelta};
    CrdtDelta {
        delta: Some(Delta::Gcounter(GCounterDelta { increment: n })),
    }
}

fn orset_add(s: &str) -> CrdtDelta {
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, OrSetDelta};
    CrdtDelta {
        delta: Some(Delta::Orset(OrSetDelta {
            cleared: false,
            removed: vec![],
            added: vec![latticed_crdt::Element::string(s).to_any()],
        })),
    }
}

// ---------------------------------------------------------------------------------------------
// peer frames

/// The replicator under test and the peer that answers it.
const ME: &str = "me";
const PEERS: [&str; 2] = ["a", "b"];

fn up(names: &[&str]) -> Vec<PeerInfo> {
    names
        .iter()
        .map(|n| PeerInfo {
            name: (*n).to_string(),
            state: MemberState::Up,
            incarnation: 1,
        })
        .collect()
}

/// A replicator's identity in the harnesses: its name, replica id and epoch.
fn identity(name: &str, replica: u64) -> crate::replication::replicator::Identity {
    crate::replication::replicator::Identity {
        name: name.to_string(),
        replica,
        epoch: replica,
    }
}

/// Peer frames, decoded and applied by a fresh [`Replicator`] (replica 1, members `a` and `b`,
/// a few keys of its own). Steps, by `op % 4`:
/// - 0: time passes (`op / 4` × 50 ms) and both replicators tick;
/// - 1: a local write (`op / 4` picks the key and the type);
/// - 2, 3: the bytes that follow are a frame from peer `a` (2) or `b` (3).
///
/// After each step, what the replicator sent to `a` goes to a second replicator (replica 2,
/// named `a`), and what that one answers comes back, for a few rounds. Nothing may panic; a
/// frame is either applied or rejected, and a frame a replicator sent is accepted.
pub fn peer_frame(data: &[u8]) {
    let config = ReplicationConfig {
        buffer_max_bytes: 2048,
        tombstone_ttl: Some(Duration::from_secs(5)),
        ..ReplicationConfig::default()
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut me = Replicator::new(identity(ME, 1), config.clone(), 1);
    let mut peer = Replicator::new(identity(PEERS[0], 2), config, 2);
    me.set_members(&up(&PEERS));
    peer.set_members(&up(&[ME, "b"]));
    let _ = me.write(now, 1, "k0", &gcounter(1), Consistency::Local);
    let _ = me.write(now, 1, "k1", &orset_add("x"), Consistency::Majority);
    me.delete(now, "k2", Consistency::All);
    let mut steps = Steps::new(data);
    while let Some(op) = steps.op() {
        match op % 4 {
            0 => {
                now += Duration::from_millis(50 * u64::from(op / 4));
                me.tick(now);
                peer.tick(now);
            }
            1 => {
                let key = format!("k{}", (op / 4) % 4);
                let delta = if op & 4 == 0 {
                    gcounter(1)
                } else {
                    orset_add("y")
                };
                let _ = me.write(now, 1, &key, &delta, Consistency::Majority);
            }
            n => {
                let from = PEERS[usize::from(n - 2)];
                let _ = me.handle_frame(now, from, steps.bytes());
            }
        }
        exchange(now, &mut me, &mut peer);
    }
    // everything the replicator holds is still valid to send and to read
    for (key, entry) in me.store().iter() {
        let p = crate::replication::frame::entry_to_proto(key, entry);
        let (k, e) = crate::replication::frame::entry_from_proto(&p).expect("re-decodes");
        assert_eq!((&k, &e), (key, entry), "an entry changed through the wire");
        if let Entry::Value(v) = entry {
            let _ = v.read(&Voters::alone(1));
        }
    }
}

/// Moves frames between `me` and `peer` (named `a`) for a few rounds; the rest is dropped.
fn exchange(now: Instant, me: &mut Replicator, peer: &mut Replicator) {
    for _ in 0..4 {
        let mut quiet = true;
        for (to, body) in me.take_output().frames {
            if to == PEERS[0] {
                quiet = false;
                own_frame(peer.handle_frame(now, ME, &body), &body);
            }
        }
        for (to, body) in peer.take_output().frames {
            if to == ME {
                quiet = false;
                own_frame(me.handle_frame(now, PEERS[0], &body), &body);
            }
        }
        if quiet {
            return;
        }
    }
}

/// A frame a replicator encoded decodes and validates (a type mismatch is the receiver's
/// business: a key may come back as another type after its tombstone expired).
fn own_frame(r: Result<(), Rejection>, body: &[u8]) {
    let frame = crate::replication::frame::decode(body);
    let ok = matches!(r, Ok(()) | Err(Rejection::TypeMismatch));
    if trace() || !ok {
        eprintln!("frame {frame:?}: {r:?}");
    }
    assert!(ok, "a frame a replicator sent was rejected: {r:?}");
}

// ---------------------------------------------------------------------------------------------
// SWIM datagrams

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// SWIM datagrams through a [`Membership`] (`n1` at 127.0.0.1:7001). Steps, by `op % 4`:
/// - 0: the oldest timer it asked for fires;
/// - 1: it announces itself to 127.0.0.1:7002;
/// - 2, 3: the bytes that follow are a datagram.
///
/// At the end it leaves. Nothing may panic; its view never lists itself.
pub fn swim_datagram(data: &[u8]) {
    let me = NodeId::new("n1", addr(7001), 1);
    let mut m = Membership::new(me, &MembershipConfig::default(), 1);
    let mut timers: VecDeque<TimerEvent> = VecDeque::new();
    let mut steps = Steps::new(data);
    while let Some(op) = steps.op() {
        let out = match op % 4 {
            0 => match timers.pop_front() {
                Some(t) => m.handle_timer(t),
                None => continue,
            },
            1 => match m.announce(addr(7002)) {
                Ok(o) => o,
                Err(_) => continue,
            },
            _ => match m.handle_datagram(steps.bytes()) {
                Ok(o) => o,
                Err(_) => continue,
            },
        };
        for (_, t) in out.timers {
            if timers.len() < 64 {
                timers.push_back(t);
            }
        }
        let members = m.members();
        assert_eq!(members[0].id.name, "n1");
        assert!(
            members[1..].iter().all(|v| v.id.name != "n1"),
            "this node listed twice: {members:?}"
        );
    }
    let _ = m.leave();
}

/// Datagrams two real members exchange while one joins the other and they probe each other:
/// seeds for [`swim_datagram`], as its input (each datagram a step).
pub fn swim_seed_datagrams() -> Vec<Vec<u8>> {
    let config = MembershipConfig::default();
    let mut a = Membership::new(NodeId::new("n1", addr(7001), 1), &config, 1);
    let mut b = Membership::new(NodeId::new("n2", addr(7002), 1), &config, 2);
    let mut seen = Vec::new();
    let mut queue: VecDeque<(SocketAddr, bytes::Bytes)> = VecDeque::new();
    let mut timers: Vec<(SocketAddr, TimerEvent)> = Vec::new();
    if let Ok(o) = b.announce(addr(7001)) {
        queue.extend(o.datagrams);
        timers.extend(o.timers.into_iter().map(|(_, t)| (addr(7002), t)));
    }
    for _ in 0..40 {
        if queue.is_empty() {
            let Some((who, t)) = (!timers.is_empty()).then(|| timers.remove(0)) else {
                break;
            };
            let o = if who == addr(7001) {
                a.handle_timer(t)
            } else {
                b.handle_timer(t)
            };
            queue.extend(o.datagrams);
            timers.extend(o.timers.into_iter().map(|(_, t)| (who, t)));
            continue;
        }
        let Some((to, data)) = queue.pop_front() else {
            break;
        };
        seen.push(data.to_vec());
        let target = if to == addr(7001) { &mut a } else { &mut b };
        if let Ok(o) = target.handle_datagram(&data) {
            queue.extend(o.datagrams);
            timers.extend(o.timers.into_iter().map(|(_, t)| (to, t)));
        }
    }
    seen.extend(b.leave().datagrams.into_iter().map(|(_, d)| d.to_vec()));
    seen
}

// ---------------------------------------------------------------------------------------------
// CRDT peer encoding

/// The CRDT peer encoding: the first length-prefixed bytes are a value or delta, the rest of
/// the input another one. A value that decodes re-encodes to one that decodes equal, reads,
/// and joins with itself without changing; two values of one type join either way round to
/// the same value.
pub fn crdt_wire(data: &[u8]) {
    let mut steps = Steps::new(data);
    let first = steps.bytes();
    let rest = steps.data;
    let Ok(a) = wire::decode(first) else {
        return;
    };
    check_value(&a);
    let Ok(b) = wire::decode(rest) else {
        return;
    };
    check_value(&b);
    if a.kind() == b.kind() {
        let ab = a.clone().joined(&b);
        let ba = b.clone().joined(&a);
        check_value(&ab);
        if !a.is_delta() && !b.is_delta() {
            assert_eq!(ab, ba, "join is not commutative");
        }
    }
}

/// Fuzz target `stored_entry`: the whole input is one key's record as the data file holds it
/// (`store::record`: a tag byte, then a value's peer encoding, a tombstone's time, or a delta's
/// peer encoding). It must decode or be refused, never panic; a decoded record encodes back to
/// the same record, its value passes the checks of [`crdt_wire`], and it loads into a store,
/// where a peer's copy of the same entry changes nothing. A delta record replays onto the empty
/// state of its type as the delta joins into it, and onto a tombstone not at all.
pub fn stored_entry(data: &[u8]) {
    if let Ok(d) = record::decode_delta(data) {
        check_value(&d);
        let again = record::decode_delta(&record::encode_delta(&d)).expect("a delta decodes");
        assert_eq!(again, d, "a delta changed through the data file");
        let empty = CrdtValue::empty(d.kind());
        let replayed = record::replay(Record::Value(empty.clone()), [d.clone()]);
        assert_eq!(replayed, Ok(Record::Value(empty.joined(&d))));
        let tombstone = Record::Tombstone { deleted_at_ms: 0 };
        assert!(record::replay(tombstone, [d]).is_err());
        return;
    }
    let Ok(r) = record::decode(data) else {
        return;
    };
    let at = match &r {
        Record::Value(v) => {
            check_value(v);
            assert!(!v.is_delta(), "a stored value loads as a state");
            0
        }
        Record::Tombstone { deleted_at_ms } => *deleted_at_ms,
    };
    let entry = r.clone().into_entry();
    let again = record::decode(&record::encode(&entry, at)).expect("an encoded record decodes");
    assert_eq!(again, r, "a record changed through the data file");
    let mut store = Store::new(0);
    store.load("k".into(), entry.clone());
    assert_eq!(store.get("k"), Some(&entry));
    assert_eq!(
        store.join("k", &entry),
        Ok(false),
        "its own entry changed a loaded key"
    );
}

fn check_value(v: &CrdtValue) {
    let bytes = wire::encode(v);
    assert_eq!(
        bytes,
        prost::Message::encode_to_vec(&wire::to_proto(v)),
        "the direct encoding is not prost's"
    );
    assert_eq!(wire::encoded_len(v), bytes.len());
    let again = wire::decode(&bytes).expect("an encoded value decodes");
    assert_eq!(&again, v, "a value changed through the wire");
    assert_eq!(wire::digest(&again), wire::digest(v));
    let _ = v.read(&Voters::alone(1));
    if !v.is_delta() {
        assert_eq!(&v.clone().joined(v), v, "join with itself changed a value");
    }
}

// ---------------------------------------------------------------------------------------------
// CloudState deltas

/// CloudState deltas as a user function and the proxy apply them. Each step is an opcode (bit
/// 0: the origin is the proxy; bits 1-2: the replica, 1 to 4; bits 3-7: the LWW time) and the
/// bytes of a `CrdtDelta`. Checked:
/// - [`UserValue::apply`] and [`apply_user_delta`] leave the value unchanged on error;
/// - the delta `apply_user_delta` returns, joined into the value before, gives the value after;
/// - what the replicated value reads as, `initial_delta` makes from nothing, and `diff` from the
///   previous reading, as a user function applies them.
pub fn user_delta(data: &[u8]) {
    let mut view: Option<UserValue> = None;
    let mut value: Option<CrdtValue> = None;
    let mut steps = Steps::new(data);
    while let Some(op) = steps.op() {
        let Ok(delta) = CrdtDelta::decode(steps.bytes()) else {
            continue;
        };
        let origin = if op & 1 == 1 {
            Origin::Proxy
        } else {
            Origin::UserFunction
        };
        let replica = u64::from((op >> 1) & 3) + 1;
        let now_ms = i64::from(op >> 3) * 1000;
        match &mut view {
            None => view = UserValue::from_delta(&delta, origin).ok(),
            Some(v) => {
                let before = v.clone();
                if v.apply(&delta, origin).is_err() {
                    assert_eq!(v, &before, "a failed apply changed the view");
                }
            }
        }
        let voters = Voters {
            me: replica,
            live: (1..=4).collect(),
        };
        let before = value.clone();
        let old_read = before.as_ref().map(|v| v.read(&voters));
        match apply_user_delta(&mut value, &delta, replica, now_ms) {
            Err(_) => assert_eq!(value, before, "a failed delta changed the value"),
            Ok(None) => assert_eq!(value, before, "no delta, yet the value changed"),
            Ok(Some(d)) => {
                let after = value.as_ref().expect("a value after a delta");
                if let Some(b) = &before {
                    assert_eq!(&b.clone().joined(&d), after, "delta ⊔ before ≠ after");
                }
                let _ = wire::decode(&wire::encode(&d)).expect("a delta re-decodes");
                let now_read = after.read(&voters);
                let fresh = UserValue::from_delta(&initial_delta(&now_read), Origin::Proxy)
                    .expect("an initial delta applies");
                assert_eq!(fresh, now_read, "initial_delta does not rebuild the value");
                if let Some(old) = old_read {
                    if let Ok(Some(change)) = diff(&old, &now_read) {
                        let mut uf = old.clone();
                        uf.apply(&change, Origin::Proxy).expect("a diff applies");
                        assert_eq!(uf, now_read, "diff does not take old to new");
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// user-function messages

/// Messages from a user function through the entity state machine. Steps, by `op % 8`:
/// - 0, 1: the bytes that follow are a `CrdtStreamOut` from the user function;
/// - 2: a client command (`op / 8` odd: a streamed one);
/// - 3: the oldest write asked for completes (`op / 8` picks: ok, invalid, consistency);
/// - 4: the oldest synchronous side effect completes;
/// - 5: the bytes that follow are a peer's value or delta (wire encoding), joined into the
///   replicated value, and the key changes;
/// - 6: time passes (`op / 8` seconds) and timers fire;
/// - 7: `op / 8` picks: a streamed client leaves, the stream ends, the node drains, members.
///
/// Writes are applied to the replicated value with [`apply_user_delta`] as the replicator does;
/// reads are answered with it. Nothing may panic; a client's call ends once (a unary reply or
/// forward, a stream's end; by the time the machine has stopped, every client that did not
/// leave has had its end), and a streamed client gets nothing after its end.
pub fn uf_message(data: &[u8]) {
    let t0 = Instant::now();
    let mut now = t0;
    let voters = Voters::alone(1);
    let mut m = Machine::new("svc", "e", "svc-e", MachineConfig::default(), voters, now);
    let mut w = UfWorld::default();
    let mut streamed: Vec<ClientId> = Vec::new();
    // streamed clients that left: they need no end
    let mut gone: BTreeSet<ClientId> = BTreeSet::new();
    let mut next_client: ClientId = 0;
    let mut steps = Steps::new(data);
    w.drain(now, &mut m);
    while let Some(op) = steps.op() {
        let arg = op / 8;
        if trace() {
            eprintln!("step {} arg {arg}", op % 8);
        }
        match op % 8 {
            0 | 1 => {
                if let Ok(msg) = CrdtStreamOut::decode(steps.bytes()) {
                    if trace() {
                        eprintln!("  -> {msg:?}");
                    }
                    m.handle(now, Input::FromUf(msg));
                }
            }
            2 => {
                next_client += 1;
                let is_streamed = arg % 2 == 1;
                if is_streamed {
                    streamed.push(next_client);
                    w.streaming.insert(next_client);
                }
                m.handle(
                    now,
                    Input::Command(CommandIn {
                        client: next_client,
                        name: "Do".into(),
                        input_type: "Do".into(),
                        payload: vec![arg],
                        streamed: is_streamed,
                    }),
                );
            }
            3 => {
                if let Some(op) = w.writes.pop_front() {
                    let result = match arg % 3 {
                        0 => Ok(()),
                        1 => Err(WriteFailure::Invalid("invalid".into())),
                        _ => Err(WriteFailure::Consistency("consistency".into())),
                    };
                    m.handle(now, Input::WriteDone(op, result));
                }
            }
            4 => {
                if let Some(e) = w.effects.pop_front() {
                    m.handle(now, Input::RouteDone(e));
                }
            }
            5 => {
                if let Ok(remote) = wire::decode(steps.bytes()) {
                    let footprint = Footprint::of(&remote);
                    let changed = match &mut w.replicated {
                        None => {
                            w.replicated = Some(Entry::Value(remote.into_state()));
                            true
                        }
                        Some(Entry::Value(v)) if v.kind() == remote.kind() => v.join(&remote),
                        _ => false,
                    };
                    if changed {
                        m.handle(now, Input::KeyChanged(footprint));
                    }
                }
            }
            6 => {
                now += Duration::from_secs(u64::from(arg));
                while m.next_timeout().is_some_and(|t| t <= now) {
                    m.handle_timeout(now);
                }
            }
            _ => match arg % 4 {
                0 => {
                    if let Some(c) = streamed.pop() {
                        gone.insert(c);
                        m.handle(now, Input::ClientGone(c));
                    }
                }
                1 => m.handle(now, Input::UfEnded(UfEnd::Completed)),
                2 => m.handle(now, Input::Drain),
                _ => m.handle(now, Input::Members((1..=u64::from(arg % 5)).collect())),
            },
        }
        w.drain(now, &mut m);
        if m.is_stopped() {
            break;
        }
    }
    m.shutdown();
    w.drain(now, &mut m);
    let unanswered: Vec<ClientId> = (1..=next_client)
        .filter(|c| !w.replied.contains(c) && !gone.contains(c))
        .collect();
    assert!(
        unanswered.is_empty(),
        "clients never answered once the machine stopped: {unanswered:?}"
    );
}

/// What surrounds the machine: the replicated value and the operations in flight.
#[derive(Default)]
struct UfWorld {
    replicated: Option<Entry>,
    writes: VecDeque<u64>,
    effects: VecDeque<u64>,
    /// clients whose call is over (a unary reply or forward, a stream's end)
    replied: BTreeSet<ClientId>,
    /// clients of streamed calls
    streaming: BTreeSet<ClientId>,
}

impl UfWorld {
    /// Handles the machine's outputs the way the entity task does, until there are none.
    fn drain(&mut self, now: Instant, m: &mut Machine) {
        let (replicated, writes, effects, replied, streaming) = (
            &mut self.replicated,
            &mut self.writes,
            &mut self.effects,
            &mut self.replied,
            &self.streaming,
        );
        let mut budget = 10_000;
        while let Some(out) = m.poll_output() {
            if trace() {
                eprintln!("  <- {out:?}");
            }
            budget -= 1;
            assert!(budget > 0, "the machine never stops producing outputs");
            match out {
                MachineOutput::ReadReplicated(part) => m.handle(
                    now,
                    Input::Replicated(replicated.as_ref().map(|e| e.part(&part))),
                ),
                MachineOutput::Write { op, delta, .. } => {
                    let result = match replicated {
                        Some(Entry::Deleted) => Err(WriteFailure::Deleted),
                        _ => {
                            let mut v = match replicated.take() {
                                Some(Entry::Value(v)) => Some(v),
                                _ => None,
                            };
                            let r = apply_user_delta(&mut v, &delta, 1, 1_000);
                            *replicated = v.map(Entry::Value);
                            r.map(|_| ())
                                .map_err(|e| WriteFailure::Invalid(e.to_string()))
                        }
                    };
                    match result {
                        // completes later, when the input says
                        Ok(()) => writes.push_back(op),
                        Err(e) => m.handle(now, Input::WriteDone(op, Err(e))),
                    }
                }
                MachineOutput::Delete { op, .. } => {
                    *replicated = Some(Entry::Deleted);
                    writes.push_back(op);
                }
                MachineOutput::Route { op: Some(op), .. } => effects.push_back(op),
                MachineOutput::Reply { client, .. }
                | MachineOutput::Route {
                    reply_to: Some(client),
                    ..
                } if !streaming.contains(&client) => {
                    assert!(replied.insert(client), "client {client} answered twice");
                }
                MachineOutput::Stream { client, .. } => {
                    assert!(
                        !replied.contains(&client),
                        "a message for client {client} after its call ended"
                    );
                }
                MachineOutput::EndStream { client, .. } => {
                    assert!(replied.insert(client), "client {client} ended twice");
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// seeds

/// One CloudState delta of every type (and some variants), for seeds.
pub fn sample_deltas() -> Vec<CrdtDelta> {
    use latticed_proto::cloudstate::crdt::{
        crdt_delta::Delta, FlagDelta, GSetDelta, LwwRegisterDelta, OrMapDelta, OrMapEntryDelta,
        OrSetDelta, PnCounterDelta, VoteDelta,
    };
    let any = |s: &str| latticed_crdt::Element::string(s).to_any();
    let d = |x: Delta| CrdtDelta { delta: Some(x) };
    vec![
        gcounter(3),
        d(Delta::Pncounter(PnCounterDelta { change: -2 })),
        d(Delta::Gset(GSetDelta {
            added: vec![any("a"), any("b")],
        })),
        orset_add("x"),
        d(Delta::Orset(OrSetDelta {
            cleared: true,
            removed: vec![any("x")],
            added: vec![any("z")],
        })),
        d(Delta::Lwwregister(LwwRegisterDelta {
            value: Some(any("v")),
            clock: 0,
            custom_clock_value: 0,
        })),
        d(Delta::Lwwregister(LwwRegisterDelta {
            value: Some(any("w")),
            clock: 2,
            custom_clock_value: 7,
        })),
        d(Delta::Flag(FlagDelta { value: true })),
        d(Delta::Ormap(OrMapDelta {
            cleared: false,
            removed: vec![],
            updated: vec![],
            added: vec![OrMapEntryDelta {
                key: Some(any("m")),
                delta: Some(gcounter(1)),
            }],
        })),
        d(Delta::Ormap(OrMapDelta {
            cleared: false,
            removed: vec![any("gone")],
            updated: vec![OrMapEntryDelta {
                key: Some(any("m")),
                delta: Some(gcounter(2)),
            }],
            added: vec![OrMapEntryDelta {
                key: Some(any("s")),
                delta: Some(orset_add("q")),
            }],
        })),
        d(Delta::Vote(VoteDelta {
            self_vote: true,
            votes_for: 1,
            total_voters: 1,
        })),
    ]
}

/// Seed inputs for a target (`peer_frame`, `swim_datagram`, `crdt_wire`, `uf_message`,
/// `user_delta`): valid messages of every kind the decoder reads, in the target's input format.
/// The corpus replay runs them too; `docs/fuzzing.md` says how to write them out.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "peer_frame" => peer_frame_seeds(),
        "swim_datagram" => {
            let datagrams = swim_seed_datagrams();
            let mut out: Vec<Vec<u8>> = datagrams
                .iter()
                .map(|d| steps_input(&[(2, Some(d)), (0, None)]))
                .collect();
            let all: Vec<(u8, Option<&[u8]>)> =
                datagrams.iter().map(|d| (2, Some(d.as_slice()))).collect();
            out.push(steps_input(&all));
            out
        }
        "crdt_wire" => {
            let values = sample_values();
            let mut out = Vec::new();
            for pair in values.windows(2) {
                let a = wire::encode(&pair[0]);
                let mut input = steps_input(&[(0, Some(&a))]);
                input.remove(0);
                input.extend_from_slice(&wire::encode(&pair[1]));
                out.push(input);
            }
            out
        }
        "user_delta" => {
            let deltas: Vec<Vec<u8>> = sample_deltas().iter().map(|d| d.encode_to_vec()).collect();
            let mut out: Vec<Vec<u8>> = deltas
                .iter()
                .map(|d| steps_input(&[(0, Some(d)), (2, Some(d)), (9, Some(d))]))
                .collect();
            // an ORMap created, then changed
            out.push(steps_input(&[(0, Some(&deltas[8])), (8, Some(&deltas[9]))]));
            out
        }
        "uf_message" => uf_message_seeds(),
        "stored_entry" => {
            let mut out: Vec<Vec<u8>> = sample_values()
                .into_iter()
                .flat_map(|v| {
                    let delta = record::encode_delta(&v);
                    [record::encode(&Entry::Value(v.into_state()), 0), delta]
                })
                .collect();
            out.push(record::encode(&Entry::Deleted, 1_700_000_000_000));
            out
        }
        _ => Vec::new(),
    }
}

/// Values and deltas of every type: each sample delta applied to nothing, then to the result.
fn sample_values() -> Vec<CrdtValue> {
    let mut out = Vec::new();
    for d in sample_deltas() {
        let mut v = None;
        if let Ok(Some(delta)) = apply_user_delta(&mut v, &d, 1, 1_000) {
            out.push(delta);
        }
        if let Ok(Some(delta)) = apply_user_delta(&mut v, &d, 2, 2_000) {
            out.push(delta);
        }
        out.extend(v);
    }
    out
}

fn peer_frame_seeds() -> Vec<Vec<u8>> {
    // two replicators talking: every frame the one named `a` sends to `me`
    let config = ReplicationConfig::default();
    let t0 = Instant::now();
    let mut me = Replicator::new(identity(ME, 1), config.clone(), 1);
    let mut a = Replicator::new(identity("a", 2), config, 2);
    me.set_members(&up(&["a"]));
    a.set_members(&up(&[ME]));
    let mut frames = vec![crate::replication::frame::hello(2, 2, "a")];
    for (i, d) in sample_deltas().iter().enumerate() {
        let key = format!("k{i}");
        let _ = a.write(t0, 5, &key, d, Consistency::Local);
        let _ = me.write(t0, 5, &key, d, Consistency::Local);
    }
    a.delete(t0, "k0", Consistency::Local);
    let mut now = t0;
    for _ in 0..20 {
        now += Duration::from_millis(100);
        me.tick(now);
        a.tick(now);
        for _ in 0..4 {
            for (to, body) in a.take_output().frames {
                if to == ME {
                    let _ = me.handle_frame(now, "a", &body);
                    frames.push(body);
                }
            }
            for (to, body) in me.take_output().frames {
                if to == "a" {
                    let _ = a.handle_frame(now, ME, &body);
                }
            }
        }
    }
    frames.sort();
    frames.dedup();
    frames
        .iter()
        .map(|f| steps_input(&[(2, Some(f)), (4 * 20, None)]))
        .collect()
}

fn uf_message_seeds() -> Vec<Vec<u8>> {
    use latticed_proto::cloudstate::crdt::{
        crdt_state_action, crdt_stream_out, CrdtReply, CrdtStateAction,
        CrdtStreamCancelledResponse, CrdtStreamedMessage,
    };
    use latticed_proto::cloudstate::{client_action, ClientAction, Failure, Reply, SideEffect};
    let reply = |id: i64, action: Option<crdt_state_action::Action>, streamed: bool| {
        CrdtStreamOut {
            message: Some(crdt_stream_out::Message::Reply(CrdtReply {
                command_id: id,
                client_action: Some(ClientAction {
                    action: Some(client_action::Action::Reply(Reply {
                        payload: None,
                        metadata: None,
                    })),
                }),
                side_effects: vec![SideEffect {
                    service_name: "svc".into(),
                    command_name: "Other".into(),
                    payload: None,
                    synchronous: id % 2 == 0,
                    metadata: None,
                }],
                state_action: action.map(|a| CrdtStateAction {
                    action: Some(a),
                    write_consistency: 1,
                }),
                streamed,
            })),
        }
        .encode_to_vec()
    };
    let mut out = Vec::new();
    let values = sample_values();
    for (i, d) in sample_deltas().into_iter().enumerate() {
        let remote = wire::encode(&values[i.min(values.len() - 1)]);
        let r1 = reply(1, Some(crdt_state_action::Action::Update(d.clone())), false);
        let r2 = reply(2, Some(crdt_state_action::Action::Update(d)), true);
        out.push(steps_input(&[
            (2, None),
            (0, Some(&r1)),
            (3, None),
            (2 + 8, None),
            (0, Some(&r2)),
            (3, None),
            (4, None),
            (5, Some(&remote)),
            (7, None),
            (6 + 8 * 31, None),
        ]));
    }
    let streamed = CrdtStreamOut {
        message: Some(crdt_stream_out::Message::StreamedMessage(
            CrdtStreamedMessage {
                command_id: 1,
                client_action: None,
                side_effects: vec![],
                end_stream: true,
            },
        )),
    }
    .encode_to_vec();
    let cancelled = CrdtStreamOut {
        message: Some(crdt_stream_out::Message::StreamCancelledResponse(
            CrdtStreamCancelledResponse {
                command_id: 1,
                side_effects: vec![],
                state_action: None,
            },
        )),
    }
    .encode_to_vec();
    let failure = CrdtStreamOut {
        message: Some(crdt_stream_out::Message::Failure(Failure {
            command_id: 2,
            description: "no".into(),
            restart: false,
        })),
    }
    .encode_to_vec();
    let delete = reply(
        3,
        Some(crdt_state_action::Action::Delete(Default::default())),
        false,
    );
    out.push(steps_input(&[
        (2 + 8, None),
        (0, Some(&streamed)),
        (7, None),
        (0, Some(&cancelled)),
        (2, None),
        (0, Some(&failure)),
        (2, None),
        (0, Some(&delete)),
        (3, None),
        (7 + 16, None),
    ]));
    out
}
