//! Routing: any node serves every service of the cluster (the DaemonSet model).
//!
//! A user function does not run on every node, and behind a Kubernetes Service a client lands
//! on any node. So each node asks every live member, over the mutually authenticated QUIC mesh,
//! which user functions it serves (their specs, as discovery gave them; asked again every
//! [`ASK_EVERY`], an unchanged answer being one small frame), and the front-end serves those
//! services too: a command for a service no local user function offers is sent to a node that
//! serves it, with what is left of its deadline, and its reply (or its stream of messages)
//! comes back the same way. The node for an entity is chosen by rendezvous hashing
//! ([`directory`]), the same on every node, so one entity's commands meet one user-function
//! stream wherever clients land.
//!
//! - The serving node runs a routed command on its own user functions only, never routes it on
//!   (no loops). A command it cannot take (its service is not, or no longer, served there; the
//!   node is shutting down) comes back marked as not run, and the next node is tried; a command
//!   that reached a user function is never sent twice: if its node goes away meanwhile the
//!   client gets UNAVAILABLE (the outcome is unknown).
//! - With no node serving the service: UNIMPLEMENTED naming it.
//! - A streamed call's cancellation (its client went, or its deadline passed) travels as the
//!   QUIC stream's stop: the serving node drops the call, and its entity gets the cancellation.
//!
//! This module owns the directory of other nodes' services, the routing exchanges
//! (`latticed.route`, [`wire`]) on both ends ([`forward`], [`serve`]), and the view of remote
//! user functions the front-end serves ([`RemoteUf`]). It must not touch entities' internals
//! or replicated state: it calls the entity runtime the way the front-end does.

pub mod directory;
pub mod forward;
pub mod serve;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use latticed_membership::{MemberState, MemberView};
use latticed_proto::cloudstate::EntitySpec;
use latticed_proto::latticed::route::{request, response, Request, Response, ServicesQuery};
use tokio::sync::{mpsc, watch};

use self::directory::{Answer, Directory, Query, Served};
use self::wire::Exchange;
use crate::entity::Entities;
use crate::transport::{InboundCall, Transport};
use crate::userfn::spec::{MethodModel, UserFunctionModel};

/// How often each member is asked what it serves.
pub const ASK_EVERY: Duration = Duration::from_secs(2);

/// How long an ask, or the request of an inbound exchange, may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many user functions are taken from one member's answer.
const MAX_USER_FUNCTIONS: usize = 64;

/// Inbound exchanges waiting to be served; past it they are refused (reset and counted).
pub const INBOUND_QUEUE: usize = 1024;

/// Inbound requests read at once (the others wait for a turn, within the request timeout):
/// with messages of at most 16 MiB, peers can make a node buffer at most 512 MiB of requests.
const READING_AT_ONCE: usize = 32;

/// This node's user functions, as routing serves them to other nodes (the front-end's set).
pub trait Local: Send + Sync {
    /// The user functions serving now (discovered, and answering), in serving order: each
    /// one's spec, encoded, and its fingerprint.
    fn specs(&self) -> Vec<(u64, Bytes)>;
    /// The local user function serving `service`'s method `method`.
    fn find(&self, service: &str, method: &str) -> Option<(Entities, MethodModel)>;
}

/// A user function of other nodes, as the front-end serves it: its model, and how to reach the
/// nodes that serve it.
#[derive(Clone)]
pub struct RemoteUf {
    /// its model (from the spec its nodes advertise)
    pub model: Arc<UserFunctionModel>,
    /// the routing that reaches its nodes
    pub routing: Routing,
}

impl RemoteUf {
    /// The user function of `model`, reached through `routing`.
    pub fn new(model: &Arc<UserFunctionModel>, routing: &Routing) -> Self {
        RemoteUf {
            model: model.clone(),
            routing: routing.clone(),
        }
    }
}

/// What other nodes serve, as the front-end sees it. (Models only: a [`RemoteUf`] holds the
/// routing, which holds this set.)
#[derive(Default)]
pub struct RemoteSet {
    /// one per distinct spec, in the order of the members (by name) that advertise it
    pub user_functions: Vec<Arc<UserFunctionModel>>,
}

/// The routing of one node (cheap to clone).
#[derive(Clone)]
pub struct Routing {
    inner: Arc<Shared>,
}

struct Shared {
    me: String,
    transport: Transport,
    directory: Mutex<Directory<Vec<Arc<UserFunctionModel>>>>,
    remote: RwLock<Arc<RemoteSet>>,
    local: RwLock<Option<Arc<dyn Local>>>,
    /// validated remote specs by fingerprint (members advertising the same user function share
    /// one model); pruned to what the directory holds
    models: Mutex<HashMap<u64, Arc<UserFunctionModel>>>,
}

impl Routing {
    /// Starts the routing of node `me`: asks the members `members` lists, serves the inbound
    /// exchanges `calls` brings.
    pub fn start(
        me: &str,
        transport: Transport,
        members: watch::Receiver<Vec<MemberView>>,
        calls: mpsc::Receiver<InboundCall>,
    ) -> Routing {
        let routing = Routing {
            inner: Arc::new(Shared {
                me: me.to_string(),
                transport,
                directory: Mutex::new(Directory::new(me, ASK_EVERY)),
                remote: RwLock::default(),
                local: RwLock::default(),
                models: Mutex::default(),
            }),
        };
        tokio::spawn(routing.clone().ask_members(members));
        tokio::spawn(routing.clone().serve_calls(calls));
        routing
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// Sets this node's user functions (once its front-end serves).
    pub fn set_local(&self, local: Arc<dyn Local>) {
        *self.inner.local.write().unwrap_or_else(|p| p.into_inner()) = Some(local);
    }

    pub(crate) fn local(&self) -> Option<Arc<dyn Local>> {
        self.inner
            .local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What other nodes serve now.
    pub fn remote(&self) -> Arc<RemoteSet> {
        self.inner
            .remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn directory(&self) -> std::sync::MutexGuard<'_, Directory<Vec<Arc<UserFunctionModel>>>> {
        self.inner
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The nodes serving `service`, the one for `entity_id` first.
    pub fn nodes_for(&self, service: &str, entity_id: &str) -> Vec<(String, SocketAddr)> {
        self.directory().nodes_for(service, entity_id)
    }

    /// Keeps the directory's members in step with the member view, and asks each what it
    /// serves when due.
    async fn ask_members(self, mut members: watch::Receiver<Vec<MemberView>>) {
        let (done_tx, mut done) =
            mpsc::channel::<(Query, Option<Answer<Vec<Arc<UserFunctionModel>>>>)>(64);
        let mut version = u64::MAX;
        loop {
            let now = std::time::Instant::now();
            let queries = {
                let up: Vec<(String, SocketAddr)> = members
                    .borrow_and_update()
                    .iter()
                    .filter(|m| matches!(m.state, MemberState::Up | MemberState::Suspect))
                    .map(|m| (m.id.name.clone(), m.id.addr))
                    .collect();
                let mut d = self.directory();
                d.set_members(up, now);
                d.poll(now)
            };
            for q in queries {
                let (this, tx) = (self.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let answer = this.ask(&q).await;
                    let _ = tx.send((q, answer)).await;
                });
            }
            if self.directory().version() != version {
                version = self.publish();
            }
            let due = self.directory().next_due();
            let sleep = async {
                match due {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some((q, answer)) = done.recv() => {
                    let now = std::time::Instant::now();
                    let mut d = self.directory();
                    match answer {
                        Some(a) => d.answered(&q, a, now),
                        None => d.failed(&q, now),
                    }
                }
                () = sleep => {}
            }
        }
    }

    /// Rebuilds the front-end's view of remote user functions; returns the directory version
    /// it reflects.
    fn publish(&self) -> u64 {
        let (version, user_functions, services) = {
            let d = self.directory();
            let mut seen = std::collections::HashSet::new();
            let mut services = std::collections::BTreeSet::new();
            let mut ufs = Vec::new();
            for (_, served) in d.served() {
                services.extend(served.services.iter().cloned());
                for model in served.payload.iter() {
                    if seen.insert(model.fingerprint) {
                        ufs.push(model.clone());
                    }
                }
            }
            self.inner
                .models
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|fp, _| seen.contains(fp));
            (d.version(), ufs, services)
        };
        metrics::gauge!(crate::metrics::REMOTE_SERVICES).set(services.len() as f64);
        if services.is_empty() {
            tracing::debug!("no service is served by other nodes");
        } else {
            tracing::info!(services = ?services, "services served by other nodes");
        }
        *self.inner.remote.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(RemoteSet { user_functions });
        version
    }

    /// Asks one member what it serves; `None`: no usable answer.
    async fn ask(&self, q: &Query) -> Option<Answer<Vec<Arc<UserFunctionModel>>>> {
        let exchange = async {
            let (send, recv) = self.inner.transport.open_call(q.addr).await.ok()?;
            let mut ex = Exchange::new(send, recv);
            let req = Request {
                kind: Some(request::Kind::Services(ServicesQuery { known: q.known })),
            };
            ex.send(&req).await.ok()?;
            ex.finish();
            match ex.next::<Response>().await {
                Ok(Some(Response {
                    kind: Some(response::Kind::Services(s)),
                })) => Some(s),
                other => {
                    tracing::debug!(member = %q.name, answer = ?other.err(), "no services answer");
                    None
                }
            }
        };
        let services = tokio::time::timeout(ASK_TIMEOUT, exchange).await.ok()??;
        if services.unchanged {
            return Some(Answer::Unchanged);
        }
        let mut models = Vec::new();
        for spec in services.specs.iter().take(MAX_USER_FUNCTIONS) {
            match self.model_of(spec) {
                Ok(m) => models.push(m),
                Err(problems) => {
                    tracing::warn!(member = %q.name, ?problems,
                        "a user function another node advertises is not valid here; its services are not routed");
                }
            }
        }
        let services_named = models
            .iter()
            .flat_map(|m| m.entities.iter().map(|e| e.service.full_name().to_string()))
            .collect();
        Some(Answer::New(Served {
            digest: services.digest,
            services: services_named,
            payload: Arc::new(models),
        }))
    }

    /// The model of an advertised spec (validated once per distinct spec).
    fn model_of(&self, spec: &Bytes) -> Result<Arc<UserFunctionModel>, Vec<String>> {
        let fp = crate::userfn::spec::fingerprint_of(spec);
        if let Some(m) = self
            .inner
            .models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fp)
        {
            return Ok(m.clone());
        }
        let decoded = <EntitySpec as prost::Message>::decode(spec.clone())
            .map_err(|e| vec![format!("the spec cannot be decoded: {e}")])?;
        let model = Arc::new(crate::userfn::spec::validate(&decoded)?);
        self.inner
            .models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fp, model.clone());
        Ok(model)
    }

    /// Serves the exchanges other nodes open, each on a task of its own.
    async fn serve_calls(self, mut calls: mpsc::Receiver<InboundCall>) {
        // requests being read at once, over every peer: each may buffer up to a whole message
        // (at most [`wire::MAX_MESSAGE`]), so this bounds what peers can make this node hold
        let reading = Arc::new(tokio::sync::Semaphore::new(READING_AT_ONCE));
        while let Some(call) = calls.recv().await {
            tokio::spawn(serve::serve(self.clone(), call, reading.clone()));
        }
    }
}

/// The digest of a list of specs (by their fingerprints, in order).
pub fn digest_of(specs: &[(u64, Bytes)]) -> u64 {
    let mut h = latticed_crdt::wire::Fnv::new();
    for (fp, _) in specs {
        h.write(&fp.to_be_bytes());
    }
    // never 0, which means "no copy" in a query
    h.finish().max(1)
}
