//! `latticed check-uf`, run as the real binary against user functions: the conformance model
//! withholding its headers (its default) and sending them at once, the model keeping its side
//! open after a half-close, the real JavaScript support library (`../shared/interop/`: these
//! tests fail and say what is missing without Node.js and the library), a port with nothing
//! listening, a server that is not h2c, one without `Crdt`, and an invalid spec. The check must stay read-only:
//! no `reportError`, no command.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use latticed_proto::cloudstate::crdt::crdt_stream_in;
use latticed_proto::cloudstate::entity_discovery_server::EntityDiscoveryServer;
use latticed_proto::cloudstate::EntitySpec;
use latticed_tests::interop::JsUserFunction;
use latticed_tests::latticed_bin;
use latticed_tests::model_uf::{self, ConformanceModel, Traffic};
use latticed_tests::saboteur::{self, Saboteur};
use serde_json::Value;

/// Runs `latticed check-uf ADDR ARGS...`: its exit code and stdout.
fn check(addr: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(latticed_bin())
        .arg("check-uf")
        .arg(addr)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "check-uf {addr} {args:?}:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// `check` with `--json`: its exit code and the report, which must parse.
fn check_json(addr: &str, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, stdout) = check(addr, &all);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("--json output does not parse ({e}):\n{stdout}"));
    assert_eq!(
        report["usable"],
        Value::Bool(code == 0),
        "exit code and `usable` agree"
    );
    (code, report)
}

/// Serves `model` on an ephemeral port in `rt`.
fn serve_model(rt: &tokio::runtime::Runtime, model: &ConformanceModel) -> SocketAddr {
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(model_uf::serve(model.clone(), l));
        a
    })
}

/// The model was only discovered and sent `init` and `stream_cancelled` on one stream, then
/// half-closed: no command, no `reportError`.
fn assert_read_only(model: &ConformanceModel) {
    assert!(model.errors.lock().unwrap().is_empty(), "no reportError");
    let traffic = model.traffic.lock().unwrap().clone();
    let sent: Vec<&str> = traffic
        .iter()
        .filter_map(|t| match t {
            Traffic::In(_, m) => Some(match &m.message {
                Some(crdt_stream_in::Message::Init(i)) => {
                    assert!(i.entity_id.starts_with("latticed-check-"), "{i:?}");
                    assert!(i.delta.is_none(), "init carries no value");
                    "init"
                }
                Some(crdt_stream_in::Message::StreamCancelled(_)) => "stream_cancelled",
                other => panic!("the check sent {other:?}"),
            }),
            _ => None,
        })
        .collect();
    assert_eq!(sent, ["init", "stream_cancelled"]);
    assert!(traffic.iter().any(|t| matches!(t, Traffic::Closed(_))));
}

#[test]
fn the_model_withholding_its_headers_is_usable_and_said_to_withhold_them() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = ConformanceModel::default();
    let addr = serve_model(&rt, &model).to_string();
    let (code, out) = check(&addr, &[]);
    assert_eq!(code, 0);
    for line in [
        "reachable        yes, over HTTP/2 cleartext (h2c)",
        "http2 settings   max concurrent streams ",
        "max message size 4 MiB, assumed",
        "proxy info       sent protocol 0.2, proxy latticed ",
        "service info     latticed-conformance-model ",
        "entity           cloudstate.tck.model.crdt.CrdtConfigured (cloudstate.crdt.Crdt), \
         persistence id CrdtConfigured, passivation 100 ms",
        "spec             valid",
        "handle           Crdt/handle on cloudstate.tck.model.crdt.CrdtTckModel",
        "headers          withheld until its first message",
        "stream_cancelled answered in ",
        "half-close       completed in ",
        "result           usable by latticed",
    ] {
        assert!(out.contains(line), "missing {line:?}");
    }
    assert!(!out.contains("problem"));
    assert_read_only(&model);
}

#[test]
fn the_model_sending_headers_at_once_is_said_to_send_them_at_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut model = ConformanceModel::default();
    model.eager_headers = true;
    let addr = serve_model(&rt, &model).to_string();
    let (code, r) = check_json(&addr, &["--service", "CrdtTwo"]);
    assert_eq!(code, 0, "{r}");
    let h = &r["handle"];
    assert_eq!(h["service"], "cloudstate.tck.model.crdt.CrdtTwo");
    assert_eq!(h["headers"], "eager");
    assert!(h["headers_after_ms"].as_u64().unwrap() < 1000);
    assert_eq!(h["stream_cancelled"], "answered");
    assert_eq!(h["half_close"], "completed");
    assert_eq!(r["h2c"], true);
    assert!(r["http2_settings"].is_object());
    assert_eq!(r["max_message_size"]["bytes"], 4 << 20);
    assert_eq!(r["max_message_size"]["measured"], false);
    assert_eq!(r["proxy_info"]["proxy_name"], "latticed");
    assert_eq!(r["service_info"]["protocol_version"], "0.2");
    assert_eq!(r["entities"].as_array().unwrap().len(), 3);
    assert_eq!(r["entities"][2]["passivation_timeout_ms"], 100);
    assert_eq!(r["problems"], Value::Array(vec![]));
    assert_read_only(&model);
}

#[test]
fn a_user_function_that_keeps_its_side_open_after_a_half_close_gets_a_warning() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut model = ConformanceModel::default();
    model.half_close_delay = Duration::from_secs(30);
    let addr = serve_model(&rt, &model).to_string();
    let (code, r) = check_json(&addr, &["--timeout", "1s"]);
    assert_eq!(code, 0, "latticed copes: {r}");
    assert_eq!(r["handle"]["half_close"], "not_completed");
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains("does not complete its side"),
        "{warnings}"
    );
}

#[test]
fn an_unknown_service_is_a_problem() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = serve_model(&rt, &ConformanceModel::default()).to_string();
    let (code, out) = check(&addr, &["--service", "Nope"]);
    assert_eq!(code, 1);
    assert!(out.contains(
        "problem          --service Nope: no CRDT entity of that name in the spec (it has: \
         cloudstate.tck.model.crdt.CrdtTckModel, "
    ));
}

#[test]
fn the_javascript_library_withholds_headers_and_never_answers_a_stray_stream_cancelled() {
    let uf = JsUserFunction::start();
    let addr = uf.addr.to_string();
    let (code, r) = check_json(&addr, &["--timeout", "2s", "--service", "Passivating"]);
    assert_eq!(code, 0, "{r}\n{}", uf.log());
    let info = &r["service_info"];
    assert_eq!(info["support_library_name"], "cloudstate");
    assert_eq!(info["support_library_version"], "0.0.5");
    assert_eq!(info["protocol_version"], "0.2");
    assert!(info["service_runtime"]
        .as_str()
        .unwrap()
        .starts_with("node"));
    let passivating = r["entities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"] == "interop.Passivating")
        .expect("interop.Passivating");
    assert_eq!(passivating["passivation_timeout_ms"], 300);
    let h = &r["handle"];
    assert_eq!(h["service"], "interop.Passivating");
    assert_eq!(h["headers"], "withheld");
    assert_eq!(h["stream_cancelled"], "never_answered");
    // the library (patched, see ../shared/interop/README.md) completes a half-close
    assert_eq!(h["half_close"], "completed");
    assert_eq!(h["unexpected"], Value::Array(vec![]));
    assert!(r["warnings"]
        .to_string()
        .contains("stream_cancelled is not answered"));
    assert!(
        !uf.log().contains("Error reported from sidecar"),
        "no reportError:\n{}",
        uf.log()
    );
}

#[test]
fn nothing_listening_is_not_usable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again at once
    let addr = format!("127.0.0.1:{port}");
    let (code, out) = check(&addr, &[]);
    assert_eq!(code, 1);
    assert!(out.contains("reachable        no"));
    assert!(out.contains(&format!("problem          cannot connect to {addr}: ")));
    assert!(out.contains("result           NOT usable by latticed"));
    let (code, r) = check_json(&addr, &[]);
    assert_eq!(code, 1);
    assert_eq!(r["reachable"], false);
    assert!(r["handle"].is_null());
}

#[test]
fn a_server_that_is_not_h2c_is_not_usable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let (code, out) = check(&addr, &[]);
    assert_eq!(code, 1);
    assert!(out.contains("reachable        TCP yes, HTTP/2 cleartext (h2c) no"));
    assert!(out.contains("it does not speak HTTP/2 cleartext (h2c)"));
}

#[test]
fn an_invalid_spec_is_listed_and_not_reported_to_the_user_function() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sab = Saboteur::default();
    let mut spec: EntitySpec = model_uf::spec();
    spec.entities[1].service_name = "cloudstate.tck.model.crdt.Missing".into();
    if let Some(info) = &mut spec.service_info {
        info.protocol_minor_version = 1;
    }
    *sab.spec.lock().unwrap() = Some(spec);
    let addr = saboteur::spawn(&rt, &sab);
    let (code, out) = check(&addr.to_string(), &["--timeout", "1s"]);
    assert_eq!(code, 1);
    for line in [
        "protocol 0.1 (WARNING: latticed speaks 0.2 only)",
        "spec             INVALID, 2 problem(s) (not reported to the user function",
        "problem          the support library speaks CloudState protocol 0.1; latticed speaks 0.2",
        "problem          service cloudstate.tck.model.crdt.Missing is not in the descriptor set",
        "result           NOT usable by latticed",
    ] {
        assert!(out.contains(line), "missing {line:?}");
    }
    let (code, r) = check_json(&addr.to_string(), &["--timeout", "1s"]);
    assert_eq!(code, 1);
    assert_eq!(r["spec_problems"].as_array().unwrap().len(), 2);
    assert!(sab.errors.lock().unwrap().is_empty(), "no reportError");
}

#[test]
fn a_user_function_without_the_crdt_service_is_not_usable() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        // discovery only: Crdt/handle answers UNIMPLEMENTED
        let discovery = EntityDiscoveryServer::new(ConformanceModel::default());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(discovery)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        a
    });
    let (code, out) = check(&addr.to_string(), &[]);
    assert_eq!(code, 1);
    assert!(out.contains("spec             valid"));
    assert!(out.contains("headers          not judged: the call ended at once"));
    assert!(out.contains(
        "problem          Crdt/handle failed right after init for \
         cloudstate.tck.model.crdt.CrdtTckModel: Unimplemented"
    ));
}
