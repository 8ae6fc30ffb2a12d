//! Fuzz target `user_delta`: see `latticed::fuzzing::user_delta`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latticed::fuzzing::user_delta(data));
