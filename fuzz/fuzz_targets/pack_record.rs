//! `cargo xtask fuzz --target pack_record`; the body is `ripcord_fuzz_targets::pack_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::pack_record(data));
