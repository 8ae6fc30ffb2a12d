//! Replication end to end: daemons running in-process (each on its own runtime) over real QUIC
//! on 127.0.0.1, written to through the replication API the entity runtime uses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::time::Duration;

use latticed::replication::{Consistency, WriteError, CONSISTENCY_FAILURE};
use latticed::store::Entry;
use latticed_crdt::{Element, Footprint, UserValue, Voters};
use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, GCounterDelta, OrSetDelta};
use latticed_tests::{http_get, poll_until, Certs, Daemon, DaemonConfig, LiveNode};

const CONVERGE: Duration = Duration::from_secs(20);

fn inc(n: u64) -> CrdtDelta {
    CrdtDelta {
        delta: Some(Delta::Gcounter(GCounterDelta { increment: n })),
    }
}

fn add(x: &str) -> CrdtDelta {
    CrdtDelta {
        delta: Some(Delta::Orset(OrSetDelta {
            cleared: false,
            removed: vec![],
            added: vec![Element::string(x).to_any()],
        })),
    }
}

fn read(n: &LiveNode, key: &str) -> Option<UserValue> {
    match n.block_on(n.replication.read(key)).unwrap()? {
        Entry::Value(v) => Some(v.read(&Voters::alone(0))),
        Entry::Deleted => None,
    }
}

fn write(n: &LiveNode, key: &str, d: CrdtDelta, c: Consistency) -> Result<(), WriteError> {
    n.block_on(n.replication.write(key, d, c)).unwrap()
}

fn cluster(certs: &Certs, n: usize, extra: &[&str]) -> Vec<LiveNode> {
    let first = LiveNode::start("n1", &certs.issue("n1"), 0, &[], extra);
    let seed = first.cluster;
    let mut nodes = vec![first];
    for i in 2..=n {
        let name = format!("n{i}");
        nodes.push(LiveNode::start(
            &name,
            &certs.issue(&name),
            0,
            &[seed],
            extra,
        ));
    }
    poll_until(CONVERGE, "all members up", || {
        nodes
            .iter()
            .all(|x| {
                let m = x.member_states();
                m.len() == n && m.values().all(|s| s == "up")
            })
            .then_some(())
    });
    nodes
}

fn set(xs: &[&str]) -> UserValue {
    UserValue::ORSet(
        xs.iter()
            .map(|x| Element::string(x))
            .collect::<BTreeSet<_>>(),
    )
}

#[test]
fn writes_on_every_node_converge() {
    let certs = Certs::new();
    let nodes = cluster(&certs, 3, &[]);
    for (i, n) in nodes.iter().enumerate() {
        write(n, "counter", inc(i as u64 + 1), Consistency::Local).unwrap();
        write(n, "set", add(["a", "b", "c"][i]), Consistency::Local).unwrap();
    }
    poll_until(
        CONVERGE,
        "every node to hold counter 6 and set {a,b,c}",
        || {
            nodes
                .iter()
                .all(|n| {
                    read(n, "counter") == Some(UserValue::GCounter(6))
                        && read(n, "set") == Some(set(&["a", "b", "c"]))
                })
                .then_some(())
        },
    );
    // a subscriber on n3 is woken by a write on n1, and can tell its own writes (writer 7)
    // from others'
    let mut changes = nodes[2].replication.subscribe("counter");
    let seen = changes.borrow_and_update().changes;
    nodes[2].block_on(async {
        let r = &nodes[2].replication;
        let done = r
            .submit_write("counter", inc(1), Consistency::Local, 7)
            .await;
        done.unwrap().await.unwrap().unwrap();
    });
    nodes[2]
        .block_on(async { tokio::time::timeout(CONVERGE, changes.changed()).await })
        .unwrap()
        .unwrap();
    let c = changes.borrow_and_update().clone();
    assert!(c.only_by(7, seen), "its own write: {c:?}");
    let seen = c.changes;
    write(&nodes[0], "counter", inc(10), Consistency::Local).unwrap();
    nodes[2]
        .block_on(async { tokio::time::timeout(CONVERGE, changes.changed()).await })
        .unwrap()
        .unwrap();
    let c = changes.borrow_and_update().clone();
    assert!(
        !c.only_by(7, seen),
        "a peer's change is not writer 7's: {c:?}"
    );
    // a peer's change of a set tells the subscriber what it touched: the element, not the set
    let mut set_changes = nodes[2].replication.subscribe("tags");
    let seen = set_changes.borrow_and_update().changes;
    write(&nodes[0], "tags", add("blue"), Consistency::Local).unwrap();
    nodes[2]
        .block_on(async { tokio::time::timeout(CONVERGE, set_changes.changed()).await })
        .unwrap()
        .unwrap();
    let c = set_changes.borrow_and_update().clone();
    assert_eq!(
        c.footprint_since(seen),
        Footprint::Elements([Element::string("blue")].into_iter().collect()),
        "{c:?}"
    );
    poll_until(CONVERGE, "17 everywhere", || {
        nodes
            .iter()
            .all(|n| read(n, "counter") == Some(UserValue::GCounter(17)))
            .then_some(())
    });

    // the inspect endpoints
    let (status, body) = http_get(nodes[1].admin, "/v1/keys").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["keys"][0]["key"], "counter");
    assert_eq!(v["keys"][0]["type"], "gcounter");
    assert_eq!(v["keys"][1]["type"], "orset");
    assert_eq!(v["keys"][1]["deleted"], false);
    let (_, body) = http_get(nodes[1].admin, "/v1/keys/set").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["value"][0]["string"], "a");
    assert_eq!(v["value"][0]["type_url"], "p.cloudstate.io/string");
    let (_, body) = http_get(nodes[1].admin, "/v1/keys/counter").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["value"], 17);
    assert_eq!(http_get(nodes[1].admin, "/v1/keys/nope").unwrap().0, 404);
    let (_, metrics) = http_get(nodes[0].admin, "/metrics").unwrap();
    for name in [
        "latticed_keys",
        "latticed_deltas_sent_total",
        "latticed_replication_bytes_sent_total",
        "latticed_anti_entropy_rounds_total",
        "latticed_replication_ack_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[test]
fn majority_and_all_follow_the_members_that_have_not_left() {
    let certs = Certs::new();
    let mut nodes = cluster(&certs, 3, &["--write-timeout", "1s"]);
    write(&nodes[0], "c", inc(1), Consistency::Majority).unwrap();
    write(&nodes[0], "c", inc(1), Consistency::All).unwrap();

    nodes[2].crash();
    poll_until(CONVERGE, "n3 reported down", || {
        (nodes[0].member_states().get("n3").map(String::as_str) == Some("down")).then_some(())
    });
    // 2 of 3 up: a majority acks
    write(&nodes[0], "c", inc(1), Consistency::Majority).unwrap();
    // ALL counts the down member too
    let err = write(&nodes[0], "c", inc(1), Consistency::All).unwrap_err();
    assert_eq!(err.to_string(), CONSISTENCY_FAILURE);

    nodes[1].crash();
    let err = write(&nodes[0], "c", inc(1), Consistency::Majority).unwrap_err();
    assert_eq!(err.to_string(), CONSISTENCY_FAILURE);
    // the failed writes stayed locally
    assert_eq!(read(&nodes[0], "c"), Some(UserValue::GCounter(5)));
}

#[test]
fn a_node_down_for_many_writes_catches_up() {
    let certs = Certs::new();
    let mut nodes = cluster(&certs, 3, &[]);
    write(&nodes[0], "before", inc(1), Consistency::Local).unwrap();
    poll_until(CONVERGE, "n3 has the first write", || {
        (read(&nodes[2], "before") == Some(UserValue::GCounter(1))).then_some(())
    });
    let port = nodes[2].cluster.port();
    nodes[2].crash();
    for i in 0..200u64 {
        let n = &nodes[(i % 2) as usize];
        write(n, &format!("k{}", i % 20), inc(1), Consistency::Local).unwrap();
        write(n, "set", add(&format!("e{i}")), Consistency::Local).unwrap();
    }
    let seed = nodes[0].cluster;
    nodes[2] = LiveNode::start("n3", &certs.issue("n3"), port, &[seed], &[]);
    poll_until(CONVERGE, "n3 to catch up", || {
        (0..20)
            .all(|k| read(&nodes[2], &format!("k{k}")) == Some(UserValue::GCounter(10)))
            .then(|| read(&nodes[2], "set"))
            .flatten()
            .filter(|s| matches!(s, UserValue::ORSet(s) if s.len() == 200))
    });
    poll_until(CONVERGE, "n3 ready", || {
        (http_get(nodes[2].admin, "/readyz")?.0 == 200).then_some(())
    });
    assert_eq!(read(&nodes[2], "before"), Some(UserValue::GCounter(1)));
    // the new life acknowledges: ALL writes through any node succeed again
    poll_until(
        CONVERGE,
        "an ALL write through n1 after the restart",
        || write(&nodes[0], "after", inc(1), Consistency::All).ok(),
    );
    for n in &nodes {
        write(n, "after", inc(1), Consistency::All).unwrap();
    }
}

#[test]
fn a_delete_is_seen_everywhere_and_blocks_later_writes() {
    let certs = Certs::new();
    let nodes = cluster(&certs, 3, &[]);
    write(&nodes[0], "doomed", inc(5), Consistency::All).unwrap();
    nodes[1]
        .block_on(nodes[1].replication.delete("doomed", Consistency::Local))
        .unwrap()
        .unwrap();
    poll_until(CONVERGE, "the tombstone everywhere", || {
        nodes
            .iter()
            .all(|n| {
                matches!(
                    n.block_on(n.replication.read("doomed")).unwrap(),
                    Some(Entry::Deleted)
                )
            })
            .then_some(())
    });
    for n in &nodes {
        let err = write(n, "doomed", inc(1), Consistency::Local).unwrap_err();
        assert_eq!(err.to_string(), "Entity deleted");
    }
    let (_, body) = http_get(nodes[2].admin, "/v1/keys/doomed").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["deleted"], true);
}

#[test]
fn hostile_replication_frames_are_counted_and_change_nothing() {
    use latticed::replication::frame;
    use latticed_proto::latticed::peer::{self as pb, frame::Kind};
    let certs = Certs::new();
    let nodes = cluster(&certs, 2, &[]);
    write(&nodes[0], "c", inc(3), Consistency::All).unwrap();
    let target = nodes[0].cluster;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = certs.client_endpoint("prober");
        let conn = ep.connect(target, "latticed").unwrap().await.unwrap();
        let framed = |body: &[u8]| {
            let mut v = (body.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        // a stream that does not open with a hello
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&framed(b"not a hello")).await.unwrap();
        s.finish().unwrap();
        // a greeted stream carrying garbage, a value of the wrong type, then a huge length
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&framed(&frame::hello(77, 7, "prober")))
            .await
            .unwrap();
        s.write_all(&framed(&[0xff, 0xff, 0x01])).await.unwrap();
        let mut set = None;
        let wrong = latticed_crdt::apply_user_delta(&mut set, &add("x"), 77, 0)
            .unwrap()
            .unwrap();
        let wrong_type = frame::encode(&frame::frame(Kind::States(pb::States {
            entries: vec![frame::entry_to_proto("c", &Entry::Value(wrong.clone()))],
            ..pb::States::default()
        })));
        s.write_all(&framed(&wrong_type)).await.unwrap();
        // deltas in the name of another replica, and an absurd interval
        for (sender, to) in [(78, 1), (77, u64::MAX)] {
            let lie = frame::encode(&frame::frame(Kind::Deltas(pb::Deltas {
                sender,
                epoch: 7,
                from: 1,
                to,
                entries: vec![frame::entry_to_proto("c", &Entry::Value(wrong.clone()))],
                ..pb::Deltas::default()
            })));
            s.write_all(&framed(&lie)).await.unwrap();
        }
        s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let _ = s.finish();
        // a stream whose hello speaks for another node than the certificate names
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&framed(&frame::hello(77, 7, "n2")))
            .await
            .unwrap();
        let _ = s.finish();
        poll_until(CONVERGE, "the rejections to be counted", || {
            let (_, m) = http_get(nodes[0].admin, "/metrics")?;
            let has = |reason: &str| {
                m.lines()
                    .any(|l| l.starts_with("latticed_rejected_frames_total") && l.contains(reason))
            };
            (has("malformed")
                && has("type_mismatch")
                && has("too_large")
                && has("\"sender\"")
                && has("stale_epoch")
                && has("identity"))
            .then_some(())
        });
        conn.close(0u32.into(), b"done");
    });
    // nothing changed, and replication still works
    assert_eq!(read(&nodes[0], "c"), Some(UserValue::GCounter(3)));
    write(&nodes[1], "c", inc(1), Consistency::All).unwrap();
    poll_until(CONVERGE, "4 on both", || {
        nodes
            .iter()
            .all(|n| read(n, "c") == Some(UserValue::GCounter(4)))
            .then_some(())
    });
}

#[test]
fn all_writes_succeed_again_after_a_member_is_frozen_past_the_suspect_timeout() {
    let certs = Certs::new();
    let extra = ["--write-timeout", "1s"];
    let n1 = LiveNode::start("n1", &certs.issue("n1"), 0, &[], &extra);
    let n2 = LiveNode::start("n2", &certs.issue("n2"), 0, &[n1.cluster], &extra);
    // the member that is frozen runs as its own process, so that SIGSTOP freezes it whole
    let n3 = Daemon::start(DaemonConfig {
        name: "n3".into(),
        certs: Some(certs.issue("n3")),
        join: vec![n1.cluster],
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    let states = |n: &LiveNode, want: &str| {
        let m = n.member_states();
        m.len() == 3 && m.values().all(|s| s == want || want.is_empty())
    };
    poll_until(CONVERGE, "all members up", || {
        (states(&n1, "up") && states(&n2, "up")).then_some(())
    });
    poll_until(CONVERGE, "a first ALL write through n1", || {
        write(&n1, "c", inc(1), Consistency::All).ok()
    });

    n3.signal("STOP");
    poll_until(CONVERGE, "n3 reported down", || {
        let down = |n: &LiveNode| n.member_states().get("n3").map(String::as_str) == Some("down");
        (down(&n1) && down(&n2)).then_some(())
    });
    for i in 0..200 {
        write(&n1, &format!("k{}", i % 10), inc(1), Consistency::Local).unwrap();
    }
    n3.signal("CONT");
    poll_until(CONVERGE, "n3 up again", || {
        (states(&n1, "up") && states(&n2, "up")).then_some(())
    });
    poll_until(CONVERGE, "an ALL write through n1 after the thaw", || {
        write(&n1, "c", inc(1), Consistency::All).ok()
    });
    // and from then on every one, through either node
    for i in 0..20 {
        let n = if i % 2 == 0 { &n1 } else { &n2 };
        write(n, "c", inc(1), Consistency::All).unwrap();
        write(n, "c", inc(1), Consistency::Majority).unwrap();
    }
}

#[test]
fn a_key_watcher_goes_with_its_last_subscriber() {
    let certs = Certs::new();
    let nodes = cluster(&certs, 1, &[]);
    let n = &nodes[0];
    let kept = n.replication.subscribe("kept");
    let gone: Vec<_> = (0..1000)
        .map(|i| n.replication.subscribe(&format!("k{i}")))
        .collect();
    assert_eq!(n.replication.watched_keys(), 1001);
    drop(gone);
    poll_until(CONVERGE, "the watchers of unsubscribed keys to go", || {
        (n.replication.watched_keys() == 1).then_some(())
    });
    drop(kept);
}

#[test]
fn writes_just_before_sigterm_reach_the_peers() {
    let certs = Certs::new();
    // deltas wait up to 10 s for their batch: only the flush on shutdown sends them in time
    let mut nodes = cluster(&certs, 2, &["--batch-window", "10s"]);
    poll_until(CONVERGE, "n1 to know n2's life", || {
        (nodes[0].replication.live_replicas().borrow().len() == 2).then_some(())
    });
    for _ in 0..3 {
        write(&nodes[0], "c", inc(1), Consistency::Local).unwrap();
    }
    nodes[0].shutdown();
    poll_until(Duration::from_secs(5), "n2 to hold the 3 writes", || {
        (read(&nodes[1], "c") == Some(UserValue::GCounter(3))).then_some(())
    });
}

#[test]
fn frames_read_but_not_handled_are_bounded_in_bytes() {
    use latticed::transport::{Transport, INBOUND_BYTES};
    const FRAME: usize = 8 << 20;
    let certs = Certs::new();
    let load = |name: &str| {
        let c = certs.issue(name);
        latticed::certs::load(&c.ca, &c.cert, &c.key).unwrap()
    };
    let (server_tls, client_tls) = (load("n1"), load("prober"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (datagrams, _datagrams_rx) = tokio::sync::mpsc::channel(16);
        // a consumer that does not keep up: nothing reads the frames yet
        let (frames, mut frames_rx) = tokio::sync::mpsc::channel(4096);
        let (calls, _calls_rx) = tokio::sync::mpsc::channel(16);
        let t = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &server_tls,
            datagrams,
            frames,
            calls,
        )
        .unwrap();
        let target = t.local_addr().unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(latticed::transport::client_config(&client_tls).unwrap());
        let conn = ep.connect(target, "latticed").unwrap().await.unwrap();
        let mut s = conn.open_uni().await.unwrap();
        let writer = tokio::spawn(async move {
            let body = vec![0u8; FRAME];
            for _ in 0..(2 * INBOUND_BYTES / FRAME) {
                s.write_all(&(FRAME as u32).to_be_bytes()).await?;
                s.write_all(&body).await?;
            }
            Ok::<_, quinn::WriteError>(())
        });
        let full = INBOUND_BYTES / FRAME;
        let wait = |n: usize, rx: &tokio::sync::mpsc::Receiver<_>| {
            (rx.len() == n && t.inbound_room() < FRAME).then_some(())
        };
        let deadline = tokio::time::Instant::now() + CONVERGE;
        // the reader stops at the byte bound: no room is left for another frame
        while wait(full, &frames_rx).is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} frames",
                frames_rx.len()
            );
            assert!(frames_rx.len() <= full, "{} frames queued", frames_rx.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // handling one makes room for exactly one more
        drop(frames_rx.recv().await);
        while wait(full, &frames_rx).is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} frames",
                frames_rx.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writer.abort();
        conn.close(0u32.into(), b"done");
    });
}

/// `/v1/keys` pages end at the key-count cap or at a byte budget of keys (1 MiB), whichever
/// comes first, and paging through them yields every key once.
#[test]
fn key_pages_have_a_byte_budget() {
    let certs = Certs::new();
    let node = LiveNode::start("n1", &certs.issue("n1"), 0, &[], &[]);
    let long: Vec<String> = (0..40)
        .map(|i| format!("{i:02}-{}", "k".repeat(60_000)))
        .collect();
    for k in &long {
        write(&node, k, inc(1), Consistency::Local).unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/keys?after={a}"),
            None => "/v1/keys".to_string(),
        };
        let (status, body) = http_get(node.admin, &path).unwrap();
        assert_eq!(status, 200);
        assert!(body.len() < 1_100_000, "a page of {} bytes", body.len());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for k in v["keys"].as_array().unwrap() {
            seen.push(k["key"].as_str().unwrap().to_string());
        }
        pages += 1;
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
        assert!(pages < 100);
    }
    assert!(
        pages >= 3,
        "40 keys of 60 kB need several 1 MiB pages: {pages}"
    );
    assert_eq!(seen, long);
}

/// Issue 11: the inspect paths show every value, so they are served only to
/// `--admin-inspect-allow` sources (loopback by default) or with the token; probes, `/metrics`
/// and `/v1/members` stay open to anyone, and refusals are counted by reason.
#[test]
fn the_inspect_paths_need_an_allowed_source_or_the_token() {
    use latticed_tests::model_node::http1;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("inspect-token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    // loopback is not in the allow-list here: the test's requests come from outside it
    let node = Daemon::start(DaemonConfig {
        name: "n1".into(),
        extra: vec![
            "--admin-inspect-allow".into(),
            "10.99.0.0/16".into(),
            "--admin-inspect-token-file".into(),
            token_file.display().to_string(),
        ],
        ..Default::default()
    });
    let get = |path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        http1(node.admin, "GET", path, &headers, b"")
    };
    for open in ["/healthz", "/metrics", "/v1/members"] {
        assert_eq!(get(open, None).status, 200, "{open}");
    }
    let refused = get("/v1/keys", None);
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(
        refused.text().contains("--admin-inspect-allow"),
        "{refused:?}"
    );
    assert_eq!(get("/v1/keys/x", Some("Bearer wrong")).status, 403);
    assert_eq!(get("/v1/keys", Some("Bearer s3cret")).status, 200);
    assert_eq!(get("/v1/keys/x", Some("Bearer s3cret")).status, 404);
    let metrics = get("/metrics", None).text();
    for reason in ["source", "token"] {
        let line = format!("latticed_admin_refusals_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    // and by default (no flags) loopback is served without a token
    let plain = Daemon::start(DaemonConfig {
        name: "n2".into(),
        ..Default::default()
    });
    assert_eq!(http_get(plain.admin, "/v1/keys").unwrap().0, 200);
}
