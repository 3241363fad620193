//! `cargo xtask fuzz --target mt_state`; the body is `ripcord_fuzz_targets::mt_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::mt_state(data));
