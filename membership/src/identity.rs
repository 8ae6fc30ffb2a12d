//! `NodeId`: who a cluster member is, as foca sees it.
//!
//! A member is known by its advertised address (foca's `Addr`: a join announcement is addressed
//! to a seed's address, before its name is known). Two identities with the same address are the
//! same node and the one with the higher incarnation wins, so a node restarted on its address
//! replaces its previous life everywhere without manual steps. The name is what operators see;
//! it must be unique in the cluster. This module owns the identity and nothing else.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A cluster member's identity: name, advertised address, incarnation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId {
    /// The node name, unique in the cluster (a Kubernetes node name, say).
    pub name: String,
    /// Where peers reach this node (its QUIC endpoint).
    pub addr: SocketAddr,
    /// Grows with every start of the process (and when foca renews a down identity); the higher
    /// one wins when two identities share an address.
    pub incarnation: u64,
}

impl NodeId {
    /// An identity.
    pub fn new(name: impl Into<String>, addr: SocketAddr, incarnation: u64) -> Self {
        NodeId {
            name: name.into(),
            addr,
            incarnation,
        }
    }

    /// A placeholder for a seed known only by address (the target of a join announcement).
    pub fn seed(addr: SocketAddr) -> Self {
        NodeId {
            name: String::new(),
            addr,
            incarnation: 0,
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.incarnation)
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            incarnation: self.incarnation.saturating_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.incarnation, &self.name) > (adversary.incarnation, &adversary.name)
    }
}
