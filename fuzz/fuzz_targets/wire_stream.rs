//! `cargo xtask fuzz --target wire_stream`; the body is `ripcord_fuzz_targets::wire_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::wire_stream(data));
