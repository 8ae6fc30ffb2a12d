//! The front-end: the user functions' own services, served to external clients on `--listen`,
//! from the descriptors learned at discovery (protocol spec §6.4).
//!
//! One listener speaks HTTP/1.1 and HTTP/2 (prior knowledge); each request is routed by what it
//! is, in the reference proxy's order:
//!
//! - `K-Network-Probe: queue` (Knative's probe): 200 `queue`;
//! - `application/grpc-web*`: gRPC-Web ([`grpc_web`]), translated by tonic-web onto gRPC;
//! - `application/grpc*`: gRPC ([`grpc`]): server reflection ([`reflection`]), `grpc.health.v1`
//!   and every discovered method, through tonic's server with a raw-bytes codec;
//! - anything else: HTTP/JSON transcoding ([`http_json`]) by the methods' `google.api.http`
//!   rules, else 404.
//!
//! CORS is answered for every route a browser can call (preflights included), so browsers may
//! call gRPC-Web and HTTP/JSON; plain `application/grpc` (which browsers cannot send) skips it.
//! Calls of discovered methods are counted by protocol, method and outcome ([`REQUESTS`],
//! [`REQUEST_SECONDS`]). The connection layer is in [`connection`]: explicit HTTP/2 limits,
//! keepalive pings, and the idle timeout of client connections.

pub mod connection;
pub mod grpc;
pub mod grpc_web;
pub mod health;
pub mod http_json;
pub mod reflection;
pub mod registration;
pub mod tls;
pub mod user_functions;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;

use crate::entity::{Entities, Outcome, Status, StreamedCall};
use crate::routing::{RemoteSet, RemoteUf, Routing};
use crate::userfn::spec::{MethodModel, UserFunctionModel};

/// Where a user function's forwards and side effects for services it does not serve go: the
/// node's other user functions, then other nodes (held weakly: a user function does not keep
/// the front-end alive).
struct Elsewhere {
    served: std::sync::Weak<user_functions::UserFunctions>,
    routing: Option<Routing>,
}

impl crate::entity::router::Elsewhere for Elsewhere {
    fn route(&self, service: &str, name: &str) -> Option<(Backend, MethodModel)> {
        if let Some(served) = self.served.upgrade() {
            for e in served.entities().iter() {
                if let Some((_, m)) = e.method(service, name) {
                    return Some((Backend::Local(e.clone()), m));
                }
            }
        }
        let routing = self.routing.as_ref()?;
        routing.remote().user_functions.iter().find_map(|model| {
            let b = Backend::Remote(RemoteUf::new(model, routing));
            b.method(service, name).map(|m| (b, m))
        })
    }
}

/// Largest request accepted (bytes), as the reference proxy's `max-inbound-message-size`.
pub const MAX_REQUEST: usize = 12 * 1024 * 1024;

/// What the front-end enforces on every request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// longest entity id accepted, in bytes
    pub max_entity_id_bytes: usize,
    /// largest request message (gRPC: after decompression; HTTP/JSON: the body)
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entity_id_bytes: 64 * 1024,
            max_request_bytes: MAX_REQUEST,
        }
    }
}

/// The routes of every user function.
#[derive(Clone)]
pub struct Frontend {
    /// the served user functions (from the flags, and registered)
    pub served: Arc<user_functions::UserFunctions>,
    /// bounds on requests
    pub limits: Limits,
    /// the HTTP/JSON rules of the served methods
    http_rules: Arc<http_json::rules::RuleCache>,
    /// the services of other nodes (none: this node serves only its own)
    routing: Option<Routing>,
    /// the last [`Frontend::backends`] answer, with the sets it was built from
    backends: Arc<Mutex<Option<BackendSet>>>,
}

/// Backends built from a local and a remote set.
struct BackendSet {
    local: Arc<Vec<Entities>>,
    remote: Option<Arc<RemoteSet>>,
    all: Arc<Vec<Backend>>,
}

/// A user function as the front-end serves it.
#[derive(Clone)]
pub enum Backend {
    /// one of this node's: its entities run here
    Local(Entities),
    /// one of other nodes': its commands are routed to them
    Remote(RemoteUf),
}

impl Backend {
    /// Its model.
    pub fn model(&self) -> Arc<UserFunctionModel> {
        match self {
            Backend::Local(e) => e.model(),
            Backend::Remote(r) => r.model.clone(),
        }
    }

    /// The method `name` of `service`, if it serves it.
    pub fn method(&self, service: &str, name: &str) -> Option<MethodModel> {
        match self {
            Backend::Local(e) => e.method(service, name).map(|(_, m)| m),
            Backend::Remote(r) => r
                .model
                .entities
                .iter()
                .filter(|e| e.service.full_name() == service)
                .find_map(|e| e.methods.iter().find(|m| m.name == name).cloned()),
        }
    }

    /// Runs a unary command; `entity_id`: the request's, if decoded already; `deadline`
    /// travels with a routed command (a local one is bounded by its caller).
    pub async fn command(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
        deadline: Option<tokio::time::Instant>,
    ) -> Outcome {
        match self {
            Backend::Local(e) => e.command(service, method, payload, entity_id).await,
            Backend::Remote(r) => {
                r.routing
                    .command(service, method, payload, entity_id, deadline)
                    .await
            }
        }
    }

    /// Starts a server-streamed command (the arguments as for [`Backend::command`]).
    pub async fn command_streamed(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<StreamedCall, Status> {
        match self {
            Backend::Local(e) => {
                e.command_streamed(service, method, payload, entity_id)
                    .await
            }
            Backend::Remote(r) => {
                r.routing
                    .command_streamed(service, method, payload, entity_id, deadline)
                    .await
            }
        }
    }
}

/// A method found for a request: its user function, service and model.
pub struct Target {
    /// the user function serving it
    pub backend: Backend,
    /// full service name
    pub service: String,
    /// the method
    pub method: MethodModel,
}

impl Frontend {
    /// Serves the methods of `user_functions` (by address) within `limits`, and with
    /// `routing`, those other nodes serve.
    pub fn new(
        user_functions: Vec<(String, Entities)>,
        limits: Limits,
        routing: Option<Routing>,
    ) -> Self {
        let frontend = Frontend {
            served: Arc::new(user_functions::UserFunctions::new(user_functions)),
            limits,
            http_rules: Default::default(),
            routing,
            backends: Arc::default(),
        };
        for e in frontend.served.entities().iter() {
            frontend.adopt(e);
        }
        if let Some(r) = &frontend.routing {
            r.set_local(frontend.served.clone());
        }
        frontend
    }

    /// Lets a user function's forwards and side effects reach the services of the node's other
    /// user functions and of other nodes.
    pub fn adopt(&self, entities: &Entities) {
        entities.set_elsewhere(Arc::new(Elsewhere {
            served: Arc::downgrade(&self.served),
            routing: self.routing.clone(),
        }));
    }

    /// This node's user functions' runtimes, as they are now.
    pub fn user_functions(&self) -> Arc<Vec<Entities>> {
        self.served.entities()
    }

    /// Every user function served, as it is now: this node's (in order), then other nodes'.
    pub fn backends(&self) -> Arc<Vec<Backend>> {
        let local = self.served.entities();
        let remote = self.routing.as_ref().map(Routing::remote);
        let mut cached = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            let same_remote = match (&c.remote, &remote) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if Arc::ptr_eq(&c.local, &local) && same_remote {
                return c.all.clone();
            }
        }
        let mut all: Vec<Backend> = local.iter().cloned().map(Backend::Local).collect();
        if let (Some(r), Some(routing)) = (&remote, &self.routing) {
            all.extend(
                r.user_functions
                    .iter()
                    .map(|model| Backend::Remote(RemoteUf::new(model, routing))),
            );
        }
        let all = Arc::new(all);
        *cached = Some(BackendSet {
            local,
            remote,
            all: all.clone(),
        });
        all
    }

    /// Finds `service`/`method` among the served methods (this node's first).
    pub fn lookup(&self, service: &str, method: &str) -> Option<Target> {
        self.backends().iter().find_map(|b| {
            b.method(service, method).map(|m| Target {
                backend: b.clone(),
                service: service.to_string(),
                method: m,
            })
        })
    }

    /// Checks a request against the bounds before it is sent to an entity: its entity id must
    /// be decodable and not longer than `--max-entity-id-bytes`. Returns the entity id.
    pub fn check_request(
        &self,
        method: &MethodModel,
        payload: &[u8],
    ) -> Result<String, tonic::Status> {
        let id = method
            .entity_id(payload)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if id.len() > self.limits.max_entity_id_bytes {
            return Err(tonic::Status::invalid_argument(format!(
                "the entity id is {} bytes long; at most {} bytes are accepted (--max-entity-id-bytes)",
                id.len(),
                self.limits.max_entity_id_bytes
            )));
        }
        Ok(id)
    }
}

pub use crate::metrics::{
    FRONTEND_REQUESTS as REQUESTS, FRONTEND_REQUEST_SECONDS as REQUEST_SECONDS,
};

/// How a call reached the front-end, for the metrics (a request extension set by the router).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2
    Grpc,
    /// gRPC-Web
    GrpcWeb,
    /// HTTP/JSON
    Http,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::Http => "http",
        }
    }
}

/// Counts a call of `target` that ended with `code`; `started`: a unary call's start.
pub fn record(
    protocol: Protocol,
    target: &Target,
    code: tonic::Code,
    started: Option<std::time::Instant>,
) {
    if code == tonic::Code::Ok {
        target
            .method
            .metrics
            .requests_ok(protocol as usize, protocol.label())
            .increment(1);
    } else {
        metrics::counter!(REQUESTS,
            "protocol" => protocol.label(),
            "service" => target.service.clone(),
            "method" => target.method.name.clone(),
            "code" => crate::metrics::code_name(code))
        .increment(1);
    }
    if let Some(started) = started {
        metrics::histogram!(REQUEST_SECONDS, "protocol" => protocol.label())
            .record(started.elapsed().as_secs_f64());
    }
}

/// An entity runtime status as a gRPC status (the one place the two meet).
pub fn to_tonic(status: Status) -> tonic::Status {
    tonic::Status::new(tonic::Code::from(status.code as i32), status.message)
}

/// Everything the front-end serves, ready for [`connection::serve`].
#[derive(Clone)]
pub struct FrontendService {
    grpc: axum::Router,
    grpc_web: axum::Router,
    /// the discovered methods (also the `grpc` router's fallback)
    methods: grpc::DynamicGrpc,
    frontend: Frontend,
}

/// The gRPC services the front-end serves besides the discovered methods (by path prefix).
const OWN_SERVICES: [&str; 3] = ["/grpc.health.", "/grpc.reflection.", "/latticed.admin."];

impl FrontendService {
    /// Builds the routes; `health` is the `grpc.health.v1` service to serve, `registrar` the
    /// registration service (none: registration is off).
    pub fn new(
        frontend: Frontend,
        health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
        registrar: Option<registration::Registrar>,
    ) -> Self {
        let mut routes = tonic::service::Routes::new(health)
            .add_service(reflection::v1(frontend.clone()))
            .add_service(reflection::v1alpha(frontend.clone()));
        if let Some(r) = registrar {
            routes = routes.add_service(
                latticed_proto::latticed::admin::v1::user_functions_server::UserFunctionsServer::new(r),
            );
        }
        let grpc = routes
            .into_axum_router()
            .fallback_service(grpc::DynamicGrpc::new(frontend.clone()));
        let grpc_web = grpc_web::router(grpc.clone());
        FrontendService {
            grpc,
            grpc_web,
            methods: grpc::DynamicGrpc::new(frontend.clone()),
            frontend,
        }
    }

    /// The whole front-end as one router (CORS around every route browsers can call).
    pub fn router(self) -> axum::Router {
        let browser = axum::Router::new()
            .fallback(route_browser)
            .with_state(self.clone())
            .layer(grpc_web::cors());
        axum::Router::new().fallback(route).with_state(Routed {
            service: self,
            browser,
        })
    }
}

/// The front-end's routes: plain gRPC directly, everything else through CORS.
#[derive(Clone)]
struct Routed {
    service: FrontendService,
    browser: axum::Router,
}

fn content_type(req: &Request) -> &str {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn route(State(r): State<Routed>, req: Request) -> Response {
    let ct = content_type(&req).to_ascii_lowercase();
    let probe = req
        .headers()
        .get("k-network-probe")
        .is_some_and(|v| v.as_bytes() == b"queue");
    if !probe && ct.starts_with("application/grpc") && !ct.starts_with("application/grpc-web") {
        // plain gRPC: browsers cannot make such calls, so no CORS work on the hot path
        if req.version() != axum::http::Version::HTTP_2 {
            return grpc_over_http1();
        }
        let path = req.uri().path();
        if OWN_SERVICES.iter().any(|p| path.starts_with(p)) {
            return infallible(r.service.grpc.oneshot(req).await);
        }
        // a discovered method: straight to it, without matching the router's routes
        return infallible(r.service.methods.clone().oneshot(req).await);
    }
    infallible(r.browser.oneshot(req).await)
}

async fn route_browser(State(s): State<FrontendService>, req: Request) -> Response {
    if req
        .headers()
        .get("k-network-probe")
        .is_some_and(|v| v.as_bytes() == b"queue")
    {
        return (StatusCode::OK, "queue").into_response();
    }
    let ct = content_type(&req).to_ascii_lowercase();
    if ct.starts_with("application/grpc-web") {
        let mut req = req;
        req.extensions_mut().insert(Protocol::GrpcWeb);
        return infallible(s.grpc_web.oneshot(req).await);
    }
    if req.method() == Method::OPTIONS {
        return StatusCode::NO_CONTENT.into_response();
    }
    http_json::handle(&s.frontend, req).await
}

fn infallible(r: Result<Response, Infallible>) -> Response {
    match r {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// `application/grpc` needs HTTP/2: trailers carry the status.
fn grpc_over_http1() -> Response {
    let mut resp = Response::new(Body::from(
        "gRPC needs HTTP/2 (prior knowledge, or h2 via ALPN); over HTTP/1.1 use gRPC-Web \
         (application/grpc-web) or HTTP/JSON\n",
    ));
    *resp.status_mut() = StatusCode::HTTP_VERSION_NOT_SUPPORTED;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
