//! The active entities of one user function, and how commands reach them.
//!
//! Owns the map (service, entity id) → running entity task, starting a task on the first
//! command and letting a stopped task's queued commands go to a fresh one; the routing of
//! forwards and side effects (which may come back to any entity, this one included); and the
//! watch over the user function's spec (rediscovery). It does not know the CloudState stream
//! rules: those are in [`super::machine`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use latticed_proto::wkt::Any;
use tokio::sync::{mpsc, oneshot};

use super::machine::{Config, ENTITY_TERMINATING};
use super::status::{ClientReply, Outcome, Status};
use super::streamed::{CallGuard, CancelGuard, StreamSink, StreamedCall};
use crate::replication::ReplicationHandle;
use crate::userfn::discovery::Discovery;
use crate::userfn::pool::ConnectionPool;
use crate::userfn::spec::{EntityModel, MethodModel, UserFunctionModel};

/// Where a command's outcome goes.
pub(crate) enum Reply {
    /// a unary call: one outcome
    Unary(oneshot::Sender<Outcome>),
    /// a server-streamed call: outcomes until the channel closes; `token` names the call in
    /// cancellations
    Streamed(StreamSink, u64),
}

impl Reply {
    pub(crate) fn fail(self, status: Status) {
        match self {
            Reply::Unary(tx) => {
                let _ = tx.send(Err(status));
            }
            Reply::Streamed(sink, _) => sink.fail(status),
        }
    }
}

/// A client's command on its way to its entity.
pub(crate) struct Request {
    pub(crate) method: MethodModel,
    /// the entity id, when the caller decoded it already (none: decoded from `payload`)
    pub(crate) entity_id: Option<String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) reply: Reply,
}

/// What an entity task's inbox carries.
pub(crate) enum EntityMsg {
    Command(Request),
    /// the client of the streamed call with this token went away
    Cancel(u64),
    /// the node is shutting down
    Drain,
}

/// Where a forward or side effect goes when its service is not this user function's (the
/// front-end sets it: the node's other user functions, then other nodes).
pub trait Elsewhere: Send + Sync {
    /// The user function serving `service`'s method `name`, and the method.
    fn route(&self, service: &str, name: &str) -> Option<(crate::frontend::Backend, MethodModel)>;
}

/// Every active entity of one user function, and how to route commands to them.
#[derive(Clone)]
pub struct Entities {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    model: RwLock<Arc<UserFunctionModel>>,
    pub(crate) connections: ConnectionPool,
    pub(crate) discovery: Discovery,
    pub(crate) replication: ReplicationHandle,
    pub(crate) config: Config,
    /// running entity tasks by (service, entity id): the task's generation and inbox
    active: Mutex<HashMap<(String, String), ActiveTask>>,
    next_token: AtomicU64,
    /// the node is shutting down: clients' new commands are refused
    draining: AtomicBool,
    /// whether the user function answers discovery (the monitor's finding)
    up: tokio::sync::watch::Sender<bool>,
    /// where forwards and side effects for other services go
    elsewhere: RwLock<Option<Arc<dyn Elsewhere>>>,
}

/// A running entity task: its generation and its inbox.
type ActiveTask = (u64, mpsc::Sender<EntityMsg>);

/// Where a dispatched request went (its entity's inbox), or why it could not go, with the
/// request's reply handed back so that the caller can fail it.
type Dispatched = Result<mpsc::Sender<EntityMsg>, (Status, Reply)>;

/// Counts a client's command in `latticed_commands_total` (a streamed one when it starts).
fn count_command(service: &str, method: &MethodModel, failure: Option<&Status>) {
    match failure {
        None => method.metrics.commands_ok().increment(1),
        Some(s) => {
            metrics::counter!(crate::metrics::COMMANDS, "service" => service.to_string(),
                "method" => method.name.clone(),
                "outcome" => crate::metrics::outcome_name(s.code))
            .increment(1);
        }
    }
}

/// A streamed call as a forward or side effect: its first message answers it.
async fn first_reply(mut call: StreamedCall) -> Outcome {
    let message = call.outcomes.recv().await.transpose()?.flatten();
    let headers = call.headers.try_recv().unwrap_or_default();
    Ok(ClientReply { message, headers })
}

/// A future that can be spawned.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl Entities {
    /// The runtime for the user function at `addr`, described by `model`; `config` gives every
    /// entity's timing and bounds (an entity's own passivation timeout wins).
    pub fn new(
        addr: &str,
        model: UserFunctionModel,
        replication: ReplicationHandle,
        config: Config,
    ) -> Result<Self, tonic::transport::Error> {
        let connections = ConnectionPool::new(addr, config.streams_per_connection)?;
        Ok(Entities {
            inner: Arc::new(Inner {
                model: RwLock::new(Arc::new(model)),
                connections,
                discovery: Discovery::new(addr),
                replication,
                config,
                active: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                up: tokio::sync::watch::Sender::new(true),
                elsewhere: RwLock::new(None),
            }),
        })
    }

    /// The user function's model (the latest discovered).
    pub fn model(&self) -> Arc<UserFunctionModel> {
        self.inner
            .model
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Looks up a method by service and simple name.
    pub fn method(&self, service: &str, name: &str) -> Option<(Arc<EntityModel>, MethodModel)> {
        self.model()
            .entities
            .iter()
            .filter(|e| e.service.full_name() == service)
            .find_map(|e| {
                e.methods
                    .iter()
                    .find(|m| m.name == name)
                    .map(|m| (e.clone(), m.clone()))
            })
    }

    /// Watches the user function: every `every`, asks it for its spec. Going away and coming
    /// back is logged; a changed spec is validated and, if valid, replaces the served one (an
    /// invalid one is reported once and the previous one kept).
    pub async fn monitor(self, every: Duration) {
        let up = metrics::gauge!(crate::metrics::USERFN_UP,
            "address" => self.inner.discovery.addr.to_string());
        up.set(1.0);
        let mut away = false;
        let mut rejected: Option<u64> = None;
        loop {
            tokio::time::sleep(every).await;
            let spec = match self.inner.discovery.discover_once().await {
                Ok(spec) => spec,
                Err(e) => {
                    if !away {
                        tracing::warn!(user_function = %self.inner.discovery.addr, error = %e,
                            "the user function went away; its entities fail until it is back");
                        away = true;
                        up.set(0.0);
                        self.inner.up.send_replace(false);
                    }
                    continue;
                }
            };
            up.set(1.0);
            self.inner
                .up
                .send_if_modified(|u| !std::mem::replace(u, true));
            if away {
                tracing::info!(user_function = %self.inner.discovery.addr, "the user function is back");
                away = false;
            }
            let fp = crate::userfn::spec::fingerprint(&spec);
            if fp == self.model().fingerprint || Some(fp) == rejected {
                continue;
            }
            match crate::userfn::validate(&spec) {
                Ok(model) => {
                    tracing::info!(user_function = %self.inner.discovery.addr,
                        served = %model.description, "the user function's spec changed; rediscovered");
                    *self.inner.model.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(model);
                }
                Err(problems) => {
                    for p in &problems {
                        tracing::error!(user_function = %self.inner.discovery.addr, problem = %p,
                            "the user function's new spec is invalid; keeping the previous one");
                        self.inner.discovery.report_error(p).await;
                    }
                    rejected = Some(fp);
                }
            }
        }
    }

    /// Routes a client's command (its request bytes) to its entity and waits for the outcome.
    /// While the node shuts down, new commands are refused with UNAVAILABLE (the client may
    /// retry on another node).
    /// `entity_id`: the request's entity id if the caller decoded it already.
    pub async fn command(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
    ) -> Outcome {
        let start = std::time::Instant::now();
        let outcome = match self.refuse_if_draining() {
            Ok(()) => self.run_command(service, method, payload, entity_id).await,
            Err(e) => Err(e),
        };
        count_command(service, method, outcome.as_ref().err());
        method
            .metrics
            .command_seconds()
            .record(start.elapsed().as_secs_f64());
        outcome
    }

    /// Whether the user function answers discovery, as [`Entities::monitor`] last found
    /// (changes when it goes away or comes back).
    pub fn up(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.up.subscribe()
    }

    /// Whether the user function answers discovery now.
    pub fn is_up(&self) -> bool {
        *self.inner.up.borrow()
    }

    /// Sets where forwards and side effects for services this user function does not serve
    /// go.
    pub fn set_elsewhere(&self, elsewhere: Arc<dyn Elsewhere>) {
        *self
            .inner
            .elsewhere
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(elsewhere);
    }

    /// Whether the node is shutting down.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    fn refuse_if_draining(&self) -> Result<(), Status> {
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable(
                "the node is shutting down; retry on another node",
            ));
        }
        Ok(())
    }

    /// A command from a client or from a user function (a side effect, a forward).
    async fn run_command(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
    ) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        self.dispatch(service, method, payload, entity_id, Reply::Unary(reply))
            .await?;
        outcome
            .await
            .unwrap_or_else(|_| Err(Status::unknown(ENTITY_TERMINATING)))
    }

    /// Routes a server-streamed command; its messages arrive on the returned call, and dropping
    /// the call cancels it. `entity_id`: as for [`Entities::command`].
    pub async fn command_streamed(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
    ) -> Result<StreamedCall, Status> {
        let call = self
            .start_streamed(service, method, payload, entity_id)
            .await;
        count_command(service, method, call.as_ref().err());
        call
    }

    async fn start_streamed(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
    ) -> Result<StreamedCall, Status> {
        self.refuse_if_draining()?;
        let (sink, outcomes, headers) = StreamSink::channel();
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let entity = self
            .dispatch(
                service,
                method,
                payload,
                entity_id,
                Reply::Streamed(sink, token),
            )
            .await?;
        Ok(StreamedCall {
            outcomes,
            headers,
            _guard: CallGuard::Entity {
                _cancel: CancelGuard { entity, token },
            },
        })
    }

    /// Sends a command to its entity (starting it if needed); returns the entity's channel.
    async fn dispatch(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
        reply: Reply,
    ) -> Result<mpsc::Sender<EntityMsg>, Status> {
        let req = Request {
            method: method.clone(),
            entity_id,
            payload,
            reply,
        };
        self.dispatch_request(service, method, req)
            .await
            .map_err(|(status, _)| status)
    }

    /// Sends a request to its entity (starting it if needed). On failure the request's reply
    /// is handed back with the reason, so that the caller can fail it.
    pub(crate) fn dispatch_request(
        &self,
        service: &str,
        method: &MethodModel,
        req: Request,
    ) -> BoxFuture<Dispatched> {
        let this = self.clone();
        let (service, method) = (service.to_string(), method.clone());
        Box::pin(async move { this.dispatch_to_entity(&service, &method, req).await })
    }

    async fn dispatch_to_entity(
        &self,
        service: &str,
        method: &MethodModel,
        mut req: Request,
    ) -> Dispatched {
        let Some((entity, _)) = self.method(service, &method.name) else {
            let status = Status::unimplemented(format!("unknown method {}", method.path));
            return Err((status, req.reply));
        };
        let entity_id = match req
            .entity_id
            .take()
            .map_or_else(|| method.entity_id(&req.payload), Ok)
        {
            Ok(id) => id,
            Err(e) => return Err((Status::invalid_argument(e.to_string()), req.reply)),
        };
        // the command travels inside a CrdtStreamIn with the entity id and type URL around it
        let size = req.payload.len() + entity_id.len() + method.input.full_name().len() + 64;
        let limit = self.inner.config.max_message_to_uf;
        if size > limit {
            let status = Status::resource_exhausted(format!(
                "the command is {size} bytes; the user function accepts messages of at most \
                 {limit} bytes (--user-function-max-message)"
            ));
            return Err((status, req.reply));
        }
        let key = (service.to_string(), entity_id.clone());
        for _ in 0..3 {
            let tx = {
                let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                match active.get(&key) {
                    Some((_, tx)) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let max = self.inner.config.max_entities;
                        if active.len() >= max {
                            let status = Status::resource_exhausted(format!(
                                "{} entities of this user function are active, the most it \
                                 takes (--max-entities-per-user-function {max})",
                                active.len()
                            ));
                            return Err((status, req.reply));
                        }
                        let (tx, rx) = mpsc::channel(128);
                        let generation = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
                        active.insert(key.clone(), (generation, tx.clone()));
                        let run: BoxFuture<()> = Box::pin(super::task::run(
                            self.clone(),
                            entity.clone(),
                            entity_id.clone(),
                            generation,
                            rx,
                        ));
                        tokio::spawn(run);
                        tx
                    }
                }
            };
            match tx.send(EntityMsg::Command(req)).await {
                Ok(()) => return Ok(tx),
                Err(mpsc::error::SendError(msg)) => {
                    let EntityMsg::Command(r) = msg else {
                        unreachable!("only a command was sent")
                    };
                    // the entity stopped between lookup and send: start a fresh one (the
                    // stopped entity removed itself, or is about to)
                    let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                    if active.get(&key).is_some_and(|(_, t)| t.same_channel(&tx)) {
                        active.remove(&key);
                    }
                    req = r;
                }
            }
        }
        Err((Status::unknown(ENTITY_TERMINATING), req.reply))
    }

    /// Routes a forward or side effect (a request the user function built). Boxed: routing
    /// can reach another entity whose replies route again.
    pub(crate) fn route(
        &self,
        service: &str,
        command: &str,
        payload: Option<&Any>,
    ) -> BoxFuture<Outcome> {
        let this = self.clone();
        let (service, command) = (service.to_string(), command.to_string());
        let bytes = payload.map(|p| p.value.clone()).unwrap_or_default();
        Box::pin(async move {
            let Some((_, method)) = this.method(&service, &command) else {
                let elsewhere = this
                    .inner
                    .elsewhere
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if let Some((backend, method)) = elsewhere.and_then(|e| e.route(&service, &command))
                {
                    if method.streamed {
                        let call = backend
                            .command_streamed(&service, &method, bytes, None, None)
                            .await?;
                        return first_reply(call).await;
                    }
                    return backend.command(&service, &method, bytes, None, None).await;
                }
                let msg = format!(
                    "Service [{service}] unknown or it does not have a command named: [{command}]"
                );
                this.inner.discovery.report_error(&msg).await;
                return Err(Status::unknown(msg));
            };
            if method.streamed {
                // a streamed method as a side effect or forward: its first message answers
                let call = this.start_streamed(&service, &method, bytes, None).await?;
                return first_reply(call).await;
            }
            this.run_command(&service, &method, bytes, None).await
        })
    }

    /// Shuts the entities down: clients' new commands are refused with UNAVAILABLE, every
    /// entity finishes what is in flight, ends its streamed calls and passivates. Returns how
    /// many entities were still active at `deadline`.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> usize {
        self.inner.draining.store(true, Ordering::Relaxed);
        let inboxes: Vec<mpsc::Sender<EntityMsg>> = self
            .inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(_, tx)| tx.clone())
            .collect();
        for tx in inboxes {
            let _ = tokio::time::timeout_at(deadline, tx.send(EntityMsg::Drain)).await;
        }
        loop {
            let left = self
                .inner
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The entity task `generation` ends: it is removed from the active entities, its inbox
    /// closed, and commands queued in it meanwhile are routed again (to a fresh entity, which
    /// opens a new stream).
    pub(crate) async fn retire(
        &self,
        service: &str,
        entity_id: &str,
        generation: u64,
        mut inbox: mpsc::Receiver<EntityMsg>,
    ) {
        self.forget(service, entity_id, generation);
        inbox.close();
        while let Some(msg) = inbox.recv().await {
            if let EntityMsg::Command(r) = msg {
                let this = self.clone();
                let service = service.to_string();
                tokio::spawn(async move {
                    let method = r.method.clone();
                    if let Err((status, reply)) = this.dispatch_request(&service, &method, r).await
                    {
                        reply.fail(status);
                    }
                });
            }
        }
    }

    /// Removes entity task `generation` from the active entities (not a newer task for the
    /// same entity).
    pub(crate) fn forget(&self, service: &str, entity_id: &str, generation: u64) {
        let key = (service.to_string(), entity_id.to_string());
        let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.get(&key).is_some_and(|(g, _)| *g == generation) {
            active.remove(&key);
            crate::memory::entity_ended();
        }
    }
}
