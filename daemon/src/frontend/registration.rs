//! Registration of user functions at run time: `latticed.admin.v1.UserFunctions` on the
//! front-end's port (`Register(address, ttl)`, `Deregister`, `List`).
//!
//! A registration is a **lease**: it ends `ttl` after the last `Register` of that address
//! unless renewed, and the user function stops being served (pod addresses are reused, so
//! nothing may outlive its lease). `Register` discovers the user function first and validates
//! its spec as at startup; problems are reported to it with `reportError` and refuse the
//! registration (FAILED_PRECONDITION), as does a service another user function already
//! serves (ALREADY_EXISTS).
//!
//! The port is reachable from every pod on the node, so calls are authenticated: a bearer
//! token (`authorization: Bearer <token>`, the token read from `--registration-token-file`)
//! and/or a source address within `--registration-allow`; with both configured both must hold.
//! Without either, registration is off and the service is not served. Refusals answer
//! UNAUTHENTICATED (token) or PERMISSION_DENIED (source) and are counted in
//! `latticed_registration_refusals_total{reason}`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use latticed_proto::latticed::admin::v1 as pb;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::connection::PeerAddr;
use super::Frontend;
use crate::entity::Entities;
use crate::error::DaemonError;
use crate::replication::ReplicationHandle;
use crate::userfn::Discovery;

use crate::metrics::REGISTRATION_REFUSALS as REFUSALS;

/// Longest lease granted (a longer `ttl` is cut to it).
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long `Register` waits for the user function's `discover`.
pub const DISCOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often ended leases are looked for.
pub const LEASE_CHECK: Duration = Duration::from_millis(200);

/// A network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a network like 10.0.0.0/8, fd00::/8 or 10.1.2.3");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Network { addr, prefix })
    }
}

impl Network {
    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// Who may register.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// the bearer token, if one is required
    pub token: Option<String>,
    /// the allowed source networks (empty: any)
    pub allow: Vec<Network>,
}

impl Access {
    /// From the flags; `None`: registration is off.
    pub fn from_flags(
        token_file: Option<&std::path::Path>,
        allow: &[String],
    ) -> Result<Option<Access>, DaemonError> {
        let token = token_file
            .map(|path| read_token(path, "registration"))
            .transpose()?;
        let allow = networks(allow)?;
        if token.is_none() && allow.is_empty() {
            return Ok(None);
        }
        Ok(Some(Access { token, allow }))
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if !self.allow.is_empty() {
            let ip = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
            if !ip.is_some_and(|ip| self.allow.iter().any(|n| n.contains(ip))) {
                metrics::counter!(REFUSALS, "reason" => "source").increment(1);
                return Err(Status::permission_denied(
                    "this source address may not register user functions (--registration-allow)",
                ));
            }
        }
        if let Some(token) = &self.token {
            let given = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if !bearer_matches(given, token) {
                metrics::counter!(REFUSALS, "reason" => "token").increment(1);
                return Err(Status::unauthenticated(
                    "registering needs `authorization: Bearer <token>` with the node's token",
                ));
            }
        }
        Ok(())
    }
}

/// The token in `path` (trimmed), for `purpose` (named in errors); an empty file is an error.
pub fn read_token(path: &std::path::Path, purpose: &str) -> Result<String, DaemonError> {
    let t = std::fs::read_to_string(path).map_err(|e| {
        DaemonError::io(format!("reading the {purpose} token {}", path.display()), e)
    })?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(DaemonError::Config(format!(
            "the {purpose} token file {} is empty",
            path.display()
        )));
    }
    Ok(t)
}

/// Networks from flags (blank entries skipped); a malformed one is a clear error.
pub fn networks(flags: &[String]) -> Result<Vec<Network>, DaemonError> {
    flags
        .iter()
        .filter(|a| !a.trim().is_empty())
        .map(|a| a.parse::<Network>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(DaemonError::Config)
}

/// Whether `given` is an `authorization` header value `Bearer <token>`.
pub fn bearer_matches(given: Option<&str>, token: &str) -> bool {
    let given = given.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

/// Compares without stopping at the first difference (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What registered user functions need to run.
#[derive(Clone)]
pub struct Runtime {
    /// the replication API, for their entities
    pub replication: ReplicationHandle,
    /// timing and bounds of every entity
    pub entities: crate::entity::Config,
    /// how often their spec is asked for
    pub check_every: Duration,
}

/// The `latticed.admin.v1.UserFunctions` service.
#[derive(Clone)]
pub struct Registrar {
    frontend: Frontend,
    access: Access,
    runtime: Runtime,
    health: HealthReporter,
    /// registrations one at a time
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Registrar {
    /// The service for `frontend`, guarded by `access`.
    pub fn new(
        frontend: Frontend,
        access: Access,
        runtime: Runtime,
        health: HealthReporter,
    ) -> Self {
        Registrar {
            frontend,
            access,
            runtime,
            health,
            lock: Default::default(),
        }
    }

    /// Ends leases as they run out, until the task is dropped.
    pub async fn expire_leases(self) {
        loop {
            tokio::time::sleep(LEASE_CHECK).await;
            for gone in self.frontend.served.expire(Instant::now()) {
                tracing::info!(user_function = %gone.address, "registration lease ended; no longer served");
                self.set_health(&gone.services, ServingStatus::NotServing)
                    .await;
            }
        }
    }

    async fn set_health(&self, services: &[String], status: ServingStatus) {
        for s in services {
            self.health.set_service_status(s.as_str(), status).await;
        }
    }

    fn listed(&self, address: &str) -> pb::Registration {
        let now = Instant::now();
        self.frontend
            .served
            .list()
            .into_iter()
            .find(|l| l.address == address)
            .map(|l| pb::Registration {
                address: l.address,
                services: l.services,
                ttl_seconds: l.lease.map_or(0, |until| {
                    u32::try_from(until.saturating_duration_since(now).as_secs())
                        .unwrap_or(u32::MAX)
                }),
            })
            .unwrap_or_default()
    }

    async fn admit(&self, address: &str, ttl: Duration) -> Result<(), Status> {
        let served = &self.frontend.served;
        let until = Instant::now() + ttl;
        match served.lease_of(address) {
            Some(None) => return Ok(()),
            Some(Some(_)) => {
                served.renew(address, until);
                return Ok(());
            }
            None => {}
        }
        let discovery = Discovery::new(address);
        let spec = tokio::time::timeout(DISCOVER_TIMEOUT, discovery.discover_once())
            .await
            .map_err(|_| Status::unavailable(format!("{address} did not answer discover in time")))?
            .map_err(|e| Status::unavailable(format!("cannot discover {address}: {e}")))?;
        let model = match crate::userfn::validate(&spec) {
            Ok(m) => m,
            Err(problems) => {
                for p in &problems {
                    discovery.report_error(p).await;
                }
                return Err(Status::failed_precondition(problems.join("; ")));
            }
        };
        for e in &model.entities {
            let service = e.service.full_name();
            if let Some(other) = served.server_of(service) {
                let problem =
                    format!("service {service} is already served by the user function at {other}");
                discovery.report_error(&problem).await;
                return Err(Status::already_exists(problem));
            }
        }
        let services: Vec<String> = model
            .entities
            .iter()
            .map(|e| e.service.full_name().to_string())
            .collect();
        let entities = Entities::new(
            address,
            model,
            self.runtime.replication.clone(),
            self.runtime.entities.clone(),
        )
        .map_err(|e| Status::invalid_argument(format!("address {address}: {e}")))?;
        self.frontend.adopt(&entities);
        let monitor = tokio::spawn(entities.clone().monitor(self.runtime.check_every));
        served.register(address.to_string(), entities, until, monitor);
        self.set_health(&services, ServingStatus::Serving).await;
        tracing::info!(user_function = %address, ttl = ?ttl, services = ?services, "user function registered");
        Ok(())
    }
}

fn address_of(address: &str) -> Result<String, Status> {
    let a = address.trim();
    let port = a
        .rsplit_once(':')
        .and_then(|(h, p)| (!h.is_empty()).then_some(p));
    if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
        return Err(Status::invalid_argument(format!(
            "address {a:?} is not host:port"
        )));
    }
    Ok(a.to_string())
}

#[tonic::async_trait]
impl pb::user_functions_server::UserFunctions for Registrar {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::Registration>, Status> {
        self.access.check(&request)?;
        let r = request.into_inner();
        let address = address_of(&r.address)?;
        if r.ttl_seconds == 0 {
            return Err(Status::invalid_argument("ttl_seconds must be at least 1"));
        }
        let ttl = Duration::from_secs(u64::from(r.ttl_seconds)).min(MAX_TTL);
        let _one_at_a_time = self.lock.lock().await;
        self.admit(&address, ttl).await?;
        Ok(Response::new(self.listed(&address)))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.access.check(&request)?;
        let address = address_of(&request.into_inner().address)?;
        let _one_at_a_time = self.lock.lock().await;
        let services = self.listed(&address).services;
        let removed = self.frontend.served.deregister(&address);
        if removed {
            self.set_health(&services, ServingStatus::NotServing).await;
            tracing::info!(user_function = %address, "user function deregistered");
        }
        Ok(Response::new(pb::DeregisterResponse { removed }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.access.check(&request)?;
        let user_functions = self
            .frontend
            .served
            .list()
            .into_iter()
            .map(|l| self.listed(&l.address))
            .collect();
        Ok(Response::new(pb::ListResponse { user_functions }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn networks_contain_their_addresses() {
        let n: Network = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Network = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.168.1.1".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
