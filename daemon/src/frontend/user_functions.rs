//! The user functions the front-end serves: those from `--user-function`, for the node's life,
//! and those registered at run time ([`super::registration`]), each until its lease ends.
//!
//! Readers take a snapshot ([`UserFunctions::entities`]); a registration, renewal or removal
//! replaces it. A service is served by the first user function (in the order they came) that
//! offers it.

use std::sync::{Arc, RwLock};

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::entity::Entities;

/// One served user function.
struct Served {
    address: String,
    entities: Entities,
    /// when its lease ends (none: from the flags, no lease)
    lease: Option<Instant>,
    /// its spec watcher, stopped when it goes
    monitor: Option<JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(m) = &self.monitor {
            m.abort();
        }
    }
}

/// What [`UserFunctions::list`] says about one user function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// its address
    pub address: String,
    /// the services it offers
    pub services: Vec<String>,
    /// when its lease ends (none: no lease)
    pub lease: Option<Instant>,
}

/// The served user functions.
#[derive(Default)]
pub struct UserFunctions {
    served: RwLock<Vec<Served>>,
    snapshot: RwLock<Arc<Vec<Entities>>>,
}

impl UserFunctions {
    /// The user functions from the flags, by address.
    pub fn new(fixed: Vec<(String, Entities)>) -> Self {
        let this = UserFunctions::default();
        {
            let mut served = this.write();
            served.extend(fixed.into_iter().map(|(address, entities)| Served {
                address,
                entities,
                lease: None,
                monitor: None,
            }));
        }
        this.refresh();
        this
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Served>> {
        self.served.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Served>> {
        self.served.read().unwrap_or_else(|p| p.into_inner())
    }

    fn refresh(&self) {
        let now: Vec<Entities> = self.read().iter().map(|s| s.entities.clone()).collect();
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(now);
    }

    /// Every served user function's runtime, in order.
    pub fn entities(&self) -> Arc<Vec<Entities>> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `address` is served; `Some(None)`: without a lease.
    pub fn lease_of(&self, address: &str) -> Option<Option<Instant>> {
        self.read()
            .iter()
            .find(|s| s.address == address)
            .map(|s| s.lease)
    }

    /// Moves the lease of a registered `address` to `until`; false if it is not registered.
    pub fn renew(&self, address: &str, until: Instant) -> bool {
        let mut served = self.write();
        match served
            .iter_mut()
            .find(|s| s.address == address && s.lease.is_some())
        {
            Some(s) => {
                s.lease = Some(until);
                true
            }
            None => false,
        }
    }

    /// The user function already serving `service`, if any.
    pub fn server_of(&self, service: &str) -> Option<String> {
        self.read()
            .iter()
            .find(|s| {
                s.entities
                    .model()
                    .entities
                    .iter()
                    .any(|e| e.service.full_name() == service)
            })
            .map(|s| s.address.clone())
    }

    /// Adds a registered user function, leased until `until`; `monitor` is stopped when it
    /// goes.
    pub fn register(
        &self,
        address: String,
        entities: Entities,
        until: Instant,
        monitor: JoinHandle<()>,
    ) {
        self.write().push(Served {
            address,
            entities,
            lease: Some(until),
            monitor: Some(monitor),
        });
        self.refresh();
    }

    /// Removes a registered user function; false if it was not registered.
    pub fn deregister(&self, address: &str) -> bool {
        let removed = {
            let mut served = self.write();
            let before = served.len();
            served.retain(|s| s.address != address || s.lease.is_none());
            before != served.len()
        };
        if removed {
            self.refresh();
        }
        removed
    }

    /// Removes the registrations whose lease ended by `now`; returns what they were.
    pub fn expire(&self, now: Instant) -> Vec<Listed> {
        let gone: Vec<Served> = {
            let mut served = self.write();
            let (gone, kept) = std::mem::take(&mut *served)
                .into_iter()
                .partition(|s| s.lease.is_some_and(|until| until <= now));
            *served = kept;
            gone
        };
        if !gone.is_empty() {
            self.refresh();
        }
        gone.iter().map(listed).collect()
    }

    /// Every served user function.
    pub fn list(&self) -> Vec<Listed> {
        self.read().iter().map(listed).collect()
    }
}

fn listed(s: &Served) -> Listed {
    Listed {
        address: s.address.clone(),
        services: s
            .entities
            .model()
            .entities
            .iter()
            .map(|e| e.service.full_name().to_string())
            .collect(),
        lease: s.lease,
    }
}

impl crate::routing::Local for UserFunctions {
    fn specs(&self) -> Vec<(u64, bytes::Bytes)> {
        self.entities()
            .iter()
            .filter(|e| e.is_up())
            .map(|e| {
                let m = e.model();
                (m.fingerprint, m.encoded.clone())
            })
            .collect()
    }

    fn find(
        &self,
        service: &str,
        method: &str,
    ) -> Option<(Entities, crate::userfn::spec::MethodModel)> {
        self.entities()
            .iter()
            .find_map(|e| e.method(service, method).map(|(_, m)| (e.clone(), m)))
    }
}
