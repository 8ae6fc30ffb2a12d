//! The sending end of routed commands: a client's command for a service that only other nodes
//! serve goes to the node chosen for its entity, and its outcome comes back.
//!
//! The nodes serving the service are tried in their order for the entity (see
//! [`super::directory`]) while the command cannot have run: the node cannot be reached, the
//! exchange cannot be opened or written, or the node answers that it did not run it. Once a
//! node took the command, it is never sent again: losing that node then means UNAVAILABLE with
//! an unknown outcome.

use latticed_proto::latticed::route::{request, response, Command, End, Request, Response};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::wire::Exchange;
use super::Routing;
use crate::entity::streamed::CallGuard;
use crate::entity::{ClientReply, Headers, Outcome, Status, StreamItem, StreamedCall};
use crate::userfn::spec::MethodModel;

/// How many messages of a routed streamed call are buffered for a client that reads slowly
/// (then the exchange pushes back, through QUIC flow control, on the serving node).
const RELAY_BUFFER: usize = 64;

fn lost(node: &str) -> Status {
    Status::unavailable(format!(
        "node {node}, which served the command, went away before it answered; its outcome is unknown"
    ))
}

fn status_of(end: &End) -> Status {
    Status::new(tonic::Code::from(end.code), end.message.clone())
}

fn headers_of(reply: &latticed_proto::latticed::route::Reply) -> Headers {
    reply
        .headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect()
}

/// Counts a routed command by how it ended (a streamed one: by how it started).
fn counted<T>(outcome: Result<T, Status>) -> Result<T, Status> {
    let code = outcome.as_ref().err().map_or(tonic::Code::Ok, |s| s.code);
    metrics::counter!(crate::metrics::ROUTED_COMMANDS, "direction" => "out",
        "outcome" => crate::metrics::outcome_name(code))
    .increment(1);
    outcome
}

/// A command a node took: that node's name, the exchange, and the reply to the command.
struct Taken {
    node: String,
    exchange: Exchange,
    reply: latticed_proto::latticed::route::Reply,
}

impl Routing {
    /// Runs a unary command on the node serving its entity.
    pub async fn command(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Outcome {
        let taken = self
            .send(service, method, payload, entity_id, deadline)
            .await;
        counted(taken.map(|t| ClientReply {
            headers: headers_of(&t.reply),
            message: t.reply.message.map(|m| m.to_vec()),
        }))
    }

    /// Starts a server-streamed command on the node serving its entity; dropping the call
    /// cancels it there.
    pub async fn command_streamed(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<StreamedCall, Status> {
        counted(
            self.start_streamed(service, method, payload, entity_id, deadline)
                .await,
        )
    }

    async fn start_streamed(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<StreamedCall, Status> {
        let Taken {
            node,
            mut exchange,
            reply,
        } = self
            .send(service, method, payload, entity_id, deadline)
            .await?;
        let (headers_tx, headers) = oneshot::channel();
        let _ = headers_tx.send(headers_of(&reply));
        let (tx, outcomes) = mpsc::channel::<StreamItem>(RELAY_BUFFER);
        let relay = tokio::spawn(async move {
            loop {
                let item = match exchange.next::<Response>().await {
                    Ok(Some(Response {
                        kind: Some(response::Kind::Message(m)),
                    })) => Ok(Some(m.to_vec())),
                    Ok(Some(Response {
                        kind: Some(response::Kind::End(end)),
                    })) => {
                        if end.code != 0 {
                            let _ = tx.send(Err(status_of(&end))).await;
                        }
                        return;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => Err(lost(&node)),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(StreamedCall {
            outcomes,
            headers,
            _guard: CallGuard::Relay(relay.abort_handle()),
        })
    }

    /// Sends the command to the first node that takes it, and waits for its reply.
    async fn send(
        &self,
        service: &str,
        method: &MethodModel,
        payload: Vec<u8>,
        entity_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<Taken, Status> {
        let entity_id = match entity_id {
            Some(id) => id,
            None => method
                .entity_id(&payload)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        let nodes = self.nodes_for(service, &entity_id);
        if nodes.is_empty() {
            return Err(Status::unimplemented(format!(
                "no node of the cluster serves service {service}"
            )));
        }
        let payload = bytes::Bytes::from(payload);
        let mut last = None;
        for (node, addr) in nodes {
            let timeout_micros = match deadline {
                None => 0,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Status::deadline_exceeded(
                            "the deadline passed before the command was sent",
                        ));
                    }
                    u64::try_from(left.as_micros()).unwrap_or(u64::MAX).max(1)
                }
            };
            let request = Request {
                kind: Some(request::Kind::Command(Command {
                    service: service.to_string(),
                    method: method.name.clone(),
                    payload: payload.clone(),
                    timeout_micros,
                })),
            };
            let (send, recv) = match self.inner.transport.open_call(addr).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "cannot route to node; trying the next");
                    last = Some(Status::unavailable(format!(
                        "no node serving {service} could be reached (last: {e})"
                    )));
                    continue;
                }
            };
            let mut exchange = Exchange::new(send, recv);
            if let Err(e) = exchange.send(&request).await {
                tracing::debug!(%node, error = %e, "routed command not sent; trying the next");
                last = Some(Status::unavailable(format!(
                    "no node serving {service} could be reached (last: {e})"
                )));
                continue;
            }
            exchange.finish();
            let first = match exchange.next::<Response>().await {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => return Err(lost(&node)),
            };
            return match first.kind {
                Some(response::Kind::Reply(reply)) => Ok(Taken {
                    node,
                    exchange,
                    reply,
                }),
                Some(response::Kind::End(end)) if end.not_run => {
                    tracing::debug!(%node, reason = %end.message, "routed command not run; trying the next");
                    last = Some(status_of(&end));
                    continue;
                }
                Some(response::Kind::End(end)) if end.code != 0 => Err(status_of(&end)),
                _ => Err(lost(&node)),
            };
        }
        Err(last.unwrap_or_else(|| {
            Status::unimplemented(format!("no node of the cluster serves service {service}"))
        }))
    }
}
