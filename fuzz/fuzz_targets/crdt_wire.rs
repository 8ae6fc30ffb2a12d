//! Fuzz target `crdt_wire`: see `latticed::fuzzing::crdt_wire`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latticed::fuzzing::crdt_wire(data));
