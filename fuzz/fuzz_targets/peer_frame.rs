//! Fuzz target `peer_frame`: see `latticed::fuzzing::peer_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latticed::fuzzing::peer_frame(data));
