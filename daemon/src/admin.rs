//! Admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics` and the JSON inspect API
//! (`/v1/members`, `/v1/keys`, `/v1/keys/{key}`).
//!
//! Read-only views of state owned elsewhere; this module changes nothing. The inspect paths
//! (`/v1/keys...`) show every value, so they are served only to `--admin-inspect-allow`
//! sources (loopback by default) or with the `--admin-inspect-token-file` token; probes,
//! `/metrics` and `/v1/members` are served to anyone (a DaemonSet's kubelet and Prometheus
//! reach them from elsewhere).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use latticed_crdt::{Element, UserValue, VoteTally, Voters};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cluster::ClusterView;
use crate::frontend::registration::{bearer_matches, networks, read_token, Network};
use crate::replication::ReplicationHandle;
use crate::store::Entry;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// the membership view
    pub cluster: Arc<RwLock<ClusterView>>,
    /// the metrics recorder
    pub metrics: PrometheusHandle,
    /// the replicated store
    pub replication: ReplicationHandle,
    /// the front-end's address, once serving
    pub frontend: tokio::sync::watch::Receiver<Option<std::net::SocketAddr>>,
    /// whether the node serves user functions (then readiness waits for the front-end)
    pub serves_user_functions: bool,
    /// the node is shutting down (SIGTERM): not ready, so that clients go elsewhere
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

/// `/v1/members` body.
#[derive(Debug, Serialize)]
pub struct MembersBody {
    /// this node's name
    #[serde(rename = "self")]
    pub self_name: String,
    /// every known member, this node included
    pub members: Vec<MemberBody>,
}

/// One member in `/v1/members`.
#[derive(Debug, Serialize)]
pub struct MemberBody {
    /// node name
    pub name: String,
    /// advertised address
    pub addr: String,
    /// up, suspect, down or left
    pub state: &'static str,
    /// incarnation (grows with each start)
    pub incarnation: u64,
}

/// Largest `/v1/keys` page.
pub const MAX_PAGE: usize = 1000;

/// What a `/v1/keys` page carries at most besides the key count: this many bytes of keys (a
/// page holds at least one key; keys may be up to `--max-entity-id-bytes` long each).
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// Who may read the inspect paths (`/v1/keys...`, which show every value): a source in
/// `allow`, or anyone presenting `token`.
#[derive(Debug, Clone, Default)]
pub struct InspectAccess {
    /// sources served without a token
    pub allow: Vec<Network>,
    /// a bearer token that opens them from anywhere
    pub token: Option<String>,
}

impl InspectAccess {
    /// From the flags (`--admin-inspect-allow`, `--admin-inspect-token-file`).
    pub fn from_flags(
        allow: &[String],
        token_file: Option<&std::path::Path>,
    ) -> Result<Self, crate::DaemonError> {
        Ok(InspectAccess {
            allow: networks(allow)?,
            token: token_file
                .map(|p| read_token(p, "admin inspect"))
                .transpose()?,
        })
    }

    fn check(&self, from: SocketAddr, authorization: Option<&str>) -> Result<(), &'static str> {
        if self.allow.iter().any(|n| n.contains(from.ip())) {
            return Ok(());
        }
        match &self.token {
            Some(t) if bearer_matches(authorization, t) => Ok(()),
            Some(_) if authorization.is_some() => Err("token"),
            _ => Err("source"),
        }
    }
}

async fn inspect_guard(
    State(access): State<Arc<InspectAccess>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match access.check(from, authorization) {
        Ok(()) => next.run(req).await,
        Err(reason) => {
            metrics::counter!(crate::metrics::ADMIN_REFUSALS, "reason" => reason).increment(1);
            (
                StatusCode::FORBIDDEN,
                format!(
                    "the inspect paths show every value: served to --admin-inspect-allow \
                     sources, or with `authorization: Bearer <token>` \
                     (--admin-inspect-token-file); {from} is neither\n"
                ),
            )
                .into_response()
        }
    }
}

/// The admin router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`: the
/// inspect paths look at the client's address.
pub fn router(state: AdminState, access: InspectAccess) -> Router {
    let inspect = Router::new()
        .route("/v1/keys", get(keys))
        .route("/v1/keys/{key}", get(key))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::new(access),
            inspect_guard,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/members", get(members))
        .merge(inspect)
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let joined = s.cluster.read().map(|v| v.joined).unwrap_or(false);
    if s.draining.load(std::sync::atomic::Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
    } else if !joined {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not joined to the cluster yet\n",
        )
    } else if !s.replication.is_synced() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first sync with a peer not complete\n",
        )
    } else if s.serves_user_functions && s.frontend.borrow().is_none() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: user function discovery not complete\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn members(State(s): State<AdminState>) -> Json<MembersBody> {
    let v = s.cluster.read().unwrap_or_else(|p| p.into_inner());
    let members: Vec<MemberBody> = v
        .members
        .iter()
        .map(|m| MemberBody {
            name: m.id.name.clone(),
            addr: m.id.addr.to_string(),
            state: m.state.name(),
            incarnation: m.id.incarnation,
        })
        .collect();
    Json(MembersBody {
        self_name: members.first().map(|m| m.name.clone()).unwrap_or_default(),
        members,
    })
}

/// `/v1/keys` query.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    /// start after this key
    pub after: Option<String>,
    /// page size (default and maximum [`MAX_PAGE`])
    pub limit: Option<usize>,
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "replication is stopped\n").into_response()
}

async fn keys(State(s): State<AdminState>, Query(q): Query<PageQuery>) -> Response {
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let Ok(page) = s.replication.page(q.after, limit).await else {
        return unavailable();
    };
    // the page ends at MAX_PAGE_BYTES of keys (always at least one key)
    let mut bytes = 0usize;
    let taken = page
        .iter()
        .take_while(|(k, _)| {
            bytes = bytes.saturating_add(k.len() + 64);
            bytes <= MAX_PAGE_BYTES
        })
        .count()
        .max(1)
        .min(page.len());
    // more keys may follow when the page is full, or when the byte budget cut it
    let more = page.len() == limit || taken < page.len();
    let page = &page[..taken];
    let next = more.then(|| page.last().map(|(k, _)| k.clone())).flatten();
    let keys: Vec<Value> = page
        .iter()
        .map(|(k, e)| json!({"key": k, "type": kind_name(e), "deleted": matches!(e, Entry::Deleted)}))
        .collect();
    Json(json!({"keys": keys, "next": next})).into_response()
}

fn kind_name(e: &Entry) -> Option<&'static str> {
    e.kind().map(|k| k.name())
}

async fn key(State(s): State<AdminState>, Path(key): Path<String>) -> Response {
    let Ok(entry) = s.replication.read(&key).await else {
        return unavailable();
    };
    match entry {
        None => (StatusCode::NOT_FOUND, format!("no key {key}\n")).into_response(),
        Some(Entry::Deleted) => {
            Json(json!({"key": key, "type": null, "value": null, "deleted": true})).into_response()
        }
        Some(Entry::Value(v)) => {
            // votes are tallied over the members that are up now, as user functions see them
            let voters = Voters {
                me: s.replication.replica(),
                live: s.replication.live_replicas().borrow().clone(),
            };
            let value = render(&v.read(&voters));
            Json(json!({"key": key, "type": v.kind().name(), "value": value, "deleted": false}))
                .into_response()
        }
    }
}

fn element(e: &Element) -> Value {
    let mut o = json!({
        "type_url": e.type_url(),
        "value": base64::engine::general_purpose::STANDARD.encode(e.value()),
    });
    if let Some(s) = e.as_string() {
        o["string"] = json!(s);
    }
    o
}

/// A value as JSON: counters as numbers, elements and keys as `{type_url, value (base64),
/// string?}`.
pub fn render(v: &UserValue) -> Value {
    match v {
        UserValue::GCounter(n) => json!(n),
        UserValue::PNCounter(n) => json!(n),
        UserValue::GSet(s) | UserValue::ORSet(s) => Value::Array(s.iter().map(element).collect()),
        UserValue::LwwRegister(r) => r.as_ref().map_or(Value::Null, element),
        UserValue::Flag(b) => json!(b),
        UserValue::ORMap(m) => Value::Array(
            m.iter()
                .map(|(k, v)| json!({"key": element(k), "value": render(v)}))
                .collect(),
        ),
        UserValue::Vote(VoteTally {
            self_vote,
            votes_for,
            total_voters,
        }) => json!({"self_vote": self_vote, "votes_for": votes_for, "total_voters": total_voters}),
    }
}
