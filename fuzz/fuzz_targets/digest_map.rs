//! `cargo xtask fuzz --target digest_map`; the body is `ripcord_fuzz_targets::digest_map`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::digest_map(data));
