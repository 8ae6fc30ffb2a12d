//! The daemon shell end to end: real `latticed` processes on 127.0.0.1 forming a cluster over
//! real QUIC with mutual TLS (issue 3's tests).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use latticed_tests::{
    all_report, poll_until, start_cluster, Certs, Daemon, DaemonConfig, LiveNode,
};

const CONVERGE: Duration = Duration::from_secs(20);

fn expect(names: &[&str], state: &'static str) -> BTreeMap<String, &'static str> {
    names.iter().map(|n| (n.to_string(), state)).collect()
}

fn refs(nodes: &[Daemon]) -> Vec<&Daemon> {
    nodes.iter().collect()
}

#[test]
fn five_nodes_form_a_cluster() {
    let certs = Certs::new();
    let started = Instant::now();
    let nodes = start_cluster(&certs, 5);
    let all = expect(&["n1", "n2", "n3", "n4", "n5"], "up");
    poll_until(CONVERGE, "5 nodes to list 5 up", || {
        all_report(&refs(&nodes), &all).then_some(())
    });
    println!(
        "5-node cluster converged {:?} after the first start",
        started.elapsed()
    );
    for n in &nodes {
        let m = n.members().unwrap();
        assert_eq!(m.len(), 5, "{}: {m:?}", n.name);
        // ready once joined and the first sync with a peer is done
        poll_until(CONVERGE, "readyz 200", || {
            (n.get("/readyz")?.0 == 200).then_some(())
        });
        assert_eq!(n.get("/healthz").unwrap().0, 200);
        assert_eq!(n.metric("latticed_members", "state=\"up\""), 5.0);
        assert!(n.metric("latticed_peer_connections", "") >= 1.0);
        assert!(n.metric("latticed_swim_messages_received_total", "") > 0.0);
        assert!(n.metric("latticed_swim_messages_sent_total", "") > 0.0);
        assert_eq!(n.metric("latticed_build_info", "version="), 1.0);
    }
    // /v1/members names this node as self, and lists it first
    let (_, body) = nodes[2].get("/v1/members").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["self"], "n3");
    assert_eq!(v["members"][0]["name"], "n3");
}

#[test]
fn a_killed_node_is_reported_down_and_rejoins_with_a_higher_incarnation() {
    let certs = Certs::new();
    let mut nodes = start_cluster(&certs, 4);
    let names = ["n1", "n2", "n3", "n4"];
    poll_until(CONVERGE, "4 nodes up", || {
        all_report(&refs(&nodes), &expect(&names, "up")).then_some(())
    });
    let old_incarnation = nodes[0].members().unwrap()["n4"].1;

    let mut victim = nodes.pop().unwrap();
    let config = victim.config.clone();
    let port = victim.cluster.port();
    victim.kill();
    let killed = Instant::now();
    let mut down = expect(&["n1", "n2", "n3"], "up");
    down.insert("n4".into(), "down");
    // bound from the SWIM config (200ms probes, 1s suspicion): ~1.5 s, plus slack for a loaded
    // machine
    poll_until(
        Duration::from_secs(10),
        "n4 reported down everywhere",
        || all_report(&refs(&nodes), &down).then_some(()),
    );
    println!("kill -9 detected by all 3 peers in {:?}", killed.elapsed());

    let restarted = Daemon::start(DaemonConfig {
        cluster_port: port,
        ..config
    });
    nodes.push(restarted);
    poll_until(
        CONVERGE,
        "n4 up again everywhere with a higher incarnation",
        || {
            nodes
                .iter()
                .all(|n| {
                    n.members().is_some_and(|m| {
                        m.get("n4")
                            .is_some_and(|(s, inc)| s == "up" && *inc > old_incarnation)
                            && m.len() == 4
                    })
                })
                .then_some(())
        },
    );
}

#[test]
fn a_node_from_another_ca_cannot_join() {
    let certs = Certs::new();
    let nodes = start_cluster(&certs, 3);
    let names = ["n1", "n2", "n3"];
    poll_until(CONVERGE, "3 nodes up", || {
        all_report(&refs(&nodes), &expect(&names, "up")).then_some(())
    });

    let other = Certs::new();
    let intruder = Daemon::start(DaemonConfig {
        name: "intruder".into(),
        certs: Some(other.issue("intruder")),
        join: vec![nodes[0].cluster],
        ..Default::default()
    });
    // refused at the handshake: counted on the node it dialled and logged by both sides
    poll_until(CONVERGE, "the refusal counted and logged", || {
        (nodes[0].metric("latticed_handshake_failures_total", "") >= 1.0
            && nodes[0].log().contains("refused a peer at the handshake")
            && intruder.log().contains("connection to peer failed"))
        .then_some(())
    });
    assert!(intruder.metric("latticed_handshake_failures_total", "") >= 1.0);
    for n in &nodes {
        let m = n.members().unwrap();
        assert_eq!(m.keys().cloned().collect::<Vec<_>>(), names, "{}", n.name);
        assert!(m.values().all(|(s, _)| s == "up"));
    }
    assert_eq!(
        intruder.members().unwrap().len(),
        1,
        "the intruder stays alone"
    );
    assert_eq!(intruder.get("/readyz").unwrap().0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_quic_port_crashes_nothing() {
    let certs = Certs::new();
    let mut nodes = tokio::task::block_in_place(|| start_cluster(&certs, 3));
    let names = ["n1", "n2", "n3"];
    tokio::task::block_in_place(|| {
        poll_until(CONVERGE, "3 nodes up", || {
            all_report(&refs(&nodes), &expect(&names, "up")).then_some(())
        })
    });
    let target = nodes[0].cluster;

    // before any handshake: raw UDP garbage, including bytes that look like QUIC long headers
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut payloads: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0xff; 1200], vec![0xc0; 1300]];
    for i in 0..200u32 {
        let len = (i as usize * 37) % 1400;
        payloads.push((0..len).map(|j| (j as u32 * 31 + i * 7) as u8).collect());
    }
    let mut initial = vec![0xc3, 0, 0, 0, 1, 8];
    initial.extend([7u8; 8]);
    initial.resize(1250, 0x42);
    payloads.push(initial);
    for p in &payloads {
        sock.send_to(p, target).unwrap();
    }

    // after a valid handshake (a certificate of the cluster CA): garbage datagrams and streams
    let ep = certs.client_endpoint("prober");
    let conn = ep.connect(target, "latticed").unwrap().await.unwrap();
    // a SWIM packet (latticed-membership's limit, plus the envelope's tag byte) fits in one
    // datagram before path MTU discovery
    let limit = conn.max_datagram_size().unwrap_or(0);
    assert!(
        limit > latticed_membership::DEFAULT_MAX_PACKET_SIZE,
        "datagram limit {limit}"
    );
    for p in payloads.iter().take(100) {
        let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(&p[..p.len().min(1000)]));
    }
    for p in payloads.iter().take(20) {
        if let Ok(mut s) = conn.open_uni().await {
            let _ = s.write_all(p).await;
            let _ = s.finish();
        }
        if let Ok((mut s, _r)) = conn.open_bi().await {
            let _ = s.write_all(p).await;
            let _ = s.finish();
        }
    }
    // a huge stream is cut off, not buffered
    if let Ok(mut s) = conn.open_uni().await {
        let big = vec![0x5a; 256 * 1024];
        let _ = s.write_all(&big).await;
    }

    tokio::task::block_in_place(|| {
        poll_until(CONVERGE, "the garbage to be counted", || {
            (nodes[0].metric("latticed_rejected_frames_total", "") >= 1.0).then_some(())
        });
        for n in nodes.iter_mut() {
            assert!(n.is_running(), "{} died:\n{}", n.name, n.log());
            assert_eq!(n.get("/healthz").unwrap().0, 200);
        }
        poll_until(CONVERGE, "membership intact", || {
            all_report(&refs(&nodes), &expect(&names, "up")).then_some(())
        });
    });
    conn.close(0u32.into(), b"done");
}

#[test]
fn sigterm_leaves_gracefully_and_exits_zero() {
    let certs = Certs::new();
    let mut nodes = start_cluster(&certs, 3);
    let names = ["n1", "n2", "n3"];
    poll_until(CONVERGE, "3 nodes up", || {
        all_report(&refs(&nodes), &expect(&names, "up")).then_some(())
    });
    let mut leaver = nodes.pop().unwrap();
    let asked = Instant::now();
    let status = leaver.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        leaver.log()
    );
    println!("SIGTERM to exit: {:?}", asked.elapsed());
    assert!(asked.elapsed() < Duration::from_secs(5));
    let mut left = expect(&["n1", "n2"], "up");
    left.insert("n3".into(), "left");
    poll_until(Duration::from_secs(10), "n3 reported left", || {
        all_report(&refs(&nodes), &left).then_some(())
    });
    assert!(leaver.log().contains("leaving the cluster"));
}

#[test]
fn joining_without_certificates_is_a_clear_startup_error() {
    let out = std::process::Command::new(latticed_tests::latticed_bin())
        .args([
            "--node-name",
            "x",
            "--cluster-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--join",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mutual TLS"), "{err}");
}

#[test]
fn a_lone_node_runs_on_an_ephemeral_certificate_and_says_so() {
    let n = Daemon::start(DaemonConfig {
        name: "solo".into(),
        ..Default::default()
    });
    poll_until(CONVERGE, "the warning", || {
        n.log().contains("ephemeral self-signed").then_some(())
    });
    assert_eq!(n.get("/readyz").unwrap().0, 200, "alone by design is ready");
    assert_eq!(n.members().unwrap().len(), 1);
}

#[test]
fn join_dns_finds_peers_by_name() {
    let certs = Certs::new();
    let n1 = Daemon::start(DaemonConfig {
        name: "n1".into(),
        certs: Some(certs.issue("n1")),
        ..Default::default()
    });
    let n2 = Daemon::start(DaemonConfig {
        name: "n2".into(),
        certs: Some(certs.issue("n2")),
        extra: vec![
            "--join-dns".into(),
            format!("localhost:{}", n1.cluster.port()),
            "--join-dns-interval".into(),
            "1s".into(),
        ],
        ..Default::default()
    });
    poll_until(CONVERGE, "n1 and n2 to find each other", || {
        all_report(&[&n1, &n2], &expect(&["n1", "n2"], "up")).then_some(())
    });
}

/// A `--join-dns` lookup that takes a minute (a slow resolver) holds up nothing: with the lookup
/// pending, the node probes on and finds a killed peer down within the suspect timeout. Were
/// the lookup awaited inside the SWIM loop, nothing would be probed until it returned.
#[test]
fn a_slow_join_dns_lookup_does_not_hold_up_probes() {
    let certs = Certs::new();
    let n1 = Daemon::start(DaemonConfig {
        name: "n1".into(),
        certs: Some(certs.issue("n1")),
        ..Default::default()
    });
    let mut n2 = Daemon::start(DaemonConfig {
        name: "n2".into(),
        certs: Some(certs.issue("n2")),
        join: vec![n1.cluster],
        ..Default::default()
    });
    // n3 finds the others by name (re-resolved every second), quickly at first
    let name = format!("localhost:{}", n1.cluster.port());
    let n3 = LiveNode::start(
        "n3",
        &certs.issue("n3"),
        0,
        &[],
        &["--join-dns", &name, "--join-dns-interval", "1s"],
    );
    let state_of = |peer: &str| n3.member_states().get(peer).cloned();
    poll_until(CONVERGE, "n3 to see n1 and n2 up", || {
        (state_of("n1").as_deref() == Some("up") && state_of("n2").as_deref() == Some("up"))
            .then_some(())
    });
    // then its resolver takes a minute: the next re-resolution (within a second) hangs
    latticed::cluster::slow_lookups_of(&name, Duration::from_secs(60));
    let slow_from = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    n2.kill();
    let killed = Instant::now();
    // FAST_SWIM: probes every 200 ms, suspect timeout 1 s; a few seconds of slack for a busy
    // machine, far below the lookup's minute
    poll_until(Duration::from_secs(8), "n3 to find n2 down", || {
        (state_of("n2").as_deref() == Some("down")).then_some(())
    });
    assert!(
        slow_from.elapsed() < Duration::from_secs(60),
        "the lookup must still have been pending"
    );
    println!("n2 found down {:?} after its kill", killed.elapsed());
}

#[test]
fn a_dead_peer_keeps_no_connection_or_stream() {
    let certs = Certs::new();
    let mut nodes = start_cluster(&certs, 3);
    let names = ["n1", "n2", "n3"];
    poll_until(CONVERGE, "3 nodes up", || {
        all_report(&refs(&nodes), &expect(&names, "up")).then_some(())
    });
    let count = |n: &Daemon| {
        (
            n.metric("latticed_peer_connections", ""),
            n.metric("latticed_replication_streams", "direction=\"out\""),
            n.metric("latticed_replication_streams", "direction=\"in\""),
        )
    };
    poll_until(CONVERGE, "streams to both peers", || {
        (count(&nodes[0]) == (2.0, 2.0, 2.0)).then_some(())
    });
    nodes[2].kill();
    poll_until(CONVERGE, "n3 reported down", || {
        (nodes[0].members()?.get("n3")?.0 == "down").then_some(())
    });
    // at once, not after the QUIC idle timeout (15 s)
    poll_until(
        Duration::from_secs(5),
        "n1 to keep one connection and stream each way, to n2",
        || (count(&nodes[0]) == (1.0, 1.0, 1.0)).then_some(()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_is_counted_but_logged_sparingly() {
    let certs = Certs::new();
    let nodes = tokio::task::block_in_place(|| start_cluster(&certs, 1));
    let other = Certs::new();
    let ep = other.client_endpoint("intruder");
    for _ in 0..30 {
        let refused = ep
            .connect(nodes[0].cluster, "latticed")
            .unwrap()
            .await
            .is_err();
        assert!(refused);
    }
    tokio::task::block_in_place(|| {
        poll_until(CONVERGE, "30 refusals counted", || {
            (nodes[0].metric("latticed_handshake_failures_total", "") >= 30.0).then_some(())
        })
    });
    let lines = nodes[0]
        .log()
        .lines()
        .filter(|l| l.contains("refused a peer at the handshake"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines for 30 refusals"
    );
}

#[test]
fn a_node_without_join_that_learns_of_a_peer_is_ready_only_after_a_sync_with_it() {
    let certs = Certs::new();
    // a seed (no --join) whose own first anti-entropy round is 10 s away
    let seed = Daemon::start(DaemonConfig {
        name: "n1".into(),
        certs: Some(certs.issue("n1")),
        extra: vec!["--anti-entropy-interval".into(), "10s".into()],
        ..Default::default()
    });
    poll_until(CONVERGE, "the lone seed ready", || {
        (seed.get("/readyz")?.0 == 200).then_some(())
    });
    // as when a seed restarts without --join: peers find it
    let _peer = Daemon::start(DaemonConfig {
        name: "n2".into(),
        certs: Some(certs.issue("n2")),
        join: vec![seed.cluster],
        ..Default::default()
    });
    poll_until(
        Duration::from_secs(5),
        "the seed not ready once it knows a peer",
        || (seed.get("/readyz")?.0 == 503).then_some(()),
    );
    poll_until(CONVERGE, "the seed ready after its first sync", || {
        (seed.get("/readyz")?.0 == 200).then_some(())
    });
}
