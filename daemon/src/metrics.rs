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

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process) and returns the handle `/metrics` renders.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!(MEMBERS, "Cluster members by state, this node included");
    metrics::describe_gauge!(PEER_CONNECTIONS, "Open QUIC connections to peers");
    metrics::describe_counter!(SWIM_SENT, "SWIM datagrams sent");
    metrics::describe_counter!(SWIM_RECEIVED, "SWIM datagrams received");
    metrics::describe_counter!(HANDSHAKE_FAILURES, "Failed QUIC/TLS handshakes with peers");
    metrics::describe_counter!(
        REJECTED_FRAMES,
        "Datagrams, frames or streams from peers that were dropped"
    );
    metrics::describe_gauge!(BUILD_INFO, "Build information");
    metrics::describe_gauge!(
        ENTITIES_ACTIVE,
        "Active entities (each with its task and its handle stream to the user function)"
    );
}

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
