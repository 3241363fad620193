//! `cargo xtask fuzz --target journal_record`; the body is `ripcord_fuzz_targets::journal_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::journal_record(data));
