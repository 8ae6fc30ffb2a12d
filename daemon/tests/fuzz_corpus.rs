//! The fuzz corpora, replayed as ordinary tests: every committed input of every target in
//! `fuzz/corpus/<target>/` (and the seeds the harness makes) goes through the same harness
//! function the fuzz target runs (`latticed::fuzzing`). A crash the fuzzer found and that was
//! fixed stays fixed: its input is kept in the corpus.
//!
//! `docs/fuzzing.md` says how to run the fuzzers. `FUZZ_WRITE_SEEDS=1 cargo test -p latticed
//! --test fuzz_corpus write_seeds -- --ignored` writes the seeds into the corpus directories.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::PathBuf;

use latticed::fuzzing;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no input in {}", dir.display());
    files
}

/// Runs every corpus file and seed of `target` through `harness`; names the failing file.
fn replay(target: &str, harness: fn(&[u8])) {
    for f in &files(&corpus_dir(target)) {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| harness(&data)).is_err() {
            panic!("{target}: {} fails", f.display());
        }
    }
    for (i, seed) in fuzzing::seeds(target).iter().enumerate() {
        if std::panic::catch_unwind(|| harness(seed)).is_err() {
            panic!("{target}: seed {i} fails");
        }
    }
}

#[test]
fn peer_frame_corpus() {
    replay("peer_frame", fuzzing::peer_frame);
}

#[test]
fn swim_datagram_corpus() {
    replay("swim_datagram", fuzzing::swim_datagram);
}

#[test]
fn crdt_wire_corpus() {
    replay("crdt_wire", fuzzing::crdt_wire);
}

#[test]
fn uf_message_corpus() {
    replay("uf_message", fuzzing::uf_message);
}

#[test]
fn user_delta_corpus() {
    replay("user_delta", fuzzing::user_delta);
}

#[test]
fn stored_entry_corpus() {
    replay("stored_entry", fuzzing::stored_entry);
}

/// Crashes the fuzzers found in the replicator (`fuzz/known-crashes/<target>/`, named after
/// what they did), replayed through the harness:
/// - `deltas-to-u64-max-twice`: `Replicator::on_deltas` computes `*held + 1`, which overflows
///   once a peer sent a `Deltas` frame with `to = u64::MAX` (fix: `saturating_add`);
/// - `empty-deltas-interval-rejected`: `send_batch` sends a peer with dirty keys and nothing
///   new `Deltas { from: seq + 1, to: seq }`, which `on_deltas` joins and then rejects as
///   malformed (no ack; a `malformed` rejection counted).
///
/// Both are fixed with the epochs of the replication core (saturating interval arithmetic; an
/// exchange with nothing new to send sends nothing), and these inputs now pass.
#[test]
fn peer_frame_known_crashes() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/known-crashes/peer_frame");
    let failing: Vec<PathBuf> = files(&dir)
        .into_iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap();
            std::panic::catch_unwind(|| fuzzing::peer_frame(&data)).is_err()
        })
        .collect();
    assert!(failing.is_empty(), "peer_frame: {failing:?} fail");
}

#[test]
fn seeds_are_not_empty() {
    for t in fuzzing::TARGETS {
        assert!(fuzzing::seeds(t).len() > 1, "{t} has no seeds");
    }
}

/// Writes the seeds into `fuzz/corpus/<target>/seed-<n>` (with `FUZZ_WRITE_SEEDS=1`).
#[test]
#[ignore]
fn write_seeds() {
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_none() {
        return;
    }
    for t in fuzzing::TARGETS {
        let dir = corpus_dir(t);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in fuzzing::seeds(t).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), seed).unwrap();
        }
    }
}
