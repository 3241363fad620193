//! `cargo xtask fuzz --target register_request`; the body is `ripcord_fuzz_targets::register_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::register_request(data));
