//! The agent <-> process server wire protocol (`crates/proto`) and the registration
//! exchange (`crates/transport`).

use ripcord_proto::{
    handshake::{answer_hello, check_hello_ack, negotiate},
    wire::{FrameDecoder, Message, decode_frame, decode_header},
};
use ripcord_transport::register::fuzzing as register;

/// One frame through `decode_frame`. The encoding is canonical: what decodes re-encodes
/// to the same bytes, and the header decoder agrees on the frame's length.
pub fn wire_frame(data: &[u8]) {
    if let Ok(Some((msg, used))) = decode_frame(data) {
        crate::accepted();
        assert!(used <= data.len());
        let again = msg.to_frame().expect("a decoded message is valid");
        assert_eq!(&again[..], &data[..used], "re-encoding differs");
        let header = decode_header(data).expect("the header decoded before");
        assert!(header.is_some(), "a whole frame has a header");
    }
}

/// A byte stream fed to `FrameDecoder` in chunks (the first byte picks the chunk size):
/// chunking must not change which messages come out, nor whether it fails.
pub fn wire_stream(data: &[u8]) {
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
    if !whole.is_empty() {
        crate::accepted();
    }
    assert_eq!(streamed, whole, "chunked decoding differs");
    assert_eq!(failed, whole_failed, "chunked decoding fails differently");
}

/// The version handshake on decoded `Hello` / `HelloAck` frames: what the server
/// answers, the agent accepts, with the same version; an ack the agent accepts names a
/// version the server would also pick.
pub fn handshake(data: &[u8]) {
    let Ok(Some((msg, _))) = decode_frame(data) else {
        return;
    };
    crate::accepted();
    match msg {
        Message::Hello(hello) => match answer_hello(&hello, "fuzz-ps", [7; 32]) {
            Ok(Message::HelloAck(ack)) => {
                let v = check_hello_ack(hello.protocol_version, &ack)
                    .expect("the agent accepts what the server answered");
                assert_eq!(v, ack.protocol_version);
                let frame = Message::HelloAck(ack).to_frame().expect("valid ack");
                assert!(matches!(decode_frame(&frame), Ok(Some(_))));
            }
            Ok(other) => panic!("answer_hello gave a {} frame", other.message_type()),
            Err((_, Message::Error(e))) => {
                assert!(negotiate(hello.protocol_version).is_err());
                Message::Error(e).to_frame().expect("a valid refusal");
            }
            Err((_, other)) => panic!("a refusal is a {} frame", other.message_type()),
        },
        Message::HelloAck(ack) => {
            for offered in [ripcord_proto::PROTOCOL_VERSION, ack.protocol_version] {
                if let Ok(v) = check_hello_ack(offered, &ack) {
                    assert_eq!(v, ack.protocol_version);
                    assert_eq!(negotiate(v), Ok(v));
                }
            }
        }
        _ => {}
    }
}

/// A registration request as the server reads it: the 4-byte big-endian length (checked
/// against the limit), then the body; a request whose token and machine id are valid
/// re-encodes from the typed values to the same body.
pub fn register_request(data: &[u8]) {
    let Some(body) = registration_body(data) else {
        return;
    };
    if let Ok(Some(again)) = register::reencode_request(body) {
        crate::accepted();
        assert_eq!(again, body, "re-encoded request differs");
    }
}

/// A registration response as the agent reads it (length, body): accepted bodies
/// re-encode to the same bytes.
pub fn register_response(data: &[u8]) {
    let Some(body) = registration_body(data) else {
        return;
    };
    if let Ok(again) = register::reencode_response(body) {
        crate::accepted();
        assert_eq!(again, body, "re-encoded response differs");
    }
}

/// A message of the process servers' link to the configuration role (a JSON body, its
/// size bounded before parsing), read both as a request (the configuration role's side)
/// and as a reply (the server's side): what decodes re-encodes to JSON that decodes to
/// the same encoding.
pub fn control_message(data: &[u8]) {
    use ripcord_transport::control::{decode_reply, decode_request};
    if let Ok(request) = decode_request(data) {
        crate::accepted();
        let again = serde_json::to_vec(&request).expect("a request encodes");
        let back = decode_request(&again).expect("a re-encoded request decodes");
        assert_eq!(
            serde_json::to_vec(&back).unwrap(),
            again,
            "request round trip"
        );
    }
    if let Ok(reply) = decode_reply(data) {
        crate::accepted();
        let again = serde_json::to_vec(&reply).expect("a reply encodes");
        let back = decode_reply(&again).expect("a re-encoded reply decodes");
        assert_eq!(
            serde_json::to_vec(&back).unwrap(),
            again,
            "reply round trip"
        );
    }
}

/// The body of one length-prefixed registration frame, as `read_frame` takes it; `None`
/// where it would fail (length over the limit, stream too short).
fn registration_body(data: &[u8]) -> Option<&[u8]> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len);
    register::check_frame_len(len).ok()?;
    rest.get(..len as usize)
}
