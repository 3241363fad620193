//! `cargo xtask fuzz --target gc_marker`; the body is `ripcord_fuzz_targets::gc_marker`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::gc_marker(data));
