//! The front-end's gRPC side through a real daemon (in-process, real sockets) and the
//! conformance model user function: unknown methods, gzip, deadlines, size and entity-id
//! bounds, health, server reflection (conformance item 3) and gRPC-Web.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use latticed_proto::cloudstate::crdt::crdt_stream_in;
use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_node::{http1, HttpAnswer, ModelNode, WAIT};
use latticed_tests::model_uf::{Traffic, TCK_MODEL};
use latticed_tests::poll_until;
use prost::Message;
use tonic::codec::CompressionEncoding;

fn setup(extra: &[&str]) -> ModelNode {
    ModelNode::start(extra)
}

fn tck(s: &ModelNode) -> CrdtTckModelClient<tonic::transport::Channel> {
    CrdtTckModelClient::new(s.channel()).max_decoding_message_size(64 << 20)
}

use latticed_tests::model_node::request as req;
use latticed_tests::model_node::{gcounter, gcounter_state};

/// Entity ids of the commands the user function received.
fn command_ids(s: &ModelNode) -> Vec<String> {
    s.commands().into_iter().map(|(id, _, _)| id).collect()
}

#[test]
fn unknown_methods_answer_unimplemented_naming_them() {
    let s = setup(&[]);
    let mut grpc = tonic::client::Grpc::new(s.channel());
    let err = s
        .unary::<_, m::Response, _>(
            &mut grpc,
            "/cloudstate.tck.model.crdt.CrdtTckModel/Nope",
            tonic::Request::new(req("GCounter-x", vec![])),
        )
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(
        err.message()
            .contains("/cloudstate.tck.model.crdt.CrdtTckModel/Nope"),
        "{err:?}"
    );
}

#[test]
fn gzip_requests_and_responses() {
    let s = setup(&[]);
    let mut c = tck(&s)
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let id = "GCounter-gzip";
    let r = s
        .node
        .block_on(c.process(req(id, vec![gcounter(7)])))
        .unwrap();
    assert_eq!(
        r.metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    assert_eq!(r.into_inner().state, gcounter_state(7));
}

#[test]
fn an_expired_deadline_is_not_sent_and_a_streamed_call_ends_at_its_deadline() {
    let s = setup(&[]);
    let mut grpc = s.raw_grpc();
    // already expired when the request is read: the user function never sees it
    let mut r = tonic::Request::new(req("GCounter-late", vec![gcounter(1)]));
    r.metadata_mut()
        .insert("grpc-timeout", "1n".parse().unwrap());
    let err = s
        .unary::<_, m::Response, _>(&mut grpc, &format!("/{TCK_MODEL}/Process"), r)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("before the command was sent"),
        "{err:?}"
    );
    // the entity is not even started
    assert!(command_ids(&s).is_empty());
    // a streamed call runs until its deadline, then the user function hears it was cancelled
    let mut r = tonic::Request::new(m::StreamedRequest {
        id: "GCounter-stream".into(),
        ..Default::default()
    });
    r.metadata_mut()
        .insert("grpc-timeout", "700m".parse().unwrap());
    let err = s.node.block_on(async {
        grpc.ready().await.unwrap();
        let path = format!("/{TCK_MODEL}/ProcessStreamed").parse().unwrap();
        let mut stream = grpc
            .server_streaming::<m::StreamedRequest, m::Response, _>(
                r,
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.state, gcounter_state(0));
        stream.message().await.unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("outcome is unknown"), "{err:?}");
    poll_until(WAIT, "stream_cancelled after the deadline", || {
        s.model
            .traffic
            .lock()
            .unwrap()
            .iter()
            .any(|t| {
                matches!(t, Traffic::In(_, msg)
                if matches!(msg.message, Some(crdt_stream_in::Message::StreamCancelled(_))))
            })
            .then_some(())
    });
}

#[test]
fn oversized_requests_and_entity_ids_are_refused() {
    let s = setup(&["--max-entity-id-bytes", "100"]);
    let mut c = tck(&s);
    // 13 MiB: over the 12 MiB limit
    let big = req(&format!("GCounter-{}", "x".repeat(13 << 20)), vec![]);
    let err = s.node.block_on(c.process(big)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{}", err.code());
    // the same compressed (a few KiB on the wire): refused while decompressing
    let big = req(&format!("GCounter-{}", "x".repeat(13 << 20)), vec![]);
    let mut gz = tck(&s).send_compressed(CompressionEncoding::Gzip);
    let err = s.node.block_on(gz.process(big)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // an entity id over --max-entity-id-bytes
    let long = format!("GCounter-{}", "y".repeat(100));
    let err = s.node.block_on(c.process(req(&long, vec![]))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("entity id"), "{err:?}");
    // one at the bound is served
    let ok = format!("GCounter-{}", "z".repeat(100 - 9));
    let r = s
        .node
        .block_on(c.process(req(&ok, vec![gcounter(1)])))
        .unwrap();
    assert_eq!(r.into_inner().state, gcounter_state(1));
    assert!(command_ids(&s).iter().all(|id| id.len() <= 100));
    // bytes that are not the method's input
    let mut grpc = tonic::client::Grpc::new(s.channel());
    let err = s
        .unary::<_, m::Response, _>(
            &mut grpc,
            &format!("/{TCK_MODEL}/Process"),
            tonic::Request::new(m::GCounterValue { value: u64::MAX }),
        )
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

#[test]
fn health_serves_the_server_and_every_service() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let s = setup(&[]);
    let mut h = HealthClient::new(s.channel());
    for service in ["", TCK_MODEL] {
        let r = s
            .node
            .block_on(h.check(HealthCheckRequest {
                service: service.into(),
            }))
            .unwrap();
        assert_eq!(
            r.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}

#[test]
fn conformance_3_server_reflection() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let s = setup(&[]);
    let mut c = ServerReflectionClient::new(s.channel());
    let ask = |c: &mut ServerReflectionClient<_>, r: MessageRequest| {
        s.node.block_on(async {
            let reqs = tokio_stream::iter(vec![ServerReflectionRequest {
                host: String::new(),
                message_request: Some(r),
            }]);
            let mut out = c.server_reflection_info(reqs).await.unwrap().into_inner();
            out.message()
                .await
                .unwrap()
                .unwrap()
                .message_response
                .unwrap()
        })
    };
    let expected = vec![
        "grpc.reflection.v1alpha.ServerReflection",
        "cloudstate.tck.model.crdt.CrdtConfigured",
        "cloudstate.tck.model.crdt.CrdtTckModel",
        "cloudstate.tck.model.crdt.CrdtTwo",
    ];
    for prefix in ["", "nonsense.blabla."] {
        let MessageResponse::ListServicesResponse(l) =
            ask(&mut c, MessageRequest::ListServices(prefix.into()))
        else {
            panic!("not a service list")
        };
        let names: Vec<_> = l.service.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, expected);
    }
    let MessageResponse::FileDescriptorResponse(f) = ask(
        &mut c,
        MessageRequest::FileContainingSymbol("nonsense.blabla.Void".into()),
    ) else {
        panic!("not a file response")
    };
    assert!(f.file_descriptor_proto.is_empty());
    // a known symbol: its file first, then its imports
    let MessageResponse::FileDescriptorResponse(f) = ask(
        &mut c,
        MessageRequest::FileContainingSymbol(format!("{TCK_MODEL}.Process")),
    ) else {
        panic!("not a file response")
    };
    let first =
        prost_types::FileDescriptorProto::decode(f.file_descriptor_proto[0].as_slice()).unwrap();
    assert_eq!(first.name(), "cloudstate/tck/model/crdt.proto");
    let names: Vec<String> = f
        .file_descriptor_proto
        .iter()
        .map(|b| {
            prost_types::FileDescriptorProto::decode(b.as_slice())
                .unwrap()
                .name()
                .to_string()
        })
        .collect();
    assert!(
        names.contains(&"cloudstate/entity_key.proto".to_string()),
        "{names:?}"
    );
    // v1 answers too, naming itself first
    let mut v1 = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        s.channel(),
    );
    let names: Vec<String> = s.node.block_on(async {
        use tonic_reflection::pb::v1 as pb;
        let reqs = tokio_stream::iter(vec![pb::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(pb::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        }]);
        let mut out = v1.server_reflection_info(reqs).await.unwrap().into_inner();
        match out
            .message()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .unwrap()
        {
            pb::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(names[0], "grpc.reflection.v1.ServerReflection");
    assert_eq!(names.len(), 4);
}

fn grpc_frame(flag: u8, m: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(m);
    out
}

/// The frames of a gRPC-Web body: (flag, payload).
fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let n = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        out.push((b[0], b[5..5 + n].to_vec()));
        b = &b[5 + n..];
    }
    out
}

fn post(s: &ModelNode, headers: &[(&str, &str)], body: &[u8]) -> HttpAnswer {
    http1(
        s.frontend,
        "POST",
        &format!("/{TCK_MODEL}/Process"),
        headers,
        body,
    )
}

#[test]
fn grpc_web_over_http1_binary_and_text() {
    use base64::Engine;
    let s = setup(&[]);
    let body = grpc_frame(0, &req("GCounter-web", vec![gcounter(3)]).encode_to_vec());
    let a = post(
        &s,
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
            ("origin", "http://example.test"),
        ],
        &body,
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-type"), Some("application/grpc-web+proto"));
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some("http://example.test")
    );
    let f = frames(&a.body);
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0].0, 0);
    assert_eq!(
        m::Response::decode(f[0].1.as_slice()).unwrap().state,
        gcounter_state(3)
    );
    assert_eq!(f[1].0, 0x80);
    assert!(
        String::from_utf8_lossy(&f[1].1).contains("grpc-status:0"),
        "{f:?}"
    );
    // -text: base64 both ways
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64.encode(grpc_frame(
        0,
        &req("GCounter-web", vec![gcounter(1)]).encode_to_vec(),
    ));
    let a = post(
        &s,
        &[
            ("content-type", "application/grpc-web-text"),
            ("accept", "application/grpc-web-text"),
        ],
        body.as_bytes(),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("application/grpc-web-text")),
        "{a:?}"
    );
    // each frame is base64 of its own, padded: decode them one by one
    let mut decoded = Vec::new();
    let text = a.text();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let end = rest.find('=').map_or(rest.len(), |i| {
            i + rest[i..].find(|c| c != '=').unwrap_or(rest.len() - i)
        });
        decoded.extend(b64.decode(&rest[..end]).unwrap());
        rest = &rest[end..];
    }
    let f = frames(&decoded);
    assert_eq!(f.last().unwrap().0, 0x80);
    assert_eq!(
        m::Response::decode(f[0].1.as_slice()).unwrap().state,
        gcounter_state(4)
    );
    // a failure (a trailers-only answer) travels in the trailer frame too
    let fail = m::request_action::Action::Fail(m::Fail {
        message: "expected failure".into(),
    });
    let body = grpc_frame(0, &req("GCounter-web", vec![fail]).encode_to_vec());
    let a = post(&s, &[("content-type", "application/grpc-web")], &body);
    let f = frames(&a.body);
    assert_eq!(f.len(), 1, "{a:?}");
    let trailer = String::from_utf8_lossy(&f[0].1).to_string();
    assert_eq!(f[0].0, 0x80);
    assert!(trailer.contains("grpc-status:2"), "{trailer}");
    assert!(
        trailer.contains("grpc-message:expected%20failure"),
        "{trailer}"
    );
    // a CORS preflight
    let a = http1(
        s.frontend,
        "OPTIONS",
        &format!("/{TCK_MODEL}/Process"),
        &[
            ("origin", "http://example.test"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type,x-grpc-web"),
        ],
        &[],
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.header("access-control-allow-headers"),
        Some("content-type,x-grpc-web")
    );
}

#[test]
fn grpc_over_http1_gets_a_clear_error() {
    let s = setup(&[]);
    let a = post(
        &s,
        &[("content-type", "application/grpc")],
        &grpc_frame(0, &[]),
    );
    assert_eq!(a.status, 505, "{a:?}");
    assert!(a.text().contains("HTTP/2"));
}

#[test]
fn idle_client_connections_are_closed() {
    let s = setup(&["--client-idle-timeout", "1s"]);
    let mut t = TcpStream::connect(s.frontend).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    // HTTP/1.1 keep-alive request, then nothing: the server closes the connection
    write!(t, "GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let start = std::time::Instant::now();
    let mut raw = Vec::new();
    t.read_to_end(&mut raw).unwrap();
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 404"));
    assert!(start.elapsed() < Duration::from_secs(10));
    // a streamed call in progress keeps its connection open past the idle timeout
    let mut c = tck(&s);
    let got = s.node.block_on(async {
        let mut stream = c
            .process_streamed(m::StreamedRequest {
                id: "GCounter-idle".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        // no message for 2 s: the call must still be open
        tokio::time::timeout(Duration::from_secs(2), stream.message()).await
    });
    assert!(got.is_err(), "the streamed call ended: {got:?}");
}

#[test]
fn calls_are_counted_by_protocol_method_and_outcome() {
    let s = setup(&[]);
    let mut c = tck(&s);
    s.node
        .block_on(c.process(req("GCounter-m", vec![gcounter(1)])))
        .unwrap();
    let fail = m::request_action::Action::Fail(m::Fail {
        message: "no".into(),
    });
    s.node
        .block_on(c.process(req("GCounter-m", vec![fail])))
        .unwrap_err();
    let web = post(
        &s,
        &[("content-type", "application/grpc-web")],
        &grpc_frame(0, &req("GCounter-m", vec![]).encode_to_vec()),
    );
    assert_eq!(web.status, 200);
    let json = http1(
        s.frontend,
        "POST",
        "/tck/model/crdt/GCounter-m",
        &[("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(json.status, 200);
    let (_, metrics) = latticed_tests::http_get(s.node.admin, "/metrics").unwrap();
    let process = format!("service=\"{TCK_MODEL}\",method=\"Process\"");
    for (protocol, code) in [
        ("grpc", "Ok"),
        ("grpc", "Unknown"),
        ("grpc-web", "Ok"),
        ("http", "Ok"),
    ] {
        let labels = format!("protocol=\"{protocol}\",{process},code=\"{code}\"");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("latticed_frontend_requests_total{") && l.contains(&labels)),
            "no {labels} in\n{metrics}"
        );
    }
    assert!(metrics.contains("latticed_frontend_request_seconds"));
}

#[test]
fn a_service_of_two_user_functions_is_served_by_the_first_and_reported_to_the_second() {
    use latticed_tests::model_uf::{self, ConformanceModel};
    let certs = latticed_tests::Certs::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (first, second) = (ConformanceModel::default(), ConformanceModel::default());
    let addrs: Vec<String> = [&first, &second]
        .iter()
        .map(|m| {
            let m = (*m).clone();
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let a = l.local_addr().unwrap();
                tokio::spawn(model_uf::serve(m, l));
                a.to_string()
            })
        })
        .collect();
    let node = latticed_tests::LiveNode::start(
        "n1",
        &certs.issue("n1"),
        0,
        &[],
        &[
            "--user-function",
            &addrs[0],
            "--user-function",
            &addrs[1],
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let frontend = poll_until(WAIT, "the front-end to serve", || node.frontend());
    let reported = poll_until(WAIT, "the duplicate to be reported", || {
        second.errors.lock().unwrap().first().cloned()
    });
    assert!(
        reported.contains(&format!(
            "service {TCK_MODEL} is already served by the user function at {}",
            addrs[0]
        )),
        "{reported}"
    );
    assert!(first.errors.lock().unwrap().is_empty());
    // the first one serves it
    let channel = node
        .block_on(
            tonic::transport::Endpoint::from_shared(format!("http://{frontend}"))
                .unwrap()
                .connect(),
        )
        .unwrap();
    let r = node
        .block_on(CrdtTckModelClient::new(channel).process(req("GCounter-dup", vec![gcounter(2)])))
        .unwrap();
    assert_eq!(r.into_inner().state, gcounter_state(2));
    let commands = |m: &ConformanceModel| {
        m.traffic
            .lock()
            .unwrap()
            .iter()
            .filter(|t| matches!(t, Traffic::In(_, msg) if matches!(msg.message, Some(crdt_stream_in::Message::Command(_)))))
            .count()
    };
    assert_eq!((commands(&first), commands(&second)), (1, 0));
}

#[test]
fn a_header_list_over_the_limit_is_refused() {
    let s = setup(&[]);
    let mut c = tck(&s);
    let with_header = |bytes: usize| {
        let mut r = tonic::Request::new(req("GCounter-h", vec![]));
        r.metadata_mut()
            .insert("x-big", "a".repeat(bytes).parse().unwrap());
        r
    };
    s.node.block_on(c.process(with_header(1024))).unwrap();
    // over 16 KiB of headers
    let err = s
        .node
        .block_on(c.process(with_header(20 * 1024)))
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok, "{err:?}");
    assert_eq!(command_ids(&s).len(), 1);
}

#[test]
fn grpc_web_server_streaming() {
    let s = setup(&[]);
    let streamed = m::StreamedRequest {
        id: "GCounter-webstream".into(),
        end_state: gcounter_state(2),
        ..Default::default()
    };
    let body = grpc_frame(0, &streamed.encode_to_vec());
    let mut request = format!(
        "POST /{TCK_MODEL}/ProcessStreamed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/grpc-web+proto\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let zero = grpc_frame(
        0,
        &m::Response {
            state: gcounter_state(0),
        }
        .encode_to_vec(),
    );
    let a = latticed_tests::model_node::http1_streamed(
        s.frontend,
        &request,
        |raw| raw.windows(zero.len()).any(|w| w == zero),
        || {
            let mut c = tck(&s);
            s.node
                .block_on(c.process(req("GCounter-webstream", vec![gcounter(2)])))
                .unwrap();
        },
    );
    assert_eq!(a.status, 200, "{a:?}");
    let f = frames(&a.body);
    let states: Vec<_> = f
        .iter()
        .filter(|(flag, _)| *flag == 0)
        .map(|(_, m)| m::Response::decode(m.as_slice()).unwrap().state)
        .collect();
    assert_eq!(states, vec![gcounter_state(0), gcounter_state(2)]);
    let (flag, trailer) = f.last().unwrap();
    assert_eq!(*flag, 0x80);
    assert!(String::from_utf8_lossy(trailer).contains("grpc-status:0"));
}

/// Issue 11: a stock reflection client (Python's grpcio-reflection, as `.ci/run`'s tools layer
/// installs it) lists our services and describes a method through reflection alone.
#[test]
fn a_stock_python_reflection_client_lists_and_describes_the_services() {
    let available = std::process::Command::new("python3")
        .args(["-c", "import grpc_reflection"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !latticed_tests::tool_or_skip(
        "stock reflection client test",
        available,
        "python3 with grpcio-reflection (pip install grpcio-reflection==1.71.0)",
    ) {
        return;
    }
    let s = setup(&[]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stock/reflection_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(s.frontend.to_string())
        .arg(TCK_MODEL)
        .arg("Process")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("services "))
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!(services[0], "grpc.reflection.v1alpha.ServerReflection");
    assert!(services.contains(&TCK_MODEL), "{services:?}");
    assert!(
        text.contains(&format!(
            "method {TCK_MODEL}.Process cloudstate.tck.model.crdt.Request cloudstate.tck.model.crdt.Response"
        )),
        "{text}"
    );
}
