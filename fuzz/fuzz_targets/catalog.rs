//! `cargo xtask fuzz --target catalog`; the body is `ripcord_fuzz_targets::catalog`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::catalog(data));
