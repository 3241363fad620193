//! `cargo xtask fuzz --target agent_state`; the body is `ripcord_fuzz_targets::agent_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::agent_state(data));
