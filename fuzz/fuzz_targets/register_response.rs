//! `cargo xtask fuzz --target register_response`; the body is `ripcord_fuzz_targets::register_response`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::register_response(data));
