//! `cargo xtask fuzz --target index_segment`; the body is `ripcord_fuzz_targets::index_segment`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::index_segment(data));
