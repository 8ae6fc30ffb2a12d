//! Deterministic simulation of the replication core: 3 to 7 `Replicator`s in one thread, over
//! a seeded network that drops, duplicates, reorders and delays frames, with partitions that
//! heal, a replica that crashes and comes back empty (a new life), one frozen past the suspect
//! timeout (the same life, a new incarnation), and one that now and then lies (deltas in
//! another's name, absurd intervals, acks of what was never sent). Random writes of all eight
//! CRDT types at LOCAL, MAJORITY and ALL (and some deletes) from every replica. Invariants: a
//! MAJORITY / ALL write that succeeds is held by as many nodes as it needed when it completes;
//! after the faults stop, every replica holds the same value for every key, and that value is
//! the join of every delta ever produced. 500 seeds by default (`SIM_SEEDS=n` for another
//! count), spread over the cores; each failure names its seed; `SIM_SEED=n` reruns one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use latticed::replication::frame;
use latticed::replication::{
    Consistency, Identity, PeerInfo, ReplicationConfig, Replicator, WriteError, WriteId,
};
use latticed::store::Entry;
use latticed_crdt::{CrdtKind, CrdtValue, Element};
use latticed_membership::MemberState;
use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, CrdtDelta, FlagDelta, GCounterDelta, GSetDelta, LwwRegisterDelta,
    OrMapDelta, OrMapEntryDelta, OrSetDelta, PnCounterDelta, VoteDelta,
};
use latticed_proto::latticed::peer as pb;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const TICK_MS: u64 = 5;

fn wrap(d: Delta) -> CrdtDelta {
    CrdtDelta { delta: Some(d) }
}

fn elem(rng: &mut StdRng) -> prost_types::Any {
    let names = ["a", "b", "c", "d", "e", "f"];
    Element::string(names[rng.random_range(0..names.len())]).to_any()
}

fn random_delta(rng: &mut StdRng, kind: CrdtKind, depth: u32) -> CrdtDelta {
    match kind {
        CrdtKind::GCounter => wrap(Delta::Gcounter(GCounterDelta {
            increment: rng.random_range(0..5),
        })),
        CrdtKind::PNCounter => wrap(Delta::Pncounter(PnCounterDelta {
            change: rng.random_range(-5..5),
        })),
        CrdtKind::GSet => wrap(Delta::Gset(GSetDelta {
            added: (0..rng.random_range(1..3)).map(|_| elem(rng)).collect(),
        })),
        CrdtKind::ORSet => wrap(Delta::Orset(OrSetDelta {
            cleared: rng.random_bool(0.05),
            removed: (0..rng.random_range(0..2)).map(|_| elem(rng)).collect(),
            added: (0..rng.random_range(0..3)).map(|_| elem(rng)).collect(),
        })),
        CrdtKind::LwwRegister => wrap(Delta::Lwwregister(LwwRegisterDelta {
            value: Some(elem(rng)),
            clock: rng.random_range(0..4),
            custom_clock_value: rng.random_range(-3..30),
        })),
        CrdtKind::Flag => wrap(Delta::Flag(FlagDelta {
            value: rng.random_bool(0.9),
        })),
        CrdtKind::Vote => wrap(Delta::Vote(VoteDelta {
            self_vote: rng.random_bool(0.5),
            votes_for: 0,
            total_voters: 0,
        })),
        CrdtKind::ORMap => {
            let entry = |rng: &mut StdRng| {
                let kinds: Vec<CrdtKind> = CrdtKind::ALL
                    .iter()
                    .copied()
                    .filter(|k| depth > 0 && *k != CrdtKind::ORMap)
                    .collect();
                let k = kinds[rng.random_range(0..kinds.len())];
                OrMapEntryDelta {
                    key: Some(Element::string(&format!("m{}", rng.random_range(0..3))).to_any()),
                    delta: Some(random_delta(rng, k, 0)),
                }
            };
            wrap(Delta::Ormap(OrMapDelta {
                cleared: rng.random_bool(0.03),
                removed: (0..rng.random_range(0..2))
                    .map(|_| Element::string(&format!("m{}", rng.random_range(0..3))).to_any())
                    .collect(),
                updated: (0..rng.random_range(0..2)).map(|_| entry(rng)).collect(),
                added: (0..rng.random_range(0..2)).map(|_| entry(rng)).collect(),
            }))
        }
    }
}

struct Node {
    name: String,
    incarnation: u64,
    replica: u64,
    /// frozen (SIGSTOP): no ticks, frames to it are lost, peers report it down
    paused: bool,
    r: Option<Replicator>,
}

/// A MAJORITY / ALL write in flight: what it wrote, where, and how many must hold it.
struct Watched {
    node: usize,
    key: String,
    delta: CrdtValue,
    needed: usize,
}

struct Msg {
    from: String,
    to: String,
    body: Vec<u8>,
}

struct Sim {
    base: Instant,
    now_ms: u64,
    seq: u64,
    rng: StdRng,
    nodes: Vec<Node>,
    queue: BTreeMap<(u64, u64), Msg>,
    group: Vec<u8>,
    partitioned: bool,
    loss: f64,
    dup: f64,
    /// every delta produced, per key
    produced: BTreeMap<String, Vec<CrdtValue>>,
    deleted: BTreeSet<String>,
    next_replica: u64,
    /// MAJORITY / ALL writes not completed yet
    watched: BTreeMap<(usize, WriteId), Watched>,
    /// completed MAJORITY / ALL writes: ok, failed
    outcomes: (u64, u64),
    /// each completed MAJORITY / ALL write: whether it succeeded
    finished: BTreeMap<(usize, WriteId), bool>,
    /// invariant violations seen
    violations: Vec<String>,
    /// (from, to): Deltas frames on this path are dropped
    cut_deltas: BTreeSet<(String, String)>,
    /// a node that now and then sends lies along with its frames
    liar: Option<usize>,
}

fn key_kind(key: &str) -> CrdtKind {
    let n: usize = key[1..].parse().unwrap();
    CrdtKind::ALL[n % 8]
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let mut sim = Sim {
            base: Instant::now(),
            now_ms: 0,
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            nodes: Vec::new(),
            queue: BTreeMap::new(),
            group: vec![0; n],
            partitioned: false,
            loss: 0.05,
            dup: 0.02,
            produced: BTreeMap::new(),
            deleted: BTreeSet::new(),
            next_replica: seed.wrapping_mul(1_000_003) | 1,
            watched: BTreeMap::new(),
            outcomes: (0, 0),
            finished: BTreeMap::new(),
            violations: Vec::new(),
            cut_deltas: BTreeSet::new(),
            liar: None,
        };
        for i in 0..n {
            sim.nodes.push(Node {
                name: format!("n{i}"),
                incarnation: 0,
                replica: 0,
                paused: false,
                r: None,
            });
            sim.start(i, false);
        }
        sim.membership();
        sim
    }

    /// Node `i`'s configuration: odd nodes behave as nodes with a data file do, sending a
    /// received-only ack before each ack (which this network delivers with no commit between).
    fn config(i: usize) -> ReplicationConfig {
        ReplicationConfig {
            batch_window: Duration::from_millis(TICK_MS),
            acks_wait_for_commit: i % 2 == 1,
            ..ReplicationConfig::default()
        }
    }

    /// (Re)starts node `i` empty, as a new life (new epoch); with `same_replica` it keeps its
    /// replica id (as a node with durable state would).
    fn start(&mut self, i: usize, same_replica: bool) {
        if !same_replica {
            self.next_replica = self.next_replica.wrapping_add(0x9e37_79b9_7f4a_7c15);
            self.nodes[i].replica = self.next_replica;
        }
        let seed = self.rng.random::<u64>();
        let identity = Identity {
            name: self.nodes[i].name.clone(),
            replica: self.nodes[i].replica,
            epoch: self.rng.random(),
        };
        self.nodes[i].incarnation += 1;
        self.nodes[i].paused = false;
        self.nodes[i].r = Some(Replicator::new(identity, Self::config(i), seed));
        self.forget_in_flight(i);
        self.watched.retain(|(n, _), _| *n != i);
    }

    /// Frames in flight from or to node `i` die with its connections.
    fn forget_in_flight(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        self.queue.retain(|_, m| m.from != name && m.to != name);
    }

    fn crash(&mut self, i: usize) {
        self.nodes[i].r = None;
        self.forget_in_flight(i);
        // what it held can no longer be checked
        self.watched.clear();
    }

    /// Freezes node `i` (SIGSTOP): peers see it down.
    fn pause(&mut self, i: usize) {
        self.nodes[i].paused = true;
        self.membership();
    }

    /// Thaws node `i` (SIGCONT): it refutes with a new incarnation, same life.
    fn resume(&mut self, i: usize) {
        self.nodes[i].paused = false;
        self.nodes[i].incarnation += 1;
        self.membership();
    }

    fn alive(&self, i: usize) -> bool {
        self.nodes[i].r.is_some() && !self.nodes[i].paused
    }

    fn reachable(&self, i: usize, j: usize) -> bool {
        self.alive(i) && self.alive(j) && (!self.partitioned || self.group[i] == self.group[j])
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    /// What each node's membership would say: crashed nodes down, the other side of a
    /// partition down.
    fn membership(&mut self) {
        let view: Vec<(String, u64)> = self
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.incarnation))
            .collect();
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                continue;
            }
            let infos: Vec<PeerInfo> = view
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, (name, inc))| {
                    let reachable =
                        self.alive(j) && (!self.partitioned || self.group[i] == self.group[j]);
                    PeerInfo {
                        name: name.clone(),
                        state: if reachable {
                            MemberState::Up
                        } else {
                            MemberState::Down
                        },
                        incarnation: *inc,
                    }
                })
                .collect();
            if let Some(r) = self.nodes[i].r.as_mut() {
                r.set_members(&infos);
            }
            self.drain(i);
        }
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    fn drain(&mut self, i: usize) {
        let Some(r) = self.nodes[i].r.as_mut() else {
            return;
        };
        let mut out = r.take_output();
        let from = self.nodes[i].name.clone();
        let mut frames = out.all_frames();
        self.check_completions(i, out.completed);
        if self.liar == Some(i) && self.rng.random_bool(0.05) {
            if let Some(lie) = frames.first().and_then(|(to, _)| self.lie(i, to)) {
                frames.push(lie);
            }
        }
        for (to, body) in frames {
            let j = self.index(&to);
            if !self.reachable(i, j) {
                continue;
            }
            let kind = frame::decode(&body).ok().and_then(|f| f.kind);
            // a hello opens a stream, which is reliable: it is never lost on its own
            let hello = matches!(kind, Some(pb::frame::Kind::Hello(_)));
            if !hello && self.rng.random_bool(self.loss) {
                continue;
            }
            if matches!(kind, Some(pb::frame::Kind::Deltas(_)))
                && self.cut_deltas.contains(&(from.clone(), to.clone()))
            {
                continue;
            }
            let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
            for _ in 0..copies {
                let at = self.now_ms + self.rng.random_range(1..20);
                self.seq += 1;
                self.queue.insert(
                    (at, self.seq),
                    Msg {
                        from: from.clone(),
                        to: to.clone(),
                        body: body.clone(),
                    },
                );
            }
        }
    }

    /// A lie from node `i` to `to`: deltas in another node's name, an absurd interval of its
    /// own, or an ack of what was never sent. Only the absurd interval may be taken (it harms
    /// only the liar's own acks); anything else taken breaks an invariant.
    fn lie(&mut self, i: usize, to: &str) -> Option<(String, Vec<u8>)> {
        let j = self.index(to);
        let (liar, target) = (self.nodes[i].r.as_ref()?, self.nodes[j].r.as_ref()?);
        let others: Vec<usize> = (0..self.nodes.len())
            .filter(|k| *k != i && *k != j)
            .collect();
        let fake = {
            let mut v = None;
            let inc = wrap(Delta::Gcounter(GCounterDelta { increment: 7 }));
            let d = latticed_crdt::apply_user_delta(&mut v, &inc, 0xbad, 0).ok()??;
            frame::entry_to_proto("k0", &Entry::Value(d))
        };
        let kind = match self.rng.random_range(0..3) {
            0 if !others.is_empty() => pb::frame::Kind::Deltas(pb::Deltas {
                sender: self.nodes[others[self.rng.random_range(0..others.len())]].replica,
                epoch: self.rng.random(),
                receiver_epoch: target.epoch(),
                base: 0,
                from: 1,
                to: 1,
                entries: vec![fake],
            }),
            1 => pb::frame::Kind::Deltas(pb::Deltas {
                sender: liar.replica(),
                epoch: liar.epoch(),
                receiver_epoch: target.epoch(),
                base: u64::MAX - 1,
                from: u64::MAX,
                to: u64::MAX,
                entries: Vec::new(),
            }),
            _ => pb::frame::Kind::Ack(pb::Ack {
                sender: target.replica(),
                sender_epoch: target.epoch(),
                epoch: liar.epoch(),
                upto: u64::MAX,
                received_only: self.rng.random_bool(0.5),
            }),
        };
        Some((to.to_string(), frame::encode(&frame::frame(kind))))
    }

    fn write(&mut self, i: usize) {
        let key = format!("k{}", self.rng.random_range(0..16));
        let consistency = match self.rng.random_range(0..10) {
            0 => Consistency::Majority,
            1 => Consistency::All,
            _ => Consistency::Local,
        };
        if self.rng.random_bool(0.01) {
            let now = self.now();
            let Some(r) = self.nodes[i].r.as_mut() else {
                return;
            };
            r.delete(now, &key, Consistency::Local);
            self.deleted.insert(key);
            self.drain(i);
        } else {
            let d = random_delta(&mut self.rng, key_kind(&key), 1);
            self.write_delta(i, &key, &d, consistency);
        }
    }

    /// Writes `d` to `key` on node `i`; a MAJORITY / ALL write is watched until it completes.
    fn write_delta(
        &mut self,
        i: usize,
        key: &str,
        d: &CrdtDelta,
        consistency: Consistency,
    ) -> Option<WriteId> {
        let now = self.now();
        let now_ms = self.now_ms as i64;
        let n = self.nodes.len();
        let r = self.nodes[i].r.as_mut()?;
        let id = match r.write(now, now_ms, key, d, consistency) {
            Ok((id, Some(delta))) => {
                self.produced
                    .entry(key.to_string())
                    .or_default()
                    .push(delta.clone());
                let needed = match consistency {
                    Consistency::Local => 1,
                    Consistency::Majority => n / 2 + 1,
                    Consistency::All => n,
                };
                if needed > 1 {
                    self.watched.insert(
                        (i, id),
                        Watched {
                            node: i,
                            key: key.to_string(),
                            delta,
                            needed,
                        },
                    );
                }
                Some(id)
            }
            Ok((id, None)) => Some(id),
            Err(WriteError::Deleted) | Err(WriteError::Invalid(_)) => None,
            Err(e) => panic!("unexpected write error {e}"),
        };
        self.drain(i);
        id
    }

    /// Whether node `j` holds `delta` under `key` (a tombstone holds everything).
    fn holds(&self, j: usize, key: &str, delta: &CrdtValue) -> bool {
        match self.nodes[j].r.as_ref().and_then(|r| r.store().get(key)) {
            Some(Entry::Deleted) => true,
            Some(Entry::Value(v)) => !v.clone().join(delta),
            None => false,
        }
    }

    /// A MAJORITY / ALL write that succeeded must be held by as many nodes as it needed.
    fn check_completions(&mut self, i: usize, completed: Vec<(WriteId, Result<(), WriteError>)>) {
        for (id, result) in completed {
            let Some(w) = self.watched.remove(&(i, id)) else {
                continue;
            };
            self.finished.insert((i, id), result.is_ok());
            if result.is_err() {
                self.outcomes.1 += 1;
                continue;
            }
            self.outcomes.0 += 1;
            let holding = (0..self.nodes.len())
                .filter(|j| self.holds(*j, &w.key, &w.delta))
                .count();
            if holding < w.needed {
                self.violations.push(format!(
                    "at {} ms a write to {} through n{} was acknowledged by {} nodes but only {holding} hold it",
                    self.now_ms, w.key, w.node, w.needed
                ));
            }
        }
    }

    /// Advances virtual time by `ms`, with writes at `write_rate` per node per tick.
    fn run(&mut self, ms: u64, write_rate: f64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            let next_tick = self.now_ms + TICK_MS;
            while let Some((&(at, s), _)) = self.queue.first_key_value() {
                if at > next_tick {
                    break;
                }
                let msg = self.queue.remove(&(at, s)).unwrap();
                self.now_ms = self.now_ms.max(at);
                let j = self.index(&msg.to);
                let now = self.now();
                if self.nodes[j].paused {
                    continue;
                }
                if let Some(r) = self.nodes[j].r.as_mut() {
                    let _ = r.handle_frame(now, &msg.from, &msg.body);
                    self.drain(j);
                }
            }
            self.now_ms = next_tick;
            for i in 0..self.nodes.len() {
                if self.nodes[i].paused {
                    continue;
                }
                if write_rate > 0.0 && self.nodes[i].r.is_some() && self.rng.random_bool(write_rate)
                {
                    self.write(i);
                }
                let now = self.now();
                if let Some(r) = self.nodes[i].r.as_mut() {
                    r.tick(now);
                    self.drain(i);
                }
            }
        }
    }

    fn converged(&self) -> bool {
        let stores: Vec<Vec<(String, Entry)>> = self
            .nodes
            .iter()
            .filter_map(|n| n.r.as_ref())
            .map(|r| {
                r.store()
                    .iter()
                    .map(|(k, e)| (k.clone(), e.clone()))
                    .collect()
            })
            .collect();
        stores.windows(2).all(|w| w[0] == w[1])
    }

    fn expected(&self) -> Vec<(String, Entry)> {
        let mut keys: BTreeSet<String> = self.produced.keys().cloned().collect();
        keys.extend(self.deleted.iter().cloned());
        keys.into_iter()
            .map(|k| {
                if self.deleted.contains(&k) {
                    return (k, Entry::Deleted);
                }
                let mut v = CrdtValue::empty(key_kind(&k));
                for d in &self.produced[&k] {
                    v.join(d);
                }
                (k, Entry::Value(v))
            })
            .collect()
    }
}

fn scenario(seed: u64) -> Result<(), String> {
    let mut setup = StdRng::seed_from_u64(seed ^ 0xabcdef);
    let n = setup.random_range(3..=7);
    let mut sim = Sim::new(seed, n);
    let liar = setup.random_range(0..n);
    sim.liar = Some(liar);
    sim.run(2_000, 0.05);
    // a partition that heals
    sim.group = (0..n).map(|i| u8::from(i >= n / 2)).collect();
    sim.partitioned = true;
    sim.membership();
    sim.run(3_000, 0.05);
    sim.partitioned = false;
    sim.membership();
    sim.run(2_000, 0.05);
    // a crash: once the victim's own deltas are acked (nothing acknowledged only by it)
    // (not the liar: its own absurd intervals keep its acks from ever counting)
    let victim = (liar + setup.random_range(1..n)) % n;
    sim.loss = 0.0;
    let deadline = sim.now_ms + 20_000;
    while !sim.nodes[victim].r.as_ref().unwrap().is_quiet() {
        if sim.now_ms > deadline {
            return Err("the victim never became quiet".into());
        }
        sim.run(50, 0.0);
    }
    sim.loss = 0.05;
    sim.crash(victim);
    sim.membership();
    sim.run(3_000, 0.05);
    // it comes back empty, with a new replica id, epoch and incarnation
    sim.start(victim, false);
    sim.membership();
    sim.run(3_000, 0.05);
    // another is frozen past the suspect timeout, and comes back as the same life
    let frozen = setup.random_range(0..n);
    sim.pause(frozen);
    sim.run(setup.random_range(2_000..6_000), 0.05);
    sim.resume(frozen);
    sim.run(2_000, 0.05);
    // quiescence: no more faults or writes
    sim.loss = 0.0;
    sim.dup = 0.0;
    let limit = sim.now_ms + 30_000;
    while !sim.converged() {
        if sim.now_ms > limit {
            let first = sim.nodes[0].r.as_ref().unwrap();
            let mut differing = BTreeSet::new();
            for node in &sim.nodes[1..] {
                let r = node.r.as_ref().unwrap();
                for (k, e) in r.store().iter() {
                    if first.store().get(k) != Some(e) {
                        differing.insert(k.clone());
                    }
                }
                for (k, _) in first.store().iter() {
                    if r.store().get(k).is_none() {
                        differing.insert(k.clone());
                    }
                }
            }
            let digests: Vec<String> = differing
                .iter()
                .map(|k| {
                    let ds: Vec<String> = sim
                        .nodes
                        .iter()
                        .map(|n| format!("{}", n.r.as_ref().unwrap().store().get(k).is_some()))
                        .collect();
                    let vs: Vec<String> = sim
                        .nodes
                        .iter()
                        .map(|n| format!("{:?}", n.r.as_ref().unwrap().store().get(k)))
                        .collect();
                    format!("{k}: {}\n    {}", ds.join(" "), vs.join("\n    "))
                })
                .collect();
            return Err(format!(
                "{n} replicas did not converge within 30 s of quiescence; differing keys:\n  {}",
                digests.join("\n  ")
            ));
        }
        sim.run(100, 0.0);
    }
    // every replica, the restarted one included, completes a sync round of its own
    let limit = sim.now_ms + 10_000;
    while !sim.nodes.iter().all(|n| n.r.as_ref().unwrap().is_synced()) {
        if sim.now_ms > limit {
            return Err("a replica never completed a sync round".into());
        }
        sim.run(100, 0.0);
    }
    if !sim.violations.is_empty() {
        return Err(sim.violations.join("\n"));
    }
    let expected = sim.expected();
    for node in &sim.nodes {
        let r = node.r.as_ref().unwrap();
        let got: Vec<(String, Entry)> = r
            .store()
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        if got != expected {
            let diff: Vec<&String> = expected
                .iter()
                .filter(|(k, e)| r.store().get(k) != Some(e))
                .map(|(k, _)| k)
                .collect();
            return Err(format!(
                "{}: keys differing from the join of all deltas: {diff:?}",
                node.name
            ));
        }
        if !r.is_synced() {
            return Err(format!("{} never completed a sync", node.name));
        }
    }
    if std::env::var("SIM_SEED").is_ok() {
        let st = sim.nodes[0].r.as_ref().unwrap().stats().clone();
        let writes: usize = sim.produced.values().map(Vec::len).sum();
        println!(
            "{n} replicas, {writes} deltas over {} keys, node 0: {st:?}",
            expected.len()
        );
    }
    Ok(())
}

#[test]
fn replicas_converge_to_the_join_of_every_delta() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n = std::env::var("SIM_SEEDS").map_or(500, |n| n.parse().unwrap());
            (1..=n).collect()
        }
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut failed = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(s) = seeds.get(i) else {
                            return failed;
                        };
                        if let Err(e) = scenario(*s) {
                            failed.push(format!("seed {s}: {e}"));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    failures.sort();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

impl Sim {
    /// A quiet network: no loss, no duplicates.
    fn quiet(seed: u64, n: usize) -> Sim {
        let mut sim = Sim::new(seed, n);
        sim.loss = 0.0;
        sim.dup = 0.0;
        sim.run(500, 0.0);
        sim
    }

    /// Runs until every watched write completed, at most `limit_ms`.
    fn settle_writes(&mut self, limit_ms: u64) -> Result<(), String> {
        let end = self.now_ms + limit_ms;
        while !self.watched.is_empty() {
            if self.now_ms > end {
                return Err(format!("{} writes still waiting", self.watched.len()));
            }
            self.run(TICK_MS, 0.0);
        }
        Ok(())
    }
}

fn gset_add(x: &str) -> CrdtDelta {
    wrap(Delta::Gset(GSetDelta {
        added: vec![Element::string(x).to_any()],
    }))
}

#[test]
fn all_writes_succeed_again_after_a_member_returns_from_a_pause() {
    for seed in 1..=8 {
        let mut sim = Sim::quiet(seed, 3);
        sim.run(1_000, 0.2);
        // frozen past the suspect timeout: peers report it down, then up with a new incarnation
        sim.pause(2);
        sim.run(4_000, 0.2);
        sim.resume(2);
        sim.run(1_000, 0.0);
        let writes: Vec<(usize, WriteId)> = [
            (0, Consistency::All),
            (1, Consistency::All),
            (2, Consistency::All),
            (2, Consistency::Majority),
        ]
        .into_iter()
        .map(|(i, c)| {
            let d = gset_add(&format!("after-{i}-{c:?}"));
            // a key the random workload never writes (nor deletes: a deleted key refuses them)
            (i, sim.write_delta(i, "k18", &d, c).unwrap())
        })
        .collect();
        sim.settle_writes(6_000).unwrap();
        for w in &writes {
            assert_eq!(
                sim.finished.get(w),
                Some(&true),
                "seed {seed}: every ALL / MAJORITY write after the pause succeeds"
            );
        }
        assert!(
            sim.violations.is_empty(),
            "seed {seed}: {:?}",
            sim.violations
        );
    }
}

#[test]
fn acks_count_only_deltas_received_after_a_restart_with_the_same_replica_id() {
    for seed in 1..=8 {
        let mut sim = Sim::quiet(seed, 2);
        for i in 0..50 {
            sim.write_delta(0, "k2", &gset_add(&format!("a{i}")), Consistency::Local);
        }
        sim.run(500, 0.0);
        assert!(sim.nodes[0].r.as_ref().unwrap().is_quiet());
        // a new life of n0 with its old replica id: its numbers start again from 0
        sim.start(0, true);
        sim.membership();
        sim.run(500, 0.0);
        // its first ALL write never reaches n1; a later one does
        sim.cut_deltas.insert(("n0".into(), "n1".into()));
        sim.write_delta(0, "k2", &gset_add("lost"), Consistency::All)
            .unwrap();
        sim.run(30, 0.0);
        sim.cut_deltas.clear();
        sim.write_delta(0, "k2", &gset_add("arrives"), Consistency::Local);
        sim.run(200, 0.0);
        assert!(
            sim.violations.is_empty(),
            "seed {seed}: {:?}",
            sim.violations
        );
        // the resend delivers it, and then the ALL write completes
        sim.settle_writes(6_000).unwrap();
        assert_eq!(sim.outcomes, (1, 0), "seed {seed}");
        assert!(
            sim.violations.is_empty(),
            "seed {seed}: {:?}",
            sim.violations
        );
    }
}
