//! `cargo xtask fuzz --target machine_store`; the body is `ripcord_fuzz_targets::machine_store`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::machine_store(data));
