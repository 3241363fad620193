//! `cargo xtask fuzz --target journal_segment`; the body is `ripcord_fuzz_targets::journal_segment`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::journal_segment(data));
