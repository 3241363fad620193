//! `cargo xtask fuzz --target journal_entry`; the body is `ripcord_fuzz_targets::journal_entry`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::journal_entry(data));
