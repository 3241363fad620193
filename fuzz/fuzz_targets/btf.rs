//! `cargo xtask fuzz --target btf`; the body is `ripcord_fuzz_targets::btf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::btf(data));
