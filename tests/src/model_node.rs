//! A daemon (in-process, on real sockets) serving the conformance model user function, with
//! clients for its front-end: gRPC (tonic, or plain hyper that leaves deadlines to the server)
//! and raw HTTP/1.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use latticed_proto::cloudstate::crdt::crdt_server::Crdt;
use latticed_proto::cloudstate::entity_discovery_server::EntityDiscovery;

use crate::model as m;
use crate::model_uf::{self, ConformanceModel, Traffic};
use crate::{poll_until, Certs, LiveNode};

/// How long the helpers wait for the daemon or an answer.
pub const WAIT: Duration = Duration::from_secs(20);

/// One daemon `n1` serving the model, and the model's recordings.
pub struct ModelNode {
    /// the daemon
    pub node: LiveNode,
    /// the user function (its traffic and reported errors)
    pub model: ConformanceModel,
    /// the front-end's address
    pub frontend: SocketAddr,
    _rt: tokio::runtime::Runtime,
    _certs: Certs,
}

/// A gRPC client over plain hyper (HTTP/2 prior knowledge): unlike tonic's channel it does not
/// enforce `grpc-timeout` itself, so what the server answers is what the test sees.
pub type RawGrpc = tonic::client::Grpc<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
>;

impl ModelNode {
    /// Starts the model and a daemon serving it with `extra` flags, and waits for the
    /// front-end.
    pub fn start(extra: &[&str]) -> ModelNode {
        Self::start_fronted(extra, |_, model| model)
    }

    /// As [`ModelNode::start`], but the daemon talks to the user function `front` builds from
    /// the model's address and the model (a wrapper that may change what the model says).
    pub fn start_fronted<U>(
        extra: &[&str],
        front: impl FnOnce(SocketAddr, ConformanceModel) -> U,
    ) -> ModelNode
    where
        U: EntityDiscovery + Crdt + Clone,
    {
        let certs = Certs::new();
        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        let model = ConformanceModel::default();
        let uf = rt.block_on(async {
            let bind = || async {
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("a port")
            };
            let l = bind().await;
            let model_addr = l.local_addr().expect("its address");
            tokio::spawn(model_uf::serve(model.clone(), l));
            let l = bind().await;
            let a = l.local_addr().expect("its address");
            tokio::spawn(model_uf::serve_user_function(
                front(model_addr, model.clone()),
                l,
            ));
            a
        });
        let uf = uf.to_string();
        let mut flags = vec!["--user-function", &uf, "--listen", "127.0.0.1:0"];
        flags.extend_from_slice(extra);
        let node = LiveNode::start("n1", &certs.issue("n1"), 0, &[], &flags);
        let frontend = poll_until(WAIT, "the front-end to serve", || node.frontend());
        ModelNode {
            node,
            model,
            frontend,
            _rt: rt,
            _certs: certs,
        }
    }

    /// A tonic channel to the front-end.
    pub fn channel(&self) -> tonic::transport::Channel {
        self.node
            .block_on(
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.frontend))
                    .expect("a URI")
                    .connect(),
            )
            .expect("a connection to the front-end")
    }

    /// A plain hyper gRPC client of the front-end.
    pub fn raw_grpc(&self) -> RawGrpc {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let origin = format!("http://{}", self.frontend).parse().expect("a URI");
        tonic::client::Grpc::with_origin(client, origin)
    }

    /// A unary call of `path` with prost messages over `grpc`.
    pub fn unary<Req, Resp, T>(
        &self,
        grpc: &mut tonic::client::Grpc<T>,
        path: &str,
        req: tonic::Request<Req>,
    ) -> Result<tonic::Response<Resp>, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::ResponseBody: Send + 'static,
        <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let path = path.parse().expect("a path");
        self.node.block_on(async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
            grpc.unary(req, path, tonic_prost::ProstCodec::default())
                .await
        })
    }

    /// Commands the user function received, as (entity id, command name, payload bytes).
    pub fn commands(&self) -> Vec<(String, String, Vec<u8>)> {
        use latticed_proto::cloudstate::crdt::crdt_stream_in::Message;
        self.model
            .traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|t| match t {
                Traffic::In(_, msg) => match &msg.message {
                    Some(Message::Command(c)) => Some((
                        c.entity_id.clone(),
                        c.name.clone(),
                        c.payload.clone().map(|p| p.value).unwrap_or_default(),
                    )),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }
}

/// A PNCounter update by `change`, at the default (LOCAL) write consistency.
pub fn pn_change(change: i64) -> m::request_action::Action {
    m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Pncounter(m::PnCounterUpdate { change })),
        write_consistency: 0,
    })
}

/// A GCounter update by `increment`, at the default (LOCAL) write consistency.
pub fn gcounter(increment: u64) -> m::request_action::Action {
    m::request_action::Action::Update(m::Update {
        update: Some(m::update::Update::Gcounter(m::GCounterUpdate { increment })),
        write_consistency: 0,
    })
}

/// A model response's state: a GCounter of `value`.
pub fn gcounter_state(value: u64) -> Option<m::State> {
    Some(m::State {
        value: Some(m::state::Value::Gcounter(m::GCounterValue { value })),
    })
}

/// The messages of `kind` the model received (`kind` picks and maps them).
pub fn received<T>(
    model: &ConformanceModel,
    kind: impl Fn(&latticed_proto::cloudstate::crdt::crdt_stream_in::Message) -> Option<T>,
) -> Vec<T> {
    model
        .traffic
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|t| match t {
            Traffic::In(_, msg) => msg.message.as_ref().and_then(&kind),
            _ => None,
        })
        .collect()
}

/// A model `Request` for entity `id` with `actions`.
pub fn request(id: &str, actions: Vec<m::request_action::Action>) -> m::Request {
    m::Request {
        id: id.into(),
        actions: actions
            .into_iter()
            .map(|a| m::RequestAction { action: Some(a) })
            .collect(),
    }
}

/// An HTTP/1.1 answer: status code, headers (lower-case names), body (de-chunked).
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// the status code
    pub status: u16,
    /// header lines, names lower-cased
    pub headers: Vec<(String, String)>,
    /// the body
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to its end.
pub fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("a connection");
    s.set_read_timeout(Some(WAIT)).expect("a timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("a request");
    s.write_all(body).expect("a body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("an answer");
    parse_http1(&raw)
}

/// Starts an HTTP/1.1 call (`request`: the whole request, with `Connection: close`), reads
/// until `arrived` says its answer so far holds what is awaited, runs `then`, and returns the
/// whole answer once the call ended: for streamed calls, with actions in the middle.
pub fn http1_streamed(
    addr: SocketAddr,
    request: &[u8],
    arrived: impl Fn(&[u8]) -> bool,
    then: impl FnOnce(),
) -> HttpAnswer {
    let mut t = TcpStream::connect(addr).expect("a connection");
    t.set_read_timeout(Some(WAIT)).expect("a timeout");
    t.write_all(request).expect("a request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !arrived(&raw) {
        let n = t.read(&mut buf).expect("an answer");
        assert!(
            n > 0,
            "the call ended early: {}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
    then();
    t.read_to_end(&mut raw).expect("the rest of the answer");
    parse_http1(&raw)
}

/// Parses a whole HTTP/1.1 response.
pub fn parse_http1(raw: &[u8]) -> HttpAnswer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    HttpAnswer {
        status,
        headers,
        body,
    }
}

/// The payload of a chunked body.
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..line]).unwrap_or("0");
        let n =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        b = &b[line + 2..];
        if n == 0 || b.len() < n {
            break;
        }
        out.extend_from_slice(&b[..n]);
        b = &b[(n + 2).min(b.len())..];
    }
    out
}
