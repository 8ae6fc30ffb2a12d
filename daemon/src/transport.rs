//! Transport: the one QUIC endpoint (quinn + rustls, mutual TLS) and the cached per-peer
//! connections.
//!
//! Both directions require a certificate chained to the cluster CA; a peer without one is
//! refused at the handshake, logged, and counted in `latticed_handshake_failures_total`. SWIM
//! travels as QUIC datagrams on the cached connections. Replication frames travel on one
//! long-lived unidirectional stream per direction and peer, each frame prefixed with its length
//! (4 bytes, big endian, at most [`MAX_FRAME`]); the first frame of every stream this node opens
//! is the hello given by [`Transport::set_stream_hello`]. Bidirectional streams carry routing
//! exchanges (`latticed.route`, one per stream): [`Transport::open_call`] opens one, and the ones
//! peers open are handed over as [`InboundCall`]s (refused, counted and reset when the routing
//! layer has no room). Nothing a peer sends can panic this module.
//!
//! Failures a peer (or anyone who can send UDP) can cause are counted every time but logged at
//! most once per 10 s per kind, with the number not logged since. Inbound frames are bounded in
//! bytes ([`INBOUND_BYTES`]); a member that goes down has its connection and writer dropped
//! ([`Transport::forget_peer`]).
//!
//! This module moves bytes. It knows nothing of SWIM or CRDTs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, TransportConfig};
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tokio::sync::mpsc;

use crate::certs::{TlsMaterial, CLUSTER_SERVER_NAME};
use crate::error::DaemonError;
use crate::metrics as m;

/// ALPN protocol of latticed peer connections.
pub const ALPN: &[u8] = b"latticed/1";

/// How many bytes of an unexpected stream are read before it is stopped.
const STREAM_DRAIN_LIMIT: usize = 64 * 1024;

/// Largest stream frame accepted; a longer length prefix closes the stream before anything is
/// allocated.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Frames queued for one peer before new ones are dropped (replication resends them).
const SEND_QUEUE: usize = 4096;

/// Bytes of inbound frames read but not yet handled, over all peers: a reader waits for room
/// before it allocates a frame's body, so a slow consumer pushes back on the peers (through
/// QUIC flow control) instead of queueing up to 4,096 frames of up to 64 MiB each.
pub const INBOUND_BYTES: usize = 2 * MAX_FRAME;

/// At most one WARN line per this for one kind of peer failure (each is still counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Rate limit of the log lines of one kind of failure: a flood of bad handshakes (anyone can
/// send QUIC Initials) must not flood the log.
#[derive(Default)]
struct Throttle(Mutex<(Option<Instant>, u64)>);

impl Throttle {
    /// `Some(n)`: log this one, saying `n` more were not logged since the last line.
    fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match g.0 {
            Some(last) if now < last + WARN_EVERY => {
                g.1 += 1;
                None
            }
            _ => Some(std::mem::replace(&mut *g, (Some(now), 0)).1),
        }
    }
}

#[derive(Default)]
struct Warns {
    /// dialling a peer failed
    dial: Throttle,
    /// a peer was refused at the handshake
    refused: Throttle,
    /// a frame above the size bound
    too_large: Throttle,
}

/// A bidirectional stream a peer opened: one routing exchange.
pub struct InboundCall {
    /// the peer's address
    pub from: SocketAddr,
    /// our side's writer
    pub send: quinn::SendStream,
    /// the peer's writer
    pub recv: quinn::RecvStream,
}

/// Why a routing exchange could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// no connection to the peer
    #[error("cannot connect to the peer at {0}")]
    Unreachable(SocketAddr),
    /// the connection refused a new stream
    #[error("cannot open a stream to the peer at {addr}: {reason}")]
    Stream {
        /// the peer
        addr: SocketAddr,
        /// quinn's reason
        reason: String,
    },
}

/// A datagram from a peer: its address and the bytes.
pub type Datagram = (SocketAddr, Bytes);

/// A stream frame from a peer, or the end of its stream.
#[derive(Debug)]
pub struct InboundFrame {
    /// the peer's address
    pub from: SocketAddr,
    /// which stream (unique per process): the first frame of a stream is its hello
    pub stream: u64,
    /// the frame body, without the length prefix (empty at the end of the stream)
    pub body: Bytes,
    /// the stream ended: no more frames will come from it
    pub end: bool,
    /// the frame's share of [`INBOUND_BYTES`], given back when this is dropped
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// the peer's certificate (end entity), as its TLS handshake presented it
    pub peer_cert: Option<Arc<CertificateDer<'static>>>,
}

/// The end-entity certificate a connection's peer presented.
fn peer_cert(conn: &quinn::Connection) -> Option<Arc<CertificateDer<'static>>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().cloned().map(Arc::new)
}

/// The QUIC endpoint and its connections.
#[derive(Clone)]
pub struct Transport {
    endpoint: Endpoint,
    inner: Arc<Mutex<Peers>>,
    inbound: Arc<tokio::sync::Semaphore>,
    warns: Arc<Warns>,
    datagrams: mpsc::Sender<Datagram>,
    frames: mpsc::Sender<InboundFrame>,
    calls: mpsc::Sender<InboundCall>,
}

#[derive(Default)]
struct Peers {
    conns: HashMap<SocketAddr, quinn::Connection>,
    /// datagrams waiting for a connection being established
    pending: HashMap<SocketAddr, Vec<Bytes>>,
    /// per peer: the queue of its stream writer
    writers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    hello: Vec<u8>,
    next_stream: u64,
}

fn tls_err(reason: impl std::fmt::Display) -> DaemonError {
    DaemonError::Tls {
        path: "<tls configuration>".into(),
        reason: reason.to_string(),
    }
}

fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        15_000,
    ))));
    t.datagram_receive_buffer_size(Some(1 << 20));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    // routing exchanges: one per forwarded call in flight
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    Arc::new(t)
}

/// Why a handshake failed, as a metric label.
pub fn handshake_reason(e: &ConnectionError) -> &'static str {
    let code = match e {
        ConnectionError::TransportError(t) => Some(u64::from(t.code)),
        ConnectionError::ConnectionClosed(c) => Some(u64::from(c.error_code)),
        ConnectionError::TimedOut => return "timeout",
        ConnectionError::VersionMismatch => return "version_mismatch",
        _ => None,
    };
    match code {
        // TLS alerts travel as QUIC crypto errors 0x100 + alert
        Some(0x100..=0x1ff) => match code.unwrap_or(0) & 0xff {
            42 => "bad_certificate",
            48 => "unknown_ca",
            116 => "certificate_required",
            120 => "no_application_protocol",
            _ => "tls",
        },
        _ => "other",
    }
}

fn roots(tls: &TlsMaterial) -> Result<Arc<RootCertStore>, DaemonError> {
    let mut roots = RootCertStore::empty();
    for c in &tls.ca {
        roots.add(c.clone()).map_err(tls_err)?;
    }
    Ok(Arc::new(roots))
}

/// The client side of mutual TLS: trusts the cluster CA, presents this node's certificate.
pub fn client_config(tls: &TlsMaterial) -> Result<quinn::ClientConfig, DaemonError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(tls)?)
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(tls_err)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client).map_err(tls_err)?,
    ));
    config.transport_config(transport_config());
    Ok(config)
}

impl Transport {
    /// Binds the endpoint on `bind` with mutual TLS; received datagrams go to `datagrams`,
    /// stream frames to `frames`, routing exchanges peers open to `calls`.
    pub fn bind(
        bind: SocketAddr,
        tls: &TlsMaterial,
        datagrams: mpsc::Sender<Datagram>,
        frames: mpsc::Sender<InboundFrame>,
        calls: mpsc::Sender<InboundCall>,
    ) -> Result<Self, DaemonError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = roots(tls)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(tls_err)?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(tls.chain.clone(), tls.key.clone_key())
            .map_err(tls_err)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server).map_err(tls_err)?,
        ));
        server_config.transport_config(transport_config());

        let mut endpoint = Endpoint::server(server_config, bind).map_err(|e| {
            DaemonError::io(format!("binding the cluster endpoint on udp {bind}"), e)
        })?;
        endpoint.set_default_client_config(client_config(tls)?);
        let transport = Transport {
            endpoint,
            inner: Arc::new(Mutex::new(Peers::default())),
            inbound: Arc::new(tokio::sync::Semaphore::new(INBOUND_BYTES)),
            warns: Arc::default(),
            datagrams,
            frames,
            calls,
        };
        tokio::spawn(transport.clone().accept_loop());
        Ok(transport)
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, DaemonError> {
        self.endpoint
            .local_addr()
            .map_err(|e| DaemonError::io("reading the cluster endpoint address", e))
    }

    /// Sends a datagram to `to`, connecting first if needed (datagrams may be lost; SWIM
    /// tolerates that).
    pub fn send_datagram(&self, to: SocketAddr, data: Bytes) {
        let conn = {
            let mut peers = self.peers();
            match peers.conns.get(&to) {
                Some(c) if c.close_reason().is_none() => Some(c.clone()),
                _ => {
                    let queue = peers.pending.entry(to).or_default();
                    let first = queue.is_empty();
                    if queue.len() < 64 {
                        queue.push(data.clone());
                    }
                    if first {
                        tokio::spawn(self.clone().connect(to));
                    }
                    None
                }
            }
        };
        if let Some(c) = conn {
            self.send_on(&c, data);
        }
    }

    /// Bytes of [`INBOUND_BYTES`] not taken by frames read and not yet handled.
    pub fn inbound_room(&self) -> usize {
        self.inbound.available_permits()
    }

    /// The frame that opens every stream this node writes.
    pub fn set_stream_hello(&self, hello: Vec<u8>) {
        self.peers().hello = hello;
    }

    /// Queues a frame body for `to`'s stream (connecting and opening it if needed). A full queue
    /// drops the frame, counted: replication resends what is not acked.
    pub fn send_frame(&self, to: SocketAddr, body: Vec<u8>) {
        let mut peers = self.peers();
        let tx = match peers.writers.get(&to) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(SEND_QUEUE);
                peers.writers.insert(to, tx.clone());
                metrics::gauge!(m::REPLICATION_STREAMS, "direction" => "out")
                    .set(peers.writers.len() as f64);
                tokio::spawn(self.clone().write_stream(to, rx));
                tx
            }
        };
        drop(peers);
        if tx.try_send(body).is_err() {
            metrics::counter!(m::REJECTED_FRAMES, "reason" => "send_queue_full").increment(1);
        }
    }

    /// Opens a routing exchange with `to` (connecting first if needed).
    pub async fn open_call(
        &self,
        to: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
        let conn = self
            .connection(to)
            .await
            .ok_or(OpenError::Unreachable(to))?;
        conn.open_bi().await.map_err(|e| OpenError::Stream {
            addr: to,
            reason: e.to_string(),
        })
    }

    /// Forgets a peer that is down or gone: closes its connection (so it is not counted, and a
    /// peer that comes back is dialled afresh) and ends its stream writer and task. Frames still
    /// queued for it are dropped; replication resends what is not acked.
    pub fn forget_peer(&self, addr: SocketAddr) {
        let (conn, writer) = {
            let mut peers = self.peers();
            peers.pending.remove(&addr);
            let writer = peers.writers.remove(&addr);
            metrics::gauge!(m::REPLICATION_STREAMS, "direction" => "out")
                .set(peers.writers.len() as f64);
            (peers.conns.remove(&addr), writer)
        };
        drop(writer);
        if let Some(c) = conn {
            c.close(quinn::VarInt::from_u32(0), b"peer down");
        }
    }

    async fn connection(&self, to: SocketAddr) -> Option<quinn::Connection> {
        if let Some(c) = self.peers().conns.get(&to) {
            if c.close_reason().is_none() {
                return Some(c.clone());
            }
        }
        let conn = match self.endpoint.connect(to, CLUSTER_SERVER_NAME) {
            Ok(connecting) => connecting.await,
            Err(e) => {
                if let Some(suppressed) = self.warns.dial.allow() {
                    tracing::warn!(peer = %to, error = %e, suppressed, "cannot dial peer");
                }
                return None;
            }
        };
        match conn {
            Ok(c) => {
                tracing::debug!(peer = %to, "connected");
                self.register(c.clone());
                Some(c)
            }
            Err(e) => {
                let reason = handshake_reason(&e);
                metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => reason).increment(1);
                if let Some(suppressed) = self.warns.dial.allow() {
                    tracing::warn!(peer = %to, reason, error = %e, suppressed,
                        "connection to peer failed");
                }
                None
            }
        }
    }

    /// The writer of `to`'s stream: (re)opens it as needed, hello first, then every frame. It
    /// follows the peer's current connection: when the peer restarts and dials in anew, the
    /// stream moves to the new connection.
    async fn write_stream(self, to: SocketAddr, mut rx: mpsc::Receiver<Vec<u8>>) {
        let mut stream: Option<(usize, quinn::SendStream)> = None;
        while let Some(body) = rx.recv().await {
            let current = self
                .peers()
                .conns
                .get(&to)
                .filter(|c| c.close_reason().is_none())
                .map(|c| c.stable_id());
            if stream.as_ref().map(|(id, _)| Some(*id)) != Some(current) || current.is_none() {
                stream = None;
            }
            if stream.is_none() {
                let Some(conn) = self.connection(to).await else {
                    continue;
                };
                match conn.open_uni().await {
                    Ok(mut s) => {
                        let hello = self.peers().hello.clone();
                        if write_frame(&mut s, hello).await.is_err() {
                            continue;
                        }
                        stream = Some((conn.stable_id(), s));
                    }
                    Err(e) => {
                        tracing::debug!(peer = %to, error = %e, "cannot open a stream");
                        continue;
                    }
                }
            }
            if let Some((_, s)) = stream.as_mut() {
                if let Err(e) = write_frame(s, body).await {
                    tracing::debug!(peer = %to, error = %e, "stream write failed; reopening");
                    stream = None;
                }
            }
        }
    }

    fn send_on(&self, conn: &quinn::Connection, data: Bytes) {
        match conn.send_datagram(data) {
            Ok(()) => metrics::counter!(m::SWIM_SENT).increment(1),
            Err(e) => {
                tracing::debug!(peer = %conn.remote_address(), error = %e, "datagram not sent")
            }
        }
    }

    /// Closes every connection and the endpoint, waiting at most `grace`.
    pub async fn close(&self, grace: Duration) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        let _ = tokio::time::timeout(grace, self.endpoint.wait_idle()).await;
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects to `to` for the datagrams queued for it (dropped if that fails).
    async fn connect(self, to: SocketAddr) {
        let conn = self.connection(to).await;
        let queued = self.peers().pending.remove(&to).unwrap_or_default();
        if let Some(c) = conn {
            for d in queued {
                self.send_on(&c, d);
            }
        }
    }

    async fn accept_loop(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                let from = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => this.register(conn),
                    Err(e) => {
                        let reason = handshake_reason(&e);
                        metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => reason).increment(1);
                        if let Some(suppressed) = this.warns.refused.allow() {
                            tracing::warn!(peer = %from, reason, error = %e, suppressed,
                                "refused a peer at the handshake");
                        }
                    }
                }
            });
        }
    }

    fn register(&self, conn: quinn::Connection) {
        let addr = conn.remote_address();
        let queued = {
            let mut peers = self.peers();
            if let Some(old) = peers.conns.insert(addr, conn.clone()) {
                if old.stable_id() != conn.stable_id() {
                    // keep the old one open: the peer may still be using it
                    tracing::trace!(peer = %addr, "second connection to peer");
                }
            }
            peers.pending.remove(&addr).unwrap_or_default()
        };
        metrics::gauge!(m::PEER_CONNECTIONS).increment(1.0);
        for d in queued {
            self.send_on(&conn, d);
        }
        tokio::spawn(self.clone().serve(conn));
    }

    async fn serve(self, conn: quinn::Connection) {
        let addr = conn.remote_address();
        let uni = tokio::spawn(self.clone().accept_uni(conn.clone()));
        let bi = tokio::spawn(self.clone().accept_bi(conn.clone()));
        let reason = loop {
            match conn.read_datagram().await {
                Ok(d) => {
                    metrics::counter!(m::SWIM_RECEIVED).increment(1);
                    if self.datagrams.send((addr, d)).await.is_err() {
                        break None;
                    }
                }
                Err(e) => break Some(e),
            }
        };
        uni.abort();
        bi.abort();
        metrics::gauge!(m::PEER_CONNECTIONS).decrement(1.0);
        let mut peers = self.peers();
        if peers
            .conns
            .get(&addr)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            peers.conns.remove(&addr);
        }
        tracing::debug!(peer = %addr, reason = ?reason, "connection closed");
    }
}

async fn drain(mut recv: quinn::RecvStream) {
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    while let Ok(Some(n)) = recv.read(&mut buf).await {
        total += n;
        if total > STREAM_DRAIN_LIMIT {
            let _ = recv.stop(quinn::VarInt::from_u32(1));
            break;
        }
    }
}

/// Writes one length-prefixed frame in one write: prefix and body reach the connection
/// together, so a quiet stream sends one packet, not a 4-byte one and then the body.
async fn write_frame(s: &mut quinn::SendStream, body: Vec<u8>) -> Result<(), quinn::WriteError> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut chunks = [
        Bytes::copy_from_slice(&len.to_be_bytes()),
        Bytes::from(body),
    ];
    s.write_all_chunks(&mut chunks).await
}

impl Transport {
    async fn accept_uni(self, conn: quinn::Connection) {
        let cert = peer_cert(&conn);
        while let Ok(recv) = conn.accept_uni().await {
            let stream = {
                let mut p = self.peers();
                p.next_stream += 1;
                p.next_stream
            };
            let from = Source {
                addr: conn.remote_address(),
                stream,
                cert: cert.clone(),
            };
            tokio::spawn(self.clone().read_frames(from, recv));
        }
    }

    /// Reads length-prefixed frames until the stream ends or misbehaves, then says so.
    async fn read_frames(self, from: Source, recv: quinn::RecvStream) {
        self.read_stream(&from, recv).await;
        let _ = self.frames.send(from.frame(Bytes::new(), None)).await;
    }

    async fn read_stream(&self, source: &Source, mut recv: quinn::RecvStream) {
        let from = source.addr;
        loop {
            let mut prefix = [0u8; 4];
            if recv.read_exact(&mut prefix).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes(prefix) as usize;
            if len > MAX_FRAME {
                metrics::counter!(m::REJECTED_FRAMES, "reason" => "too_large").increment(1);
                if let Some(suppressed) = self.warns.too_large.allow() {
                    tracing::warn!(peer = %from, len, suppressed,
                        "frame above the size bound; closing the stream");
                }
                let _ = recv.stop(quinn::VarInt::from_u32(2));
                return;
            }
            // room for the body first (len <= MAX_FRAME < INBOUND_BYTES, so it comes)
            let Ok(permit) = self
                .inbound
                .clone()
                .acquire_many_owned(u32::try_from(len).unwrap_or(u32::MAX))
                .await
            else {
                return;
            };
            // grow with what arrives: a length prefix alone allocates little
            let mut body = Vec::with_capacity(len.min(1 << 20));
            while body.len() < len {
                match recv.read_chunk(len - body.len(), true).await {
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
                    _ => {
                        metrics::counter!(m::REJECTED_FRAMES, "reason" => "truncated").increment(1);
                        return;
                    }
                }
            }
            let f = source.frame(Bytes::from(body), Some(permit));
            if self.frames.send(f).await.is_err() {
                return;
            }
        }
    }
}

/// Where a stream's frames come from.
struct Source {
    addr: SocketAddr,
    stream: u64,
    cert: Option<Arc<CertificateDer<'static>>>,
}

impl Source {
    /// A frame of this stream; no permit: the end of the stream.
    fn frame(
        &self,
        body: Bytes,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> InboundFrame {
        InboundFrame {
            from: self.addr,
            stream: self.stream,
            end: permit.is_none(),
            body,
            permit,
            peer_cert: self.cert.clone(),
        }
    }
}

impl Transport {
    /// Hands the peer's routing exchanges over; one that finds no room is reset and counted.
    async fn accept_bi(self, conn: quinn::Connection) {
        let from = conn.remote_address();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let call = InboundCall { from, send, recv };
            if let Err(e) = self.calls.try_send(call) {
                let mut call = match e {
                    mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
                };
                metrics::counter!(m::REJECTED_FRAMES, "reason" => "calls_busy").increment(1);
                tracing::debug!(peer = %from, "no room for a routing exchange; reset");
                let _ = call.send.reset(quinn::VarInt::from_u32(1));
                tokio::spawn(drain(call.recv));
            }
        }
    }
}
