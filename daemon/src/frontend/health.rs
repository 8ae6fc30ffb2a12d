//! `grpc.health.v1.Health` on the front-end, reflecting readiness: the server (`""`) and every
//! discovered service answer NOT_SERVING until the node's first complete sync with a peer (a
//! node without peers is synced from the start), SERVING from then on; a user function's
//! services answer NOT_SERVING while it does not answer discovery (it went away), SERVING again
//! when it is back. The front-end itself binds only after every user function is discovered.

use std::time::Duration;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use super::Frontend;
use crate::replication::ReplicationHandle;

/// How often the sync state is looked at until the first sync is complete.
const SYNC_POLL: Duration = Duration::from_millis(250);

/// The health service for `frontend`'s services, following `replication`'s first sync, and
/// its reporter (for services registered later).
pub async fn service(
    frontend: &Frontend,
    replication: ReplicationHandle,
) -> (HealthReporter, HealthServer<HealthService>) {
    let mut names = vec![String::new()];
    for e in frontend.user_functions().iter() {
        names.extend(
            e.model()
                .entities
                .iter()
                .map(|entity| entity.service.full_name().to_string()),
        );
    }
    let reporter = HealthReporter::new();
    set(&reporter, &names, status(&replication)).await;
    if !replication.is_synced() {
        let reporter = reporter.clone();
        let replication = replication.clone();
        tokio::spawn(async move {
            while !replication.is_synced() {
                tokio::time::sleep(SYNC_POLL).await;
            }
            set(&reporter, &names, ServingStatus::Serving).await;
        });
    }
    // each user function's services follow whether it answers
    for e in frontend.user_functions().iter() {
        let services: Vec<String> = e
            .model()
            .entities
            .iter()
            .map(|entity| entity.service.full_name().to_string())
            .collect();
        let mut up = e.up();
        let (reporter, replication) = (reporter.clone(), replication.clone());
        tokio::spawn(async move {
            while up.changed().await.is_ok() {
                let status = if *up.borrow_and_update() {
                    status(&replication)
                } else {
                    ServingStatus::NotServing
                };
                set(&reporter, &services, status).await;
            }
        });
    }
    let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    (reporter, server)
}

fn status(replication: &ReplicationHandle) -> ServingStatus {
    if replication.is_synced() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

async fn set(reporter: &HealthReporter, names: &[String], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(name.as_str(), status).await;
    }
}
