//! The tokio shell of one entity: it moves messages between the [`Machine`] and the world.
//!
//! Owns the entity's IO: its inbox, the `Crdt/handle` call (polled with the rest, never
//! awaited alone, so that nothing waits for response headers), the clients' reply channels, the writes and
//! synchronous side effects in flight (polled together, never awaited one at a time), the
//! replicated key's change notifications, membership, and the machine's timer. It makes no
//! protocol decision: every one is the machine's.

use std::collections::HashMap;
use std::time::Instant;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use latticed_crdt::Voters;
use latticed_proto::cloudstate::crdt::crdt_client::CrdtClient;
use latticed_proto::cloudstate::crdt::{CrdtStreamIn, CrdtStreamOut};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::machine::{
    ClientId, CommandIn, Config, EndReason, Input, Machine, OpId, Output, UfEnd, WriteFailure,
};
use super::router::{BoxFuture, Entities, EntityMsg, Reply};
use super::status::{Outcome, Status};
use super::streamed::Sent;
use crate::replication::{HandleError, WriteError, Writer};
use crate::userfn::pool::Lease;
use crate::userfn::spec::EntityModel;

/// Messages to the user function that may wait in the call's buffer; beyond, the user function
/// is not reading its stream and the entity fails.
const TO_UF_BUFFER: usize = 256;

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

/// What the user function's half of `handle` delivered.
enum UfEvent {
    Message(Box<CrdtStreamOut>),
    Ended(UfEnd),
}

/// The `Crdt/handle` call, polled by the entity task itself: a task of its own reading the
/// stream would add a task hop to every reply. Dropping it cancels the call, and gives the
/// stream's place on its connection back (the [`Lease`]).
enum UfCall {
    /// not open, or ended
    Closed,
    /// opened: resolves when the user function sends its response headers, which support
    /// libraries' gRPC servers send only with their first message, so nothing waits for it;
    /// `init` and commands go into the request stream meanwhile
    Opening(
        BoxFuture<Result<tonic::Response<tonic::Streaming<CrdtStreamOut>>, tonic::Status>>,
        Lease,
    ),
    /// its headers came: messages are read as they come
    Open {
        stream: Box<tonic::Streaming<CrdtStreamOut>>,
        /// held while the stream lives
        _lease: Lease,
    },
}

impl UfCall {
    /// Opens `Crdt/handle` on `lease`'s connection, writing `outgoing` as it comes.
    fn open(lease: Lease, max_message: usize, outgoing: mpsc::Receiver<CrdtStreamIn>) -> UfCall {
        let mut client = CrdtClient::new(lease.channel.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let opening = Box::pin(async move { client.handle(ReceiverStream::new(outgoing)).await });
        UfCall::Opening(opening, lease)
    }

    /// The next thing the user function says (pending while closed). Cancel safe: the opening
    /// call and the stream live in `self`, and `Streaming::message` is cancel safe.
    async fn next(&mut self) -> UfEvent {
        loop {
            match self {
                UfCall::Closed => return std::future::pending().await,
                UfCall::Opening(opening, _) => {
                    let opened = opening.await;
                    if let UfCall::Opening(_, lease) = std::mem::replace(self, UfCall::Closed) {
                        match opened {
                            Ok(r) => {
                                *self = UfCall::Open {
                                    stream: Box::new(r.into_inner()),
                                    _lease: lease,
                                }
                            }
                            Err(e) => {
                                let reason = e.message().to_string();
                                return UfEvent::Ended(UfEnd::OpenFailed(reason));
                            }
                        }
                    }
                }
                UfCall::Open { stream, .. } => {
                    let event = match stream.message().await {
                        Ok(Some(m)) => return UfEvent::Message(Box::new(m)),
                        Ok(None) => UfEvent::Ended(UfEnd::Completed),
                        Err(e) => UfEvent::Ended(UfEnd::Failed(e.message().to_string())),
                    };
                    *self = UfCall::Closed;
                    return event;
                }
            }
        }
    }
}

/// A client as the shell holds it.
enum Client {
    Unary(oneshot::Sender<Outcome>),
    Streamed(super::streamed::StreamSink),
}

/// The entity's IO.
struct Shell {
    ents: Entities,
    key: String,
    /// this entity task's name in its own writes' change notices
    writer: Writer,
    /// our half of the call (`None`: closed or not open)
    to_uf: Option<mpsc::Sender<CrdtStreamIn>>,
    /// the user function's half
    from_uf: UfCall,
    clients: HashMap<ClientId, Client>,
    /// streamed calls' cancellation tokens
    tokens: HashMap<u64, ClientId>,
    next_client: ClientId,
    writes: FuturesUnordered<BoxFuture<(OpId, Result<(), WriteFailure>)>>,
    effects: FuturesUnordered<BoxFuture<OpId>>,
}

fn write_failure(r: Result<Result<(), WriteError>, HandleError>) -> Result<(), WriteFailure> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(WriteError::Invalid(e))) => Err(WriteFailure::Invalid(e.to_string())),
        Ok(Err(WriteError::Deleted)) => Err(WriteFailure::Deleted),
        Ok(Err(e @ WriteError::Consistency)) => Err(WriteFailure::Consistency(e.to_string())),
        Err(HandleError::Stopped) => Err(WriteFailure::Stopped),
    }
}

impl Shell {
    /// Carries out one output; may feed the machine (a read's answer, a broken stream).
    async fn carry_out(&mut self, machine: &mut Machine, output: Output) {
        match output {
            Output::OpenUf => {
                let (tx, rx) = mpsc::channel(TO_UF_BUFFER);
                let lease = self.ents.inner.connections.lease();
                let max = self.ents.inner.config.max_message_from_uf;
                self.from_uf = UfCall::open(lease, max, rx);
                self.to_uf = Some(tx);
            }
            Output::ToUf(m) => {
                let full = match &self.to_uf {
                    Some(tx) => tx.try_send(m).is_err(),
                    None => false,
                };
                if full {
                    self.to_uf = None;
                    let end = UfEnd::Failed("the user function does not read its stream".into());
                    machine.handle(Instant::now(), Input::UfEnded(end));
                }
            }
            Output::CloseUf => self.to_uf = None,
            Output::CancelUf => {
                self.to_uf = None;
                self.from_uf = UfCall::Closed;
            }
            Output::ReadReplicated(part) => {
                let input = match self.ents.inner.replication.read_part(&self.key, part).await {
                    Ok(entry) => Input::Replicated(entry),
                    Err(HandleError::Stopped) => {
                        machine.shutdown();
                        return;
                    }
                };
                machine.handle(Instant::now(), input);
            }
            Output::Write {
                op,
                delta,
                consistency,
            } => {
                let repl = self.ents.inner.replication.clone();
                // queued to replication now, so that later reads see it; awaited with the rest
                let submitted = repl
                    .submit_write(&self.key, delta, consistency, self.writer)
                    .await;
                self.track_write(op, submitted);
            }
            Output::Delete { op, consistency } => {
                let repl = self.ents.inner.replication.clone();
                let submitted = repl
                    .submit_delete(&self.key, consistency, self.writer)
                    .await;
                self.track_write(op, submitted);
            }
            Output::Route {
                op,
                reply_to,
                service,
                command,
                payload,
            } => {
                let route = self.ents.route(&service, &command, payload.as_ref());
                match (op, reply_to) {
                    (Some(op), _) => self.effects.push(Box::pin(async move {
                        let _ = route.await;
                        op
                    })),
                    (None, Some(client)) => self.forward(client, route),
                    (None, None) => {
                        tokio::spawn(route);
                    }
                }
            }
            Output::Reply { client, outcome } => {
                if let Some(Client::Unary(tx)) = self.clients.remove(&client) {
                    let _ = tx.send(outcome);
                }
            }
            Output::Stream {
                client,
                message,
                headers,
            } => {
                if let Some(Client::Streamed(sink)) = self.clients.get_mut(&client) {
                    sink.send_headers(headers);
                }
                let Some(message) = message else { return };
                if let Some(Client::Streamed(sink)) = self.clients.get(&client) {
                    if sink.send(Ok(Some(message))) == Sent::Gone {
                        self.clients.remove(&client);
                        self.tokens.retain(|_, c| *c != client);
                        machine.handle(Instant::now(), Input::ClientGone(client));
                    }
                }
            }
            Output::EndStream { client, failure } => {
                self.tokens.retain(|_, c| *c != client);
                match (self.clients.remove(&client), failure) {
                    (Some(Client::Streamed(sink)), Some(status)) => sink.fail(status),
                    (Some(Client::Unary(tx)), Some(status)) => {
                        let _ = tx.send(Err(status));
                    }
                    // dropping the sink ends the call OK
                    _ => {}
                }
            }
            Output::ReportError(msg) => {
                let discovery = self.ents.inner.discovery.clone();
                tokio::spawn(async move { discovery.report_error(&msg).await });
            }
            Output::Stopped(_) => {}
        }
    }

    /// Polls a queued write (or delete) with the others until its consistency is settled.
    fn track_write(
        &mut self,
        op: OpId,
        submitted: Result<crate::replication::WriteCompletion, HandleError>,
    ) {
        self.writes.push(Box::pin(async move {
            let r = match submitted {
                Ok(done) => done.await.map_err(|_| HandleError::Stopped),
                Err(e) => Err(e),
            };
            (op, write_failure(r))
        }));
    }

    /// A forward: the routed command's outcome goes to the client.
    fn forward(&mut self, client: ClientId, route: BoxFuture<Outcome>) {
        match self.clients.remove(&client) {
            Some(Client::Unary(tx)) => {
                tokio::spawn(async move {
                    let _ = tx.send(route.await);
                });
            }
            Some(Client::Streamed(mut sink)) => {
                // the forwarded reply is one element of the stream; its headers come too late
                // for the call's response headers, which go now
                sink.send_headers(Vec::new());
                let tx = sink.sender();
                self.clients.insert(client, Client::Streamed(sink));
                tokio::spawn(async move {
                    let _ = tx.send(route.await.map(|r| r.message)).await;
                });
            }
            None => {
                tokio::spawn(route);
            }
        }
    }

    fn accept(&mut self, msg: EntityMsg) -> Option<Input> {
        match msg {
            EntityMsg::Command(r) => {
                self.next_client += 1;
                let client = self.next_client;
                let streamed = match r.reply {
                    Reply::Unary(tx) => {
                        self.clients.insert(client, Client::Unary(tx));
                        false
                    }
                    Reply::Streamed(sink, token) => {
                        self.tokens.insert(token, client);
                        self.clients.insert(client, Client::Streamed(sink));
                        true
                    }
                };
                Some(Input::Command(CommandIn {
                    client,
                    name: r.method.name.clone(),
                    input_type: r.method.input.full_name().to_string(),
                    payload: r.payload,
                    streamed,
                }))
            }
            EntityMsg::Cancel(token) => {
                // the client is gone: nothing more goes to it, so its sink goes now
                let client = self.tokens.remove(&token)?;
                self.clients.remove(&client);
                Some(Input::ClientGone(client))
            }
            EntityMsg::Drain => Some(Input::Drain),
        }
    }
}

/// Runs one entity until it stops.
pub(crate) async fn run(
    ents: Entities,
    entity: std::sync::Arc<EntityModel>,
    entity_id: String,
    generation: u64,
    mut inbox: mpsc::Receiver<EntityMsg>,
) {
    let service = entity.service.full_name().to_string();
    let _active = ActiveEntity::new(&service);
    let key = format!("{}-{}", entity.persistence_id, entity_id);
    let replication = ents.inner.replication.clone();
    let mut live = replication.live_replicas();
    let voters = Voters {
        me: replication.replica(),
        live: live.borrow_and_update().clone(),
    };
    let mut changes = replication.subscribe(&key);
    let mut seen = changes.borrow_and_update().changes;
    let config = Config {
        passivate_after: entity
            .passivation
            .unwrap_or(ents.inner.config.passivate_after),
        ..ents.inner.config.clone()
    };
    let mut machine = Machine::new(&service, &entity_id, &key, config, voters, Instant::now());
    if ents.is_draining() {
        // started by a replay or a side effect while the node shuts down
        machine.handle(Instant::now(), Input::Drain);
    }
    let mut shell = Shell {
        ents: ents.clone(),
        key,
        writer: generation,
        to_uf: None,
        from_uf: UfCall::Closed,
        clients: HashMap::new(),
        tokens: HashMap::new(),
        next_client: 0,
        writes: FuturesUnordered::new(),
        effects: FuturesUnordered::new(),
    };
    let reason = loop {
        while let Some(output) = machine.poll_output() {
            shell.carry_out(&mut machine, output).await;
        }
        if let Some(reason) = machine.end_reason() {
            break reason;
        }
        let timeout = machine.next_timeout();
        let sleep = async {
            match timeout {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = inbox.recv() => match msg {
                Some(msg) => {
                    if let Some(input) = shell.accept(msg) {
                        machine.handle(Instant::now(), input);
                    }
                }
                None => machine.shutdown(),
            },
            event = shell.from_uf.next() => {
                let input = match event {
                    UfEvent::Message(m) => Input::FromUf(*m),
                    UfEvent::Ended(end) => Input::UfEnded(end),
                };
                machine.handle(Instant::now(), input);
            }
            Some((op, result)) = shell.writes.next(), if !shell.writes.is_empty() => {
                machine.handle(Instant::now(), Input::WriteDone(op, result));
            }
            Some(op) = shell.effects.next(), if !shell.effects.is_empty() => {
                machine.handle(Instant::now(), Input::RouteDone(op));
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    machine.shutdown();
                } else {
                    // the entity's own writes wake it for nothing: the machine already knows
                    let (footprint, now_seen) = {
                        let c = changes.borrow_and_update();
                        let fp = (!c.only_by(generation, seen)).then(|| c.footprint_since(seen));
                        (fp, c.changes)
                    };
                    if let Some(fp) = footprint {
                        machine.handle(Instant::now(), Input::KeyChanged(fp));
                    }
                    seen = now_seen;
                }
            }
            changed = live.changed() => {
                if changed.is_ok() {
                    let live = live.borrow_and_update().clone();
                    machine.handle(Instant::now(), Input::Members(live));
                }
            }
            () = sleep => machine.handle_timeout(Instant::now()),
        }
    };
    drop(shell);
    match reason {
        EndReason::Failed(reason) => {
            tracing::warn!(service, entity_id, reason, "entity terminated");
        }
        EndReason::Shutdown => {
            ents.forget(&service, &entity_id, generation);
            inbox.close();
            while let Some(msg) = inbox.recv().await {
                if let EntityMsg::Command(r) = msg {
                    r.reply
                        .fail(Status::unavailable("the node is shutting down"));
                }
            }
            return;
        }
        EndReason::Passivated | EndReason::Deleted => {}
    }
    ents.retire(&service, &entity_id, generation, inbox).await;
}
