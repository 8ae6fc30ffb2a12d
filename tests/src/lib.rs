//! latticed-tests: the harness for end-to-end tests with real daemons.
//!
//! Daemons run as processes (the `latticed-under-test` binary, which is `latticed`) on
//! 127.0.0.1 with ephemeral ports; each prints its bound addresses on its first stdout line,
//! which the harness reads. Certificates are made with `latticed certs` itself. Nothing here
//! sleeps to synchronise: [`poll_until`] polls a condition against a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the daemon binary under test: `latticed-under-test` in the target folder of the
/// running test (cargo builds it for this package's tests), or `LATTICED_BIN` if set.
pub fn latticed_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LATTICED_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/latticed-under-test
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(format!(
        "latticed-under-test{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        bin.exists(),
        "{} is missing: run the tests with cargo test",
        bin.display()
    );
    bin
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit` naming `what`.
pub fn poll_until<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_within(limit, f).unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Polls `f` every 50 ms until it returns `Some`; `None` after `limit` (for a caller that says
/// itself what it saw last).
pub fn poll_within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a suite can run, given whether the tool it needs answers. Without the tool: a
/// failure when `CI` is set (CI runs every suite), else a skip that says so on stderr, so that
/// a developer without the tool can run the rest.
pub fn tool_or_skip(suite: &str, available: bool, missing: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the {suite} needs {missing}, and CI is set"
    );
    eprintln!("SKIPPED {suite}: {missing} (set CI=1 to make this a failure)");
    false
}

/// A cluster CA in a temporary folder, with node certificates issued on demand.
pub struct Certs {
    dir: tempfile::TempDir,
}

/// The three files a node needs.
#[derive(Clone, Debug)]
pub struct NodeCerts {
    /// CA certificate
    pub ca: PathBuf,
    /// node certificate
    pub cert: PathBuf,
    /// node key
    pub key: PathBuf,
}

fn latticed(args: &[&str]) {
    let out = Command::new(latticed_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "latticed {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// A new CA (`latticed certs init`).
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        latticed(&["certs", "init", "--dir", dir.path().to_str().unwrap()]);
        Certs { dir }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a node certificate (`latticed certs issue`), or returns the one issued before.
    pub fn issue(&self, name: &str) -> NodeCerts {
        let d = self.dir.path();
        if !d.join(format!("{name}.pem")).exists() {
            latticed(&[
                "certs",
                "issue",
                "--dir",
                d.to_str().unwrap(),
                "--name",
                name,
            ]);
        }
        NodeCerts {
            ca: d.join("ca.pem"),
            cert: d.join(format!("{name}.pem")),
            key: d.join(format!("{name}-key.pem")),
        }
    }

    /// A QUIC client endpoint on 127.0.0.1 presenting the certificate `name` of these certs,
    /// as a node's transport does (call it inside a tokio runtime).
    pub fn client_endpoint(&self, name: &str) -> quinn::Endpoint {
        let c = self.issue(name);
        let tls = latticed::certs::load(&c.ca, &c.cert, &c.key).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(latticed::transport::client_config(&tls).unwrap());
        ep
    }
}

impl Default for Certs {
    fn default() -> Self {
        Certs::new()
    }
}

/// SWIM timing for tests: fast probes, short suspicion.
pub const FAST_SWIM: &[&str] = &["--probe-period", "200ms", "--suspect-timeout", "1s"];

/// How to start a daemon.
#[derive(Clone, Debug, Default)]
pub struct DaemonConfig {
    /// node name
    pub name: String,
    /// certificates (none: ephemeral, alone)
    pub certs: Option<NodeCerts>,
    /// UDP port of the cluster endpoint (0: ephemeral)
    pub cluster_port: u16,
    /// peers to join
    pub join: Vec<SocketAddr>,
    /// more flags
    pub extra: Vec<String>,
}

impl DaemonConfig {
    /// The command that starts this daemon (`latticed-under-test` with its flags; no stdio
    /// set).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(latticed_bin());
        cmd.arg("--node-name")
            .arg(&self.name)
            .arg("--cluster-addr")
            .arg(format!("127.0.0.1:{}", self.cluster_port))
            .arg("--admin-addr")
            .arg("127.0.0.1:0")
            .args(FAST_SWIM)
            .args(&self.extra)
            .env("RUST_LOG", "info,latticed=debug");
        if let Some(c) = &self.certs {
            cmd.arg("--ca-cert")
                .arg(&c.ca)
                .arg("--cert")
                .arg(&c.cert)
                .arg("--key")
                .arg(&c.key);
        }
        for j in &self.join {
            cmd.arg("--join").arg(j.to_string());
        }
        if !self.extra.iter().any(|a| a == "--user-function") {
            cmd.args(["--user-function", "none"]);
        }
        // every node serves a front-end (other nodes' services at least): on a free port
        if !self.extra.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd
    }
}

/// A running daemon process.
pub struct Daemon {
    /// node name
    pub name: String,
    /// bound cluster address
    pub cluster: SocketAddr,
    /// bound admin address
    pub admin: SocketAddr,
    /// how it was started
    pub config: DaemonConfig,
    child: Child,
    log: Arc<Mutex<String>>,
    frontend: Arc<Mutex<Option<SocketAddr>>>,
}

impl Daemon {
    /// Starts a daemon and waits for its address line.
    pub fn start(config: DaemonConfig) -> Daemon {
        let mut cmd = config.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        // later lines: `latticed frontend ADDR` once the front-end serves
        let frontend = Arc::new(Mutex::new(None));
        let seen = frontend.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("latticed frontend ") {
                    *seen.lock().unwrap() = addr.trim().parse::<SocketAddr>().ok();
                }
            }
        });
        // latticed 0.1.0 node NAME cluster ADDR admin ADDR
        let words: Vec<&str> = first.split_whitespace().collect();
        let field = |k: &str| -> SocketAddr {
            let i = words
                .iter()
                .position(|w| *w == k)
                .unwrap_or_else(|| panic!("no `{k}` in {first:?}; log:\n{}", log.lock().unwrap()));
            words[i + 1].parse().unwrap()
        };
        Daemon {
            name: config.name.clone(),
            cluster: field("cluster"),
            admin: field("admin"),
            config,
            child,
            log,
            frontend,
        }
    }

    /// The front-end's address, once it serves.
    pub fn frontend(&self) -> Option<SocketAddr> {
        *self.frontend.lock().unwrap()
    }

    /// GET on the admin endpoint: (status, body); `None` if it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin, path)
    }

    /// `/v1/members` as name -> (state, incarnation).
    pub fn members(&self) -> Option<BTreeMap<String, (String, u64)>> {
        let (status, body) = self.get("/v1/members")?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let mut out = BTreeMap::new();
        for m in v["members"].as_array()? {
            out.insert(
                m["name"].as_str()?.to_string(),
                (m["state"].as_str()?.to_string(), m["incarnation"].as_u64()?),
            );
        }
        Some(out)
    }

    /// A counter or gauge from `/metrics` (summed over label sets matching `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let Some((_, body)) = self.get("/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter(|l| l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`"STOP"`, `"CONT"`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([format!("-{signal}").as_str(), &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} {pid}");
    }

    /// The exit status, if it exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGTERM, then waits (at most `limit`) for the exit.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
        poll_until(limit, "the daemon to exit", || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Starts `n` nodes `n1..=n` with certificates from `certs`, all joining `n1`.
pub fn start_cluster(certs: &Certs, n: usize) -> Vec<Daemon> {
    let first = Daemon::start(DaemonConfig {
        name: "n1".into(),
        certs: Some(certs.issue("n1")),
        ..Default::default()
    });
    let seed = first.cluster;
    let mut nodes = vec![first];
    for i in 2..=n {
        let name = format!("n{i}");
        nodes.push(Daemon::start(DaemonConfig {
            certs: Some(certs.issue(&name)),
            name,
            join: vec![seed],
            ..Default::default()
        }));
    }
    nodes
}

/// Whether every node in `nodes` reports every name in `expect` with that state.
pub fn all_report(nodes: &[&Daemon], expect: &BTreeMap<String, &str>) -> bool {
    nodes.iter().all(|d| {
        d.members().is_some_and(|m| {
            expect
                .iter()
                .all(|(name, state)| m.get(name).is_some_and(|(s, _)| s == state))
        })
    })
}

/// A daemon running inside the test process, on its own tokio runtime, so that tests can use
/// its replication API directly. Crashing it drops the runtime: every task stops at once and
/// nothing is said to the peers, as with kill -9.
pub struct LiveNode {
    /// node name
    pub name: String,
    /// bound cluster address
    pub cluster: SocketAddr,
    /// bound admin address
    pub admin: SocketAddr,
    /// the replication API
    pub replication: latticed::replication::ReplicationHandle,
    runtime: Option<tokio::runtime::Runtime>,
    node: Option<latticed::Node>,
}

impl LiveNode {
    /// Starts a node in-process with certificates from `certs`, joining `join`.
    pub fn start(
        name: &str,
        certs: &NodeCerts,
        cluster_port: u16,
        join: &[SocketAddr],
        extra: &[&str],
    ) -> LiveNode {
        use clap::Parser;
        let mut argv: Vec<String> = vec![
            "latticed".into(),
            "--node-name".into(),
            name.into(),
            "--cluster-addr".into(),
            format!("127.0.0.1:{cluster_port}"),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--ca-cert".into(),
            certs.ca.display().to_string(),
            "--cert".into(),
            certs.cert.display().to_string(),
            "--key".into(),
            certs.key.display().to_string(),
        ];
        argv.extend(FAST_SWIM.iter().map(|s| s.to_string()));
        argv.extend(["--anti-entropy-interval".to_string(), "100ms".to_string()]);
        if !extra.contains(&"--user-function") {
            argv.extend(["--user-function".to_string(), "none".to_string()]);
        }
        if !extra.contains(&"--listen") {
            argv.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        for j in join {
            argv.extend(["--join".to_string(), j.to_string()]);
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        let cli = latticed::config::Cli::try_parse_from(argv).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let node = runtime.block_on(latticed::Node::start(&cli.run)).unwrap();
        LiveNode {
            name: name.to_string(),
            cluster: node.cluster_addr,
            admin: node.admin_addr,
            replication: node.replication.clone(),
            runtime: Some(runtime),
            node: Some(node),
        }
    }

    /// The front-end's address, once it serves.
    pub fn frontend(&self) -> Option<SocketAddr> {
        *self.node.as_ref()?.frontend.borrow()
    }

    /// Runs a future on this node's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().expect("node is running").block_on(f)
    }

    /// Shuts down as on SIGTERM: drain, flush, leave, close.
    pub fn shutdown(&mut self) {
        if let Some(node) = self.node.take() {
            self.block_on(node.shutdown());
        }
        self.crash();
    }

    /// Spawns a future on this node's runtime.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().expect("node is running").spawn(f)
    }

    /// Stops every task at once, saying nothing to peers.
    pub fn crash(&mut self) {
        // stop the tasks first: dropping the node while they run would let the cluster task
        // see its leave handle go and leave gracefully
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        self.node.take();
    }

    /// `/v1/members` as name -> state.
    pub fn member_states(&self) -> BTreeMap<String, String> {
        let Some((200, body)) = http_get(self.admin, "/v1/members") else {
            return BTreeMap::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                Some((
                    m["name"].as_str()?.to_string(),
                    m["state"].as_str()?.to_string(),
                ))
            })
            .collect()
    }
}

impl Drop for LiveNode {
    fn drop(&mut self) {
        self.crash();
    }
}

/// The conformance model's messages and services (package `cloudstate.tck.model.crdt`).
#[allow(missing_docs, clippy::all, nonstandard_style)]
pub mod model {
    tonic::include_proto!("cloudstate.tck.model.crdt");

    /// The model's `FileDescriptorSet`, imports included.
    pub const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("model");
}

/// The interop suite's messages and clients (package `interop`, tests/interop/protos).
#[allow(missing_docs, clippy::all, nonstandard_style)]
pub mod interop_pb {
    tonic::include_proto!("interop");
}

pub mod docker;
pub mod help;
pub mod interop;
pub mod model_node;
pub mod model_uf;
pub mod saboteur;
