//! `cargo xtask fuzz --target digest_slice`; the body is `ripcord_fuzz_targets::digest_slice`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ripcord_fuzz_targets::digest_slice(data));
