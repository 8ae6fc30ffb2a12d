//! Durable state (`--data-dir`, issue 9): real `latticed` processes on 127.0.0.1, each serving
//! the conformance model user function, written to through their front-ends.
//!
//! - kill -9 of every node of a 3-node cluster in the middle of writes, then a restart of all
//!   of them: every acknowledged write is there, and the nodes converge;
//! - a node restarted after a clean shutdown keeps its replica id, after kill -9 it takes a
//!   fresh one (its deltas may have left before they were committed), and a node without a
//!   data dir never keeps it;
//! - data dirs that must not be used are refused with a clear error: another cluster's, another
//!   node's, an unknown format, a corrupt or truncated file, one older than the tombstone
//!   lifetime;
//! - a second process on a data dir in use waits, says so, and starts once the first exits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_uf::{self, ConformanceModel};
use latticed_tests::{poll_until, Certs, Daemon, DaemonConfig};

const WAIT: Duration = Duration::from_secs(30);
const COUNTER: &str = "GCounter-durable";
const SET: &str = "ORSet-durable";
const DATA_FILE: &str = "latticed.redb";

type Client = CrdtTckModelClient<tonic::transport::Channel>;

fn update(u: m::update::Update, c: m::UpdateWriteConsistency) -> m::Request {
    m::Request {
        id: match u {
            m::update::Update::Gcounter(_) => COUNTER.into(),
            _ => SET.into(),
        },
        actions: vec![m::RequestAction {
            action: Some(m::request_action::Action::Update(m::Update {
                update: Some(u),
                write_consistency: c as i32,
            })),
        }],
    }
}

/// The counter and the set as one node's front-end reads them.
async fn read(c: &mut Client) -> Option<(u64, BTreeSet<String>)> {
    let state = |id: &str| {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            c.process(m::Request {
                id,
                actions: vec![],
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().state?.value)
        }
    };
    let counter = match state(COUNTER).await {
        Some(m::state::Value::Gcounter(v)) => v.value,
        None => 0,
        _ => return None,
    };
    let set = match state(SET).await {
        Some(m::state::Value::Orset(v)) => v.elements.into_iter().collect(),
        None => BTreeSet::new(),
        _ => return None,
    };
    Some((counter, set))
}

/// A model user function per node, served on the test's runtime.
fn user_function(rt: &tokio::runtime::Runtime) -> String {
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(model_uf::serve(ConformanceModel::default(), l));
        a.to_string()
    })
}

fn config(
    name: &str,
    certs: &Certs,
    port: u16,
    join: &[SocketAddr],
    uf: &str,
    dir: &Path,
) -> DaemonConfig {
    DaemonConfig {
        name: name.into(),
        certs: Some(certs.issue(name)),
        cluster_port: port,
        join: join.to_vec(),
        extra: [
            "--user-function",
            uf,
            "--listen",
            "127.0.0.1:0",
            "--anti-entropy-interval",
            "100ms",
            "--write-timeout",
            "2s",
            "--data-dir",
            dir.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
    }
}

fn connect(rt: &tokio::runtime::Runtime, d: &Daemon) -> Client {
    let fe = poll_until(WAIT, "the front-end to serve", || d.frontend());
    rt.block_on(CrdtTckModelClient::connect(format!("http://{fe}")))
        .unwrap()
}

fn all_up(nodes: &[Daemon]) {
    poll_until(WAIT, "every member up everywhere", || {
        nodes
            .iter()
            .all(|d| {
                d.members()
                    .is_some_and(|m| m.len() == nodes.len() && m.values().all(|(s, _)| s == "up"))
            })
            .then_some(())
    });
}

/// What the writers had acknowledged.
#[derive(Default)]
struct Acked {
    increments: u64,
    adds: BTreeSet<String>,
}

#[test]
fn kill_9_of_every_node_in_the_middle_of_writes_loses_nothing_acknowledged() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let certs = Certs::new();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ufs: Vec<String> = (0..3).map(|_| user_function(&rt)).collect();
    let first = Daemon::start(config("n1", &certs, 0, &[], &ufs[0], dirs[0].path()));
    let seed = first.cluster;
    let mut nodes = vec![first];
    for i in 1..3 {
        let name = format!("n{}", i + 1);
        nodes.push(Daemon::start(config(
            &name,
            &certs,
            0,
            &[seed],
            &ufs[i],
            dirs[i].path(),
        )));
    }
    all_up(&nodes);
    let clients: Vec<Client> = nodes.iter().map(|d| connect(&rt, d)).collect();

    // writers: per node, counter increments and set adds, LOCAL and MAJORITY in turn, each
    // counted once its reply came back
    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (n, client) in clients.iter().enumerate() {
        for lane in 0..2 {
            let (mut c, acked, stop) = (client.clone(), acked.clone(), stop.clone());
            writers.push(rt.spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 100_000 {
                    i += 1;
                    let consistency = if i.is_multiple_of(2) {
                        m::UpdateWriteConsistency::Majority
                    } else {
                        m::UpdateWriteConsistency::Local
                    };
                    let req = if lane == 0 {
                        update(
                            m::update::Update::Gcounter(m::GCounterUpdate { increment: 1 }),
                            consistency,
                        )
                    } else {
                        let e = format!("n{n}-{i}");
                        update(
                            m::update::Update::Orset(m::OrSetUpdate {
                                action: Some(m::or_set_update::Action::Add(e)),
                            }),
                            consistency,
                        )
                    };
                    let id = req.actions[0].clone();
                    let ok = tokio::time::timeout(Duration::from_secs(5), c.process(req))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    if !ok {
                        // the node is gone (or the write failed): nothing acknowledged
                        continue;
                    }
                    let mut a = acked.lock().unwrap();
                    match id.action {
                        Some(m::request_action::Action::Update(m::Update {
                            update: Some(m::update::Update::Orset(u)),
                            ..
                        })) => {
                            if let Some(m::or_set_update::Action::Add(e)) = u.action {
                                a.adds.insert(e);
                            }
                        }
                        _ => a.increments += 1,
                    }
                }
            }));
        }
    }
    // kill -9 every node while the writes go on
    poll_until(WAIT, "a few hundred acknowledged writes", || {
        let a = acked.lock().unwrap();
        (a.increments >= 150 && a.adds.len() >= 150).then_some(())
    });
    for d in nodes.iter_mut() {
        d.kill();
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let replicas: Vec<String> = nodes.iter().map(replica_of).collect();

    // restart every node on its port, with its data dir
    let ports: Vec<u16> = nodes.iter().map(|d| d.cluster.port()).collect();
    drop(nodes);
    let mut nodes = Vec::new();
    for i in 0..3 {
        let name = format!("n{}", i + 1);
        let join = if i == 0 { vec![] } else { vec![seed] };
        nodes.push(Daemon::start(config(
            &name,
            &certs,
            ports[i],
            &join,
            &ufs[i],
            dirs[i].path(),
        )));
    }
    for (d, before) in nodes.iter().zip(&replicas) {
        // deltas leave before their commit, so a life that ended without a clean shutdown
        // is followed by a fresh replica id (never the same dots issued twice)
        assert_ne!(&replica_of(d), before, "{} took a fresh replica id", d.name);
        logged(d, "without a clean shutdown");
        logged(
            d,
            &format!("previous_replica={}", before.trim_start_matches("replica=")),
        );
    }
    all_up(&nodes);
    let clients: Vec<Client> = nodes.iter().map(|d| connect(&rt, d)).collect();
    let mut last = Vec::new();
    poll_until(
        WAIT,
        "every node to hold every acknowledged write, the same everywhere",
        || {
            let reads: Vec<_> = clients
                .iter()
                .map(|c| rt.block_on(read(&mut c.clone())))
                .collect();
            let ok = reads.iter().all(|r| {
                r.as_ref().is_some_and(|(counter, set)| {
                    *counter >= acked.increments && set.is_superset(&acked.adds)
                })
            }) && reads.windows(2).all(|w| w[0] == w[1]);
            last = reads;
            ok.then_some(())
        },
    );
    eprintln!(
        "acknowledged: {} increments, {} adds; after the restart: {:?}",
        acked.increments,
        acked.adds.len(),
        last.first()
            .and_then(|r| r.as_ref())
            .map(|(c, s)| (c, s.len()))
    );
}

/// SIGTERM once the node runs (its admin endpoint answers: the signal handlers are in place),
/// and a clean exit.
fn stop(d: &mut Daemon) {
    poll_until(WAIT, "the admin endpoint", || {
        d.get("/healthz").filter(|(s, _)| *s == 200)
    });
    let status = d.terminate(WAIT);
    assert!(status.success(), "{status:?}\n{}", d.log());
}

/// Waits for `what` in a node's log.
fn logged(d: &Daemon, what: &str) {
    poll_until(WAIT, &format!("{what:?} in the log of {}", d.name), || {
        plain(&d.log()).contains(what).then_some(())
    });
}

/// `s` without its terminal colour codes.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The replica id a node logged at start (its log is read as it comes).
fn replica_of(d: &Daemon) -> String {
    poll_until(WAIT, "the node's start in its log", || {
        plain(&d.log())
            .lines()
            .find(|l| l.contains("node started"))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("replica=")))
            .map(str::to_string)
    })
}

fn lone(name: &str, dir: Option<&Path>) -> DaemonConfig {
    let mut extra = vec![];
    if let Some(d) = dir {
        extra = vec!["--data-dir".to_string(), d.display().to_string()];
    }
    DaemonConfig {
        name: name.into(),
        extra,
        ..Default::default()
    }
}

#[test]
fn a_restarted_node_keeps_its_replica_id_only_with_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Daemon::start(lone("n1", Some(dir.path())));
    logged(&a, "new data file");
    let first = replica_of(&a);
    stop(&mut a);
    let b = Daemon::start(lone("n1", Some(dir.path())));
    assert_eq!(replica_of(&b), first);
    logged(&b, "ended cleanly");
    drop(b);
    let c = Daemon::start(lone("n1", None));
    logged(&c, "no --data-dir");
    let d = Daemon::start(lone("n1", None));
    assert_ne!(replica_of(&c), replica_of(&d));
}

/// Runs a daemon that must refuse to start: its exit status and what it wrote on stderr.
fn refused(config: &DaemonConfig) -> (ExitStatus, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = config
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap();
    let status = poll_until(WAIT, "the daemon to exit", || child.try_wait().unwrap());
    (status, std::fs::read_to_string(out.path()).unwrap())
}

fn assert_refused(config: &DaemonConfig, says: &str) {
    let (status, err) = refused(config);
    assert!(!status.success(), "it started: {err}");
    assert!(err.contains(says), "{says:?} not in:\n{err}");
    assert!(err.contains(DATA_FILE), "the file is not named:\n{err}");
}

/// Sets a meta entry of a stopped node's data file, as another release (or time) would have.
fn set_meta(dir: &Path, key: &str, value: &[u8]) {
    let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
    let db = redb::Database::open(dir.join(DATA_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(meta).unwrap().insert(key, value).unwrap();
    txn.commit().unwrap();
}

#[test]
fn data_dirs_that_must_not_be_used_are_refused() {
    let certs = Certs::new();
    let with_ca = |certs: &Certs, dir: &Path| DaemonConfig {
        certs: Some(certs.issue("n1")),
        ..lone("n1", Some(dir))
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = Daemon::start(with_ca(&certs, dir.path()));
    stop(&mut a);

    // another cluster's CA, no CA at all (an ephemeral certificate), another node's name
    let other = Certs::new();
    assert_refused(&with_ca(&other, dir.path()), "belongs to another cluster");
    assert_refused(&lone("n1", Some(dir.path())), "belongs to another cluster");
    let mut n2 = with_ca(&certs, dir.path());
    n2.name = "n2".into();
    n2.certs = Some(certs.issue("n2"));
    assert_refused(&n2, "belongs to node n1");
    // the right one still starts
    let mut a = Daemon::start(with_ca(&certs, dir.path()));
    stop(&mut a);

    // last alive longer ago than the tombstone lifetime
    set_meta(dir.path(), "alive_at_ms", &0i64.to_le_bytes());
    let mut ttl = with_ca(&certs, dir.path());
    ttl.extra.extend(["--tombstone-ttl".into(), "1h".into()]);
    assert_refused(&ttl, "longer than --tombstone-ttl");

    // a format from another release
    set_meta(dir.path(), "format_version", &7u64.to_le_bytes());
    assert_refused(&with_ca(&certs, dir.path()), "format version 7");

    // a truncated file, an empty one
    let dir = tempfile::tempdir().unwrap();
    let mut a = Daemon::start(lone("n1", Some(dir.path())));
    stop(&mut a);
    let path = dir.path().join(DATA_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (status, err) = refused(&lone("n1", Some(dir.path())));
    assert!(!status.success(), "it started: {err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    std::fs::write(&path, b"").unwrap();
    assert_refused(&lone("n1", Some(dir.path())), "corrupt or truncated");
}

#[test]
fn a_second_process_on_a_data_dir_waits_for_the_first_to_exit() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Daemon::start(lone("n1", Some(dir.path())));
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut second = lone("n1", Some(dir.path()))
        .command()
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let read = |f: &tempfile::NamedTempFile| std::fs::read_to_string(f.path()).unwrap();
    poll_until(WAIT, "the second process to say it waits", || {
        read(&log).contains("held by another process").then_some(())
    });
    assert!(
        second.try_wait().unwrap().is_none(),
        "it waits: {}",
        read(&log)
    );
    assert!(!read(&out).contains("latticed"), "it did not start yet");
    stop(&mut first);
    poll_until(WAIT, "the second process to start", || {
        read(&out).contains("cluster").then_some(())
    });
    assert!(read(&log).contains("released by the other process"));
    let _ = second.kill();
    let _ = second.wait();
}

/// A stop signal while the node is still starting (here: waiting for another process's data
/// file, as a new pod in a rolling update does) ends it cleanly and at once. It used to be
/// the signal's default action (killed by SIGTERM): the handlers were installed only after
/// the start, which the test helper `stop` also raced with.
#[test]
fn sigterm_while_starting_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Daemon::start(lone("n1", Some(dir.path())));
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut second = lone("n1", Some(dir.path()))
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(log.path()).unwrap();
    poll_until(WAIT, "the second process to wait for the data file", || {
        read().contains("held by another process").then_some(())
    });
    let pid = second.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = poll_until(WAIT, "the second process to exit", || {
        second.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}\n{}", read());
    assert!(
        read().contains("stopped before the node had started"),
        "{}",
        read()
    );
    stop(&mut first);
}
