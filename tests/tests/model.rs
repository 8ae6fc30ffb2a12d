//! The conformance model user function, driven the way the TCK's model tests drive a user
//! function (spec/conformance.md group B): this test plays the proxy over real gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use latticed::userfn::validate;
use latticed_crdt::Element;
use latticed_proto::cloudstate::crdt::crdt_client::CrdtClient;
use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtClock, CrdtDelete,
    CrdtDelta, CrdtInit, CrdtStreamIn, CrdtStreamOut, FlagDelta, GCounterDelta, LwwRegisterDelta,
    OrMapDelta, OrMapEntryDelta, OrSetDelta, PnCounterDelta, VoteDelta,
};
use latticed_proto::cloudstate::{client_action, ClientAction, Command, StreamCancelled};
use latticed_proto::wkt::Any;
use latticed_tests::model as m;
use latticed_tests::model_uf::{self, ConformanceModel, TCK_MODEL, TWO, WAIT};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

struct Stream {
    tx: mpsc::Sender<CrdtStreamIn>,
    /// the user function's messages; closed when it completes the stream
    rx: mpsc::Receiver<CrdtStreamOut>,
    next_id: i64,
    id: String,
}

async fn model() -> (String, ConformanceModel) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let model = ConformanceModel::default();
    tokio::spawn(model_uf::serve(model.clone(), listener));
    (addr, model)
}

async fn open(addr: &str, service: &str, id: &str, delta: Option<CrdtDelta>) -> Stream {
    let mut client = CrdtClient::connect(format!("http://{addr}")).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(CrdtStreamIn {
        message: Some(crdt_stream_in::Message::Init(CrdtInit {
            service_name: service.into(),
            entity_id: id.into(),
            delta,
        })),
    })
    .await
    .unwrap();
    // as a proxy must: never wait for the response headers before writing (the model, like
    // every support library, sends them only with its first message)
    let (out_tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut inbound = client
            .handle(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        while let Some(msg) = inbound.next().await {
            if out_tx.send(msg.unwrap()).await.is_err() {
                return;
            }
        }
    });
    Stream {
        tx,
        rx: out,
        next_id: 1,
        id: id.into(),
    }
}

fn request(id: &str, actions: Vec<m::request_action::Action>) -> Any {
    let r = m::Request {
        id: id.into(),
        actions: actions
            .into_iter()
            .map(|a| m::RequestAction { action: Some(a) })
            .collect(),
    };
    Any {
        type_url: "type.googleapis.com/cloudstate.tck.model.crdt.Request".into(),
        value: r.encode_to_vec(),
    }
}

fn update(u: m::update::Update) -> m::request_action::Action {
    m::request_action::Action::Update(m::Update {
        update: Some(u),
        write_consistency: 0,
    })
}

impl Stream {
    async fn send(&self, msg: crdt_stream_in::Message) {
        self.tx
            .send(CrdtStreamIn { message: Some(msg) })
            .await
            .unwrap();
    }
    async fn command(&mut self, name: &str, payload: Any, streamed: bool) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(crdt_stream_in::Message::Command(Command {
            entity_id: self.id.clone(),
            id,
            name: name.into(),
            payload: Some(payload),
            streamed,
            metadata: None,
        }))
        .await;
        id
    }
    async fn process(
        &mut self,
        actions: Vec<m::request_action::Action>,
    ) -> latticed_proto::cloudstate::crdt::CrdtReply {
        self.unary("Process", actions).await
    }
    /// A unary command `name` with `actions`, and its reply.
    async fn unary(
        &mut self,
        name: &str,
        actions: Vec<m::request_action::Action>,
    ) -> latticed_proto::cloudstate::crdt::CrdtReply {
        let payload = request(&self.id.clone(), actions);
        let id = self.command(name, payload, false).await;
        match self.next().await.message {
            Some(crdt_stream_out::Message::Reply(r)) => {
                assert_eq!(r.command_id, id);
                r
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }
    async fn next(&mut self) -> CrdtStreamOut {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a message in time")
            .expect("the stream still open")
    }
}

fn state(r: &latticed_proto::cloudstate::crdt::CrdtReply) -> m::State {
    match &r.client_action.as_ref().unwrap().action {
        Some(client_action::Action::Reply(rep)) => {
            m::Response::decode(rep.payload.as_ref().unwrap().value.as_slice())
                .unwrap()
                .state
                .unwrap()
        }
        other => panic!("not a reply: {other:?}"),
    }
}

fn delta(r: &latticed_proto::cloudstate::crdt::CrdtReply) -> Option<Delta> {
    match r.state_action.as_ref()?.action.as_ref()? {
        crdt_state_action::Action::Update(d) => d.delta.clone(),
        _ => None,
    }
}

fn gcounter(n: u64) -> m::State {
    m::State {
        value: Some(m::state::Value::Gcounter(m::GCounterValue { value: n })),
    }
}

#[tokio::test]
async fn discovery_spec_is_valid_for_latticed() {
    let (addr, model) = model().await;
    let spec = latticed::userfn::Discovery::new(addr)
        .discover_once()
        .await
        .unwrap();
    let m = validate(&spec).unwrap();
    assert_eq!(m.entities.len(), 3);
    assert_eq!(model.proxies.lock().unwrap()[0].proxy_name, "latticed");
}

#[tokio::test]
async fn conformance_10_11_12_gcounter_empty_changes_and_initial_delta() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "GCounter-1", None).await;
    let r = s.process(vec![]).await;
    assert_eq!(state(&r), gcounter(0));
    assert!(
        r.state_action.is_none(),
        "no state action for the empty value"
    );
    let inc = |n| {
        update(m::update::Update::Gcounter(m::GCounterUpdate {
            increment: n,
        }))
    };
    let r = s.process(vec![inc(42)]).await;
    assert_eq!(
        delta(&r),
        Some(Delta::Gcounter(GCounterDelta { increment: 42 }))
    );
    let r = s.process(vec![inc(1), inc(2), inc(3)]).await;
    assert_eq!(
        delta(&r),
        Some(Delta::Gcounter(GCounterDelta { increment: 6 }))
    );
    assert_eq!(state(&r), gcounter(48));
    // a new stream with an initial delta (item 12/15: command ids restart at 1)
    let init = CrdtDelta {
        delta: Some(Delta::Gcounter(GCounterDelta { increment: 42 })),
    };
    let mut t = open(&addr, TCK_MODEL, "GCounter-2", Some(init)).await;
    let r = t.process(vec![inc(123)]).await;
    assert_eq!(r.command_id, 1);
    assert_eq!(state(&r), gcounter(165));
    assert_eq!(
        delta(&r),
        Some(Delta::Gcounter(GCounterDelta { increment: 123 }))
    );
    // item 13/14: replicated deltas mix with local changes
    t.send(crdt_stream_in::Message::Delta(CrdtDelta {
        delta: Some(Delta::Gcounter(GCounterDelta { increment: 5 })),
    }))
    .await;
    let r = t.process(vec![inc(6)]).await;
    assert_eq!(state(&r), gcounter(176));
    assert_eq!(
        delta(&r),
        Some(Delta::Gcounter(GCounterDelta { increment: 6 }))
    );
}

#[tokio::test]
async fn conformance_10_lwwregister_and_vote_initial_values() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "LWWRegister-1", None).await;
    let r = s.process(vec![]).await;
    match delta(&r) {
        Some(Delta::Lwwregister(l)) => assert_eq!(l.value, Some(Element::string("").to_any())),
        other => panic!("expected the register's initial value, got {other:?}"),
    }
    let mut v = open(&addr, TCK_MODEL, "Vote-1", None).await;
    let r = v.process(vec![]).await;
    assert_eq!(
        state(&r),
        m::State {
            value: Some(m::state::Value::Vote(m::VoteValue {
                self_vote: false,
                votes_for: 0,
                total_voters: 1
            }))
        }
    );
    assert!(r.state_action.is_none());
}

#[tokio::test]
async fn conformance_21_orset_deltas_report_only_the_commands_change() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "ORSet-1", None).await;
    let add = |x: &str| {
        update(m::update::Update::Orset(m::OrSetUpdate {
            action: Some(m::or_set_update::Action::Add(x.into())),
        }))
    };
    let rm = |x: &str| {
        update(m::update::Update::Orset(m::OrSetUpdate {
            action: Some(m::or_set_update::Action::Remove(x.into())),
        }))
    };
    s.process(vec![add("a"), add("b")]).await;
    let r = s.process(vec![add("b"), add("c")]).await;
    assert_eq!(
        delta(&r),
        Some(Delta::Orset(OrSetDelta {
            cleared: false,
            removed: vec![],
            added: vec![Element::string("c").to_any()]
        }))
    );
    assert!(s
        .process(vec![add("c"), add("a")])
        .await
        .state_action
        .is_none());
    let r = s.process(vec![rm("b"), rm("d")]).await;
    assert_eq!(
        delta(&r),
        Some(Delta::Orset(OrSetDelta {
            cleared: false,
            removed: vec![Element::string("b").to_any()],
            added: vec![]
        }))
    );
    let r = s.process(vec![rm("c"), rm("d"), add("b"), add("c")]).await;
    assert_eq!(
        delta(&r),
        Some(Delta::Orset(OrSetDelta {
            cleared: false,
            removed: vec![],
            added: vec![Element::string("b").to_any()]
        }))
    );
}

#[tokio::test]
async fn conformance_26_28_33_forward_effects_and_failure() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "GCounter-9", None).await;
    let r = s
        .process(vec![m::request_action::Action::Forward(m::Forward {
            id: "X-1".into(),
        })])
        .await;
    match &r.client_action.as_ref().unwrap().action {
        Some(client_action::Action::Forward(f)) => {
            assert_eq!(f.service_name, TWO);
            assert_eq!(f.command_name, "Call");
            assert_eq!(
                m::Request::decode(f.payload.as_ref().unwrap().value.as_slice())
                    .unwrap()
                    .id,
                "X-1"
            );
        }
        other => panic!("expected a forward, got {other:?}"),
    }
    let r = s
        .process(vec![m::request_action::Action::Effect(m::Effect {
            id: "X-2".into(),
            synchronous: true,
        })])
        .await;
    assert_eq!(r.side_effects.len(), 1);
    assert!(r.side_effects[0].synchronous);
    let r = s
        .process(vec![m::request_action::Action::Fail(m::Fail {
            message: "expected failure".into(),
        })])
        .await;
    match &r.client_action.as_ref().unwrap().action {
        Some(client_action::Action::Failure(f)) => {
            assert_eq!(f.description, "expected failure");
            assert_eq!(f.command_id, r.command_id);
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(r.state_action.is_none());
    // item 34: the stream stays usable after a failure
    assert_eq!(state(&s.process(vec![]).await), gcounter(0));
}

#[tokio::test]
async fn conformance_16_17_delete_both_ways_and_half_close() {
    let (addr, model) = model().await;
    let mut s = open(&addr, TCK_MODEL, "GCounter-3", None).await;
    let r = s
        .process(vec![m::request_action::Action::Delete(m::Delete {})])
        .await;
    assert!(matches!(
        r.state_action.as_ref().unwrap().action,
        Some(crdt_state_action::Action::Delete(_))
    ));
    // delete sent to the entity: no reply; then a half-close: the model completes its side
    let mut t = open(&addr, TCK_MODEL, "GCounter-4", None).await;
    t.send(crdt_stream_in::Message::Delete(CrdtDelete {})).await;
    drop(t.tx);
    let end = tokio::time::timeout(WAIT, t.rx.recv())
        .await
        .expect("the stream to complete");
    assert!(
        end.is_none(),
        "no message after a delete, and the stream completes: {end:?}"
    );
    assert!(model
        .traffic
        .lock()
        .unwrap()
        .iter()
        .any(|x| matches!(x, model_uf::Traffic::Closed(_))));
}

#[tokio::test]
async fn conformance_35_37_streamed_responses_and_cancellation() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "PNCounter-1", None).await;
    let cancel = m::Update {
        update: Some(m::update::Update::Pncounter(m::PnCounterUpdate {
            change: -42,
        })),
        write_consistency: 0,
    };
    let req = m::StreamedRequest {
        id: "PNCounter-1".into(),
        cancel_update: Some(cancel),
        ..Default::default()
    };
    let sid = s
        .command(
            "ProcessStreamed",
            Any {
                type_url: "type.googleapis.com/cloudstate.tck.model.crdt.StreamedRequest".into(),
                value: req.encode_to_vec(),
            },
            true,
        )
        .await;
    match s.next().await.message {
        Some(crdt_stream_out::Message::Reply(r)) => assert!(r.streamed && r.command_id == sid),
        other => panic!("{other:?}"),
    }
    let change = |n| {
        update(m::update::Update::Pncounter(m::PnCounterUpdate {
            change: n,
        }))
    };
    s.process(vec![change(10)]).await;
    match s.next().await.message {
        Some(crdt_stream_out::Message::StreamedMessage(msg)) => assert_eq!(msg.command_id, sid),
        other => panic!("expected a streamed message after the reply, got {other:?}"),
    }
    s.send(crdt_stream_in::Message::StreamCancelled(StreamCancelled {
        entity_id: "PNCounter-1".into(),
        id: sid,
    }))
    .await;
    match s.next().await.message {
        Some(crdt_stream_out::Message::StreamCancelledResponse(r)) => {
            assert_eq!(r.command_id, sid);
            match r.state_action.unwrap().action {
                Some(crdt_state_action::Action::Update(d)) => assert_eq!(
                    d.delta,
                    Some(Delta::Pncounter(
                        latticed_proto::cloudstate::crdt::PnCounterDelta { change: -42 }
                    ))
                ),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
    let r = s.process(vec![]).await;
    assert_eq!(
        state(&r),
        m::State {
            value: Some(m::state::Value::Pncounter(m::PnCounterValue { value: -32 }))
        }
    );
}

fn orset(action: m::or_set_update::Action) -> m::request_action::Action {
    update(m::update::Update::Orset(m::OrSetUpdate {
        action: Some(action),
    }))
}

fn ormap(action: m::or_map_update::Action) -> m::request_action::Action {
    update(m::update::Update::Ormap(Box::new(m::OrMapUpdate {
        action: Some(action),
    })))
}

fn ormap_update(key: &str, u: m::update::Update) -> m::request_action::Action {
    ormap(m::or_map_update::Action::Update(Box::new(
        m::OrMapEntryUpdate {
            key: key.into(),
            update: Some(Box::new(m::Update {
                update: Some(u),
                write_consistency: 0,
            })),
        },
    )))
}

fn lww(value: &str, clock: Option<(m::LwwRegisterClockType, i64)>) -> m::update::Update {
    m::update::Update::Lwwregister(m::LwwRegisterUpdate {
        value: value.into(),
        clock: clock.map(|(t, v)| m::LwwRegisterClock {
            clock_type: t as i32,
            custom_clock_value: v,
        }),
    })
}

fn vote(v: bool) -> m::request_action::Action {
    update(m::update::Update::Vote(m::VoteUpdate { self_vote: v }))
}

fn strings(xs: &[&str]) -> Vec<prost_types::Any> {
    xs.iter().map(|x| Element::string(x).to_any()).collect()
}

fn orset_delta(cleared: bool, removed: &[&str], added: &[&str]) -> Delta {
    Delta::Orset(OrSetDelta {
        cleared,
        removed: strings(removed),
        added: strings(added),
    })
}

fn entry(key: &str, d: Delta) -> OrMapEntryDelta {
    OrMapEntryDelta {
        key: Some(Element::string(key).to_any()),
        delta: Some(CrdtDelta { delta: Some(d) }),
    }
}

fn lww_delta(value: &str, clock: CrdtClock, custom: i64) -> Delta {
    Delta::Lwwregister(LwwRegisterDelta {
        value: Some(Element::string(value).to_any()),
        clock: clock as i32,
        custom_clock_value: custom,
    })
}

/// The delta with its repeated fields sorted, as the TCK compares them (`Delta.sorted`).
fn sorted(d: Option<Delta>) -> Option<Delta> {
    fn key(a: &prost_types::Any) -> Vec<u8> {
        a.value.clone()
    }
    fn sort(d: Delta) -> Delta {
        match d {
            Delta::Gset(mut g) => {
                g.added.sort_by_key(key);
                Delta::Gset(g)
            }
            Delta::Orset(mut o) => {
                o.removed.sort_by_key(key);
                o.added.sort_by_key(key);
                Delta::Orset(o)
            }
            Delta::Ormap(mut o) => {
                o.removed.sort_by_key(key);
                for list in [&mut o.updated, &mut o.added] {
                    for e in list.iter_mut() {
                        if let Some(d) = e.delta.as_mut() {
                            d.delta = d.delta.take().map(sort);
                        }
                    }
                    list.sort_by_key(|e| e.key.as_ref().map(key));
                }
                Delta::Ormap(o)
            }
            d => d,
        }
    }
    d.map(sort)
}

fn ormap_delta(
    cleared: bool,
    removed: &[&str],
    updated: Vec<OrMapEntryDelta>,
    added: Vec<OrMapEntryDelta>,
) -> Option<Delta> {
    sorted(Some(Delta::Ormap(OrMapDelta {
        cleared,
        removed: strings(removed),
        updated,
        added,
    })))
}

#[tokio::test]
async fn orset_clear_then_add_reports_the_clear_even_when_the_value_ends_where_it_began() {
    use m::or_set_update::Action as A;
    let (addr, _) = model().await;
    // the TCK's "verify ORSet state changes", commands 6 and 7
    let mut s = open(&addr, TCK_MODEL, "ORSet-clear", None).await;
    s.process(vec![orset(A::Add("a".into())), orset(A::Add("b".into()))])
        .await;
    let r = s.process(vec![orset(A::Clear(true))]).await;
    assert_eq!(delta(&r), Some(orset_delta(true, &[], &[])));
    let r = s
        .process(vec![
            orset(A::Add("a".into())),
            orset(A::Clear(true)),
            orset(A::Add("x".into())),
        ])
        .await;
    assert_eq!(delta(&r), Some(orset_delta(true, &[], &["x"])));
    // {x}, clear, add x: the value is unchanged, but the proxy must drop what it had and
    // re-add x (a concurrent add elsewhere is cleared too)
    let r = s
        .process(vec![orset(A::Clear(true)), orset(A::Add("x".into()))])
        .await;
    assert_eq!(delta(&r), Some(orset_delta(true, &[], &["x"])));
    // a remove then an add of the same element cancel out; an add then a remove too
    let r = s
        .process(vec![
            orset(A::Add("y".into())),
            orset(A::Remove("x".into())),
            orset(A::Add("x".into())),
            orset(A::Add("z".into())),
            orset(A::Remove("z".into())),
        ])
        .await;
    assert_eq!(delta(&r), Some(orset_delta(false, &[], &["y"])));
    // removing the last element clears, as both support libraries do
    s.process(vec![orset(A::Remove("y".into()))]).await;
    let r = s.process(vec![orset(A::Remove("x".into()))]).await;
    assert_eq!(delta(&r), Some(orset_delta(true, &[], &[])));
}

#[tokio::test]
async fn orset_clear_false_is_not_a_clear() {
    use m::or_set_update::Action as A;
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "ORSet-noclear", None).await;
    s.process(vec![orset(A::Add("a".into()))]).await;
    let r = s.process(vec![orset(A::Clear(false))]).await;
    assert!(r.state_action.is_none(), "{r:?}");
    assert_eq!(
        state(&r),
        m::State {
            value: Some(m::state::Value::Orset(m::OrSetValue {
                elements: vec!["a".into()]
            }))
        }
    );
}

#[tokio::test]
async fn vote_deltas_carry_only_self_vote() {
    let (addr, _) = model().await;
    // init as the TCK's "verify Vote initial delta in init": the proxy's tally is absolute
    let init = CrdtDelta {
        delta: Some(Delta::Vote(VoteDelta {
            self_vote: true,
            votes_for: 2,
            total_voters: 3,
        })),
    };
    let mut s = open(&addr, TCK_MODEL, "Vote-delta", Some(init)).await;
    let r = s.process(vec![vote(false)]).await;
    assert_eq!(
        state(&r),
        m::State {
            value: Some(m::state::Value::Vote(m::VoteValue {
                self_vote: false,
                votes_for: 1,
                total_voters: 3
            }))
        }
    );
    assert_eq!(
        delta(&r),
        Some(Delta::Vote(VoteDelta {
            self_vote: false,
            votes_for: 0,
            total_voters: 0
        }))
    );
    // voting and un-voting in one command changes nothing
    let r = s.process(vec![vote(true), vote(false)]).await;
    assert!(r.state_action.is_none(), "{r:?}");
}

impl Stream {
    /// Runs an ORMap command and checks its delta (sorted as the TCK sorts it).
    async fn map_step(
        &mut self,
        actions: Vec<m::request_action::Action>,
        cleared: bool,
        removed: &[&str],
        updated: Vec<OrMapEntryDelta>,
        added: Vec<OrMapEntryDelta>,
    ) {
        let r = self.process(actions).await;
        assert_eq!(
            sorted(delta(&r)),
            ormap_delta(cleared, removed, updated, added)
        );
    }
}

#[tokio::test]
async fn ormap_state_changes_as_the_tck_expects() {
    use m::or_map_update::Action as A;
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "ORMap-tck", None).await;
    let pn = |n| m::update::Update::Pncounter(m::PnCounterUpdate { change: n });
    let pn_delta = |n| Delta::Pncounter(PnCounterDelta { change: n });
    s.map_step(
        vec![
            ormap(A::Add("PNCounter-1".into())),
            ormap(A::Add("ORSet-1".into())),
        ],
        false,
        &[],
        vec![],
        vec![
            entry("ORSet-1", orset_delta(false, &[], &[])),
            entry("PNCounter-1", pn_delta(0)),
        ],
    )
    .await;
    s.map_step(
        vec![
            ormap(A::Add("ORSet-1".into())),
            ormap_update("LWWRegister-1", lww("zero", None)),
        ],
        false,
        &[],
        vec![],
        vec![entry(
            "LWWRegister-1",
            lww_delta("zero", CrdtClock::Default, 0),
        )],
    )
    .await;
    s.map_step(
        vec![
            ormap_update("PNCounter-1", pn(42)),
            ormap_update("LWWRegister-1", lww("one", None)),
        ],
        false,
        &[],
        vec![
            entry("LWWRegister-1", lww_delta("one", CrdtClock::Default, 0)),
            entry("PNCounter-1", pn_delta(42)),
        ],
        vec![],
    )
    .await;
    s.map_step(
        vec![ormap(A::Remove("ORSet-1".into()))],
        false,
        &["ORSet-1"],
        vec![],
        vec![],
    )
    .await;
    s.map_step(
        vec![
            ormap(A::Remove("LWWRegister-1".into())),
            ormap_update("Flag-1", m::update::Update::Flag(m::FlagUpdate {})),
        ],
        false,
        &["LWWRegister-1"],
        vec![],
        vec![entry("Flag-1", Delta::Flag(FlagDelta { value: true }))],
    )
    .await;
    s.map_step(vec![ormap(A::Clear(true))], true, &[], vec![], vec![])
        .await;
    s.map_step(
        vec![
            ormap(A::Add("PNCounter-2".into())),
            ormap(A::Clear(true)),
            ormap_update(
                "GCounter-1",
                m::update::Update::Gcounter(m::GCounterUpdate { increment: 123 }),
            ),
        ],
        true,
        &[],
        vec![],
        vec![entry(
            "GCounter-1",
            Delta::Gcounter(GCounterDelta { increment: 123 }),
        )],
    )
    .await;
}

#[tokio::test]
async fn ormap_entries_are_recorded_per_operation() {
    use m::or_map_update::Action as A;
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "ORMap-ops", None).await;
    // a new register entry carries the model's initial value ""
    s.map_step(
        vec![ormap(A::Add("LWWRegister-1".into()))],
        false,
        &[],
        vec![],
        vec![entry("LWWRegister-1", lww_delta("", CrdtClock::Default, 0))],
    )
    .await;
    // a nested register keeps its clock
    s.map_step(
        vec![ormap_update(
            "LWWRegister-1",
            lww("r", Some((m::LwwRegisterClockType::Reverse, 0))),
        )],
        false,
        &[],
        vec![entry(
            "LWWRegister-1",
            lww_delta("r", CrdtClock::Reverse, 0),
        )],
        vec![],
    )
    .await;
    // a nested vote: self_vote only, for a new entry as for an existing one
    s.map_step(
        vec![ormap_update(
            "Vote-1",
            m::update::Update::Vote(m::VoteUpdate { self_vote: true }),
        )],
        false,
        &[],
        vec![],
        vec![entry(
            "Vote-1",
            Delta::Vote(VoteDelta {
                self_vote: true,
                votes_for: 0,
                total_voters: 0,
            }),
        )],
    )
    .await;
    // removing a key and adding it again in one command: the proxy must drop the old value
    s.process(vec![ormap_update(
        "PNCounter-1",
        m::update::Update::Pncounter(m::PnCounterUpdate { change: 5 }),
    )])
    .await;
    s.map_step(
        vec![
            ormap(A::Remove("PNCounter-1".into())),
            ormap(A::Add("PNCounter-1".into())),
        ],
        false,
        &["PNCounter-1"],
        vec![],
        vec![entry(
            "PNCounter-1",
            Delta::Pncounter(PnCounterDelta { change: 0 }),
        )],
    )
    .await;
    // adding a key and removing it again: nothing
    let r = s
        .process(vec![
            ormap(A::Add("GSet-1".into())),
            ormap(A::Remove("GSet-1".into())),
        ])
        .await;
    assert!(r.state_action.is_none(), "{r:?}");
}

#[tokio::test]
async fn lwwregister_deltas_follow_the_java_support_rule() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "LWWRegister-rule", None).await;
    let set = |v: &str, c| update(lww(v, c));
    let r = s
        .process(vec![set("A", Some((m::LwwRegisterClockType::Reverse, 0)))])
        .await;
    assert_eq!(delta(&r), Some(lww_delta("A", CrdtClock::Reverse, 0)));
    let r = s
        .process(vec![set("A", Some((m::LwwRegisterClockType::Custom, 123)))])
        .await;
    assert_eq!(delta(&r), Some(lww_delta("A", CrdtClock::Custom, 123)));
    let r = s
        .process(vec![set(
            "A",
            Some((m::LwwRegisterClockType::CustomAutoIncrement, 456)),
        )])
        .await;
    assert_eq!(
        delta(&r),
        Some(lww_delta("A", CrdtClock::CustomAutoIncrement, 456))
    );
    // the same value with the default clock is no change (java-support's LWWRegisterImpl.set)
    let r = s.process(vec![set("A", None)]).await;
    assert!(r.state_action.is_none(), "{r:?}");
    // the last set of a command wins, with its clock
    let r = s
        .process(vec![
            set("B", Some((m::LwwRegisterClockType::Custom, 7))),
            set("C", None),
        ])
        .await;
    assert_eq!(delta(&r), Some(lww_delta("C", CrdtClock::Default, 0)));
    // a replicated first delta replaces the register's pending initial value
    let mut t = open(&addr, TCK_MODEL, "LWWRegister-replicated", None).await;
    t.send(crdt_stream_in::Message::Delta(CrdtDelta {
        delta: Some(lww_delta("one", CrdtClock::Default, 0)),
    }))
    .await;
    let r = t.process(vec![]).await;
    assert!(r.state_action.is_none(), "{r:?}");
}

fn streamed_request(req: &m::StreamedRequest) -> Any {
    Any {
        type_url: "type.googleapis.com/cloudstate.tck.model.crdt.StreamedRequest".into(),
        value: req.encode_to_vec(),
    }
}

fn streamed_message(out: CrdtStreamOut) -> latticed_proto::cloudstate::crdt::CrdtStreamedMessage {
    match out.message {
        Some(crdt_stream_out::Message::StreamedMessage(msg)) => msg,
        other => panic!("expected a streamed message, got {other:?}"),
    }
}

fn gset_add(x: &str) -> m::request_action::Action {
    update(m::update::Update::Gset(m::GSetUpdate { add: x.into() }))
}

#[tokio::test]
async fn process_streamed_on_a_call_that_is_not_streamed_only_replies() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "GSet-unary", None).await;
    let req = m::StreamedRequest {
        id: "GSet-unary".into(),
        ..Default::default()
    };
    let id = s
        .command("ProcessStreamed", streamed_request(&req), false)
        .await;
    match s.next().await.message {
        Some(crdt_stream_out::Message::Reply(r)) => {
            assert_eq!(r.command_id, id);
            assert!(!r.streamed, "streamed on a call that is not: {r:?}");
        }
        other => panic!("{other:?}"),
    }
    // no subscription: a change is answered by its reply alone, the stream has nothing else
    let r = s.process(vec![gset_add("a")]).await;
    assert!(r.state_action.is_some());
    let r = s.process(vec![]).await;
    assert_eq!(r.command_id, 3, "nothing between the two replies");
}

#[tokio::test]
async fn empty_streamed_calls_get_no_reply_on_a_change_only_their_side_effects() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "GSet-empty", None).await;
    let silent = m::StreamedRequest {
        id: "GSet-empty".into(),
        empty: true,
        ..Default::default()
    };
    let with_effects = m::StreamedRequest {
        id: "GSet-empty".into(),
        empty: true,
        effects: vec![m::Effect {
            id: "one".into(),
            synchronous: false,
        }],
        ..Default::default()
    };
    for req in [&silent, &with_effects] {
        s.command("ProcessStreamed", streamed_request(req), true)
            .await;
        match s.next().await.message {
            Some(crdt_stream_out::Message::Reply(r)) => {
                assert!(r.streamed && r.client_action.is_none(), "{r:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    s.process(vec![gset_add("a")]).await;
    // java-support sends a streamed message only with a reply, side effects or the end
    let msg = streamed_message(s.next().await);
    assert_eq!(msg.command_id, 2);
    assert!(msg.client_action.is_none(), "{msg:?}");
    assert_eq!(msg.side_effects.len(), 1);
    let r = s.process(vec![]).await;
    assert_eq!(r.command_id, 4, "nothing for the silent call");
}

#[tokio::test]
async fn stream_cancelled_is_always_answered() {
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "GCounter-cancel", None).await;
    // a call that already ended (end_state reached) and an id the model never saw
    let req = m::StreamedRequest {
        id: "GCounter-cancel".into(),
        end_state: Some(gcounter(1)),
        ..Default::default()
    };
    let sid = s
        .command("ProcessStreamed", streamed_request(&req), true)
        .await;
    s.next().await;
    s.process(vec![update(m::update::Update::Gcounter(
        m::GCounterUpdate { increment: 1 },
    ))])
    .await;
    assert!(streamed_message(s.next().await).end_stream);
    for id in [sid, 99] {
        s.send(crdt_stream_in::Message::StreamCancelled(StreamCancelled {
            entity_id: "GCounter-cancel".into(),
            id,
        }))
        .await;
        match s.next().await.message {
            Some(crdt_stream_out::Message::StreamCancelledResponse(r)) => {
                assert_eq!(r.command_id, id);
                assert!(r.state_action.is_none() && r.side_effects.is_empty());
            }
            other => panic!("expected a stream_cancelled_response, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn crdt_two_and_crdt_configured_reply_empty_and_only_crdt_two_deletes() {
    let (addr, _) = model().await;
    let all = || {
        vec![
            gset_add("a"),
            m::request_action::Action::Effect(m::Effect {
                id: "x".into(),
                synchronous: true,
            }),
            m::request_action::Action::Forward(m::Forward { id: "x".into() }),
            m::request_action::Action::Fail(m::Fail {
                message: "no".into(),
            }),
            m::request_action::Action::Delete(m::Delete {}),
        ]
    };
    let empty = Some(ClientAction {
        action: Some(client_action::Action::Reply(
            latticed_proto::cloudstate::Reply {
                payload: Some(Any {
                    type_url: "type.googleapis.com/cloudstate.tck.model.crdt.Response".into(),
                    value: vec![],
                }),
                metadata: None,
            },
        )),
    });
    let mut two = open(&addr, TWO, "GSet-two", None).await;
    let r = two.unary("Call", all()).await;
    assert_eq!(r.client_action, empty);
    assert!(r.side_effects.is_empty());
    assert!(matches!(
        r.state_action.and_then(|a| a.action),
        Some(crdt_state_action::Action::Delete(_))
    ));
    let mut configured = open(&addr, model_uf::CONFIGURED, "GSet-conf", None).await;
    let r = configured.unary("Call", all()).await;
    assert_eq!(r.client_action, empty);
    assert!(
        r.side_effects.is_empty() && r.state_action.is_none(),
        "{r:?}"
    );
}

#[tokio::test]
async fn clearing_an_empty_set_or_map_is_still_a_clear() {
    // java-support's ORSetImpl.clear and ORMapImpl.clear record the clear unconditionally
    let (addr, _) = model().await;
    let mut s = open(&addr, TCK_MODEL, "ORSet-empty", None).await;
    let r = s
        .process(vec![orset(m::or_set_update::Action::Clear(true))])
        .await;
    assert_eq!(delta(&r), Some(orset_delta(true, &[], &[])));
    let mut t = open(&addr, TCK_MODEL, "ORMap-empty", None).await;
    t.map_step(
        vec![ormap(m::or_map_update::Action::Clear(true))],
        true,
        &[],
        vec![],
        vec![],
    )
    .await;
}
