//! The service directory: which other node serves which service, as a plain state machine.
//!
//! Owns, per live member, what it last said it serves (the digest of that answer, the service
//! names, and the shell's payload for them) and when to ask it again; and the choice of the
//! node for one entity. It takes the member view, answers and time, and returns the queries to
//! send. It must not do IO, read specs (the shell validates them before handing an answer in)
//! or know how commands travel.
//!
//! - A member is asked when it is first seen up, then every `every` (an unchanged answer is one
//!   small frame); a failed ask is retried with a doubling backoff (at most [`MAX_BACKOFF`]).
//! - A member that is no longer up, or changed address, is forgotten at once, with what it
//!   served: the map is bounded by the membership, which is bounded itself.
//! - The node for an entity is chosen by rendezvous hashing over the nodes that serve its
//!   service, with a hash every node computes alike: every node sends one entity's commands
//!   to the same node (so they meet one user-function stream) as long as the set of serving
//!   nodes stays the same, and a node that goes moves only its own entities.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use latticed_crdt::wire::Fnv;

/// The longest wait between two asks of a member that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a member serves, as the shell understood its answer.
#[derive(Debug)]
pub struct Served<T> {
    /// the digest of the answer
    pub digest: u64,
    /// the services named in it
    pub services: BTreeSet<String>,
    /// the shell's own view of it (the validated user functions)
    pub payload: Arc<T>,
}

/// A member's answer to a query.
#[derive(Debug)]
pub enum Answer<T> {
    /// the same as the asker's copy
    Unchanged,
    /// a new answer
    New(Served<T>),
}

/// A query to send: ask `addr` (member `name`) what it serves; `known` is the digest of our
/// copy (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// the member's name
    pub name: String,
    /// where it is
    pub addr: SocketAddr,
    /// the digest of our copy of its answer
    pub known: u64,
}

#[derive(Debug)]
struct Member<T> {
    addr: SocketAddr,
    served: Option<Served<T>>,
    /// when to ask next (none: a query is out)
    next: Option<Instant>,
    failures: u32,
}

/// The directory of the services other members serve.
#[derive(Debug)]
pub struct Directory<T> {
    me: String,
    every: Duration,
    members: BTreeMap<String, Member<T>>,
    /// changes whenever what is served elsewhere changes
    version: u64,
}

impl<T> Directory<T> {
    /// The directory of node `me`, asking each member every `every`.
    pub fn new(me: &str, every: Duration) -> Self {
        Directory {
            me: me.to_string(),
            every,
            members: BTreeMap::new(),
            version: 0,
        }
    }

    /// A number that changes whenever what other members serve changes.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The members now: `(name, address)` of every member that is up. New ones are asked at
    /// once; gone ones (or ones at a new address) are forgotten.
    pub fn set_members(
        &mut self,
        up: impl IntoIterator<Item = (String, SocketAddr)>,
        now: Instant,
    ) {
        let up: BTreeMap<String, SocketAddr> =
            up.into_iter().filter(|(n, _)| *n != self.me).collect();
        let before = self.members.len();
        let mut lost_services = false;
        self.members.retain(|name, m| {
            let keep = up.get(name) == Some(&m.addr);
            if !keep && m.served.as_ref().is_some_and(|s| !s.services.is_empty()) {
                lost_services = true;
            }
            keep
        });
        if lost_services || before != self.members.len() {
            self.version += 1;
        }
        for (name, addr) in up {
            self.members.entry(name).or_insert(Member {
                addr,
                served: None,
                next: Some(now),
                failures: 0,
            });
        }
    }

    /// The queries due at `now` (each member has at most one out at a time).
    pub fn poll(&mut self, now: Instant) -> Vec<Query> {
        let mut out = Vec::new();
        for (name, m) in self.members.iter_mut() {
            if m.next.is_some_and(|t| t <= now) {
                m.next = None;
                out.push(Query {
                    name: name.clone(),
                    addr: m.addr,
                    known: m.served.as_ref().map_or(0, |s| s.digest),
                });
            }
        }
        out
    }

    /// When the next query is due (none: none is).
    pub fn next_due(&self) -> Option<Instant> {
        self.members.values().filter_map(|m| m.next).min()
    }

    /// The answer to `query` arrived (ignored if the member went meanwhile).
    pub fn answered(&mut self, query: &Query, answer: Answer<T>, now: Instant) {
        let every = self.every;
        let Some(m) = self.member_for(query) else {
            return;
        };
        m.next = Some(now + every);
        m.failures = 0;
        if let Answer::New(served) = answer {
            let changed = m.served.as_ref().is_none_or(|s| s.digest != served.digest);
            m.served = Some(served);
            if changed {
                self.version += 1;
            }
        }
    }

    /// `query` failed (no answer, or not one we could read): asked again after a backoff.
    /// What the member served is kept: it is still up, and a forward to it that fails tries
    /// the next node.
    pub fn failed(&mut self, query: &Query, now: Instant) {
        let every = self.every;
        let Some(m) = self.member_for(query) else {
            return;
        };
        m.failures = m.failures.saturating_add(1);
        let backoff = every
            .checked_mul(1u32 << m.failures.min(16))
            .unwrap_or(MAX_BACKOFF)
            .min(MAX_BACKOFF);
        m.next = Some(now + backoff);
    }

    fn member_for(&mut self, query: &Query) -> Option<&mut Member<T>> {
        self.members
            .get_mut(&query.name)
            .filter(|m| m.addr == query.addr && m.next.is_none())
    }

    /// The members that serve `service`, the one for `entity_id` first (then the next choices,
    /// in order, for when it fails).
    pub fn nodes_for(&self, service: &str, entity_id: &str) -> Vec<(String, SocketAddr)> {
        let mut nodes: Vec<(u64, &String, SocketAddr)> = self
            .members
            .iter()
            .filter(|(_, m)| {
                m.served
                    .as_ref()
                    .is_some_and(|s| s.services.contains(service))
            })
            .map(|(name, m)| (score(service, entity_id, name), name, m.addr))
            .collect();
        nodes.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        nodes.into_iter().map(|(_, n, a)| (n.clone(), a)).collect()
    }

    /// What each member serves, by member name (members with no answer yet are left out).
    pub fn served(&self) -> impl Iterator<Item = (&str, &Served<T>)> {
        self.members
            .iter()
            .filter_map(|(n, m)| m.served.as_ref().map(|s| (n.as_str(), s)))
    }
}

/// The rendezvous score of `node` for one entity: a hash every node computes alike (FNV-1a of
/// the three names, then a 64-bit finaliser so that near names spread).
fn score(service: &str, entity_id: &str, node: &str) -> u64 {
    let mut h = Fnv::new();
    for part in [service, entity_id, node] {
        h.write(part.as_bytes());
        h.write(&[0xff]);
    }
    let mut x = h.finish();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    fn served(digest: u64, services: &[&str]) -> Answer<()> {
        Answer::New(Served {
            digest,
            services: services.iter().map(|s| s.to_string()).collect(),
            payload: Arc::new(()),
        })
    }

    fn members(n: &[(&str, u16)]) -> Vec<(String, SocketAddr)> {
        n.iter().map(|(s, p)| (s.to_string(), addr(*p))).collect()
    }

    const EVERY: Duration = Duration::from_secs(2);

    #[test]
    fn a_new_member_is_asked_at_once_then_every_period_with_its_digest() {
        let t0 = Instant::now();
        let mut d = Directory::<()>::new("me", EVERY);
        d.set_members(members(&[("me", 1), ("a", 2)]), t0);
        let q = d.poll(t0);
        assert_eq!(
            q,
            vec![Query {
                name: "a".into(),
                addr: addr(2),
                known: 0
            }]
        );
        // one query out at a time
        assert!(d.poll(t0 + EVERY * 5).is_empty());
        d.answered(&q[0], served(7, &["s.S"]), t0);
        assert!(d.poll(t0 + EVERY / 2).is_empty());
        assert_eq!(d.next_due(), Some(t0 + EVERY));
        let q = d.poll(t0 + EVERY);
        assert_eq!(q[0].known, 7);
        let v = d.version();
        d.answered(&q[0], Answer::Unchanged, t0 + EVERY);
        assert_eq!(d.version(), v, "an unchanged answer changes nothing");
        assert_eq!(d.nodes_for("s.S", "e1"), vec![("a".to_string(), addr(2))]);
    }

    #[test]
    fn a_failed_ask_backs_off_up_to_the_bound_and_keeps_what_was_served() {
        let t0 = Instant::now();
        let mut d = Directory::<()>::new("me", EVERY);
        d.set_members(members(&[("a", 2)]), t0);
        let q = d.poll(t0);
        d.answered(&q[0], served(7, &["s.S"]), t0);
        let mut now = t0 + EVERY;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let q = d.poll(now);
            assert_eq!(q.len(), 1);
            d.failed(&q[0], now);
            let next = d.next_due().unwrap();
            waits.push(next - now);
            now = next;
        }
        assert_eq!(waits[0], EVERY * 2);
        assert_eq!(waits[1], EVERY * 4);
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF));
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        assert_eq!(d.nodes_for("s.S", "e").len(), 1, "still up: still a choice");
    }

    #[test]
    fn a_member_that_goes_or_moves_is_forgotten_with_its_services() {
        let t0 = Instant::now();
        let mut d = Directory::<()>::new("me", EVERY);
        d.set_members(members(&[("a", 2), ("b", 3)]), t0);
        for q in d.poll(t0) {
            d.answered(&q, served(1, &["s.S"]), t0);
        }
        assert_eq!(d.nodes_for("s.S", "e").len(), 2);
        let v = d.version();
        d.set_members(members(&[("a", 2)]), t0);
        assert!(d.version() > v);
        assert_eq!(d.nodes_for("s.S", "e"), vec![("a".to_string(), addr(2))]);
        // a at a new address: a new member, asked again, nothing served until it answers
        d.set_members(members(&[("a", 9)]), t0);
        assert!(d.nodes_for("s.S", "e").is_empty());
        let q = d.poll(t0);
        assert_eq!(q[0].addr, addr(9));
        // an answer to the old address's query is ignored
        let stale = Query {
            name: "a".into(),
            addr: addr(2),
            known: 0,
        };
        d.answered(&stale, served(2, &["x.X"]), t0);
        assert!(d.nodes_for("x.X", "e").is_empty());
    }

    #[test]
    fn every_node_chooses_the_same_node_for_an_entity_and_a_lost_node_moves_only_its_own() {
        let t0 = Instant::now();
        let names: Vec<(String, u16)> = (0..5).map(|i| (format!("n{i}"), 10 + i)).collect();
        let dir = |me: &str, except: Option<&str>| {
            let mut d = Directory::<()>::new(me, EVERY);
            let up: Vec<(String, SocketAddr)> = names
                .iter()
                .filter(|(n, _)| Some(n.as_str()) != except)
                .map(|(n, p)| (n.clone(), addr(*p)))
                .collect();
            d.set_members(up, t0);
            for q in d.poll(t0) {
                d.answered(&q, served(1, &["s.S"]), t0);
            }
            d
        };
        // two nodes that serve nothing themselves see the same choice
        let (x, y) = (dir("x", None), dir("y", None));
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        let mut moved = 0;
        let without = dir("x", Some("n2"));
        for i in 0..1000 {
            let id = format!("entity-{i}");
            let first = x.nodes_for("s.S", &id)[0].0.clone();
            assert_eq!(first, y.nodes_for("s.S", &id)[0].0);
            let after = without.nodes_for("s.S", &id)[0].0.clone();
            if first != "n2" {
                assert_eq!(after, first, "{id} moved although its node stayed");
            } else {
                moved += 1;
            }
            *per_node.entry(first).or_default() += 1;
        }
        assert_eq!(per_node.len(), 5);
        assert!(
            per_node.values().all(|n| (120..=280).contains(n)),
            "{per_node:?}"
        );
        assert_eq!(moved, per_node["n2"]);
    }
}
