//! Fuzz target `uf_message`: see `latticed::fuzzing::uf_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latticed::fuzzing::uf_message(data));
