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
//! Not yet: server-streamed commands and `stream_cancelled`, membership-driven vote tallies
//! (votes are tallied over the replicas that have voted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use latticed_crdt::{diff, initial_delta, Origin, UserValue, Voters};
use latticed_proto::cloudstate::crdt::crdt_client::CrdtClient;
use latticed_proto::cloudstate::crdt::{
    crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtInit, CrdtReply, CrdtStreamIn,
    CrdtWriteConsistency,
};
use latticed_proto::cloudstate::{client_action, Command, SideEffect};
use latticed_proto::wkt::Any;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

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

struct Request {
    method: MethodModel,
    payload: Vec<u8>,
    reply: oneshot::Sender<Outcome>,
}

/// Every active entity of one user function, and how to route commands to them.
#[derive(Clone)]
pub struct Entities {
    inner: Arc<Inner>,
}

struct Inner {
    model: UserFunctionModel,
    channel: tonic::transport::Channel,
    discovery: Discovery,
    replication: ReplicationHandle,
    default_passivation: Duration,
    active: Mutex<HashMap<(String, String), mpsc::Sender<Request>>>,
}

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
                model,
                channel,
                discovery: Discovery::new(addr),
                replication,
                default_passivation,
                active: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The user function's model.
    pub fn model(&self) -> &UserFunctionModel {
        &self.inner.model
    }

    /// Looks up a method by service and simple name.
    pub fn method(&self, service: &str, name: &str) -> Option<(&EntityModel, &MethodModel)> {
        self.inner
            .model
            .entities
            .iter()
            .filter(|e| e.service.full_name() == service)
            .find_map(|e| e.methods.iter().find(|m| m.name == name).map(|m| (e, m)))
    }

    /// Routes a command (the client's request bytes) to its entity and waits for the outcome.
    pub async fn command(&self, service: &str, method: &MethodModel, payload: Vec<u8>) -> Outcome {
        let Some((entity, _)) = self.method(service, &method.name) else {
            return Err(Status {
                code: 12,
                message: format!("unknown method {}", method.path),
            });
        };
        let entity_id = method.entity_id(&payload).map_err(|e| Status {
            code: 3,
            message: e.to_string(),
        })?;
        let key = (service.to_string(), entity_id.clone());
        for _ in 0..2 {
            let tx = {
                let mut active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                match active.get(&key) {
                    Some(tx) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let (tx, rx) = mpsc::channel(128);
                        active.insert(key.clone(), tx.clone());
                        let run: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                            Box::pin(self.clone().run_entity(
                                entity.clone(),
                                entity_id.clone(),
                                rx,
                            ));
                        tokio::spawn(run);
                        tx
                    }
                }
            };
            let (reply, outcome) = oneshot::channel();
            let req = Request {
                method: method.clone(),
                payload: payload.clone(),
                reply,
            };
            if tx.send(req).await.is_ok() {
                return outcome
                    .await
                    .unwrap_or_else(|_| Err(Status::unknown(ENTITY_TERMINATING)));
            }
            // the entity stopped (passivated) between lookup and send: start a fresh one
            self.inner
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        Err(Status::unknown(ENTITY_TERMINATING))
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
        mut requests: mpsc::Receiver<Request>,
    ) {
        let service = entity.service.full_name().to_string();
        let key = format!("{}-{}", entity.persistence_id, entity_id);
        let replication = self.inner.replication.clone();
        let voters = Voters::alone(replication.replica());
        let passivate_after = entity.passivation.unwrap_or(self.inner.default_passivation);
        let read = |entry: Option<Entry>| -> Result<Option<UserValue>, ()> {
            match entry {
                Some(Entry::Deleted) => Err(()),
                Some(Entry::Value(v)) => Ok(Some(v.read(&voters))),
                None => Ok(None),
            }
        };
        let mut view = match replication.read(&key).await.map(read) {
            Ok(Ok(v)) => v,
            Ok(Err(())) => {
                // deleted: every command fails
                while let Ok(Some(r)) = tokio::time::timeout(passivate_after, requests.recv()).await
                {
                    let _ = r.reply.send(Err(Status::unknown(ENTITY_DELETED)));
                }
                return;
            }
            Err(_) => return,
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
        let mut client = CrdtClient::new(self.inner.channel.clone());
        let mut from_uf = match client.handle(ReceiverStream::new(from_us)).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(service, entity_id, error = %e, "cannot open the entity stream");
                while let Ok(r) = requests.try_recv() {
                    let _ = r.reply.send(Err(Status::unknown(format!(
                        "user function unavailable: {}",
                        e.message()
                    ))));
                }
                return;
            }
        };
        let mut next_id: i64 = 0;
        let mut outstanding: HashMap<i64, oneshot::Sender<Outcome>> = HashMap::new();
        let send_cmd = |id: i64, r: &Request| CrdtStreamIn {
            message: Some(crdt_stream_in::Message::Command(Command {
                entity_id: entity_id.clone(),
                id,
                name: r.method.name.clone(),
                payload: Some(Any {
                    type_url: format!("type.googleapis.com/{}", r.method.input.full_name()),
                    value: r.payload.clone(),
                }),
                streamed: r.method.streamed,
                metadata: None,
            })),
        };
        let crash = |reason: String, outstanding: &mut HashMap<i64, oneshot::Sender<Outcome>>| {
            tracing::warn!(service, entity_id, reason, "entity terminated");
            for (_, r) in outstanding.drain() {
                let _ = r.send(Err(Status::unknown(ENTITY_TERMINATING)));
            }
            reason
        };
        let reason: Option<String> = loop {
            tokio::select! {
                r = tokio::time::timeout(passivate_after, requests.recv()), if true => match r {
                    Ok(Some(r)) => {
                        next_id += 1;
                        if to_uf.send(send_cmd(next_id, &r)).await.is_err() {
                            let _ = r.reply.send(Err(Status::unknown(ENTITY_TERMINATING)));
                            break Some(crash("the user function closed the stream".into(), &mut outstanding));
                        }
                        outstanding.insert(next_id, r.reply);
                    }
                    Ok(None) => break None,
                    Err(_) if outstanding.is_empty() => {
                        // passivate: half-close, give the user function a grace period
                        drop(to_uf);
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            while let Some(Ok(_)) = from_uf.next().await {}
                        }).await;
                        self.forget(&service, &entity_id);
                        return;
                    }
                    Err(_) => {}
                },
                msg = from_uf.next() => {
                    let out = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => break Some(crash(format!("stream failed: {}", e.message()), &mut outstanding)),
                        None => break Some(crash("the user function ended the stream".into(), &mut outstanding)),
                    };
                    match out.message {
                        Some(crdt_stream_out::Message::Reply(reply)) => {
                            let Some(client) = outstanding.remove(&reply.command_id) else {
                                break Some(crash(format!(
                                    "Received reply for entity id {entity_id} for unknown command {}", reply.command_id
                                ), &mut outstanding));
                            };
                            let deleted = self.apply_reply(&key, &mut view, reply, client).await;
                            if deleted {
                                // half-close; later commands find the tombstone
                                self.forget(&service, &entity_id);
                                return;
                            }
                        }
                        Some(crdt_stream_out::Message::Failure(f)) if f.command_id != 0 => {
                            if let Some(client) = outstanding.remove(&f.command_id) {
                                let _ = client.send(Err(Status::unknown(f.description)));
                            }
                        }
                        Some(crdt_stream_out::Message::Failure(f)) => {
                            break Some(crash(format!("stream-level failure: {}", f.description), &mut outstanding));
                        }
                        Some(_) => {
                            break Some(crash("streamed commands are not supported yet".into(), &mut outstanding));
                        }
                        None => break Some(crash("an empty message from the user function".into(), &mut outstanding)),
                    }
                    if outstanding.is_empty() {
                        self.push_diff(&key, &voters, &mut view, &to_uf).await;
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() { break None; }
                    if outstanding.is_empty() {
                        self.push_diff(&key, &voters, &mut view, &to_uf).await;
                    }
                }
            }
        };
        self.forget(&service, &entity_id);
        if let Some(reason) = reason {
            self.inner.discovery.report_error(&reason).await;
        }
    }

    fn forget(&self, service: &str, entity_id: &str) {
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(service.to_string(), entity_id.to_string()));
    }

    /// Pushes what changed in the replicated value since the user function's view.
    async fn push_diff(
        &self,
        key: &str,
        voters: &Voters,
        view: &mut Option<UserValue>,
        to_uf: &mpsc::Sender<CrdtStreamIn>,
    ) {
        let Ok(Some(Entry::Value(v))) = self.inner.replication.read(key).await else {
            return;
        };
        let now = v.read(voters);
        let delta = match view {
            None => Some(initial_delta(&now)),
            Some(old) => match diff(old, &now) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot express a change to the user function");
                    None
                }
            },
        };
        if let Some(d) = delta {
            let _ = to_uf
                .send(CrdtStreamIn {
                    message: Some(crdt_stream_in::Message::Delta(d)),
                })
                .await;
        }
        *view = Some(now);
    }

    /// Applies a reply: state action through replication, then side effects, then the client.
    /// Returns whether the entity was deleted.
    async fn apply_reply(
        &self,
        key: &str,
        view: &mut Option<UserValue>,
        reply: CrdtReply,
        client: oneshot::Sender<Outcome>,
    ) -> bool {
        let mut deleted = false;
        if let Some(action) = &reply.state_action {
            let c = consistency(action.write_consistency);
            let result = match &action.action {
                Some(crdt_state_action::Action::Update(d)) => {
                    // the user function already applied its delta to its own value
                    match view {
                        Some(v) => {
                            let _ = v.apply(d, Origin::UserFunction);
                        }
                        None => *view = UserValue::from_delta(d, Origin::UserFunction).ok(),
                    }
                    self.inner.replication.write(key, d.clone(), c).await
                }
                Some(crdt_state_action::Action::Delete(_)) => {
                    deleted = true;
                    self.inner.replication.delete(key, c).await
                }
                None => Ok(Ok(())),
            };
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(WriteError::Invalid(e))) => {
                    let msg = format!("Invalid state action for {key}: {e}");
                    self.inner.discovery.report_error(&msg).await;
                    Some(msg)
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(ENTITY_TERMINATING.to_string()),
            };
            if let Some(msg) = failure {
                let _ = client.send(Err(Status::unknown(msg)));
                return deleted;
            }
        }
        self.side_effects(&reply.side_effects).await;
        let outcome = match reply.client_action.and_then(|a| a.action) {
            None => Ok(None),
            Some(client_action::Action::Reply(r)) => {
                Ok(Some(r.payload.map(|p| p.value).unwrap_or_default()))
            }
            Some(client_action::Action::Failure(f)) => Err(Status::unknown(f.description)),
            Some(client_action::Action::Forward(f)) => {
                let this = self.clone();
                tokio::spawn(async move {
                    let outcome = this
                        .route(&f.service_name, &f.command_name, f.payload.as_ref())
                        .await;
                    let _ = client.send(outcome);
                });
                return deleted;
            }
        };
        let _ = client.send(outcome);
        deleted
    }
}
