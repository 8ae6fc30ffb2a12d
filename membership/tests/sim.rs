//! Deterministic simulation of SWIM membership: N `Membership` state machines over a seeded
//! in-memory network that loses, delays, duplicates and reorders datagrams and can be
//! partitioned. Virtual time; no sockets, no sleeps. Every test runs many seeds and names the
//! seed when it fails.
//!
//! Asserted: all live nodes agree on membership within a bound after a join, a crash, a restart
//! on the same address, a partition and its heal, a cut of every node from every other and its
//! heal (no member held suspect past the suspect timeout), and a graceful leave (reported
//! `left`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use latticed_membership::{MemberState, Membership, MembershipConfig, NodeId, Output, TimerEvent};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

enum Ev {
    Deliver {
        to: SocketAddr,
        data: Bytes,
    },
    Timer {
        node: usize,
        life: u32,
        timer: TimerEvent,
    },
    Rejoin {
        node: usize,
        life: u32,
    },
}

struct Slot {
    name: String,
    addr: SocketAddr,
    life: u32,
    m: Option<Membership>,
}

struct Sim {
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    nodes: Vec<Slot>,
    rng: StdRng,
    loss: f64,
    dup: f64,
    /// group of each node; datagrams cross groups only when `partitioned` is false
    group: Vec<u8>,
    partitioned: bool,
    config: MembershipConfig,
}

const SEED_NODE: usize = 0;

impl Sim {
    fn new(n: usize, seed: u64, loss: f64) -> Sim {
        let config = MembershipConfig::default();
        let mut sim = Sim {
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            loss,
            dup: 0.02,
            group: vec![0; n],
            partitioned: false,
            config,
        };
        for i in 0..n {
            let addr: SocketAddr = format!("127.0.0.1:{}", 7000 + i).parse().unwrap();
            sim.nodes.push(Slot {
                name: format!("n{i}"),
                addr,
                life: 0,
                m: None,
            });
            sim.start(i);
        }
        sim
    }

    fn start(&mut self, i: usize) {
        let incarnation = u64::from(self.nodes[i].life + 1);
        self.start_as(i, incarnation);
    }

    /// Starts node `i`'s next life with this incarnation (the daemon takes the wall clock's
    /// milliseconds: a clock set back between two starts gives a lower one).
    fn start_as(&mut self, i: usize, incarnation: u64) {
        let slot = &mut self.nodes[i];
        slot.life += 1;
        let id = NodeId::new(slot.name.clone(), slot.addr, incarnation);
        let seed = self.rng.random::<u64>();
        self.nodes[i].m = Some(Membership::new(id, &self.config, seed));
        if i != SEED_NODE {
            let life = self.nodes[i].life;
            self.schedule(0, Ev::Rejoin { node: i, life });
        }
    }

    fn schedule(&mut self, after_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((self.now + after_ms, self.seq), ev);
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|s| s.addr == addr)
    }

    fn apply(&mut self, from: usize, out: Output) {
        for (to, data) in out.datagrams {
            let Some(dst) = self.index_of(to) else {
                continue;
            };
            if self.partitioned && self.group[from] != self.group[dst] {
                continue;
            }
            if self.rng.random_bool(self.loss) {
                continue;
            }
            let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
            for _ in 0..copies {
                let delay = self.rng.random_range(1..30);
                self.schedule(
                    delay,
                    Ev::Deliver {
                        to,
                        data: data.clone(),
                    },
                );
            }
        }
        let life = self.nodes[from].life;
        for (after, timer) in out.timers {
            self.schedule(
                after.as_millis() as u64,
                Ev::Timer {
                    node: from,
                    life,
                    timer,
                },
            );
        }
    }

    fn step(&mut self) -> bool {
        let Some(((t, _), ev)) = self.queue.pop_first() else {
            return false;
        };
        self.now = t;
        match ev {
            Ev::Deliver { to, data } => {
                let Some(i) = self.index_of(to) else {
                    return true;
                };
                let Some(m) = self.nodes[i].m.as_mut() else {
                    return true;
                };
                if let Ok(out) = m.handle_datagram(&data) {
                    self.apply(i, out);
                }
            }
            Ev::Timer { node, life, timer } => {
                if self.nodes[node].life != life {
                    return true;
                }
                let Some(m) = self.nodes[node].m.as_mut() else {
                    return true;
                };
                let out = m.handle_timer(timer);
                self.apply(node, out);
            }
            Ev::Rejoin { node, life } => {
                // the daemon's join loop: announce to the seed every second while alone
                if self.nodes[node].life != life {
                    return true;
                }
                let seed = self.nodes[SEED_NODE].addr;
                let Some(m) = self.nodes[node].m.as_mut() else {
                    return true;
                };
                if m.live_members().next().is_none() {
                    if let Ok(out) = m.announce(seed) {
                        self.apply(node, out);
                    }
                }
                self.schedule(1000, Ev::Rejoin { node, life });
            }
        }
        true
    }

    /// Runs until `cond` holds (returns the time it took) or `limit` passes (returns None).
    fn run_until(&mut self, limit: Duration, cond: impl Fn(&Sim) -> bool) -> Option<Duration> {
        let start = self.now;
        let end = start + limit.as_millis() as u64;
        loop {
            if cond(self) {
                return Some(Duration::from_millis(self.now - start));
            }
            if self
                .queue
                .first_key_value()
                .is_none_or(|((t, _), _)| *t > end)
            {
                return None;
            }
            self.step();
        }
    }

    /// What node `i` says about every other node: name -> (state, incarnation).
    fn view(&self, i: usize) -> BTreeMap<String, (MemberState, u64)> {
        let Some(m) = &self.nodes[i].m else {
            return BTreeMap::new();
        };
        m.members()
            .into_iter()
            .skip(1)
            .map(|v| (v.id.name.clone(), (v.state, v.id.incarnation)))
            .collect()
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].m.is_some())
            .collect()
    }

    /// Every live node sees every node in `expect` with that state (and incarnation when given).
    fn all_see(&self, expect: &BTreeMap<usize, (MemberState, Option<u64>)>) -> bool {
        self.live().into_iter().all(|i| {
            let v = self.view(i);
            expect
                .iter()
                .filter(|(j, _)| **j != i)
                .all(|(j, (state, inc))| {
                    v.get(&self.nodes[*j].name)
                        .is_some_and(|(s, n)| s == state && inc.is_none_or(|want| *n == want))
                })
        })
    }
}

fn all_up(n: usize) -> BTreeMap<usize, (MemberState, Option<u64>)> {
    (0..n).map(|i| (i, (MemberState::Up, None))).collect()
}

const SEEDS: u64 = 24;

fn for_seeds(mut test: impl FnMut(u64) -> Result<(), String>) {
    let failures: Vec<String> = (0..SEEDS)
        .filter_map(|seed| test(seed).err().map(|e| format!("seed {seed}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn converge(
    sim: &mut Sim,
    limit: Duration,
    expect: &BTreeMap<usize, (MemberState, Option<u64>)>,
    what: &str,
) -> Result<Duration, String> {
    sim.run_until(limit, |s| s.all_see(expect))
        .ok_or_else(|| format!("{what}: no agreement within {limit:?}\n  {}", views(sim)))
}

/// What every live node sees, one line each.
fn views(sim: &Sim) -> String {
    let views: Vec<String> = sim
        .live()
        .iter()
        .map(|i| format!("n{i}: {:?}", sim.view(*i)))
        .collect();
    views.join("\n  ")
}

#[test]
fn five_nodes_join_and_agree() {
    let mut worst = Duration::ZERO;
    for_seeds(|seed| {
        let mut sim = Sim::new(5, seed, 0.05);
        let t = converge(&mut sim, Duration::from_secs(10), &all_up(5), "join")?;
        worst = worst.max(t);
        Ok(())
    });
    println!("join of 5 nodes, 5% loss: all agree within {worst:?} (virtual)");
}

#[test]
fn a_crash_is_detected_and_a_restart_replaces_the_old_life() {
    let mut worst = Duration::ZERO;
    for_seeds(|seed| {
        let mut sim = Sim::new(5, seed, 0.02);
        converge(&mut sim, Duration::from_secs(10), &all_up(5), "join")?;
        sim.nodes[3].m = None;
        let bound = sim.config.detection_bound() + Duration::from_secs(3);
        let mut expect = all_up(5);
        expect.insert(3, (MemberState::Down, None));
        let t = converge(&mut sim, bound, &expect, "crash detection")?;
        worst = worst.max(t);
        sim.start(3);
        let mut back = all_up(5);
        back.insert(3, (MemberState::Up, Some(2)));
        converge(&mut sim, Duration::from_secs(10), &back, "restart")?;
        Ok(())
    });
    println!("crash detected by all within {worst:?} (virtual, 2% loss)");
}

/// A node whose wall clock was set back between two starts (incarnations are wall-clock
/// milliseconds at start) comes back with a lower incarnation than its dead life. It must come
/// back up everywhere at once, not lose foca's address conflict to that dead life until the
/// others forget it (remove-down-after: 15 min by default). The multi-host clock-skew test
/// found it: a node restarted with its clock 10 minutes back stayed down.
#[test]
fn a_restart_with_a_lower_incarnation_replaces_the_old_life() {
    for_seeds(|seed| {
        let mut sim = Sim::new(5, seed, 0.02);
        converge(&mut sim, Duration::from_secs(10), &all_up(5), "join")?;
        sim.nodes[3].m = None;
        sim.start_as(3, 1_000);
        let mut ahead = all_up(5);
        ahead.insert(3, (MemberState::Up, Some(1_000)));
        converge(&mut sim, Duration::from_secs(10), &ahead, "a life ahead")?;
        sim.nodes[3].m = None;
        let bound = sim.config.detection_bound() + Duration::from_secs(3);
        let mut expect = all_up(5);
        expect.insert(3, (MemberState::Down, None));
        converge(&mut sim, bound, &expect, "crash detection")?;
        sim.start_as(3, 10);
        // up: the new life (a node reports the newer of two lives, and the dead one cannot
        // come back), which may have renewed its incarnation a few times on the way
        converge(
            &mut sim,
            Duration::from_secs(10),
            &all_up(5),
            "restart with a lower incarnation",
        )?;
        for i in sim.live() {
            let old = sim.view(i).get("n3").is_some_and(|(_, n)| *n >= 1_000);
            if i != 3 && old {
                return Err(format!("n{i} reports n3's old life: {:?}", sim.view(i)));
            }
        }
        Ok(())
    });
}

#[test]
fn a_partition_heals() {
    for_seeds(|seed| {
        let mut sim = Sim::new(5, seed, 0.02);
        converge(&mut sim, Duration::from_secs(10), &all_up(5), "join")?;
        sim.group = vec![0, 0, 1, 1, 1];
        sim.partitioned = true;
        let limit = sim.config.detection_bound() + Duration::from_secs(5);
        sim.run_until(limit, |s| {
            (0..5).all(|i| {
                let v = s.view(i);
                (0..5).filter(|j| s.group[*j] != s.group[i]).all(|j| {
                    v.get(&s.nodes[j].name)
                        .is_some_and(|(st, _)| *st == MemberState::Down)
                })
            })
        })
        .ok_or("the two sides did not see each other down")?;
        sim.partitioned = false;
        converge(&mut sim, Duration::from_secs(20), &all_up(5), "heal")?;
        Ok(())
    });
}

#[test]
fn a_graceful_leave_is_reported_as_left() {
    for_seeds(|seed| {
        let mut sim = Sim::new(5, seed, 0.0);
        converge(&mut sim, Duration::from_secs(10), &all_up(5), "join")?;
        let out = sim.nodes[4].m.as_mut().ok_or("n4 missing")?.leave();
        sim.apply(4, out);
        sim.nodes[4].m = None;
        let mut expect = all_up(5);
        expect.insert(4, (MemberState::Left, None));
        converge(&mut sim, Duration::from_secs(2), &expect, "leave")?;
        // and it stays left (not down) afterwards
        sim.run_until(Duration::from_secs(10), |_| false);
        if !sim.all_see(&expect) {
            return Err("left turned into something else".into());
        }
        Ok(())
    });
}

#[test]
fn members_are_unique_by_name() {
    let mut sim = Sim::new(3, 7, 0.0);
    converge(&mut sim, Duration::from_secs(10), &all_up(3), "join").unwrap();
    for i in 0..3 {
        let names: BTreeSet<String> = sim.nodes[i]
            .m
            .as_ref()
            .unwrap()
            .members()
            .into_iter()
            .map(|m| m.id.name)
            .collect();
        assert_eq!(names.len(), 3);
    }
}

/// The longest any live node has held any member `suspect` without a break, and who.
#[derive(Default)]
struct SuspectWatch {
    /// (observer, member name, member incarnation) -> virtual ms the suspicion was first seen
    since: BTreeMap<(usize, String, u64), u64>,
    worst: u64,
    worst_case: String,
}

impl SuspectWatch {
    fn observe(&mut self, sim: &Sim) {
        let mut now_suspect = BTreeSet::new();
        for i in sim.live() {
            for (name, (state, inc)) in sim.view(i) {
                if state == MemberState::Suspect {
                    now_suspect.insert((i, name, inc));
                }
            }
        }
        self.since.retain(|k, _| now_suspect.contains(k));
        for k in now_suspect {
            let start = *self.since.entry(k.clone()).or_insert(sim.now);
            let held = sim.now - start;
            if held > self.worst {
                self.worst = held;
                self.worst_case = format!("n{} held {}#{} suspect", k.0, k.1, k.2);
            }
        }
    }

    /// Runs `sim` for `span`, watching suspicions.
    fn run(&mut self, sim: &mut Sim, span: Duration) {
        let end = sim.now + span.as_millis() as u64;
        while sim
            .queue
            .first_key_value()
            .is_some_and(|((t, _), _)| *t <= end)
        {
            sim.step();
            self.observe(sim);
        }
    }
}

/// Every node cut off from every other (a switch failure), for long enough that some or all
/// declare the others down, then healed. Each node is told it is down when it meets the others
/// again (TurnUndead) and renews its identity. A member suspected just before a renewal must
/// still be refuted or declared down within the suspect timeout (the multi-host suite once saw
/// n1 hold n3 suspect for 45 s after such a heal, and a crash right then go unnoticed).
/// The cut lasts a random 1 to 8 s so that renewals land in every phase of a suspicion; 200
/// seeds by default (`SIM_SEEDS` for more). Before the fix 66 of 200 failed.
#[test]
fn a_total_cut_heals_without_stuck_suspects() {
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut failures = Vec::new();
    let mut worst_seen = 0;
    for seed in 0..seeds {
        let result = (|| -> Result<u64, String> {
            let n = 4;
            let mut sim = Sim::new(n, seed, 0.01);
            converge(&mut sim, Duration::from_secs(10), &all_up(n), "join")?;
            let mut watch = SuspectWatch::default();
            sim.group = (0..n as u8).collect();
            sim.partitioned = true;
            let cut = sim.rng.random_range(1_000..8_000);
            watch.run(&mut sim, Duration::from_millis(cut));
            watch = SuspectWatch::default();
            sim.partitioned = false;
            // a suspicion is refuted or turns into down within the suspect timeout, give or
            // take a probe cycle
            let bound = sim.config.suspect_to_down_after + sim.config.probe_period * 2;
            // half the seeds: one node crashes right after the heal and must be found down
            if seed % 2 == 1 {
                watch.run(&mut sim, Duration::from_millis(300));
                sim.nodes[n - 1].m = None;
                watch.run(&mut sim, Duration::from_secs(30));
                let mut expect = all_up(n);
                expect.insert(n - 1, (MemberState::Down, None));
                if !sim.all_see(&expect) {
                    return Err(format!(
                        "cut {cut} ms, then n{} crashed: not seen down 30 s later\n  {}",
                        n - 1,
                        views(&sim)
                    ));
                }
            } else {
                watch.run(&mut sim, Duration::from_secs(30));
                if !sim.all_see(&all_up(n)) {
                    return Err(format!(
                        "cut {cut} ms: not all up 30 s after the heal\n  {}",
                        views(&sim)
                    ));
                }
            }
            if watch.worst > bound.as_millis() as u64 {
                return Err(format!(
                    "cut {cut} ms: {} for {} ms after the heal (bound {bound:?})",
                    watch.worst_case, watch.worst
                ));
            }
            Ok(watch.worst)
        })();
        match result {
            Ok(w) => worst_seen = worst_seen.max(w),
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    println!(
        "{} of {seeds} seeds failed; longest suspicion in the others: {worst_seen} ms",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
