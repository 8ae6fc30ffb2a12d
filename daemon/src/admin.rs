//! Admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics` and the JSON inspect API.
//!
//! Read-only views of state owned elsewhere; this module changes nothing.

use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::cluster::ClusterView;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// the membership view
    pub cluster: Arc<RwLock<ClusterView>>,
    /// the metrics recorder
    pub metrics: PrometheusHandle,
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

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/members", get(members))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let joined = s.cluster.read().map(|v| v.joined).unwrap_or(false);
    if joined {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not joined to the cluster yet\n",
        )
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
