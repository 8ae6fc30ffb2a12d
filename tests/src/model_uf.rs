//! The conformance model as a CloudState user function (spec/conformance.md, section M).
//!
//! It serves `cloudstate.EntityDiscovery` (three services: `CrdtTckModel`, `CrdtTwo`,
//! `CrdtConfigured` with a 100 ms passivation timeout) and `cloudstate.crdt.Crdt`, implementing
//! the model for all eight CRDT types: the type of a `CrdtTckModel` entity is the prefix of its
//! id before `-`; a request's actions apply in order; a reply carries the full value and, as
//! state action, the delta of exactly that command (recorded operation by operation, as the
//! support libraries do: see `Tracked`). It behaves as the reference (Java) TCK model:
//! `CrdtTwo.Call` replies `Response{}` and honours only a delete, `CrdtConfigured.Call` replies
//! `Response{}`; `ProcessStreamed` subscribes only on a streamed call, an `empty` subscriber is
//! sent only its side effects or its end, and every `stream_cancelled` is answered. It doubles
//! as the project's example of a user function. Every message in and out of `handle` is
//! recorded in [`Traffic`] so that tests can assert on what a proxy sent.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use latticed_crdt::{initial_delta, CrdtKind, Element, Origin, UserValue, VoteTally};
use latticed_proto::cloudstate::crdt::crdt_server::Crdt;
use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtClock, CrdtDelete,
    CrdtDelta, CrdtReply, CrdtStateAction, CrdtStreamCancelledResponse, CrdtStreamIn,
    CrdtStreamOut, CrdtStreamedMessage, FlagDelta, GCounterDelta, GSetDelta, LwwRegisterDelta,
    OrMapDelta, OrMapEntryDelta, OrSetDelta, PnCounterDelta, VoteDelta,
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
    /// the services it declares at discovery (none: all three); the others it still answers,
    /// but no proxy sends it their commands
    pub only: Option<Vec<&'static str>>,
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
        let mut spec = spec();
        if let Some(only) = &self.only {
            spec.entities
                .retain(|e| only.contains(&e.service_name.as_str()));
        }
        Ok(tonic::Response::new(spec))
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
    empty: bool,
}

#[derive(Default)]
struct EntityState {
    service: String,
    id: String,
    /// a `CrdtTckModel` entity's value, created at `init` as the Java model creates it;
    /// `CrdtTwo` and `CrdtConfigured` keep none
    value: Option<Tracked>,
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

/// A CRDT value as a support library holds it: the plain value plus the delta recorded by the
/// operations since the last reply (java-support's `InternalCrdt.delta`, node-support's
/// `getAndResetDelta`). Each operation is recorded as it happens, so a reply's state action
/// is the delta of exactly that command, not a diff of the value before and after it: e.g.
/// `{x}`, clear, add `x` reports `cleared, added [x]` although the value did not change.
#[derive(Clone, Debug)]
enum Tracked {
    GCounter {
        value: u64,
        delta: u64,
    },
    PNCounter {
        value: i64,
        delta: i64,
    },
    GSet {
        value: BTreeSet<Element>,
        added: BTreeSet<Element>,
    },
    /// a remove cancels an add of this command and the reverse; removing the last element
    /// is a clear
    ORSet {
        value: BTreeSet<Element>,
        rec: Removals,
    },
    /// `delta` is the value set; `clock`/`custom` the clock it was set with (DEFAULT/0 when
    /// nothing is recorded)
    LwwRegister {
        value: Element,
        delta: Option<Element>,
        clock: i32,
        custom: i64,
    },
    Flag {
        value: bool,
        changed: bool,
    },
    /// `rec.added`: keys created by this command (reported with their full state, also
    /// after a remove of the same key); other entries report their own recorded delta under
    /// `updated`
    ORMap {
        value: BTreeMap<Element, Tracked>,
        rec: Removals,
    },
    /// only the own vote is ever reported; `votes_for`/`total_voters` are the proxy's
    Vote {
        tally: VoteTally,
        changed: bool,
    },
}

/// What an ORSet or ORMap recorded: a clear resets what was recorded before it.
#[derive(Clone, Debug, Default)]
struct Removals {
    cleared: bool,
    removed: BTreeSet<Element>,
    added: BTreeSet<Element>,
}

impl Removals {
    fn clear(&mut self) {
        *self = Removals {
            cleared: true,
            ..Removals::default()
        };
    }

    /// `e` is gone: forget its add of this command, or record the removal.
    fn remove(&mut self, e: Element) {
        if !self.added.remove(&e) {
            self.removed.insert(e);
        }
    }

    fn is_empty(&self) -> bool {
        !self.cleared && self.removed.is_empty() && self.added.is_empty()
    }
}

fn anys<'a>(elements: impl IntoIterator<Item = &'a Element>) -> Vec<prost_types::Any> {
    elements.into_iter().map(Element::to_any).collect()
}

fn clock_of(l: &m::LwwRegisterUpdate) -> (i32, i64) {
    use m::LwwRegisterClockType as T;
    match l.clock.as_ref() {
        None => (CrdtClock::Default as i32, 0),
        Some(c) => match T::try_from(c.clock_type).unwrap_or(T::Default) {
            T::Default => (CrdtClock::Default as i32, 0),
            T::Reverse => (CrdtClock::Reverse as i32, 0),
            T::Custom => (CrdtClock::Custom as i32, c.custom_clock_value),
            T::CustomAutoIncrement => (CrdtClock::CustomAutoIncrement as i32, c.custom_clock_value),
        },
    }
}

impl Tracked {
    /// A value the model creates (the Java model's `createCrdt`): empty, but a register is
    /// set to `""`, which it reports.
    fn created(kind: CrdtKind) -> Tracked {
        match kind {
            CrdtKind::LwwRegister => Tracked::LwwRegister {
                value: Element::string(""),
                delta: Some(Element::string("")),
                clock: CrdtClock::Default as i32,
                custom: 0,
            },
            k => Tracked::from_value(&UserValue::empty(k)),
        }
    }

    /// A value received from the proxy: nothing recorded.
    fn from_value(v: &UserValue) -> Tracked {
        match v {
            UserValue::GCounter(n) => Tracked::GCounter {
                value: *n,
                delta: 0,
            },
            UserValue::PNCounter(n) => Tracked::PNCounter {
                value: *n,
                delta: 0,
            },
            UserValue::GSet(s) => Tracked::GSet {
                value: s.clone(),
                added: BTreeSet::new(),
            },
            UserValue::ORSet(s) => Tracked::ORSet {
                value: s.clone(),
                rec: Removals::default(),
            },
            UserValue::LwwRegister(r) => Tracked::LwwRegister {
                value: r.clone().unwrap_or_else(|| Element::string("")),
                delta: None,
                clock: CrdtClock::Default as i32,
                custom: 0,
            },
            UserValue::Flag(b) => Tracked::Flag {
                value: *b,
                changed: false,
            },
            UserValue::ORMap(map) => Tracked::ORMap {
                value: map
                    .iter()
                    .map(|(k, v)| (k.clone(), Tracked::from_value(v)))
                    .collect(),
                rec: Removals::default(),
            },
            UserValue::Vote(t) => Tracked::Vote {
                tally: *t,
                changed: false,
            },
        }
    }

    /// The plain value.
    fn value(&self) -> UserValue {
        match self {
            Tracked::GCounter { value, .. } => UserValue::GCounter(*value),
            Tracked::PNCounter { value, .. } => UserValue::PNCounter(*value),
            Tracked::GSet { value, .. } => UserValue::GSet(value.clone()),
            Tracked::ORSet { value, .. } => UserValue::ORSet(value.clone()),
            Tracked::LwwRegister { value, .. } => UserValue::LwwRegister(Some(value.clone())),
            Tracked::Flag { value, .. } => UserValue::Flag(*value),
            Tracked::ORMap { value, .. } => {
                UserValue::ORMap(value.iter().map(|(k, v)| (k.clone(), v.value())).collect())
            }
            Tracked::Vote { tally, .. } => UserValue::Vote(*tally),
        }
    }

    /// Applies a delta from the proxy. As in both support libraries this drops what was
    /// recorded (only a created register's `""` can be pending between commands).
    fn apply_proxy_delta(&mut self, d: &CrdtDelta) {
        let mut v = self.value();
        if v.apply(d, Origin::Proxy).is_ok() {
            *self = Tracked::from_value(&v);
        }
    }

    fn has_delta(&self) -> bool {
        match self {
            Tracked::GCounter { delta, .. } => *delta != 0,
            Tracked::PNCounter { delta, .. } => *delta != 0,
            Tracked::GSet { added, .. } => !added.is_empty(),
            Tracked::ORSet { rec, .. } => !rec.is_empty(),
            Tracked::LwwRegister { delta, .. } => delta.is_some(),
            Tracked::Flag { changed, .. } | Tracked::Vote { changed, .. } => *changed,
            Tracked::ORMap { value, rec } => {
                !rec.is_empty() || value.values().any(Tracked::has_delta)
            }
        }
    }

    /// The recorded delta, if any.
    fn delta(&self) -> Option<CrdtDelta> {
        if !self.has_delta() {
            return None;
        }
        let d = match self {
            Tracked::GCounter { delta, .. } => Delta::Gcounter(GCounterDelta { increment: *delta }),
            Tracked::PNCounter { delta, .. } => Delta::Pncounter(PnCounterDelta { change: *delta }),
            Tracked::GSet { added, .. } => Delta::Gset(GSetDelta { added: anys(added) }),
            Tracked::ORSet { rec, .. } => Delta::Orset(OrSetDelta {
                cleared: rec.cleared,
                removed: anys(&rec.removed),
                added: anys(&rec.added),
            }),
            Tracked::LwwRegister {
                delta,
                clock,
                custom,
                ..
            } => Delta::Lwwregister(LwwRegisterDelta {
                value: delta.as_ref().map(Element::to_any),
                clock: *clock,
                custom_clock_value: *custom,
            }),
            Tracked::Flag { value, .. } => Delta::Flag(FlagDelta { value: *value }),
            Tracked::Vote { tally, .. } => Delta::Vote(VoteDelta {
                self_vote: tally.self_vote,
                votes_for: 0,
                total_voters: 0,
            }),
            Tracked::ORMap { value, rec } => Delta::Ormap(OrMapDelta {
                cleared: rec.cleared,
                removed: anys(&rec.removed),
                updated: value
                    .iter()
                    .filter(|(k, _)| !rec.added.contains(*k))
                    .filter_map(|(k, v)| v.delta().map(|d| map_entry(k, d)))
                    .collect(),
                added: value
                    .iter()
                    .filter(|(k, _)| rec.added.contains(*k))
                    .map(|(k, v)| map_entry(k, v.full_delta()))
                    .collect(),
            }),
        };
        Some(CrdtDelta { delta: Some(d) })
    }

    /// The whole value as a delta from empty, for an ORMap entry this command created: a
    /// register with the clock it was set with, a vote with the own vote only.
    fn full_delta(&self) -> CrdtDelta {
        match self {
            Tracked::LwwRegister {
                value,
                delta,
                clock,
                custom,
            } => CrdtDelta {
                delta: Some(Delta::Lwwregister(LwwRegisterDelta {
                    value: Some(value.to_any()),
                    clock: if delta.is_some() {
                        *clock
                    } else {
                        CrdtClock::Default as i32
                    },
                    custom_clock_value: if delta.is_some() { *custom } else { 0 },
                })),
            },
            Tracked::Vote { tally, .. } => CrdtDelta {
                delta: Some(Delta::Vote(VoteDelta {
                    self_vote: tally.self_vote,
                    votes_for: 0,
                    total_voters: 0,
                })),
            },
            Tracked::ORMap { value, .. } => CrdtDelta {
                delta: Some(Delta::Ormap(OrMapDelta {
                    cleared: false,
                    removed: vec![],
                    updated: vec![],
                    added: value
                        .iter()
                        .map(|(k, v)| map_entry(k, v.full_delta()))
                        .collect(),
                })),
            },
            other => initial_delta(&other.value()),
        }
    }

    /// Forgets what was recorded (after a reply).
    fn reset(&mut self) {
        match self {
            Tracked::GCounter { delta, .. } => *delta = 0,
            Tracked::PNCounter { delta, .. } => *delta = 0,
            Tracked::GSet { added, .. } => added.clear(),
            Tracked::ORSet { rec, .. } => *rec = Removals::default(),
            Tracked::LwwRegister {
                delta,
                clock,
                custom,
                ..
            } => {
                *delta = None;
                *clock = CrdtClock::Default as i32;
                *custom = 0;
            }
            Tracked::Flag { changed, .. } | Tracked::Vote { changed, .. } => *changed = false,
            Tracked::ORMap { value, rec } => {
                *rec = Removals::default();
                value.values_mut().for_each(Tracked::reset);
            }
        }
    }

    /// Applies one model update and records it, as the Java model does through the
    /// support library's CRDT API. An update of another type than the value is ignored.
    fn apply_update(&mut self, u: &m::Update) {
        use m::update::Update as U;
        let Some(update) = &u.update else { return };
        match (self, update) {
            (Tracked::GCounter { value, delta }, U::Gcounter(g)) => {
                *value = value.saturating_add(g.increment);
                *delta = delta.saturating_add(g.increment);
            }
            (Tracked::PNCounter { value, delta }, U::Pncounter(p)) => {
                *value = value.saturating_add(p.change);
                *delta = delta.saturating_add(p.change);
            }
            (Tracked::GSet { value, added }, U::Gset(g)) => {
                let e = Element::string(&g.add);
                if value.insert(e.clone()) {
                    added.insert(e);
                }
            }
            (Tracked::ORSet { value, rec }, U::Orset(o)) => match &o.action {
                Some(m::or_set_update::Action::Add(x)) => {
                    let e = Element::string(x);
                    if value.insert(e.clone()) && !rec.removed.remove(&e) {
                        rec.added.insert(e);
                    }
                }
                Some(m::or_set_update::Action::Remove(x)) => {
                    let e = Element::string(x);
                    if value.remove(&e) {
                        if value.is_empty() {
                            rec.clear();
                        } else {
                            rec.remove(e);
                        }
                    }
                }
                // the Java model clears only on `clear: true`
                Some(m::or_set_update::Action::Clear(true)) => {
                    value.clear();
                    rec.clear();
                }
                Some(m::or_set_update::Action::Clear(false)) | None => {}
            },
            (
                Tracked::LwwRegister {
                    value,
                    delta,
                    clock,
                    custom,
                },
                U::Lwwregister(l),
            ) => {
                // java-support's LWWRegisterImpl.set: a change of value or of clock
                let e = Element::string(&l.value);
                let (c, cv) = clock_of(l);
                if *value != e || *clock != c || *custom != cv {
                    *value = e.clone();
                    *delta = Some(e);
                    *clock = c;
                    *custom = cv;
                }
            }
            (Tracked::Flag { value, changed }, U::Flag(_)) if !*value => {
                *value = true;
                *changed = true;
            }
            (Tracked::ORMap { value, rec }, U::Ormap(o)) => match &o.action {
                Some(m::or_map_update::Action::Add(k)) => {
                    get_or_create(value, &mut rec.added, k);
                }
                Some(m::or_map_update::Action::Update(e)) => {
                    let nested = get_or_create(value, &mut rec.added, &e.key);
                    if let Some(u) = &e.update {
                        nested.apply_update(u);
                    }
                }
                Some(m::or_map_update::Action::Remove(k)) => {
                    let key = Element::string(k);
                    if value.remove(&key).is_some() {
                        rec.remove(key);
                    }
                }
                // the Java model clears whatever `clear` holds, also an empty map
                Some(m::or_map_update::Action::Clear(_)) => {
                    value.clear();
                    rec.clear();
                }
                None => {}
            },
            // voting back within one command is no change (java-support's VoteImpl)
            (Tracked::Vote { tally, changed }, U::Vote(x)) if tally.self_vote != x.self_vote => {
                *changed = !*changed;
                tally.self_vote = x.self_vote;
                tally.votes_for = if x.self_vote {
                    tally.votes_for.saturating_add(1)
                } else {
                    tally.votes_for.saturating_sub(1)
                };
            }
            _ => {}
        }
    }
}

/// java-support's `ORMap.getOrCreate`: an absent key gets a created value of the type its
/// prefix names, recorded as added.
fn get_or_create<'a>(
    map: &'a mut BTreeMap<Element, Tracked>,
    added: &mut BTreeSet<Element>,
    key: &str,
) -> &'a mut Tracked {
    let k = Element::string(key);
    if !map.contains_key(&k) {
        added.insert(k.clone());
    }
    map.entry(k)
        .or_insert_with(|| Tracked::created(kind_of(key)))
}

fn map_entry(k: &Element, d: CrdtDelta) -> OrMapEntryDelta {
    OrMapEntryDelta {
        key: Some(k.to_any()),
        delta: Some(d),
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
        match &self.value {
            Some(v) => v.value(),
            None => Tracked::created(self.kind()).value(),
        }
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
                if self.service == TCK_MODEL {
                    let kind = self.kind();
                    self.value = Some(
                        match init
                            .delta
                            .as_ref()
                            .and_then(|d| UserValue::from_delta(d, Origin::Proxy).ok())
                        {
                            Some(v) => Tracked::from_value(&v),
                            None => Tracked::created(kind),
                        },
                    );
                }
                vec![]
            }
            Some(In::Delta(d)) => {
                if let Some(v) = &mut self.value {
                    v.apply_proxy_delta(&d);
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

    /// Streamed messages to every subscriber but `except`, after a state change: java-support
    /// sends one when it has a reply (the subscriber is not `empty`), side effects or ends
    /// the stream.
    fn notify(&mut self, except: Option<i64>) -> Vec<CrdtStreamOut> {
        let state = state_of(&self.current());
        let mut outs = Vec::new();
        let mut ended = Vec::new();
        for (id, sub) in &self.subscribers {
            if Some(*id) == except {
                continue;
            }
            let end = sub.end_state.as_ref() == Some(&state);
            let client_action = (!sub.empty).then(|| ClientAction {
                action: Some(client_action::Action::Reply(Reply {
                    payload: Some(any_of(
                        "cloudstate.tck.model.crdt.Response",
                        &m::Response {
                            state: Some(state.clone()),
                        },
                    )),
                    metadata: None,
                })),
            });
            if client_action.is_none() && !end && sub.effects.is_empty() {
                continue;
            }
            outs.push(out(crdt_stream_out::Message::StreamedMessage(
                CrdtStreamedMessage {
                    command_id: *id,
                    client_action,
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

    /// Applies `updates` to the value and takes what they recorded (with what a created
    /// register still had pending) as one state action.
    fn update(&mut self, updates: &[&m::Update], consistency: i32) -> Option<CrdtStateAction> {
        let kind = self.kind();
        let value = self.value.get_or_insert_with(|| Tracked::created(kind));
        for u in updates {
            value.apply_update(u);
        }
        let delta = value.delta();
        value.reset();
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
            return self.streamed(c.id, c.streamed, req);
        }
        let Ok(req) = m::Request::decode(payload.as_slice()) else {
            return vec![self.fail(c.id, "cannot decode Request")];
        };
        if self.service != TCK_MODEL {
            return self.call(c.id, &req);
        }
        let mut updates: Vec<&m::Update> = Vec::new();
        let mut consistency = 0;
        let mut delete = false;
        let mut forward = None;
        let mut effects = Vec::new();
        for a in &req.actions {
            match &a.action {
                Some(m::request_action::Action::Update(u)) => {
                    consistency = u.write_consistency;
                    updates.push(u);
                }
                Some(m::request_action::Action::Delete(_)) => delete = true,
                Some(m::request_action::Action::Forward(f)) => forward = Some(f.id.clone()),
                // a failed command changes nothing
                Some(m::request_action::Action::Fail(f)) => {
                    return vec![self.fail(c.id, &f.message)]
                }
                Some(m::request_action::Action::Effect(e)) => effects.push(effect(e)),
                None => {}
            }
        }
        let mut state_action = self.update(&updates, consistency);
        if delete {
            self.deleted = true;
            state_action = Some(CrdtStateAction {
                action: Some(crdt_state_action::Action::Delete(CrdtDelete {})),
                write_consistency: consistency,
            });
        }
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

    /// `CrdtTwo.Call` and `CrdtConfigured.Call`: `Response{}`; `CrdtTwo` honours a delete
    /// (the Java model's `CrdtTwoEntity`), every other action is ignored.
    fn call(&mut self, id: i64, req: &m::Request) -> Vec<CrdtStreamOut> {
        let delete = self.service == TWO
            && req
                .actions
                .iter()
                .any(|a| matches!(a.action, Some(m::request_action::Action::Delete(_))));
        if delete {
            self.deleted = true;
        }
        vec![out(crdt_stream_out::Message::Reply(CrdtReply {
            command_id: id,
            client_action: Some(ClientAction {
                action: Some(client_action::Action::Reply(Reply {
                    payload: Some(self.response()),
                    metadata: None,
                })),
            }),
            side_effects: vec![],
            state_action: delete.then_some(CrdtStateAction {
                action: Some(crdt_state_action::Action::Delete(CrdtDelete {})),
                write_consistency: 0,
            }),
            streamed: false,
        }))]
    }

    /// `ProcessStreamed`: a subscription only when the call is streamed (else the reply
    /// completes it, `streamed = false`).
    fn streamed(&mut self, id: i64, streamed: bool, req: m::StreamedRequest) -> Vec<CrdtStreamOut> {
        if streamed {
            self.subscribers.insert(
                id,
                Subscriber {
                    end_state: req.end_state.clone(),
                    cancel_update: req.cancel_update.clone(),
                    effects: req.effects.clone(),
                    empty: req.empty,
                },
            );
        }
        let state_action = match &req.initial_update {
            Some(u) => self.update(&[u], u.write_consistency),
            None => self.update(&[], 0),
        };
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
            streamed,
        }))];
        if changed {
            outs.extend(self.notify(Some(id)));
        }
        outs
    }

    /// `stream_cancelled` is always answered (as java-support does), with the subscriber's
    /// cancel update if it had one.
    fn cancelled(&mut self, id: i64) -> Vec<CrdtStreamOut> {
        let cancel_update = self
            .subscribers
            .remove(&id)
            .and_then(|sub| sub.cancel_update);
        let state_action = match &cancel_update {
            Some(u) => self.update(&[u], u.write_consistency),
            None => None,
        };
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
    serve_limited(user_function, listener, None).await
}

/// As [`serve_user_function`], with SETTINGS_MAX_CONCURRENT_STREAMS set to `max_streams`
/// (as Kestrel's 100 or hyper's 200 would be).
pub async fn serve_limited<U>(
    user_function: U,
    listener: tokio::net::TcpListener,
    max_streams: Option<u32>,
) -> Result<(), tonic::transport::Error>
where
    U: EntityDiscovery + Crdt + Clone,
{
    tonic::transport::Server::builder()
        .max_concurrent_streams(max_streams)
        .add_service(
            latticed_proto::cloudstate::entity_discovery_server::EntityDiscoveryServer::new(
                user_function.clone(),
            )
            .max_decoding_message_size(64 << 20),
        )
        .add_service(
            latticed_proto::cloudstate::crdt::crdt_server::CrdtServer::new(user_function)
                .max_decoding_message_size(64 << 20),
        )
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
