//! Client connections of the front-end: HTTP/1.1 and HTTP/2 (prior knowledge) on one port,
//! with explicit limits.
//!
//! tonic's and hyper's builders leave several HTTP/2 limits unset or generous, so they are set
//! here: concurrent streams per connection ([`MAX_CONCURRENT_STREAMS`]), the header list size
//! ([`MAX_HEADER_LIST_BYTES`]), a guard against rapid resets (streams a client opens and
//! resets at once, [`MAX_PENDING_RESETS`]), and keepalive pings that close a connection whose
//! peer stopped answering ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]). HTTP/1.1 headers
//! must arrive within [`HEADER_READ_TIMEOUT`]. With TLS ([`super::tls`]) the handshake must
//! complete within its timeout; failures are logged and counted in
//! `latticed_frontend_tls_handshake_failures_total`.
//!
//! A connection with no request in progress for the idle timeout (`--client-idle-timeout`) is
//! closed gracefully (HTTP/2: GOAWAY, then the connection ends). A connection with an open
//! call, a server-streamed one included, is never idle. [`serve`] drains on shutdown the same
//! way, for every connection at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio::time::Instant;

/// Streams a client may have open on one HTTP/2 connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Largest header list (HTTP/2, uncompressed) a client may send.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Streams reset by the client before they were answered, at most, at any time per connection
/// (beyond it the connection is closed: the rapid-reset guard).
pub const MAX_PENDING_RESETS: usize = 20;
/// How often an HTTP/2 connection is pinged.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an HTTP/1.1 client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How client connections are served.
#[derive(Clone)]
pub struct Settings {
    /// a connection with no request in progress this long is closed
    pub idle_timeout: Duration,
    /// TLS (none: plain TCP)
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains: the listener is
/// closed, every connection is told to finish (HTTP/2 GOAWAY; HTTP/1.1 closes after its
/// current exchange), and this returns once the calls in progress have ended. Bound the drain
/// by dropping the future.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    let (drain, draining) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
            // reap finished connection tasks as they end
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // e.g. out of file descriptors: wait a little rather than spin
                tracing::warn!(error = %e, "front-end accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            builder: builder.clone(),
            peer,
            router: router.clone(),
            idle: settings.idle_timeout,
            draining: draining.clone(),
        };
        match settings.tls.clone() {
            None => connections.spawn(conn.serve(stream)),
            Some(tls) => connections.spawn(async move {
                let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
                match tokio::time::timeout(super::tls::HANDSHAKE_TIMEOUT, accept).await {
                    Ok(Ok(stream)) => conn.serve(stream).await,
                    Ok(Err(e)) => handshake_failed(peer, &e.to_string()),
                    Err(_) => handshake_failed(peer, "timed out"),
                }
            }),
        };
    }
    drop(listener);
    tracing::info!(
        connections = connections.len(),
        "front-end draining: no new connections, the open ones finish their calls"
    );
    let _ = drain.send(true);
    while connections.join_next().await.is_some() {}
}

fn handshake_failed(peer: SocketAddr, reason: &str) {
    tracing::debug!(peer = %peer, reason, "front-end TLS handshake failed");
    metrics::counter!(crate::metrics::FRONTEND_TLS_FAILURES).increment(1);
}

/// One accepted client connection.
struct Connection {
    builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    peer: SocketAddr,
    router: axum::Router,
    idle: Duration,
    draining: watch::Receiver<bool>,
}

impl Connection {
    /// Serves HTTP on `io` until the client or the server closes it.
    async fn serve<I>(mut self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let service = hyper_util::service::TowerToHyperService::new(Tracked {
            inner: self.router,
            activity: activity.clone(),
            peer: PeerAddr(self.peer),
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut closing = false;
        let peer = self.peer;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %peer, error = %e, "front-end connection ended");
                    }
                    return;
                }
                _ = activity.idle_for(self.idle), if !closing => {
                    tracing::debug!(peer = %peer, "closing an idle front-end connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = self.draining.wait_for(|d| *d), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// The client's address, in every request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Requests in progress on one connection, and since when it has had none.
///
/// Counted with atomics and read only when the idle deadline comes: a request's start and end
/// wake nothing (a watch channel here woke the connection's task twice per request, a cost on
/// every command).
#[derive(Clone)]
struct Activity {
    state: Arc<ActivityState>,
}

struct ActivityState {
    /// requests in progress
    in_progress: AtomicUsize,
    /// when the last request ended (or the connection began), as nanoseconds since `base`
    last_end_nanos: AtomicU64,
    base: Instant,
}

impl Activity {
    fn new() -> Self {
        Activity {
            state: Arc::new(ActivityState {
                in_progress: AtomicUsize::new(0),
                last_end_nanos: AtomicU64::new(0),
                base: Instant::now(),
            }),
        }
    }

    fn start(&self) -> ActiveGuard {
        self.state.in_progress.fetch_add(1, Ordering::AcqRel);
        ActiveGuard {
            state: self.state.clone(),
        }
    }

    /// When the connection's last request ended (or it began).
    fn last_end(&self) -> Instant {
        let nanos = self.state.last_end_nanos.load(Ordering::Acquire);
        self.state.base + Duration::from_nanos(nanos)
    }

    /// Completes once the connection has had no request in progress for `idle`: it sleeps
    /// until the deadline the last request's end sets, and looks again then.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let busy = self.state.in_progress.load(Ordering::Acquire) > 0;
            let deadline = if busy {
                Instant::now() + idle
            } else {
                self.last_end() + idle
            };
            if !busy && deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One request in progress, until its response body is done or dropped.
struct ActiveGuard {
    state: Arc<ActivityState>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let since_base = Instant::now().saturating_duration_since(self.state.base);
        let nanos = u64::try_from(since_base.as_nanos()).unwrap_or(u64::MAX);
        // the end is recorded before the count drops, so a reader that sees no request in
        // progress sees this end too
        self.state.last_end_nanos.fetch_max(nanos, Ordering::AcqRel);
        self.state.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router, counting requests in progress.
#[derive(Clone)]
struct Tracked {
    inner: axum::Router,
    activity: Activity,
    peer: PeerAddr,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl tower::Service<hyper::Request<hyper::body::Incoming>> for Tracked {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.peer);
        let guard = self.activity.start();
        let router = self.inner.clone();
        Box::pin(async move {
            use tower::ServiceExt;
            let resp = match router.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(resp.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted as in progress until it is done.
pub struct TrackedBody {
    inner: Body,
    _guard: ActiveGuard,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{oneshot, Notify};

    use super::*;

    async fn get(addr: SocketAddr) -> tokio::net::TcpStream {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        s
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_after_the_timeout_with_nothing_in_progress() {
        let idle = Duration::from_millis(100);
        let activity = Activity::new();
        let guard = activity.start();
        // a request in progress, however long: never idle
        let waited = tokio::time::timeout(idle * 3, activity.idle_for(idle)).await;
        assert!(waited.is_err(), "idle with a request in progress");
        let ended = Instant::now();
        drop(guard);
        // idle once the timeout has passed since the request ended, not since it started
        tokio::time::timeout(idle * 10, activity.idle_for(idle))
            .await
            .expect("not idle after its request ended");
        assert!(ended.elapsed() >= idle, "idle before the timeout passed");
        // a request that starts and ends meanwhile restarts the wait
        let before = Instant::now();
        drop(activity.start());
        tokio::time::timeout(idle * 10, activity.idle_for(idle))
            .await
            .expect("not idle again");
        assert!(before.elapsed() >= idle);
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_lets_calls_in_progress_finish() {
        let release = Arc::new(Notify::new());
        let started = Arc::new(Notify::new());
        let (r, s) = (release.clone(), started.clone());
        let router = axum::Router::new().route(
            "/slow",
            axum::routing::get(move || {
                let (r, s) = (r.clone(), s.clone());
                async move {
                    s.notify_one();
                    r.notified().await;
                    "done"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let settings = Settings {
            idle_timeout: Duration::from_secs(60),
            tls: None,
        };
        let server = tokio::spawn(serve(listener, router, settings, async {
            let _ = stopped.await;
        }));
        let mut call = get(addr).await;
        started.notified().await;
        stop.send(()).unwrap();
        // no new connections once draining
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(refused.is_ok(), "the listener still accepts");
        assert!(!server.is_finished());
        // the call in progress completes, then the connection closes and serve returns
        release.notify_one();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), call.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
