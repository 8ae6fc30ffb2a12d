//! The entity state machine, driven deterministically: a fake user function (a PNCounter that
//! answers commands and applies pushed deltas), a fake replicated value (its writes applied as
//! operations of this replica, remote changes joined in), and a seeded scheduler that
//! interleaves client commands, user-function answers, write completions, remote changes and
//! time in random orders. Checked on every run:
//! - no delta is pushed while a command or a cancellation is outstanding at the user function;
//! - commands reach the user function in arrival order, ids 1, 2, 3 ... on each stream;
//! - every client gets exactly one outcome;
//! - once everything has settled, the user function holds the replicated value.
//!
//! The seed of a failing run is printed; `ENTITY_SEED=n` reruns one seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use latticed::entity::machine::{
    ClientId, CommandIn, Config, EndReason, Input, Machine, Output, UfEnd, WriteFailure,
};
use latticed::entity::{ENTITY_DELETED, ENTITY_TERMINATING};
use latticed::replication::Consistency;
use latticed::store::Entry;
use latticed_crdt::{apply_user_delta, CrdtValue, Footprint, Voters};
use latticed_proto::cloudstate::crdt::{
    crdt_delta, crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtDelta, CrdtReply,
    CrdtStateAction, CrdtStreamCancelledResponse, CrdtStreamOut, CrdtStreamedMessage,
    PnCounterDelta,
};
use latticed_proto::cloudstate::{client_action, ClientAction, Reply, SideEffect};
use latticed_proto::wkt::Any;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const ME: u64 = 1;
const OTHER: u64 = 2;

fn pn(change: i64) -> CrdtDelta {
    CrdtDelta {
        delta: Some(crdt_delta::Delta::Pncounter(PnCounterDelta { change })),
    }
}

fn value_of(v: &Option<CrdtValue>) -> i64 {
    match v.as_ref().map(|v| v.read(&Voters::alone(ME))) {
        Some(latticed_crdt::UserValue::PNCounter(n)) => n,
        None => 0,
        other => panic!("not a PNCounter: {other:?}"),
    }
}

/// A user function holding a PNCounter; a command's payload is the change (i64 LE); with
/// `effect_on_self` every command's reply asks for a synchronous side effect first.
#[derive(Default)]
struct FakeUf {
    value: i64,
    /// messages received and not yet handled
    inbox: VecDeque<crdt_stream_in::Message>,
    /// command ids received, in order, this stream
    ids: Vec<i64>,
    /// commands answered minus received: the ones outstanding
    outstanding: BTreeSet<i64>,
    cancelling: BTreeSet<i64>,
    streamed: BTreeSet<i64>,
    open: bool,
}

impl FakeUf {
    /// Handles the oldest message; returns what it answers.
    fn step(&mut self, rng: &mut StdRng) -> Vec<CrdtStreamOut> {
        let Some(m) = self.inbox.pop_front() else {
            return vec![];
        };
        match m {
            crdt_stream_in::Message::Init(i) => {
                self.value = match i.delta.and_then(|d| d.delta) {
                    Some(crdt_delta::Delta::Pncounter(p)) => p.change,
                    None => 0,
                    other => panic!("init with {other:?}"),
                };
                vec![]
            }
            crdt_stream_in::Message::Delta(d) => {
                match d.delta {
                    Some(crdt_delta::Delta::Pncounter(p)) => self.value += p.change,
                    other => panic!("delta {other:?}"),
                }
                // a subscriber hears of the change
                self.streamed
                    .iter()
                    .map(|id| streamed(*id, self.value))
                    .collect()
            }
            crdt_stream_in::Message::Command(c) => {
                let change = i64::from_le_bytes(c.payload.unwrap().value.try_into().unwrap());
                self.value += change;
                self.outstanding.remove(&c.id);
                if c.streamed {
                    self.streamed.insert(c.id);
                }
                let mut side_effects = vec![];
                if rng.random_bool(0.2) {
                    side_effects.push(SideEffect {
                        service_name: "svc".into(),
                        command_name: "Other".into(),
                        payload: None,
                        synchronous: rng.random_bool(0.5),
                        metadata: None,
                    });
                }
                let consistency = if rng.random_bool(0.3) { 1 } else { 0 };
                vec![CrdtStreamOut {
                    message: Some(crdt_stream_out::Message::Reply(CrdtReply {
                        command_id: c.id,
                        client_action: Some(reply(self.value)),
                        side_effects,
                        state_action: (change != 0).then(|| CrdtStateAction {
                            action: Some(crdt_state_action::Action::Update(pn(change))),
                            write_consistency: consistency,
                        }),
                        streamed: c.streamed,
                    })),
                }]
            }
            crdt_stream_in::Message::StreamCancelled(c) => {
                self.streamed.remove(&c.id);
                self.cancelling.remove(&c.id);
                // sometimes never answered, as node-support does without a cancel callback
                if rng.random_bool(0.3) {
                    return vec![];
                }
                self.value += 1;
                vec![CrdtStreamOut {
                    message: Some(crdt_stream_out::Message::StreamCancelledResponse(
                        CrdtStreamCancelledResponse {
                            command_id: c.id,
                            side_effects: vec![],
                            state_action: Some(CrdtStateAction {
                                action: Some(crdt_state_action::Action::Update(pn(1))),
                                write_consistency: 0,
                            }),
                        },
                    )),
                }]
            }
            crdt_stream_in::Message::Delete(_) => vec![],
        }
    }
}

fn reply(value: i64) -> ClientAction {
    ClientAction {
        action: Some(client_action::Action::Reply(Reply {
            payload: Some(Any {
                type_url: "type.googleapis.com/Value".into(),
                value: value.to_le_bytes().to_vec(),
            }),
            metadata: None,
        })),
    }
}

fn streamed(id: i64, value: i64) -> CrdtStreamOut {
    CrdtStreamOut {
        message: Some(crdt_stream_out::Message::StreamedMessage(
            CrdtStreamedMessage {
                command_id: id,
                client_action: Some(reply(value)),
                side_effects: vec![],
                end_stream: false,
            },
        )),
    }
}

/// One run: the machine, the fakes around it, and what the checks need.
struct World {
    rng: StdRng,
    now: Instant,
    machine: Machine,
    uf: FakeUf,
    replicated: Option<CrdtValue>,
    /// writes applied locally, waiting for their consistency
    writes: Vec<u64>,
    /// synchronous side effects in flight
    effects: Vec<u64>,
    reads: u32,
    /// client -> outcomes received
    outcomes: HashMap<ClientId, u32>,
    streamed_clients: BTreeSet<ClientId>,
    ended: BTreeSet<ClientId>,
    /// streamed clients that went away (they need no end)
    gone: BTreeSet<ClientId>,
    /// command payloads in the order the clients sent them, and as the user function got them
    sent_order: Vec<ClientId>,
    payload_of: HashMap<ClientId, i64>,
    uf_order: Vec<i64>,
    next_client: ClientId,
    remote: i64,
    stopped: Option<EndReason>,
}

impl World {
    fn new(seed: u64, config: Config) -> World {
        let now = Instant::now();
        World {
            rng: StdRng::seed_from_u64(seed),
            now,
            machine: Machine::new("svc", "e", "svc-e", config, Voters::alone(ME), now),
            uf: FakeUf::default(),
            replicated: None,
            writes: vec![],
            effects: vec![],
            reads: 0,
            outcomes: HashMap::new(),
            streamed_clients: BTreeSet::new(),
            ended: BTreeSet::new(),
            gone: BTreeSet::new(),
            sent_order: vec![],
            payload_of: HashMap::new(),
            uf_order: vec![],
            next_client: 0,
            remote: 0,
            stopped: None,
        }
    }

    fn entry(&self) -> Option<Entry> {
        self.replicated.clone().map(Entry::Value)
    }

    /// Carries out every output, checking the rules as it goes.
    fn drain(&mut self) {
        while let Some(o) = self.machine.poll_output() {
            if std::env::var_os("ENTITY_TRACE").is_some() {
                eprintln!("{o:?}");
            }
            match o {
                Output::OpenUf => {
                    self.uf = FakeUf {
                        open: true,
                        ..FakeUf::default()
                    };
                }
                Output::ToUf(m) => {
                    assert!(
                        self.uf.open,
                        "a message on a stream that is not open: {m:?}"
                    );
                    let m = m.message.unwrap();
                    match &m {
                        crdt_stream_in::Message::Delta(_) => {
                            assert!(
                                self.uf.outstanding.is_empty() && self.uf.cancelling.is_empty(),
                                "a delta pushed while {:?} / cancellations {:?} are outstanding",
                                self.uf.outstanding,
                                self.uf.cancelling
                            );
                        }
                        crdt_stream_in::Message::Command(c) => {
                            assert_eq!(c.id, self.uf.ids.len() as i64 + 1, "ids from 1, in order");
                            self.uf.ids.push(c.id);
                            self.uf.outstanding.insert(c.id);
                            let v = i64::from_le_bytes(
                                c.payload.clone().unwrap().value.try_into().unwrap(),
                            );
                            self.uf_order.push(v);
                        }
                        crdt_stream_in::Message::StreamCancelled(c) => {
                            self.uf.cancelling.insert(c.id);
                        }
                        _ => {}
                    }
                    self.uf.inbox.push_back(m);
                }
                Output::CloseUf => {
                    // the fake completes its side once it has handled what it has
                    self.uf.open = false;
                }
                Output::CancelUf => {
                    self.uf.open = false;
                    self.uf.inbox.clear();
                }
                Output::ReadReplicated(_) => self.reads += 1,
                Output::Write {
                    op,
                    delta,
                    consistency,
                } => {
                    apply_user_delta(&mut self.replicated, &delta, ME, 0).unwrap();
                    if consistency == Consistency::Local {
                        self.machine.handle(self.now, Input::WriteDone(op, Ok(())));
                    } else {
                        self.writes.push(op);
                    }
                }
                Output::Delete { .. } => panic!("no delete in this model"),
                Output::Route { op, .. } => {
                    if let Some(op) = op {
                        self.effects.push(op);
                    }
                }
                Output::Reply { client, .. } => {
                    *self.outcomes.entry(client).or_default() += 1;
                }
                Output::Stream { .. } => {}
                Output::EndStream { client, .. } => {
                    assert!(self.ended.insert(client), "a stream ended twice");
                }
                Output::ReportError(e) => panic!("reported: {e}"),
                Output::Stopped(reason) => self.stopped = Some(reason),
            }
        }
    }

    fn step(&mut self) {
        match self.rng.random_range(0..10) {
            0 | 1 => {
                // a client's command (sometimes streamed)
                self.next_client += 1;
                let client = self.next_client;
                let change = self.rng.random_range(-5..=5i64);
                let streamed = self.rng.random_bool(0.15);
                if streamed {
                    self.streamed_clients.insert(client);
                }
                self.sent_order.push(client);
                self.payload_of.insert(client, change);
                self.machine.handle(
                    self.now,
                    Input::Command(CommandIn {
                        client,
                        name: "Change".into(),
                        input_type: "Change".into(),
                        payload: change.to_le_bytes().to_vec(),
                        streamed,
                    }),
                );
            }
            2..=4 => {
                let outs = self.uf.step(&mut self.rng);
                for o in outs {
                    self.machine.handle(self.now, Input::FromUf(o));
                }
            }
            5 => {
                if !self.writes.is_empty() {
                    let i = self.rng.random_range(0..self.writes.len());
                    let op = self.writes.swap_remove(i);
                    let r = if self.rng.random_bool(0.2) {
                        Err(WriteFailure::Consistency("not enough acks".into()))
                    } else {
                        Ok(())
                    };
                    self.machine.handle(self.now, Input::WriteDone(op, r));
                }
            }
            6 => {
                if !self.effects.is_empty() {
                    let i = self.rng.random_range(0..self.effects.len());
                    let op = self.effects.swap_remove(i);
                    self.machine.handle(self.now, Input::RouteDone(op));
                }
            }
            7 => {
                // another node's write
                let change = self.rng.random_range(1..=3);
                self.remote += change;
                apply_user_delta(&mut self.replicated, &pn(change), OTHER, 0).unwrap();
                self.machine
                    .handle(self.now, Input::KeyChanged(Footprint::All));
            }
            8 => {
                if self.reads > 0 {
                    self.reads -= 1;
                    let e = self.entry();
                    self.machine.handle(self.now, Input::Replicated(e));
                }
            }
            _ => {
                // a streamed client goes away
                if let Some(c) = self.streamed_clients.iter().next().copied() {
                    if self.rng.random_bool(0.3) {
                        self.streamed_clients.remove(&c);
                        self.gone.insert(c);
                        self.machine.handle(self.now, Input::ClientGone(c));
                    }
                }
                self.now += Duration::from_millis(self.rng.random_range(0..50));
                self.machine.handle_timeout(self.now);
            }
        }
        self.drain();
        self.check_view();
    }

    fn check_view(&self) {
        if self.uf.inbox.is_empty() && self.uf.open {
            let view = match self.machine.view() {
                Some(latticed_crdt::UserValue::PNCounter(n)) => *n,
                _ => 0,
            };
            assert_eq!(
                view, self.uf.value,
                "the view is what the user function holds"
            );
        }
    }

    /// No more clients: let everything finish.
    fn settle(&mut self) {
        for c in std::mem::take(&mut self.streamed_clients) {
            self.gone.insert(c);
            self.machine.handle(self.now, Input::ClientGone(c));
        }
        for _ in 0..10_000 {
            self.drain();
            let busy = !self.uf.inbox.is_empty()
                || !self.writes.is_empty()
                || !self.effects.is_empty()
                || self.reads > 0;
            if !busy {
                break;
            }
            let outs = self.uf.step(&mut self.rng);
            for o in outs {
                self.machine.handle(self.now, Input::FromUf(o));
            }
            self.drain();
            self.check_view();
            for op in std::mem::take(&mut self.writes) {
                self.machine.handle(self.now, Input::WriteDone(op, Ok(())));
            }
            for op in std::mem::take(&mut self.effects) {
                self.machine.handle(self.now, Input::RouteDone(op));
            }
            if self.reads > 0 {
                self.reads -= 1;
                let e = self.entry();
                self.machine.handle(self.now, Input::Replicated(e));
            }
        }
        // unanswered cancellations expire
        self.now += Duration::from_secs(10);
        self.machine.handle_timeout(self.now);
        self.drain();
        while self.reads > 0 {
            self.reads -= 1;
            let e = self.entry();
            self.machine.handle(self.now, Input::Replicated(e));
            self.drain();
            let outs = self.uf.step(&mut self.rng);
            for o in outs {
                self.machine.handle(self.now, Input::FromUf(o));
            }
            self.drain();
            while !self.uf.inbox.is_empty() {
                let outs = self.uf.step(&mut self.rng);
                for o in outs {
                    self.machine.handle(self.now, Input::FromUf(o));
                }
                self.drain();
            }
        }
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("ENTITY_SEED") {
        Ok(s) => vec![s.parse().expect("ENTITY_SEED is a number")],
        Err(_) => (0..500).collect(),
    }
}

fn run(seed: u64) {
    let config = Config {
        passivate_after: Duration::from_secs(3600),
        ..Config::default()
    };
    let mut w = World::new(seed, config);
    w.drain();
    // the machine starts by reading the replicated value
    w.reads -= 1;
    w.machine.handle(w.now, Input::Replicated(None));
    w.drain();
    for _ in 0..400 {
        w.step();
    }
    w.settle();
    assert!(w.stopped.is_none(), "stopped: {:?}", w.stopped);
    // every unary client got exactly one outcome; streamed ones ended once at most
    for client in &w.sent_order {
        if !w.streamed_clients.contains(client) && !w.ended.contains(client) {
            let n = w.outcomes.get(client).copied().unwrap_or(0);
            assert!(n <= 1, "client {client} got {n} outcomes");
        }
    }
    let unary_done = w
        .sent_order
        .iter()
        .filter(|c| w.outcomes.contains_key(c))
        .count();
    let streams_done = w.ended.union(&w.gone).count();
    assert_eq!(
        unary_done + streams_done,
        w.sent_order.len(),
        "every client got its outcome"
    );
    // arrival order is the user function's order
    let expected: Vec<i64> = w.sent_order.iter().map(|c| w.payload_of[c]).collect();
    assert_eq!(
        w.uf_order, expected,
        "commands reached the user function in order"
    );
    // settled: the user function holds the replicated value
    assert_eq!(
        w.uf.value,
        value_of(&w.replicated),
        "the user function's view converged"
    );
}

#[test]
fn seeded_interleavings_keep_the_rules() {
    for seed in seeds() {
        let r = std::panic::catch_unwind(|| run(seed));
        if let Err(e) = r {
            eprintln!("entity machine failed with ENTITY_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}

fn started(config: Config) -> (Machine, Instant) {
    let now = Instant::now();
    let mut m = Machine::new("svc", "e", "svc-e", config, Voters::alone(ME), now);
    assert_eq!(
        m.poll_output(),
        Some(Output::ReadReplicated(Footprint::All))
    );
    m.handle(now, Input::Replicated(None));
    assert_eq!(m.poll_output(), Some(Output::OpenUf));
    assert!(matches!(m.poll_output(), Some(Output::ToUf(_))), "init");
    (m, now)
}

fn command(client: ClientId) -> Input {
    Input::Command(CommandIn {
        client,
        name: "Change".into(),
        input_type: "Change".into(),
        payload: 1i64.to_le_bytes().to_vec(),
        streamed: false,
    })
}

fn outputs(m: &mut Machine) -> Vec<Output> {
    std::iter::from_fn(|| m.poll_output()).collect()
}

fn uf_reply(id: i64, consistency: i32, effects: Vec<SideEffect>) -> Input {
    Input::FromUf(CrdtStreamOut {
        message: Some(crdt_stream_out::Message::Reply(CrdtReply {
            command_id: id,
            client_action: Some(reply(id)),
            side_effects: effects,
            state_action: Some(CrdtStateAction {
                action: Some(crdt_state_action::Action::Update(pn(1))),
                write_consistency: consistency,
            }),
            streamed: false,
        })),
    })
}

#[test]
fn a_majority_write_in_flight_does_not_hold_back_a_later_command() {
    let (mut m, now) = started(Config::default());
    m.handle(now, command(1));
    m.handle(now, command(2));
    outputs(&mut m);
    m.handle(now, uf_reply(1, 1, vec![]));
    let majority = outputs(&mut m);
    let Some(Output::Write { op: op1, .. }) = majority.first().cloned() else {
        panic!("{majority:?}")
    };
    m.handle(now, uf_reply(2, 0, vec![]));
    let local = outputs(&mut m);
    let Some(Output::Write { op: op2, .. }) = local.first().cloned() else {
        panic!("{local:?}")
    };
    m.handle(now, Input::WriteDone(op2, Ok(())));
    let out = outputs(&mut m);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Reply {
                client: 2,
                outcome: Ok(_)
            }
        )),
        "command 2 completed before command 1's write: {out:?}"
    );
    m.handle(
        now,
        Input::WriteDone(
            op1,
            Err(WriteFailure::Consistency(
                "Failed to update CRDT at requested write consistency".into(),
            )),
        ),
    );
    let out = outputs(&mut m);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Reply { client: 1, outcome: Err(e) }
        if e.message == "Failed to update CRDT at requested write consistency")));
}

#[test]
fn side_effects_run_after_the_write_in_order_then_the_reply() {
    let (mut m, now) = started(Config::default());
    m.handle(now, command(1));
    outputs(&mut m);
    let effect = |name: &str, synchronous| SideEffect {
        service_name: "svc".into(),
        command_name: name.into(),
        payload: None,
        synchronous,
        metadata: None,
    };
    m.handle(
        now,
        uf_reply(
            1,
            0,
            vec![effect("A", true), effect("B", false), effect("C", true)],
        ),
    );
    let out = outputs(&mut m);
    let Some(Output::Write { op, .. }) = out.first().cloned() else {
        panic!("{out:?}")
    };
    assert!(
        !out.iter().any(|o| matches!(o, Output::Route { .. })),
        "no side effect before the write: {out:?}"
    );
    m.handle(now, Input::WriteDone(op, Ok(())));
    let out = outputs(&mut m);
    let Some(Output::Route {
        op: Some(a),
        command: first,
        ..
    }) = out.first().cloned()
    else {
        panic!("{out:?}")
    };
    assert_eq!(first, "A");
    assert_eq!(out.len(), 1, "B waits for A: {out:?}");
    // the synchronous effect may come back to this very entity: it is served meanwhile
    m.handle(now, command(2));
    assert!(outputs(&mut m).iter().any(|o| matches!(o, Output::ToUf(_))));
    m.handle(now, Input::RouteDone(a));
    let out = outputs(&mut m);
    let names: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Route { command, .. } => Some(command.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["B", "C"]);
    assert!(!out.iter().any(|o| matches!(o, Output::Reply { .. })));
    let c = out
        .iter()
        .find_map(|o| match o {
            Output::Route {
                op: Some(op),
                command,
                ..
            } if command == "C" => Some(*op),
            _ => None,
        })
        .unwrap();
    m.handle(now, Input::RouteDone(c));
    assert!(outputs(&mut m).iter().any(|o| matches!(
        o,
        Output::Reply {
            client: 1,
            outcome: Ok(_)
        }
    )));
}

#[test]
fn a_command_never_answered_fails_after_the_relay_timeout() {
    let (mut m, now) = started(Config {
        relay_timeout: Duration::from_secs(60),
        ..Config::default()
    });
    m.handle(now, command(1));
    outputs(&mut m);
    assert_eq!(m.next_timeout(), Some(now + Duration::from_secs(30)));
    m.handle_timeout(now + Duration::from_secs(30));
    // not idle: the command is outstanding, no passivation
    assert!(!outputs(&mut m).contains(&Output::CloseUf));
    m.handle_timeout(now + Duration::from_secs(60));
    let out = outputs(&mut m);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Reply { client: 1, outcome: Err(e) }
        if e.code == tonic::Code::DeadlineExceeded)));
    assert!(out.contains(&Output::CancelUf));
    assert!(matches!(
        out.last(),
        Some(Output::Stopped(EndReason::Failed(_)))
    ));
}

#[test]
fn passivation_half_closes_and_replays_commands_that_arrive_meanwhile() {
    let (mut m, now) = started(Config {
        passivate_after: Duration::from_secs(1),
        ..Config::default()
    });
    // activity moves the deadline; only idleness passivates
    m.handle(now + Duration::from_millis(900), command(1));
    outputs(&mut m);
    m.handle_timeout(now + Duration::from_millis(1000));
    assert!(outputs(&mut m).is_empty());
    m.handle(now + Duration::from_millis(950), uf_reply(1, 0, vec![]));
    let out = outputs(&mut m);
    let Some(Output::Write { op, .. }) = out.first().cloned() else {
        panic!("{out:?}")
    };
    m.handle(
        now + Duration::from_millis(950),
        Input::WriteDone(op, Ok(())),
    );
    outputs(&mut m);
    let t = now + Duration::from_millis(1950);
    assert_eq!(m.next_timeout(), Some(t));
    m.handle_timeout(t);
    assert_eq!(outputs(&mut m), vec![Output::CloseUf]);
    // a command while the user function completes its side: it waits
    m.handle(t, command(2));
    assert!(outputs(&mut m).is_empty());
    m.handle(t, Input::UfEnded(UfEnd::Completed));
    assert_eq!(
        outputs(&mut m),
        vec![Output::ReadReplicated(Footprint::All)]
    );
    m.handle(t, Input::Replicated(None));
    let out = outputs(&mut m);
    assert_eq!(out[0], Output::OpenUf);
    let ids: Vec<i64> = out
        .iter()
        .filter_map(|o| match o {
            Output::ToUf(m) => match &m.message {
                Some(crdt_stream_in::Message::Command(c)) => Some(c.id),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(
        ids,
        vec![1],
        "the replayed command is command 1 of the new stream"
    );
}

#[test]
fn a_failed_stream_fails_everything_with_entity_terminating() {
    let (mut m, now) = started(Config::default());
    m.handle(now, command(1));
    outputs(&mut m);
    m.handle(now, Input::UfEnded(UfEnd::Failed("reset".into())));
    let out = outputs(&mut m);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Reply { client: 1, outcome: Err(e) }
        if e.message == ENTITY_TERMINATING)));
    assert!(out.iter().any(|o| matches!(o, Output::ReportError(_))));
    assert!(m.is_stopped());
}

#[test]
fn a_key_deleted_elsewhere_is_told_and_later_commands_answer_entity_deleted() {
    let (mut m, now) = started(Config::default());
    m.handle(now, Input::KeyChanged(Footprint::All));
    assert_eq!(
        outputs(&mut m),
        vec![Output::ReadReplicated(Footprint::All)]
    );
    m.handle(now, Input::Replicated(Some(Entry::Deleted)));
    let out = outputs(&mut m);
    assert!(
        matches!(&out[0], Output::ToUf(m) if matches!(m.message, Some(crdt_stream_in::Message::Delete(_))))
    );
    assert_eq!(out[1], Output::CloseUf);
    m.handle(now, command(7));
    assert!(outputs(&mut m)
        .iter()
        .any(|o| matches!(o, Output::Reply { client: 7, outcome: Err(e) }
        if e.message == ENTITY_DELETED)));
}

#[test]
fn in_flight_commands_are_capped() {
    let (mut m, now) = started(Config {
        max_in_flight: 2,
        ..Config::default()
    });
    for c in 1..=3 {
        m.handle(now, command(c));
    }
    let out = outputs(&mut m);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Reply { client: 3, outcome: Err(e) }
        if e.code == tonic::Code::ResourceExhausted)));
}

#[test]
fn draining_finishes_what_is_in_flight_ends_streams_then_passivates() {
    let (mut m, now) = started(Config::default());
    m.handle(now, command(1));
    m.handle(
        now,
        Input::Command(CommandIn {
            client: 2,
            name: "Watch".into(),
            input_type: "Change".into(),
            payload: 0i64.to_le_bytes().to_vec(),
            streamed: true,
        }),
    );
    outputs(&mut m);
    m.handle(now, Input::Drain);
    let out = outputs(&mut m);
    assert!(
        out.iter().any(
            |o| matches!(o, Output::EndStream { client: 2, failure: Some(e) }
        if e.code == tonic::Code::Unavailable)
        ),
        "{out:?}"
    );
    assert!(
        !out.contains(&Output::CloseUf),
        "command 1 is still in flight: {out:?}"
    );
    m.handle(now, uf_reply(1, 0, vec![]));
    let out = outputs(&mut m);
    let Some(Output::Write { op, .. }) = out.first().cloned() else {
        panic!("{out:?}")
    };
    m.handle(now, Input::WriteDone(op, Ok(())));
    let out = outputs(&mut m);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Reply {
            client: 1,
            outcome: Ok(_)
        }
    )));
    // the reply for the streamed call, written before the user function heard of the drain
    m.handle(
        now,
        Input::FromUf(CrdtStreamOut {
            message: Some(crdt_stream_out::Message::Reply(CrdtReply {
                command_id: 2,
                client_action: Some(reply(0)),
                side_effects: vec![],
                state_action: None,
                streamed: true,
            })),
        }),
    );
    let out = outputs(&mut m);
    assert!(
        out.contains(&Output::ReadReplicated(Footprint::All)) || out.contains(&Output::CloseUf),
        "{out:?}"
    );
    if out.contains(&Output::ReadReplicated(Footprint::All)) {
        m.handle(now, Input::Replicated(None));
        assert!(outputs(&mut m).contains(&Output::CloseUf));
    }
    m.handle(now, Input::UfEnded(UfEnd::Completed));
    assert_eq!(
        outputs(&mut m),
        vec![Output::Stopped(EndReason::Passivated)]
    );
}

#[test]
fn a_counter_write_costs_no_read_a_register_write_does() {
    let (mut m, now) = started(Config::default());
    m.handle(now, command(1));
    outputs(&mut m);
    m.handle(now, uf_reply(1, 0, vec![]));
    let out = outputs(&mut m);
    let Some(Output::Write { op, .. }) = out.first().cloned() else {
        panic!("{out:?}")
    };
    m.handle(now, Input::WriteDone(op, Ok(())));
    let out = outputs(&mut m);
    assert!(
        !out.contains(&Output::ReadReplicated(Footprint::All)),
        "{out:?}"
    );
    // an LWW write may lose: compared once applied
    m.handle(now, command(2));
    outputs(&mut m);
    m.handle(
        now,
        Input::FromUf(CrdtStreamOut {
            message: Some(crdt_stream_out::Message::Reply(CrdtReply {
                command_id: 2,
                client_action: Some(reply(0)),
                side_effects: vec![],
                state_action: Some(CrdtStateAction {
                    action: Some(crdt_state_action::Action::Update(CrdtDelta {
                        delta: Some(crdt_delta::Delta::Lwwregister(
                            latticed_proto::cloudstate::crdt::LwwRegisterDelta::default(),
                        )),
                    })),
                    write_consistency: 0,
                }),
                streamed: false,
            })),
        }),
    );
    assert!(outputs(&mut m).contains(&Output::ReadReplicated(Footprint::All)));
}

fn watch(client: ClientId) -> Input {
    Input::Command(CommandIn {
        client,
        name: "Watch".into(),
        input_type: "Change".into(),
        payload: 0i64.to_le_bytes().to_vec(),
        streamed: true,
    })
}

/// How many times a client's call ended (a stream's end, a unary reply), and whether anything
/// reached it after its end.
fn ends(out: &[Output], client: ClientId) -> (usize, bool) {
    let mut ended = 0;
    let mut after = false;
    for o in out {
        match o {
            Output::EndStream { client: c, .. } | Output::Reply { client: c, .. }
                if *c == client =>
            {
                after |= ended > 0;
                ended += 1;
            }
            Output::Stream { client: c, .. } if *c == client => after |= ended > 0,
            _ => {}
        }
    }
    (ended, after)
}

fn streamed_end(id: i64, effects: Vec<SideEffect>) -> Input {
    Input::FromUf(CrdtStreamOut {
        message: Some(crdt_stream_out::Message::StreamedMessage(
            CrdtStreamedMessage {
                command_id: id,
                client_action: Some(reply(0)),
                side_effects: effects,
                end_stream: true,
            },
        )),
    })
}

/// The user function's reply to streamed command `id`, keeping the stream open.
fn streamed_reply(id: i64) -> Input {
    Input::FromUf(CrdtStreamOut {
        message: Some(crdt_stream_out::Message::Reply(CrdtReply {
            command_id: id,
            client_action: Some(reply(0)),
            side_effects: vec![],
            state_action: None,
            streamed: true,
        })),
    })
}

fn uf_failure(id: i64, description: &str) -> Input {
    Input::FromUf(CrdtStreamOut {
        message: Some(crdt_stream_out::Message::Failure(
            latticed_proto::cloudstate::Failure {
                command_id: id,
                description: description.into(),
                restart: false,
            },
        )),
    })
}

// The cases below were found by the `uf_message` fuzz target (docs/fuzzing.md): a streamed
// call ended twice, or got a message after its end.

#[test]
fn a_streamed_command_in_flight_ends_once_at_shutdown() {
    let (mut m, now) = started(Config::default());
    m.handle(now, watch(1));
    outputs(&mut m);
    m.shutdown();
    assert_eq!(ends(&outputs(&mut m), 1), (1, false));
}

#[test]
fn a_stream_the_user_function_ended_before_its_reply_is_not_ended_again() {
    let (mut m, now) = started(Config::default());
    m.handle(now, watch(1));
    m.handle(now, streamed_end(1, vec![]));
    let mut out = outputs(&mut m);
    // the key is deleted elsewhere: command 1 still awaits its reply
    m.handle(now, Input::KeyChanged(Footprint::All));
    out.extend(outputs(&mut m));
    m.handle(now, Input::Replicated(Some(Entry::Deleted)));
    out.extend(outputs(&mut m));
    m.handle(now, streamed_reply(1));
    out.extend(outputs(&mut m));
    assert_eq!(ends(&out, 1), (1, false), "{out:?}");
}

#[test]
fn a_reply_after_a_drain_ended_its_stream_reaches_no_one() {
    let (mut m, now) = started(Config::default());
    m.handle(now, watch(1));
    outputs(&mut m);
    m.handle(now, Input::Drain);
    let mut out = outputs(&mut m);
    m.handle(now, streamed_reply(1));
    out.extend(outputs(&mut m));
    assert_eq!(ends(&out, 1), (1, false), "{out:?}");
}

#[test]
fn a_failed_stream_does_not_end_again_when_a_pending_message_completes() {
    let (mut m, now) = started(Config::default());
    m.handle(now, watch(1));
    outputs(&mut m);
    let effect = SideEffect {
        service_name: "svc".into(),
        command_name: "Other".into(),
        payload: None,
        synchronous: true,
        metadata: None,
    };
    m.handle(now, streamed_end(1, vec![effect]));
    let mut out = outputs(&mut m);
    let Some(Output::Route { op: Some(op), .. }) = out.first().cloned() else {
        panic!("{out:?}")
    };
    m.handle(now, uf_failure(1, "no"));
    out.extend(outputs(&mut m));
    m.handle(now, Input::RouteDone(op));
    out.extend(outputs(&mut m));
    m.shutdown();
    out.extend(outputs(&mut m));
    assert_eq!(ends(&out, 1), (1, false), "{out:?}");
}

#[test]
fn a_failure_for_an_open_stream_ends_it() {
    let (mut m, now) = started(Config::default());
    m.handle(now, watch(1));
    m.handle(now, streamed_reply(1));
    let mut out = outputs(&mut m);
    assert_eq!(ends(&out, 1), (0, false), "the stream stays open: {out:?}");
    m.handle(now, uf_failure(1, "no"));
    out = outputs(&mut m);
    assert!(
        matches!(&out[..], [Output::EndStream { client: 1, failure: Some(e) }] if e.message == "no"),
        "{out:?}"
    );
}

#[test]
fn a_drain_does_not_stop_a_deleted_entity_while_its_delete_is_in_flight() {
    let (mut m, now) = started(Config::default());
    m.handle(now, command(1));
    outputs(&mut m);
    m.handle(
        now,
        Input::FromUf(CrdtStreamOut {
            message: Some(crdt_stream_out::Message::Reply(CrdtReply {
                command_id: 1,
                client_action: Some(reply(0)),
                side_effects: vec![],
                state_action: Some(CrdtStateAction {
                    action: Some(crdt_state_action::Action::Delete(Default::default())),
                    write_consistency: 1,
                }),
                streamed: false,
            })),
        }),
    );
    let out = outputs(&mut m);
    let Some(Output::Delete { op, .. }) = out.first().cloned() else {
        panic!("{out:?}")
    };
    // the delete is applied locally and seen before its majority is reached
    m.handle(now, Input::KeyChanged(Footprint::All));
    let mut out = outputs(&mut m);
    if out.contains(&Output::ReadReplicated(Footprint::All)) {
        m.handle(now, Input::Replicated(Some(Entry::Deleted)));
        out.extend(outputs(&mut m));
    }
    m.handle(now, Input::UfEnded(UfEnd::Completed));
    m.handle(now, Input::Drain);
    out.extend(outputs(&mut m));
    assert!(!m.is_stopped(), "stopped with command 1 in flight: {out:?}");
    m.handle(now, Input::WriteDone(op, Ok(())));
    let out = outputs(&mut m);
    assert_eq!(ends(&out, 1), (1, false), "{out:?}");
    assert_eq!(
        out.last(),
        Some(&Output::Stopped(EndReason::Deleted)),
        "{out:?}"
    );
}

fn orset_add(e: &str) -> CrdtDelta {
    use latticed_proto::cloudstate::crdt::{crdt_delta, OrSetDelta};
    CrdtDelta {
        delta: Some(crdt_delta::Delta::Orset(OrSetDelta {
            added: vec![latticed_crdt::Element::string(e).to_any()],
            ..Default::default()
        })),
    }
}

/// Issue 8, item 8: a peer's change is read and compared only where it can have changed the
/// value (its footprint), and told as exactly that change: a removal of one element of a large
/// set is `removed [b]`, read as a one-element part, never the whole set (nor `cleared`).
#[test]
fn a_remote_change_is_read_and_told_within_its_footprint() {
    use latticed_crdt::{Element, ORSet};
    use latticed_proto::cloudstate::crdt::{crdt_delta, crdt_stream_in, CrdtStreamIn, OrSetDelta};
    let now = Instant::now();
    let mut m = Machine::new(
        "svc",
        "e",
        "svc-e",
        Config::default(),
        Voters::alone(ME),
        now,
    );
    outputs(&mut m);
    let mut set = ORSet::new();
    for i in 0..1000 {
        let d = set.add(OTHER, &Element::string(&format!("e{i}")));
        set.join(&d);
    }
    let mut value: CrdtValue = set.clone().into();
    m.handle(now, Input::Replicated(Some(Entry::Value(value.clone()))));
    outputs(&mut m);
    // a peer removes one element
    let removal: CrdtValue = set
        .remove(OTHER, &Element::string("e7"))
        .expect("present")
        .into();
    value.join(&removal);
    let footprint = Footprint::of(&removal);
    assert_eq!(
        footprint,
        Footprint::Elements([Element::string("e7")].into_iter().collect())
    );
    m.handle(now, Input::KeyChanged(footprint.clone()));
    assert_eq!(
        outputs(&mut m),
        vec![Output::ReadReplicated(footprint.clone())]
    );
    let part = Entry::Value(value.clone()).part(&footprint);
    m.handle(now, Input::Replicated(Some(part)));
    let out = outputs(&mut m);
    let expected = CrdtDelta {
        delta: Some(crdt_delta::Delta::Orset(OrSetDelta {
            removed: vec![Element::string("e7").to_any()],
            ..Default::default()
        })),
    };
    assert!(
        out.iter().any(|o| matches!(o, Output::ToUf(CrdtStreamIn {
            message: Some(crdt_stream_in::Message::Delta(d))
        }) if *d == expected)),
        "{out:?}"
    );
    // the view is the replicated value: a later add of the same element is told as an add
    let add: CrdtValue = ORSet::new().add(3, &Element::string("e7")).into();
    value.join(&add);
    let fp = Footprint::of(&add);
    m.handle(now, Input::KeyChanged(fp.clone()));
    outputs(&mut m);
    m.handle(now, Input::Replicated(Some(Entry::Value(value.part(&fp)))));
    let out = outputs(&mut m);
    assert!(
        out.iter().any(|o| matches!(o, Output::ToUf(CrdtStreamIn {
            message: Some(crdt_stream_in::Message::Delta(d))
        }) if *d == orset_add("e7"))),
        "{out:?}"
    );
}

/// Protocol spec §3 Reply: the string entries of a reply's metadata become the client's
/// response headers; binary entries do not.
#[test]
fn a_replys_string_metadata_becomes_its_headers() {
    use latticed_proto::cloudstate::{metadata_entry, Metadata, MetadataEntry};
    let (mut m, now) = started(Config::default());
    m.handle(now, command(1));
    outputs(&mut m);
    let mut r = reply(1);
    let Some(client_action::Action::Reply(rep)) = r.action.as_mut() else {
        panic!("a reply")
    };
    rep.metadata = Some(Metadata {
        entries: vec![
            MetadataEntry {
                key: "x-answer".into(),
                value: Some(metadata_entry::Value::StringValue("42".into())),
            },
            MetadataEntry {
                key: "x-raw-bin".into(),
                value: Some(metadata_entry::Value::BytesValue(vec![1, 2])),
            },
        ],
    });
    m.handle(
        now,
        Input::FromUf(CrdtStreamOut {
            message: Some(crdt_stream_out::Message::Reply(CrdtReply {
                command_id: 1,
                client_action: Some(r),
                ..Default::default()
            })),
        }),
    );
    let out = outputs(&mut m);
    let headers = out.iter().find_map(|o| match o {
        Output::Reply {
            client: 1,
            outcome: Ok(reply),
        } => Some(reply.headers.clone()),
        _ => None,
    });
    assert_eq!(
        headers,
        Some(vec![("x-answer".to_string(), "42".to_string())]),
        "{out:?}"
    );
}
