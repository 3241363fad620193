//! `cargo xtask fuzz --target ps_registry`; the body is `ripcord_fuzz_targets::ps_registry`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::ps_registry(data));
