//! The entity runtime: one task per active (service, entity id), speaking `Crdt/handle` to the
//! user function (protocol spec §7 and §11).
//!
//! An entity task opens the handle stream, sends `init` with the replicated value as a delta,
//! and forwards commands (ids from 1, pipelined). A reply's state action goes through
//! replication at the requested write consistency before side effects run and the client is
//! answered; `delete` writes the tombstone, answers and half-closes. The task keeps the
//! *user-function view* (what the user function holds): it never pushes a delta while a command
//! or cancellation is outstanding, and afterwards pushes `diff(view, replicated)` as one delta,
//! which also carries changes from other nodes. Failures (an unexpected stream end, a reply to
//! an unknown command, a stream-level failure) fail the outstanding commands with `Entity
//! terminating`, are reported with `reportError`, and the next command starts a fresh entity.
//! Idle entities are passivated: half-close, a grace period for the user function to complete,
//! then cancel.
//!
//! Server-streamed commands register their client stream before the command is sent (so a
//! `streamed_message` may precede the reply), stay open while the user function says so, and
//! a client that goes away becomes `stream_cancelled`, whose response's state action is
//! applied; the wait for that response is bounded ([`CANCEL_WAIT`]). An entity with an open
//! streamed call is never passivated. Votes are tallied over the replicas that are up, and
//! pushed again when membership changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use latticed_crdt::{diff, initial_delta, Origin, UserValue, Voters};
use latticed_proto::cloudstate::crdt::crdt_client::CrdtClient;
use latticed_proto::cloudstate::crdt::{
    crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtInit, CrdtReply, CrdtStreamIn,
    CrdtStreamOut, CrdtWriteConsistency,
};
use latticed_proto::cloudstate::{client_action, Command, SideEffect};
use latticed_proto::wkt::Any;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::replication::{Consistency, ReplicationHandle, WriteError};
use crate::store::Entry;
use crate::userfn::discovery::Discovery;
use crate::userfn::spec::{EntityModel, MethodModel, UserFunctionModel};

/// The failure text of commands outstanding when an entity stops unexpectedly.
pub const ENTITY_TERMINATING: &str = "Entity terminating";
/// The failure text of commands to a deleted entity.
pub const ENTITY_DELETED: &str = "Entity deleted";

/// A gRPC status for the client: code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// gRPC status code (2 = UNKNOWN for user-function failures)
    pub code: u32,
    /// the description
    pub message: String,
}

impl Status {
    /// UNKNOWN with `message` (what CloudState uses for failures).
    pub fn unknown(message: impl Into<String>) -> Self {
        Status {
            code: 2,
            message: message.into(),
        }
    }
}

/// What a command produced for the client: the reply message's bytes (none: no message).
pub type Outcome = Result<Option<Vec<u8>>, Status>;

/// Where a command's outcome goes.
enum Reply {
    /// a unary call: one outcome
    Unary(oneshot::Sender<Outcome>),
    /// a server-streamed call: outcomes until the channel closes; `token` names the call in
    /// cancellations
    Streamed(mpsc::Sender<Outcome>, u64),
}

impl Reply {
    fn fail(self, status: Status) {
        match self {
            Reply::Unary(tx) => {
                let _ = tx.send(Err(status));
            }
            Reply::Streamed(tx, _) => {
                let _ = tx.try_send(Err(status));
            }
        }
    }
}

struct Request {
    method: MethodModel,
    payload: Vec<u8>,
    reply: Reply,
}

enum EntityMsg {
    Command(Request),
    /// the client of the streamed call with this token went away
    Cancel(u64),
}

/// A server-streamed call in progress: its outcomes, and a guard that tells the entity when
/// the caller drops it (the client cancelled).
pub struct StreamedCall {
    /// the messages, then the end (closed channel: OK) or a failure
    pub outcomes: mpsc::Receiver<Outcome>,
    _guard: CancelGuard,
}

struct CancelGuard {
    entity: mpsc::Sender<EntityMsg>,
    token: u64,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let _ = self.entity.try_send(EntityMsg::Cancel(self.token));
    }
}

/// How long a `stream_cancelled` waits for its response (node-support may never send one).
pub const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// How long a half-closed entity stream waits for the user function to complete its side
/// before the call is cancelled (node-support as published never completes it).
pub const PASSIVATION_GRACE: Duration = Duration::from_secs(5);

/// Every active entity of one user function, and how to route commands to them.
#[derive(Clone)]
pub struct Entities {
    inner: Arc<Inner>,
}

struct Inner {
    model: std::sync::RwLock<Arc<UserFunctionModel>>,
    channel: tonic::transport::Channel,
    discovery: Discovery,
    replication: ReplicationHandle,
    default_passivation: Duration,
    /// running entity tasks by (service, entity id): the task's generation and inbox
    active: Mutex<HashMap<(String, String), ActiveTask>>,
    next_token: std::sync::atomic::AtomicU64,
}

/// A running entity task: its generation and its inbox.
type ActiveTask = (u64, mpsc::Sender<EntityMsg>);

/// Where a dispatched request went (its entity's inbox), or why it could not go, with the
/// request's reply handed back so that the caller can fail it.
type Dispatched = Result<mpsc::Sender<EntityMsg>, (Status, Reply)>;

fn consistency(c: i32) -> Consistency {
    match CrdtWriteConsistency::try_from(c) {
        Ok(CrdtWriteConsistency::Majority) => Consistency::Majority,
        Ok(CrdtWriteConsistency::All) => Consistency::All,
        _ => Consistency::Local,
    }
}

impl Entities {
    /// The runtime for the user function at `addr`, described by `model`.
    pub fn new(
        addr: &str,
        model: UserFunctionModel,
        replication: ReplicationHandle,
        default_passivation: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
        Ok(Entities {
            inner: Arc::new(Inner {
                model: std::sync::RwLock::new(Arc::new(model)),
                channel,
                discovery: Discovery::new(addr),
                replication,
                default_passivation,
                active: Mutex::new(HashMap::new()),
                next_token: std::sync::atomic::AtomicU64::new(1),
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
    pub fn method(&self, service: &str, name: &str) -> Option<(EntityModel, MethodModel)> {
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
                    }
                    continue;
                }
            };
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

    /// Routes a command (the client's request bytes) to its entity and waits for the outcome.
    pub async fn command(&self, service: &str, method: &MethodModel, payload: Vec<u8>) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        self.dispatch(service, method, payload, Reply::Unary(reply))
            .await?;
        outcome
            .await
            .unwrap_or_else(|_| Err(Status::unknown(ENTITY_TERMINATING)))
    }

    /// Routes a server-streamed command; its messages arrive on the returned call, and dropping
    /// the call cancels it.
    pub async fn command_streamed(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
    ) -> Result<StreamedCall, Status> {
        let (tx, outcomes) = mpsc::channel(64);
        let token = self
            .inner
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entity = self
            .dispatch(service, method, payload, Reply::Streamed(tx, token))
            .await?;
        Ok(StreamedCall {
            outcomes,
            _guard: CancelGuard { entity, token },
        })
    }

    /// Sends a command to its entity (starting it if needed); returns the entity's channel.
    async fn dispatch(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        reply: Reply,
    ) -> Result<mpsc::Sender<EntityMsg>, Status> {
        let req = Request {
            method: method.clone(),
            payload,
            reply,
        };
        self.dispatch_request(service, method, req)
            .await
            .map_err(|(status, _)| status)
    }

    /// Sends a request to its entity (starting it if needed). On failure the request's reply
    /// is handed back with the reason, so that the caller can fail it.
    fn dispatch_request(
        &self,
        service: &str,
        method: &MethodModel,
        req: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Dispatched> + Send + 'static>> {
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
            let status = Status {
                code: 12,
                message: format!("unknown method {}", method.path),
            };
            return Err((status, req.reply));
        };
        let entity_id = match method.entity_id(&req.payload) {
            Ok(id) => id,
            Err(e) => {
                let status = Status {
                    code: 3,
                    message: e.to_string(),
                };
                return Err((status, req.reply));
            }
        };
        let key = (service.to_string(), entity_id.clone());
        for _ in 0..3 {
            let tx = {
                let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                match active.get(&key) {
                    Some((_, tx)) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let (tx, rx) = mpsc::channel(128);
                        let generation = self
                            .inner
                            .next_token
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        active.insert(key.clone(), (generation, tx.clone()));
                        let run: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                            Box::pin(self.clone().run_entity(
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
                    // the entity stopped (passivated) between lookup and send: start a fresh
                    // one (the stopped entity removed itself, or is about to)
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
    fn route(
        &self,
        service: &str,
        command: &str,
        payload: Option<&Any>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'static>> {
        let this = self.clone();
        let (service, command) = (service.to_string(), command.to_string());
        let bytes = payload.map(|p| p.value.clone()).unwrap_or_default();
        Box::pin(async move {
            let Some((_, method)) = this.method(&service, &command) else {
                let msg = format!(
                    "Service [{service}] unknown or it does not have a command named: [{command}]"
                );
                this.inner.discovery.report_error(&msg).await;
                return Err(Status::unknown(msg));
            };
            let method = method.clone();
            this.command(&service, &method, bytes).await
        })
    }

    async fn side_effects(&self, effects: &[SideEffect]) {
        for e in effects {
            if e.synchronous {
                let _ = self
                    .route(&e.service_name, &e.command_name, e.payload.as_ref())
                    .await;
            } else {
                let this = self.clone();
                let e = e.clone();
                tokio::spawn(async move {
                    let _ = this
                        .route(&e.service_name, &e.command_name, e.payload.as_ref())
                        .await;
                });
            }
        }
    }

    async fn run_entity(
        self,
        entity: EntityModel,
        entity_id: String,
        generation: u64,
        mut inbox: mpsc::Receiver<EntityMsg>,
    ) {
        let service = entity.service.full_name().to_string();
        let _active = ActiveEntity::new(&service);
        let key = format!("{}-{}", entity.persistence_id, entity_id);
        let replication = self.inner.replication.clone();
        let passivate_after = entity.passivation.unwrap_or(self.inner.default_passivation);
        let mut live = replication.live_replicas();
        let voters = Voters {
            me: replication.replica(),
            live: live.borrow_and_update().clone(),
        };
        let view = match replication.read(&key).await {
            Ok(Some(Entry::Deleted)) => {
                // deleted: every command fails, no stream is opened
                while let Ok(Some(msg)) = tokio::time::timeout(passivate_after, inbox.recv()).await
                {
                    if let EntityMsg::Command(r) = msg {
                        r.reply.fail(Status::unknown(ENTITY_DELETED));
                    }
                }
                self.retire(&service, &entity_id, generation, inbox).await;
                return;
            }
            Ok(Some(Entry::Value(v))) => Some(v.read(&voters)),
            Ok(None) => None,
            Err(_) => {
                // replication has stopped: the node is shutting down
                self.forget(&service, &entity_id, generation);
                inbox.close();
                while let Some(msg) = inbox.recv().await {
                    if let EntityMsg::Command(r) = msg {
                        r.reply.fail(Status {
                            code: 14,
                            message: "the node is shutting down".into(),
                        });
                    }
                }
                return;
            }
        };
        let mut changes = replication.subscribe(&key);
        let (to_uf, from_us) = mpsc::channel::<CrdtStreamIn>(128);
        let init = CrdtStreamIn {
            message: Some(crdt_stream_in::Message::Init(CrdtInit {
                service_name: service.clone(),
                entity_id: entity_id.clone(),
                delta: view.as_ref().map(initial_delta),
            })),
        };
        let _ = to_uf.send(init).await;
        // the stream is opened by its own task: a support library's gRPC server sends the
        // response headers only with its first message, and writes nothing until it has a
        // command to answer, so waiting here for the headers would wait forever
        let mut from_uf = open_handle(self.inner.channel.clone(), from_us);
        let mut run = Run {
            ents: self.clone(),
            entity_id: entity_id.clone(),
            key,
            voters,
            view,
            to_uf: Some(to_uf),
            next_id: 0,
            pending: HashMap::new(),
            streams: HashMap::new(),
            cancelling: HashMap::new(),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        // one idle deadline, moved only by activity (a command, a cancellation, a message
        // from the user function)
        let idle = tokio::time::sleep(passivate_after);
        tokio::pin!(idle);
        let reason: Option<String> = loop {
            tokio::select! {
                msg = inbox.recv() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + passivate_after);
                    match msg {
                        Some(EntityMsg::Command(r)) => {
                            if let Err(reason) = run.send_command(r).await {
                                break Some(reason);
                            }
                        }
                        Some(EntityMsg::Cancel(token)) => run.cancel(token).await,
                        None => break None,
                    }
                }
                () = &mut idle => {
                    if run.idle() {
                        // passivate: half-close, give the user function a grace period to
                        // complete its side; commands that arrive meanwhile wait in the
                        // inbox and are replayed to a fresh entity
                        run.to_uf = None;
                        let _ = tokio::time::timeout(PASSIVATION_GRACE, async {
                            while let Some(UfEvent::Message(_)) = from_uf.recv().await {}
                        })
                        .await;
                        drop(from_uf);
                        self.retire(&service, &entity_id, generation, inbox).await;
                        return;
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + passivate_after);
                }
                msg = from_uf.recv() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + passivate_after);
                    let out = match msg {
                        Some(UfEvent::Message(m)) => *m,
                        Some(UfEvent::OpenFailed(e)) => {
                            tracing::warn!(service, entity_id, error = %e, "cannot open the entity stream");
                            run.fail_all(Status::unknown(format!(
                                "user function unavailable: {}", e.message())));
                            break Some(format!("cannot open the entity stream: {}", e.message()));
                        }
                        Some(UfEvent::Failed(e)) => break Some(format!("the entity stream failed: {}", e.message())),
                        None => break Some("the user function ended the entity stream".into()),
                    };
                    match run.on_message(out).await {
                        Ok(true) => {
                            // deleted: the stream is half-closed, later commands find the
                            // tombstone; let the user function complete its side
                            run.close_streams();
                            self.forget(&service, &entity_id, generation);
                            let _ = tokio::time::timeout(PASSIVATION_GRACE, async {
                                while let Some(UfEvent::Message(_)) = from_uf.recv().await {}
                            })
                            .await;
                            drop(from_uf);
                            self.retire(&service, &entity_id, generation, inbox).await;
                            return;
                        }
                        Ok(false) => {}
                        Err(reason) => break Some(reason),
                    }
                    if run.push_if_idle().await {
                        break Some(String::new());
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() { break None; }
                    if run.push_if_idle().await {
                        break Some(String::new());
                    }
                }
                changed = live.changed() => {
                    if changed.is_err() { break None; }
                    run.voters.live = live.borrow_and_update().clone();
                    if run.push_if_idle().await {
                        break Some(String::new());
                    }
                }
                _ = tick.tick() => {
                    if run.expire_cancellations() && run.push_if_idle().await {
                        break Some(String::new());
                    }
                }
            }
        };
        self.forget(&service, &entity_id, generation);
        let inbox_left = inbox;
        match reason {
            // deleted elsewhere: the user function was told and the stream half-closed; give
            // it a grace period to complete (dropping the call now would cancel it before the
            // `delete` arrives). Later commands find the tombstone.
            Some(reason) if reason.is_empty() => {
                run.close_streams();
                for (_, client) in run.pending.drain() {
                    client.fail(Status::unknown(ENTITY_DELETED));
                }
                let _ = tokio::time::timeout(PASSIVATION_GRACE, async {
                    while let Some(UfEvent::Message(_)) = from_uf.recv().await {}
                })
                .await;
            }
            Some(reason) => {
                tracing::warn!(service, entity_id, reason, "entity terminated");
                run.terminate();
                self.inner.discovery.report_error(&reason).await;
            }
            None => {}
        }
        drop(from_uf);
        self.retire(&service, &entity_id, generation, inbox_left)
            .await;
    }

    /// The entity task ends: it is removed from the active entities, its inbox is closed,
    /// and commands that were queued in it meanwhile are routed again (to a fresh entity,
    /// which opens a new stream).
    async fn retire(
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
    fn forget(&self, service: &str, entity_id: &str, generation: u64) {
        let key = (service.to_string(), entity_id.to_string());
        let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.get(&key).is_some_and(|(g, _)| *g == generation) {
            active.remove(&key);
        }
    }
}

/// Counts an entity task in `latticed_entities_active{service}` while it lives.
struct ActiveEntity(metrics::Gauge);

impl ActiveEntity {
    fn new(service: &str) -> Self {
        let g = metrics::gauge!(crate::metrics::ENTITIES_ACTIVE, "service" => service.to_string());
        g.increment(1.0);
        ActiveEntity(g)
    }
}

impl Drop for ActiveEntity {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// What the task reading the user function's half of `handle` reports.
enum UfEvent {
    /// a message from the user function
    Message(Box<CrdtStreamOut>),
    /// the stream could not be opened (nothing was received on it)
    OpenFailed(tonic::Status),
    /// the stream failed after it was open
    Failed(tonic::Status),
}

/// Opens `Crdt/handle` in a task of its own, writing `outgoing` as it comes, and returns
/// what the user function sends. Nothing waits for the response headers: support libraries'
/// gRPC servers send them only with their first message. Dropping the returned receiver
/// cancels the call. The channel ends (`None`) when the user function completes its side.
fn open_handle(
    channel: tonic::transport::Channel,
    outgoing: mpsc::Receiver<CrdtStreamIn>,
) -> mpsc::Receiver<UfEvent> {
    let (events, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut client = CrdtClient::new(channel);
        let call = client.handle(ReceiverStream::new(outgoing));
        let mut stream = tokio::select! {
            r = call => match r {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    let _ = events.send(UfEvent::OpenFailed(e)).await;
                    return;
                }
            },
            () = events.closed() => return,
        };
        loop {
            let next = tokio::select! {
                n = stream.message() => n,
                () = events.closed() => return,
            };
            let event = match next {
                Ok(Some(m)) => UfEvent::Message(Box::new(m)),
                Ok(None) => return,
                Err(e) => UfEvent::Failed(e),
            };
            let failed = matches!(event, UfEvent::Failed(_));
            if events.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// One entity's running state.
struct Run {
    ents: Entities,
    entity_id: String,
    key: String,
    voters: Voters,
    /// what the user function holds
    view: Option<UserValue>,
    /// our half of the stream (`None` once half-closed)
    to_uf: Option<mpsc::Sender<CrdtStreamIn>>,
    next_id: i64,
    /// commands sent, awaiting their reply
    pending: HashMap<i64, Reply>,
    /// open streamed calls: command id -> (client, token)
    streams: HashMap<i64, (mpsc::Sender<Outcome>, u64)>,
    /// `stream_cancelled` sent, response awaited until the deadline
    cancelling: HashMap<i64, tokio::time::Instant>,
}

fn reply_message(
    action: Option<latticed_proto::cloudstate::ClientAction>,
) -> Option<Result<Option<Vec<u8>>, Status>> {
    match action.and_then(|a| a.action) {
        None => None,
        Some(client_action::Action::Reply(r)) => {
            Some(Ok(Some(r.payload.map(|p| p.value).unwrap_or_default())))
        }
        Some(client_action::Action::Failure(f)) => Some(Err(Status::unknown(f.description))),
        Some(client_action::Action::Forward(_)) => None,
    }
}

impl Run {
    fn idle(&self) -> bool {
        self.pending.is_empty() && self.cancelling.is_empty() && self.streams.is_empty()
    }

    async fn send(&self, msg: crdt_stream_in::Message) -> Result<(), String> {
        let Some(tx) = &self.to_uf else {
            return Err("the entity stream is closed".into());
        };
        tx.send(CrdtStreamIn { message: Some(msg) })
            .await
            .map_err(|_| "the user function closed the entity stream".to_string())
    }

    async fn send_command(&mut self, r: Request) -> Result<(), String> {
        self.next_id += 1;
        let id = self.next_id;
        let cmd = Command {
            entity_id: self.entity_id.clone(),
            id,
            name: r.method.name.clone(),
            payload: Some(Any {
                type_url: format!("type.googleapis.com/{}", r.method.input.full_name()),
                value: r.payload,
            }),
            streamed: r.method.streamed,
            metadata: None,
        };
        // a streamed call is registered before its command is sent: a streamed message may
        // arrive before the reply
        if let Reply::Streamed(tx, token) = &r.reply {
            self.streams.insert(id, (tx.clone(), *token));
        }
        self.pending.insert(id, r.reply);
        self.send(crdt_stream_in::Message::Command(cmd)).await
    }

    async fn cancel(&mut self, token: u64) {
        let Some(id) = self
            .streams
            .iter()
            .find(|(_, (_, t))| *t == token)
            .map(|(id, _)| *id)
        else {
            return;
        };
        self.cancel_call(id).await;
    }

    /// The client of streamed call `id` went away: tell the user function.
    async fn cancel_call(&mut self, id: i64) {
        if self.streams.remove(&id).is_none() {
            return;
        }
        self.cancelling
            .insert(id, tokio::time::Instant::now() + CANCEL_WAIT);
        let msg =
            crdt_stream_in::Message::StreamCancelled(latticed_proto::cloudstate::StreamCancelled {
                entity_id: self.entity_id.clone(),
                id,
            });
        if self.send(msg).await.is_err() {
            self.cancelling.remove(&id);
        }
    }

    /// Sends a message to streamed call `id`'s client; a client found gone is cancelled (in
    /// case its cancellation notice was lost).
    async fn send_to_client(&mut self, id: i64, tx: &mpsc::Sender<Outcome>, msg: Option<Vec<u8>>) {
        if tx.send(Ok(msg)).await.is_err() {
            self.cancel_call(id).await;
        }
    }

    /// Drops cancellations whose response is overdue; returns whether any was.
    fn expire_cancellations(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let before = self.cancelling.len();
        self.cancelling.retain(|_, deadline| now < *deadline);
        before != self.cancelling.len()
    }

    /// Pushes what changed since the user function's view, if nothing is outstanding. Returns
    /// whether the key was deleted (elsewhere): the user function is told with `delete` and
    /// the stream half-closed.
    async fn push_if_idle(&mut self) -> bool {
        if !self.pending.is_empty() || !self.cancelling.is_empty() || self.to_uf.is_none() {
            return false;
        }
        let v = match self.ents.inner.replication.read(&self.key).await {
            Ok(Some(Entry::Value(v))) => v,
            Ok(Some(Entry::Deleted)) => {
                let _ = self
                    .send(crdt_stream_in::Message::Delete(
                        latticed_proto::cloudstate::crdt::CrdtDelete {},
                    ))
                    .await;
                self.to_uf = None;
                return true;
            }
            _ => return false,
        };
        let now = v.read(&self.voters);
        let delta = match &self.view {
            None => Some(initial_delta(&now)),
            Some(old) => match diff(old, &now) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(key = self.key, error = %e, "cannot express a change to the user function");
                    None
                }
            },
        };
        if let Some(d) = delta {
            let _ = self.send(crdt_stream_in::Message::Delta(d)).await;
        }
        self.view = Some(now);
        false
    }

    /// Applies a state action: the user function's view first (it already changed its value),
    /// then replication at the requested consistency. Returns a failure for the client, and
    /// whether the entity was deleted.
    async fn apply_state_action(
        &mut self,
        action: Option<&latticed_proto::cloudstate::crdt::CrdtStateAction>,
    ) -> (Option<Status>, bool) {
        let Some(action) = action else {
            return (None, false);
        };
        let c = consistency(action.write_consistency);
        let repl = &self.ents.inner.replication;
        let (result, deleted) = match &action.action {
            Some(crdt_state_action::Action::Update(d)) => {
                match &mut self.view {
                    Some(v) => {
                        let _ = v.apply(d, Origin::UserFunction);
                    }
                    None => self.view = UserValue::from_delta(d, Origin::UserFunction).ok(),
                }
                (repl.write(&self.key, d.clone(), c).await, false)
            }
            Some(crdt_state_action::Action::Delete(_)) => (repl.delete(&self.key, c).await, true),
            None => (Ok(Ok(())), false),
        };
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(WriteError::Invalid(e))) => {
                let msg = format!("Invalid state action for {}: {e}", self.key);
                self.ents.inner.discovery.report_error(&msg).await;
                Some(Status::unknown(msg))
            }
            Ok(Err(e)) => Some(Status::unknown(e.to_string())),
            Err(_) => Some(Status::unknown(ENTITY_TERMINATING)),
        };
        (failure, deleted)
    }

    /// Handles a message from the user function; `Ok(true)` when the entity was deleted.
    async fn on_message(
        &mut self,
        out: latticed_proto::cloudstate::crdt::CrdtStreamOut,
    ) -> Result<bool, String> {
        match out.message {
            Some(crdt_stream_out::Message::Reply(reply)) => {
                let id = reply.command_id;
                let Some(client) = self.pending.remove(&id) else {
                    return Err(format!(
                        "Received reply for entity id {} for unknown command {id}",
                        self.entity_id
                    ));
                };
                let (failure, deleted) = self.apply_state_action(reply.state_action.as_ref()).await;
                if deleted {
                    self.to_uf = None;
                }
                if let Some(status) = failure {
                    self.streams.remove(&id);
                    client.fail(status);
                    return Ok(deleted);
                }
                self.ents.side_effects(&reply.side_effects).await;
                self.deliver(id, client, reply).await;
                Ok(deleted)
            }
            Some(crdt_stream_out::Message::StreamedMessage(m)) => {
                let Some((tx, _)) = self.streams.get(&m.command_id).cloned() else {
                    let msg = format!(
                        "Received streamed message for unknown command id: {}",
                        m.command_id
                    );
                    self.ents.inner.discovery.report_error(&msg).await;
                    return Ok(false);
                };
                self.ents.side_effects(&m.side_effects).await;
                match reply_message(m.client_action) {
                    Some(Ok(msg)) => self.send_to_client(m.command_id, &tx, msg).await,
                    Some(Err(status)) => {
                        let _ = tx.send(Err(status)).await;
                        self.streams.remove(&m.command_id);
                    }
                    None => {}
                }
                if m.end_stream {
                    self.streams.remove(&m.command_id);
                }
                Ok(false)
            }
            Some(crdt_stream_out::Message::StreamCancelledResponse(r)) => {
                let (failure, _) = self.apply_state_action(r.state_action.as_ref()).await;
                if let Some(f) = failure {
                    tracing::warn!(
                        key = self.key,
                        error = f.message,
                        "state action of a cancellation failed"
                    );
                }
                self.ents.side_effects(&r.side_effects).await;
                self.cancelling.remove(&r.command_id);
                Ok(false)
            }
            Some(crdt_stream_out::Message::Failure(f)) if f.command_id != 0 => {
                self.streams.remove(&f.command_id);
                if let Some(client) = self.pending.remove(&f.command_id) {
                    client.fail(Status::unknown(f.description));
                }
                Ok(false)
            }
            Some(crdt_stream_out::Message::Failure(f)) => {
                Err(format!("stream-level failure: {}", f.description))
            }
            None => Err("an empty message from the user function".into()),
        }
    }

    /// Sends a reply's client action to its client.
    async fn deliver(&mut self, id: i64, client: Reply, reply: CrdtReply) {
        let forward = match reply.client_action.as_ref().and_then(|a| a.action.as_ref()) {
            Some(client_action::Action::Forward(f)) => Some(f.clone()),
            _ => None,
        };
        match client {
            Reply::Unary(tx) => {
                if let Some(f) = forward {
                    let route =
                        self.ents
                            .route(&f.service_name, &f.command_name, f.payload.as_ref());
                    tokio::spawn(async move {
                        let _ = tx.send(route.await);
                    });
                    return;
                }
                let _ = tx.send(reply_message(reply.client_action).unwrap_or(Ok(None)));
            }
            Reply::Streamed(tx, _) => {
                if let Some(f) = forward {
                    let route =
                        self.ents
                            .route(&f.service_name, &f.command_name, f.payload.as_ref());
                    let stream = tx.clone();
                    tokio::spawn(async move {
                        let _ = stream.send(route.await).await;
                    });
                } else {
                    match reply_message(reply.client_action) {
                        Some(Ok(msg)) => self.send_to_client(id, &tx, msg).await,
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            self.streams.remove(&id);
                        }
                        // an empty reply still opens the client stream
                        None => {}
                    }
                }
                if !reply.streamed {
                    self.streams.remove(&id);
                }
            }
        }
    }

    /// Completes every open streamed call (the entity was deleted).
    fn close_streams(&mut self) {
        self.streams.clear();
    }

    /// Fails every outstanding command and open streamed call with `status`.
    fn fail_all(&mut self, status: Status) {
        for (_, client) in self.pending.drain() {
            client.fail(status.clone());
        }
        for (_, (tx, _)) in self.streams.drain() {
            let _ = tx.try_send(Err(status.clone()));
        }
    }

    /// Fails everything outstanding: the entity stopped unexpectedly.
    fn terminate(&mut self) {
        for (_, client) in self.pending.drain() {
            client.fail(Status::unknown(ENTITY_TERMINATING));
        }
        for (_, (tx, _)) in self.streams.drain() {
            let _ = tx.try_send(Err(Status::unknown(ENTITY_TERMINATING)));
        }
    }
}
