//! Metrics: the Prometheus recorder and every metric name the daemon exports.
//!
//! The recorder is process-wide (the `metrics` facade has one global recorder); `/metrics`
//! renders it. Names start with `latticed_`; the constants below are the single place they are
//! spelled.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// gauge, label `state`: members by state, this node included
pub const MEMBERS: &str = "latticed_members";
/// gauge: open QUIC connections to peers
pub const PEER_CONNECTIONS: &str = "latticed_peer_connections";
/// counter: SWIM datagrams sent
pub const SWIM_SENT: &str = "latticed_swim_messages_sent_total";
/// counter: SWIM datagrams received
pub const SWIM_RECEIVED: &str = "latticed_swim_messages_received_total";
/// counter, label `reason`: QUIC/TLS handshakes that failed (either direction)
pub const HANDSHAKE_FAILURES: &str = "latticed_handshake_failures_total";
/// counter, label `reason`: datagrams, frames or streams from peers that were dropped
pub const REJECTED_FRAMES: &str = "latticed_rejected_frames_total";
/// gauge, label `version`: always 1
pub const BUILD_INFO: &str = "latticed_build_info";
/// gauge, label `service`: active entities (one task, and one `handle` stream, each)
pub const ENTITIES_ACTIVE: &str = "latticed_entities_active";
/// counter, labels `service`, `method`, `outcome` (`ok` or the gRPC code's name): commands
/// from clients
pub const COMMANDS: &str = "latticed_commands_total";
/// histogram, labels `service`, `method`: seconds from a unary command's arrival to its outcome
pub const COMMAND_SECONDS: &str = "latticed_command_duration_seconds";
/// gauge, label `address`: 1 while a user function answers discovery, else 0
pub const USERFN_UP: &str = "latticed_userfn_up";
/// counter, labels `protocol` (`grpc`, `grpc-web`, `http`), `service`, `method`, `code` (the
/// gRPC status code's name, e.g. `Ok`, `Unknown`): front-end calls of discovered methods by
/// how they ended; a server-streamed call by how it opened
pub const FRONTEND_REQUESTS: &str = "latticed_frontend_requests_total";
/// histogram, label `protocol`: seconds from a unary front-end call's request to its answer
pub const FRONTEND_REQUEST_SECONDS: &str = "latticed_frontend_request_seconds";
/// counter: TLS handshakes of front-end clients that failed
pub const FRONTEND_TLS_FAILURES: &str = "latticed_frontend_tls_handshake_failures_total";
/// counter, label `reason` (`token`, `source`): user-function registration calls refused
pub const REGISTRATION_REFUSALS: &str = "latticed_registration_refusals_total";
/// counter, label `reason` (`source`, `token`): admin inspect requests (/v1/keys...) refused
pub const ADMIN_REFUSALS: &str = "latticed_admin_refusals_total";
/// counter, labels `direction` (`out`: this node sent a client's command to the node serving
/// its service; `in`: this node ran one for another node) and `outcome` (`ok` or the gRPC
/// code's name, lower case; a streamed command by how it started)
pub const ROUTED_COMMANDS: &str = "latticed_routed_commands_total";
/// gauge: services this node serves only through other nodes (their user functions)
pub const REMOTE_SERVICES: &str = "latticed_remote_services";

/// Histogram buckets (seconds): every histogram is exported with them, so that it can be
/// aggregated across nodes.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A gRPC status code's name as the `code` labels spell it (`Ok`, `DeadlineExceeded`, ...):
/// a static string, so that counting a call allocates nothing for it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The `outcome` label of a command (`ok`, or the code's name in lower case, e.g.
/// `deadlineexceeded`).
pub fn outcome_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalidargument",
        DeadlineExceeded => "deadlineexceeded",
        NotFound => "notfound",
        AlreadyExists => "alreadyexists",
        PermissionDenied => "permissiondenied",
        ResourceExhausted => "resourceexhausted",
        FailedPrecondition => "failedprecondition",
        Aborted => "aborted",
        OutOfRange => "outofrange",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "dataloss",
        Unauthenticated => "unauthenticated",
    }
}

/// The metric handles of one method's successful calls, registered on first use: counting a
/// call then increments an atomic instead of building a labelled key and looking it up.
/// Failures (rare) are counted through the registry as before.
pub struct MethodMetrics {
    service: String,
    method: String,
    commands_ok: OnceLock<metrics::Counter>,
    command_seconds: OnceLock<metrics::Histogram>,
    /// `latticed_frontend_requests_total{code="Ok"}` by protocol (grpc, grpc-web, http)
    requests_ok: [OnceLock<metrics::Counter>; 3],
}

impl std::fmt::Debug for MethodMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MethodMetrics({}/{})", self.service, self.method)
    }
}

impl MethodMetrics {
    /// The handles of `service`'s method `method`.
    pub fn new(service: &str, method: &str) -> Self {
        MethodMetrics {
            service: service.to_string(),
            method: method.to_string(),
            commands_ok: OnceLock::new(),
            command_seconds: OnceLock::new(),
            requests_ok: Default::default(),
        }
    }

    /// [`COMMANDS`] with outcome `ok`.
    pub fn commands_ok(&self) -> &metrics::Counter {
        self.commands_ok.get_or_init(|| {
            metrics::counter!(COMMANDS, "service" => self.service.clone(),
                "method" => self.method.clone(), "outcome" => "ok")
        })
    }

    /// [`COMMAND_SECONDS`].
    pub fn command_seconds(&self) -> &metrics::Histogram {
        self.command_seconds.get_or_init(|| {
            metrics::histogram!(COMMAND_SECONDS, "service" => self.service.clone(),
                "method" => self.method.clone())
        })
    }

    /// [`FRONTEND_REQUESTS`] with code `Ok` for `protocol` (index 0, 1, 2 for its label).
    pub fn requests_ok(&self, protocol: usize, label: &'static str) -> &metrics::Counter {
        self.requests_ok[protocol.min(2)].get_or_init(|| {
            metrics::counter!(FRONTEND_REQUESTS, "protocol" => label,
                "service" => self.service.clone(), "method" => self.method.clone(), "code" => "Ok")
        })
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process) and returns the handle `/metrics` renders.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = || {
                let b = PrometheusBuilder::new();
                b.set_buckets(SECONDS_BUCKETS)
                    .unwrap_or_else(|_| PrometheusBuilder::new())
            };
            let handle = builder()
                .install_recorder()
                .unwrap_or_else(|_| builder().build_recorder().handle());
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!(MEMBERS, "Cluster members by state, this node included");
    metrics::describe_gauge!(PEER_CONNECTIONS, "Open QUIC connections to peers");
    metrics::describe_gauge!(
        REPLICATION_STREAMS,
        "Replication streams: out, one writer per peer; in, streams from peers"
    );
    metrics::describe_counter!(SWIM_SENT, "SWIM datagrams sent");
    metrics::describe_counter!(SWIM_RECEIVED, "SWIM datagrams received");
    metrics::describe_counter!(HANDSHAKE_FAILURES, "Failed QUIC/TLS handshakes with peers");
    metrics::describe_counter!(
        REJECTED_FRAMES,
        "Datagrams, frames or streams from peers that were dropped"
    );
    metrics::describe_gauge!(BUILD_INFO, "Build information");
    metrics::describe_counter!(
        COMMANDS,
        "Commands from clients, by service, method and outcome"
    );
    metrics::describe_histogram!(
        COMMAND_SECONDS,
        metrics::Unit::Seconds,
        "Seconds from a unary command's arrival to its outcome"
    );
    metrics::describe_counter!(
        FRONTEND_REQUESTS,
        "Client calls of discovered methods by protocol, method and gRPC status code"
    );
    metrics::describe_histogram!(
        FRONTEND_REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Seconds from a unary client call's request to its answer"
    );
    metrics::describe_counter!(
        FRONTEND_TLS_FAILURES,
        "TLS handshakes of front-end clients that failed"
    );
    metrics::describe_counter!(
        REGISTRATION_REFUSALS,
        "User-function registration calls refused, by reason"
    );
    metrics::describe_counter!(
        ADMIN_REFUSALS,
        "Admin inspect requests (/v1/keys...) refused, by reason"
    );
    metrics::describe_gauge!(
        USERFN_UP,
        "1 while a user function answers discovery, else 0"
    );
    metrics::describe_histogram!(
        STORE_COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Seconds one batch of the data file took to commit (one transaction, one fsync)"
    );
    metrics::describe_counter!(
        STORE_KEYS_WRITTEN,
        "Key records written to (or removed from) the data file"
    );
    metrics::describe_gauge!(
        ENTITIES_ACTIVE,
        "Active entities (each with its task and its handle stream to the user function)"
    );
}

/// gauge: replication streams, `direction` = `out` (writers) or `in`
pub const REPLICATION_STREAMS: &str = "latticed_replication_streams";
/// gauge: keys in the store (tombstones included)
pub const KEYS: &str = "latticed_keys";
/// counter: entries sent in delta batches
pub const DELTAS_SENT: &str = "latticed_deltas_sent_total";
/// counter: entries received in delta batches
pub const DELTAS_RECEIVED: &str = "latticed_deltas_received_total";
/// counter: replication frame bytes sent
pub const REPLICATION_BYTES_SENT: &str = "latticed_replication_bytes_sent_total";
/// counter: replication frame bytes received
pub const REPLICATION_BYTES_RECEIVED: &str = "latticed_replication_bytes_received_total";
/// gauge: bytes held by the delta buffer
pub const DELTA_BUFFER_BYTES: &str = "latticed_delta_buffer_bytes";
/// counter: full states sent (lagging peers, anti-entropy)
pub const FULL_SYNCS: &str = "latticed_full_syncs_total";
/// counter: anti-entropy rounds started
pub const ANTI_ENTROPY_ROUNDS: &str = "latticed_anti_entropy_rounds_total";
/// counter: MAJORITY / ALL writes that timed out
pub const WRITE_CONSISTENCY_FAILURES: &str = "latticed_write_consistency_failures_total";
/// histogram: seconds from a write to a peer's ack
pub const REPLICATION_ACK_SECONDS: &str = "latticed_replication_ack_seconds";
/// histogram: seconds one batch of the data file took to commit (one transaction, one fsync)
pub const STORE_COMMIT_SECONDS: &str = "latticed_store_commit_seconds";
/// counter: key records written to (or removed from) the data file
pub const STORE_KEYS_WRITTEN: &str = "latticed_store_keys_written_total";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_labels_spell_the_codes_as_before() {
        for n in 0..=16 {
            let code = tonic::Code::from(n);
            assert_eq!(code_name(code), format!("{code:?}"));
            let lower = if code == tonic::Code::Ok {
                "ok".to_string()
            } else {
                format!("{code:?}").to_lowercase()
            };
            assert_eq!(outcome_name(code), lower);
        }
    }
}
