//! A misbehaving user function for bad-input tests: it serves the conformance model's spec but
//! answers commands wrongly, chosen by entity id:
//! - `wrong-type`: the first command creates a GCounter, later ones send an ORSet delta;
//! - `negative`: a GCounter increment that is negative as a signed 64-bit number;
//! - `flag-off`: enables a Flag, then tries to switch it off;
//! - `unknown-reply`: a reply for a command id it never received;
//! - `crash`: ends the stream;
//! - `held…`: no reply until [`Saboteur::release`] is notified, then replies to every held
//!   command at once (to keep commands in flight);
//! - `cancel-held…`: commands are answered at once (streamed ones stay open); a
//!   `stream_cancelled` is answered only when [`Saboteur::release`] is notified, with a
//!   PNCounter `+3` as its state action;
//! - `headers`: an empty `Response` whose metadata asks for [`HEADERS`] (valid, binary,
//!   reserved and invalid names);
//! - anything else: an empty `Response`.
//!
//! Every message received on `handle` is recorded in `traffic`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use latticed_proto::cloudstate::crdt::crdt_server::Crdt;
use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtDelta, CrdtReply,
    CrdtStateAction, CrdtStreamIn, CrdtStreamOut, GCounterDelta, OrSetDelta,
};
use latticed_proto::cloudstate::entity_discovery_server::EntityDiscovery;
use latticed_proto::cloudstate::{
    client_action, ClientAction, EntitySpec, ProxyInfo, Reply, UserFunctionError,
};
use latticed_proto::wkt::Any;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::{Stream, StreamExt};

/// The saboteur; clones share their recordings.
#[derive(Clone, Default)]
pub struct Saboteur {
    /// messages received with `reportError`
    pub errors: Arc<Mutex<Vec<String>>>,
    /// how many `init`s it received
    pub inits: Arc<Mutex<u32>>,
    /// the spec to answer discovery with (`None`: the conformance model's)
    pub spec: Arc<Mutex<Option<EntitySpec>>>,
    /// every message received on `handle`
    pub traffic: Arc<Mutex<Vec<CrdtStreamIn>>>,
    /// releases the replies of `held…` entities
    pub release: Arc<tokio::sync::Notify>,
}

#[tonic::async_trait]
impl EntityDiscovery for Saboteur {
    async fn discover(
        &self,
        _: tonic::Request<ProxyInfo>,
    ) -> Result<tonic::Response<EntitySpec>, tonic::Status> {
        let spec = self.spec.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(tonic::Response::new(
            spec.unwrap_or_else(crate::model_uf::spec),
        ))
    }
    async fn report_error(
        &self,
        r: tonic::Request<UserFunctionError>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r.into_inner().message);
        Ok(tonic::Response::new(()))
    }
}

/// The metadata entries of the `headers` entity's replies (name, string value); the last is
/// a binary entry.
pub const HEADERS: &[(&str, &str)] = &[
    ("x-answer", "42"),
    ("X-Mixed-Case", "yes"),
    ("content-type", "text/evil"),
    ("grpc-status", "13"),
    ("bad header", "v"),
    ("x-bad-value", "line\nbreak"),
    ("x-raw-bin", "\u{1}\u{2}"),
];

fn with_headers(mut out: CrdtStreamOut) -> CrdtStreamOut {
    use latticed_proto::cloudstate::{metadata_entry::Value, Metadata, MetadataEntry};
    let entries = HEADERS
        .iter()
        .map(|(k, v)| MetadataEntry {
            key: (*k).into(),
            value: Some(if k.ends_with("-bin") {
                Value::BytesValue(v.as_bytes().to_vec())
            } else {
                Value::StringValue((*v).into())
            }),
        })
        .collect();
    if let Some(crdt_stream_out::Message::Reply(CrdtReply {
        client_action:
            Some(ClientAction {
                action: Some(client_action::Action::Reply(r)),
            }),
        ..
    })) = out.message.as_mut()
    {
        r.metadata = Some(Metadata { entries });
    }
    out
}

fn reply(id: i64, delta: Option<Delta>) -> CrdtStreamOut {
    let response = crate::model::Response { state: None };
    CrdtStreamOut {
        message: Some(crdt_stream_out::Message::Reply(CrdtReply {
            command_id: id,
            client_action: Some(ClientAction {
                action: Some(client_action::Action::Reply(Reply {
                    payload: Some(Any {
                        type_url: "type.googleapis.com/cloudstate.tck.model.crdt.Response".into(),
                        value: response.encode_to_vec(),
                    }),
                    metadata: None,
                })),
            }),
            side_effects: vec![],
            state_action: delta.map(|d| CrdtStateAction {
                action: Some(crdt_state_action::Action::Update(CrdtDelta {
                    delta: Some(d),
                })),
                write_consistency: 0,
            }),
            streamed: false,
        })),
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<CrdtStreamOut, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Crdt for Saboteur {
    type handleStream = OutStream;

    async fn handle(
        &self,
        r: tonic::Request<tonic::Streaming<CrdtStreamIn>>,
    ) -> Result<tonic::Response<OutStream>, tonic::Status> {
        let mut inbound = r.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let inits = self.inits.clone();
        let traffic = self.traffic.clone();
        let release = self.release.clone();
        tokio::spawn(async move {
            let mut id = String::new();
            let mut commands = 0;
            let mut held: Vec<i64> = Vec::new();
            let mut held_cancels: Vec<i64> = Vec::new();
            loop {
                let msg = tokio::select! {
                    m = inbound.next() => m,
                    _ = release.notified(), if !held.is_empty() || !held_cancels.is_empty() => {
                        for c in held.drain(..) {
                            if tx.send(Ok(reply(c, None))).await.is_err() {
                                return;
                            }
                        }
                        for c in held_cancels.drain(..) {
                            let out = CrdtStreamOut {
                                message: Some(crdt_stream_out::Message::StreamCancelledResponse(
                                    latticed_proto::cloudstate::crdt::CrdtStreamCancelledResponse {
                                        command_id: c,
                                        side_effects: vec![],
                                        state_action: Some(CrdtStateAction {
                                            action: Some(crdt_state_action::Action::Update(CrdtDelta {
                                                delta: Some(Delta::Pncounter(latticed_proto::cloudstate::crdt::PnCounterDelta { change: 3 })),
                                            })),
                                            write_consistency: 0,
                                        }),
                                    },
                                )),
                            };
                            if tx.send(Ok(out)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                };
                let Some(Ok(msg)) = msg else { return };
                traffic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(msg.clone());
                match msg.message {
                    Some(crdt_stream_in::Message::Init(i)) => {
                        *inits.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                        id = i.entity_id;
                    }
                    Some(crdt_stream_in::Message::Command(c)) if id.starts_with("held") => {
                        held.push(c.id);
                    }
                    Some(crdt_stream_in::Message::Command(c)) if id.starts_with("cancel-held") => {
                        let mut r = reply(c.id, None);
                        if let Some(crdt_stream_out::Message::Reply(rep)) = r.message.as_mut() {
                            rep.streamed = c.streamed;
                        }
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    Some(crdt_stream_in::Message::StreamCancelled(c))
                        if id.starts_with("cancel-held") =>
                    {
                        held_cancels.push(c.id);
                    }
                    Some(crdt_stream_in::Message::Command(c)) => {
                        commands += 1;
                        let out = match id.as_str() {
                            "wrong-type" if commands == 1 => {
                                reply(c.id, Some(Delta::Gcounter(GCounterDelta { increment: 1 })))
                            }
                            "wrong-type" => reply(c.id, Some(Delta::Orset(OrSetDelta::default()))),
                            "flag-off" if commands == 1 => reply(
                                c.id,
                                Some(Delta::Flag(latticed_proto::cloudstate::crdt::FlagDelta {
                                    value: true,
                                })),
                            ),
                            "flag-off" => reply(
                                c.id,
                                Some(Delta::Flag(latticed_proto::cloudstate::crdt::FlagDelta {
                                    value: false,
                                })),
                            ),
                            "negative" => reply(
                                c.id,
                                Some(Delta::Gcounter(GCounterDelta {
                                    increment: (-3i64) as u64,
                                })),
                            ),
                            "unknown-reply" => reply(c.id + 100, None),
                            "headers" => with_headers(reply(c.id, None)),
                            "crash" => return,
                            _ => reply(c.id, None),
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the saboteur on a port of 127.0.0.1, in a task of `rt`; returns its address.
pub fn spawn(rt: &tokio::runtime::Runtime, s: &Saboteur) -> std::net::SocketAddr {
    let s = s.clone();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(serve(s, l));
        a
    })
}

/// Serves the saboteur on `listener`.
pub async fn serve(
    s: Saboteur,
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    crate::model_uf::serve_user_function(s, listener).await
}
