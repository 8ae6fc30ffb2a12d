//! The conformance model as a CloudState user function (spec/conformance.md, section M).
//!
//! It serves `cloudstate.EntityDiscovery` (three services: `CrdtTckModel`, `CrdtTwo`,
//! `CrdtConfigured` with a 100 ms passivation timeout) and `cloudstate.crdt.Crdt`, implementing
//! the model for all eight CRDT types: the type of a `CrdtTckModel` entity is the prefix of its
//! id before `-`; a request's actions apply in order; a reply carries the full value and, as
//! state action, the delta of exactly that command. It doubles as the project's example of a
//! user function. Every message in and out of `handle` is recorded in [`Traffic`] so that tests
//! can assert on what a proxy sent.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use latticed_crdt::{diff, initial_delta, CrdtKind, Element, Origin, UserValue, VoteTally};
use latticed_proto::cloudstate::crdt::crdt_server::Crdt;
use latticed_proto::cloudstate::crdt::{
    crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtClock, CrdtDelete, CrdtDelta,
    CrdtReply, CrdtStateAction, CrdtStreamCancelledResponse, CrdtStreamIn, CrdtStreamOut,
    CrdtStreamedMessage, LwwRegisterDelta,
};
use latticed_proto::cloudstate::entity_discovery_server::EntityDiscovery;
use latticed_proto::cloudstate::{
    client_action, entity_passivation_strategy, ClientAction, Entity, EntityPassivationStrategy,
    EntitySpec, Failure, Forward, ProxyInfo, Reply, ServiceInfo, SideEffect,
    TimeoutPassivationStrategy, UserFunctionError,
};
use latticed_proto::wkt::Any;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::{Stream, StreamExt};

use crate::model as m;

/// `CrdtTckModel`
pub const TCK_MODEL: &str = "cloudstate.tck.model.crdt.CrdtTckModel";
/// `CrdtTwo`
pub const TWO: &str = "cloudstate.tck.model.crdt.CrdtTwo";
/// `CrdtConfigured`
pub const CONFIGURED: &str = "cloudstate.tck.model.crdt.CrdtConfigured";

/// One message on a `handle` stream, with the stream's number (in order of opening).
#[derive(Clone, Debug, PartialEq)]
pub enum Traffic {
    /// proxy -> user function
    In(u64, CrdtStreamIn),
    /// user function -> proxy
    Out(u64, CrdtStreamOut),
    /// the proxy closed its side of the stream
    Closed(u64),
}

/// The model user function; clones share their recordings.
#[derive(Clone, Default)]
pub struct ConformanceModel {
    /// everything that went through `handle`
    pub traffic: Arc<Mutex<Vec<Traffic>>>,
    /// messages received with `reportError`
    pub errors: Arc<Mutex<Vec<String>>>,
    /// `ProxyInfo`s received with `discover`
    pub proxies: Arc<Mutex<Vec<ProxyInfo>>>,
    /// do not print reported errors (benchmarks call `reportError` as a plain unary call)
    pub quiet: bool,
    /// send `handle`'s response headers as soon as the call is accepted, as a tonic server
    /// does by default. Off (the default here): the headers go out only with the first
    /// message, as every published support library's gRPC server does (grpc-js, grpc-java,
    /// grpc-go, grpcio), so a proxy that waits for headers before writing hangs.
    pub eager_headers: bool,
    /// how long the model keeps its side of `handle` open after the proxy half-closed
    /// (passivation); zero completes at once
    pub half_close_delay: Duration,
    streams: Arc<Mutex<u64>>,
}

fn entity(service: &str, passivation_ms: Option<i64>) -> Entity {
    Entity {
        entity_type: "cloudstate.crdt.Crdt".into(),
        service_name: service.into(),
        persistence_id: service.rsplit('.').next().unwrap_or(service).into(),
        passivation_strategy: passivation_ms.map(|ms| EntityPassivationStrategy {
            strategy: Some(entity_passivation_strategy::Strategy::Timeout(
                TimeoutPassivationStrategy { timeout: ms },
            )),
        }),
    }
}

/// The model's `EntitySpec`.
pub fn spec() -> EntitySpec {
    EntitySpec {
        proto: m::DESCRIPTORS.to_vec(),
        entities: vec![
            entity(TCK_MODEL, None),
            entity(TWO, None),
            entity(CONFIGURED, Some(100)),
        ],
        service_info: Some(ServiceInfo {
            service_name: "latticed-conformance-model".into(),
            service_version: env!("CARGO_PKG_VERSION").into(),
            service_runtime: "rust".into(),
            support_library_name: "latticed-tests".into(),
            support_library_version: env!("CARGO_PKG_VERSION").into(),
            protocol_major_version: 0,
            protocol_minor_version: 2,
        }),
    }
}

#[tonic::async_trait]
impl EntityDiscovery for ConformanceModel {
    async fn discover(
        &self,
        r: tonic::Request<ProxyInfo>,
    ) -> Result<tonic::Response<EntitySpec>, tonic::Status> {
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r.into_inner());
        Ok(tonic::Response::new(spec()))
    }

    async fn report_error(
        &self,
        r: tonic::Request<UserFunctionError>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let msg = r.into_inner().message;
        if !self.quiet {
            eprintln!("Error reported from sidecar: {msg}");
        }
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
        Ok(tonic::Response::new(()))
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<CrdtStreamOut, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Crdt for ConformanceModel {
    type handleStream = OutStream;

    async fn handle(
        &self,
        r: tonic::Request<tonic::Streaming<CrdtStreamIn>>,
    ) -> Result<tonic::Response<OutStream>, tonic::Status> {
        let mut inbound = r.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let stream_no = {
            let mut n = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let traffic = self.traffic.clone();
        let half_close_delay = self.half_close_delay;
        tokio::spawn(async move {
            let mut e = EntityState::default();
            while let Some(Ok(msg)) = inbound.next().await {
                traffic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Traffic::In(stream_no, msg.clone()));
                for out in e.handle(msg) {
                    traffic
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Traffic::Out(stream_no, out.clone()));
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
            }
            traffic
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Traffic::Closed(stream_no));
            // the proxy half-closed (or went away): complete our side, after a while if asked
            if !half_close_delay.is_zero() {
                tokio::time::sleep(half_close_delay).await;
            }
            drop(tx);
        });
        let mut rx = rx;
        if self.eager_headers {
            return Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        // withhold the response (and so its headers) until the first message exists
        let first = rx.recv().await;
        let rest = ReceiverStream::new(rx);
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::iter(first).chain(rest),
        )))
    }
}

struct Subscriber {
    end_state: Option<m::State>,
    cancel_update: Option<m::Update>,
    effects: Vec<m::Effect>,
}

#[derive(Default)]
struct EntityState {
    service: String,
    id: String,
    value: Option<UserValue>,
    deleted: bool,
    subscribers: BTreeMap<i64, Subscriber>,
}

fn kind_of(id: &str) -> CrdtKind {
    match id.split('-').next().unwrap_or("") {
        "GCounter" => CrdtKind::GCounter,
        "PNCounter" => CrdtKind::PNCounter,
        "GSet" => CrdtKind::GSet,
        "ORSet" => CrdtKind::ORSet,
        "LWWRegister" => CrdtKind::LwwRegister,
        "Flag" => CrdtKind::Flag,
        "ORMap" => CrdtKind::ORMap,
        "Vote" => CrdtKind::Vote,
        _ => CrdtKind::GCounter,
    }
}

fn any_of<T: Message>(type_name: &str, msg: &T) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: msg.encode_to_vec(),
    }
}

fn s(e: &Element) -> String {
    e.as_string().unwrap_or_default().to_string()
}

/// A value as the model's `State` (sets sorted, map entries sorted by key).
pub fn state_of(v: &UserValue) -> m::State {
    use m::state::Value as V;
    let value = match v {
        UserValue::GCounter(n) => V::Gcounter(m::GCounterValue { value: *n }),
        UserValue::PNCounter(n) => V::Pncounter(m::PnCounterValue { value: *n }),
        UserValue::GSet(x) => V::Gset(m::GSetValue {
            elements: sorted(x.iter().map(s)),
        }),
        UserValue::ORSet(x) => V::Orset(m::OrSetValue {
            elements: sorted(x.iter().map(s)),
        }),
        UserValue::LwwRegister(r) => V::Lwwregister(m::LwwRegisterValue {
            value: r.as_ref().map(s).unwrap_or_default(),
        }),
        UserValue::Flag(b) => V::Flag(m::FlagValue { value: *b }),
        UserValue::ORMap(map) => {
            let mut entries: Vec<m::OrMapEntryValue> = map
                .iter()
                .map(|(k, v)| m::OrMapEntryValue {
                    key: s(k),
                    value: Some(state_of(v)),
                })
                .collect();
            entries.sort_by(|a, b| a.key.cmp(&b.key));
            V::Ormap(m::OrMapValue { entries })
        }
        UserValue::Vote(t) => V::Vote(m::VoteValue {
            self_vote: t.self_vote,
            votes_for: t.votes_for as i32,
            total_voters: t.total_voters as i32,
        }),
    };
    m::State { value: Some(value) }
}

fn sorted(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = it.collect();
    v.sort();
    v
}

/// Applies one model update to a plain value, as the reference model does.
fn apply_update(v: &mut UserValue, u: &m::Update) {
    use m::update::Update as U;
    let Some(update) = &u.update else { return };
    match (v, update) {
        (UserValue::GCounter(n), U::Gcounter(g)) => *n = n.saturating_add(g.increment),
        (UserValue::PNCounter(n), U::Pncounter(p)) => *n = n.saturating_add(p.change),
        (UserValue::GSet(x), U::Gset(g)) => {
            x.insert(Element::string(&g.add));
        }
        (UserValue::ORSet(x), U::Orset(o)) => match &o.action {
            Some(m::or_set_update::Action::Add(e)) => {
                x.insert(Element::string(e));
            }
            Some(m::or_set_update::Action::Remove(e)) => {
                x.remove(&Element::string(e));
            }
            Some(m::or_set_update::Action::Clear(_)) => x.clear(),
            None => {}
        },
        (UserValue::LwwRegister(r), U::Lwwregister(l)) => *r = Some(Element::string(&l.value)),
        (UserValue::Flag(f), U::Flag(_)) => *f = true,
        (UserValue::ORMap(map), U::Ormap(o)) => match &o.action {
            Some(m::or_map_update::Action::Add(k)) => {
                map.entry(Element::string(k))
                    .or_insert_with(|| UserValue::empty(kind_of(k)));
            }
            Some(m::or_map_update::Action::Update(e)) => {
                let nested = map
                    .entry(Element::string(&e.key))
                    .or_insert_with(|| UserValue::empty(kind_of(&e.key)));
                if let Some(u) = &e.update {
                    apply_update(nested, u);
                }
            }
            Some(m::or_map_update::Action::Remove(k)) => {
                map.remove(&Element::string(k));
            }
            Some(m::or_map_update::Action::Clear(_)) => map.clear(),
            None => {}
        },
        (UserValue::Vote(t), U::Vote(x)) if t.self_vote != x.self_vote => {
            t.self_vote = x.self_vote;
            t.votes_for = if x.self_vote {
                t.votes_for + 1
            } else {
                t.votes_for.saturating_sub(1)
            };
        }
        _ => {}
    }
}

/// A register's initial value: the Java model creates it with "".
fn new_value(kind: CrdtKind) -> UserValue {
    match kind {
        CrdtKind::LwwRegister => UserValue::LwwRegister(Some(Element::string(""))),
        CrdtKind::Vote => UserValue::Vote(VoteTally {
            self_vote: false,
            votes_for: 0,
            total_voters: 1,
        }),
        k => UserValue::empty(k),
    }
}

fn out(m: crdt_stream_out::Message) -> CrdtStreamOut {
    CrdtStreamOut { message: Some(m) }
}

impl EntityState {
    fn kind(&self) -> CrdtKind {
        kind_of(&self.id)
    }

    fn current(&self) -> UserValue {
        self.value.clone().unwrap_or_else(|| new_value(self.kind()))
    }

    fn response(&self) -> Any {
        let state = if self.service == TCK_MODEL {
            Some(state_of(&self.current()))
        } else {
            None
        };
        any_of("cloudstate.tck.model.crdt.Response", &m::Response { state })
    }

    fn handle(&mut self, msg: CrdtStreamIn) -> Vec<CrdtStreamOut> {
        use crdt_stream_in::Message as In;
        match msg.message {
            Some(In::Init(init)) => {
                self.service = init.service_name;
                self.id = init.entity_id;
                self.value = init
                    .delta
                    .as_ref()
                    .and_then(|d| UserValue::from_delta(d, Origin::Proxy).ok());
                vec![]
            }
            Some(In::Delta(d)) => {
                match &mut self.value {
                    Some(v) => {
                        let _ = v.apply(&d, Origin::Proxy);
                    }
                    None => self.value = UserValue::from_delta(&d, Origin::Proxy).ok(),
                }
                self.notify(None)
            }
            Some(In::Delete(_)) => {
                self.deleted = true;
                self.value = None;
                vec![]
            }
            Some(In::Command(c)) => self.command(c),
            Some(In::StreamCancelled(c)) => self.cancelled(c.id),
            None => vec![],
        }
    }

    /// Streamed messages to every subscriber but `except`, after a state change.
    fn notify(&mut self, except: Option<i64>) -> Vec<CrdtStreamOut> {
        let state = state_of(&self.current());
        let mut outs = Vec::new();
        let mut ended = Vec::new();
        for (id, sub) in &self.subscribers {
            if Some(*id) == except {
                continue;
            }
            let end = sub.end_state.as_ref() == Some(&state);
            outs.push(out(crdt_stream_out::Message::StreamedMessage(
                CrdtStreamedMessage {
                    command_id: *id,
                    client_action: Some(ClientAction {
                        action: Some(client_action::Action::Reply(Reply {
                            payload: Some(any_of(
                                "cloudstate.tck.model.crdt.Response",
                                &m::Response {
                                    state: Some(state.clone()),
                                },
                            )),
                            metadata: None,
                        })),
                    }),
                    side_effects: sub.effects.iter().map(effect).collect(),
                    end_stream: end,
                },
            )));
            if end {
                ended.push(*id);
            }
        }
        for id in ended {
            self.subscribers.remove(&id);
        }
        outs
    }

    /// The delta from `before` to the current value, for a command that ran `updates`.
    fn delta_since(&self, before: &Option<UserValue>, updates: &[&m::Update]) -> Option<CrdtDelta> {
        let after = self.value.as_ref()?;
        if self.kind() == CrdtKind::LwwRegister {
            let last = updates.iter().rev().find_map(|u| match &u.update {
                Some(m::update::Update::Lwwregister(l)) => Some(l.clone()),
                _ => None,
            });
            let (clock, custom) = last
                .as_ref()
                .and_then(|l| l.clock.as_ref())
                .map(|c| (c.clock_type, c.custom_clock_value))
                .unwrap_or((CrdtClock::Default as i32, 0));
            if last.is_some() || before.is_none() {
                let value = match after {
                    UserValue::LwwRegister(v) => v.as_ref().map(Element::to_any),
                    _ => None,
                };
                return Some(CrdtDelta {
                    delta: Some(
                        latticed_proto::cloudstate::crdt::crdt_delta::Delta::Lwwregister(
                            LwwRegisterDelta {
                                value,
                                clock,
                                custom_clock_value: custom,
                            },
                        ),
                    ),
                });
            }
            return None;
        }
        match before {
            None => Some(initial_delta(after)),
            Some(b) => diff(b, after).ok().flatten(),
        }
    }

    fn state_action(delta: Option<CrdtDelta>, consistency: i32) -> Option<CrdtStateAction> {
        delta.map(|d| CrdtStateAction {
            action: Some(crdt_state_action::Action::Update(d)),
            write_consistency: consistency,
        })
    }

    fn command(&mut self, c: latticed_proto::cloudstate::Command) -> Vec<CrdtStreamOut> {
        let payload = c.payload.map(|p| p.value).unwrap_or_default();
        if c.name == "ProcessStreamed" {
            let Ok(req) = m::StreamedRequest::decode(payload.as_slice()) else {
                return vec![self.fail(c.id, "cannot decode StreamedRequest")];
            };
            return self.streamed(c.id, req);
        }
        let Ok(req) = m::Request::decode(payload.as_slice()) else {
            return vec![self.fail(c.id, "cannot decode Request")];
        };
        let before = self.value.clone();
        let mut updates: Vec<&m::Update> = Vec::new();
        let mut consistency = 0;
        let mut delete = false;
        let mut forward = None;
        let mut effects = Vec::new();
        let mut work = self.current();
        for a in &req.actions {
            match &a.action {
                Some(m::request_action::Action::Update(u)) => {
                    apply_update(&mut work, u);
                    consistency = u.write_consistency;
                    updates.push(u);
                }
                Some(m::request_action::Action::Delete(_)) => delete = true,
                Some(m::request_action::Action::Forward(f)) => forward = Some(f.id.clone()),
                Some(m::request_action::Action::Fail(f)) => {
                    return vec![self.fail(c.id, &f.message)]
                }
                Some(m::request_action::Action::Effect(e)) => effects.push(effect(e)),
                None => {}
            }
        }
        let creates = self.service == TCK_MODEL
            && (before.is_some() || !updates.is_empty() || self.kind() == CrdtKind::LwwRegister);
        if creates {
            self.value = Some(work);
        }
        let state_action = if delete {
            self.deleted = true;
            Some(CrdtStateAction {
                action: Some(crdt_state_action::Action::Delete(CrdtDelete {})),
                write_consistency: consistency,
            })
        } else if creates {
            Self::state_action(self.delta_since(&before, &updates), consistency)
        } else {
            None
        };
        let changed = matches!(
            &state_action,
            Some(CrdtStateAction {
                action: Some(crdt_state_action::Action::Update(_)),
                ..
            })
        );
        let client_action = match forward {
            Some(id) => client_action::Action::Forward(Forward {
                service_name: TWO.into(),
                command_name: "Call".into(),
                payload: Some(any_of(
                    "cloudstate.tck.model.crdt.Request",
                    &m::Request {
                        id,
                        actions: vec![],
                    },
                )),
                metadata: None,
            }),
            None => client_action::Action::Reply(Reply {
                payload: Some(self.response()),
                metadata: None,
            }),
        };
        let mut outs = vec![out(crdt_stream_out::Message::Reply(CrdtReply {
            command_id: c.id,
            client_action: Some(ClientAction {
                action: Some(client_action),
            }),
            side_effects: effects,
            state_action,
            streamed: false,
        }))];
        if changed {
            outs.extend(self.notify(None));
        }
        outs
    }

    fn streamed(&mut self, id: i64, req: m::StreamedRequest) -> Vec<CrdtStreamOut> {
        self.subscribers.insert(
            id,
            Subscriber {
                end_state: req.end_state.clone(),
                cancel_update: req.cancel_update.clone(),
                effects: req.effects.clone(),
            },
        );
        let before = self.value.clone();
        let mut state_action = None;
        if let Some(u) = &req.initial_update {
            let mut work = self.current();
            apply_update(&mut work, u);
            self.value = Some(work);
            state_action = Self::state_action(self.delta_since(&before, &[u]), u.write_consistency);
        }
        let client_action = (!req.empty).then(|| ClientAction {
            action: Some(client_action::Action::Reply(Reply {
                payload: Some(self.response()),
                metadata: None,
            })),
        });
        let changed = state_action.is_some();
        let mut outs = vec![out(crdt_stream_out::Message::Reply(CrdtReply {
            command_id: id,
            client_action,
            side_effects: vec![],
            state_action,
            streamed: true,
        }))];
        if changed {
            outs.extend(self.notify(Some(id)));
        }
        outs
    }

    fn cancelled(&mut self, id: i64) -> Vec<CrdtStreamOut> {
        let Some(sub) = self.subscribers.remove(&id) else {
            return vec![];
        };
        let before = self.value.clone();
        let mut state_action = None;
        if let Some(u) = &sub.cancel_update {
            let mut work = self.current();
            apply_update(&mut work, u);
            self.value = Some(work);
            state_action = Self::state_action(self.delta_since(&before, &[u]), u.write_consistency);
        }
        let changed = state_action.is_some();
        let mut outs = vec![out(crdt_stream_out::Message::StreamCancelledResponse(
            CrdtStreamCancelledResponse {
                command_id: id,
                side_effects: vec![],
                state_action,
            },
        ))];
        if changed {
            outs.extend(self.notify(None));
        }
        outs
    }

    fn fail(&self, id: i64, message: &str) -> CrdtStreamOut {
        out(crdt_stream_out::Message::Reply(CrdtReply {
            command_id: id,
            client_action: Some(ClientAction {
                action: Some(client_action::Action::Failure(Failure {
                    command_id: id,
                    description: message.to_string(),
                    restart: false,
                })),
            }),
            side_effects: vec![],
            state_action: None,
            streamed: false,
        }))
    }
}

fn effect(e: &m::Effect) -> SideEffect {
    SideEffect {
        service_name: TWO.into(),
        command_name: "Call".into(),
        payload: Some(any_of(
            "cloudstate.tck.model.crdt.Request",
            &m::Request {
                id: e.id.clone(),
                actions: vec![],
            },
        )),
        synchronous: e.synchronous,
        metadata: None,
    }
}

/// Serves a user function (its `EntityDiscovery` and `Crdt` services) on `listener` over
/// h2c, until the runtime ends.
pub async fn serve_user_function<U>(
    user_function: U,
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error>
where
    U: EntityDiscovery + Crdt + Clone,
{
    tonic::transport::Server::builder()
        .add_service(
            latticed_proto::cloudstate::entity_discovery_server::EntityDiscoveryServer::new(
                user_function.clone(),
            ),
        )
        .add_service(latticed_proto::cloudstate::crdt::crdt_server::CrdtServer::new(user_function))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}

/// Serves the model on `listener`.
pub async fn serve(
    model: ConformanceModel,
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    serve_user_function(model, listener).await
}

/// How long tests wait for a message the model sends.
pub const WAIT: Duration = Duration::from_secs(5);
