//! Fuzz seed corpus: generation and replay under plain `cargo test`.
//!
//! `PROTO_WRITE_CORPUS=1 cargo test --test corpus` (re)writes the valid seeds
//! into `fuzz/corpus/decode_frame/` and `fuzz/corpus/decode_stream/`. The
//! normal run checks that the files on disk match the generator and replays
//! every file in `fuzz/corpus/*/` (including ones cargo-fuzz added) through
//! the decoders: no panic, and `valid-*` seeds must round-trip.

use ripcord_proto::wire::*;
use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
}

fn seed_messages() -> Vec<(&'static str, Message)> {
    let disk = DiskId(*b"corpus-disk-0001");
    vec![
        (
            "hello",
            Message::Hello(Hello {
                protocol_version: 1,
                machine_id: "host-01.example".into(),
                agent_version: "ripcord-agent 0.1.0".into(),
            }),
        ),
        (
            "hello_ack",
            Message::HelloAck(HelloAck {
                escrow_key: [0; 32],
                protocol_version: 1,
                server_id: "ps-1".into(),
            }),
        ),
        (
            "protect_disk",
            Message::ProtectDisk(ProtectDisk {
                wrapped_key: vec![],
                disk_id: disk,
                size_bytes: 64 << 30,
                sector_size: 4096,
                epoch: 3,
            }),
        ),
        (
            "disk_accepted",
            Message::DiskAccepted(DiskAccepted {
                disk_id: disk,
                epoch: 3,
                resume_from_seq: 42,
            }),
        ),
        (
            "batch",
            Message::Batch(Batch {
                disk_id: disk,
                epoch: 3,
                first_seq: 42,
                last_seq: 44,
                extents: vec![
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
                ],
                flags: FLAG_COMPRESSED | FLAG_SEALED,
                payload: (0..=255u8).collect(),
            }),
        ),
        (
            "cut",
            Message::Cut(Cut {
                mono_ns: 0,
                disk_id: disk,
                epoch: 3,
                seq: 44,
                time_ns: 1_700_000_000_000_000_000,
                kind: CutKind::App,
                id: 5,
                mac: *b"corpus-cut-mac-0123456789abcdef!",
            }),
        ),
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
    ]
}

/// Seed files per corpus directory: (dir, file name, bytes).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stream = Vec::new();
    for (name, m) in seed_messages() {
        let f = m.to_frame().unwrap();
        stream.extend_from_slice(&f);
        out.push(("decode_frame", format!("valid-{name}.bin"), f));
    }
    // decode_stream: first byte = chunk size, then a stream of frames.
    let mut s = vec![7u8];
    s.extend_from_slice(&stream);
    out.push(("decode_stream", "valid-all-messages.bin".into(), s));
    out
}

fn decode_all(mut bytes: &[u8]) -> Result<(Vec<Message>, usize), DecodeError> {
    let mut msgs = Vec::new();
    let mut used = 0;
    while let Some((m, n)) = decode_frame(bytes)? {
        msgs.push(m);
        bytes = &bytes[n..];
        used += n;
    }
    Ok((msgs, used))
}

#[test]
fn corpus_files_match_generator() {
    let write = std::env::var_os("PROTO_WRITE_CORPUS").is_some();
    for (dir, name, bytes) in seeds() {
        let path = corpus_root().join(dir).join(&name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with PROTO_WRITE_CORPUS=1 cargo test --test corpus",
                path.display()
            )
        });
        assert_eq!(
            on_disk,
            bytes,
            "{} is stale; regenerate with PROTO_WRITE_CORPUS=1",
            path.display()
        );
    }
}

#[test]
fn replay_every_corpus_file() {
    let mut files = 0;
    let mut valid = 0;
    for dir in std::fs::read_dir(corpus_root()).expect("fuzz/corpus exists") {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let stream = dir.file_name().unwrap() == "decode_stream";
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            files += 1;
            let input = if stream {
                data.get(1..).unwrap_or(&[])
            } else {
                &data[..]
            };
            // Must not panic whatever the content.
            let result = decode_all(input);
            // Streaming through FrameDecoder gives the same messages.
            let mut dec = FrameDecoder::new();
            let chunk = usize::from(*data.first().unwrap_or(&1)).max(1);
            let mut streamed = Vec::new();
            'feed: for piece in input.chunks(chunk) {
                dec.push(piece);
                loop {
                    match dec.next_message() {
                        Ok(Some(m)) => streamed.push(m),
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
            let name = path.file_name().unwrap().to_string_lossy();
            if name.starts_with("valid-") {
                valid += 1;
                let (msgs, used) = result.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(used, input.len(), "{}: undecoded tail", path.display());
                assert!(!msgs.is_empty());
                let mut again = Vec::new();
                for m in &msgs {
                    m.encode_frame(&mut again).unwrap();
                }
                assert_eq!(again, input, "{}: round trip differs", path.display());
                assert_eq!(streamed, msgs, "{}: streaming differs", path.display());
            } else if let Ok((msgs, _)) = result {
                assert_eq!(streamed, msgs, "{}: streaming differs", path.display());
            }
        }
    }
    assert!(
        valid >= seeds().len(),
        "only {valid} valid seeds found in {files} files"
    );
}
