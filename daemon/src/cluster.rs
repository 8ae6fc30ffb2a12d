//! Cluster: drives the sans-IO [`Membership`] over the [`Transport`].
//!
//! One task owns the membership state machine. It feeds it the datagrams the transport
//! receives and the timers it asked for, announces this node to its `--join` seeds until it has
//! company, re-resolves `--join-dns` names (on tasks of their own: a slow resolver never holds
//! up probes), closes the connections of members that go down or away, and on shutdown leaves
//! the cluster. It publishes the
//! member view for the admin endpoint and the `latticed_members` gauge. SWIM logic itself lives
//! in `latticed-membership`, never here.
//!
//! A test hook, [`slow_lookups_of`], makes the lookups of a given `name:port` take longer in
//! this process (a slow resolver the test controls; nothing outside a test sets it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use latticed_membership::{MemberState, MemberView, Membership, Output};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics as m;
use crate::transport::{Datagram, Transport};

/// How often seeds are announced to while this node has no live peer.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// What the admin endpoint reads: the member view and whether the node is ready.
#[derive(Debug, Default)]
pub struct ClusterView {
    /// members, this node first
    pub members: Vec<MemberView>,
    /// joined a peer, or alone by design
    pub joined: bool,
}

/// Where to find peers.
#[derive(Clone, Debug, Default)]
pub struct Seeds {
    /// `host:port` names or addresses, resolved at each try
    pub join: Vec<String>,
    /// `name:port` DNS names, re-resolved every `dns_interval`
    pub join_dns: Vec<String>,
    /// re-resolution period of `join_dns`
    pub dns_interval: Duration,
}

impl Seeds {
    fn is_empty(&self) -> bool {
        self.join.is_empty() && self.join_dns.is_empty()
    }
}

/// Handle to the running cluster task.
pub struct Cluster {
    view: Arc<RwLock<ClusterView>>,
    members: watch::Receiver<Vec<MemberView>>,
    leave: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl Cluster {
    /// Starts the cluster task.
    pub fn start(
        membership: Membership,
        transport: Transport,
        datagrams: mpsc::Receiver<Datagram>,
        seeds: Seeds,
    ) -> Cluster {
        let view = Arc::new(RwLock::new(ClusterView {
            members: membership.members(),
            joined: seeds.is_empty(),
        }));
        let (leave_tx, leave_rx) = oneshot::channel();
        let (members_tx, members) = watch::channel(membership.members());
        let driver = Driver {
            membership,
            transport,
            view: view.clone(),
            members: members_tx,
            alone_by_design: seeds.is_empty(),
            addrs: Default::default(),
            timers: mpsc::channel(1024),
        };
        tokio::spawn(driver.run(datagrams, seeds, leave_rx));
        Cluster {
            view,
            members,
            leave: Some(leave_tx),
        }
    }

    /// Follows membership: the member list, this node first, on every change.
    pub fn members(&self) -> watch::Receiver<Vec<MemberView>> {
        self.members.clone()
    }

    /// The shared view.
    pub fn view(&self) -> Arc<RwLock<ClusterView>> {
        self.view.clone()
    }

    /// Leaves the cluster; returns once the leave messages are handed to the transport.
    pub async fn leave(&mut self) {
        if let Some(tx) = self.leave.take() {
            let (done_tx, done_rx) = oneshot::channel();
            if tx.send(done_tx).is_ok() {
                let _ = done_rx.await;
            }
        }
    }
}

struct Driver {
    membership: Membership,
    transport: Transport,
    view: Arc<RwLock<ClusterView>>,
    members: watch::Sender<Vec<MemberView>>,
    alone_by_design: bool,
    /// member name -> its last address
    addrs: std::collections::HashMap<String, SocketAddr>,
    timers: (
        mpsc::Sender<latticed_membership::TimerEvent>,
        mpsc::Receiver<latticed_membership::TimerEvent>,
    ),
}

/// Which seeds a lookup is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    /// `--join`, while this node has no live peer
    Join = 0,
    /// `--join-dns`, periodically
    Dns = 1,
}

/// `name:port` → how long its lookups are held before they start ([`slow_lookups_of`]).
static SLOW_LOOKUPS: Mutex<BTreeMap<String, Duration>> = Mutex::new(BTreeMap::new());

/// Test hook: every lookup of `name` (a seed exactly as given, `name:port`) by the nodes of this
/// process waits `delay` first, as behind a slow resolver. For in-process nodes in tests
/// (`latticed-tests`' `LiveNode`); the daemon never calls it.
#[doc(hidden)]
pub fn slow_lookups_of(name: &str, delay: Duration) {
    if let Ok(mut slow) = SLOW_LOOKUPS.lock() {
        slow.insert(name.to_string(), delay);
    }
}

async fn resolve(names: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for n in names {
        let delay = SLOW_LOOKUPS.lock().ok().and_then(|s| s.get(n).copied());
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        match tokio::net::lookup_host(n.as_str()).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => tracing::warn!(seed = %n, error = %e, "cannot resolve seed"),
        }
    }
    out
}

impl Driver {
    async fn run(
        mut self,
        mut datagrams: mpsc::Receiver<Datagram>,
        seeds: Seeds,
        mut leave: oneshot::Receiver<oneshot::Sender<()>>,
    ) {
        let mut join_tick = tokio::time::interval(JOIN_RETRY);
        let mut dns_tick = tokio::time::interval(seeds.dns_interval.max(Duration::from_secs(1)));
        let me = self.membership.identity().addr;
        // name lookups run on their own tasks: a slow resolver must not hold up SWIM
        let (resolved_tx, mut resolved) = mpsc::channel::<(Lookup, Vec<SocketAddr>)>(4);
        let mut lookups: [Option<tokio::task::JoinHandle<()>>; 2] = [None, None];
        let mut lookup = |kind: Lookup, names: &[String]| {
            let slot = &mut lookups[kind as usize];
            if slot.as_ref().is_some_and(|t| !t.is_finished()) {
                return;
            }
            let (names, tx) = (names.to_vec(), resolved_tx.clone());
            *slot = Some(tokio::spawn(async move {
                let _ = tx.send((kind, resolve(&names).await)).await;
            }));
        };
        loop {
            tokio::select! {
                Some((from, data)) = datagrams.recv() => {
                    match self.membership.handle_datagram(&data) {
                        Ok(out) => self.apply(out),
                        Err(e) => {
                            metrics::counter!(m::REJECTED_FRAMES, "reason" => "bad_datagram").increment(1);
                            tracing::debug!(peer = %from, error = %e, "dropped a datagram");
                        }
                    }
                }
                Some(timer) = self.timers.1.recv() => {
                    let out = self.membership.handle_timer(timer);
                    self.apply(out);
                }
                _ = join_tick.tick(), if !seeds.join.is_empty() => {
                    if self.membership.live_members().next().is_none() {
                        lookup(Lookup::Join, &seeds.join);
                    }
                }
                _ = dns_tick.tick(), if !seeds.join_dns.is_empty() => {
                    lookup(Lookup::Dns, &seeds.join_dns);
                }
                Some((kind, addrs)) = resolved.recv() => {
                    let known: Vec<SocketAddr> =
                        self.membership.live_members().map(|m| m.addr).collect();
                    if kind == Lookup::Join && !known.is_empty() {
                        continue;
                    }
                    for addr in addrs {
                        if addr != me && !known.contains(&addr) {
                            self.announce(addr);
                        }
                    }
                }
                done = &mut leave => {
                    let out = self.membership.leave();
                    tracing::info!(members = self.membership.live_members().count(), "leaving the cluster");
                    self.apply(out);
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
    }

    fn announce(&mut self, seed: SocketAddr) {
        match self.membership.announce(seed) {
            Ok(out) => self.apply(out),
            Err(e) => tracing::debug!(seed = %seed, error = %e, "announce"),
        }
    }

    fn apply(&mut self, out: Output) {
        for (to, data) in out.datagrams {
            self.transport.send_datagram(to, data);
        }
        for (after, timer) in out.timers {
            let tx = self.timers.0.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(timer).await;
            });
        }
        for e in &out.events {
            tracing::info!(member = %e.member.name, addr = %e.member.addr,
                incarnation = e.member.incarnation, state = e.state.name(), "member changed");
            // a member that is down or gone, or moved, keeps no connection or stream writer
            let moved = self.addrs.insert(e.member.name.clone(), e.member.addr);
            if matches!(e.state, MemberState::Down | MemberState::Left) {
                self.transport.forget_peer(e.member.addr);
            }
            if let Some(old) = moved.filter(|old| *old != e.member.addr) {
                self.transport.forget_peer(old);
            }
        }
        if !out.events.is_empty() || self.view_is_stale() {
            self.publish();
            let members = &self.members;
            self.addrs
                .retain(|name, _| members.borrow().iter().any(|m| m.id.name == *name));
        }
    }

    fn view_is_stale(&self) -> bool {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        v.members.first().map(|m| &m.id) != Some(self.membership.identity())
    }

    fn publish(&self) {
        let members = self.membership.members();
        let mut counts: BTreeMap<MemberState, usize> = BTreeMap::new();
        for m in &members {
            *counts.entry(m.state).or_default() += 1;
        }
        for s in [
            MemberState::Up,
            MemberState::Suspect,
            MemberState::Down,
            MemberState::Left,
        ] {
            metrics::gauge!(m::MEMBERS, "state" => s.name())
                .set(counts.get(&s).copied().unwrap_or(0) as f64);
        }
        let joined = self.alone_by_design || self.membership.live_members().next().is_some();
        self.members.send_replace(members.clone());
        let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
        v.members = members;
        // once joined, a node stays ready through peers' restarts
        v.joined = v.joined || joined;
    }
}
