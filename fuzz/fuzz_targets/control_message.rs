//! `cargo xtask fuzz --target control_message`; the body is `ripcord_fuzz_targets::control_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::control_message(data));
