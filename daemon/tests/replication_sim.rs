//! Deterministic simulation of the replication core: 3 to 7 `Replicator`s in one thread, over
//! a seeded network that drops, duplicates, reorders and delays frames, with partitions that
//! heal and a replica that crashes and comes back empty. Random writes of all eight CRDT types
//! (and some deletes) from every replica. After the faults stop, every replica must hold the
//! same value for every key, and that value must equal the join of every delta ever produced.
//! Each failure names its seed; `SIM_SEED=n` reruns one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use latticed::replication::{Consistency, PeerInfo, ReplicationConfig, Replicator, WriteError};
use latticed::store::Entry;
use latticed_crdt::{CrdtKind, CrdtValue, Element};
use latticed_membership::MemberState;
use latticed_proto::cloudstate::crdt::{
    crdt_delta::Delta, CrdtDelta, FlagDelta, GCounterDelta, GSetDelta, LwwRegisterDelta,
    OrMapDelta, OrMapEntryDelta, OrSetDelta, PnCounterDelta, VoteDelta,
};
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
    r: Option<Replicator>,
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
        };
        for i in 0..n {
            sim.nodes.push(Node {
                name: format!("n{i}"),
                incarnation: 0,
                r: None,
            });
            sim.start(i);
        }
        sim.membership();
        sim
    }

    fn config() -> ReplicationConfig {
        ReplicationConfig {
            batch_window: Duration::from_millis(TICK_MS),
            ..ReplicationConfig::default()
        }
    }

    fn start(&mut self, i: usize) {
        self.next_replica = self.next_replica.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let seed = self.rng.random::<u64>();
        self.nodes[i].incarnation += 1;
        self.nodes[i].r = Some(Replicator::new(self.next_replica, Self::config(), seed));
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    /// What each node's membership would say: crashed nodes down, the other side of a
    /// partition down.
    fn membership(&mut self) {
        let view: Vec<(String, bool, u64)> = self
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.r.is_some(), n.incarnation))
            .collect();
        for i in 0..self.nodes.len() {
            let infos: Vec<PeerInfo> = view
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, (name, alive, inc))| {
                    let reachable = *alive && (!self.partitioned || self.group[i] == self.group[j]);
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
        }
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    fn drain(&mut self, i: usize) {
        let Some(r) = self.nodes[i].r.as_mut() else {
            return;
        };
        let out = r.take_output();
        let from = self.nodes[i].name.clone();
        for (to, body) in out.frames {
            let j = self.index(&to);
            if self.partitioned && self.group[i] != self.group[j] {
                continue;
            }
            if self.rng.random_bool(self.loss) {
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

    fn write(&mut self, i: usize) {
        let key = format!("k{}", self.rng.random_range(0..16));
        let now = self.now();
        let now_ms = self.now_ms as i64;
        if self.rng.random_bool(0.01) {
            let Some(r) = self.nodes[i].r.as_mut() else {
                return;
            };
            r.delete(now, &key, Consistency::Local);
            self.deleted.insert(key);
        } else {
            let d = random_delta(&mut self.rng, key_kind(&key), 1);
            let Some(r) = self.nodes[i].r.as_mut() else {
                return;
            };
            match r.write(now, now_ms, &key, &d, Consistency::Local) {
                Ok((_, Some(delta))) => self.produced.entry(key).or_default().push(delta),
                Ok((_, None)) | Err(WriteError::Deleted) | Err(WriteError::Invalid(_)) => {}
                Err(e) => panic!("unexpected write error {e}"),
            }
        }
        self.drain(i);
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
                if let Some(r) = self.nodes[j].r.as_mut() {
                    let _ = r.handle_frame(now, &msg.from, &msg.body);
                    self.drain(j);
                }
            }
            self.now_ms = next_tick;
            for i in 0..self.nodes.len() {
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
    let victim = setup.random_range(0..n);
    sim.loss = 0.0;
    let deadline = sim.now_ms + 20_000;
    while !sim.nodes[victim].r.as_ref().unwrap().is_quiet() {
        if sim.now_ms > deadline {
            return Err("the victim never became quiet".into());
        }
        sim.run(50, 0.0);
    }
    sim.loss = 0.05;
    sim.nodes[victim].r = None;
    sim.membership();
    sim.run(3_000, 0.05);
    // it comes back empty, with a new replica id and incarnation
    sim.start(victim);
    sim.membership();
    sim.run(3_000, 0.05);
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
        Err(_) => (1..=32).collect(),
    };
    let failures: Vec<String> = seeds
        .iter()
        .filter_map(|s| scenario(*s).err().map(|e| format!("seed {s}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
