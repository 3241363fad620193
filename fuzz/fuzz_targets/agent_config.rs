//! `cargo xtask fuzz --target agent_config`; the body is `ripcord_fuzz_targets::agent_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::agent_config(data));
