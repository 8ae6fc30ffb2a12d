//! Fuzz target `swim_datagram`: see `latticed::fuzzing::swim_datagram`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latticed::fuzzing::swim_datagram(data));
