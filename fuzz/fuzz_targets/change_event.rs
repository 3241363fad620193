//! `cargo xtask fuzz --target change_event`; the body is `ripcord_fuzz_targets::change_event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::change_event(data));
