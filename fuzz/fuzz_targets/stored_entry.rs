//! Fuzz target `stored_entry`: see `latticed::fuzzing::stored_entry`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latticed::fuzzing::stored_entry(data));
