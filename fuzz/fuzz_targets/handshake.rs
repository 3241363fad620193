//! `cargo xtask fuzz --target handshake`; the body is `ripcord_fuzz_targets::handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::handshake(data));
