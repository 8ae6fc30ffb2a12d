//! The serving end of routing exchanges: another node asks what this node serves, or sends a
//! client's command to run on one of this node's user functions.
//!
//! A command runs here or nowhere: it is never routed on. One this node cannot take (its
//! service is not served here, or the node is shutting down) is answered as not run, so that
//! the sender may try another node. A streamed call ends when its sender stops reading (its
//! client went away), which cancels it on the entity.

use std::time::Duration;

use latticed_proto::latticed::route::{
    request, response, Command, End, Header, Reply, Request, Response, Services,
};
use tokio::time::Instant;

use super::wire::Exchange;
use super::{digest_of, Routing, ASK_TIMEOUT};
use crate::entity::{ClientReply, Status};
use crate::transport::InboundCall;

/// Serves one exchange; its request is read while holding a turn of `reading`.
pub(super) async fn serve(
    routing: Routing,
    call: InboundCall,
    reading: std::sync::Arc<tokio::sync::Semaphore>,
) {
    let from = call.from;
    let mut ex = Exchange::new(call.send, call.recv);
    let read = async {
        let _turn = reading.acquire().await;
        ex.next::<Request>().await
    };
    let req = match tokio::time::timeout(ASK_TIMEOUT, read).await {
        Ok(Ok(Some(r))) => r,
        Ok(Err(e)) => {
            reject(from, "undecodable", &e.to_string());
            return;
        }
        Ok(Ok(None)) | Err(_) => {
            reject(from, "no_request", "no request");
            return;
        }
    };
    match req.kind {
        Some(request::Kind::Services(q)) => {
            let specs = routing.local().map(|l| l.specs()).unwrap_or_default();
            let digest = digest_of(&specs);
            let unchanged = q.known == digest;
            let services = Services {
                digest,
                unchanged,
                specs: if unchanged {
                    Vec::new()
                } else {
                    specs.into_iter().map(|(_, s)| s).collect()
                },
            };
            let _ = ex
                .send(&Response {
                    kind: Some(response::Kind::Services(services)),
                })
                .await;
            ex.finish();
        }
        Some(request::Kind::Command(c)) => {
            let end = run(&routing, &mut ex, c).await;
            if let Some(end) = end {
                let _ = ex
                    .send(&Response {
                        kind: Some(response::Kind::End(end)),
                    })
                    .await;
            }
            ex.finish();
        }
        None => reject(from, "undecodable", "an empty request"),
    }
}

fn reject(from: std::net::SocketAddr, reason: &'static str, detail: &str) {
    metrics::counter!(crate::metrics::REJECTED_FRAMES, "reason" => reason).increment(1);
    tracing::debug!(peer = %from, detail, "routing exchange refused");
}

/// Counts a routed command by how it ended (a streamed one: by how it started).
fn count(end: End) -> End {
    let outcome = crate::metrics::outcome_name(tonic::Code::from(end.code));
    metrics::counter!(crate::metrics::ROUTED_COMMANDS, "direction" => "in", "outcome" => outcome)
        .increment(1);
    end
}

/// The end of an exchange with `status`.
pub(super) fn end_of(status: &Status, not_run: bool) -> End {
    End {
        code: status.code as i32,
        message: status.message.clone(),
        not_run,
    }
}

fn ok() -> End {
    End {
        code: 0,
        message: String::new(),
        not_run: false,
    }
}

/// A reply as it travels.
pub(super) fn reply_of(reply: ClientReply) -> Reply {
    Reply {
        message: reply.message.map(bytes::Bytes::from),
        headers: reply
            .headers
            .into_iter()
            .map(|(name, value)| Header { name, value })
            .collect(),
    }
}

/// Runs a routed command on the local user function; the end to send (none: the sender went
/// away).
async fn run(routing: &Routing, ex: &mut Exchange, c: Command) -> Option<End> {
    let not_here = || {
        let status = Status::unimplemented(format!(
            "service {} is not served on node {}",
            c.service,
            routing.me()
        ));
        Some(count(end_of(&status, true)))
    };
    let Some(local) = routing.local() else {
        return not_here();
    };
    let Some((entities, method)) = local.find(&c.service, &c.method) else {
        return not_here();
    };
    if entities.is_draining() {
        let status = Status::unavailable(format!("node {} is shutting down", routing.me()));
        return Some(count(end_of(&status, true)));
    }
    let deadline = match c.timeout_micros {
        0 => None,
        us => Instant::now().checked_add(Duration::from_micros(us)),
    };
    let expired = || {
        Some(end_of(
            &Status::deadline_exceeded(
                "the deadline passed while the command ran; its outcome is unknown",
            ),
            false,
        ))
    };
    let failed = |status: &Status| Some(count(end_of(status, false)));
    let payload = c.payload.to_vec();
    let stopped = ex.stopped();
    if !method.streamed {
        let command = entities.command(&c.service, &method, payload, None);
        let outcome = tokio::select! {
            o = within(deadline, command) => o,
            () = stopped => return None,
        };
        let Some(outcome) = outcome else {
            return expired().map(count);
        };
        return match outcome {
            Ok(reply) => {
                let sent = ex
                    .send(&Response {
                        kind: Some(response::Kind::Reply(reply_of(reply))),
                    })
                    .await;
                sent.ok().map(|()| count(ok()))
            }
            Err(status) => failed(&status),
        };
    }
    let started = within(
        deadline,
        entities.command_streamed(&c.service, &method, payload, None),
    );
    let mut call = match started.await {
        None => return expired().map(count),
        Some(Err(status)) => return failed(&status),
        Some(Ok(call)) => call,
    };
    let headers = tokio::select! {
        h = within(deadline, &mut call.headers) => match h {
            None => return expired().map(count),
            Some(h) => h.unwrap_or_default(),
        },
        () = ex.stopped() => return None,
    };
    let first = Response {
        kind: Some(response::Kind::Reply(Reply {
            message: None,
            headers: headers
                .into_iter()
                .map(|(name, value)| Header { name, value })
                .collect(),
        })),
    };
    ex.send(&first).await.ok()?;
    count(ok());
    let until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let stopped = ex.stopped();
    tokio::pin!(stopped);
    loop {
        let item = tokio::select! {
            item = call.outcomes.recv() => item,
            () = &mut stopped => return None,
            () = &mut until => return expired(),
        };
        match item {
            None => return Some(ok()),
            Some(Ok(None)) => continue,
            Some(Ok(Some(m))) => {
                let msg = Response {
                    kind: Some(response::Kind::Message(bytes::Bytes::from(m))),
                };
                ex.send(&msg).await.ok()?;
            }
            Some(Err(status)) => return Some(end_of(&status, false)),
        }
    }
}

/// `f`'s output, or none when `deadline` passes first.
async fn within<F: std::future::Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}
