//! gRPC for every discovered method, through tonic's server machinery.
//!
//! The methods are known only at run time, so [`DynamicGrpc`] is a tower service behind the
//! router's fallback: it looks up `/<service>/<method>` and hands the request to
//! `tonic::server::Grpc` with [`RawCodec`], whose encoder and decoder pass message bytes
//! through. Framing, gzip (accepted, and sent when the client accepts it), the message size
//! limit and status trailers come from tonic.
//!
//! - Unknown method: UNIMPLEMENTED naming it. A request that is not the method's input, or
//!   whose entity id is longer than `--max-entity-id-bytes`: INVALID_ARGUMENT. A request over
//!   the size limit: RESOURCE_EXHAUSTED. A user-function failure: UNKNOWN with its description.
//! - Deadlines (`grpc-timeout`) count from the request's arrival. A command whose deadline has
//!   passed by the time its request is read is not sent to the user function. A command still
//!   running at its deadline answers DEADLINE_EXCEEDED, which means its outcome is *unknown*:
//!   it may have been applied (and replicated) or not. A streamed call ends at its deadline
//!   (the user function gets `stream_cancelled`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::{Buf, BufMut, Bytes};
use tokio::time::{Instant, Sleep};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, ServerStreamingService, UnaryService};
use tonic::Status;

use super::{record, to_tonic, Frontend, Protocol, Target};
use crate::entity::{Headers, StreamedCall};

/// A codec whose messages are their encoded bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

/// Encodes a message's bytes as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawEncoder;

/// Decodes a message as its bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The tower service serving every discovered method as gRPC.
#[derive(Clone)]
pub struct DynamicGrpc {
    frontend: Frontend,
}

impl DynamicGrpc {
    /// Serves the methods of `frontend`'s user functions.
    pub fn new(frontend: Frontend) -> Self {
        DynamicGrpc { frontend }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<axum::extract::Request> for DynamicGrpc {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        let frontend = self.frontend.clone();
        Box::pin(async move { Ok(serve(frontend, req).await.map(Body::new)) })
    }
}

/// The deadline a request carries in `grpc-timeout`, counted from now; `Err` names a value
/// that is not a timeout.
pub fn deadline(headers: &axum::http::HeaderMap) -> Result<Option<Instant>, String> {
    let Some(v) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || format!("invalid grpc-timeout {v:?}");
    let s = v.to_str().map_err(|_| bad())?;
    if s.len() < 2 || s.len() > 9 {
        return Err(bad());
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "H" => std::time::Duration::from_secs(n * 3600),
        "M" => std::time::Duration::from_secs(n * 60),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    // a deadline beyond what the clock can count is no deadline
    Ok(Instant::now().checked_add(d))
}

fn grpc(frontend: &Frontend) -> Grpc<RawCodec> {
    Grpc::new(RawCodec)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(frontend.limits.max_request_bytes)
}

async fn serve(
    frontend: Frontend,
    req: axum::extract::Request,
) -> axum::http::Response<tonic::body::Body> {
    let path = req.uri().path().to_string();
    let found = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .and_then(|(service, method)| frontend.lookup(service, method));
    let Some(target) = found else {
        return Status::unimplemented(format!("unknown method {path}")).into_http();
    };
    let deadline = match deadline(req.headers()) {
        Ok(d) => d,
        Err(e) => return Status::invalid_argument(e).into_http(),
    };
    let protocol = req
        .extensions()
        .get::<Protocol>()
        .copied()
        .unwrap_or(Protocol::Grpc);
    let call = Call {
        frontend: frontend.clone(),
        target: std::sync::Arc::new(target),
        deadline,
        protocol,
    };
    let mut grpc = grpc(&frontend);
    let resp = if call.target.method.streamed {
        grpc.server_streaming(call, req).await
    } else {
        grpc.unary(call, req).await
    };
    oversize_is_resource_exhausted(resp)
}

/// tonic refuses an oversized message with OUT_OF_RANGE; gRPC implementations (and the
/// reference proxy) answer RESOURCE_EXHAUSTED. Our methods never answer OUT_OF_RANGE
/// themselves, so an OUT_OF_RANGE about the message length is tonic's.
fn oversize_is_resource_exhausted(
    mut resp: axum::http::Response<tonic::body::Body>,
) -> axum::http::Response<tonic::body::Body> {
    let h = resp.headers_mut();
    let out_of_range = h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"11");
    let about_length = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| {
            m.contains("message%20length%20too%20large") || m.contains("message length too large")
        });
    if out_of_range && about_length {
        h.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
    resp
}

/// One call to a discovered method.
#[derive(Clone)]
struct Call {
    frontend: Frontend,
    target: std::sync::Arc<Target>,
    deadline: Option<Instant>,
    protocol: Protocol,
}

impl Call {
    /// Counts the call by how it ended (or opened).
    fn record<T>(&self, answer: &Result<T, Status>, started: Option<std::time::Instant>) {
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        record(self.protocol, &self.target, code, started);
    }

    /// The request's bytes, checked, and its entity id, unless its deadline has passed
    /// already.
    fn admit(&self, req: tonic::Request<Bytes>) -> Result<(Vec<u8>, String), Status> {
        let payload = req.into_inner();
        let id = self.frontend.check_request(&self.target.method, &payload)?;
        if self.deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(deadline_exceeded_before());
        }
        Ok((payload.to_vec(), id))
    }
}

fn deadline_exceeded_before() -> Status {
    Status::deadline_exceeded("the deadline passed before the command was sent")
}

fn deadline_exceeded_during() -> Status {
    Status::deadline_exceeded(
        "the deadline passed while the command ran; its outcome is unknown (it may have been applied)",
    )
}

/// Adds a reply's headers to a response, skipping names and values HTTP/2 cannot carry, binary
/// (`-bin`) names, and what the transport owns (`grpc-*`, `content-type`, connection-specific
/// names): a user function cannot break the call with its metadata.
pub fn set_headers(map: &mut tonic::metadata::MetadataMap, headers: Headers) {
    use tonic::metadata::{MetadataKey, MetadataValue};
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if !header_allowed(&lower) {
            tracing::debug!(header = %name, "reply metadata not sent as a header: reserved name");
            continue;
        }
        match (
            MetadataKey::from_bytes(lower.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => {
                tracing::debug!(header = %name, "reply metadata not sent as a header: not valid in HTTP")
            }
        }
    }
}

/// Whether a user function's reply metadata may set the response header `lower` (lower case).
pub fn header_allowed(lower: &str) -> bool {
    const RESERVED: &[&str] = &[
        "content-type",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "host",
    ];
    !lower.starts_with("grpc-")
        && !lower.starts_with(':')
        && !lower.ends_with("-bin")
        && !RESERVED.contains(&lower)
}

/// Awaits `f`, failing with DEADLINE_EXCEEDED when `deadline` passes first.
async fn within<F: Future>(deadline: Option<Instant>, f: F) -> Result<F::Output, Status> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f)
            .await
            .map_err(|_| deadline_exceeded_during()),
        None => Ok(f.await),
    }
}

impl UnaryService<Bytes> for Call {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let call = self.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let answer = async {
                let (payload, id) = call.admit(req)?;
                let t = &call.target;
                let command =
                    t.backend
                        .command(&t.service, &t.method, payload, Some(id), call.deadline);
                let outcome = within(call.deadline, command).await?;
                let reply = outcome.map_err(to_tonic)?;
                // a unary reply without a message answers the output's default message
                let message = Bytes::from(reply.message.unwrap_or_default());
                let mut response = tonic::Response::new(message);
                set_headers(response.metadata_mut(), reply.headers);
                Ok(response)
            }
            .await;
            call.record(&answer, Some(started));
            answer
        })
    }
}

impl ServerStreamingService<Bytes> for Call {
    type Response = Bytes;
    type ResponseStream = CallStream;
    type Future = BoxFuture<Result<tonic::Response<CallStream>, Status>>;

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let call = self.clone();
        Box::pin(async move {
            let answer = async {
                let (payload, id) = call.admit(req)?;
                let t = &call.target;
                let streamed = t.backend.command_streamed(
                    &t.service,
                    &t.method,
                    payload,
                    Some(id),
                    call.deadline,
                );
                let mut streamed = within(call.deadline, streamed).await?.map_err(to_tonic)?;
                // the response headers come from the call's first reply (the user function's
                // answer to the command itself, not its first streamed message)
                let headers = within(call.deadline, &mut streamed.headers).await?;
                let mut response = tonic::Response::new(CallStream::new(streamed, call.deadline));
                set_headers(response.metadata_mut(), headers.unwrap_or_default());
                Ok(response)
            }
            .await;
            call.record(&answer, None);
            answer
        })
    }
}

/// The messages of a streamed call, ending at its deadline; dropping it cancels the call.
pub struct CallStream {
    call: StreamedCall,
    deadline: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl CallStream {
    /// Streams `call` until it ends, fails, or `deadline` passes.
    pub fn new(call: StreamedCall, deadline: Option<Instant>) -> Self {
        CallStream {
            call,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            done: false,
        }
    }
}

impl tokio_stream::Stream for CallStream {
    type Item = Result<Bytes, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(d) = self.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    self.done = true;
                    return Poll::Ready(Some(Err(deadline_exceeded_during())));
                }
            }
            return match self.call.outcomes.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(None))) => continue,
                Poll::Ready(Some(Ok(Some(m)))) => Poll::Ready(Some(Ok(Bytes::from(m)))),
                Poll::Ready(Some(Err(status))) => {
                    self.done = true;
                    Poll::Ready(Some(Err(to_tonic(status))))
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use axum::http::{HeaderMap, HeaderValue};

    use super::*;

    fn timeout(v: &str) -> Result<Option<Duration>, String> {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
        let now = Instant::now();
        deadline(&h).map(|d| d.map(|d| d.saturating_duration_since(now)))
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_spec_says() {
        let close = |v: &str, d: Duration| {
            let got = timeout(v).unwrap().unwrap();
            // counted from a moment after the test's `now`
            assert!(
                got >= d && got - d < Duration::from_millis(50),
                "{v}: {got:?}"
            );
        };
        close("1n", Duration::from_nanos(1));
        close("250m", Duration::from_millis(250));
        close("3S", Duration::from_secs(3));
        close("2M", Duration::from_secs(120));
        close("1H", Duration::from_secs(3600));
        close("99999999u", Duration::from_micros(99_999_999));
        for bad in ["", "S", "1", "123456789S", "1s", "-1S", "1.5S"] {
            assert!(timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(deadline(&HeaderMap::new()), Ok(None));
    }
}
