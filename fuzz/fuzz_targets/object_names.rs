//! `cargo xtask fuzz --target object_names`; the body is `ripcord_fuzz_targets::object_names`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::object_names(data));
