//! The front-end: the user functions' own gRPC services, served to external clients on
//! `--listen`, from the descriptors learned at discovery.
//!
//! Every method of every discovered service is served at `/<service>/<method>` (gRPC over
//! HTTP/2, prior knowledge). The request's entity id comes from its `(cloudstate.entity_key)`
//! fields; the command goes to its entity ([`crate::entity`]). Unknown service or method:
//! UNIMPLEMENTED. A request that cannot be decoded: INVALID_ARGUMENT with the reason. A failure
//! from the user function: UNKNOWN with its description verbatim.
//!
//! Server-streaming methods stream the entity's messages; a client that goes away cancels its
//! call (the user function gets `stream_cancelled`). Not yet: HTTP/JSON transcoding, gRPC-Web
//! and server reflection.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use http_body::Frame;
use http_body_util::StreamBody;

use crate::entity::{Entities, Status};

/// Largest request accepted (bytes), as the reference proxy's `max-inbound-message-size`.
pub const MAX_REQUEST: usize = 12 * 1024 * 1024;

/// The routes of every user function.
#[derive(Clone)]
pub struct Frontend {
    /// one runtime per user function
    pub user_functions: Vec<Entities>,
}

/// The front-end router.
pub fn router(frontend: Frontend) -> Router {
    Router::new().fallback(handle).with_state(frontend)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn grpc_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h
}

/// A trailers-only response carrying `status`.
fn error(status: &Status) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.extend(grpc_headers());
    h.insert("grpc-status", HeaderValue::from(status.code as i32));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&status.message)) {
        h.insert("grpc-message", v);
    }
    resp
}

fn invalid(message: impl Into<String>) -> Response {
    error(&Status::invalid_argument(message))
}

/// A response with `message` (if any) and status OK in the trailers.
fn ok(message: Option<Vec<u8>>) -> Response {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    if let Some(m) = message {
        frames.push(Ok(Frame::data(framed(&m))));
    }
    frames.push(Ok(Frame::trailers(trailers(&Status::new(
        tonic::Code::Ok,
        "",
    )))));
    let body = StreamBody::new(tokio_stream::iter(frames));
    let mut resp = Response::new(Body::new(body));
    resp.headers_mut().extend(grpc_headers());
    resp
}

async fn handle(State(f): State<Frontend>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return error(&Status::unimplemented(format!("unknown method {path}")));
    };
    let Some((entities, model)) = f
        .user_functions
        .iter()
        .find_map(|e| e.method(service, method).map(|(_, m)| (e.clone(), m)))
    else {
        return error(&Status::unimplemented(format!("unknown method {path}")));
    };
    let body = match axum::body::to_bytes(req.into_body(), MAX_REQUEST + 5).await {
        Ok(b) => b,
        Err(e) => return invalid(format!("cannot read the request: {e}")),
    };
    if body.len() < 5 {
        return invalid("malformed gRPC message: shorter than its 5-byte header");
    }
    if body[0] != 0 {
        return error(&Status::unimplemented(
            "compressed requests are not supported",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() - 5 != len {
        return invalid(format!(
            "malformed gRPC message: header says {len} bytes, {} follow",
            body.len() - 5
        ));
    }
    let payload = body[5..].to_vec();
    if !model.streamed {
        return match entities.command(service, &model, payload).await {
            Ok(reply) => ok(reply),
            Err(status) => error(&status),
        };
    }
    let call = match entities.command_streamed(service, &model, payload).await {
        Ok(c) => c,
        Err(status) => return error(&status),
    };
    // pump the call's messages into the response; when the client goes away the body is
    // dropped, the pump stops, and dropping the call cancels it
    let (frames, body) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        // own the whole call (its cancel guard included), not just the field used below
        let mut call = call;
        let status = loop {
            let next = tokio::select! {
                n = call.outcomes.recv() => n,
                // the client went away (the response body was dropped)
                _ = frames.closed() => return,
            };
            match next {
                Some(Ok(Some(m))) => {
                    if frames.send(Ok(Frame::data(framed(&m)))).await.is_err() {
                        return;
                    }
                }
                Some(Ok(None)) => {}
                Some(Err(status)) => break status,
                None => break Status::new(tonic::Code::Ok, ""),
            }
        };
        let _ = frames.send(Ok(Frame::trailers(trailers(&status)))).await;
    });
    let mut resp = Response::new(Body::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(body),
    )));
    resp.headers_mut().extend(grpc_headers());
    resp
}

fn framed(m: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(m.len() + 5);
    out.push(0);
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(m);
    Bytes::from(out)
}

fn trailers(status: &Status) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status.code as i32));
    if !status.message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&status.message)) {
            t.insert("grpc-message", v);
        }
    }
    t
}
