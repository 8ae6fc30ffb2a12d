//! The CloudState protocol end to end: a real daemon (in-process, over real QUIC and gRPC),
//! the conformance model user function, and a real gRPC client of the model's services
//! (spec/conformance.md group A, as far as the front-end and entity runtime serve it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use latticed_proto::cloudstate::crdt::{crdt_stream_in, crdt_stream_out};
use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model::crdt_two_client::CrdtTwoClient;
use latticed_tests::model_uf::{self, ConformanceModel, Traffic, TCK_MODEL, TWO};
use latticed_tests::{poll_until, Certs, LiveNode};

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    node: LiveNode,
    model: ConformanceModel,
    frontend: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

fn setup(certs: &Certs, name: &str, join: &[SocketAddr]) -> Setup {
    setup_with(certs, name, join, "30s")
}

fn setup_with(certs: &Certs, name: &str, join: &[SocketAddr], passivation: &str) -> Setup {
    setup_model(certs, name, join, passivation, ConformanceModel::default())
}

fn setup_model(
    certs: &Certs,
    name: &str,
    join: &[SocketAddr],
    passivation: &str,
    model: ConformanceModel,
) -> Setup {
    setup_full(
        certs,
        name,
        join,
        &["--passivation-timeout", passivation],
        model,
        None,
    )
}

/// A node with the model behind it, `flags` added, the model's server limited to
/// `max_streams` concurrent streams per connection.
fn setup_full(
    certs: &Certs,
    name: &str,
    join: &[SocketAddr],
    flags: &[&str],
    model: ConformanceModel,
    max_streams: Option<u32>,
) -> Setup {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uf = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(model_uf::serve_limited(model.clone(), l, max_streams));
        a
    });
    let uf = uf.to_string();
    let node = LiveNode::start(
        name,
        &certs.issue(name),
        0,
        join,
        &[&["--user-function", &uf, "--listen", "127.0.0.1:0"], flags].concat(),
    );
    let frontend = poll_until(WAIT, "the front-end to serve", || node.frontend());
    Setup {
        node,
        model,
        frontend,
        _rt: rt,
    }
}

fn tck(s: &Setup) -> CrdtTckModelClient<tonic::transport::Channel> {
    s.node
        .block_on(CrdtTckModelClient::connect(format!(
            "http://{}",
            s.frontend
        )))
        .unwrap()
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn configured(
    s: &Setup,
) -> latticed_tests::model::crdt_configured_client::CrdtConfiguredClient<tonic::transport::Channel>
{
    s.node
        .block_on(
            latticed_tests::model::crdt_configured_client::CrdtConfiguredClient::connect(format!(
                "http://{}",
                s.frontend
            )),
        )
        .unwrap()
}

fn req(id: &str, actions: Vec<m::request_action::Action>) -> m::Request {
    m::Request {
        id: id.into(),
        actions: actions
            .into_iter()
            .map(|a| m::RequestAction { action: Some(a) })
            .collect(),
    }
}

fn pn(change: i64) -> m::request_action::Action {
    m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Pncounter(m::PnCounterUpdate { change })),
        write_consistency: 0,
    })
}

fn pn_state(v: i64) -> Option<m::State> {
    Some(m::State {
        value: Some(m::state::Value::Pncounter(m::PnCounterValue { value: v })),
    })
}

/// `Process` through the front-end; the call must succeed.
fn process(
    s: &Setup,
    c: &mut CrdtTckModelClient<tonic::transport::Channel>,
    id: &str,
    actions: Vec<m::request_action::Action>,
) -> m::Response {
    s.node
        .block_on(c.process(req(id, actions)))
        .unwrap()
        .into_inner()
}

fn traffic(s: &Setup) -> Vec<Traffic> {
    s.model.traffic.lock().unwrap().clone()
}

#[test]
fn conformance_1_discovery_and_4_state_changes_reply_pass_through_and_delete() {
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let info = s.model.proxies.lock().unwrap()[0].clone();
    assert_eq!(
        (info.protocol_major_version, info.protocol_minor_version),
        (0, 2)
    );
    assert_eq!(
        info.supported_entity_types,
        vec!["cloudstate.crdt.Crdt".to_string()]
    );
    let mut c = tck(&s);
    let id = "PNCounter-a4";
    let r = process(&s, &mut c, id, vec![]);
    assert_eq!(r.state, pn_state(0));
    let r = process(&s, &mut c, id, vec![pn(1), pn(-2), pn(3)]);
    assert_eq!(r.state, pn_state(2));
    let r = process(&s, &mut c, id, vec![pn(4), pn(-5), pn(6)]);
    assert_eq!(r.state, pn_state(7));
    let r = process(
        &s,
        &mut c,
        id,
        vec![m::request_action::Action::Delete(m::Delete {})],
    );
    assert_eq!(r.state, pn_state(7));
    // one stream: init without a delta, commands 1..4 with the client's bytes, then closed
    let t = traffic(&s);
    let inits: Vec<_> = t
        .iter()
        .filter_map(|x| match x {
            Traffic::In(n, msg) => match &msg.message {
                Some(crdt_stream_in::Message::Init(i)) => Some((*n, i.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(inits.len(), 1);
    assert_eq!(inits[0].1.service_name, TCK_MODEL);
    assert!(inits[0].1.delta.is_none());
    let ids: Vec<i64> = t
        .iter()
        .filter_map(|x| match x {
            Traffic::In(_, msg) => match &msg.message {
                Some(crdt_stream_in::Message::Command(c)) => {
                    assert_eq!(
                        c.payload.as_ref().unwrap().type_url,
                        "type.googleapis.com/cloudstate.tck.model.crdt.Request"
                    );
                    Some(c.id)
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    poll_until(WAIT, "the stream to be closed after the delete", || {
        traffic(&s)
            .iter()
            .any(|x| matches!(x, Traffic::Closed(n) if *n == inits[0].0))
            .then_some(())
    });
    // later commands: Entity deleted
    let err = s.node.block_on(c.process(req(id, vec![]))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert_eq!(err.message(), "Entity deleted");
}

#[test]
fn conformance_5_forwards_and_side_effects() {
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let mut c = tck(&s);
    let id = "GSet-a5";
    let add = m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Gset(m::GSetUpdate { add: "one".into() })),
        write_consistency: 0,
    });
    s.node.block_on(c.process(req(id, vec![add]))).unwrap();
    // a forward: the client gets CrdtTwo's reply (empty)
    let r = process(
        &s,
        &mut c,
        id,
        vec![m::request_action::Action::Forward(m::Forward {
            id: id.into(),
        })],
    );
    assert_eq!(r, m::Response { state: None });
    // a side effect reaches CrdtTwo's entity as its second command
    s.node
        .block_on(c.process(req(
            id,
            vec![m::request_action::Action::Effect(m::Effect {
                id: id.into(),
                synchronous: true,
            })],
        )))
        .unwrap();
    let two_cmds = traffic(&s).iter().filter(|x| matches!(x, Traffic::In(_, msg) if matches!(&msg.message, Some(crdt_stream_in::Message::Command(c)) if c.name == "Call"))).count();
    assert_eq!(two_cmds, 2);
    let inits: Vec<String> = traffic(&s)
        .iter()
        .filter_map(|x| match x {
            Traffic::In(_, msg) => match &msg.message {
                Some(crdt_stream_in::Message::Init(i)) => Some(i.service_name.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(inits, [TCK_MODEL.to_string(), TWO.to_string()]);
    // CrdtTwo served directly too
    let mut two = s
        .node
        .block_on(CrdtTwoClient::connect(format!("http://{}", s.frontend)))
        .unwrap();
    assert_eq!(
        s.node
            .block_on(two.call(req(id, vec![])))
            .unwrap()
            .into_inner(),
        m::Response { state: None }
    );
}

#[test]
fn conformance_6_failures_keep_the_entity_working_and_bad_requests_are_refused() {
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let mut c = tck(&s);
    let id = "GCounter-a6";
    let inc = m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Gcounter(m::GCounterUpdate {
            increment: 42,
        })),
        write_consistency: 0,
    });
    s.node.block_on(c.process(req(id, vec![inc]))).unwrap();
    let err = s
        .node
        .block_on(c.process(req(
            id,
            vec![m::request_action::Action::Fail(m::Fail {
                message: "expected failure".into(),
            })],
        )))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert_eq!(err.message(), "expected failure");
    let r = process(&s, &mut c, id, vec![]);
    assert_eq!(
        r.state,
        Some(m::State {
            value: Some(m::state::Value::Gcounter(m::GCounterValue { value: 42 }))
        })
    );

    // an unknown method: UNIMPLEMENTED
    let mut unknown = tonic::client::Grpc::new(
        s.node
            .block_on(
                tonic::transport::Endpoint::from_shared(format!("http://{}", s.frontend))
                    .unwrap()
                    .connect(),
            )
            .unwrap(),
    );
    let status = s
        .node
        .block_on(async {
            unknown.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<m::Request, m::Response>::default();
            unknown
                .unary(
                    tonic::Request::new(req("x", vec![])),
                    "/cloudstate.tck.model.crdt.CrdtTckModel/Nope"
                        .parse()
                        .unwrap(),
                    codec,
                )
                .await
        })
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    // an undecodable request (field 1 a varint where Request.id is a string): INVALID_ARGUMENT
    let status = s
        .node
        .block_on(async {
            unknown.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<m::GCounterValue, m::Response>::default();
            let r = tonic::Request::new(m::GCounterValue { value: 5 });
            unknown
                .unary(
                    r,
                    "/cloudstate.tck.model.crdt.CrdtTckModel/Process"
                        .parse()
                        .unwrap(),
                    codec,
                )
                .await
        })
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("cloudstate.tck.model.crdt.Request"),
        "{}",
        status.message()
    );
}

#[test]
fn conformance_9_passivation_half_closes_the_stream() {
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let mut c = configured(&s);
    s.node.block_on(c.call(req("cfg-1", vec![]))).unwrap();
    // 100 ms configured by the entity: the stream is closed well within 2 s
    poll_until(
        Duration::from_secs(2),
        "the configured entity to passivate",
        || {
            traffic(&s)
                .iter()
                .any(|x| matches!(x, Traffic::Closed(_)))
                .then_some(())
        },
    );
}

/// The model in the mode a tonic server has by default (response headers as soon as the call
/// is accepted); every other test runs it withholding them, as the support libraries do.
#[test]
fn a_user_function_that_sends_headers_at_once_is_served_too() {
    let certs = Certs::new();
    let mut model = ConformanceModel::default();
    model.eager_headers = true;
    let s = setup_model(&certs, "n1", &[], "30s", model);
    let mut c = tck(&s);
    let r = process(&s, &mut c, "PNCounter-eager", vec![pn(3)]);
    assert_eq!(r.state, pn_state(3));
    let r = process(&s, &mut c, "PNCounter-eager", vec![pn(-1)]);
    assert_eq!(r.state, pn_state(2));
}

/// Issue 8: commands that arrive while an entity is passivating (its stream half-closed, the
/// user function not yet done) used to fail with `Entity terminating`; they wait and are
/// replayed on a fresh entity, whose stream opens only once the old one has ended.
#[test]
fn commands_sent_while_an_entity_passivates_are_replayed_on_a_fresh_entity() {
    let certs = Certs::new();
    let mut model = ConformanceModel::default();
    model.half_close_delay = Duration::from_millis(1500);
    let s = setup_model(&certs, "n1", &[], "30s", model);
    let mut c = configured(&s);
    s.node.block_on(c.call(req("cfg-p", vec![]))).unwrap();
    poll_until(WAIT, "the entity to half-close its stream", || {
        traffic(&s)
            .iter()
            .any(|x| matches!(x, Traffic::Closed(1)))
            .then_some(())
    });
    // the model holds its side open for 1.5 s: these arrive during the passivation
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut c = c.clone();
            s.node
                .spawn(async move { c.call(req("cfg-p", vec![])).await })
        })
        .collect();
    for call in calls {
        let r = s.node.block_on(call).unwrap();
        assert!(r.is_ok(), "a command sent during passivation failed: {r:?}");
    }
    let t = traffic(&s);
    let commands_on_2 = t
        .iter()
        .filter(|x| {
            matches!(x, Traffic::In(2, m) if matches!(m.message, Some(crdt_stream_in::Message::Command(_))))
        })
        .count();
    assert_eq!(
        commands_on_2, 5,
        "all five replayed on the fresh entity's stream: {t:?}"
    );
}

#[test]
fn a_write_through_one_node_reaches_the_other_nodes_user_functions() {
    let certs = Certs::new();
    let a = setup(&certs, "n1", &[]);
    let b = setup(&certs, "n2", &[a.node.cluster]);
    let c = setup(&certs, "n3", &[a.node.cluster]);
    poll_until(WAIT, "the three nodes to see each other", || {
        (a.node
            .member_states()
            .values()
            .filter(|s| *s == "up")
            .count()
            == 3)
            .then_some(())
    });
    let id = "PNCounter-multi";
    let mut cc = tck(&c);
    assert_eq!(process(&c, &mut cc, id, vec![]).state, pn_state(0));
    let mut cb = tck(&b);
    // activate the entity on n2 first, so that the change arrives there as a delta
    assert_eq!(process(&b, &mut cb, id, vec![]).state, pn_state(0));
    let mut ca = tck(&a);
    a.node.block_on(ca.process(req(id, vec![pn(5)]))).unwrap();
    poll_until(WAIT, "n2's user function to receive the delta", || {
        traffic(&b).iter().any(|x| matches!(x, Traffic::In(_, msg) if matches!(&msg.message, Some(crdt_stream_in::Message::Delta(_))))).then_some(())
    });
    assert_eq!(process(&b, &mut cb, id, vec![]).state, pn_state(5));
    poll_until(WAIT, "n3's user function to receive the delta", || {
        traffic(&c).iter().any(|x| matches!(x, Traffic::In(_, msg) if matches!(&msg.message, Some(crdt_stream_in::Message::Delta(_))))).then_some(())
    });
    assert_eq!(process(&c, &mut cc, id, vec![]).state, pn_state(5));
    // and the user function was never echoed its own change on n1
    assert!(!traffic(&a).iter().any(|x| matches!(x, Traffic::In(_, msg) if matches!(&msg.message, Some(crdt_stream_in::Message::Delta(_))))));
    let _ = crdt_stream_out::Message::Failure(Default::default());
}

fn vote_state(self_vote: bool, votes_for: i32, total_voters: i32) -> Option<m::State> {
    Some(m::State {
        value: Some(m::state::Value::Vote(m::VoteValue {
            self_vote,
            votes_for,
            total_voters,
        })),
    })
}

fn vote_update(v: bool) -> m::Update {
    m::Update {
        update: Some(m::update::Update::Vote(m::VoteUpdate { self_vote: v })),
        write_consistency: 0,
    }
}

#[test]
fn conformance_7_streamed_responses_for_connection_tracking() {
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let id = "Vote-a7";
    let mut client = tck(&s);
    let mut m_stream = s
        .node
        .block_on(client.process_streamed(m::StreamedRequest {
            id: id.into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let first = s.node.block_on(m_stream.message()).unwrap().unwrap();
    assert_eq!(first.state, vote_state(false, 0, 1));
    // C: an empty streamed call that votes; C gets nothing, M gets the new tally
    let c_req = m::StreamedRequest {
        id: id.into(),
        initial_update: Some(vote_update(true)),
        cancel_update: Some(vote_update(false)),
        empty: true,
        ..Default::default()
    };
    let mut c_stream = s
        .node
        .block_on(client.process_streamed(c_req))
        .unwrap()
        .into_inner();
    let next = s
        .node
        .block_on(async { tokio::time::timeout(WAIT, m_stream.message()).await })
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.state, vote_state(true, 1, 1));
    let nothing = s.node.block_on(async {
        tokio::time::timeout(Duration::from_millis(100), c_stream.message()).await
    });
    assert!(
        nothing.is_err(),
        "the empty call receives nothing: {nothing:?}"
    );
    // C cancels: stream_cancelled reaches the user function, whose cancel update M sees
    drop(c_stream);
    let back = s
        .node
        .block_on(async { tokio::time::timeout(WAIT, m_stream.message()).await })
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back.state, vote_state(false, 0, 1));
    let cancelled: Vec<i64> = traffic(&s)
        .iter()
        .filter_map(|x| match x {
            Traffic::In(_, msg) => match &msg.message {
                Some(crdt_stream_in::Message::StreamCancelled(c)) => Some(c.id),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, [2]);
    // M cancels too
    drop(m_stream);
    poll_until(WAIT, "the second cancellation", || {
        (traffic(&s).iter().filter(|x| matches!(x, Traffic::In(_, msg) if matches!(&msg.message, Some(crdt_stream_in::Message::StreamCancelled(_))))).count() == 2).then_some(())
    });
    let r = process(
        &s,
        &mut client,
        id,
        vec![m::request_action::Action::Delete(m::Delete {})],
    );
    assert_eq!(r.state, vote_state(false, 0, 1));
}

#[test]
fn conformance_41_42_remote_changes_wait_for_the_command_and_arrive_as_one_delta() {
    use latticed::replication::Consistency;
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, PnCounterDelta};
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let id = "PNCounter-c41";
    let mut c = tck(&s);
    s.node.block_on(c.process(req(id, vec![pn(5)]))).unwrap();
    // a change made outside the user function (as a peer's would arrive)
    let remote = |n: i64| CrdtDelta {
        delta: Some(Delta::Pncounter(PnCounterDelta { change: n })),
    };
    let key = format!("CrdtTckModel-{id}");
    s.node
        .block_on(
            s.node
                .replication
                .write(&key, remote(3), Consistency::Local),
        )
        .unwrap()
        .unwrap();
    s.node
        .block_on(
            s.node
                .replication
                .write(&key, remote(6), Consistency::Local),
        )
        .unwrap()
        .unwrap();
    poll_until(WAIT, "the remote change to reach the user function", || {
        let deltas: Vec<CrdtDelta> = traffic(&s)
            .iter()
            .filter_map(|x| match x {
                Traffic::In(_, msg) => match &msg.message {
                    Some(crdt_stream_in::Message::Delta(d)) => Some(d.clone()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let total: i64 = deltas
            .iter()
            .map(|d| match &d.delta {
                Some(Delta::Pncounter(p)) => p.change,
                _ => 0,
            })
            .sum();
        (total == 9).then_some(())
    });
    let r = process(&s, &mut c, id, vec![]);
    assert_eq!(r.state, pn_state(14));
}

#[test]
fn votes_count_the_members_that_are_up() {
    let certs = Certs::new();
    let a = setup(&certs, "n1", &[]);
    let b = setup(&certs, "n2", &[a.node.cluster]);
    let mut c3 = setup(&certs, "n3", &[a.node.cluster]);
    poll_until(WAIT, "three members up", || {
        (a.node
            .member_states()
            .values()
            .filter(|s| *s == "up")
            .count()
            == 3)
            .then_some(())
    });
    let id = "Vote-members";
    let mut ca = tck(&a);
    let vote = |v| m::request_action::Action::Update(vote_update(v));
    a.node
        .block_on(ca.process(req(id, vec![vote(true)])))
        .unwrap();
    poll_until(WAIT, "one of three votes for", || {
        let r = a
            .node
            .block_on(ca.process(req(id, vec![])))
            .ok()?
            .into_inner();
        (r.state == vote_state(true, 1, 3)).then_some(())
    });
    let mut cb = tck(&b);
    b.node
        .block_on(cb.process(req(id, vec![vote(true)])))
        .unwrap();
    poll_until(WAIT, "two of three votes for", || {
        let r = a
            .node
            .block_on(ca.process(req(id, vec![])))
            .ok()?
            .into_inner();
        (r.state == vote_state(true, 2, 3)).then_some(())
    });
    // n3 dies: the tally follows membership
    c3.node.crash();
    poll_until(WAIT, "total_voters 2 once n3 is down", || {
        let r = a
            .node
            .block_on(ca.process(req(id, vec![])))
            .ok()?
            .into_inner();
        (r.state == vote_state(true, 2, 2)).then_some(())
    });
}

#[test]
fn a_streamed_client_on_one_node_sees_updates_made_on_another() {
    let certs = Certs::new();
    let a = setup(&certs, "n1", &[]);
    let b = setup(&certs, "n2", &[a.node.cluster]);
    poll_until(WAIT, "the two nodes to see each other", || {
        (b.node.member_states().get("n1").map(String::as_str) == Some("up")).then_some(())
    });
    let id = "GCounter-streamed";
    let mut cb = tck(&b);
    let mut watch = b
        .node
        .block_on(cb.process_streamed(m::StreamedRequest {
            id: id.into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let first = b.node.block_on(watch.message()).unwrap().unwrap();
    assert_eq!(
        first.state,
        Some(m::State {
            value: Some(m::state::Value::Gcounter(m::GCounterValue { value: 0 }))
        })
    );
    let mut ca = tck(&a);
    let inc = m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Gcounter(m::GCounterUpdate {
            increment: 7,
        })),
        write_consistency: 0,
    });
    a.node.block_on(ca.process(req(id, vec![inc]))).unwrap();
    let seen = b
        .node
        .block_on(async { tokio::time::timeout(WAIT, watch.message()).await })
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        seen.state,
        Some(m::State {
            value: Some(m::state::Value::Gcounter(m::GCounterValue { value: 7 }))
        })
    );
}

#[test]
fn majority_writes_through_the_front_end() {
    let certs = Certs::new();
    let a = setup(&certs, "n1", &[]);
    let _b = setup(&certs, "n2", &[a.node.cluster]);
    poll_until(WAIT, "the two nodes to see each other", || {
        (a.node.member_states().get("n2").map(String::as_str) == Some("up")).then_some(())
    });
    let mut ca = tck(&a);
    let update = |c: i32| {
        m::request_action::Action::Update(m::Update {
            update: Some(m::update::Update::Pncounter(m::PnCounterUpdate {
                change: 1,
            })),
            write_consistency: c,
        })
    };
    let r = process(
        &a,
        &mut ca,
        "PNCounter-wc",
        vec![update(m::UpdateWriteConsistency::All as i32)],
    );
    assert_eq!(r.state, pn_state(1));
    let r = process(
        &a,
        &mut ca,
        "PNCounter-wc",
        vec![update(m::UpdateWriteConsistency::Majority as i32)],
    );
    assert_eq!(r.state, pn_state(2));
}

/// Issue 8: a MAJORITY write used to be awaited inside the entity's loop, so every other
/// command of that entity waited for it (up to the write timeout). Now a command on the same
/// entity completes while the MAJORITY write is still in flight, and the MAJORITY one then
/// fails with the consistency failure (its write stays local).
#[test]
fn a_command_completes_while_a_majority_write_of_the_same_entity_is_in_flight() {
    let certs = Certs::new();
    let a = setup(&certs, "n1", &[]);
    let mut b = LiveNode::start("n2", &certs.issue("n2"), 0, &[a.node.cluster], &[]);
    poll_until(WAIT, "the two nodes to see each other", || {
        (a.node.member_states().get("n2").map(String::as_str) == Some("up")).then_some(())
    });
    // n2 stops answering: a MAJORITY of two cannot be reached until the write timeout
    b.crash();
    let update = |change: i64, c: m::UpdateWriteConsistency| {
        m::request_action::Action::Update(m::Update {
            update: Some(m::update::Update::Pncounter(m::PnCounterUpdate { change })),
            write_consistency: c as i32,
        })
    };
    let id = "PNCounter-inflight";
    let mut majority_client = tck(&a);
    let majority = a.node.spawn(async move {
        majority_client
            .process(req(
                id,
                vec![update(10, m::UpdateWriteConsistency::Majority)],
            ))
            .await
    });
    let mut c = tck(&a);
    // the MAJORITY command reached the user function before this one
    poll_until(
        WAIT,
        "the MAJORITY command to reach the user function",
        || {
            traffic(&a)
            .iter()
            .any(|t| matches!(t, Traffic::Out(_, o) if matches!(o.message, Some(crdt_stream_out::Message::Reply(_)))))
            .then_some(())
        },
    );
    let r = process(
        &a,
        &mut c,
        id,
        vec![update(1, m::UpdateWriteConsistency::Local)],
    );
    assert_eq!(r.state, pn_state(11));
    assert!(
        !majority.is_finished(),
        "the LOCAL command waited for the MAJORITY write"
    );
    let e = a.node.block_on(majority).unwrap().unwrap_err();
    assert_eq!(
        e.message(),
        "Failed to update CRDT at requested write consistency"
    );
    // the failed write stayed local
    let r = process(&a, &mut c, id, vec![]);
    assert_eq!(r.state, pn_state(11));
}

/// Issue 8: one streaming client that does not read used to stall its whole entity (a full
/// channel awaited inside the entity's loop). Now that client loses its stream (it ends with
/// RESOURCE_EXHAUSTED once read, and the user function gets `stream_cancelled`) and every
/// command of the entity is served.
#[test]
fn a_slow_streaming_client_loses_its_stream_not_the_entity() {
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let id = "GSet-slow";
    let mut watcher = tck(&s);
    // a watch that is never read while the set grows
    let mut watch = s
        .node
        .block_on(watcher.process_streamed(m::StreamedRequest {
            id: id.into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let mut c = tck(&s);
    let big = "x".repeat(1024);
    for i in 0..150 {
        let add = m::request_action::Action::Update(m::Update {
            update: Some(m::update::Update::Gset(m::GSetUpdate {
                add: format!("{i:03}{big}"),
            })),
            write_consistency: 0,
        });
        let r = s
            .node
            .block_on(async { tokio::time::timeout(WAIT, c.process(req(id, vec![add]))).await })
            .expect("the entity keeps serving")
            .unwrap();
        assert!(r.into_inner().state.is_some());
    }
    poll_until(WAIT, "the slow client's call to be cancelled", || {
        traffic(&s)
            .iter()
            .any(|t| matches!(t, Traffic::In(_, i) if matches!(i.message, Some(crdt_stream_in::Message::StreamCancelled(_)))))
            .then_some(())
    });
    let end = s.node.block_on(async {
        tokio::time::timeout(WAIT, async {
            loop {
                match watch.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(e) => return Some(e),
                }
            }
        })
        .await
        .unwrap()
    });
    let e = end.expect("the stream ends with a failure");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
}

#[test]
fn a_delete_on_one_node_reaches_the_other_nodes_user_function() {
    let certs = Certs::new();
    let a = setup(&certs, "n1", &[]);
    let b = setup(&certs, "n2", &[a.node.cluster]);
    poll_until(WAIT, "the two nodes to see each other", || {
        (b.node.member_states().get("n1").map(String::as_str) == Some("up")).then_some(())
    });
    let id = "PNCounter-deleted-elsewhere";
    let mut cb = tck(&b);
    b.node.block_on(cb.process(req(id, vec![pn(1)]))).unwrap();
    let mut ca = tck(&a);
    poll_until(WAIT, "n1 to hold the value", || {
        let r = a
            .node
            .block_on(ca.process(req(id, vec![])))
            .ok()?
            .into_inner();
        (r.state == pn_state(1)).then_some(())
    });
    a.node
        .block_on(ca.process(req(
            id,
            vec![m::request_action::Action::Delete(m::Delete {})],
        )))
        .unwrap();
    let key = format!("CrdtTckModel-{id}");
    poll_until(WAIT, "the tombstone on n2", || {
        matches!(
            b.node.block_on(b.node.replication.read(&key)).unwrap(),
            Some(latticed::store::Entry::Deleted)
        )
        .then_some(())
    });
    // n2's user function is told with `delete` and its stream closed
    poll_until(WAIT, "the delete to reach n2's user function", || {
        traffic(&b).iter().any(|x| matches!(x, Traffic::In(_, msg) if matches!(&msg.message, Some(crdt_stream_in::Message::Delete(_))))).then_some(())
    });
    poll_until(WAIT, "n2's stream closed", || {
        traffic(&b)
            .iter()
            .any(|x| matches!(x, Traffic::Closed(_)))
            .then_some(())
    });
    let err = b.node.block_on(cb.process(req(id, vec![]))).unwrap_err();
    assert_eq!(err.message(), "Entity deleted");
}

#[test]
fn conformance_15_rehydration_after_passivation_starts_from_the_full_state() {
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, GCounterDelta};
    let certs = Certs::new();
    let s = setup_with(&certs, "n1", &[], "200ms");
    let mut c = tck(&s);
    let id = "GCounter-rehydrate";
    let inc = m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Gcounter(m::GCounterUpdate {
            increment: 5,
        })),
        write_consistency: 0,
    });
    s.node.block_on(c.process(req(id, vec![inc]))).unwrap();
    poll_until(WAIT, "the entity to passivate", || {
        traffic(&s)
            .iter()
            .any(|x| matches!(x, Traffic::Closed(1)))
            .then_some(())
    });
    let r = process(&s, &mut c, id, vec![]);
    assert_eq!(
        r.state,
        Some(m::State {
            value: Some(m::state::Value::Gcounter(m::GCounterValue { value: 5 }))
        })
    );
    // the second stream: init with the full value, command ids from 1 again
    let second: Vec<crdt_stream_in::Message> = traffic(&s)
        .into_iter()
        .filter_map(|x| match x {
            Traffic::In(2, msg) => msg.message,
            _ => None,
        })
        .collect();
    match &second[0] {
        crdt_stream_in::Message::Init(i) => assert_eq!(
            i.delta.as_ref().and_then(|d| d.delta.clone()),
            Some(Delta::Gcounter(GCounterDelta { increment: 5 }))
        ),
        other => panic!("{other:?}"),
    }
    match &second[1] {
        crdt_stream_in::Message::Command(c) => assert_eq!(c.id, 1),
        other => panic!("{other:?}"),
    }
}

/// A change made outside the user function, as a peer's would arrive.
fn remote_write(s: &Setup, id: &str, d: latticed_proto::cloudstate::crdt::CrdtDelta) {
    let key = format!("CrdtTckModel-{id}");
    s.node
        .block_on(
            s.node
                .replication
                .write(&key, d, latticed::replication::Consistency::Local),
        )
        .unwrap()
        .unwrap();
}

fn deltas_in(s: &Setup) -> Vec<latticed_proto::cloudstate::crdt::CrdtDelta> {
    traffic(s)
        .into_iter()
        .filter_map(|x| match x {
            Traffic::In(_, msg) => match msg.message {
                Some(crdt_stream_in::Message::Delta(d)) => Some(d),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn conformance_51_a_losing_lww_write_is_pushed_back_to_the_user_function() {
    use latticed_proto::cloudstate::crdt::crdt_delta::Delta;
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let mut c = tck(&s);
    let id = "LWWRegister-c51";
    let set = |v: &str, clock: i32| {
        m::request_action::Action::Update(m::Update {
            update: Some(m::update::Update::Lwwregister(m::LwwRegisterUpdate {
                value: v.into(),
                clock: Some(m::LwwRegisterClock {
                    clock_type: clock,
                    custom_clock_value: 0,
                }),
            })),
            write_consistency: 0,
        })
    };
    s.node
        .block_on(c.process(req(
            id,
            vec![set("one", m::LwwRegisterClockType::Default as i32)],
        )))
        .unwrap();
    // REVERSE over a value loses: the replicated value stays "one" and the user function,
    // which set "rev" on its side, is sent "one" back
    let r = process(
        &s,
        &mut c,
        id,
        vec![set("rev", m::LwwRegisterClockType::Reverse as i32)],
    );
    assert_eq!(
        r.state,
        Some(m::State {
            value: Some(m::state::Value::Lwwregister(m::LwwRegisterValue {
                value: "rev".into()
            }))
        })
    );
    poll_until(WAIT, "the old value pushed back", || {
        deltas_in(&s).iter().any(|d| matches!(&d.delta, Some(Delta::Lwwregister(l)) if l.value == Some(latticed_crdt::Element::string("one").to_any()))).then_some(())
    });
    let r = process(&s, &mut c, id, vec![]);
    assert_eq!(
        r.state,
        Some(m::State {
            value: Some(m::state::Value::Lwwregister(m::LwwRegisterValue {
                value: "one".into()
            }))
        })
    );
}

#[test]
fn conformance_50_53_remote_set_and_map_changes_reach_the_user_function_as_the_spec_says() {
    use latticed_crdt::Element;
    use latticed_proto::cloudstate::crdt::{
        crdt_delta::Delta, CrdtDelta, GCounterDelta, OrMapDelta, OrMapEntryDelta, OrSetDelta,
    };
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let mut c = tck(&s);
    let any = |x: &str| Element::string(x).to_any();
    // ORSet: the user function adds e1, e2, e3; a remote change removes e1 and e2
    let id = "ORSet-c50";
    let add = |x: &str| {
        m::request_action::Action::Update(m::Update {
            update: Some(m::update::Update::Orset(m::OrSetUpdate {
                action: Some(m::or_set_update::Action::Add(x.into())),
            })),
            write_consistency: 0,
        })
    };
    s.node
        .block_on(c.process(req(id, vec![add("e1"), add("e2"), add("e3")])))
        .unwrap();
    let remote = CrdtDelta {
        delta: Some(Delta::Orset(OrSetDelta {
            cleared: false,
            removed: vec![any("e1"), any("e2")],
            added: vec![],
        })),
    };
    remote_write(&s, id, remote);
    // cheaper as clear + re-add than two removes
    let expected = CrdtDelta {
        delta: Some(Delta::Orset(OrSetDelta {
            cleared: true,
            removed: vec![],
            added: vec![any("e3")],
        })),
    };
    poll_until(WAIT, "the ORSet delta", || {
        deltas_in(&s).contains(&expected).then_some(())
    });
    // ORMap: remote removal of every key arrives as cleared only
    let id = "ORMap-c53";
    let madd = |k: &str| {
        m::request_action::Action::Update(m::Update {
            update: Some(m::update::Update::Ormap(Box::new(m::OrMapUpdate {
                action: Some(m::or_map_update::Action::Add(k.into())),
            }))),
            write_consistency: 0,
        })
    };
    s.node
        .block_on(c.process(req(id, vec![madd("GCounter-1"), madd("GCounter-2")])))
        .unwrap();
    let remote = CrdtDelta {
        delta: Some(Delta::Ormap(OrMapDelta {
            cleared: false,
            removed: vec![any("GCounter-1"), any("GCounter-2")],
            updated: vec![],
            added: vec![],
        })),
    };
    remote_write(&s, id, remote);
    let cleared = CrdtDelta {
        delta: Some(Delta::Ormap(OrMapDelta {
            cleared: true,
            ..Default::default()
        })),
    };
    poll_until(WAIT, "the ORMap cleared delta", || {
        deltas_in(&s).contains(&cleared).then_some(())
    });
    // and a remote nested change arrives under `updated`
    s.node
        .block_on(c.process(req(id, vec![madd("GCounter-3")])))
        .unwrap();
    let nested = CrdtDelta {
        delta: Some(Delta::Ormap(OrMapDelta {
            updated: vec![OrMapEntryDelta {
                key: Some(any("GCounter-3")),
                delta: Some(CrdtDelta {
                    delta: Some(Delta::Gcounter(GCounterDelta { increment: 7 })),
                }),
            }],
            ..Default::default()
        })),
    };
    remote_write(&s, id, nested.clone());
    poll_until(WAIT, "the nested update", || {
        deltas_in(&s).contains(&nested).then_some(())
    });
}

#[test]
fn conformance_48_49_remote_counter_and_gset_changes_arrive_as_deltas() {
    use latticed::replication::Consistency;
    use latticed_crdt::Element;
    use latticed_proto::cloudstate::crdt::{
        crdt_delta::Delta, CrdtDelta, GSetDelta, PnCounterDelta,
    };
    let certs = Certs::new();
    let s = setup(&certs, "n1", &[]);
    let mut c = tck(&s);
    s.node
        .block_on(c.process(req("PNCounter-c48", vec![pn(5)])))
        .unwrap();
    let minus = CrdtDelta {
        delta: Some(Delta::Pncounter(PnCounterDelta { change: -3 })),
    };
    s.node
        .block_on(s.node.replication.write(
            "CrdtTckModel-PNCounter-c48",
            minus.clone(),
            Consistency::Local,
        ))
        .unwrap()
        .unwrap();
    poll_until(WAIT, "change -3", || {
        deltas_in(&s).contains(&minus).then_some(())
    });
    assert_eq!(
        process(&s, &mut c, "PNCounter-c48", vec![]).state,
        pn_state(2)
    );
    let add = m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Gset(m::GSetUpdate { add: "e1".into() })),
        write_consistency: 0,
    });
    s.node
        .block_on(c.process(req("GSet-c49", vec![add])))
        .unwrap();
    let remote = CrdtDelta {
        delta: Some(Delta::Gset(GSetDelta {
            added: vec![Element::string("e2").to_any()],
        })),
    };
    s.node
        .block_on(s.node.replication.write(
            "CrdtTckModel-GSet-c49",
            remote.clone(),
            Consistency::Local,
        ))
        .unwrap()
        .unwrap();
    poll_until(WAIT, "added [e2]", || {
        deltas_in(&s).contains(&remote).then_some(())
    });
}

fn gset_add(element: String) -> m::request_action::Action {
    m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Gset(m::GSetUpdate { add: element })),
        write_consistency: 0,
    })
}

/// Issue 8: a command larger than the user function accepts used to kill its entity
/// (`Entity terminating`, and a log that only said the user function ended the stream); it is
/// refused up front, naming the limit. Replies larger than tonic's default 4 MiB decode limit
/// are accepted (up to 12 MiB).
#[test]
fn message_size_limits_towards_and_from_the_user_function() {
    let certs = Certs::new();
    let s = setup_full(
        &certs,
        "n1",
        &[],
        &["--user-function-max-message", "4194304"],
        ConformanceModel::default(),
        None,
    );
    let mut c = tck(&s);
    let id = "GSet-big";
    let e = s
        .node
        .block_on(c.process(req(id, vec![gset_add("x".repeat(5 << 20))])))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("at most 4194304 bytes"), "{e:?}");
    // two 3 MiB elements: the second reply carries both, over 6 MiB
    process(
        &s,
        &mut c,
        id,
        vec![gset_add(format!("a{}", "x".repeat(3 << 20)))],
    );
    let r = process(
        &s,
        &mut c,
        id,
        vec![gset_add(format!("b{}", "x".repeat(3 << 20)))],
    );
    let Some(m::State {
        value: Some(m::state::Value::Gset(g)),
    }) = r.state
    else {
        panic!("not a GSet")
    };
    assert_eq!(g.elements.len(), 2);
}

/// Issue 8: all entities shared one HTTP/2 connection, and a server caps the streams one
/// connection carries (SETTINGS_MAX_CONCURRENT_STREAMS): entities beyond the cap waited until
/// others passivated. latticed reads the cap at discovery, and streams spread over more
/// connections.
#[test]
fn entities_beyond_a_connections_stream_cap_are_served_on_another_connection() {
    let certs = Certs::new();
    let s = setup_full(
        &certs,
        "n1",
        &[],
        // the default (100) is over the server's cap: latticed reads the server's SETTINGS
        &[],
        ConformanceModel::default(),
        Some(4),
    );
    let c = tck(&s);
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let mut c = c.clone();
            s.node.spawn(async move {
                tokio::time::timeout(
                    WAIT,
                    c.process(req(&format!("PNCounter-conn-{i}"), vec![pn(1)])),
                )
                .await
            })
        })
        .collect();
    for call in calls {
        let r = s.node.block_on(call).unwrap();
        let r = r.expect("served in time").unwrap();
        assert_eq!(r.into_inner().state, pn_state(1));
    }
}

/// Issue 8: active entities per user function are bounded, with a clear error beyond.
#[test]
fn active_entities_per_user_function_are_bounded() {
    let certs = Certs::new();
    let s = setup_full(
        &certs,
        "n1",
        &[],
        &["--max-entities-per-user-function", "3"],
        ConformanceModel::default(),
        None,
    );
    let mut c = tck(&s);
    for i in 0..3 {
        process(&s, &mut c, &format!("PNCounter-cap-{i}"), vec![pn(1)]);
    }
    let e = s
        .node
        .block_on(c.process(req("PNCounter-cap-3", vec![pn(1)])))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-entities-per-user-function 3"),
        "{e:?}"
    );
    // an active entity is still served
    let r = process(&s, &mut c, "PNCounter-cap-0", vec![pn(1)]);
    assert_eq!(r.state, pn_state(2));
}
