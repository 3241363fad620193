//! `DiskName` (protocol version 3): round trip, exact bytes, and hostile input.

use ripcord_proto::wire::*;

fn frame(ty: u16, body: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&ty.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// A DiskName body: disk id, u16 length, then `device` bytes as given.
fn body(disk: [u8; 16], len: u16, device: &[u8]) -> Vec<u8> {
    let mut b = disk.to_vec();
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(device);
    b
}

const TYPE: u16 = MessageType::DiskName as u16;

#[test]
fn round_trip_and_golden_bytes() {
    let msg = Message::DiskName(DiskName {
        disk_id: DiskId([7; 16]),
        device: "/dev/sdb".into(),
    });
    let bytes = msg.to_frame().unwrap();
    assert_eq!(TYPE, 0x000C);
    assert_eq!(bytes, frame(TYPE, &body([7; 16], 8, b"/dev/sdb")));
    assert_eq!(
        decode_frame(&bytes).unwrap(),
        Some((msg, bytes.len())),
        "DiskName must decode to what was encoded"
    );
    // The longest name allowed round-trips too.
    let long = Message::DiskName(DiskName {
        disk_id: DiskId([1; 16]),
        device: "é".repeat(MAX_DEVICE_NAME_LEN / 2) + "x",
    });
    let bytes = long.to_frame().unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 16 + 2 + MAX_DEVICE_NAME_LEN);
    assert_eq!(decode_frame(&bytes).unwrap().unwrap().0, long);
}

#[test]
fn header_announcing_more_than_the_bound_is_refused_before_the_body() {
    let max = 16 + 2 + MAX_DEVICE_NAME_LEN;
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    h.extend_from_slice(&(max as u32 + 1).to_le_bytes());
    h.extend_from_slice(&TYPE.to_le_bytes());
    assert_eq!(
        decode_frame(&h),
        Err(DecodeError::FrameTooLarge {
            msg_type: MessageType::DiskName,
            len: max as u32 + 1,
            max,
        })
    );
}

#[test]
fn hostile_names_are_refused_with_a_clear_error() {
    let disk = [3; 16];
    // A length prefix over the bound, inside a frame within the body bound: refused
    // on the prefix, before the bytes are read.
    let f = frame(TYPE, &body(disk, u16::MAX, &[b'a'; 200]));
    let err = decode_frame(&f).unwrap_err();
    assert_eq!(
        err,
        DecodeError::Invalid(InvalidMessage::FieldTooLong {
            field: "disk_name.device",
            len: u64::from(u16::MAX),
            max: MAX_DEVICE_NAME_LEN as u64,
        })
    );
    assert!(err.to_string().contains("disk_name.device"), "{err}");
    // Cases, each with the error it must give.
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "empty",
            body(disk, 0, b""),
            InvalidMessage::UnprintableDeviceName.into(),
        ),
        (
            "newline (log injection)",
            body(disk, 17, b"/dev/sdb\nlevel=ok"),
            InvalidMessage::UnprintableDeviceName.into(),
        ),
        (
            "escape sequence",
            body(disk, 5, b"\x1b[2Jx"),
            InvalidMessage::UnprintableDeviceName.into(),
        ),
        (
            "NUL",
            body(disk, 3, b"a\0b"),
            InvalidMessage::UnprintableDeviceName.into(),
        ),
        (
            "not UTF-8",
            body(disk, 2, &[0xff, 0xfe]),
            DecodeError::InvalidUtf8 {
                field: "disk_name.device",
            },
        ),
        (
            "length past the body",
            body(disk, 9, b"/dev/sdb"),
            DecodeError::TruncatedBody {
                msg_type: MessageType::DiskName,
                field: "disk_name.device",
            },
        ),
        (
            "trailing bytes",
            body(disk, 3, b"sdbXY"),
            DecodeError::TrailingBytes {
                msg_type: MessageType::DiskName,
                extra: 2,
            },
        ),
        (
            "no disk id",
            vec![1, 2, 3],
            DecodeError::TruncatedBody {
                msg_type: MessageType::DiskName,
                field: "disk_name.disk_id",
            },
        ),
    ];
    for (what, b, want) in cases {
        assert_eq!(decode_frame(&frame(TYPE, &b)), Err(want), "{what}");
    }
}

#[test]
fn encoder_refuses_what_the_decoder_refuses() {
    for device in [
        String::new(),
        "a\tb".to_owned(),
        "x".repeat(MAX_DEVICE_NAME_LEN + 1),
    ] {
        let msg = Message::DiskName(DiskName {
            disk_id: DiskId([0; 16]),
            device: device.clone(),
        });
        let mut out = Vec::new();
        assert!(msg.encode_frame(&mut out).is_err(), "{device:?} encoded");
        assert!(out.is_empty(), "bytes written for an invalid message");
    }
    assert_eq!(
        check_device_name(&"x".repeat(MAX_DEVICE_NAME_LEN)),
        Ok(()),
        "a name at the bound is fine"
    );
}
