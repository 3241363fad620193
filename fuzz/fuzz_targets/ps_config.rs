//! `cargo xtask fuzz --target ps_config`; the body is `ripcord_fuzz_targets::ps_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::ps_config(data));
