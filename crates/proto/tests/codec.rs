//! Codec tests: property round trips, robustness on arbitrary input, prefix
//! handling, bounds, and one crafted buffer per decode error variant.

use proptest::prelude::*;
use ripcord_proto::wire::*;

// ------------------------------------------------------------ strategies --

fn arb_stamp() -> impl Strategy<Value = GroupStamp> {
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        1..=MAX_GROUP_MEMBERS,
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(
            |(group, instant_ns, members, offset_ns, error_ns)| GroupStamp {
                group: GroupId(group),
                instant_ns,
                members,
                offset_ns,
                error_ns,
            },
        )
}

fn arb_disk() -> impl Strategy<Value = DiskId> {
    any::<[u8; 16]>().prop_map(DiskId)
}

fn arb_string(max: usize) -> impl Strategy<Value = String> {
    // Mix of ASCII and multi-byte chars, cut to the byte bound.
    proptest::collection::vec(any::<char>(), 0..=max.min(80)).prop_map(move |cs| {
        let mut s = String::new();
        for c in cs {
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        s
    })
}

fn arb_extent() -> impl Strategy<Value = Extent> {
    (any::<u64>(), any::<u32>(), 0u8..3).prop_map(|(sector, sectors, k)| Extent {
        sector,
        sectors,
        kind: ExtentKind::from_u8(k).unwrap(),
    })
}

fn arb_batch() -> impl Strategy<Value = Batch> {
    (
        arb_disk(),
        any::<u64>(),
        1u64..u64::MAX / 2,
        0u64..1000,
        proptest::collection::vec(arb_extent(), 0..20),
        0u32..=KNOWN_FLAGS,
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(disk_id, epoch, first_seq, span, extents, flags, payload)| Batch {
                disk_id,
                epoch,
                first_seq,
                last_seq: first_seq + span,
                extents,
                flags,
                payload,
            },
        )
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    (1u16..=9).prop_map(|c| ErrorCode::from_u16(c).unwrap())
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u16>(),
            arb_string(MAX_MACHINE_ID_LEN),
            arb_string(MAX_AGENT_VERSION_LEN)
        )
            .prop_map(
                |(protocol_version, machine_id, agent_version)| Message::Hello(Hello {
                    protocol_version,
                    machine_id,
                    agent_version
                })
            ),
        (
            any::<u16>(),
            arb_string(MAX_SERVER_ID_LEN),
            any::<[u8; 32]>()
        )
            .prop_map(|(protocol_version, server_id, escrow_key)| {
                Message::HelloAck(HelloAck {
                    protocol_version,
                    server_id,
                    escrow_key,
                })
            }),
        (
            arb_disk(),
            any::<u64>(),
            9u32..=16,
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..=MAX_WRAPPED_KEY_LEN)
        )
            .prop_map(|(disk_id, size_bytes, shift, epoch, wrapped_key)| {
                Message::ProtectDisk(ProtectDisk {
                    disk_id,
                    size_bytes,
                    sector_size: 1 << shift,
                    epoch,
                    wrapped_key,
                })
            }),
        (arb_disk(), any::<u64>(), any::<u64>()).prop_map(|(disk_id, epoch, resume_from_seq)| {
            Message::DiskAccepted(DiskAccepted {
                disk_id,
                epoch,
                resume_from_seq,
            })
        }),
        arb_batch().prop_map(Message::Batch),
        (
            arb_disk(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            proptest::option::of(arb_stamp())
        )
            .prop_map(
                |(disk_id, epoch, seq, time_ns, app, id, mono_ns, mac, group)| Message::Cut(Cut {
                    disk_id,
                    epoch,
                    seq,
                    time_ns,
                    mono_ns,
                    kind: if app { CutKind::App } else { CutKind::Crash },
                    id,
                    mac,
                    group,
                })
            ),
        any::<u64>().prop_map(|nonce| Message::TimeProbe(TimeProbe { nonce })),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(nonce, received_ns, held)| {
            Message::TimeReply(TimeReply {
                nonce,
                received_ns,
                sent_ns: received_ns.saturating_add(held.into()),
            })
        }),
        (
            any::<[u8; 16]>(),
            MIN_GROUP_INTERVAL_MS..=MAX_GROUP_INTERVAL_MS,
            0..=MAX_GROUP_MEMBERS,
            any::<u64>(),
            any::<i64>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(
                |(group, interval_ms, members, max_error_ns, off, err, app_every)| {
                    Message::GroupSchedule(GroupSchedule {
                        group: GroupId(group),
                        interval_ms,
                        members,
                        max_error_ns,
                        coordinator_offset_ns: off,
                        coordinator_error_ns: err,
                        app_every,
                    })
                }
            ),
        (
            any::<bool>(),
            prop_oneof![
                Just(0),
                MIN_POLICY_APP_INTERVAL_SECS..=MAX_POLICY_APP_INTERVAL_SECS
            ]
        )
            .prop_map(|(assigned, secs)| {
                Message::PolicyUpdate(PolicyUpdate {
                    assigned,
                    app_interval_secs: if assigned { secs } else { 0 },
                })
            }),
        (arb_disk(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(disk_id, epoch, durable_seq, durable_cut_id)| Message::Ack(Ack {
                disk_id,
                epoch,
                durable_seq,
                durable_cut_id
            })
        ),
        (
            arb_error_code(),
            proptest::option::of(arb_disk()),
            arb_string(MAX_ERROR_MESSAGE_LEN)
        )
            .prop_map(|(code, disk_id, message)| Message::Error(ErrorMessage {
                code,
                disk_id,
                message
            })),
        any::<u64>().prop_map(|nonce| Message::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Message::Pong(Pong { nonce })),
        (
            arb_disk(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            arb_string(MAX_ERROR_MESSAGE_LEN)
        )
            .prop_map(
                |(disk_id, epoch, committed_cut_id, point_age_secs, failure)| {
                    Message::StoreStatus(StoreStatus {
                        disk_id,
                        epoch,
                        committed_cut_id,
                        point_age_secs,
                        failure,
                    })
                }
            ),
        (arb_disk(), arb_string(MAX_DEVICE_NAME_LEN)).prop_map(|(disk_id, s)| {
            // Device names are printable and non-empty (see `check_device_name`).
            let mut device: String = s.chars().filter(|c| !c.is_control()).collect();
            if device.is_empty() {
                device.push_str("/dev/sdb");
            }
            Message::DiskName(DiskName { disk_id, device })
        }),
        (arb_disk(), any::<u64>())
            .prop_map(|(disk_id, epoch)| Message::ContinueEpoch(ContinueEpoch { disk_id, epoch })),
        (arb_disk(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(disk_id, epoch, resume_from_seq, next_cut_id)| {
                Message::EpochContinued(EpochContinued {
                    disk_id,
                    epoch,
                    resume_from_seq,
                    next_cut_id,
                })
            }
        ),
    ]
}

// ------------------------------------------------------------- properties --

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip(msg in arb_message()) {
        let bytes = msg.to_frame().unwrap();
        let (decoded, used) = decode_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&decoded, &msg);
        if let Message::Batch(b) = &msg {
            prop_assert_eq!(b.frame_len(), bytes.len());
        }
        // Two frames back to back decode independently.
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let (_, used1) = decode_frame(&two).unwrap().unwrap();
        prop_assert_eq!(decode_frame(&two[used1..]).unwrap().unwrap().0, msg);
    }

    #[test]
    fn every_strict_prefix_needs_more(msg in arb_message()) {
        let bytes = msg.to_frame().unwrap();
        for i in 0..bytes.len() {
            prop_assert_eq!(decode_frame(&bytes[..i]), Ok(None), "prefix {} of {}", i, bytes.len());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn arbitrary_body_after_valid_header_never_panics(
        ty in 1u16..=12,
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let f = frame(ty, &body);
        match decode_frame(&f) {
            Ok(Some((m, used))) => {
                prop_assert_eq!(used, f.len());
                // Anything accepted must re-encode to the same bytes.
                prop_assert_eq!(m.to_frame().unwrap(), f);
            }
            Ok(None) => prop_assert!(false, "complete frame reported incomplete"),
            Err(_) => {}
        }
    }

    #[test]
    fn stream_decoder_handles_any_chunking(
        msgs in proptest::collection::vec(arb_message(), 1..5),
        cuts in proptest::collection::vec(1usize..64, 0..40),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            m.encode_frame(&mut stream).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        let mut pos = 0;
        for c in cuts.into_iter().chain(std::iter::repeat(64)) {
            if pos >= stream.len() {
                break;
            }
            let end = (pos + c).min(stream.len());
            dec.push(&stream[pos..end]);
            pos = end;
            while let Some(m) = dec.next_message().unwrap() {
                out.push(m);
            }
        }
        prop_assert_eq!(out, msgs);
        prop_assert_eq!(dec.buffered_len(), 0);
    }

    #[test]
    fn oversized_length_errors_from_header_alone(ty in 1u16..=12, extra in 1u64..=u32::MAX as u64) {
        let t = MessageType::from_u16(ty).unwrap();
        let max = t.max_body_len() as u64;
        let Some(len) = max.checked_add(extra).filter(|l| *l <= u32::MAX as u64) else {
            return Ok(());
        };
        // Only the 10 header bytes: must error, not ask for (and buffer) the body.
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        h.extend_from_slice(&(len as u32).to_le_bytes());
        h.extend_from_slice(&ty.to_le_bytes());
        prop_assert_eq!(
            decode_frame(&h),
            Err(DecodeError::FrameTooLarge { msg_type: t, len: len as u32, max: max as usize })
        );
    }
}

// ---------------------------------------------------------------- helpers --

fn frame(ty: u16, body: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&ty.to_le_bytes());
    f.extend_from_slice(body);
    f
}

fn batch_body(
    first: u64,
    last: u64,
    flags: u32,
    extents: &[(u64, u32, u8)],
    payload_len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = vec![7u8; 16];
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&first.to_le_bytes());
    b.extend_from_slice(&last.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for (s, n, k) in extents {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.push(*k);
    }
    b.extend_from_slice(&payload_len.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

// ------------------------------------------------------- golden layouts --

#[test]
fn golden_ping_and_ack_bytes() {
    let ping = Message::Ping(Ping {
        nonce: 0x0102_0304_0506_0708,
    })
    .to_frame()
    .unwrap();
    assert_eq!(
        ping,
        [b'R', b'C', 2, 0, 8, 0, 0, 0, 9, 0, 8, 7, 6, 5, 4, 3, 2, 1]
    );
    let ack = Message::Ack(Ack {
        disk_id: DiskId([0xAA; 16]),
        epoch: 2,
        durable_seq: 3,
        durable_cut_id: 4,
    })
    .to_frame()
    .unwrap();
    let mut want = vec![b'R', b'C', 2, 0, 40, 0, 0, 0, 7, 0];
    want.extend_from_slice(&[0xAA; 16]);
    for v in [2u64, 3, 4] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(ack, want);
}

#[test]
fn golden_batch_bytes() {
    let b = Batch {
        disk_id: DiskId([7; 16]),
        epoch: 1,
        first_seq: 5,
        last_seq: 6,
        extents: vec![Extent {
            sector: 8,
            sectors: 2,
            kind: ExtentKind::Zero,
        }],
        flags: FLAG_COMPRESSED | FLAG_SEALED,
        payload: vec![0xEE, 0xFF],
    };
    let body = batch_body(5, 6, 3, &[(8, 2, 1)], 2, &[0xEE, 0xFF]);
    assert_eq!(Message::Batch(b).to_frame().unwrap(), frame(5, &body));
}

// ------------------------------------------------ one test per error kind --

#[test]
fn err_bad_magic() {
    let mut f = Message::Ping(Ping { nonce: 1 }).to_frame().unwrap();
    f[0] = b'X';
    assert_eq!(
        decode_frame(&f),
        Err(DecodeError::BadMagic {
            found: [b'X', b'C']
        })
    );
}

#[test]
fn err_unsupported_wire_version_names_both() {
    let mut f = Message::Ping(Ping { nonce: 1 }).to_frame().unwrap();
    f[2] = 9;
    let e = decode_frame(&f).unwrap_err();
    assert_eq!(
        e,
        DecodeError::UnsupportedWireVersion {
            found: 9,
            supported: WIRE_VERSION
        }
    );
    let text = e.to_string();
    assert!(
        text.contains('9') && text.contains(&WIRE_VERSION.to_string()),
        "{text}"
    );
}

#[test]
fn err_unknown_message_type() {
    assert_eq!(
        decode_frame(&frame(0x7777, &[])),
        Err(DecodeError::UnknownMessageType { msg_type: 0x7777 })
    );
    assert_eq!(
        decode_frame(&frame(0, &[])),
        Err(DecodeError::UnknownMessageType { msg_type: 0 })
    );
}

#[test]
fn err_frame_too_large() {
    let mut h = frame(9, &[]);
    h[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(
        decode_frame(&h),
        Err(DecodeError::FrameTooLarge {
            msg_type: MessageType::Ping,
            len: 9,
            max: 8
        })
    );
    let mut h = frame(5, &[]);
    h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_frame(&h),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn err_field_too_long_string() {
    // machine_id announces 300 bytes (> 256) inside a frame that fits the Hello bound.
    let mut body = 1u16.to_le_bytes().to_vec();
    body.extend_from_slice(&300u16.to_le_bytes());
    body.extend_from_slice(&[b'a'; 300]);
    body.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        decode_frame(&frame(1, &body)),
        Err(DecodeError::Invalid(InvalidMessage::FieldTooLong {
            field: "hello.machine_id",
            len: 300,
            max: MAX_MACHINE_ID_LEN as u64
        }))
    );
}

#[test]
fn err_field_too_long_checked_before_allocation() {
    // Counts far beyond the bound with no bytes behind them: error on the
    // bound, not on truncation, and nothing sized by the count is allocated.
    let body = batch_body(1, 1, 0, &[], u32::MAX, &[]);
    assert_eq!(
        decode_frame(&frame(5, &body)),
        Err(DecodeError::Invalid(InvalidMessage::FieldTooLong {
            field: "batch.payload",
            len: u32::MAX as u64,
            max: MAX_PAYLOAD_LEN as u64
        }))
    );
    let mut body = batch_body(1, 1, 0, &[], 0, &[]);
    body[44..48].copy_from_slice(&u32::MAX.to_le_bytes()); // extent_count
    assert_eq!(
        decode_frame(&frame(5, &body)),
        Err(DecodeError::Invalid(InvalidMessage::FieldTooLong {
            field: "batch.extents",
            len: u32::MAX as u64,
            max: MAX_EXTENTS_PER_BATCH as u64
        }))
    );
}

#[test]
fn err_truncated_body() {
    assert_eq!(
        decode_frame(&frame(7, &[0; 30])),
        Err(DecodeError::TruncatedBody {
            msg_type: MessageType::Ack,
            field: "ack.durable_seq"
        })
    );
    // extent_count says 2 but bytes for only 1 extent follow.
    let mut body = batch_body(1, 1, 0, &[(0, 1, 0)], 0, &[]);
    body[44..48].copy_from_slice(&2u32.to_le_bytes());
    body.truncate(48 + EXTENT_LEN);
    assert_eq!(
        decode_frame(&frame(5, &body)),
        Err(DecodeError::TruncatedBody {
            msg_type: MessageType::Batch,
            field: "batch.extents"
        })
    );
}

#[test]
fn err_trailing_bytes() {
    assert_eq!(
        decode_frame(&frame(1, &[1, 0, 0, 0, 0, 0, 0xFF, 0xFF])),
        Err(DecodeError::TrailingBytes {
            msg_type: MessageType::Hello,
            extra: 2
        })
    );
}

#[test]
fn err_invalid_enums() {
    let body = batch_body(1, 1, 0, &[(0, 1, 3)], 0, &[]);
    assert_eq!(
        decode_frame(&frame(5, &body)),
        Err(DecodeError::InvalidEnum {
            field: "batch.extent.kind",
            value: 3
        })
    );
    let mut cut = vec![0u8; 16 + 32];
    cut.push(2);
    cut.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(
        decode_frame(&frame(6, &cut)),
        Err(DecodeError::InvalidEnum {
            field: "cut.kind",
            value: 2
        })
    );
    // A wire-version-1 cut body (no MAC) framed as version 2 is refused, not padded.
    let mut v1_cut = vec![0u8; 16 + 32];
    v1_cut.push(0);
    v1_cut.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(
        decode_frame(&frame(6, &v1_cut)),
        Err(DecodeError::TruncatedBody {
            msg_type: MessageType::Cut,
            field: "cut.mac"
        })
    );
    let mut err = 99u16.to_le_bytes().to_vec();
    err.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        decode_frame(&frame(8, &err)),
        Err(DecodeError::InvalidEnum {
            field: "error.code",
            value: 99
        })
    );
    let mut err = 1u16.to_le_bytes().to_vec();
    err.extend_from_slice(&[2, 0, 0]);
    assert_eq!(
        decode_frame(&frame(8, &err)),
        Err(DecodeError::InvalidEnum {
            field: "error.has_disk",
            value: 2
        })
    );
}

#[test]
fn err_invalid_utf8() {
    let mut body = 1u16.to_le_bytes().to_vec();
    body.extend_from_slice(&2u16.to_le_bytes());
    body.extend_from_slice(&[0xC3, 0x28]);
    assert_eq!(
        decode_frame(&frame(2, &body)),
        Err(DecodeError::InvalidUtf8 {
            field: "hello_ack.server_id"
        })
    );
}

#[test]
fn err_invariants() {
    assert_eq!(
        decode_frame(&frame(5, &batch_body(0, 0, 0, &[], 0, &[]))),
        Err(DecodeError::Invalid(InvalidMessage::InvalidSeqRange {
            first: 0,
            last: 0
        }))
    );
    assert_eq!(
        decode_frame(&frame(5, &batch_body(5, 4, 0, &[], 0, &[]))),
        Err(DecodeError::Invalid(InvalidMessage::InvalidSeqRange {
            first: 5,
            last: 4
        }))
    );
    assert_eq!(
        decode_frame(&frame(5, &batch_body(1, 1, 0x10, &[], 0, &[]))),
        Err(DecodeError::Invalid(InvalidMessage::UnknownFlags {
            flags: 0x10
        }))
    );
    let mut pd = vec![0u8; 16 + 8];
    pd.extend_from_slice(&1000u32.to_le_bytes());
    pd.extend_from_slice(&1u64.to_le_bytes());
    pd.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        decode_frame(&frame(3, &pd)),
        Err(DecodeError::Invalid(InvalidMessage::InvalidSectorSize {
            sector_size: 1000
        }))
    );
}

#[test]
fn encoder_refuses_out_of_bound_messages() {
    let m = Message::Hello(Hello {
        protocol_version: 1,
        machine_id: "x".repeat(MAX_MACHINE_ID_LEN + 1),
        agent_version: String::new(),
    });
    let mut out = Vec::new();
    assert!(matches!(
        m.encode_frame(&mut out),
        Err(InvalidMessage::FieldTooLong { .. })
    ));
    assert!(out.is_empty(), "nothing written on error");
    let b = Batch {
        disk_id: DiskId::default(),
        epoch: 0,
        first_seq: 1,
        last_seq: 1,
        extents: vec![],
        flags: 0,
        payload: vec![0; MAX_PAYLOAD_LEN + 1],
    };
    assert!(matches!(
        b.encode_frame(&mut out),
        Err(InvalidMessage::FieldTooLong {
            field: "batch.payload",
            ..
        })
    ));
}

#[test]
fn max_size_batch_round_trips() {
    let b = Batch {
        disk_id: DiskId([3; 16]),
        epoch: 9,
        first_seq: 1,
        last_seq: 1,
        extents: vec![
            Extent {
                sector: 0,
                sectors: 1,
                kind: ExtentKind::Data
            };
            MAX_EXTENTS_PER_BATCH
        ],
        flags: FLAG_SEALED,
        payload: vec![1; MAX_PAYLOAD_LEN],
    };
    let f = Message::Batch(b.clone()).to_frame().unwrap();
    assert_eq!(f.len(), MAX_FRAME_LEN);
    assert_eq!(decode_frame(&f).unwrap().unwrap().0, Message::Batch(b));
}

#[test]
fn decoder_waits_for_body_of_valid_header() {
    let f = Message::Ping(Ping { nonce: 5 }).to_frame().unwrap();
    let mut d = FrameDecoder::new();
    d.push(&f[..HEADER_LEN]);
    assert_eq!(d.next_message(), Ok(None));
    d.push(&f[HEADER_LEN..]);
    assert_eq!(d.next_message(), Ok(Some(Message::Ping(Ping { nonce: 5 }))));
}

fn stamped_cut() -> Cut {
    Cut {
        disk_id: DiskId([1; 16]),
        epoch: 2,
        seq: 3,
        time_ns: 4,
        mono_ns: 5,
        kind: CutKind::Crash,
        id: 6,
        mac: [7; 32],
        group: Some(GroupStamp {
            group: GroupId([8; 16]),
            instant_ns: 9_000_000_000,
            members: 2,
            offset_ns: -10,
            error_ns: 11,
        }),
    }
}

#[test]
fn a_group_stamp_that_is_cut_short_or_names_no_member_is_refused() {
    let frame = Message::Cut(stamped_cut()).to_frame().unwrap();
    assert!(matches!(
        decode_frame(&frame),
        Ok(Some((Message::Cut(Cut { group: Some(_), .. }), _)))
    ));
    // A body one byte short of the stamp: the stamp is truncated, not ignored.
    let mut short = frame[..frame.len() - 1].to_vec();
    let len = (short.len() - HEADER_LEN) as u32;
    short[4..8].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        decode_frame(&short),
        Err(DecodeError::TruncatedBody {
            field: "cut.group",
            ..
        })
    ));
    // members = 0 (offset 24 of the stamp, which starts after the 89 fixed bytes).
    let mut none = frame.clone();
    let at = HEADER_LEN + 89 + 24;
    none[at..at + 2].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        decode_frame(&none),
        Err(DecodeError::Invalid(InvalidMessage::GroupMembers {
            members: 0
        }))
    );
}

#[test]
fn an_app_group_cut_round_trips_and_a_reply_cannot_leave_before_it_arrived() {
    let mut cut = stamped_cut();
    cut.kind = CutKind::App;
    let frame = Message::Cut(cut.clone()).to_frame().unwrap();
    assert!(matches!(decode_frame(&frame), Ok(Some((Message::Cut(c), _))) if c == cut));
    let reply = TimeReply {
        nonce: 1,
        received_ns: 10,
        sent_ns: 9,
    };
    assert!(matches!(
        Message::TimeReply(reply).to_frame(),
        Err(InvalidMessage::TimeReplyOrder { .. })
    ));
    let schedule = GroupSchedule {
        group: GroupId([1; 16]),
        interval_ms: 999,
        members: 2,
        max_error_ns: 1,
        coordinator_offset_ns: 0,
        coordinator_error_ns: 0,
        app_every: 0,
    };
    assert!(matches!(
        Message::GroupSchedule(schedule).to_frame(),
        Err(InvalidMessage::GroupInterval { interval_ms: 999 })
    ));
}

#[test]
fn a_schedule_without_app_points_keeps_protocol_5s_layout_and_policy_updates_are_bounded() {
    let mut schedule = GroupSchedule {
        group: GroupId([1; 16]),
        interval_ms: 5000,
        members: 2,
        max_error_ns: 1,
        coordinator_offset_ns: -3,
        coordinator_error_ns: 4,
        app_every: 0,
    };
    // Without app points: 50 bytes of body, as protocol 5 sent it.
    let v5 = Message::GroupSchedule(schedule).to_frame().unwrap();
    assert_eq!(v5.len(), HEADER_LEN + 50);
    assert!(matches!(decode_frame(&v5), Ok(Some((Message::GroupSchedule(s), _))) if s == schedule));
    schedule.app_every = 12;
    let v6 = Message::GroupSchedule(schedule).to_frame().unwrap();
    assert_eq!(v6.len(), v5.len() + 4);
    assert!(matches!(decode_frame(&v6), Ok(Some((Message::GroupSchedule(s), _))) if s == schedule));
    // An explicit 0 would be a second encoding of the same schedule: refused.
    let mut zero = v6.clone();
    let n = zero.len();
    zero[n - 4..].fill(0);
    assert!(matches!(
        decode_frame(&zero),
        Err(DecodeError::InvalidEnum {
            field: "group_schedule.app_every",
            value: 0
        })
    ));

    let update = |assigned, app_interval_secs| {
        Message::PolicyUpdate(PolicyUpdate {
            assigned,
            app_interval_secs,
        })
    };
    assert!(matches!(
        update(true, MAX_POLICY_APP_INTERVAL_SECS + 1).to_frame(),
        Err(InvalidMessage::PolicyAppInterval { .. })
    ));
    assert!(matches!(
        update(true, MIN_POLICY_APP_INTERVAL_SECS - 1).to_frame(),
        Err(InvalidMessage::PolicyAppInterval { secs: 59 })
    ));
    assert!(matches!(
        update(false, 60).to_frame(),
        Err(InvalidMessage::PolicyAppInterval { secs: 60 })
    ));
    // A hostile "assigned" byte is named.
    let mut frame = update(true, 60).to_frame().unwrap();
    frame[HEADER_LEN] = 2;
    assert!(matches!(
        decode_frame(&frame),
        Err(DecodeError::InvalidEnum {
            field: "policy_update.assigned",
            value: 2
        })
    ));
}
