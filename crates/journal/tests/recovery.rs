//! Recovery: torn tails, mid-log corruption, stale bytes, temp files, gaps.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use proptest::prelude::*;
use ripcord_journal::format::{encode_record, encode_segment_header};
use ripcord_journal::{
    CorruptionKind, EngineChoice, ErrorAction, Journal, JournalConfig, JournalError, RecordType,
    RecoveryMode,
};

/// Write `n` records of `len` bytes (record i has payload `payload(i, len)`), synced.
fn build(dir: &Path, engine: EngineChoice, seg: u64, n: u64, len: usize) {
    let mut j = Journal::open(dir, cfg(engine, seg)).unwrap();
    for i in 0..n {
        j.append(RecordType::Batch, &payload(i, len)).unwrap();
    }
    j.sync().unwrap();
}

fn flip_byte(path: &Path, off: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
}

fn expect_corrupt(e: JournalError, path: &Path, offset: u64) -> CorruptionKind {
    assert_eq!(e.action(), ErrorAction::NeedsOperator);
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains(&offset.to_string()),
        "message must name file and offset: {msg}"
    );
    match e {
        JournalError::Corrupt {
            path: p,
            offset: o,
            kind,
        } => {
            assert_eq!(p, path);
            assert_eq!(o, offset);
            kind
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Cut the last segment at a random point inside its last records.
    #[test]
    fn torn_tail_is_truncated_and_reported(
        n in 3u64..40,
        len in 1usize..700,
        back in 1usize..4,
        frac in 0.0f64..1.0,
        seg in prop_oneof![Just(4096u64), Just(1u64 << 20)],
    ) {
        for engine in engines() {
            let dir = tempfile::tempdir().unwrap();
            build(dir.path(), engine, seg, n, len);
            let files = segment_files(dir.path());
            let last = files.last().unwrap();
            let ext = record_extents(last);
            prop_assume!(!ext.is_empty());
            let k = back.min(ext.len());
            let region_start = ext[ext.len() - k].0;
            let file_len = std::fs::metadata(last).unwrap().len();
            let cut = region_start + ((file_len - region_start) as f64 * frac) as u64;
            let cut = cut.min(file_len - 1);
            // Records whose end is <= cut survive.
            let survivors_in_last = ext.iter().filter(|(o, l)| o + l <= cut).count() as u64;
            let boundary = ext.iter().filter(|(o, l)| o + l <= cut).map(|(o, l)| o + l).max()
                .unwrap_or(ripcord_journal::SEGMENT_HEADER_LEN as u64);
            OpenOptions::new().write(true).open(last).unwrap().set_len(cut).unwrap();

            let total_before_last = n - ext.len() as u64;
            let expected_n = total_before_last + survivors_in_last;
            {
                let mut j = Journal::open(dir.path(), cfg(engine, seg)).unwrap();
                let rep = j.recovery_report().clone();
                prop_assert_eq!(rep.truncated_bytes, cut - boundary);
                if cut > boundary {
                    prop_assert_eq!(rep.truncated_at.clone(), Some((last.clone(), boundary)));
                }
                prop_assert_eq!(j.next_seq(), expected_n + 1);
                let got = read_all(&j);
                prop_assert_eq!(got.len() as u64, expected_n);
                for (i, r) in got.iter().enumerate() {
                    prop_assert_eq!(&r.payload, &payload(i as u64, len));
                }
                // appends continue
                j.append(RecordType::Cut, b"after").unwrap();
                j.sync().unwrap();
            }
            let j = Journal::open(dir.path(), cfg(engine, seg)).unwrap();
            prop_assert_eq!(j.recovery_report().truncated_bytes, 0);
            let got = read_all(&j);
            prop_assert_eq!(got.len() as u64, expected_n + 1);
            prop_assert_eq!(&got.last().unwrap().payload, &b"after".to_vec());
        }
    }
}

#[test]
fn garbage_tail_truncated_but_strict_mode_refuses() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), engine, 1 << 20, 10, 100);
        let last = segment_files(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&last).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&payload(99, 333)).unwrap();
        drop(f);

        let mut strict = cfg(engine, 1 << 20);
        strict.recovery = RecoveryMode::Strict;
        let e = Journal::open(dir.path(), strict).unwrap_err();
        let kind = expect_corrupt(e, &last, len);
        assert_eq!(kind, CorruptionKind::TornTailInStrictMode { bytes: 333 });

        let j = Journal::open(dir.path(), cfg(engine, 1 << 20)).unwrap();
        assert_eq!(j.recovery_report().truncated_bytes, 333);
        assert_eq!(read_all(&j).len(), 10);
        assert_eq!(std::fs::metadata(&last).unwrap().len(), len);
    }
}

#[test]
fn flipped_byte_mid_last_segment_is_refused() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), engine, 1 << 20, 20, 200);
        let last = segment_files(dir.path()).pop().unwrap();
        let ext = record_extents(&last);
        let (off, _) = ext[10];
        flip_byte(&last, off + 30); // inside the payload of record 11
        let e = Journal::open(dir.path(), cfg(engine, 1 << 20)).unwrap_err();
        let kind = expect_corrupt(e, &last, off);
        assert_eq!(
            kind,
            CorruptionKind::ValidRecordAfterCorruption {
                next_valid_offset: ext[11].0
            }
        );
        // Operator override discards from the bad record on.
        let mut c = cfg(engine, 1 << 20);
        c.recovery = RecoveryMode::TruncateCorruptTail;
        let j = Journal::open(dir.path(), c).unwrap();
        assert_eq!(read_all(&j).len(), 10);
        assert!(j.recovery_report().truncated_bytes > 0);
    }
}

#[test]
fn flipped_byte_in_non_last_segment_is_refused() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), engine, 4096, 40, 500);
        let files = segment_files(dir.path());
        assert!(files.len() >= 3);
        let victim = &files[1];
        let ext = record_extents(victim);
        // Even the LAST record of a non-last segment is not a torn tail.
        let (off, _) = *ext.last().unwrap();
        flip_byte(victim, off + 25);
        for mode in [
            RecoveryMode::TolerateTornTail,
            RecoveryMode::Strict,
            RecoveryMode::TruncateCorruptTail,
        ] {
            let mut c = cfg(engine, 4096);
            c.recovery = mode;
            let e = Journal::open(dir.path(), c).unwrap_err();
            let kind = expect_corrupt(e, victim, off);
            assert_eq!(kind, CorruptionKind::BadChecksum);
        }
    }
}

#[test]
fn corrupt_segment_header_is_refused() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), engine, 4096, 20, 500);
        let files = segment_files(dir.path());
        flip_byte(&files[0], 14);
        let e = Journal::open(dir.path(), cfg(engine, 4096)).unwrap_err();
        assert_eq!(
            expect_corrupt(e, &files[0], 0),
            CorruptionKind::BadHeaderChecksum
        );
    }
}

#[test]
fn stale_bytes_from_other_segment_are_not_records() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), engine, 4096, 20, 500);
        let files = segment_files(dir.path());
        let last = files.last().unwrap().clone();
        let n_before = {
            let j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
            read_all(&j).len() as u64
        };
        let last_len = std::fs::metadata(&last).unwrap().len();

        // (a) bytes copied verbatim from segment 1 (valid CRC for segment 1).
        let seg1 = std::fs::read(&files[0]).unwrap();
        let stale = &seg1[ripcord_journal::SEGMENT_HEADER_LEN..];
        // (b) a forged record with the right next sequence number but the CRC of
        // segment 1: only the segment-number mixing rejects it.
        let forged = encode_record(1, RecordType::Batch, n_before + 1, b"stale");
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&forged).unwrap();
        f.write_all(stale).unwrap();
        drop(f);

        let j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        let rep = j.recovery_report();
        assert_eq!(rep.truncated_bytes, (forged.len() + stale.len()) as u64);
        assert_eq!(rep.truncated_at, Some((last.clone(), last_len)));
        assert_eq!(read_all(&j).len() as u64, n_before);
        drop(j);

        // The same forged record with the right segment number would be accepted.
        let seg_no: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let good = encode_record(seg_no, RecordType::Batch, n_before + 1, b"fresh");
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&good).unwrap();
        drop(f);
        let j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        assert_eq!(j.recovery_report().truncated_bytes, 0);
        assert_eq!(read_all(&j).len() as u64, n_before + 1);
    }
}

#[test]
fn stale_bytes_in_non_last_segment_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), EngineChoice::Sync, 4096, 20, 500);
    let files = segment_files(dir.path());
    let len0 = std::fs::metadata(&files[0]).unwrap().len();
    let seg2 = std::fs::read(&files[1]).unwrap();
    let mut f = OpenOptions::new().append(true).open(&files[0]).unwrap();
    f.write_all(&seg2[ripcord_journal::SEGMENT_HEADER_LEN..])
        .unwrap();
    drop(f);
    let e = Journal::open(dir.path(), cfg(EngineChoice::Sync, 4096)).unwrap_err();
    assert_eq!(
        expect_corrupt(e, &files[0], len0),
        CorruptionKind::BadChecksum
    );
}

#[test]
fn only_files_that_are_neither_segments_nor_the_owners_are_reported_unknown() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), EngineChoice::Sync, 4096, 5, 500);
    std::fs::write(dir.path().join("owner-state.json"), b"{}").unwrap();
    std::fs::write(dir.path().join(".owner-state.json.tmp.77.1"), b"{").unwrap();
    std::fs::write(dir.path().join("stray.txt"), b"?").unwrap();
    let j = Journal::open(
        dir.path(),
        JournalConfig {
            companion_files: &["owner-state.json"],
            ..cfg(EngineChoice::Sync, 4096)
        },
    )
    .unwrap();
    assert_eq!(
        j.recovery_report().unknown_files,
        vec![dir.path().join("stray.txt")],
        "the owner's own files are not unknown; a stray one is"
    );
    assert_eq!(read_all(&j).len(), 5);
    assert!(dir.path().join("owner-state.json").exists(), "left alone");
}

#[test]
fn leftover_temp_files_are_cleaned_up() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path(), engine, 4096, 20, 500);
        let files = segment_files(dir.path());
        let next_no = files.len() as u64 + 1;
        // Crash after writing the header of the next segment but before rename.
        let tmp = dir.path().join(format!("{next_no:020}.seg.tmp"));
        std::fs::write(&tmp, encode_segment_header(next_no, 999)).unwrap();
        // Crash right after creating an empty temp file.
        let tmp2 = dir.path().join(format!("{:020}.seg.tmp", next_no + 1));
        std::fs::write(&tmp2, b"").unwrap();

        let mut j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        let mut removed = j.recovery_report().removed_temp_files.clone();
        removed.sort();
        assert_eq!(removed, vec![tmp.clone(), tmp2.clone()]);
        assert!(!tmp.exists() && !tmp2.exists());
        // Rolling over creates that segment number properly.
        for i in 0..10 {
            j.append(RecordType::Batch, &payload(100 + i, 500)).unwrap();
        }
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        assert!(segment_files(dir.path()).len() > files.len());
        assert_eq!(read_all(&j).len(), 30);
        assert!(j.recovery_report().removed_temp_files.is_empty());
    }
}

#[test]
fn missing_segment_detected() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), EngineChoice::Sync, 4096, 40, 500);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    std::fs::remove_file(&files[1]).unwrap();
    let e = Journal::open(dir.path(), cfg(EngineChoice::Sync, 4096)).unwrap_err();
    assert!(
        matches!(&e, JournalError::MissingSegment { path, expected: 2, found: 3 } if path == &files[2]),
        "{e:?}"
    );
    assert_eq!(e.action(), ErrorAction::NeedsOperator);
}

#[test]
fn sequence_gap_between_segments_detected() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), EngineChoice::Sync, 4096, 40, 500);
    let files = segment_files(dir.path());
    let n2 = record_extents(&files[1]).len() as u64;
    let n1 = record_extents(&files[0]).len() as u64;
    // Rewrite segment 3's header to claim it starts 5 sequences later.
    let hdr = encode_segment_header(3, 1 + n1 + n2 + 5);
    let f = OpenOptions::new().write(true).open(&files[2]).unwrap();
    f.write_all_at(&hdr, 0).unwrap();
    drop(f);
    let e = Journal::open(dir.path(), cfg(EngineChoice::Sync, 4096)).unwrap_err();
    match &e {
        JournalError::SequenceGap {
            path,
            expected,
            found,
        } => {
            assert_eq!(path, &files[2]);
            assert_eq!(*expected, 1 + n1 + n2);
            assert_eq!(*found, 1 + n1 + n2 + 5);
        }
        other => panic!("expected SequenceGap, got {other:?}"),
    }
}

#[test]
fn sequence_mismatch_inside_segment_refused() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), EngineChoice::Sync, 1 << 20, 5, 10);
    let last = segment_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    // Valid CRC for this segment, but sequence 42 instead of 6.
    let rec = encode_record(1, RecordType::Batch, 42, b"x");
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(&rec).unwrap();
    drop(f);
    let e = Journal::open(dir.path(), cfg(EngineChoice::Sync, 1 << 20)).unwrap_err();
    assert_eq!(
        expect_corrupt(e, &last, len),
        CorruptionKind::SequenceMismatch {
            expected: 6,
            found: 42
        }
    );
}

#[test]
fn reader_detects_corruption_after_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), cfg(EngineChoice::Sync, 1 << 20)).unwrap();
    for i in 0..5 {
        j.append(RecordType::Batch, &payload(i, 100)).unwrap();
    }
    j.sync().unwrap();
    let last = segment_files(dir.path()).pop().unwrap();
    let ext = record_extents(&last);
    flip_byte(&last, ext[2].0 + 40);
    let res: Vec<_> = j.read_from(1).unwrap().collect();
    assert_eq!(res.len(), 3);
    assert!(res[0].is_ok() && res[1].is_ok());
    let e = res.into_iter().nth(2).unwrap().unwrap_err();
    assert_eq!(
        expect_corrupt(e, &last, ext[2].0),
        CorruptionKind::BadChecksum
    );
}

/// Zeroes the 4 KiB-aligned page that starts at or after `from` (a page a power cut left
/// unwritten while later ones persisted).
fn unwrite_page_after(path: &Path, from: u64) -> u64 {
    let page = from.next_multiple_of(4096);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0u8; 4096], page).unwrap();
    page
}

/// Appends `n` records of 10 000 bytes, numbered from `first`, then syncs if asked.
fn group(j: &mut Journal, first: u64, n: u64, sync: bool) {
    for i in first..first + n {
        j.append(RecordType::Batch, &payload(i, 10_000)).unwrap();
    }
    if sync {
        j.sync().unwrap();
    }
}

#[test]
fn a_torn_group_commit_whose_later_pages_persisted_is_truncated_not_refused() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path(), cfg(engine, 8 << 20)).unwrap();
            group(&mut j, 0, 5, true); // acknowledged
            group(&mut j, 5, 6, false); // the power cut comes before its fdatasync
        }
        let last = segment_files(dir.path()).pop().unwrap();
        let ext = record_extents(&last);
        // Record 7 (the second of the unfinished group) lost a page; 8..=11 persisted.
        let page = unwrite_page_after(&last, ext[6].0);
        assert!(
            page + 4096 <= ext[6].0 + ext[6].1,
            "the page must lie inside record 7"
        );
        let j = Journal::open(dir.path(), cfg(engine, 8 << 20))
            .expect("a torn group commit must not refuse the open");
        let records = read_all(&j);
        assert_eq!(records.len(), 6, "records 1..=6 precede the tear");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(
                r.payload,
                payload(i as u64, 10_000),
                "record {} changed",
                i + 1
            );
        }
        let report = j.recovery_report();
        assert_eq!(report.dropped_after_tear, 4, "{report:?}");
        assert!(report.truncated_bytes > 0);
    }
}

#[test]
fn an_unwritten_page_in_an_acknowledged_record_is_refused() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path(), cfg(engine, 8 << 20)).unwrap();
            group(&mut j, 0, 5, true);
            group(&mut j, 5, 3, true);
            group(&mut j, 8, 2, false);
        }
        let last = segment_files(dir.path()).pop().unwrap();
        let ext = record_extents(&last);
        // Record 3 was durable before group 2 was appended: group 2's headers say so.
        unwrite_page_after(&last, ext[2].0);
        let e = Journal::open(dir.path(), cfg(engine, 8 << 20)).unwrap_err();
        let kind = expect_corrupt(e, &last, ext[2].0);
        assert_eq!(
            kind,
            CorruptionKind::ValidRecordAfterCorruption {
                next_valid_offset: ext[5].0
            },
            "damage to an acknowledged record must refuse, naming the first record that \
             shows it was durable (record 6, the first of the next group commit)"
        );
    }
}
