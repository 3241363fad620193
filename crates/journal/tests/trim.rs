//! Trimming after upload, reopen after trim.

mod common;

use common::*;
use ripcord_journal::{Journal, JournalError, RecordType};

#[test]
fn trim_deletes_whole_uploaded_segments_and_survives_reopen() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        for i in 0..60 {
            j.append(RecordType::Batch, &payload(i, 500)).unwrap();
        }
        j.sync().unwrap();
        let files = segment_files(dir.path());
        assert!(files.len() >= 5);
        let n0 = record_extents(&files[0]).len() as u64;
        let n1 = record_extents(&files[1]).len() as u64;

        // One short of segment 1's last record: nothing may be deleted.
        assert_eq!(j.trim_through(n0 - 1).unwrap(), 0);
        assert!(files[0].exists());
        // Trimming through a sequence inside segment 2 deletes only segment 1.
        assert_eq!(j.trim_through(n0 + 1).unwrap(), 1);
        assert_eq!(j.first_seq(), n0 + 1);
        assert!(!files[0].exists() && files[1].exists());
        // Through the last record of segment 2 exactly: deletes it.
        assert_eq!(j.trim_through(n0 + n1).unwrap(), 1);
        assert!(!files[1].exists());
        assert_eq!(j.first_seq(), n0 + n1 + 1);
        assert_eq!(j.metrics().segments_trimmed, 2);
        let e = j.read_from(n0).unwrap_err();
        assert!(matches!(e, JournalError::Trimmed { .. }), "{e}");

        // Reader from the new first sequence sees the rest.
        let rest = read_all(&j);
        assert_eq!(rest.len() as u64, 60 - n0 - n1);
        assert_eq!(rest[0].seq, n0 + n1 + 1);
        assert_eq!(rest[0].payload, payload(n0 + n1, 500));

        // A reader opened before a trim keeps working (holds its own handles).
        let reader = j.read_from(j.first_seq()).unwrap();
        // Trimming everything never deletes the active segment.
        j.trim_through(u64::MAX).unwrap();
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(reader.count() as u64, 60 - n0 - n1);
        drop(j);

        let mut j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        let first = j.first_seq();
        let got = read_all(&j);
        assert_eq!(got.first().unwrap().seq, first);
        assert_eq!(got.last().unwrap().seq, 60);
        // Appends continue with the next sequence.
        let a = j.append(RecordType::Cut, b"").unwrap();
        assert_eq!(a.first_seq, 61);
        j.sync().unwrap();
    }
}

#[test]
fn trim_below_first_segment_end_is_noop() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        for i in 0..20 {
            j.append(RecordType::Batch, &payload(i, 500)).unwrap();
        }
        j.sync().unwrap();
        let before = segment_files(dir.path());
        assert_eq!(j.trim_through(0).unwrap(), 0);
        assert_eq!(j.trim_through(1).unwrap(), 0);
        assert_eq!(segment_files(dir.path()), before);
    }
}
