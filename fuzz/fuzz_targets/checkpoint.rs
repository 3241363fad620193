//! `cargo xtask fuzz --target checkpoint`; the body is `ripcord_fuzz_targets::checkpoint`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::checkpoint(data));
