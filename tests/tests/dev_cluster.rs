//! `scripts/dev-cluster` does what the README says: it starts a cluster of nodes with model user
//! functions on loopback, says "ready" once every node is ready and sees every node up, serves
//! HTTP/JSON through each front-end, and on SIGINT stops every process it started and removes
//! its temporary folder.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use latticed_tests::{http_get, latticed_bin, poll_until};

const NODES: u16 = 3;

/// The script's process and its process group: dropped (also when the test fails), the whole
/// group is killed, whatever the script managed to clean up itself.
struct Script {
    child: Child,
}

impl Drop for Script {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether every port the script would use from `base` is free now.
fn ports_free(base: u16) -> bool {
    (0..NODES).all(|i| {
        let tcp = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        tcp(base + i)
            && tcp(base + 100 + i)
            && UdpSocket::bind(("127.0.0.1", base + 200 + i)).is_ok()
            && tcp(base + 300 + i)
    })
}

/// A base port below the ephemeral range whose ports are all free.
fn free_base_port() -> u16 {
    let start = std::process::id() as u16 % 200;
    (0..200)
        .map(|k| 10_000 + ((start + k) % 200) * 100)
        .find(|&b| ports_free(b))
        .expect("no free base port between 10000 and 30000")
}

/// `key=value` out of the script's node line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
        .to_string()
}

/// A minimal HTTP/1.1 POST of JSON: (status, raw body).
fn post_json(addr: SocketAddr, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((
        head.split_whitespace().nth(1)?.parse().ok()?,
        body.to_string(),
    ))
}

/// Whether a process is gone (no such pid, or a zombie about to be reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn dev_cluster_starts_serves_and_stops_everything_on_sigint() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let base = free_base_port();
    let started = Instant::now();
    let mut script = Script {
        child: Command::new("bash")
            .arg(root.join("scripts/dev-cluster"))
            .args([
                "--nodes",
                &NODES.to_string(),
                "--base-port",
                &base.to_string(),
            ])
            .args([
                "--no-build",
                "--ready-timeout",
                "120",
                "--shutdown-grace",
                "1s",
            ])
            .env("LATTICED_BIN", latticed_bin())
            .env("MODEL_BIN", env!("CARGO_BIN_EXE_conformance-model"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap(),
    };
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = script.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (etx, errors) = mpsc::channel::<String>();
    let stderr = script.child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(line);
        }
    });
    let stderr_so_far = || errors.try_iter().collect::<Vec<_>>().join("\n");

    // Its output up to the ready line, against a deadline.
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let ready = line.starts_with("dev-cluster: ready");
                out.push(line);
                if ready {
                    break;
                }
            }
            Err(_) => panic!(
                "no ready line from dev-cluster within 150 s; stdout:\n{}\nstderr:\n{}",
                out.join("\n"),
                stderr_so_far()
            ),
        }
    }
    println!("dev-cluster ready after {:?}", started.elapsed());
    let pids: Vec<u32> = out
        .iter()
        .find_map(|l| l.strip_prefix("dev-cluster: pids "))
        .expect("a pids line")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        pids.len(),
        2 * NODES as usize,
        "a daemon and a model per node"
    );
    let nodes: Vec<&String> = out
        .iter()
        .filter(|l| l.starts_with("dev-cluster: node "))
        .collect();
    assert_eq!(nodes.len(), NODES as usize, "{out:?}");
    let admin = |i: usize| -> SocketAddr { field(nodes[i], "admin").parse().unwrap() };
    let frontend = |i: usize| -> SocketAddr { field(nodes[i], "frontend").parse().unwrap() };
    let tmp = PathBuf::from(
        out.iter()
            .find_map(|l| l.strip_prefix("dev-cluster: logs and certificates in "))
            .expect("the temporary folder")
            .split_whitespace()
            .next()
            .unwrap(),
    );
    assert!(tmp.is_dir());
    let printed = out.join("\n");
    assert!(
        printed.contains("/v1/members") && printed.contains("/tck/model/crdt/GCounter-1"),
        "the client commands to try: {printed}"
    );

    // Every node reports every node up.
    for i in 0..NODES as usize {
        let (status, body) = http_get(admin(i), "/v1/members").expect("members");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut up: Vec<&str> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "up")
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        up.sort_unstable();
        assert_eq!(up, ["n1", "n2", "n3"], "node {i}: {body}");
    }

    // HTTP/JSON through n1's front-end, as the script suggests; the value reaches n3.
    let (status, body) = post_json(
        frontend(0),
        "/tck/model/crdt/GCounter-1",
        r#"{"actions": [{"update": {"gcounter": {"increment": 5}}}]}"#,
    )
    .expect("an HTTP/JSON answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""gcounter":{"value":"5"}"#), "{body}");
    poll_until(Duration::from_secs(10), "the counter on n3", || {
        let (s, b) = http_get(admin(2), "/v1/keys/CrdtTckModel-GCounter-1")?;
        (s == 200 && b.contains(r#""value":5"#)).then_some(())
    });

    // SIGINT to the script alone: it stops its children and removes its folder.
    let stop = Instant::now();
    let ok = Command::new("kill")
        .args(["-INT", &script.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = poll_until(Duration::from_secs(30), "dev-cluster to exit", || {
        script.child.try_wait().unwrap()
    });
    println!("dev-cluster stopped {:?} after SIGINT", stop.elapsed());
    assert_eq!(status.code(), Some(130), "{}", stderr_so_far());
    poll_until(Duration::from_secs(5), "every child to be gone", || {
        pids.iter().all(|&p| gone(p)).then_some(())
    });
    assert!(!tmp.exists(), "{} is still there", tmp.display());
    poll_until(Duration::from_secs(5), "the ports to be free", || {
        ports_free(base).then_some(())
    });
}
