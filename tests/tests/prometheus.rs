//! A real Prometheus (the Debian package `prometheus`) scrapes a running three-node cluster:
//! every target is up with no scrape error, and queries over what it stored return what the
//! cluster did: the commands sent, three members up on every node, a replication-ack quantile
//! aggregated over the three nodes' histogram buckets.
//!
//! Prometheus runs as a child process with its own configuration (the scrape config of
//! docs/metrics.md, pointed at the three admin endpoints), storage in a temporary folder and a
//! free loopback port; the Debian service, if any, plays no part. Without the `prometheus`
//! binary the test fails when `CI` is set and is skipped with a message otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_node::http1;
use latticed_tests::model_node::{pn_change, request};
use latticed_tests::model_uf::{self, ConformanceModel};
use latticed_tests::{
    http_get, poll_until, poll_within, tool_or_skip, Certs, Daemon, DaemonConfig,
};

const NODES: usize = 3;
/// Commands sent through the front-ends, round-robin over the nodes.
const COMMANDS: usize = 30;
const SETTLE: Duration = Duration::from_secs(60);

/// The `prometheus` binary: `PROMETHEUS` if set, else the one on the PATH.
fn prometheus_bin() -> String {
    std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into())
}

fn prometheus_or_skip() -> bool {
    let ok = Command::new(prometheus_bin())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    tool_or_skip(
        "Prometheus scrape test",
        ok,
        "the `prometheus` binary (apt-get install prometheus)",
    )
}

/// A Prometheus process; killed on drop (its log printed if the test is failing).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second.
    fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        // the scrape config of docs/metrics.md, with a 1 s interval and these targets
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: latticed\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_bin())
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus { child, addr, dir };
        poll_until(SETTLE, "Prometheus to be ready", || {
            (http_get(p.addr, "/-/ready")?.0 == 200).then_some(())
        });
        p
    }

    /// GET on the HTTP API: the JSON answer's `data`.
    fn api(&self, path: &str) -> Value {
        let answer = http1(self.addr, "GET", path, &[], b"");
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        let v: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// An instant query: (labels, value) per series of the resulting vector.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let v = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (s["metric"].clone(), v)
            })
            .collect()
    }

    /// Polls `promql` until `ok` holds for its result; returns that result.
    fn query_until(&self, promql: &str, ok: impl Fn(&[(Value, f64)]) -> bool) -> Vec<(Value, f64)> {
        let mut last = Vec::new();
        let found = poll_within(SETTLE, || {
            last = self.query(promql);
            ok(&last).then(|| last.clone())
        });
        found.unwrap_or_else(|| panic!("{promql}: still {last:?} after {SETTLE:?}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("prometheus.log"));
            eprintln!("--- prometheus log:\n{}", log.unwrap_or_default());
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Three daemons, each serving its own conformance model, joined into one cluster.
fn cluster(rt: &tokio::runtime::Runtime, certs: &Certs) -> Vec<Daemon> {
    let mut nodes: Vec<Daemon> = Vec::new();
    for i in 1..=NODES {
        let uf = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            tokio::spawn(model_uf::serve(ConformanceModel::default(), l));
            a
        });
        let name = format!("n{i}");
        nodes.push(Daemon::start(DaemonConfig {
            certs: Some(certs.issue(&name)),
            name,
            join: nodes.first().map(|n| n.cluster).into_iter().collect(),
            extra: vec![
                "--user-function".into(),
                uf.to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            ..Default::default()
        }));
    }
    for n in &nodes {
        poll_until(
            SETTLE,
            &format!("{} to see {NODES} up and serve", n.name),
            || {
                let up = n.members()?.values().filter(|(s, _)| s == "up").count();
                (up == NODES && n.frontend().is_some()).then_some(())
            },
        );
    }
    nodes
}

#[test]
fn prometheus_scrapes_the_cluster_and_its_queries_say_what_the_cluster_did() {
    if !prometheus_or_skip() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let certs = Certs::new();
    let nodes = cluster(&rt, &certs);
    let targets: Vec<SocketAddr> = nodes.iter().map(|n| n.admin).collect();
    let prom = Prometheus::start(&targets);

    // every target up, scraped without error (a parse error of the exposition shows here)
    let active = poll_until(SETTLE, "every target up without error", || {
        let data = prom.api("/api/v1/targets?state=active");
        let active = data["activeTargets"].as_array()?.clone();
        (active.len() == NODES
            && active
                .iter()
                .all(|t| t["health"] == "up" && t["lastError"] == ""))
        .then_some(active)
    });
    for t in &active {
        assert!(
            targets
                .iter()
                .any(|a| t["scrapeUrl"] == format!("http://{a}/metrics")),
            "{t}"
        );
    }

    // the writes: PNCounter +1, round-robin through the three front-ends
    let id = "PNCounter-prometheus";
    rt.block_on(async {
        let mut clients = Vec::new();
        for n in &nodes {
            let url = format!("http://{}", n.frontend().unwrap());
            clients.push(CrdtTckModelClient::connect(url).await.unwrap());
        }
        for i in 0..COMMANDS {
            let req = request(id, vec![pn_change(1)]);
            clients[i % NODES].process(req).await.unwrap();
        }
    });
    // every node holds the sum
    for n in &nodes {
        poll_until(SETTLE, &format!("{} to hold {COMMANDS}", n.name), || {
            let (200, body) = n.get(&format!("/v1/keys/CrdtTckModel-{id}"))? else {
                return None;
            };
            let v: Value = serde_json::from_str(&body).ok()?;
            (v["value"] == COMMANDS).then_some(())
        });
    }

    // what Prometheus stored says the same
    let sent = COMMANDS as f64;
    let total = prom.query_until("sum(latticed_commands_total{outcome=\"ok\"})", |r| {
        r.first().is_some_and(|(_, v)| *v >= sent)
    });
    assert_eq!(total[0].1, sent, "commands counted across the nodes");
    let per_node = prom.query_until(
        "sum by (instance) (latticed_commands_total{outcome=\"ok\"})",
        |r| r.len() == NODES && r.iter().map(|(_, v)| v).sum::<f64>() >= sent,
    );
    for (labels, v) in &per_node {
        assert_eq!(*v, sent / NODES as f64, "round-robin: {labels}");
    }
    let members = prom.query_until("latticed_members{state=\"up\"}", |r| r.len() == NODES);
    for (labels, v) in &members {
        assert_eq!(*v, NODES as f64, "members up on {labels}");
    }
    let keys = prom.query_until("min(latticed_keys)", |r| {
        r.first().is_some_and(|(_, v)| *v >= 1.0)
    });
    assert_eq!(keys[0].1, 1.0, "one key, on every node");
    // the ack histogram has buckets on all three nodes, and one quantile aggregates them
    let nodes_with_acks = prom.query_until(
        "count(sum by (instance) (latticed_replication_ack_seconds_count) > 0)",
        |r| r.first().is_some_and(|(_, v)| *v == NODES as f64),
    );
    assert_eq!(nodes_with_acks[0].1, NODES as f64);
    let p99 = prom.query_until(
        "histogram_quantile(0.99, sum by (le) (latticed_replication_ack_seconds_bucket))",
        |r| r.len() == 1 && r[0].1.is_finite(),
    );
    let p99 = p99[0].1;
    assert!(
        p99 > 0.0 && p99 <= 10.0,
        "p99 of replication acks across the nodes: {p99} s"
    );
    let up = prom.query("sum(up{job=\"latticed\"})");
    assert_eq!(up[0].1, NODES as f64);
    println!(
        "prometheus: {NODES} targets up; {sent} commands counted; \
         p99 replication ack across the nodes {:.2} ms",
        p99 * 1e3
    );
}
