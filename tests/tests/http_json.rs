//! HTTP/JSON transcoding through a real daemon and the conformance model: conformance item 8
//! byte for byte, the rules of `tests/proto/latticed/test/http_rules.proto` (path templates,
//! body fields, response_body, additional bindings, custom methods, query parameters), server
//! streaming as SSE and NDJSON, errors and the Knative probe.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::net::SocketAddr;
use std::pin::Pin;

use latticed_proto::cloudstate::crdt::crdt_client::CrdtClient;
use latticed_proto::cloudstate::crdt::crdt_server::Crdt;
use latticed_proto::cloudstate::crdt::{crdt_stream_in, CrdtStreamIn, CrdtStreamOut};
use latticed_proto::cloudstate::entity_discovery_server::EntityDiscovery;
use latticed_proto::cloudstate::{EntitySpec, ProxyInfo, UserFunctionError};
use latticed_tests::model as m;
use latticed_tests::model_node::{http1, http1_streamed, HttpAnswer, ModelNode, WAIT};
use latticed_tests::model_uf::{ConformanceModel, Traffic, TCK_MODEL, TWO};
use prost::Message;
use tokio_stream::{Stream, StreamExt};

/// The HTTP rules' descriptor set (with the model's files and every import).
const HTTP_RULES_DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/http_rules.bin"));
const HTTP_RULES: &str = "latticed.test.HttpRules";

fn send_json(s: &ModelNode, method: &str, path: &str, body: &str) -> HttpAnswer {
    http1(
        s.frontend,
        method,
        path,
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
}

fn post_json(s: &ModelNode, path: &str, body: &str) -> HttpAnswer {
    send_json(s, "POST", path, body)
}

fn ok_json(a: &HttpAnswer) -> String {
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-type"), Some("application/json"), "{a:?}");
    a.text()
}

/// The requests the user function received for `entity`, decoded.
fn requests(s: &ModelNode, entity: &str) -> Vec<(String, m::Request)> {
    s.commands()
        .into_iter()
        .filter(|(id, _, _)| id == entity)
        .map(|(_, name, payload)| (name, m::Request::decode(payload.as_slice()).unwrap()))
        .collect()
}

#[test]
fn conformance_8_http_api() {
    let s = ModelNode::start(&[]);
    let id = "PNCounter-http8";
    let path = format!("/tck/model/crdt/{id}");
    // 1. the id from the path, the method's own rule
    let a = post_json(&s, &path, "{}");
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"0"}}}"#);
    assert_eq!(
        requests(&s, id),
        vec![(
            "Process".to_string(),
            m::Request {
                id: id.into(),
                actions: vec![]
            }
        )]
    );
    // 2. the generated binding of a method without a rule
    let a = post_json(
        &s,
        "/cloudstate.tck.model.crdt.CrdtTwo/Call",
        &format!(r#"{{"id": "{id}"}}"#),
    );
    assert_eq!(ok_json(&a), "{}");
    let two_inits = s
        .model
        .traffic
        .lock()
        .unwrap()
        .iter()
        .filter(|t| {
            matches!(t, Traffic::In(_, msg)
            if matches!(&msg.message, Some(crdt_stream_in::Message::Init(i)) if i.service_name == TWO))
        })
        .count();
    assert_eq!(two_inits, 1);
    // 3. an update
    let a = post_json(
        &s,
        &path,
        r#"{"actions": [{"update": {"pncounter": {"change": 42} }}]}"#,
    );
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"42"}}}"#);
    // 4. a failure: 500 with the description
    let a = post_json(
        &s,
        &path,
        r#"{"actions": [{"fail": {"message": "expected failure"}}]}"#,
    );
    assert_eq!(a.status, 500, "{a:?}");
    assert_eq!(a.text(), "expected failure");
    // 5. -123, then delete
    let a = post_json(
        &s,
        &path,
        r#"{"actions": [{"update": {"pncounter": {"change": -123} }}]}"#,
    );
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"-81"}}}"#);
    let a = post_json(&s, &path, r#"{"actions": [{"delete": {}}]}"#);
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"-81"}}}"#);
    latticed_tests::poll_until(WAIT, "the stream to be closed after the delete", || {
        s.model
            .traffic
            .lock()
            .unwrap()
            .iter()
            .any(|t| matches!(t, Traffic::Closed(_)))
            .then_some(())
    });
}

#[test]
fn errors_probe_and_unknown_paths() {
    let s = ModelNode::start(&["--max-entity-id-bytes", "100"]);
    let path = "/tck/model/crdt/PNCounter-err";
    // malformed JSON
    let a = post_json(&s, path, "{not json");
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.text().starts_with("Malformed request"), "{a:?}");
    // a field the message does not have
    let a = post_json(&s, path, r#"{"nope": 1}"#);
    assert_eq!(a.status, 400, "{a:?}");
    // not JSON
    let a = http1(
        s.frontend,
        "POST",
        path,
        &[("content-type", "text/plain")],
        b"{}",
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.text().contains("application/json"), "{a:?}");
    // unknown path; a known path with another method
    let a = http1(s.frontend, "GET", "/no/such/thing", &[], b"");
    assert_eq!(a.status, 404, "{a:?}");
    let a = http1(s.frontend, "GET", path, &[], b"");
    assert_eq!(a.status, 405, "{a:?}");
    // Knative's probe, on any path
    let a = http1(s.frontend, "GET", "/", &[("k-network-probe", "queue")], b"");
    assert_eq!((a.status, a.text().as_str()), (200, "queue"));
    // an entity id over --max-entity-id-bytes; a body over 12 MiB
    let a = post_json(
        &s,
        &format!("/tck/model/crdt/PNCounter-{}", "x".repeat(100)),
        "{}",
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.text().contains("--max-entity-id-bytes"), "{a:?}");
    let big = format!(r#"{{"id": "{}"}}"#, "y".repeat(13 << 20));
    let a = post_json(&s, "/cloudstate.tck.model.crdt.CrdtTwo/Call", &big);
    assert_eq!(a.status, 413, "{}", a.status);
    // none of these reached the user function
    assert!(s.commands().is_empty(), "{:?}", s.commands());
}

/// A streamed HTTP call whose first message holds `first`; see [`http1_streamed`].
fn streamed(addr: SocketAddr, request: &str, first: &str, then: impl FnOnce()) -> HttpAnswer {
    http1_streamed(
        addr,
        request.as_bytes(),
        |raw| String::from_utf8_lossy(raw).contains(first),
        then,
    )
}

#[test]
fn server_streaming_as_sse_and_ndjson() {
    let s = ModelNode::start(&[]);
    for (accept, id) in [
        ("text/event-stream", "GCounter-sse"),
        ("application/json", "GCounter-ndjson"),
    ] {
        let body = format!(r#"{{"id": "{id}", "endState": {{"gcounter": {{"value": "5"}}}}}}"#);
        let request = format!(
            "POST /{TCK_MODEL}/ProcessStreamed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nAccept: {accept}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let a = streamed(s.frontend, &request, r#""value":"0""#, || {
            let a = post_json(
                &s,
                &format!("/tck/model/crdt/{id}"),
                r#"{"actions": [{"update": {"gcounter": {"increment": 5}}}]}"#,
            );
            assert_eq!(a.status, 200, "{a:?}");
        });
        assert_eq!(a.status, 200, "{a:?}");
        let zero = r#"{"state":{"gcounter":{"value":"0"}}}"#;
        let five = r#"{"state":{"gcounter":{"value":"5"}}}"#;
        if accept == "text/event-stream" {
            assert_eq!(a.header("content-type"), Some("text/event-stream"));
            assert_eq!(a.text(), format!("data: {zero}\n\ndata: {five}\n\n"));
        } else {
            assert_eq!(a.header("content-type"), Some("application/x-ndjson"));
            assert_eq!(a.text(), format!("{zero}\n{five}\n"));
        }
    }
}

/// The model behind a spec that adds the `HttpRules` service; its entities are played by the
/// model as `CrdtTckModel` entities (so replies carry the state).
#[derive(Clone)]
struct RulesFront {
    model_addr: SocketAddr,
    model: ConformanceModel,
}

#[tonic::async_trait]
impl EntityDiscovery for RulesFront {
    async fn discover(
        &self,
        r: tonic::Request<ProxyInfo>,
    ) -> Result<tonic::Response<EntitySpec>, tonic::Status> {
        let mut spec = self.model.discover(r).await?.into_inner();
        spec.proto = HTTP_RULES_DESCRIPTORS.to_vec();
        let mut rules = spec.entities[0].clone();
        rules.service_name = HTTP_RULES.into();
        rules.persistence_id = "HttpRules".into();
        spec.entities.push(rules);
        Ok(tonic::Response::new(spec))
    }

    async fn report_error(
        &self,
        r: tonic::Request<UserFunctionError>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        self.model.report_error(r).await
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<CrdtStreamOut, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Crdt for RulesFront {
    type handleStream = OutStream;

    async fn handle(
        &self,
        request: tonic::Request<tonic::Streaming<CrdtStreamIn>>,
    ) -> Result<tonic::Response<OutStream>, tonic::Status> {
        let inbound = request.into_inner().map_while(Result::ok).map(|mut msg| {
            if let Some(crdt_stream_in::Message::Init(i)) = &mut msg.message {
                if i.service_name == HTTP_RULES {
                    i.service_name = TCK_MODEL.into();
                }
            }
            msg
        });
        let mut client = CrdtClient::connect(format!("http://{}", self.model_addr))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let out = client.handle(inbound).await?.into_inner();
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

fn rules_node() -> ModelNode {
    ModelNode::start_fronted(&[], |model_addr, model| RulesFront { model_addr, model })
}

#[test]
fn http_rules_templates_bodies_response_body_and_additional_bindings() {
    let s = rules_node();
    let get = |path: &str| http1(s.frontend, "GET", path, &[], b"");
    // body = one field (`actions`), the id from a path with a verb
    let a = post_json(
        &s,
        "/v1/PNCounter-r1:update",
        r#"[{"update": {"pncounter": {"change": 5}}}]"#,
    );
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"5"}}}"#);
    let (name, r) = requests(&s, "PNCounter-r1").pop().unwrap();
    assert_eq!(name, "Update");
    assert_eq!(r.actions.len(), 1);
    // response_body: the state alone; `{id=**}` takes several segments, percent-decoded
    let a = get("/v1/PNCounter-r1/state");
    assert_eq!(ok_json(&a), r#"{"pncounter":{"value":"5"}}"#);
    let a = get("/v1/PNCounter-r2/a%20b/c/state");
    assert_eq!(ok_json(&a), r#"{"pncounter":{"value":"0"}}"#);
    assert_eq!(requests(&s, "PNCounter-r2/a b/c").len(), 1);
    // an additional binding without response_body: the whole response
    let a = get("/v1/read/PNCounter-r1");
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"5"}}}"#);
    // a custom method and a PATCH, body "*", the path's id over the body's
    let a = send_json(
        &s,
        "MERGE",
        "/v1/custom/PNCounter-r1",
        r#"{"id": "ignored", "actions": [{"update": {"pncounter": {"change": 2}}}]}"#,
    );
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"7"}}}"#);
    let a = send_json(
        &s,
        "PATCH",
        "/v1/patch/PNCounter-r1",
        r#"{"actions": [{"update": {"pncounter": {"change": -1}}}]}"#,
    );
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"6"}}}"#);
    assert!(requests(&s, "ignored").is_empty());
    // DELETE without a body; a GET whose id comes from the query
    let a = http1(s.frontend, "DELETE", "/v1/things/PNCounter-r1", &[], b"");
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"6"}}}"#);
    let a = get("/v1/query?id=PNCounter-r1");
    assert_eq!(ok_json(&a), r#"{"state":{"pncounter":{"value":"6"}}}"#);
    let names: Vec<String> = requests(&s, "PNCounter-r1")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        ["Update", "Read", "Read", "Update", "Update", "Remove", "Remove"]
    );
    // a streamed GET with a nested query field
    let request = "GET /v1/GCounter-w/watch?end_state.gcounter.value=2 HTTP/1.1\r\nHost: x\r\n\
                   Connection: close\r\nAccept: text/event-stream\r\n\r\n";
    let a = streamed(s.frontend, request, r#""value":"0""#, || {
        let a = post_json(
            &s,
            "/v1/GCounter-w:update",
            r#"[{"update": {"gcounter": {"increment": 2}}}]"#,
        );
        assert_eq!(a.status, 200, "{a:?}");
    });
    assert_eq!(
        a.text(),
        "data: {\"state\":{\"gcounter\":{\"value\":\"0\"}}}\n\n\
         data: {\"state\":{\"gcounter\":{\"value\":\"2\"}}}\n\n"
    );
    // the generated binding is not served for a method with a rule
    let a = post_json(&s, &format!("/{HTTP_RULES}/Read"), "{}");
    assert_eq!(a.status, 404, "{a:?}");
    // a value that is not the field's
    let a = get("/v1/query?id=PNCounter-r1&actions=3");
    assert_eq!(a.status, 400, "{a:?}");
}
