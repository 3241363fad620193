//! `cargo xtask fuzz --target epoch`; the body is `ripcord_fuzz_targets::epoch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::epoch(data));
