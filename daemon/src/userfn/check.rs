//! `latticed check-uf HOST:PORT`: probes a user function as latticed will use it, and reports
//! what it found.
//!
//! This module owns the probe and its report (text or JSON), nothing else: it runs no node and
//! shares no state with one. It reuses what latticed itself runs ([`Discovery::discover_once`]
//! with [`proxy_info`], [`validate`], a tonic channel for `Crdt/handle`), so what it sees is what
//! a node would see. The steps, each measured unless said otherwise:
//!
//! 1. **Reachability over h2c**: a TCP connection, the HTTP/2 client preface, and the server's
//!    first SETTINGS frame, read off the wire (SETTINGS_MAX_CONCURRENT_STREAMS,
//!    INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, ...; an absent setting is the RFC 9113 default).
//! 2. **Discovery** as latticed sends it, the `ServiceInfo` and entities it answered, and every
//!    problem [`validate`] finds. The check is read-only: it never calls `reportError` (which
//!    would show up in the user function's logs), so the problems are only printed here.
//! 3. **One `Crdt/handle` call** on one CRDT entity (the first, or `--service`), opened as the
//!    entity runtime opens it, without waiting for response headers: `init` without a value for
//!    a throwaway entity id `latticed-check-<hex>`; no command is ever sent, so no state changes.
//!    Observed: whether the response headers arrive within [`HEADER_WINDOW`] while the user
//!    function has written nothing (tonic sends them at once; grpc-js, grpc-java, grpc-go and
//!    grpcio withhold them until their first message); whether a `stream_cancelled` for command
//!    id 1, never sent, is answered; whether the user function completes its side after our
//!    half-close, and how fast. The call is cancelled at the end if still open.
//! 4. **The largest message the user function accepts** is not measured (that would take a
//!    multi-megabyte call it would log): the report says the gRPC servers' common default,
//!    4 MiB, is assumed.
//!
//! The user function is usable (exit 0) when it is reachable over h2c, answers discovery with a
//! valid spec, and keeps a `handle` call open after `init`; the rest is information. Waiting on
//! a `stream_cancelled` answer or a half-close completion is bounded by `--timeout`.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use latticed_proto::cloudstate::crdt::crdt_client::CrdtClient;
use latticed_proto::cloudstate::crdt::{
    crdt_stream_in, crdt_stream_out, CrdtInit, CrdtStreamIn, CrdtStreamOut,
};
use latticed_proto::cloudstate::{EntitySpec, StreamCancelled};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::discovery::{proxy_info, Discovery};
use super::spec::{passivation_timeout, validate, CRDT_ENTITY_TYPE, PROTOCOL_VERSION};

/// How long the response headers of `handle` may take, after `init`, to count as sent at once.
pub const HEADER_WINDOW: Duration = Duration::from_secs(1);

/// The message size limit assumed for a user function (not measured).
pub const ASSUMED_MAX_MESSAGE: usize = 4 << 20;

/// The entity runtime's bounds: how long latticed waits for a `stream_cancelled` answer, and
/// for a user function to complete its side after a half-close.
fn latticed_bounds() -> (Duration, Duration) {
    let c = crate::entity::Config::default();
    (c.cancel_wait, c.passivation_grace)
}

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// `host:port` of the user function
    pub addr: String,
    /// bound of each wait (connect, discovery, each `handle` observation)
    pub timeout: Duration,
    /// the CRDT entity to probe `handle` on (full or simple service name); default the first
    pub service: Option<String>,
}

/// The HTTP/2 SETTINGS the user function's server advertised (`None`: not sent, so the
/// RFC 9113 default applies).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Http2Settings {
    /// SETTINGS_HEADER_TABLE_SIZE (default 4096)
    pub header_table_size: Option<u32>,
    /// SETTINGS_ENABLE_PUSH
    pub enable_push: Option<u32>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (default: unlimited)
    pub max_concurrent_streams: Option<u32>,
    /// SETTINGS_INITIAL_WINDOW_SIZE (default 65535)
    pub initial_window_size: Option<u32>,
    /// SETTINGS_MAX_FRAME_SIZE (default 16384)
    pub max_frame_size: Option<u32>,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (default: unlimited)
    pub max_header_list_size: Option<u32>,
}

/// The largest message the user function accepts, as far as it is known.
#[derive(Debug, Clone, Serialize)]
pub struct MessageSize {
    /// bytes
    pub bytes: usize,
    /// false: assumed, not measured
    pub measured: bool,
    /// where the figure comes from
    pub basis: String,
}

/// `ServiceInfo` as the user function sent it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfoReport {
    /// service name
    pub service_name: String,
    /// service version
    pub service_version: String,
    /// runtime, e.g. `node v20.11.0`
    pub service_runtime: String,
    /// support library name
    pub support_library_name: String,
    /// support library version
    pub support_library_version: String,
    /// `major.minor`
    pub protocol_version: String,
}

/// `ProxyInfo` as latticed sends it.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyInfoReport {
    /// `major.minor`
    pub protocol_version: String,
    /// `latticed`
    pub proxy_name: String,
    /// latticed's version
    pub proxy_version: String,
    /// entity types latticed hosts
    pub supported_entity_types: Vec<String>,
}

/// One entity of the spec.
#[derive(Debug, Clone, Serialize)]
pub struct EntityReport {
    /// full service name
    pub service: String,
    /// entity type
    pub entity_type: String,
    /// the namespace of its keys (the service's simple name when the spec leaves it empty)
    pub persistence_id: String,
    /// its own passivation timeout (`None`: latticed's `--passivation-timeout`)
    pub passivation_timeout_ms: Option<u64>,
}

/// When the response headers of `handle` came.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Headers {
    /// at once, before the user function wrote anything (tonic's default)
    Eager,
    /// not before its first message or the end of the call (grpc-js, grpc-java, grpc-go, grpcio)
    Withheld,
    /// together with a message the user function wrote right after `init`: cannot tell
    Undetermined,
    /// the call failed or ended at once: nothing to judge
    CallEnded,
}

/// What the user function did with a `stream_cancelled` for a command it never got.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Cancelled {
    /// with a `stream_cancelled_response`
    Answered,
    /// nothing within the timeout
    NeverAnswered,
    /// it ended or failed the call
    EndedCall,
    /// not observed (the call ended earlier)
    NotProbed,
}

/// What the user function did after our half-close.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HalfClose {
    /// it completed its side (status OK)
    Completed,
    /// it ended its side with an error status
    Failed,
    /// nothing within the timeout
    NotCompleted,
    /// not observed (the call ended earlier)
    NotProbed,
}

/// The `Crdt/handle` probe.
#[derive(Debug, Clone, Serialize)]
pub struct HandleReport {
    /// the entity's service
    pub service: String,
    /// the throwaway entity id
    pub entity_id: String,
    /// headers at once or withheld
    pub headers: Headers,
    /// when the headers came, after `init` was written (`None`: never)
    pub headers_after_ms: Option<u64>,
    /// `stream_cancelled` for a never-sent command id
    pub stream_cancelled: Cancelled,
    /// how long its answer took
    pub stream_cancelled_after_ms: Option<u64>,
    /// our half-close
    pub half_close: HalfClose,
    /// how long its completion took
    pub half_close_after_ms: Option<u64>,
    /// messages the user function wrote that the probe did not ask for
    pub unexpected: Vec<String>,
}

/// Everything the check found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// the address checked
    pub address: String,
    /// usable by latticed (the exit code)
    pub usable: bool,
    /// a TCP connection was accepted
    pub reachable: bool,
    /// it answered the HTTP/2 preface with SETTINGS
    pub h2c: bool,
    /// its server's SETTINGS (measured)
    pub http2_settings: Option<Http2Settings>,
    /// the largest message it accepts (assumed)
    pub max_message_size: MessageSize,
    /// what latticed sent with `discover`
    pub proxy_info: ProxyInfoReport,
    /// what the user function said about itself
    pub service_info: Option<ServiceInfoReport>,
    /// its entities
    pub entities: Vec<EntityReport>,
    /// what [`validate`] found wrong with the spec (latticed would not serve it)
    pub spec_problems: Vec<String>,
    /// the `handle` probe, if it ran
    pub handle: Option<HandleReport>,
    /// why latticed cannot use it (empty: usable)
    pub problems: Vec<String>,
    /// what latticed copes with, at a cost
    pub warnings: Vec<String>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// An error with its sources (tonic's transport errors say little at the top).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            let _ = write!(s, ": {text}");
        }
        source = inner.source();
    }
    s
}

/// Checks that `s` looks like `host:port` (for clap).
pub fn parse_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    match s.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() =>
        {
            Ok(s.to_string())
        }
        _ => Err(format!(
            "`{s}` is not HOST:PORT (e.g. 127.0.0.1:8080, without http://)"
        )),
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_SETTINGS: u8 = 4;
const FRAME_GOAWAY: u8 = 7;
const FLAG_ACK: u8 = 1;

fn frame_header(len: usize, kind: u8, flags: u8) -> [u8; 9] {
    let len = u32::try_from(len).unwrap_or(0).to_be_bytes();
    [len[1], len[2], len[3], kind, flags, 0, 0, 0, 0]
}

/// Sends the HTTP/2 preface and reads the server's SETTINGS frame; then acknowledges it and
/// says goodbye (GOAWAY, NO_ERROR).
async fn read_settings(stream: &mut TcpStream) -> Result<Http2Settings, String> {
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(&frame_header(0, FRAME_SETTINGS, 0));
    stream
        .write_all(&hello)
        .await
        .map_err(|e| format!("cannot send the HTTP/2 preface: {e}"))?;
    let mut head = [0u8; 9];
    if let Err(e) = stream.read_exact(&mut head).await {
        return Err(format!(
            "it closed the connection after the HTTP/2 preface ({e}): it does not speak \
             HTTP/2 cleartext (h2c)"
        ));
    }
    if head.starts_with(b"HTTP/1.") {
        return Err(
            "it answered the HTTP/2 preface with HTTP/1: it does not speak HTTP/2 cleartext (h2c)"
                .into(),
        );
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    if head[3] != FRAME_SETTINGS || head[4] & FLAG_ACK != 0 || len % 6 != 0 || len > 1 << 16 {
        return Err(format!(
            "its first bytes after the HTTP/2 preface are not a SETTINGS frame ({head:02x?}): \
             it does not speak HTTP/2 cleartext (h2c), or speaks TLS"
        ));
    }
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|e| format!("its SETTINGS frame was cut short: {e}"))?;
    let mut settings = Http2Settings::default();
    for entry in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
        match id {
            1 => settings.header_table_size = Some(value),
            2 => settings.enable_push = Some(value),
            3 => settings.max_concurrent_streams = Some(value),
            4 => settings.initial_window_size = Some(value),
            5 => settings.max_frame_size = Some(value),
            6 => settings.max_header_list_size = Some(value),
            _ => {}
        }
    }
    let mut bye = frame_header(0, FRAME_SETTINGS, FLAG_ACK).to_vec();
    bye.extend_from_slice(&frame_header(8, FRAME_GOAWAY, 0));
    bye.extend_from_slice(&[0u8; 8]); // last stream 0, NO_ERROR
    let _ = stream.write_all(&bye).await;
    let _ = stream.shutdown().await;
    Ok(settings)
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS the user function at `addr` advertises (`None`: it
/// sets no limit, or could not be asked within `timeout`). One short connection: the preface,
/// its SETTINGS frame, goodbye.
pub async fn max_concurrent_streams(addr: &str, timeout: Duration) -> Option<u32> {
    let ask = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        read_settings(&mut tcp).await.ok()?.max_concurrent_streams
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}

fn throwaway_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h = latticed_crdt::wire::Fnv::new();
    h.write(&nanos.to_le_bytes());
    h.write(&std::process::id().to_le_bytes());
    format!("latticed-check-{:016x}", h.finish())
}

type Opening = Pin<
    Box<
        dyn Future<Output = Result<tonic::Response<tonic::Streaming<CrdtStreamOut>>, tonic::Status>>
            + Send,
    >,
>;

/// What the user function did next on `handle`.
enum Event {
    /// the response headers (`trailers_only`: they also ended the call, status OK)
    Headers {
        trailers_only: bool,
    },
    Message(Box<CrdtStreamOut>),
    Completed,
    Failed(tonic::Status),
}

/// One `Crdt/handle` call, observed event by event; every `next` may be abandoned by a
/// timeout and called again.
struct HandleCall {
    opening: Option<Opening>,
    stream: Option<tonic::Streaming<CrdtStreamOut>>,
    ended: bool,
}

impl HandleCall {
    /// Opens the call; `outgoing` is written as it comes, headers or not.
    fn open(channel: tonic::transport::Channel, outgoing: mpsc::Receiver<CrdtStreamIn>) -> Self {
        let opening: Opening = Box::pin(async move {
            let mut client = CrdtClient::new(channel);
            client.handle(ReceiverStream::new(outgoing)).await
        });
        HandleCall {
            opening: Some(opening),
            stream: None,
            ended: false,
        }
    }

    async fn next(&mut self) -> Event {
        if self.ended {
            return std::future::pending().await;
        }
        if let Some(opening) = &mut self.opening {
            let r = opening.await;
            self.opening = None;
            return match r {
                Ok(response) => {
                    let trailers_only = response.metadata().contains_key("grpc-status");
                    self.stream = Some(response.into_inner());
                    Event::Headers { trailers_only }
                }
                Err(status) => {
                    self.ended = true;
                    Event::Failed(status)
                }
            };
        }
        let Some(stream) = &mut self.stream else {
            return std::future::pending().await;
        };
        match stream.message().await {
            Ok(Some(m)) => Event::Message(Box::new(m)),
            Ok(None) => {
                self.ended = true;
                Event::Completed
            }
            Err(status) => {
                self.ended = true;
                Event::Failed(status)
            }
        }
    }
}

fn describe(m: &CrdtStreamOut) -> String {
    use crdt_stream_out::Message as Out;
    match &m.message {
        Some(Out::Failure(f)) => {
            format!("a failure (command id {}): {}", f.command_id, f.description)
        }
        Some(Out::Reply(r)) => format!("a reply for command id {}", r.command_id),
        Some(Out::StreamedMessage(s)) => {
            format!("a streamed message for command id {}", s.command_id)
        }
        Some(Out::StreamCancelledResponse(r)) => {
            format!(
                "a stream_cancelled_response for command id {}",
                r.command_id
            )
        }
        None => "an empty message".to_string(),
    }
}

fn status_text(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// The `handle` probe (step 3 of the module doc).
async fn probe_handle(
    opts: &CheckOptions,
    service: &str,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Option<HandleReport> {
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{}", opts.addr)) {
        Ok(e) => e.connect_timeout(opts.timeout),
        Err(e) => {
            problems.push(format!("invalid address {}: {e}", opts.addr));
            return None;
        }
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("cannot connect for Crdt/handle: {}", chain(&e)));
            return None;
        }
    };
    let entity_id = throwaway_id();
    let mut report = HandleReport {
        service: service.to_string(),
        entity_id: entity_id.clone(),
        headers: Headers::Withheld,
        headers_after_ms: None,
        stream_cancelled: Cancelled::NotProbed,
        stream_cancelled_after_ms: None,
        half_close: HalfClose::NotProbed,
        half_close_after_ms: None,
        unexpected: Vec::new(),
    };
    let (tx, rx) = mpsc::channel(8);
    let init = CrdtStreamIn {
        message: Some(crdt_stream_in::Message::Init(CrdtInit {
            service_name: service.to_string(),
            entity_id: entity_id.clone(),
            delta: None,
        })),
    };
    // written as soon as it exists, as the entity runtime does
    let _ = tx.try_send(init);
    let start = Instant::now();
    let mut call = HandleCall::open(channel, rx);

    // 1. the headers, while the user function has nothing to say
    let window = HEADER_WINDOW.min(opts.timeout);
    let mut ended = false;
    match tokio::time::timeout(window, call.next()).await {
        Err(_) => report.headers = Headers::Withheld,
        Ok(Event::Headers { trailers_only }) => {
            report.headers_after_ms = Some(ms(start.elapsed()));
            report.headers = Headers::Eager;
            if trailers_only {
                problems.push(format!(
                    "Crdt/handle: the user function ended the call right after init for \
                     {service} (status OK, no message)"
                ));
                ended = true;
            } else if let Ok(e) = tokio::time::timeout(Duration::from_millis(50), call.next()).await
            {
                if matches!(e, Event::Message(_)) {
                    // a message right behind the headers: they may have been waiting for it
                    report.headers = Headers::Undetermined;
                }
                ended = !after_init(e, service, &mut report, problems);
            }
        }
        Ok(e) => {
            report.headers = Headers::CallEnded;
            report.headers_after_ms = Some(ms(start.elapsed()));
            ended = !after_init(e, service, &mut report, problems);
        }
    }
    if ended {
        return Some(report);
    }

    // 2. stream_cancelled for command id 1, which was never sent
    let cancelled = CrdtStreamIn {
        message: Some(crdt_stream_in::Message::StreamCancelled(StreamCancelled {
            entity_id: entity_id.clone(),
            id: 1,
        })),
    };
    let sent = Instant::now();
    let _ = tx.try_send(cancelled);
    report.stream_cancelled = Cancelled::NeverAnswered;
    let deadline = sent + opts.timeout;
    loop {
        let event = match tokio::time::timeout_at(deadline.into(), call.next()).await {
            Ok(e) => e,
            Err(_) => break,
        };
        match event {
            Event::Headers { trailers_only } => {
                report.headers_after_ms = Some(ms(start.elapsed()));
                if trailers_only {
                    report.stream_cancelled = Cancelled::EndedCall;
                    ended = true;
                    break;
                }
            }
            Event::Message(m) => match &m.message {
                Some(crdt_stream_out::Message::StreamCancelledResponse(r)) if r.command_id == 1 => {
                    report.stream_cancelled = Cancelled::Answered;
                    report.stream_cancelled_after_ms = Some(ms(sent.elapsed()));
                    break;
                }
                _ => report.unexpected.push(describe(&m)),
            },
            Event::Completed | Event::Failed(_) => {
                report.stream_cancelled = Cancelled::EndedCall;
                ended = true;
                break;
            }
        }
    }
    match report.stream_cancelled {
        Cancelled::NeverAnswered => warnings.push(format!(
            "stream_cancelled is not answered within {} (node-support, for one, answers only \
             when the command registered a cancel callback): latticed treats a cancellation \
             as finished after {}, holding back replicated changes to that entity meanwhile",
            fmt_duration(opts.timeout),
            fmt_duration(latticed_bounds().0)
        )),
        Cancelled::EndedCall => warnings.push(
            "the user function ended the call on a stream_cancelled for a command it never got \
             (latticed sends stream_cancelled only for streamed commands)"
                .into(),
        ),
        Cancelled::Answered | Cancelled::NotProbed => {}
    }
    if ended {
        return Some(report);
    }

    // 3. our half-close
    drop(tx);
    let closed = Instant::now();
    let deadline = closed + opts.timeout;
    report.half_close = HalfClose::NotCompleted;
    loop {
        let event = match tokio::time::timeout_at(deadline.into(), call.next()).await {
            Ok(e) => e,
            Err(_) => break,
        };
        match event {
            Event::Headers { trailers_only } => {
                report.headers_after_ms = Some(ms(start.elapsed()));
                if trailers_only {
                    report.half_close = HalfClose::Completed;
                    report.half_close_after_ms = Some(ms(closed.elapsed()));
                    break;
                }
            }
            Event::Message(m) => report.unexpected.push(describe(&m)),
            Event::Completed => {
                report.half_close = HalfClose::Completed;
                report.half_close_after_ms = Some(ms(closed.elapsed()));
                break;
            }
            Event::Failed(status) => {
                report.half_close = HalfClose::Failed;
                report.half_close_after_ms = Some(ms(closed.elapsed()));
                warnings.push(format!(
                    "after latticed's half-close the user function ended the call with an error \
                     ({}); latticed only needs it to end",
                    status_text(&status)
                ));
                break;
            }
        }
    }
    if report.half_close == HalfClose::NotCompleted {
        warnings.push(format!(
            "the user function does not complete its side of Crdt/handle within {} of \
             latticed's half-close: a passivating entity then waits {} before latticed cancels \
             the call",
            fmt_duration(opts.timeout),
            fmt_duration(latticed_bounds().1)
        ));
    }
    // dropping the call cancels it if still open
    Some(report)
}

/// Records an event that came right after `init`; false when the call is over.
fn after_init(
    event: Event,
    service: &str,
    report: &mut HandleReport,
    problems: &mut Vec<String>,
) -> bool {
    match event {
        Event::Headers { .. } => true,
        Event::Message(m) => {
            let text = describe(&m);
            if matches!(m.message, Some(crdt_stream_out::Message::Failure(_))) {
                problems.push(format!(
                    "Crdt/handle: the user function answered init for {service} with {text}"
                ));
            }
            report.unexpected.push(text);
            true
        }
        Event::Completed => {
            problems.push(format!(
                "Crdt/handle: the user function ended the call right after init for {service}"
            ));
            false
        }
        Event::Failed(status) => {
            problems.push(format!(
                "Crdt/handle failed right after init for {service}: {}",
                status_text(&status)
            ));
            false
        }
    }
}

fn entity_reports(spec: &EntitySpec) -> Vec<EntityReport> {
    spec.entities
        .iter()
        .map(|e| {
            let persistence_id = if e.persistence_id.is_empty() {
                e.service_name
                    .rsplit('.')
                    .next()
                    .unwrap_or(&e.service_name)
                    .to_string()
            } else {
                e.persistence_id.clone()
            };
            let passivation_timeout_ms = passivation_timeout(e).map(ms);
            EntityReport {
                service: e.service_name.clone(),
                entity_type: e.entity_type.clone(),
                persistence_id,
                passivation_timeout_ms,
            }
        })
        .collect()
}

/// Runs the check.
pub async fn check(opts: &CheckOptions) -> Report {
    let info = proxy_info();
    let mut report = Report {
        address: opts.addr.clone(),
        usable: false,
        reachable: false,
        h2c: false,
        http2_settings: None,
        max_message_size: MessageSize {
            bytes: ASSUMED_MAX_MESSAGE,
            measured: false,
            basis: "assumed: the default receive limit of grpc-js, grpc-java, grpc-go and \
                    grpcio (measuring it would take a multi-megabyte call the user function \
                    would log); latticed refuses larger commands up front \
                    (--user-function-max-message)"
                .into(),
        },
        proxy_info: ProxyInfoReport {
            protocol_version: format!(
                "{}.{}",
                info.protocol_major_version, info.protocol_minor_version
            ),
            proxy_name: info.proxy_name.clone(),
            proxy_version: info.proxy_version.clone(),
            supported_entity_types: info.supported_entity_types.clone(),
        },
        service_info: None,
        entities: Vec::new(),
        spec_problems: Vec::new(),
        handle: None,
        problems: Vec::new(),
        warnings: Vec::new(),
    };

    // 1. TCP and h2c
    let mut tcp = match tokio::time::timeout(opts.timeout, TcpStream::connect(&opts.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            report.problems.push(format!(
                "cannot connect to {}: {e} (is the user function running, on this port?)",
                opts.addr
            ));
            return report;
        }
        Err(_) => {
            report.problems.push(format!(
                "cannot connect to {}: no answer within {}",
                opts.addr,
                fmt_duration(opts.timeout)
            ));
            return report;
        }
    };
    report.reachable = true;
    match tokio::time::timeout(opts.timeout, read_settings(&mut tcp)).await {
        Ok(Ok(settings)) => {
            report.h2c = true;
            report.http2_settings = Some(settings);
        }
        Ok(Err(e)) => {
            report.problems.push(e);
            return report;
        }
        Err(_) => {
            report.problems.push(format!(
                "no HTTP/2 SETTINGS within {} of the preface: it does not speak HTTP/2 \
                 cleartext (h2c)",
                fmt_duration(opts.timeout)
            ));
            return report;
        }
    }
    drop(tcp);

    // 2. discovery, read-only
    let discovery = Discovery::new(opts.addr.clone());
    let spec = match tokio::time::timeout(opts.timeout, discovery.discover_once()).await {
        Ok(Ok(spec)) => spec,
        Ok(Err(e)) => {
            report
                .problems
                .push(format!("discovery failed: {}", chain(&e)));
            return report;
        }
        Err(_) => {
            report.problems.push(format!(
                "discovery: no answer to /cloudstate.EntityDiscovery/discover within {}",
                fmt_duration(opts.timeout)
            ));
            return report;
        }
    };
    match &spec.service_info {
        Some(i) => {
            report.service_info = Some(ServiceInfoReport {
                service_name: i.service_name.clone(),
                service_version: i.service_version.clone(),
                service_runtime: i.service_runtime.clone(),
                support_library_name: i.support_library_name.clone(),
                support_library_version: i.support_library_version.clone(),
                protocol_version: format!(
                    "{}.{}",
                    i.protocol_major_version, i.protocol_minor_version
                ),
            });
        }
        None => report
            .warnings
            .push("the spec carries no service_info (library, runtime, protocol version)".into()),
    }
    report.entities = entity_reports(&spec);
    if let Err(problems) = validate(&spec) {
        report.spec_problems = problems.clone();
        report.problems.extend(problems);
    }

    // 3. one handle call
    let crdts: Vec<&EntityReport> = report
        .entities
        .iter()
        .filter(|e| e.entity_type == CRDT_ENTITY_TYPE)
        .collect();
    let target = match &opts.service {
        Some(name) => {
            let found = crdts.iter().find(|e| {
                e.service == *name || e.service.rsplit('.').next() == Some(name.as_str())
            });
            if found.is_none() {
                let names: Vec<&str> = crdts.iter().map(|e| e.service.as_str()).collect();
                report.problems.push(format!(
                    "--service {name}: no CRDT entity of that name in the spec (it has: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
            found.map(|e| e.service.clone())
        }
        None => crdts.first().map(|e| e.service.clone()),
    };
    if let Some(service) = target {
        report.handle =
            probe_handle(opts, &service, &mut report.problems, &mut report.warnings).await;
    }
    report.usable = report.problems.is_empty();
    report
}

fn setting(v: Option<u32>, default: &str) -> String {
    match v {
        Some(n) => n.to_string(),
        None => format!("{default} (not set)"),
    }
}

/// The report as text, one finding per line.
pub fn render_text(r: &Report, timeout: Duration) -> String {
    let mut s = String::new();
    let mut line = |label: &str, text: &str| {
        let _ = writeln!(s, "{label:<17}{text}");
    };
    line("user function", &r.address);
    if !r.reachable {
        line("reachable", "no");
    } else if !r.h2c {
        line("reachable", "TCP yes, HTTP/2 cleartext (h2c) no");
    } else {
        line("reachable", "yes, over HTTP/2 cleartext (h2c)");
    }
    if let Some(h) = &r.http2_settings {
        line(
            "http2 settings",
            &format!(
                "max concurrent streams {}, initial window {}, max frame size {}, max header \
                 list size {} (measured: its server's SETTINGS frame)",
                setting(h.max_concurrent_streams, "unlimited"),
                setting(h.initial_window_size, "65535"),
                setting(h.max_frame_size, "16384"),
                setting(h.max_header_list_size, "unlimited"),
            ),
        );
        if let Some(n) = h.max_concurrent_streams {
            line(
                "",
                &format!(
                    "each active entity holds one stream: one connection to this user function \
                     carries at most {n} entities (set --user-function-streams-per-connection \
                     to {n} or less; latticed opens more connections beyond)"
                ),
            );
        }
    }
    if r.h2c {
        line(
            "max message size",
            &format!(
                "{} MiB, {}",
                r.max_message_size.bytes >> 20,
                r.max_message_size.basis
            ),
        );
        let p = &r.proxy_info;
        line(
            "proxy info",
            &format!(
                "sent protocol {}, proxy {} {}, entity types [{}]",
                p.protocol_version,
                p.proxy_name,
                p.proxy_version,
                p.supported_entity_types.join(", ")
            ),
        );
    }
    if let Some(i) = &r.service_info {
        let ours = format!("{}.{}", PROTOCOL_VERSION.0, PROTOCOL_VERSION.1);
        let version = if i.protocol_version == ours {
            format!("protocol {}", i.protocol_version)
        } else {
            format!(
                "protocol {} (WARNING: latticed speaks {ours} only)",
                i.protocol_version
            )
        };
        line(
            "service info",
            &format!(
                "{} {}, library {} {}, runtime {}, {version}",
                i.service_name,
                i.service_version,
                i.support_library_name,
                i.support_library_version,
                if i.service_runtime.is_empty() {
                    "(not said)"
                } else {
                    &i.service_runtime
                },
            ),
        );
    }
    for e in &r.entities {
        let passivation = match e.passivation_timeout_ms {
            Some(ms) => format!("passivation {}", fmt_duration(Duration::from_millis(ms))),
            None => "passivation: latticed's --passivation-timeout".to_string(),
        };
        line(
            "entity",
            &format!(
                "{} ({}), persistence id {}, {passivation}",
                e.service, e.entity_type, e.persistence_id
            ),
        );
    }
    if !r.entities.is_empty() || !r.spec_problems.is_empty() {
        if r.spec_problems.is_empty() {
            line("spec", "valid");
        } else {
            line(
                "spec",
                &format!(
                    "INVALID, {} problem(s) (not reported to the user function: the check is \
                     read-only)",
                    r.spec_problems.len()
                ),
            );
        }
    }
    if let Some(h) = &r.handle {
        line(
            "handle",
            &format!(
                "Crdt/handle on {} for entity {} (init without a value; no command sent)",
                h.service, h.entity_id
            ),
        );
        let after = |v: Option<u64>| match v {
            Some(ms) => format!("after {ms} ms"),
            None => "not at all".to_string(),
        };
        let headers = match h.headers {
            Headers::Eager => format!(
                "sent at once ({}), before any message (as a tonic server does)",
                after(h.headers_after_ms)
            ),
            Headers::Withheld => format!(
                "withheld until its first message or the end of the call (as grpc-js, \
                 grpc-java, grpc-go and grpcio do; they came {}): latticed does not wait for \
                 them",
                after(h.headers_after_ms)
            ),
            Headers::CallEnded => format!(
                "not judged: the call ended at once ({})",
                after(h.headers_after_ms)
            ),
            Headers::Undetermined => format!(
                "came with a message written right after init ({}): cannot tell",
                after(h.headers_after_ms)
            ),
        };
        line("headers", &headers);
        let cancelled = match h.stream_cancelled {
            Cancelled::Answered => format!(
                "answered in {} ms (for command id 1, never sent)",
                h.stream_cancelled_after_ms.unwrap_or_default()
            ),
            Cancelled::NeverAnswered => format!(
                "never answers (none within {}; latticed bounds its wait to {})",
                fmt_duration(timeout),
                fmt_duration(latticed_bounds().0)
            ),
            Cancelled::EndedCall => "the user function ended the call".to_string(),
            Cancelled::NotProbed => "not probed (the call had ended)".to_string(),
        };
        line("stream_cancelled", &cancelled);
        let half_close = match h.half_close {
            HalfClose::Completed => format!(
                "completed in {} ms",
                h.half_close_after_ms.unwrap_or_default()
            ),
            HalfClose::Failed => format!(
                "ended with an error in {} ms",
                h.half_close_after_ms.unwrap_or_default()
            ),
            HalfClose::NotCompleted => format!(
                "not completed within {} (latticed cancels the call {} after its half-close)",
                fmt_duration(timeout),
                fmt_duration(latticed_bounds().1)
            ),
            HalfClose::NotProbed => "not probed (the call had ended)".to_string(),
        };
        line("half-close", &half_close);
        for u in &h.unexpected {
            line("unexpected", &format!("the user function wrote {u}"));
        }
    }
    for w in &r.warnings {
        line("warning", w);
    }
    for p in &r.problems {
        line("problem", p);
    }
    line(
        "result",
        if r.usable {
            "usable by latticed"
        } else {
            "NOT usable by latticed"
        },
    );
    s
}

/// `latticed check-uf`: runs the check, prints the report (text or JSON) on stdout; exit 0 when
/// the user function is usable, 1 when it is not.
pub fn main(opts: CheckOptions, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("latticed: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(check(&opts));
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("latticed: encoding the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render_text(&report, opts.timeout));
    }
    if report.usable {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
