//! latticed-benches: benchmarks, never run in CI.
//!
//! - `benches/crdt.rs` (criterion): delta joins versus full-state joins of a 10k-element ORSet,
//!   with `crdts::Orswot` doing the same work as a baseline; encoding; memory per element.
//!
//! Figures are printed; criterion keeps its estimates under `target/criterion/`, and the
//! summary of figures criterion does not measure (memory, sizes) is written as JSON to the
//! file named by `LATTICED_BENCH_JSON` when it is set.

use latticed_crdt::Element;

/// The i-th benchmark element: a 16-byte string in CloudState's string encoding.
pub fn element(i: usize) -> Element {
    Element::string(&format!("element-{i:08}"))
}
