//! `cargo +nightly fuzz run decode_frame`: one buffer through `decode_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ripcord_proto::wire::decode_frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = decode_frame(data) {
        assert!(used <= data.len());
        // The encoding is canonical: whatever decodes re-encodes to the same bytes.
        let again = msg.to_frame().expect("a decoded message is valid");
        assert_eq!(&again[..], &data[..used]);
    }
});
