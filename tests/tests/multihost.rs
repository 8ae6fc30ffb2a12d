//! Multi-host suite (DESIGN.md testing layer 3b): the project's own images as containers on a
//! private Docker network this test creates, under real faults, with Jepsen-style invariants.
//!
//! The images come from `docker/build-image` (`latticed:dev`, the runtime stage of
//! `docker/Dockerfile`, and `latticed-model:dev`); it rebuilds nothing when the binaries did not
//! change. Each node is two containers: the conformance model, which owns the network namespace
//! and the node's fixed address, and the daemon, which joins it (`--network container:`), so a
//! killed and restarted daemon gets its address back and dials the model on 127.0.0.1:8080.
//!
//! Without Docker the test fails when `CI` is set and is skipped (with a message) otherwise.
//! Everything it creates carries a per-run name and is removed when the test ends, panics
//! included. Nothing sleeps to synchronise: every wait polls a condition against a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::{http_get, poll_until};

const COUNTER: &str = "PNCounter-multihost";
const SET: &str = "ORSet-multihost";
/// The keys the daemons store the two entities under: `<persistence id>-<entity id>`.
const COUNTER_KEY: &str = "CrdtTckModel-PNCounter-multihost";
const SET_KEY: &str = "CrdtTckModel-ORSet-multihost";
/// SWIM timing of the containers: a crash is detected in about 2 s.
const SWIM: [(&str, &str); 2] = [
    ("LATTICED_PROBE_PERIOD", "300ms"),
    ("LATTICED_SUSPECT_TIMEOUT", "1s"),
];
/// How long before a SIGKILL a LOCAL write may still be lost with its node: deltas leave
/// within the 2 ms batch window and anti-entropy runs every 300 ms.
const LOCAL_GRACE: Duration = Duration::from_secs(2);
/// Bound of every wait for membership to settle.
const SETTLE: Duration = Duration::from_secs(45);

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// Runs `docker ARGS`, panicking with its stderr on failure; returns stdout.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether the suite can run: Docker answers. Without it: a failure under CI, else a skip.
fn docker_or_skip() -> bool {
    let up = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if up {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the multi-host suite needs a Docker Engine (`docker version` failed) and CI is set"
    );
    eprintln!(
        "SKIPPED multi-host suite: no Docker Engine answers `docker version` \
         (set CI=1 to make this a failure)"
    );
    false
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `docker/build-image`: images from the current sources (a no-op when nothing changed). Once
/// per test process: the tests run in parallel.
fn build_images() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if *built {
        return;
    }
    let started = Instant::now();
    let status = Command::new(repo_root().join("docker/build-image"))
        .status()
        .expect("docker/build-image");
    assert!(status.success(), "docker/build-image failed");
    eprintln!("multihost: images ready in {:.1?}", started.elapsed());
    *built = true;
}

/// One node: the model container (network namespace, address) and the daemon beside it.
struct Node {
    name: String,
    ip: Ipv4Addr,
    model: String,
    daemon: String,
}

impl Node {
    fn admin(&self) -> SocketAddr {
        (self.ip, 9099).into()
    }

    fn frontend(&self) -> String {
        format!("http://{}:9000", self.ip)
    }

    /// `name -> (state, incarnation)` as this node reports its members.
    fn members(&self) -> Option<BTreeMap<String, String>> {
        let (status, body) = http_get(self.admin(), "/v1/members")?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(
            v["members"]
                .as_array()?
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or_default().to_string(),
                        m["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
        )
    }

    fn key(&self, key: &str) -> Option<serde_json::Value> {
        let (status, body) = http_get(self.admin(), &format!("/v1/keys/{key}"))?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

/// Containers and network of one run; removed on drop, after printing the daemons' logs if the
/// test is failing.
struct Cluster {
    network: String,
    /// a second network and its /24: the test reaches a partitioned node through it
    side: (String, [u8; 3]),
    certs: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Cluster {
    /// A network with a free /24 of 10.0.0.0/8 (Docker refuses overlapping ones: try another)
    /// and `n` nodes on it, started together and joined through `--join-dns`.
    fn start(n: usize) -> Cluster {
        let run = format!("{}-{}", std::process::id(), seed() % 100_000);
        let network = format!("latticed-mh-{run}");
        let side = format!("{network}-side");
        let prefix = create_network(&network);
        let mut cluster = Cluster {
            side: (side.clone(), [0; 3]),
            network,
            certs: tempfile::tempdir().unwrap(),
            nodes: Vec::new(),
        };
        cluster.side.1 = create_network(&side);
        cluster.make_certs(n);
        for i in 1..=n {
            let name = format!("n{i}");
            let ip = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 10 + i as u8);
            let node = Node {
                model: format!("{}-m{i}", cluster.network),
                daemon: format!("{}-{name}", cluster.network),
                name,
                ip,
            };
            cluster.nodes.push(node);
            cluster.start_model(i - 1);
            cluster.start_daemon(i - 1);
        }
        cluster
    }

    /// The CA and node certificates, by `latticed certs` (the host's release binary), readable
    /// by the image's user (10001): these keys exist for this run only.
    fn make_certs(&self, n: usize) {
        let bin = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"))
            .join("release/latticed");
        let dir = self.certs.path().to_str().unwrap().to_string();
        let run = |args: &[&str]| {
            let out = Command::new(&bin).args(args).output().unwrap();
            assert!(out.status.success(), "latticed {args:?}");
        };
        run(&["certs", "init", "--dir", &dir]);
        for i in 1..=n {
            run(&["certs", "issue", "--dir", &dir, "--name", &format!("n{i}")]);
        }
        for entry in std::fs::read_dir(&dir).unwrap() {
            chmod(&entry.unwrap().path(), 0o644);
        }
        chmod(self.certs.path(), 0o755);
    }

    fn start_model(&self, i: usize) {
        let node = &self.nodes[i];
        let ip = node.ip.to_string();
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &node.model,
            "--network",
            &self.network,
            "--ip",
            &ip,
            "--network-alias",
            "latticed-peers",
            "latticed-model:dev",
        ]);
    }

    fn start_daemon(&self, i: usize) {
        let node = &self.nodes[i];
        let certs = format!("{}:/certs:ro", self.certs.path().display());
        let net = format!("container:{}", node.model);
        let mut env = vec![
            format!("LATTICED_NODE_NAME={}", node.name),
            format!("LATTICED_CLUSTER_ADDR={}:7946", node.ip),
            "LATTICED_JOIN_DNS=latticed-peers:7946".into(),
            "LATTICED_JOIN_DNS_INTERVAL=1s".into(),
            "LATTICED_CA_CERT=/certs/ca.pem".into(),
            format!("LATTICED_CERT=/certs/{}.pem", node.name),
            format!("LATTICED_KEY=/certs/{}-key.pem", node.name),
            "LATTICED_WRITE_TIMEOUT=2s".into(),
            "NO_COLOR=1".into(),
        ];
        env.extend(SWIM.iter().map(|(k, v)| format!("{k}={v}")));
        let mut args = vec!["run", "-d", "--name", &node.daemon, "--network", &net];
        args.extend(["-v", &certs]);
        for e in &env {
            args.extend(["-e", e.as_str()]);
        }
        args.push("latticed:dev");
        docker_ok(&args);
    }

    fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Polls until every node in `observers` reports each name in `expect` in that state.
    fn wait_states(&self, observers: &[usize], expect: &[(&str, &str)], what: &str) -> Duration {
        let start = Instant::now();
        poll_until(SETTLE, what, || {
            observers
                .iter()
                .all(|&o| {
                    self.nodes[o].members().is_some_and(|m| {
                        expect
                            .iter()
                            .all(|(n, s)| m.get(*n).is_some_and(|st| st == s))
                    })
                })
                .then_some(())
        });
        start.elapsed()
    }

    /// Polls until every node reports every node up.
    fn wait_all_up(&self, what: &str) -> Duration {
        let names = self.names();
        let expect: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "up")).collect();
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.wait_states(&all, &expect, what)
    }

    /// One fault on node `victim`: `inject`, wait until every other node reports it `gone`
    /// (down, or left), `during`, `heal`, wait until every node reports every node up; prints
    /// both times.
    #[allow(clippy::too_many_arguments)]
    fn fault(
        &self,
        what: &str,
        victim: usize,
        gone: &str,
        inject: impl FnOnce(&Node),
        during: impl FnOnce(&Node),
        heal: impl FnOnce(&Node),
    ) {
        let node = &self.nodes[victim];
        let others: Vec<usize> = (0..self.nodes.len()).filter(|&i| i != victim).collect();
        inject(node);
        let down = [(node.name.as_str(), gone)];
        let detect = self.wait_states(&others, &down, &format!("{} {gone} ({what})", node.name));
        during(node);
        heal(node);
        let back = self.wait_all_up(&format!("all up after the {what} of {}", node.name));
        eprintln!(
            "multihost: {what}: {} {gone} everywhere after {detect:.1?}, all up {back:.1?} after heal",
            node.name
        );
    }

    /// Polls until the front-end of every node answers a `Process` call.
    fn wait_frontends(&self, rt: &tokio::runtime::Runtime) {
        for node in &self.nodes {
            poll_until(SETTLE, &format!("{}'s front-end", node.name), || {
                rt.block_on(async {
                    let mut c = client(&node.frontend()).ok()?;
                    let read = m::Request {
                        id: COUNTER.into(),
                        actions: Vec::new(),
                    };
                    c.process(read).await.ok()
                })
            });
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if std::thread::panicking() {
                let logs = docker(&["logs", "--tail", "40", &node.daemon]);
                eprintln!(
                    "--- {} ({}) last log lines:\n{}",
                    node.name,
                    node.daemon,
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            docker(&["rm", "-f", "-v", &node.daemon]);
            docker(&["rm", "-f", "-v", &node.model]);
        }
        docker(&["network", "rm", &self.network]);
        docker(&["network", "rm", &self.side.0]);
    }
}

/// Creates a network on a free /24 of 10.200.0.0-10.249.255.0 (Docker refuses one that
/// overlaps another: try another) and returns its first three bytes.
fn create_network(name: &str) -> [u8; 3] {
    let mut rng = seed();
    (0..20)
        .find_map(|_| {
            let (a, b) = (200 + next(&mut rng) % 50, next(&mut rng) % 256);
            let subnet = format!("10.{a}.{b}.0/24");
            docker(&["network", "create", "--subnet", &subnet, name])
                .status
                .success()
                .then_some([10, a as u8, b as u8])
        })
        .unwrap_or_else(|| panic!("no free subnet for the network {name}"))
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A seed from the clock; printed so a run can be told apart.
fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

/// xorshift64: enough to pick nodes at random.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn client(
    url: &str,
) -> Result<CrdtTckModelClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(4))
        .connect_lazy();
    Ok(CrdtTckModelClient::new(channel))
}

fn request(id: &str, update: m::update::Update, consistency: i32) -> m::Request {
    m::Request {
        id: id.into(),
        actions: vec![m::RequestAction {
            action: Some(m::request_action::Action::Update(m::Update {
                update: Some(update),
                write_consistency: consistency,
            })),
        }],
    }
}

fn pn(change: i64) -> m::update::Update {
    m::update::Update::Pncounter(m::PnCounterUpdate { change })
}

fn add(element: &str) -> m::update::Update {
    m::update::Update::Orset(m::OrSetUpdate {
        action: Some(m::or_set_update::Action::Add(element.into())),
    })
}

/// An acknowledged write: through which node, at LOCAL consistency or not, when.
#[derive(Clone, Copy)]
struct Ack {
    node: usize,
    local: bool,
    at: Instant,
}

/// What the writers saw. A write is acknowledged (the call succeeded) or indeterminate (it
/// failed or timed out: it may or may not have taken effect).
#[derive(Default)]
struct History {
    /// acknowledged increments
    acked_increments: Vec<Ack>,
    indeterminate_increments: u64,
    /// acknowledged adds, by element
    acked_adds: BTreeMap<String, Ack>,
    indeterminate_adds: BTreeSet<String>,
    /// failure messages of MAJORITY writes, by message
    failures: BTreeMap<String, u64>,
}

/// Writers: each loops over random nodes, one increment of the counter and one add to the set
/// per step, alternating LOCAL and MAJORITY, until `stop`.
fn spawn_writers(
    rt: &tokio::runtime::Runtime,
    urls: Vec<String>,
    writers: usize,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let (urls, stop, history) = (urls.clone(), stop.clone(), history.clone());
            rt.spawn(async move {
                let clients: Vec<_> = urls.iter().map(|u| client(u).unwrap()).collect();
                let mut rng = seed().wrapping_add(w as u64 * 7919);
                let mut step = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    step += 1;
                    let local = step.is_multiple_of(2);
                    let consistency = if local { 0 } else { 1 };
                    let i = (next(&mut rng) % clients.len() as u64) as usize;
                    let mut c = clients[i].clone();
                    let inc = c.process(request(COUNTER, pn(1), consistency)).await;
                    let element = format!("w{w}-{step}");
                    let added = c.process(request(SET, add(&element), consistency)).await;
                    let ack = Ack {
                        node: i,
                        local,
                        at: Instant::now(),
                    };
                    let mut h = history.lock().unwrap();
                    match inc {
                        Ok(_) => h.acked_increments.push(ack),
                        Err(e) => {
                            h.indeterminate_increments += 1;
                            *h.failures.entry(e.message().to_string()).or_default() += 1;
                        }
                    }
                    match added {
                        Ok(_) => {
                            h.acked_adds.insert(element, ack);
                        }
                        Err(_) => {
                            h.indeterminate_adds.insert(element);
                        }
                    }
                }
            })
        })
        .collect()
}

/// The counter's value and the set's elements as one node holds them.
fn values(node: &Node) -> Option<(i64, BTreeSet<String>)> {
    let counter = node.key(COUNTER_KEY)?["value"].as_i64()?;
    let set = node.key(SET_KEY)?["value"]
        .as_array()?
        .iter()
        .filter_map(|e| e["string"].as_str().map(str::to_string))
        .collect();
    Some((counter, set))
}

/// Three nodes under writes: a SIGKILL and restart, a partition (network disconnect) and heal,
/// a pause longer than the suspect timeout; afterwards every node holds the same values and no
/// acknowledged write is lost.
#[test]
fn multihost_three_nodes_kill_partition_pause() {
    fault_suite(false);
}

/// The same, followed by a rolling restart of every node under writes (SIGTERM, leave, start,
/// wait for `/readyz`, next node): no acknowledged increment or add is lost.
///
/// It found lost writes (e.g. 114 of 506 acknowledged adds, old ones among them): a restarted
/// node is sent only the deltas made after its new life appeared, and its first anti-entropy
/// round left keys that were being written ("hot") to the delta path, so it turned ready
/// holding only their recent part; once every older holder had restarted, the rest was gone.
/// A node's first round now pulls every key that differs.
#[test]
fn multihost_three_nodes_rolling_restart_under_writes() {
    fault_suite(true);
}

fn fault_suite(rolling_restart: bool) {
    if !docker_or_skip() {
        return;
    }
    let started = Instant::now();
    build_images();
    let cluster = Cluster::start(3);
    let formed = cluster.wait_all_up("the cluster to form");
    eprintln!("multihost: 3 nodes up everywhere after {formed:.1?}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    cluster.wait_frontends(&rt);

    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let urls = cluster.nodes.iter().map(Node::frontend).collect();
    let writers = spawn_writers(&rt, urls, 2, stop.clone(), history.clone());
    // Polls until `n` more increments were acknowledged: the workload goes on between faults.
    let mut acked_before = 0;
    let mut more_writes = |n: usize, when: &str| {
        acked_before += n;
        poll_until(SETTLE, &format!("{n} writes {when}"), || {
            (history.lock().unwrap().acked_increments.len() >= acked_before).then_some(())
        });
    };
    more_writes(20, "before the faults");
    // node -> when it was SIGKILLed
    let mut killed = BTreeMap::new();

    // 1. SIGKILL n2 (no leave: the others must detect it), then start it again.
    cluster.fault(
        "kill",
        1,
        "down",
        |n| {
            docker_ok(&["kill", "-s", "KILL", &n.daemon]);
            killed.insert(1, Instant::now());
        },
        |_| {},
        |n| {
            docker_ok(&["start", &n.daemon]);
        },
    );
    more_writes(20, "after the kill");

    // 2. Partition n3 away from the network, then heal. Meanwhile the test reaches n3 through
    // a second network: a MAJORITY write there fails as documented, a LOCAL one is acknowledged.
    let network = cluster.network.clone();
    let (side, side_prefix) = cluster.side.clone();
    cluster.fault(
        "partition",
        2,
        "down",
        |n| {
            docker_ok(&["network", "disconnect", &network, &n.model]);
        },
        |n| {
            let [a, b, c] = side_prefix;
            let side_ip = format!("{a}.{b}.{c}.13");
            docker_ok(&["network", "connect", "--ip", &side_ip, &side, &n.model]);
            let url = format!("http://{side_ip}:9000");
            let (majority, local) = rt.block_on(async {
                let mut c = client(&url).unwrap();
                let majority = c.process(request(SET, add("minority-majority"), 1)).await;
                (
                    majority,
                    c.process(request(SET, add("minority-local"), 0)).await,
                )
            });
            let err = majority.expect_err("a MAJORITY write on the minority side must fail");
            assert!(
                err.message()
                    .contains("Failed to update CRDT at requested write consistency"),
                "MAJORITY on the minority side: {err:?}"
            );
            local.expect("a LOCAL write on the minority side");
            let mut h = history.lock().unwrap();
            h.indeterminate_adds.insert("minority-majority".into());
            let at = Instant::now();
            let ack = Ack {
                node: 2,
                local: true,
                at,
            };
            h.acked_adds.insert("minority-local".into(), ack);
            drop(h);
            docker_ok(&["network", "disconnect", &side, &n.model]);
        },
        |n| {
            let ip = n.ip.to_string();
            let alias = ["--alias", "latticed-peers"];
            docker_ok(
                &[
                    &["network", "connect", "--ip", &ip][..],
                    &alias,
                    &[&network, &n.model],
                ]
                .concat(),
            );
        },
    );
    // ALL works again through the node that was cut off.
    poll_until(SETTLE, "an ALL write through n3 after the heal", || {
        rt.block_on(async {
            let mut c = client(&cluster.nodes[2].frontend()).ok()?;
            c.process(request(SET, add("after-heal-all"), 2)).await.ok()
        })
    });
    let ack = Ack {
        node: 2,
        local: false,
        at: Instant::now(),
    };
    history
        .lock()
        .unwrap()
        .acked_adds
        .insert("after-heal-all".into(), ack);
    more_writes(20, "after the partition");

    // 3. Pause n1 until the others declare it down (longer than the suspect timeout), resume.
    cluster.fault(
        "pause",
        0,
        "down",
        |n| {
            docker_ok(&["pause", &n.daemon]);
        },
        |_| {},
        |n| {
            docker_ok(&["unpause", &n.daemon]);
        },
    );
    more_writes(20, "after the pause");

    if rolling_restart {
        roll_every_node(&cluster);
        more_writes(20, "after the rolling restart");
    }

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }

    // Convergence: every node holds the same counter and set.
    let converge = Instant::now();
    let (counter, set) = loop {
        let last: Vec<_> = cluster.nodes.iter().map(values).collect();
        if let Some(Some(first)) = last.first() {
            if last.iter().all(|v| v.as_ref() == Some(first)) {
                break first.clone();
            }
        }
        if converge.elapsed() > SETTLE {
            let keys = http_get(cluster.nodes[0].admin(), "/v1/keys");
            let summary: Vec<_> = last
                .iter()
                .map(|v| v.as_ref().map(|(c, s)| (*c, s.len())))
                .collect();
            panic!(
                "the nodes hold different values after {SETTLE:?}: (counter, set size) per \
                 node {summary:?}; n1's /v1/keys: {keys:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "multihost: converged {:.1?} after the writes",
        converge.elapsed()
    );

    let h = history.lock().unwrap();
    // A LOCAL write acknowledged by a node in the last LOCAL_GRACE before it was SIGKILLed
    // may die with it (no durability yet: its delta may not have left); every other
    // acknowledged write must be in the final state.
    let must_survive = |a: &Ack| {
        !(a.local
            && killed
                .get(&a.node)
                .is_some_and(|&k: &Instant| a.at <= k && k - a.at < LOCAL_GRACE))
    };
    let acked = h.acked_increments.len() as i64;
    let sure = h
        .acked_increments
        .iter()
        .filter(|a| must_survive(a))
        .count() as i64;
    let upper = acked + h.indeterminate_increments as i64;
    eprintln!(
        "multihost: counter {counter}: {acked} acknowledged ({sure} that must survive), {} \
         indeterminate; set: {} elements, {} acknowledged, {} indeterminate; failures {:?}",
        h.indeterminate_increments,
        set.len(),
        h.acked_adds.len(),
        h.indeterminate_adds.len(),
        h.failures
    );
    assert!(
        counter >= sure && counter <= upper,
        "counter {counter} outside [{sure}, {upper}]"
    );
    let lost: Vec<_> = h
        .acked_adds
        .iter()
        .filter(|(e, a)| must_survive(a) && !set.contains(*e))
        .map(|(e, _)| e)
        .collect();
    assert!(lost.is_empty(), "acknowledged adds lost: {lost:?}");
    assert!(
        set.contains("minority-majority"),
        "a MAJORITY write that failed on the minority side stays and replicates"
    );
    let unknown: Vec<_> = set
        .iter()
        .filter(|e| !h.acked_adds.contains_key(*e) && !h.indeterminate_adds.contains(*e))
        .collect();
    assert!(unknown.is_empty(), "elements nobody added: {unknown:?}");
    drop(h);
    drop(cluster);
    eprintln!("multihost: suite took {:.1?}", started.elapsed());
}

/// `docker-compose` (Compose v1) or `docker compose` (v2), whichever this machine has.
fn compose_command() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// A run of `docker/compose.yaml` under its own project name, subnet, host ports and
/// certificate volume; `down` and the volume removed on drop.
struct ComposeRun {
    command: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
    volume: String,
}

impl ComposeRun {
    fn run(&self, args: &[&str]) -> Output {
        let file = repo_root().join("docker/compose.yaml");
        Command::new(&self.command[0])
            .args(&self.command[1..])
            .args(["-p", &self.project, "-f", file.to_str().unwrap()])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }
}

impl Drop for ComposeRun {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.run(&["logs", "--no-color", "--tail", "20"]);
            eprintln!(
                "--- compose logs:\n{}",
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        self.run(&["down", "--remove-orphans"]);
        docker(&["volume", "rm", &self.volume]);
    }
}

/// `docker/compose.yaml` as the README uses it: `docker/make-certs`, `up`, the members on a
/// published admin port, a `Process` call through a published front-end, the value on another
/// node, and the image's HEALTHCHECK probe inside a daemon container.
#[test]
fn multihost_compose_cluster_serves_clients() {
    if !docker_or_skip() {
        return;
    }
    let started = Instant::now();
    build_images();
    let mut rng = seed();
    let run = format!(
        "latticed-mh-{}-{}",
        std::process::id(),
        next(&mut rng) % 100_000
    );
    let ports = 20 + next(&mut rng) % 40; // host ports NN000.. and NN099..: 20000-59999
    let mut compose = ComposeRun {
        command: compose_command(),
        project: run.clone(),
        env: vec![("LATTICED_PORTS".into(), ports.to_string())],
        volume: format!("{run}-certs"),
    };
    compose
        .env
        .push(("LATTICED_CERTS_VOLUME".into(), compose.volume.clone()));
    let certs = Command::new(repo_root().join("docker/make-certs"))
        .env("LATTICED_CERTS_VOLUME", &compose.volume)
        .status()
        .unwrap();
    assert!(certs.success(), "docker/make-certs failed");
    // A free /24 for the compose network: Docker refuses one that overlaps another.
    let up = (0..10).any(|_| {
        let subnet = format!("10.{}.{}", 200 + next(&mut rng) % 50, next(&mut rng) % 256);
        compose.env.retain(|(k, _)| k != "LATTICED_SUBNET");
        compose.env.push(("LATTICED_SUBNET".into(), subnet));
        let out = compose.run(&["up", "-d"]);
        if !out.status.success() {
            eprintln!("compose up: {}", String::from_utf8_lossy(&out.stderr));
            compose.run(&["down", "--remove-orphans"]);
        }
        out.status.success()
    });
    assert!(up, "docker compose up failed on 10 subnets");

    let admin = |i: u64| -> SocketAddr { ([127, 0, 0, 1], (ports * 1000 + 99 + i) as u16).into() };
    poll_until(SETTLE, "n1 to report 3 members up", || {
        let (status, body) = http_get(admin(0), "/v1/members")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let up = v["members"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "up")
            .count();
        (status == 200 && up == 3).then_some(())
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let frontend = format!("http://127.0.0.1:{}", ports * 1000);
    let increment = m::Request {
        id: "GCounter-1".into(),
        actions: vec![m::RequestAction {
            action: Some(m::request_action::Action::Update(m::Update {
                update: Some(m::update::Update::Gcounter(m::GCounterUpdate {
                    increment: 5,
                })),
                write_consistency: 0,
            })),
        }],
    };
    let reply = poll_until(SETTLE, "n1's front-end to answer", || {
        rt.block_on(async {
            client(&frontend)
                .ok()?
                .process(increment.clone())
                .await
                .ok()
        })
    })
    .into_inner();
    let expect = m::State {
        value: Some(m::state::Value::Gcounter(m::GCounterValue { value: 5 })),
    };
    assert_eq!(reply.state, Some(expect));
    poll_until(SETTLE, "n3 to hold GCounter-1 = 5", || {
        let (status, body) = http_get(admin(2), "/v1/keys/CrdtTckModel-GCounter-1")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && v["value"] == 5).then_some(())
    });

    // The HEALTHCHECK: the image's probe, run in a daemon's container, finds /healthz.
    let id = String::from_utf8(compose.run(&["ps", "-q", "latticed1"]).stdout).unwrap();
    let health = docker_ok(&[
        "inspect",
        "-f",
        "{{json .Config.Healthcheck.Test}}",
        id.trim(),
    ]);
    assert_eq!(health, r#"["CMD","/usr/local/bin/latticed-healthcheck"]"#);
    docker_ok(&["exec", id.trim(), "/usr/local/bin/latticed-healthcheck"]);
    drop(compose);
    eprintln!(
        "multihost: compose cluster checked in {:.1?}",
        started.elapsed()
    );
}

/// A rolling restart: each daemon in turn gets SIGTERM (`docker stop`), leaves (the others
/// report it `left`), exits 0, and is started again; the next one goes when this one is ready
/// (`/readyz`: its first complete sync is done), as a Kubernetes rolling update does. Without
/// durability, a node restarted before that holds nothing yet.
fn roll_every_node(cluster: &Cluster) {
    for i in 0..cluster.nodes.len() {
        cluster.fault(
            "rolling restart",
            i,
            "left",
            |n| {
                docker_ok(&["stop", "-t", "10", &n.daemon]);
                let code = docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &n.daemon]);
                assert_eq!(code, "0", "{} exit code after SIGTERM", n.name);
            },
            |_| {},
            |n| {
                docker_ok(&["start", &n.daemon]);
                poll_until(SETTLE, &format!("{} ready after restart", n.name), || {
                    (http_get(n.admin(), "/readyz")?.0 == 200).then_some(())
                });
            },
        );
    }
}
