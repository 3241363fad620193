//! `cargo xtask fuzz --target wire_frame`; the body is `ripcord_fuzz_targets::wire_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::wire_frame(data));
