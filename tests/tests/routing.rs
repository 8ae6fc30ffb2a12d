//! Routing (the DaemonSet model): any node serves every service of the cluster. Real daemons
//! (in-process, real sockets: gRPC front-ends and a mutually authenticated QUIC mesh) where only
//! some nodes run the conformance model user function; clients talk to the others.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::net::SocketAddr;

use latticed_proto::cloudstate::crdt::crdt_stream_in;
use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_node::{gcounter, gcounter_state, http1, received, request, WAIT};
use latticed_tests::model_uf::{self, ConformanceModel, TCK_MODEL, TWO};
use latticed_tests::{poll_until, Certs, LiveNode};

/// Which user functions a node runs: each a conformance model declaring the listed services
/// (an empty list: all of them).
type Ufs = &'static [&'static [&'static str]];

/// A cluster of in-process nodes `n1..`.
struct Cluster {
    nodes: Vec<LiveNode>,
    /// each node's models, in `--user-function` order
    models: Vec<Vec<ConformanceModel>>,
    rt: tokio::runtime::Runtime,
    _certs: Certs,
}

fn cluster(layout: &[Ufs]) -> Cluster {
    let certs = Certs::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut nodes: Vec<LiveNode> = Vec::new();
    let mut models = Vec::new();
    for (i, ufs) in layout.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let mut flags: Vec<String> = Vec::new();
        let mut mine = Vec::new();
        for only in ufs.iter() {
            let mut model = ConformanceModel::default();
            model.only = (!only.is_empty()).then(|| only.to_vec());
            let addr = rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let a = l.local_addr().unwrap();
                tokio::spawn(model_uf::serve(model.clone(), l));
                a
            });
            flags.extend(["--user-function".to_string(), addr.to_string()]);
            mine.push(model);
        }
        models.push(mine);
        let join: Vec<SocketAddr> = nodes.first().map(|n| n.cluster).into_iter().collect();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        nodes.push(LiveNode::start(
            &name,
            &certs.issue(&name),
            0,
            &join,
            &flags,
        ));
    }
    let n = nodes.len();
    poll_until(WAIT, "all members up", || {
        nodes
            .iter()
            .all(|node| {
                let s = node.member_states();
                s.len() == n && s.values().all(|v| v == "up")
            })
            .then_some(())
    });
    for node in &nodes {
        poll_until(WAIT, "every front-end to serve", || node.frontend());
    }
    Cluster {
        nodes,
        models,
        rt,
        _certs: certs,
    }
}

/// One model user function with every service.
const ALL: &[&str] = &[];

impl Cluster {
    fn channel(&self, i: usize) -> tonic::transport::Channel {
        let addr = self.nodes[i].frontend().unwrap();
        self.rt
            .block_on(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect(),
            )
            .unwrap()
    }

    fn client(&self, i: usize) -> CrdtTckModelClient<tonic::transport::Channel> {
        CrdtTckModelClient::new(self.channel(i))
    }

    /// `Process` on node `i`.
    fn process(&self, i: usize, r: m::Request) -> Result<m::Response, tonic::Status> {
        let mut c = self.client(i);
        self.rt
            .block_on(c.process(r))
            .map(tonic::Response::into_inner)
    }

    /// `Process` on node `i`, retried until the node has learnt where the service is.
    fn process_routed(&self, i: usize, r: m::Request) -> m::Response {
        poll_until(WAIT, "the node to route the service", || {
            match self.process(i, r.clone()) {
                Ok(resp) => Some(resp),
                Err(s) if s.code() == tonic::Code::Unimplemented => None,
                Err(s) => panic!("{s:?}"),
            }
        })
    }
}

/// The commands a model received, as (entity id, command name).
fn commands(model: &ConformanceModel) -> Vec<(String, String)> {
    received(model, |m| match m {
        crdt_stream_in::Message::Command(c) => Some((c.entity_id.clone(), c.name.clone())),
        _ => None,
    })
}

/// How many stream cancellations a model received.
fn cancelled(model: &ConformanceModel) -> usize {
    received(model, |m| {
        matches!(m, crdt_stream_in::Message::StreamCancelled(_)).then_some(())
    })
    .len()
}

#[test]
fn nodes_without_the_user_function_serve_its_service_unary_streamed_and_http() {
    let c = cluster(&[&[ALL], &[], &[]]);
    let model = c.models[0][0].clone();
    // unary through n2 and n3: both reach the one user function, each command once
    let r = c.process_routed(1, request("GCounter-routed", vec![gcounter(2)]));
    assert_eq!(r.state, gcounter_state(2));
    let r = c.process_routed(2, request("GCounter-routed", vec![gcounter(3)]));
    assert_eq!(r.state, gcounter_state(5));
    let r = c
        .process(0, request("GCounter-routed", vec![gcounter(1)]))
        .unwrap();
    assert_eq!(r.state, gcounter_state(6));
    let sent: Vec<_> = commands(&model)
        .into_iter()
        .filter(|(id, _)| id == "GCounter-routed")
        .collect();
    assert_eq!(
        sent.len(),
        3,
        "each command reached the user function once: {sent:?}"
    );

    // a streamed call through n3 sees a change made through n2; dropping it cancels it on the
    // serving node
    let mut streaming = c.client(2);
    let mut stream =
        c.rt.block_on(streaming.process_streamed(m::StreamedRequest {
            id: "GCounter-watched".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let first = c.rt.block_on(stream.message()).unwrap().unwrap();
    assert_eq!(first.state, gcounter_state(0));
    c.process(1, request("GCounter-watched", vec![gcounter(4)]))
        .unwrap();
    let next =
        c.rt.block_on(async { tokio::time::timeout(WAIT, stream.message()).await })
            .expect("a streamed message in time")
            .unwrap()
            .unwrap();
    assert_eq!(next.state, gcounter_state(4));
    let before = cancelled(&model);
    drop(stream);
    poll_until(WAIT, "the cancellation to reach the user function", || {
        (cancelled(&model) > before).then_some(())
    });

    // HTTP/JSON through n2, by the method's google.api.http rule
    let body = br#"{"actions":[{"update":{"gcounter":{"increment":"10"}}}]}"#;
    let a = http1(
        c.nodes[1].frontend().unwrap(),
        "POST",
        "/tck/model/crdt/GCounter-routed",
        &[("Content-Type", "application/json")],
        body,
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.text(), r#"{"state":{"gcounter":{"value":"16"}}}"#);

    // a service no node serves: UNIMPLEMENTED, naming it
    let mut grpc = tonic::client::Grpc::new(c.channel(1));
    let status =
        c.rt.block_on(async {
            grpc.ready().await.unwrap();
            grpc.unary::<m::Request, m::Response, _>(
                tonic::Request::new(request("x", vec![])),
                "/nobody.Serves/This".parse().unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await
        })
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(status.message().contains("nobody.Serves"), "{status:?}");
}

#[test]
fn an_entitys_commands_meet_one_node_and_move_only_when_it_goes() {
    let mut c = cluster(&[&[ALL], &[ALL], &[]]);
    let (a, b) = (c.models[0][0].clone(), c.models[1][0].clone());
    // wait until n3 knows both serving nodes: then every entity has its stable choice
    poll_until(WAIT, "n3 to route to both nodes", || {
        c.process_routed(2, request("GCounter-probe", vec![]));
        let on = |model: &ConformanceModel, id: &str| commands(model).iter().any(|(e, _)| e == id);
        (0..40)
            .map(|i| format!("GCounter-spread-{i}"))
            .map(|id| {
                c.process(2, request(&id, vec![])).unwrap();
                (on(&a, &id), on(&b, &id))
            })
            .fold((false, false), |acc, x| (acc.0 || x.0, acc.1 || x.1))
            .eq(&(true, true))
            .then_some(())
    });
    let ids: Vec<String> = (0..20).map(|i| format!("GCounter-stable-{i}")).collect();
    for round in 0..3u64 {
        for id in &ids {
            let r = c.process(2, request(id, vec![gcounter(1)])).unwrap();
            assert_eq!(r.state, gcounter_state(round + 1), "{id}");
        }
    }
    let count = |model: &ConformanceModel, id: &str| {
        commands(model).iter().filter(|(e, _)| e == id).count()
    };
    let mut on_a = Vec::new();
    for id in &ids {
        let split = (count(&a, id), count(&b, id));
        assert!(
            split == (3, 0) || split == (0, 3),
            "{id}: its commands went to both nodes: {split:?}"
        );
        if split.0 == 3 {
            on_a.push(id.clone());
        }
    }
    assert!(!on_a.is_empty() && on_a.len() < ids.len(), "{on_a:?}");
    // n1 goes: its entities move to n2, which has the replicated state
    c.nodes[0].crash();
    let moved = &on_a[0];
    let r = poll_until(WAIT, "the entity to move to n2", || {
        c.process(2, request(moved, vec![gcounter(1)])).ok()
    });
    assert!(
        matches!(&r.state, Some(m::State { value: Some(m::state::Value::Gcounter(g)) }) if g.value >= 4),
        "{r:?}"
    );
    assert!(count(&b, moved) >= 1);
    // entities of n2 stayed where they were
    let stayed = ids.iter().find(|id| !on_a.contains(id)).unwrap();
    let before = count(&b, stayed);
    c.process(2, request(stayed, vec![gcounter(1)])).unwrap();
    assert_eq!(count(&b, stayed), before + 1);
}

fn forward(id: &str) -> m::request_action::Action {
    m::request_action::Action::Forward(m::Forward { id: id.into() })
}

fn effect(id: &str) -> m::request_action::Action {
    m::request_action::Action::Effect(m::Effect {
        id: id.into(),
        synchronous: true,
    })
}

/// The entity ids of the `CrdtTwo` commands a model received.
fn two_calls(model: &ConformanceModel) -> Vec<String> {
    received(model, |m| match m {
        crdt_stream_in::Message::Command(c) if c.name == "Call" => Some(c.entity_id.clone()),
        _ => None,
    })
}

/// A forward and a synchronous side effect from `CrdtTckModel` (first user function) to
/// `CrdtTwo` (second one), sent through node 0; the second one must receive both.
fn forwards_reach(c: &Cluster, first: &ConformanceModel, second: &ConformanceModel) {
    // node 0 knows where CrdtTwo is served once it serves it to clients
    let mut two = latticed_tests::model::crdt_two_client::CrdtTwoClient::new(c.channel(0));
    poll_until(WAIT, "node 0 to serve CrdtTwo", || {
        c.rt.block_on(two.call(request("two-probe", vec![]))).ok()
    });
    let r = c.process_routed(0, request("GCounter-fwd", vec![forward("two-fwd")]));
    assert_eq!(r, m::Response::default(), "CrdtTwo's reply is forwarded");
    c.process(
        0,
        request("GCounter-fwd", vec![gcounter(1), effect("two-eff")]),
    )
    .unwrap();
    let calls = two_calls(second);
    assert!(
        calls.contains(&"two-fwd".to_string()) && calls.contains(&"two-eff".to_string()),
        "{calls:?}"
    );
    assert!(two_calls(first).is_empty());
}

#[test]
fn forwards_and_side_effects_reach_another_user_functions_service_here_or_elsewhere() {
    // two user functions on one node
    let c = cluster(&[&[&[TCK_MODEL], &[TWO]]]);
    forwards_reach(&c, &c.models[0][0], &c.models[0][1]);
    // on two nodes
    let c = cluster(&[&[&[TCK_MODEL]], &[&[TWO]]]);
    forwards_reach(&c, &c.models[0][0], &c.models[1][0]);
}

/// Sends one routing exchange to the node at `target` as a peer would (a QUIC connection with a
/// cluster certificate, one bidirectional stream, length-delimited messages), and returns the
/// responses until the stream ends.
async fn exchange(
    certs: &Certs,
    target: SocketAddr,
    request: latticed_proto::latticed::route::Request,
) -> Vec<latticed_proto::latticed::route::Response> {
    use prost::Message;
    let ep = certs.client_endpoint("prober");
    let conn = ep.connect(target, "latticed").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let body = request.encode_to_vec();
    send.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    send.write_all(&body).await.unwrap();
    send.finish().unwrap();
    let mut out = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if recv.read_exact(&mut len).await.is_err() {
            return out;
        }
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut buf).await.unwrap();
        out.push(latticed_proto::latticed::route::Response::decode(buf.as_slice()).unwrap());
    }
}

/// The deadline a routed command carries is the serving node's too: a command its user
/// function does not answer ends with DEADLINE_EXCEEDED at that deadline, even if the node that
/// sent it never gives up; and a service the node does not serve is answered as not run (the
/// sender may try another node).
#[test]
fn a_routed_command_carries_its_deadline_and_an_unserved_one_is_not_run() {
    use latticed_proto::latticed::route::{request, response, Command, Request};
    use latticed_tests::saboteur::{self, Saboteur};
    use prost::Message;
    let certs = Certs::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sab = Saboteur::default();
    let uf = saboteur::spawn(&rt, &sab).to_string();
    let node = LiveNode::start("n1", &certs.issue("n1"), 0, &[], &["--user-function", &uf]);
    poll_until(WAIT, "the front-end to serve", || node.frontend());
    let command = |service: &str, id: &str, timeout_micros: u64| Request {
        kind: Some(request::Kind::Command(Command {
            service: service.into(),
            method: "Process".into(),
            payload: request(id, vec![]).encode_to_vec().into(),
            timeout_micros,
        })),
    };
    // held by the user function: ends at the 300 ms deadline it came with
    let started = std::time::Instant::now();
    let answers = rt
        .block_on(async {
            let ask = exchange(
                &certs,
                node.cluster,
                command(TCK_MODEL, "held-routed", 300_000),
            );
            tokio::time::timeout(WAIT, ask).await
        })
        .expect("an end at the deadline, not a command held forever");
    let took = started.elapsed();
    let end = match answers.last().and_then(|a| a.kind.clone()) {
        Some(response::Kind::End(end)) => end,
        other => panic!("{other:?}"),
    };
    assert_eq!(end.code, tonic::Code::DeadlineExceeded as i32, "{end:?}");
    assert!(!end.not_run);
    assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
    assert!(took < WAIT, "{took:?}");
    sab.release.notify_waiters();
    // a service this node does not serve: not run, so another node may be tried
    let answers = rt
        .block_on(async {
            tokio::time::timeout(
                WAIT,
                exchange(&certs, node.cluster, command("nope.Nope", "x", 0)),
            )
            .await
        })
        .unwrap();
    match answers.as_slice() {
        [latticed_proto::latticed::route::Response {
            kind: Some(response::Kind::End(end)),
        }] => {
            assert!(end.not_run, "{end:?}");
            assert_eq!(end.code, tonic::Code::Unimplemented as i32);
            assert!(end.message.contains("nope.Nope"), "{end:?}");
        }
        other => panic!("{other:?}"),
    }
}
