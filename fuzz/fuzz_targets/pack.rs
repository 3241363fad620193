//! `cargo xtask fuzz --target pack`; the body is `ripcord_fuzz_targets::pack`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::pack(data));
