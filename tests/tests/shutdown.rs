//! Graceful shutdown (issue 8): on SIGTERM a node turns not ready, refuses new commands with
//! UNAVAILABLE so that clients retry on another node, lets the commands in flight finish,
//! passivates its entities, then leaves and exits 0. A real daemon process, a user function
//! that holds its replies back until told, real gRPC clients.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::time::Duration;

use latticed_proto::cloudstate::crdt::crdt_stream_in;
use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::saboteur::{self, Saboteur};
use latticed_tests::{poll_until, Daemon, DaemonConfig};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn sigterm_drains_commands_in_flight_and_refuses_new_ones() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sab = Saboteur::default();
    let uf = saboteur::spawn(&rt, &sab);
    let mut daemon = Daemon::start(DaemonConfig {
        name: "n1".into(),
        extra: vec![
            "--user-function".into(),
            uf.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--shutdown-grace".into(),
            "15s".into(),
        ],
        ..Default::default()
    });
    let frontend = poll_until(WAIT, "the front-end", || daemon.frontend());
    let client = rt
        .block_on(CrdtTckModelClient::connect(format!("http://{frontend}")))
        .unwrap();
    let call = |id: &str| {
        let mut c = client.clone();
        let id = id.to_string();
        rt.spawn(async move {
            c.process(m::Request {
                id,
                actions: vec![],
            })
            .await
        })
    };
    // a command the user function holds back: in flight when SIGTERM comes
    let held = call("held-drain");
    poll_until(WAIT, "the command to reach the user function", || {
        (!sab.traffic.lock().unwrap().is_empty()).then_some(())
    });
    let pid = daemon.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    poll_until(WAIT, "the node to turn not ready", || {
        daemon
            .get("/readyz")
            .is_some_and(|(status, body)| status == 503 && body.contains("shutting down"))
            .then_some(())
    });
    // new commands are refused: the front-end sent GOAWAY and closed its listener, and an
    // entity runtime that still gets one answers UNAVAILABLE; either way the client may retry
    // on another node. How the client reports it depends on when it saw the GOAWAY: tonic
    // reports a request that met it as CANCELLED, and one that its HTTP/2 layer had queued on
    // the connection when the GOAWAY came (never sent, so never run) as INTERNAL carrying
    // the GOAWAY's NO_ERROR, which HTTP/2 (RFC 9113 6.8) says is safe to retry.
    let refused = rt.block_on(call("other")).unwrap().unwrap_err();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled
        ) || (refused.code() == tonic::Code::Internal && met_goaway(&refused)),
        "{refused:?}"
    );
    let reached = sab.traffic.lock().unwrap().iter().any(|m| {
        matches!(
            &m.message,
            Some(crdt_stream_in::Message::Init(i)) if i.entity_id == "other"
        )
    });
    assert!(!reached, "a refused command reached the user function");
    assert!(daemon.is_running(), "the command in flight holds the exit");
    // the command in flight finishes
    sab.release.notify_waiters();
    let done = rt
        .block_on(async { tokio::time::timeout(WAIT, held).await })
        .expect("the command in flight completes")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    let status = poll_until(WAIT, "the daemon to exit", || daemon.try_wait());
    assert!(status.success(), "exit status {status:?}\n{}", daemon.log());
    assert!(daemon.log().contains("stopped"), "{}", daemon.log());
}

/// Whether the call failed because the server's HTTP/2 GOAWAY (NO_ERROR) refused its stream
/// before the stream was processed.
fn met_goaway(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = e.source();
    }
    false
}
