//! Bad input from user functions, through a real daemon: a wrong-type delta, a negative
//! GCounter increment, a reply for an unknown command, a crash mid-stream, a spec that cannot
//! be read. Each gets a clear error for the client and a `reportError`; the daemon keeps
//! serving other entities.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::time::Duration;

use latticed::store::Entry;
use latticed_crdt::{UserValue, Voters};
use latticed_proto::cloudstate::EntitySpec;
use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::saboteur::{self, Saboteur};
use latticed_tests::{http_get, poll_until, Certs, LiveNode};

const WAIT: Duration = Duration::from_secs(20);

fn start(certs: &Certs, sab: &Saboteur) -> (LiveNode, tokio::runtime::Runtime) {
    start_with(certs, sab, &[])
}

fn start_with(
    certs: &Certs,
    sab: &Saboteur,
    flags: &[&str],
) -> (LiveNode, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uf = saboteur::spawn(&rt, sab);
    let uf = uf.to_string();
    let mut args = vec!["--user-function", &uf, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let node = LiveNode::start("n1", &certs.issue("n1"), 0, &[], &args);
    (node, rt)
}

fn call(node: &LiveNode, id: &str) -> Result<m::Response, tonic::Status> {
    let addr = poll_until(WAIT, "the front-end", || node.frontend());
    node.block_on(async {
        let mut c = CrdtTckModelClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        c.process(m::Request {
            id: id.into(),
            actions: vec![],
        })
        .await
        .map(|r| r.into_inner())
    })
}

/// `Process` on `id` from a thread of its own, so that the test can act while it is in flight.
fn call_in_background(
    addr: std::net::SocketAddr,
    id: &'static str,
) -> std::thread::JoinHandle<Result<m::Response, tonic::Status>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut c = CrdtTckModelClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            c.process(m::Request {
                id: id.into(),
                actions: vec![],
            })
            .await
            .map(|r| r.into_inner())
        })
    })
}

fn errors(s: &Saboteur) -> Vec<String> {
    s.errors.lock().unwrap().clone()
}

#[test]
fn invalid_state_actions_fail_the_command_and_leave_the_value_alone() {
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start(&certs, &sab);
    call(&node, "wrong-type").unwrap();
    let err = call(&node, "wrong-type").unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert!(
        err.message()
            .contains("orset delta cannot be applied to a gcounter"),
        "{}",
        err.message()
    );
    let err = call(&node, "negative").unwrap_err();
    assert!(err.message().contains("negative"), "{}", err.message());
    poll_until(WAIT, "both reported", || {
        (errors(&sab).len() >= 2).then_some(())
    });
    // the value is what the valid write made it
    let entry = node
        .block_on(node.replication.read("CrdtTckModel-wrong-type"))
        .unwrap();
    match entry {
        Some(Entry::Value(v)) => assert_eq!(v.read(&Voters::alone(0)), UserValue::GCounter(1)),
        other => panic!("{other:?}"),
    }
    assert!(call(&node, "fine").is_ok());
}

#[test]
fn a_reply_to_an_unknown_command_or_a_crash_terminates_only_that_entity() {
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start(&certs, &sab);
    let err = call(&node, "unknown-reply").unwrap_err();
    assert_eq!(err.message(), "Entity terminating");
    poll_until(WAIT, "the protocol error reported", || {
        errors(&sab)
            .iter()
            .any(|e| e.contains("unknown command"))
            .then_some(())
    });
    let err = call(&node, "crash").unwrap_err();
    assert_eq!(err.message(), "Entity terminating");
    // other entities are served; a crashed entity restarts with a new stream on its next command
    assert!(call(&node, "fine").is_ok());
    let inits_before = *sab.inits.lock().unwrap();
    let _ = call(&node, "crash");
    assert_eq!(*sab.inits.lock().unwrap(), inits_before + 1);
}

#[test]
fn a_spec_that_cannot_be_read_keeps_the_node_not_ready() {
    let certs = Certs::new();
    let sab = Saboteur::default();
    *sab.spec.lock().unwrap() = Some(EntitySpec {
        proto: vec![1, 2, 3],
        ..latticed_tests::model_uf::spec()
    });
    let (node, _rt) = start(&certs, &sab);
    poll_until(WAIT, "the problem reported", || {
        (!errors(&sab).is_empty()).then_some(())
    });
    assert!(
        errors(&sab)[0].contains("descriptor set"),
        "{:?}",
        errors(&sab)
    );
    let (status, body) = http_get(node.admin, "/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("discovery"), "{body}");
    assert!(node.frontend().is_none(), "nothing is served");
}

fn deltas(s: &Saboteur) -> Vec<latticed_proto::cloudstate::crdt::CrdtDelta> {
    use latticed_proto::cloudstate::crdt::crdt_stream_in;
    s.traffic
        .lock()
        .unwrap()
        .iter()
        .filter_map(|m| match &m.message {
            Some(crdt_stream_in::Message::Delta(d)) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn commands(s: &Saboteur) -> usize {
    use latticed_proto::cloudstate::crdt::crdt_stream_in;
    s.traffic
        .lock()
        .unwrap()
        .iter()
        .filter(|m| matches!(m.message, Some(crdt_stream_in::Message::Command(_))))
        .count()
}

#[test]
fn conformance_43_44_remote_changes_wait_for_both_commands_then_arrive_as_one_initial_delta() {
    use latticed::replication::Consistency;
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, PnCounterDelta};
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start(&certs, &sab);
    let addr = poll_until(WAIT, "the front-end", || node.frontend());
    // two commands in flight on one entity that has no value yet
    let calls: Vec<_> = (0..2).map(|_| call_in_background(addr, "held-1")).collect();
    poll_until(WAIT, "both commands at the user function", || {
        (commands(&sab) == 2).then_some(())
    });
    let key = "CrdtTckModel-held-1";
    let change = |n| CrdtDelta {
        delta: Some(Delta::Pncounter(PnCounterDelta { change: n })),
    };
    node.block_on(node.replication.write(key, change(3), Consistency::Local))
        .unwrap()
        .unwrap();
    node.block_on(node.replication.write(key, change(6), Consistency::Local))
        .unwrap()
        .unwrap();
    assert!(
        deltas(&sab).is_empty(),
        "nothing is pushed while commands are in flight"
    );
    sab.release.notify_one();
    for c in calls {
        c.join().unwrap().unwrap();
    }
    poll_until(WAIT, "the held-back change", || {
        (!deltas(&sab).is_empty()).then_some(())
    });
    // one delta: the whole value, since the entity had none at init
    assert_eq!(deltas(&sab), vec![change(9)]);
}

#[test]
fn conformance_41_a_net_zero_change_during_a_command_is_not_pushed() {
    use latticed::replication::Consistency;
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, PnCounterDelta};
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start(&certs, &sab);
    let addr = poll_until(WAIT, "the front-end", || node.frontend());
    let key = "CrdtTckModel-held-2";
    let change = |n| CrdtDelta {
        delta: Some(Delta::Pncounter(PnCounterDelta { change: n })),
    };
    node.block_on(node.replication.write(key, change(5), Consistency::Local))
        .unwrap()
        .unwrap();
    let call = call_in_background(addr, "held-2");
    poll_until(WAIT, "the command at the user function", || {
        (commands(&sab) == 1).then_some(())
    });
    node.block_on(node.replication.write(key, change(3), Consistency::Local))
        .unwrap()
        .unwrap();
    node.block_on(node.replication.write(key, change(-3), Consistency::Local))
        .unwrap()
        .unwrap();
    sab.release.notify_one();
    call.join().unwrap().unwrap();
    // a later change is pushed on its own: had the net-zero change been pushed, it would show
    node.block_on(node.replication.write(key, change(1), Consistency::Local))
        .unwrap()
        .unwrap();
    poll_until(WAIT, "the later change", || {
        (!deltas(&sab).is_empty()).then_some(())
    });
    assert_eq!(deltas(&sab), vec![change(1)]);
}

#[test]
fn conformance_46_remote_changes_wait_for_the_cancellation_response() {
    use latticed::replication::Consistency;
    use latticed_proto::cloudstate::crdt::{
        crdt_delta::Delta, crdt_stream_in, CrdtDelta, PnCounterDelta,
    };
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start(&certs, &sab);
    let addr = poll_until(WAIT, "the front-end", || node.frontend());
    let key = "CrdtTckModel-cancel-held-1";
    let change = |n| CrdtDelta {
        delta: Some(Delta::Pncounter(PnCounterDelta { change: n })),
    };
    node.block_on(node.replication.write(key, change(5), Consistency::Local))
        .unwrap()
        .unwrap();
    // a streamed call, then its client goes away
    node.block_on(async {
        let mut c = CrdtTckModelClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let stream = c
            .process_streamed(m::StreamedRequest {
                id: "cancel-held-1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        drop(stream);
    });
    poll_until(WAIT, "stream_cancelled at the user function", || {
        sab.traffic
            .lock()
            .unwrap()
            .iter()
            .any(|m| matches!(m.message, Some(crdt_stream_in::Message::StreamCancelled(_))))
            .then_some(())
    });
    // remote changes while the cancellation is being handled are held back
    node.block_on(node.replication.write(key, change(2), Consistency::Local))
        .unwrap()
        .unwrap();
    node.block_on(node.replication.write(key, change(6), Consistency::Local))
        .unwrap()
        .unwrap();
    assert!(deltas(&sab).is_empty());
    sab.release.notify_one();
    poll_until(WAIT, "the held-back change", || {
        (!deltas(&sab).is_empty()).then_some(())
    });
    // the user function holds 5 + its own 3; it is sent the net remote change
    assert_eq!(deltas(&sab), vec![change(8)]);
    match node.block_on(node.replication.read(key)).unwrap() {
        Some(Entry::Value(v)) => assert_eq!(v.read(&Voters::alone(0)), UserValue::PNCounter(16)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn conformance_52_a_flag_cannot_be_switched_off() {
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start(&certs, &sab);
    call(&node, "flag-off").unwrap();
    let err = call(&node, "flag-off").unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert!(
        err.message().contains("Flag cannot be switched off"),
        "{}",
        err.message()
    );
    poll_until(WAIT, "the problem reported", || {
        errors(&sab)
            .iter()
            .any(|e| e.contains("Flag"))
            .then_some(())
    });
    match node
        .block_on(node.replication.read("CrdtTckModel-flag-off"))
        .unwrap()
    {
        Some(Entry::Value(v)) => assert_eq!(v.read(&Voters::alone(0)), UserValue::Flag(true)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_user_function_that_goes_away_and_comes_back_is_served_again() {
    let certs = Certs::new();
    let model = latticed_tests::model_uf::ConformanceModel::default();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let start_uf = |m: latticed_tests::model_uf::ConformanceModel| {
        on_own_runtime(&addr, move |l| latticed_tests::model_uf::serve(m, l))
    };
    let uf = start_uf(model.clone());
    let node = LiveNode::start(
        "n1",
        &certs.issue("n1"),
        0,
        &[],
        &["--user-function", &addr, "--listen", "127.0.0.1:0"],
    );
    assert!(call(&node, "GCounter-x").is_ok());
    // the user function dies: commands fail with a clear error, the daemon stays up
    // wait for its tasks (and its listening socket) to be gone, as after a process exit
    uf.shutdown_timeout(Duration::from_secs(5));
    let err = poll_until(WAIT, "a failure while the user function is away", || {
        // a fresh entity each time: the old one's stream is gone
        call(&node, &format!("GCounter-{}", rand_id())).err()
    });
    // UNAVAILABLE (clients may retry) when the call could not be opened; UNKNOWN with
    // `Entity terminating` when it broke under a command
    match err.code() {
        tonic::Code::Unavailable => assert!(err.message().contains("unavailable"), "{err:?}"),
        tonic::Code::Unknown => assert!(err.message().contains("terminating"), "{err:?}"),
        _ => panic!("unexpected failure: {err:?}"),
    }
    assert_eq!(http_get(node.admin, "/healthz").unwrap().0, 200);
    // grpc.health.v1 says its services are not served meanwhile
    poll_until(WAIT, "its services NOT_SERVING", || {
        (health(&node, latticed_tests::model_uf::TCK_MODEL) == Some(NOT_SERVING)).then_some(())
    });
    // it comes back on the same address: served again
    let _uf = start_uf(model);
    poll_until(WAIT, "commands to succeed again", || {
        call(&node, "GCounter-y").ok()
    });
    poll_until(WAIT, "its services SERVING again", || {
        (health(&node, latticed_tests::model_uf::TCK_MODEL) == Some(SERVING)).then_some(())
    });
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// `grpc.health.v1` status of `service` on the node's front-end.
fn health(node: &LiveNode, service: &str) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let addr = node.frontend()?;
    node.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut h = HealthClient::new(channel);
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        Some(r.into_inner().status)
    })
}

/// Serves a user function on `addr` from a runtime of its own: shutting the runtime down kills
/// it, as a crashed process would be.
fn on_own_runtime<Fut>(
    addr: &str,
    serve: impl FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
) -> tokio::runtime::Runtime
where
    Fut: std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
{
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = addr.to_string();
    rt.block_on(async move {
        // the address was just released by the previous life: retry briefly if the kernel
        // still holds it
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let l = loop {
            match tokio::net::TcpListener::bind(&a).await {
                Ok(l) => break l,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind {a}: {e}"),
            }
        };
        tokio::spawn(serve(l));
    });
    rt
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn a_user_function_that_comes_back_with_a_changed_spec_is_rediscovered() {
    let certs = Certs::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let start_uf = |s: Saboteur| on_own_runtime(&addr, move |l| saboteur::serve(s, l));
    let uf = start_uf(Saboteur::default());
    let node = LiveNode::start(
        "n1",
        &certs.issue("n1"),
        0,
        &[],
        &["--user-function", &addr, "--listen", "127.0.0.1:0"],
    );
    let frontend = poll_until(WAIT, "the front-end", || node.frontend());
    let two = |node: &LiveNode| {
        node.block_on(async {
            let mut c = latticed_tests::model::crdt_two_client::CrdtTwoClient::connect(format!(
                "http://{frontend}"
            ))
            .await
            .unwrap();
            c.call(m::Request {
                id: "t".into(),
                actions: vec![],
            })
            .await
        })
    };
    assert!(two(&node).is_ok());
    // wait for its tasks (and its listening socket) to be gone, as after a process exit
    uf.shutdown_timeout(Duration::from_secs(5));
    // back without CrdtTwo
    let changed = Saboteur::default();
    let mut spec = latticed_tests::model_uf::spec();
    spec.entities
        .retain(|e| !e.service_name.ends_with("CrdtTwo"));
    *changed.spec.lock().unwrap() = Some(spec);
    let _uf = start_uf(changed);
    let status = poll_until(WAIT, "CrdtTwo to be gone", || {
        two(&node)
            .err()
            .filter(|s| s.code() == tonic::Code::Unimplemented)
    });
    assert!(status.message().contains("CrdtTwo"), "{}", status.message());
    assert!(call(&node, "fine").is_ok());
}

/// Issue 8: a command the user function never answers used to pin its entity for good (no
/// passivation, no pushes). After the relay timeout its client gets DEADLINE_EXCEEDED, the
/// user function is told, and the entity starts afresh.
#[test]
fn a_command_the_user_function_never_answers_fails_after_the_relay_timeout() {
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start_with(&certs, &sab, &["--relay-timeout", "1s"]);
    let e = call(&node, "held-relay").unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("did not answer"), "{e:?}");
    poll_until(WAIT, "the report", || {
        errors(&sab)
            .iter()
            .any(|e| e.contains("did not answer command 1"))
            .then_some(())
    });
    // the entity started afresh: a new stream, a new init
    let inits = *sab.inits.lock().unwrap();
    let e = call(&node, "held-relay").unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(*sab.inits.lock().unwrap(), inits + 1);
    // other entities are served meanwhile
    assert!(call(&node, "fine").is_ok());
}

/// Issue 8: commands in flight per entity are capped; beyond, RESOURCE_EXHAUSTED at once.
#[test]
fn commands_in_flight_per_entity_are_capped() {
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start_with(&certs, &sab, &["--max-commands-per-entity", "3"]);
    let addr = poll_until(WAIT, "the front-end", || node.frontend());
    let held: Vec<_> = (0..3)
        .map(|_| call_in_background(addr, "held-cap"))
        .collect();
    poll_until(WAIT, "three commands at the user function", || {
        let n = sab
            .traffic
            .lock()
            .unwrap()
            .iter()
            .filter(|m| {
                matches!(
                    &m.message,
                    Some(latticed_proto::cloudstate::crdt::crdt_stream_in::Message::Command(_))
                )
            })
            .count();
        (n == 3).then_some(())
    });
    let e = call(&node, "held-cap").unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("3 commands in flight"), "{e:?}");
    sab.release.notify_waiters();
    for h in held {
        assert!(h.join().unwrap().is_ok());
    }
    assert!(call(&node, "other").is_ok());
}

/// Protocol spec §3 Reply: the string entries of the first reply's metadata become response
/// headers, over gRPC and HTTP/JSON; binary entries, names the transport owns and names or
/// values HTTP cannot carry are left out, and the call still succeeds.
#[test]
fn a_replys_metadata_becomes_response_headers() {
    let certs = Certs::new();
    let sab = Saboteur::default();
    let (node, _rt) = start(&certs, &sab);
    let addr = poll_until(WAIT, "the front-end", || node.frontend());
    let response = node.block_on(async {
        let mut c = CrdtTckModelClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        c.process(m::Request {
            id: "headers".into(),
            actions: vec![],
        })
        .await
        .expect("the call succeeds whatever the metadata")
    });
    let md = response.metadata();
    assert_eq!(md.get("x-answer").and_then(|v| v.to_str().ok()), Some("42"));
    assert_eq!(
        md.get("x-mixed-case").and_then(|v| v.to_str().ok()),
        Some("yes")
    );
    assert!(md.get("x-raw-bin").is_none() && md.get_bin("x-raw-bin").is_none());
    assert!(md.get("x-bad-value").is_none());
    assert_eq!(
        md.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/grpc")
    );
    // over HTTP/JSON (the method's own rule: the id from the path)
    let a = latticed_tests::model_node::http1(
        addr,
        "POST",
        "/tck/model/crdt/headers",
        &[("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-answer"), Some("42"), "{a:?}");
    assert_eq!(a.header("content-type"), Some("application/json"), "{a:?}");
    assert_eq!(a.header("x-raw-bin"), None, "{a:?}");
}
