//! The seed corpus: small valid inputs per target, made with the real encoders, and a
//! few hostile variants of each (truncated, a length field blown up, a bit flipped).
//! `write_corpus` writes them as `fuzz/corpus/<target>/valid-*` and `hostile-*`; files
//! that fuzzing found worth keeping are added by hand as `regress-*` (see `fuzz/README.md`).

use std::{collections::BTreeMap, path::Path};

use ripcord_proto::wire::*;
use ripcord_store::{BatchLocation, CutInfo, EpochInfo, format as sf};

use crate::DISK;

/// One seed: target, file name (without the `valid-` prefix), bytes.
pub type Seed = (&'static str, String, Vec<u8>);

fn messages() -> Vec<(&'static str, Message)> {
    let disk = DiskId(*b"corpus-disk-0001");
    vec![
        (
            "hello",
            Message::Hello(Hello {
                protocol_version: 3,
                machine_id: "host-01.example".into(),
                agent_version: "ripcord-agent 0.1.0".into(),
            }),
        ),
        (
            "hello_ack",
            Message::HelloAck(HelloAck {
                escrow_key: [0; 32],
                protocol_version: 3,
                server_id: "ps-1".into(),
            }),
        ),
        ("protect_disk", Message::ProtectDisk(protect(disk))),
        (
            "disk_accepted",
            Message::DiskAccepted(DiskAccepted {
                disk_id: disk,
                epoch: 3,
                resume_from_seq: 42,
            }),
        ),
        ("batch", Message::Batch(batch(disk))),
        ("cut", Message::Cut(cut(disk))),
        ("group_cut", Message::Cut(group_cut(disk))),
        (
            "ack",
            Message::Ack(Ack {
                disk_id: disk,
                epoch: 3,
                durable_seq: 44,
                durable_cut_id: 5,
            }),
        ),
        (
            "error",
            Message::Error(ErrorMessage {
                code: ErrorCode::OutOfOrder,
                disk_id: Some(disk),
                message: "gap: expected 45, got 47".into(),
            }),
        ),
        ("ping", Message::Ping(Ping { nonce: 99 })),
        ("pong", Message::Pong(Pong { nonce: 99 })),
        (
            "store_status",
            Message::StoreStatus(StoreStatus {
                disk_id: disk,
                epoch: 3,
                committed_cut_id: 17,
                point_age_secs: 42,
                failure: "object store put failed: No space left on device".into(),
            }),
        ),
        (
            "disk_name",
            Message::DiskName(DiskName {
                disk_id: disk,
                device: "/dev/disk/by-id/nvme-Samsung_SSD_980_PRO_1TB".into(),
            }),
        ),
        (
            "continue_epoch",
            Message::ContinueEpoch(ContinueEpoch {
                disk_id: disk,
                epoch: 3,
            }),
        ),
        (
            "epoch_continued",
            Message::EpochContinued(EpochContinued {
                disk_id: disk,
                epoch: 3,
                resume_from_seq: 4097,
                next_cut_id: 212,
            }),
        ),
        ("time_probe", Message::TimeProbe(TimeProbe { nonce: 7 })),
        (
            "time_reply",
            Message::TimeReply(TimeReply {
                nonce: 7,
                received_ns: 1_700_000_000_000_000_000,
                sent_ns: 1_700_000_000_000_020_000,
            }),
        ),
        (
            "group_schedule",
            Message::GroupSchedule(GroupSchedule {
                group: GroupId([0x6b; 16]),
                interval_ms: 5_000,
                members: 3,
                max_error_ns: 50_000_000,
                coordinator_offset_ns: -1_200_000,
                coordinator_error_ns: 400_000,
                app_every: 12,
            }),
        ),
        (
            "policy_update",
            Message::PolicyUpdate(PolicyUpdate {
                assigned: true,
                app_interval_secs: 3600,
            }),
        ),
    ]
}

fn protect(disk: DiskId) -> ProtectDisk {
    ProtectDisk {
        wrapped_key: vec![0xa5; 48],
        disk_id: disk,
        size_bytes: 64 << 30,
        sector_size: 4096,
        epoch: 3,
    }
}

fn extents() -> Vec<Extent> {
    vec![
        Extent {
            sector: 2048,
            sectors: 8,
            kind: ExtentKind::Data,
        },
        Extent {
            sector: 9000,
            sectors: 64,
            kind: ExtentKind::Zero,
        },
        Extent {
            sector: 1 << 30,
            sectors: 1 << 20,
            kind: ExtentKind::Discard,
        },
    ]
}

fn batch(disk: DiskId) -> Batch {
    Batch {
        disk_id: disk,
        epoch: 3,
        first_seq: 42,
        last_seq: 44,
        extents: extents(),
        flags: FLAG_COMPRESSED | FLAG_SEALED,
        payload: (0..=255u8).collect(),
    }
}

fn cut(disk: DiskId) -> Cut {
    Cut {
        mono_ns: 0,
        disk_id: disk,
        epoch: 3,
        seq: 44,
        time_ns: 1_700_000_000_000_000_000,
        kind: CutKind::App,
        id: 5,
        group: None,
        mac: *b"corpus-cut-mac-0123456789abcdef!",
    }
}

/// A crash-consistent cut that is its disk's member of a consistency group's point.
fn group_cut(disk: DiskId) -> Cut {
    Cut {
        kind: CutKind::Crash,
        id: 6,
        group: Some(group_stamp(6)),
        ..cut(disk)
    }
}

fn frame(m: &Message) -> Vec<u8> {
    m.to_frame().expect("a seed message is valid")
}

fn field(out: &mut Vec<u8>, f: &[u8]) {
    out.extend_from_slice(&u32::try_from(f.len()).expect("small").to_be_bytes());
    out.extend_from_slice(f);
}

fn length_prefixed(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(body);
    out
}

fn named(name: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("{name}\n").into_bytes();
    out.extend_from_slice(bytes);
    out
}

fn location(seq: u64, pack: &str) -> BatchLocation {
    BatchLocation {
        pack: pack.to_owned(),
        offset: 36 + 100 * seq,
        length: 100,
        epoch: 3,
        seq,
        checksum: 0x1234_5678 ^ seq as u32,
    }
}

fn cut_info(cut_id: u64, seq: u64) -> CutInfo {
    CutInfo {
        epoch: 3,
        cut_id,
        seq,
        time_ns: 1_700_000_000_000_000_000 + cut_id,
        mono_ns: 5_000 + cut_id,
        kind: ripcord_store::CutKind::Crash,
        group: None,
        mac: [cut_id as u8; ripcord_store::POINT_MAC_LEN],
    }
}

/// A consistency group's stamp of cut `cut_id`.
fn group_stamp(cut_id: u64) -> GroupStamp {
    GroupStamp {
        group: GroupId(*b"corpus-group-001"),
        instant_ns: 1_700_000_000_000_000_000 + cut_id * 60_000_000_000,
        members: 3,
        offset_ns: -125_000,
        error_ns: 2_500_000,
    }
}

/// A small BTF blob: `int`, and `struct request { int cmd_flags; }`.
fn btf_blob() -> Vec<u8> {
    let strings = b"\0int\0request\0cmd_flags\0";
    let mut types = Vec::new();
    let mut ty = |name: u32, info: u32, size: u32, extra: &[u32]| {
        for v in [name, info, size].iter().chain(extra) {
            types.extend_from_slice(&v.to_le_bytes());
        }
    };
    ty(1, 1 << 24, 4, &[32]); // [1] INT "int", 32 bits
    ty(5, (4 << 24) | 1, 4, &[13, 1, 0]); // [2] STRUCT "request", member cmd_flags: [1] @0
    let mut out = Vec::new();
    out.extend_from_slice(&0xeb9fu16.to_le_bytes());
    out.extend_from_slice(&[1, 0]); // version, flags
    for v in [
        24u32,
        0,
        types.len() as u32,
        types.len() as u32,
        strings.len() as u32,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&types);
    out.extend_from_slice(strings);
    out
}

/// Every valid seed.
pub fn valid() -> Vec<Seed> {
    let mut s: Vec<Seed> = Vec::new();
    let mut add = |t: &'static str, name: &str, b: Vec<u8>| s.push((t, name.to_owned(), b));
    let disk = DiskId(*b"corpus-disk-0001");

    // Wire protocol.
    let mut stream = vec![7u8];
    for (name, m) in messages() {
        add("wire_frame", name, frame(&m));
        stream.extend_from_slice(&frame(&m));
    }
    add("wire_stream", "all-messages", stream);
    let hello = |v| {
        frame(&Message::Hello(Hello {
            protocol_version: v,
            machine_id: "m1".into(),
            agent_version: "a".into(),
        }))
    };
    let ack = |v| {
        frame(&Message::HelloAck(HelloAck {
            protocol_version: v,
            server_id: "ps".into(),
            escrow_key: [1; 32],
        }))
    };
    add("handshake", "hello-v3", hello(3));
    add("handshake", "hello-v9", hello(9));
    add("handshake", "hello-v0", hello(0));
    add("handshake", "ack-v2", ack(2));
    add("handshake", "ack-v9", ack(9));

    // Registration.
    let request = |token: &[u8]| {
        let mut b = vec![0x01];
        field(&mut b, token);
        field(&mut b, b"host-01.example");
        field(&mut b, &[0x30, 0x82, 0x01, 0x0a, 0x02, 0x01, 0x00]);
        length_prefixed(&b)
    };
    add(
        "register_request",
        "token",
        request(b"abcdef.0123456789abcdef"),
    );
    add("register_request", "renewal", request(b""));
    let mut ok = vec![0x02];
    field(&mut ok, &[0x30, 0x03, 0x02, 0x01, 0x01]);
    field(&mut ok, &[0x30, 0x03, 0x02, 0x01, 0x02]);
    field(&mut ok, &[9; 32]);
    field(&mut ok, &9443u16.to_be_bytes());
    add("register_response", "granted", length_prefixed(&ok));
    add("register_response", "refused", length_prefixed(&[0x03, 5]));
    add(
        "register_response",
        "refused-unknown",
        length_prefixed(&[0x03, 200]),
    );

    // The process servers' link to the configuration role.
    {
        use ripcord_transport::control::{
            AssignedMachine, ClockReading, JoinRequest, MachineGroup, MachinePolicy,
            MachinePolicySettings, Refusal, Reply, ReportRequest, Request,
        };
        fn to_json(value: &impl serde::Serialize) -> Vec<u8> {
            serde_json::to_vec(value).expect("a seed encodes")
        }
        add(
            "control_message",
            "join",
            to_json(&Request::Join(JoinRequest {
                token: "abcdef.0123456789abcdef".into(),
                server_id: "ps-2".into(),
                version: "0.1.0".into(),
                fingerprint: "ab".repeat(32),
                names: vec!["ps2.example".into()],
                data_port: 9443,
                csr: vec![0x30, 0x82, 0x01, 0x0a],
            })),
        );
        add(
            "control_message",
            "report",
            to_json(&Request::Report(ReportRequest {
                version: "0.1.0".into(),
                fingerprint: "ab".repeat(32),
                instance: "00112233".into(),
                body: serde_json::json!({"health": null, "disks": []}),
            })),
        );
        add(
            "control_message",
            "accepted",
            to_json(&Reply::Accepted {
                machines: vec![AssignedMachine {
                    id: "host-01.example".into(),
                    cert_sha256: "ab".repeat(32),
                }],
                groups: vec![MachineGroup {
                    machine: "host-01.example".into(),
                    group: "6b".repeat(16),
                    interval_ms: 5_000,
                    members: 3,
                    max_error_ns: 50_000_000,
                    app_every: 12,
                }],
                clock: Some(ClockReading {
                    received_ns: 1_700_000_000_000_000_000,
                    sent_ns: 1_700_000_000_000_250_000,
                }),
                policies: vec![MachinePolicy {
                    machine: "host-01.example".into(),
                    settings: MachinePolicySettings {
                        retention_secs: 72 * 3600,
                        app_interval_secs: 3600,
                    },
                }],
            }),
        );
        add(
            "control_message",
            "refused",
            to_json(&Reply::Refused {
                refusal: Refusal::Cloned,
                message: "a cloned server?".into(),
            }),
        );
    }

    // Journal.
    use ripcord_journal::{RecordType, format as jf};
    let payloads = [
        (
            RecordType::EpochStart,
            frame(&Message::ProtectDisk(protect(disk))),
        ),
        (RecordType::Batch, frame(&Message::Batch(batch(disk)))),
        (RecordType::Cut, frame(&Message::Cut(cut(disk)))),
        (
            RecordType::KeyRotation,
            ripcord_process_server::disk::key_rotation_payload(
                4097,
                &frame(&Message::ProtectDisk(protect(disk))),
            ),
        ),
    ];
    let segment = |number: u64, first: u64, recs: &[(RecordType, Vec<u8>)]| {
        let mut b = jf::encode_segment_header(number, first).to_vec();
        for (i, (k, p)) in recs.iter().enumerate() {
            b.extend_from_slice(&jf::encode_record(number, *k, first + i as u64, p));
        }
        b
    };
    let one = segment(1, 1, &payloads);
    let mut records = 1u64.to_le_bytes().to_vec();
    records.extend_from_slice(&one);
    add("journal_record", "segment-1", records);
    add("journal_segment", "one-segment", one.clone());
    let mut two = segment(1, 1, &payloads[..2]);
    two.extend_from_slice(&segment(2, 3, &payloads[2..]));
    add("journal_segment", "two-segments", two);
    let mut torn = one.clone();
    torn.extend_from_slice(&jf::encode_record(1, RecordType::Batch, 4, &payloads[1].1)[..40]);
    add("journal_segment", "torn-tail", torn);
    for (k, p) in &payloads {
        let mut b = vec![*k as u8];
        b.extend_from_slice(p);
        add("journal_entry", &format!("{k:?}").to_lowercase(), b);
    }

    // Store objects.
    let (r1, _) = sf::encode_record(3, 42, 3, &extents(), &[0x5a; 64]);
    let (r2, _) = sf::encode_record(3, 43, 0, &[], &[]);
    add("pack_record", "record", r1.clone());
    let mut pack = sf::pack_header(&DISK, 3);
    let mut dir = Vec::new();
    for (seq, r) in [(42, &r1), (43, &r2)] {
        let rec = sf::decode_record(r).expect("a seed record");
        dir.push(sf::DirEntry {
            seq,
            offset: pack.len() as u64,
            length: r.len() as u64,
            crc: rec.crc,
        });
        pack.extend_from_slice(r);
    }
    pack.extend_from_slice(&sf::pack_footer(&dir));
    add("pack", "two-records", pack);
    add("pack", "empty", {
        let mut p = sf::pack_header(&DISK, 3);
        p.extend_from_slice(&sf::pack_footer(&[]));
        p
    });
    let seg = sf::Segment {
        epoch: 3,
        first: 42,
        last: 44,
        generation: 1,
        entries: (42..=44)
            .map(|seq| sf::IndexEntry {
                loc: location(seq, "p1.pack"),
                flags: 3,
                extents: extents()[..(seq - 41) as usize].to_vec(),
            })
            .collect(),
    };
    let idx_name = sf::index_name(&DISK, 3, 42, 44, 1);
    add(
        "index_segment",
        "segment",
        named(&idx_name, &sf::encode_segment(&DISK, &seg)),
    );
    let ckpt = sf::Checkpoint {
        epoch: 3,
        seq: 44,
        generation: 2,
        locations: vec![location(42, "p1.pack"), location(44, "p2.pack")],
        runs: vec![
            (0, 8, sf::RunTarget::Data { seq: 42, offset: 0 }),
            (8, 16, sf::RunTarget::Zero { seq: 43 }),
            (100, 4, sf::RunTarget::Discard { seq: 44 }),
        ],
    };
    let ckpt_name = sf::checkpoint_name(&DISK, 3, 44, 2);
    add(
        "checkpoint",
        "checkpoint",
        named(&ckpt_name, &sf::encode_checkpoint(&DISK, &ckpt)),
    );
    // Cut 6 is a member of a consistency group's point (stamped), 5 and 7 are not.
    let entries: Vec<_> = (5..=7)
        .map(|id| sf::CatalogEntry {
            cut: ripcord_store::CutInfo {
                group: (id == 6).then(|| group_stamp(id)),
                ..cut_info(id, 40 + id)
            },
            committed_ns: 1_700_000_001_000_000_000 + id,
        })
        .collect();
    let unstamped: Vec<_> = entries
        .iter()
        .map(|x| sf::CatalogEntry {
            cut: ripcord_store::CutInfo {
                group: None,
                ..x.cut
            },
            ..*x
        })
        .collect();
    let cat_name = sf::catalog_name(&DISK, 3, 5, 7, 1);
    let cat_name = cat_name
        .rsplit_once('-')
        .expect("a catalog name")
        .0
        .to_owned()
        + "-0123456789abcdef.cat";
    add(
        "catalog",
        "segment",
        named(&cat_name, &sf::encode_catalog(&DISK, 3, 1, &entries)),
    );
    add(
        "catalog",
        "segment-v3",
        named(&cat_name, &sf::encode_catalog_v3(&DISK, 3, 1, &unstamped)),
    );
    add(
        "catalog",
        "legacy-cut",
        named(
            &sf::cut_name(&DISK, 3, 9),
            &sf::encode_cut(&DISK, &cut_info(9, 50)),
        ),
    );
    let info = EpochInfo {
        epoch: 3,
        machine_id: "host-01.example".into(),
        size_bytes: 64 << 30,
        sector_size: 4096,
        wrapped_key: vec![0xa5; 48],
        device: Some("/dev/vdb".into()),
    };
    add(
        "epoch",
        "epoch",
        named(&sf::epoch_name(&DISK, 3), &sf::encode_epoch(&info)),
    );
    add(
        "gc_marker",
        "marker",
        sf::encode_pending_delete(&[
            ("disks/x/packs/a.pack".into(), 17),
            ("disks/x/packs/b.pack".into(), 18),
        ]),
    );
    let names = [
        sf::pack_name(&DISK, 3, 42)
            .rsplit_once('-')
            .expect("name")
            .0
            .to_owned()
            + "-00000000000000ff.pack",
        idx_name,
        ckpt_name,
        cat_name,
        sf::cut_name(&DISK, 3, 9),
        sf::epoch_name(&DISK, 3),
        "disks/x/gc/00000000000000000017-00000000000000ff.doomed".into(),
    ];
    add("object_names", "names", names.join("\n").into_bytes());

    // Digests.
    use ripcord_digest::{Digest, DigestKey, DigestMap, DigestSlice, SliceKind};
    let digests: Vec<Digest> = (0..6u8).map(|i| Digest([i; 16])).collect();
    let slice = DigestSlice {
        kind: SliceKind::Blocks,
        region_blocks: 4,
        device_size: 6 * 4096,
        first: 0,
        digests: digests.clone(),
    };
    add("digest_slice", "blocks", slice.encode());
    let key = DigestKey::derive(b"fuzz", b"disk");
    let map = DigestMap::from_blocks(&key, 6 * 4096, 4, digests).expect("a seed map");
    add("digest_map", "blocks", map.encode());
    let regions = DigestMap::from_regions(6 * 4096, 4, vec![Digest([7; 16]); 2]).expect("a map");
    add("digest_map", "regions", regions.encode());

    // Agent.
    let mut event = Vec::new();
    for v in [123_456_789u64, 42, 2048] {
        event.extend_from_slice(&v.to_le_bytes());
    }
    for v in [8u32, 3, agent_common::op::WRITE | agent_common::op::FUA, 0] {
        event.extend_from_slice(&v.to_le_bytes());
    }
    add("change_event", "write", event);
    add("btf", "request", btf_blob());
    let cfg = ripcord_agent::replicate::config::AgentConfig::default();
    add(
        "agent_config",
        "defaults",
        toml::to_string(&cfg).expect("toml").into_bytes(),
    );
    add(
        "agent_config",
        "short",
        b"server = \"ps.example:9443\"\ndevices = [\"/dev/vdb\"]\nbatch-kib = 1024\n".to_vec(),
    );
    let mut state = ripcord_agent::replicate::state::AgentState {
        server: Some("192.0.2.1:9443".into()),
        server_name: Some("ps.example".into()),
        register_server: Some("ps.example:9444".into()),
        escrow_key: Some("ab".repeat(32)),
        ..Default::default()
    };
    state.disks.insert(
        "/dev/vdb".into(),
        ripcord_agent::replicate::state::DiskState {
            disk_id: "00112233445566778899aabbccddeeff".into(),
            epoch: 3,
        },
    );
    add(
        "agent_state",
        "state",
        serde_json::to_vec_pretty(&state).expect("json"),
    );

    // Process server.
    let ps = ripcord_process_server::config::PsConfig {
        // The default is the host's name; seeds must not depend on the machine.
        server_id: "ps-1".into(),
        ..Default::default()
    };
    add(
        "ps_config",
        "defaults",
        toml::to_string(&ps).expect("toml").into_bytes(),
    );
    add(
        "ps_config",
        "short",
        b"listen = \"0.0.0.0:9443\"\nsegment-mib = 64\nmin-free-percent = 5.0\n".to_vec(),
    );
    let mut reg = BTreeMap::new();
    reg.insert(
        "00112233445566778899aabbccddeeff".to_owned(),
        ripcord_process_server::registry::DiskRecord {
            owner: "host-01.example".into(),
            size_bytes: 64 << 30,
            sector_size: 4096,
            epoch: 3,
            wrapped_key: "a5".repeat(48),
            device: Some("/dev/vdb".into()),
        },
    );
    add(
        "ps_registry",
        "disks",
        serde_json::to_vec_pretty(&reg).expect("json"),
    );

    // Master target.
    let mut mt = ripcord_master_target::state::ApplyState::new(
        &DISK,
        Path::new("/dev/vdc"),
        "block 252:32 68719476736".into(),
    );
    mt.updated_ns = 1_700_000_000_000_000_000;
    mt.applied = Some(ripcord_master_target::state::PointRef {
        id: "3-5".into(),
        epoch: 3,
        cut_id: 5,
        seq: 44,
        time_ns: 1_700_000_000_000_000_000,
        app_consistent: true,
    });
    add(
        "mt_state",
        "applied",
        serde_json::to_vec_pretty(&mt).expect("json"),
    );

    // Deployment stores.
    let tokens = format!(
        "# ripcord bootstrap tokens v1: <id> <sha256(secret) hex> <expires unix s> <usage limit> <uses>\nabcdef {} 1900000000 1 0\n",
        "0f".repeat(32)
    );
    add("token_store", "one-token", tokens.into_bytes());
    let machines = format!(
        "# ripcord machines v1: <machine id> <sha256(certificate) hex> <registered unix s> <expires unix s> <token id|->\nhost-01.example {} 1700000000 1900000000 abcdef\nhost-02 {} 1700000000 1900000000 -\n",
        "1e".repeat(32),
        "2d".repeat(32)
    );
    add("machine_store", "two-machines", machines.into_bytes());
    s
}

/// Hostile variants of a valid seed: cut in half, a length-like field at the start of
/// the body blown up, one bit flipped in the middle.
pub fn hostile(valid: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![("truncated", valid[..valid.len() / 2].to_vec())];
    if valid.len() >= 16 {
        let mut big = valid.to_vec();
        big[valid.len() / 3..valid.len() / 3 + 4].copy_from_slice(&[0xff; 4]);
        out.push(("oversized", big));
    }
    if !valid.is_empty() {
        let mut flip = valid.to_vec();
        flip[valid.len() / 2] ^= 0x10;
        out.push(("bitflip", flip));
    }
    out
}

/// Writes every seed into `root/<target>/valid-<name>` and its hostile variants into
/// `hostile-<variant>-<name>`, replacing what was there under those names.
pub fn write_corpus(root: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for (target, name, bytes) in valid() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("valid-{name}")), &bytes)?;
        n += 1;
        for (how, b) in hostile(&bytes) {
            std::fs::write(dir.join(format!("hostile-{how}-{name}")), b)?;
            n += 1;
        }
    }
    Ok(n)
}
