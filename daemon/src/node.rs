//! Node: one running latticed, wired from its configuration, and its orderly shutdown.
//!
//! Startup order: TLS material, the data file (`--data-dir`, waiting while another process
//! holds it), metrics, the QUIC endpoint, membership, replication, the admin endpoint.
//! Shutdown (SIGTERM/SIGINT): drain the entities (see [`Node::shutdown`]), send pending deltas
//! (and wait, bounded, for their acks), record the clean end in the data file, leave the
//! cluster, give the leave a moment to go out, close the connections, stop the admin endpoint.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use latticed_membership::{Membership, MembershipConfig, NodeId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::certs;
use crate::cluster::{Cluster, Seeds};
use crate::config::RunArgs;
use crate::error::DaemonError;
use crate::replication::{Identity, Replication, ReplicationConfig, ReplicationHandle};
use crate::store::disk::{self, ClusterId, DataFile, Expect, Loaded};
use crate::store::Persistence;
use crate::transport::Transport;

/// How often a served user function is asked for its spec (to notice it went away and came
/// back, perhaps changed).
const USER_FUNCTION_CHECK: Duration = Duration::from_secs(2);

/// How long the leave notices get to leave the host before connections close.
const LEAVE_FLUSH: Duration = Duration::from_millis(150);

/// How long, at most, the leave and the closing of connections take after the drain.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

/// How long a starting node waits for another process to release its data file (two pods
/// overlapping in a rolling update) before it gives up.
const DATA_DIR_WAIT: Duration = Duration::from_secs(300);

/// Opens the data dir (waiting while another process holds it) and says what it held.
async fn open_data_dir(
    dir: &std::path::Path,
    expect: Expect,
) -> Result<(DataFile, Loaded), DaemonError> {
    let dir = dir.to_path_buf();
    let shown = dir.display().to_string();
    tracing::info!(data_dir = %shown, "opening the data file");
    let started = std::time::Instant::now();
    let (file, loaded) =
        tokio::task::spawn_blocking(move || disk::open_waiting(&dir, &expect, DATA_DIR_WAIT))
            .await
            .map_err(|e| DaemonError::Config(format!("opening the data dir: {e}")))??;
    if loaded.created {
        tracing::info!(file = %file.path().display(), replica = loaded.replica,
            "new data file: a new replica");
    } else if let Some(previous) = loaded.replaced {
        tracing::info!(file = %file.path().display(), replica = loaded.replica, previous_replica = previous,
            keys = loaded.records.len(), life = loaded.lives,
            previous_life = "ended without a clean shutdown (crash, kill -9, power loss): nothing acknowledged was lost",
            took_ms = started.elapsed().as_millis() as u64,
            "data file loaded: resuming as a fresh replica (the previous life may have sent deltas it had not committed; its data is kept, and what peers hold of it comes back)");
    } else {
        tracing::info!(file = %file.path().display(), replica = loaded.replica,
            keys = loaded.records.len(), life = loaded.lives, previous_life = "ended cleanly",
            took_ms = started.elapsed().as_millis() as u64,
            "data file loaded: resuming as the same replica");
    }
    Ok((file, loaded))
}

/// Logs a failed commit and ends the process: after a failed fsync, what the disk holds is
/// unknown, and nothing may be acknowledged any more.
fn disk_failure(e: disk::DiskError) {
    tracing::error!(error = %e, "the data file failed: exiting");
    eprintln!("latticed: {e}");
    std::process::exit(crate::cli::EXIT_DISK);
}

/// 64 random bits from the operating system.
fn random_u64() -> Result<u64, DaemonError> {
    getrandom::u64().map_err(|e| DaemonError::Entropy(e.to_string()))
}

/// A running node.
pub struct Node {
    /// this node's identity
    pub id: NodeId,
    /// the bound QUIC address
    pub cluster_addr: SocketAddr,
    /// the bound admin address
    pub admin_addr: SocketAddr,
    /// the replication API (write, read, subscribe)
    pub replication: ReplicationHandle,
    /// the front-end's address once every user function is discovered and it is serving
    pub frontend: watch::Receiver<Option<SocketAddr>>,
    cluster: Cluster,
    transport: Transport,
    admin_stop: oneshot::Sender<()>,
    admin_task: JoinHandle<()>,
    grace: Duration,
    /// the front-end and its user functions, once serving (drained on shutdown)
    frontend_served: Arc<Mutex<Option<crate::frontend::Frontend>>>,
    /// tells the front-end to stop taking connections and drain
    frontend_drain: Option<oneshot::Sender<()>>,
    draining: Arc<AtomicBool>,
}

impl Node {
    /// Starts a node.
    pub async fn start(args: &RunArgs) -> Result<Node, DaemonError> {
        args.validate()?;
        let name = args.resolved_node_name();
        let tls = match (&args.ca_cert, &args.cert, &args.key) {
            (Some(ca), Some(cert), Some(key)) => certs::load(ca, cert, key)?,
            _ => {
                tracing::warn!(
                    "no --ca-cert/--cert/--key: running alone on an ephemeral self-signed \
                     certificate; no peer can join this node"
                );
                certs::ephemeral(&name)?
            }
        };
        // the data file first: a second process on it waits here, before it binds anything
        let data = match &args.data_dir {
            Some(dir) => {
                let expect = Expect {
                    node_name: name.clone(),
                    cluster: if tls.ephemeral {
                        ClusterId::Lone
                    } else {
                        ClusterId::of_cas(tls.ca.iter().map(|c| c.as_ref()))
                    },
                    tombstone_ttl: args.tombstone_ttl,
                    now_ms: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                    new_replica: random_u64()?,
                };
                Some(open_data_dir(dir, expect).await?)
            }
            None => {
                tracing::info!(
                    "no --data-dir: state is in memory only; a restarted node starts empty, as \
                     a new replica, and catches up from its peers"
                );
                None
            }
        };
        let metrics = crate::metrics::install();
        let (datagram_tx, datagram_rx) = mpsc::channel(4096);
        let (frame_tx, frame_rx) = mpsc::channel(4096);
        let (call_tx, call_rx) = mpsc::channel(crate::routing::INBOUND_QUEUE);
        let transport = Transport::bind(args.cluster_addr, &tls, datagram_tx, frame_tx, call_tx)?;
        let bound = transport.local_addr()?;
        let advertise = args
            .advertise_addr
            .unwrap_or(if bound.ip().is_unspecified() {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
            } else {
                bound
            });
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = NodeId::new(name, advertise, now.as_millis() as u64);
        let config = MembershipConfig {
            probe_period: args.probe_period,
            probe_rtt: args.probe_period / 2,
            suspect_to_down_after: args.suspect_timeout,
            remove_down_after: args.remove_down_after,
            ..MembershipConfig::default()
        };
        let membership = Membership::new(id.clone(), &config, random_u64()?);
        let seeds = Seeds {
            join: args.join.clone(),
            join_dns: args.join_dns.clone(),
            dns_interval: args.join_dns_interval,
        };
        let cluster = Cluster::start(membership, transport.clone(), datagram_rx, seeds);
        let routing =
            crate::routing::Routing::start(&id.name, transport.clone(), cluster.members(), call_rx);
        // without a data file, a fresh replica id per process (a restarted node never reuses
        // old counters); with one, the stored id (its counters were stored with it). A fresh
        // epoch per life either way, both from OS randomness
        let replica = match &data {
            Some((_, loaded)) => loaded.replica,
            None => random_u64()?,
        };
        let persistence = data.map(|(file, loaded)| Persistence {
            records: loaded.records,
            durable: Box::new(file),
            on_fatal: Box::new(disk_failure),
        });
        let identity = Identity {
            name: id.name.clone(),
            replica,
            epoch: random_u64()?,
        };
        let replication = Replication::start(
            identity,
            random_u64()?,
            !args.has_peers(),
            ReplicationConfig {
                batch_window: args.batch_window,
                anti_entropy_interval: args.anti_entropy_interval,
                write_timeout: args.write_timeout,
                buffer_max_bytes: args.delta_buffer_bytes,
                full_state: args.replicate_full_state,
                tombstone_ttl: args.tombstone_ttl,
                ..ReplicationConfig::default()
            },
            transport.clone(),
            frame_rx,
            cluster.members(),
            persistence,
        )
        .handle();

        let (frontend_tx, frontend) = watch::channel(None);
        let served = Arc::new(Mutex::new(None));
        let draining = Arc::new(AtomicBool::new(false));
        let (drain_tx, drain_rx) = oneshot::channel::<()>();
        let user_functions = args.user_functions();
        let registration = crate::frontend::registration::Access::from_flags(
            args.registration_token_file.as_deref(),
            &args.registration_allow,
        )?;
        if user_functions.is_empty() && registration.is_none() {
            tracing::info!(
                "no user function configured (--user-function none): the front-end serves the \
                 services of other nodes' user functions"
            );
        }
        {
            let entities = crate::entity::Config {
                passivate_after: args.passivation_timeout,
                relay_timeout: args.relay_timeout,
                max_in_flight: args.max_commands_per_entity as usize,
                max_entities: args.max_entities_per_user_function as usize,
                max_message_to_uf: args.user_function_max_message as usize,
                streams_per_connection: args.user_function_streams_per_connection as usize,
                ..crate::entity::Config::default()
            };
            crate::memory::spawn();
            tokio::spawn(serve_user_functions(
                user_functions,
                FrontendSettings {
                    listen: args.listen,
                    limits: crate::frontend::Limits {
                        max_entity_id_bytes: args.max_entity_id_bytes,
                        max_request_bytes: crate::frontend::MAX_REQUEST,
                    },
                    registration,
                    connections: crate::frontend::connection::Settings {
                        idle_timeout: args.client_idle_timeout,
                        tls: match (&args.listen_tls_cert, &args.listen_tls_key) {
                            (Some(cert), Some(key)) => Some(crate::frontend::tls::server_config(
                                cert,
                                key,
                                args.listen_tls_client_ca.as_deref(),
                            )?),
                            _ => None,
                        },
                    },
                    routing,
                },
                entities,
                replication.clone(),
                frontend_tx,
                served.clone(),
                async move {
                    let _ = drain_rx.await;
                },
            ));
        }

        let listener = tokio::net::TcpListener::bind(args.admin_addr)
            .await
            .map_err(|e| {
                DaemonError::io(
                    format!("binding the admin endpoint on tcp {}", args.admin_addr),
                    e,
                )
            })?;
        let admin_addr = listener
            .local_addr()
            .map_err(|e| DaemonError::io("reading the admin endpoint address", e))?;
        let router = admin::router(
            AdminState {
                cluster: cluster.view(),
                metrics,
                replication: replication.clone(),
                frontend: frontend.clone(),
                serves_user_functions: !args.user_functions().is_empty(),
                draining: draining.clone(),
            },
            admin::InspectAccess::from_flags(
                &args.admin_inspect_allow,
                args.admin_inspect_token_file.as_deref(),
            )?,
        );
        let (admin_stop, stop_rx) = oneshot::channel::<()>();
        let admin_task = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            let serve = axum::serve(listener, service).with_graceful_shutdown(async {
                let _ = stop_rx.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
        tracing::info!(node = %id.name, cluster = %bound, advertise = %advertise,
            admin = %admin_addr, incarnation = id.incarnation, replica, tls = if tls.ephemeral { "ephemeral" } else { "cluster CA" },
            data_dir = %args.data_dir.as_ref().map_or("none (memory only)".to_string(), |d| d.display().to_string()),
            "node started");
        Ok(Node {
            id,
            cluster_addr: bound,
            admin_addr,
            replication,
            frontend,
            cluster,
            transport,
            admin_stop,
            admin_task,
            grace: args.shutdown_grace,
            frontend_served: served,
            frontend_drain: Some(drain_tx),
            draining,
        })
    }

    /// Stops gracefully: not ready any more; clients' new commands are refused with
    /// UNAVAILABLE (they retry on another node) while the ones in flight finish and every
    /// entity passivates, within the configured grace period; then pending deltas go to the
    /// peers (waiting, bounded, for their acks), the node leaves the cluster and stops
    /// everything.
    pub async fn shutdown(mut self) {
        self.draining.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.grace;
        // the front-end closes its listener and sends GOAWAY; calls in progress go on
        if let Some(drain) = self.frontend_drain.take() {
            let _ = drain.send(());
        }
        let served = self
            .frontend_served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let user_functions = served.map(|f| f.user_functions()).unwrap_or_default();
        for uf in user_functions.iter() {
            let left = uf.drain(deadline).await;
            if left > 0 {
                tracing::warn!(
                    entities = left,
                    "entities still active at the end of the shutdown grace"
                );
            }
        }
        // the flush, the leave and the close get their own short bound: the grace went to
        // the drain
        let close = self.grace.min(CLOSE_BOUND);
        if tokio::time::timeout(close, self.replication.flush())
            .await
            .is_err()
        {
            tracing::warn!("not every pending delta was acknowledged before the leave");
        }
        if tokio::time::timeout(close, self.replication.close())
            .await
            .is_err()
        {
            tracing::warn!("the clean shutdown could not be recorded in the data file in time");
        }
        self.cluster.leave().await;
        tokio::time::sleep(LEAVE_FLUSH.min(close)).await;
        self.transport.close(close).await;
        let _ = self.admin_stop.send(());
        let _ = tokio::time::timeout(close, self.admin_task).await;
        tracing::info!(node = %self.id.name, "stopped");
    }
}

/// A service offered by two user functions is served by the first (in `--user-function`
/// order); the later one is told with `reportError`, and it is logged.
async fn report_duplicate_services(addrs: &[String], user_functions: &[crate::entity::Entities]) {
    let mut owners: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
    for (addr, e) in addrs.iter().zip(user_functions) {
        for entity in &e.model().entities {
            let service = entity.service.full_name().to_string();
            match owners.get(&service) {
                Some(first) => {
                    let problem = format!(
                        "service {service} is already served by the user function at {first}; \
                         this user function's {service} is not served"
                    );
                    tracing::error!(user_function = %addr, %problem, "duplicate service");
                    crate::userfn::Discovery::new(addr.clone())
                        .report_error(&problem)
                        .await;
                }
                None => {
                    owners.insert(service, addr);
                }
            }
        }
    }
}

/// Streams per connection to the user function at `addr`: at most what its server allows
/// (its SETTINGS_MAX_CONCURRENT_STREAMS, read once at discovery), at most the flag.
async fn honour_stream_limit(
    addr: &str,
    mut entities: crate::entity::Config,
) -> crate::entity::Config {
    let limit = crate::userfn::check::max_concurrent_streams(addr, Duration::from_secs(2)).await;
    if let Some(limit) = limit {
        let per_connection = usize::try_from(limit).unwrap_or(usize::MAX).max(1);
        if per_connection < entities.streams_per_connection {
            tracing::info!(user_function = %addr, max_concurrent_streams = limit,
                "the user function's server caps streams per connection: entities spread over \
                 more connections");
            entities.streams_per_connection = per_connection;
        }
    }
    entities
}

/// Where and how the front-end serves.
struct FrontendSettings {
    listen: SocketAddr,
    limits: crate::frontend::Limits,
    /// who may register user functions (none: registration is off)
    registration: Option<crate::frontend::registration::Access>,
    connections: crate::frontend::connection::Settings,
    /// the services of other nodes
    routing: crate::routing::Routing,
}

/// Discovers every user function, then binds the front-end and serves their services until
/// `shutdown`, then drains.
async fn serve_user_functions(
    addrs: Vec<String>,
    settings: FrontendSettings,
    entities: crate::entity::Config,
    replication: ReplicationHandle,
    ready: watch::Sender<Option<SocketAddr>>,
    served: Arc<Mutex<Option<crate::frontend::Frontend>>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut user_functions = Vec::new();
    for addr in &addrs {
        let model = crate::userfn::Discovery::new(addr.clone()).run().await;
        let entities = honour_stream_limit(addr, entities.clone()).await;
        match crate::entity::Entities::new(addr, model, replication.clone(), entities) {
            Ok(e) => {
                tokio::spawn(e.clone().monitor(USER_FUNCTION_CHECK));
                user_functions.push(e);
            }
            Err(e) => {
                tracing::error!(user_function = %addr, error = %e, "invalid user function address");
                return;
            }
        }
    }
    report_duplicate_services(&addrs, &user_functions).await;
    let listen = settings.listen;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %listen, error = %e, "cannot bind the front-end");
            return;
        }
    };
    let bound = listener.local_addr().unwrap_or(listen);
    let frontend = crate::frontend::Frontend::new(
        addrs.iter().cloned().zip(user_functions).collect(),
        settings.limits,
        Some(settings.routing),
    );
    *served.lock().unwrap_or_else(|p| p.into_inner()) = Some(frontend.clone());
    let (reporter, health) = crate::frontend::health::service(&frontend, replication.clone()).await;
    let registrar = settings.registration.map(|access| {
        let runtime = crate::frontend::registration::Runtime {
            replication,
            entities,
            check_every: USER_FUNCTION_CHECK,
        };
        let r = crate::frontend::registration::Registrar::new(
            frontend.clone(),
            access,
            runtime,
            reporter,
        );
        tokio::spawn(r.clone().expire_leases());
        r
    });
    let router = crate::frontend::FrontendService::new(frontend, health, registrar).router();
    tracing::info!(listen = %bound, "front-end serving");
    ready.send_replace(Some(bound));
    crate::frontend::connection::serve(listener, router, settings.connections, shutdown).await;
}
