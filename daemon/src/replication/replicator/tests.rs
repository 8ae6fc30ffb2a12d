use super::*;
use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, GCounterDelta};

fn identity(replica: ReplicaId) -> Identity {
    Identity {
        name: format!("n{replica}"),
        replica,
        epoch: replica * 1000,
    }
}

fn inc() -> CrdtDelta {
    CrdtDelta {
        delta: Some(Delta::Gcounter(GCounterDelta { increment: 1 })),
    }
}

#[test]
fn a_tombstone_is_forgotten_after_its_lifetime_when_one_is_set() {
    let config = ReplicationConfig {
        tombstone_ttl: Some(Duration::from_secs(10)),
        ..ReplicationConfig::default()
    };
    let mut r = Replicator::new(identity(1), config, 1);
    let t0 = Instant::now();
    r.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    r.delete(t0, "k", Consistency::Local);
    assert_eq!(
        r.write(t0, 0, "k", &inc(), Consistency::Local).unwrap_err(),
        WriteError::Deleted
    );
    r.tick(t0 + Duration::from_secs(5));
    assert_eq!(r.store().get("k"), Some(&Entry::Deleted));
    r.tick(t0 + Duration::from_secs(11));
    assert_eq!(r.store().get("k"), None);
    assert!(r.write(t0, 0, "k", &inc(), Consistency::Local).is_ok());
}

#[test]
fn without_a_lifetime_tombstones_stay() {
    let mut r = Replicator::new(identity(1), ReplicationConfig::default(), 1);
    let t0 = Instant::now();
    r.delete(t0, "k", Consistency::Local);
    r.tick(t0 + Duration::from_secs(365 * 24 * 3600));
    assert_eq!(r.store().get("k"), Some(&Entry::Deleted));
}

#[test]
fn garbage_frames_are_rejected_and_counted() {
    let mut r = Replicator::new(identity(1), ReplicationConfig::default(), 1);
    let now = Instant::now();
    assert_eq!(
        r.handle_frame(now, "p", &[0xff, 0x01, 0x02]),
        Err(Rejection::Malformed)
    );
    r.handle_frame(now, "p", &frame::hello(9, 9000, "p"))
        .unwrap();
    let bad_value = frame::encode(&frame::frame(pb::frame::Kind::Deltas(pb::Deltas {
        sender: 9,
        epoch: 9000,
        receiver_epoch: r.epoch(),
        from: 1,
        to: 1,
        entries: vec![pb::Entry {
            key: "k".into(),
            value: Some(pb::entry::Value::Crdt(
                latticed_proto::latticed::crdt::Value::default(),
            )),
        }],
        ..pb::Deltas::default()
    })));
    assert_eq!(
        r.handle_frame(now, "p", &bad_value),
        Err(Rejection::BadValue)
    );
    assert_eq!(r.store().len(), 0);
    assert_eq!(r.stats().rejected.get("malformed"), Some(&1));
    assert_eq!(r.stats().rejected.get("bad_value"), Some(&1));
}

fn pair(seed_a: u64, seed_b: u64, config: ReplicationConfig) -> (Replicator, Replicator) {
    let mut a = Replicator::new(identity(1), config.clone(), seed_a);
    let mut b = Replicator::new(identity(2), config, seed_b);
    let up = |name: &str| PeerInfo {
        name: name.into(),
        state: MemberState::Up,
        incarnation: 1,
    };
    a.set_members(&[up("n2")]);
    b.set_members(&[up("n1")]);
    (a, b)
}

/// Delivers frames between `a` (n1) and `b` (n2) until none are left; deltas are dropped
/// when `drop_deltas`.
fn pump(now: Instant, a: &mut Replicator, b: &mut Replicator, drop_deltas: bool) {
    for _ in 0..100 {
        let (fa, fb) = (a.take_output().all_frames(), b.take_output().all_frames());
        if fa.is_empty() && fb.is_empty() {
            return;
        }
        for (from, frames, to) in [("n1", fa, &mut *b), ("n2", fb, &mut *a)] {
            for (_, body) in frames {
                let kind = frame::decode(&body).ok().and_then(|f| f.kind);
                if drop_deltas && matches!(kind, Some(pb::frame::Kind::Deltas(_))) {
                    continue;
                }
                let _ = to.handle_frame(now, from, &body);
            }
        }
    }
}

/// Two replicators (n1, n2) that have greeted each other, and the time they did.
fn greeted(config: ReplicationConfig) -> (Replicator, Replicator, Instant) {
    let (mut a, mut b) = pair(1, 2, config);
    let t0 = Instant::now();
    a.tick(t0);
    b.tick(t0);
    pump(t0, &mut a, &mut b, false);
    (a, b, t0)
}

fn deltas(r: &Replicator, from: u64, to: u64, entries: Vec<pb::Entry>) -> Vec<u8> {
    frame::encode(&frame::frame(pb::frame::Kind::Deltas(pb::Deltas {
        sender: 9,
        epoch: 9000,
        receiver_epoch: r.epoch(),
        base: 0,
        from,
        to,
        entries,
    })))
}

fn counter_entry(key: &str, replica: ReplicaId) -> pb::Entry {
    let mut v = None;
    let d = apply_user_delta(&mut v, &inc(), replica, 0)
        .unwrap()
        .unwrap();
    frame::entry_to_proto(key, &Entry::Value(d))
}

/// What `r` sent since the last call, picked out by `pick`.
fn sent<T>(r: &mut Replicator, pick: impl Fn(pb::frame::Kind) -> Option<T>) -> Vec<T> {
    r.take_output()
        .all_frames()
        .into_iter()
        .filter_map(|(_, body)| pick(frame::decode(&body).ok()?.kind?))
        .collect()
}

fn ack_upto(r: &mut Replicator) -> Option<u64> {
    sent(r, |k| match k {
        pb::frame::Kind::Ack(a) => Some(a.upto),
        _ => None,
    })
    .pop()
}

#[test]
fn an_interval_reaching_the_largest_number_does_not_overflow() {
    let mut r = Replicator::new(identity(1), ReplicationConfig::default(), 1);
    let now = Instant::now();
    r.handle_frame(now, "p", &frame::hello(9, 9000, "p"))
        .unwrap();
    let f = deltas(&r, 1, u64::MAX, vec![counter_entry("a", 9)]);
    r.handle_frame(now, "p", &f).unwrap();
    assert_eq!(ack_upto(&mut r), Some(u64::MAX));
    let f = deltas(&r, u64::MAX, u64::MAX, vec![counter_entry("b", 9)]);
    r.handle_frame(now, "p", &f).unwrap();
    assert_eq!(ack_upto(&mut r), Some(u64::MAX));
}

#[test]
fn deltas_must_come_from_the_life_the_hello_named() {
    let mut r = Replicator::new(identity(1), ReplicationConfig::default(), 1);
    let now = Instant::now();
    // no hello yet
    let f = deltas(&r, 1, 1, vec![counter_entry("a", 9)]);
    assert_eq!(r.handle_frame(now, "p", &f), Err(Rejection::UnknownPeer));
    r.handle_frame(now, "p", &frame::hello(8, 8000, "p"))
        .unwrap();
    // the hello named replica 8, epoch 8000: these are in the name of 9
    assert_eq!(r.handle_frame(now, "p", &f), Err(Rejection::Sender));
    assert_eq!(r.store().len(), 0);
    assert_eq!(r.stats().rejected.get("sender"), Some(&1));
}

#[test]
fn a_frame_with_one_bad_entry_is_not_joined_at_all() {
    let mut r = Replicator::new(identity(1), ReplicationConfig::default(), 1);
    let now = Instant::now();
    r.handle_frame(now, "p", &frame::hello(9, 9000, "p"))
        .unwrap();
    r.take_output();
    let bad = pb::Entry {
        key: "bad".into(),
        value: None,
    };
    let f = deltas(&r, 1, 1, vec![counter_entry("good", 9), bad]);
    assert_eq!(r.handle_frame(now, "p", &f), Err(Rejection::Malformed));
    assert_eq!(r.store().len(), 0, "nothing of the frame was joined");
    assert_eq!(ack_upto(&mut r), None, "nor acknowledged");
}

#[test]
fn keys_hot_on_both_sides_are_repaired_when_they_keep_differing() {
    // seeded as the driver used to seed them (`replica ^ 0x5eed`)
    let (mut a, mut b) = pair(1 ^ 0x5eed, 2 ^ 0x5eed, ReplicationConfig::default());
    let t0 = Instant::now();
    // both write the key every 100 ms for 70 s, and no delta ever arrives: only
    // anti-entropy can bring each side the other's writes
    for step in 0..700u64 {
        let now = t0 + Duration::from_millis(step * 100);
        a.write(now, 0, "k", &inc(), Consistency::Local).unwrap();
        b.write(now, 0, "k", &inc(), Consistency::Local).unwrap();
        a.tick(now);
        b.tick(now);
        pump(now, &mut a, &mut b, true);
    }
    let Some(Entry::Value(v)) = b.store().get("k") else {
        panic!("b lost the key");
    };
    assert!(
        v.counter_contributions().iter().any(|(r, _, _)| *r == 1),
        "b never received a's writes"
    );
}

#[test]
fn a_member_membership_forgot_is_forgotten_entirely() {
    let (mut a, mut b) = pair(1, 2, ReplicationConfig::default());
    let now = Instant::now();
    a.tick(now);
    b.tick(now);
    pump(now, &mut a, &mut b, false);
    assert_eq!(a.peer_replica("n2"), Some(2));
    // removed after `--remove-down-after`
    a.set_members(&[]);
    assert_eq!(a.peer_replica("n2"), None);
    assert!(a.peers.is_empty() && a.links.is_empty());
}

fn deltas_sent(r: &mut Replicator) -> Vec<(u64, u64)> {
    sent(r, |k| match k {
        pb::frame::Kind::Deltas(d) => Some((d.from, d.to)),
        _ => None,
    })
}

#[test]
fn a_quiet_node_sends_at_once_and_gathers_only_while_a_frame_is_in_flight() {
    let (mut a, mut b, t0) = greeted(ReplicationConfig::default());
    // a lone write goes out without waiting for the batch window
    a.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    let first = a.take_output().frames;
    assert_eq!(first.len(), 1);
    // more writes while it is in flight are gathered
    a.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    a.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    assert_eq!(deltas_sent(&mut a), vec![]);
    // and go out together as soon as its ack is back
    for (_, body) in first {
        b.handle_frame(t0, "n1", &body).unwrap();
    }
    for (_, body) in b.take_output().all_frames() {
        a.handle_frame(t0, "n2", &body).unwrap();
    }
    assert_eq!(deltas_sent(&mut a), vec![(2, 3)]);
}

#[test]
fn a_node_wants_the_batch_window_tick_only_while_deltas_wait_for_it() {
    let config = ReplicationConfig::default();
    let window = config.batch_window;
    let (mut a, _, t0) = greeted(config);
    assert!(
        !a.wants_batch_tick(),
        "an idle node has nothing for the window"
    );
    // a lone write goes out at once: nothing is left for the window either
    a.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    assert_eq!(deltas_sent(&mut a), vec![(1, 1)]);
    assert!(
        !a.wants_batch_tick(),
        "a write sent at once leaves nothing waiting"
    );
    // a write gathered while that one is in flight waits for the window
    a.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    assert!(a.wants_batch_tick());
    a.tick(t0 + window);
    assert_eq!(deltas_sent(&mut a), vec![(2, 2)]);
    assert!(!a.wants_batch_tick(), "the window's tick sent it");
}

#[test]
fn acks_are_output_apart_from_the_frames_that_may_leave_before_a_commit() {
    let (mut a, mut b, t0) = greeted(ReplicationConfig::default());
    a.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    let out = a.take_output();
    assert!(out.acks.is_empty());
    assert_eq!(out.frames.len(), 1, "the delta may leave at once");
    for (_, body) in out.frames {
        b.handle_frame(t0, "n1", &body).unwrap();
    }
    let out = b.take_output();
    assert!(
        out.frames.is_empty(),
        "nothing but the ack: {:?}",
        out.frames
    );
    let acks: Vec<_> = out
        .acks
        .iter()
        .filter_map(|(to, body)| Some((to.clone(), frame::decode(body).ok()?.kind?)))
        .collect();
    assert!(
        matches!(acks.as_slice(), [(to, pb::frame::Kind::Ack(a))] if to == "n1" && a.upto == 1),
        "{acks:?}"
    );
}

/// With a data file a node's acks wait for its commit; its received-only acks, sent at once,
/// keep its peers' deltas flowing meanwhile, and count for nothing else.
#[test]
fn a_received_only_ack_lets_deltas_flow_but_completes_no_write() {
    let config = ReplicationConfig {
        acks_wait_for_commit: true,
        ..ReplicationConfig::default()
    };
    let (mut a, mut b, t0) = greeted(config);
    let (w, _) = a.write(t0, 0, "k", &inc(), Consistency::Majority).unwrap();
    for (_, body) in a.take_output().all_frames() {
        b.handle_frame(t0, "n1", &body).unwrap();
    }
    let mut out = b.take_output();
    let kinds = |frames: &[(String, Vec<u8>)]| -> Vec<pb::Ack> {
        frames
            .iter()
            .filter_map(|(_, body)| match frame::decode(body).ok()?.kind? {
                pb::frame::Kind::Ack(a) => Some(a),
                _ => None,
            })
            .collect()
    };
    let at_once = kinds(&out.frames);
    let after_commit = kinds(&out.acks);
    assert!(
        matches!(at_once.as_slice(), [a] if a.received_only && a.upto == 1),
        "{at_once:?}"
    );
    assert!(
        matches!(after_commit.as_slice(), [a] if !a.received_only && a.upto == 1),
        "{after_commit:?}"
    );
    // the received-only ack: the next write goes at once, the MAJORITY write is not done
    for (_, body) in std::mem::take(&mut out.frames) {
        a.handle_frame(t0, "n2", &body).unwrap();
    }
    assert!(
        a.take_output().completed.is_empty(),
        "completed on a received-only ack"
    );
    a.write(t0, 0, "k", &inc(), Consistency::Local).unwrap();
    let mut next = a.take_output();
    let sent: Vec<(u64, u64)> = next
        .frames
        .iter()
        .filter_map(|(_, body)| match frame::decode(body).ok()?.kind? {
            pb::frame::Kind::Deltas(d) => Some((d.from, d.to)),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![(2, 2)], "not gathered behind the first interval");
    next.completed.clear();
    // the ack after the commit completes it
    for (_, body) in out.acks {
        a.handle_frame(t0, "n2", &body).unwrap();
    }
    let done = a.take_output().completed;
    assert!(done.iter().any(|(id, r)| *id == w && r.is_ok()), "{done:?}");
}
