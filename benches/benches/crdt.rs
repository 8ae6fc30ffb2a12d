//! CRDT micro-benchmarks: what a delta join costs next to a full-state join, with the `crdts`
//! crate's `Orswot` doing the same work as a baseline, the peer encoding, and memory per
//! element.
//!
//! Run: `cargo bench -p latticed-benches --bench crdt` (add `LATTICED_BENCH_JSON=out.json` to
//! write the memory and size figures as JSON).

use std::alloc::System;
use std::hint::black_box;

use crdts::{CmRDT, CvRDT, Orswot};
use criterion::{criterion_group, BatchSize, Criterion};
use latticed_benches::element;
use latticed_crdt::{wire, CrdtValue, Element, ORSet};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 10_000;

fn orset(replica: u64, range: std::ops::Range<usize>) -> ORSet {
    let mut s = ORSet::new();
    for i in range {
        let d = s.add(replica, &element(i));
        s.join(&d);
    }
    s
}

fn orswot(replica: u64, range: std::ops::Range<usize>) -> Orswot<Element, u64> {
    let mut s = Orswot::new();
    for i in range {
        let op = s.add(element(i), s.read_ctx().derive_add_ctx(replica));
        s.apply(op);
    }
    s
}

fn net_bytes<T>(build: impl FnOnce() -> T) -> (T, isize) {
    let region = Region::new(GLOBAL);
    let value = build();
    let change = region.change();
    let net = change.bytes_allocated as isize - change.bytes_deallocated as isize
        + change.bytes_reallocated;
    (value, net)
}

fn joins(c: &mut Criterion) {
    let big = orset(1, 0..N);
    let other = big.clone();
    let one = other.add(3, &element(N + 1));
    let mut g = c.benchmark_group("orset_10k");
    g.bench_function("latticed_join_1_element_delta", |b| {
        b.iter_batched_ref(
            || big.clone(),
            |s| s.join(black_box(&one)),
            BatchSize::LargeInput,
        )
    });
    let big_b = orset(2, N / 2..N + N / 2);
    g.bench_function("latticed_join_full_states", |b| {
        b.iter_batched_ref(
            || big.clone(),
            |s| s.join(black_box(&big_b)),
            BatchSize::LargeInput,
        )
    });

    let base = orswot(1, 0..N);
    let single = orswot(3, N + 1..N + 2);
    g.bench_function("crdts_orswot_merge_1_element_state", |b| {
        b.iter_batched(
            || (base.clone(), single.clone()),
            |(mut s, o)| {
                s.merge(o);
                s
            },
            BatchSize::LargeInput,
        )
    });
    let base_b = orswot(2, N / 2..N + N / 2);
    g.bench_function("crdts_orswot_merge_full_states", |b| {
        b.iter_batched(
            || (base.clone(), base_b.clone()),
            |(mut s, o)| {
                s.merge(o);
                s
            },
            BatchSize::LargeInput,
        )
    });

    let value: CrdtValue = big.clone().into();
    let bytes = wire::encode(&value);
    g.bench_function("latticed_encode", |b| {
        b.iter(|| wire::encode(black_box(&value)))
    });
    g.bench_function("latticed_decode", |b| {
        b.iter(|| wire::decode(black_box(&bytes)))
    });
    g.finish();
}

criterion_group!(benches, joins);

fn memory_and_sizes() {
    let (ours, ours_bytes) = net_bytes(|| orset(1, 0..N));
    let (theirs, theirs_bytes) = net_bytes(|| orswot(1, 0..N));
    let value: CrdtValue = ours.clone().into();
    let encoded = wire::encode(&value).len();
    let other = ours.clone();
    let one: CrdtValue = other.add(3, &element(N + 1)).into();
    let delta_bytes = wire::encode(&one).len();
    let per = |b: isize| b as f64 / N as f64;
    println!("memory per ORSet element (16-byte string), {N} elements:");
    println!("  latticed ORSet      {:>8.1} bytes", per(ours_bytes));
    println!("  crdts::Orswot       {:>8.1} bytes", per(theirs_bytes));
    println!("encoded 10k ORSet     {encoded} bytes; 1-element add delta {delta_bytes} bytes");
    black_box((&ours, &theirs));
    if let Ok(path) = std::env::var("LATTICED_BENCH_JSON") {
        let json = serde_json::json!({
            "elements": N,
            "latticed_orset_bytes_per_element": per(ours_bytes),
            "crdts_orswot_bytes_per_element": per(theirs_bytes),
            "encoded_10k_orset_bytes": encoded,
            "encoded_add_delta_bytes": delta_bytes,
            "criterion_estimates": "target/criterion/orset_10k/*/new/estimates.json",
        });
        if let Err(e) = std::fs::write(&path, json.to_string()) {
            eprintln!("cannot write {path}: {e}");
        }
    }
}

fn main() {
    memory_and_sizes();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
