//! `cargo xtask fuzz --target token_store`; the body is `ripcord_fuzz_targets::token_store`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::token_store(data));
