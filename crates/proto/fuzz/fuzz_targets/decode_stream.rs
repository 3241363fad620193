//! `cargo +nightly fuzz run decode_stream`: a byte stream fed to
//! `FrameDecoder` in chunks; the first byte picks the chunk size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ripcord_proto::wire::{FrameDecoder, decode_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut dec = FrameDecoder::new();
    let mut streamed = Vec::new();
    let mut failed = false;
    'outer: for piece in stream.chunks(chunk) {
        dec.push(piece);
        loop {
            match dec.next_message() {
                Ok(Some(m)) => streamed.push(m),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'outer;
                }
            }
        }
    }
    // Chunking must not change the result: compare with whole-buffer decoding.
    let mut whole = Vec::new();
    let mut rest = stream;
    let mut whole_failed = false;
    loop {
        match decode_frame(rest) {
            Ok(Some((m, n))) => {
                whole.push(m);
                rest = &rest[n..];
            }
            Ok(None) => break,
            Err(_) => {
                whole_failed = true;
                break;
            }
        }
    }
    assert_eq!(streamed, whole);
    assert_eq!(failed, whole_failed);
});
