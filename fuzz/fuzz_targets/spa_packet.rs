#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| knockq::fuzzing::spa_packet(data));
