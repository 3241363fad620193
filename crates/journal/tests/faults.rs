//! Fault injection through a wrapping engine: ENOSPC, failed fsync, short
//! writes, EIO. Run against both real engines underneath.

mod common;

use common::*;
use ripcord_journal::{ErrorAction, IoOp, Journal, JournalError, RecordType};

#[test]
fn enospc_mid_append_is_back_pressure_and_rolled_back() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (eng, ctl) = FaultyEngine::wrap(engine);
        let mut j = Journal::open_with_engine(dir.path(), cfg(engine, 1 << 20), eng).unwrap();
        for i in 0..5 {
            j.append(RecordType::Batch, &payload(i, 1000)).unwrap();
        }
        j.sync().unwrap();
        let written = j.written();
        let seg = segment_files(dir.path()).pop().unwrap();

        // Disk fills up 1500 bytes into a 3-record batch: partial bytes land, then ENOSPC.
        ctl.lock().unwrap().space_budget = Some(1500);
        let batch: Vec<Vec<u8>> = (5..8).map(|i| payload(i, 1000)).collect();
        let refs: Vec<(RecordType, &[u8])> = batch
            .iter()
            .map(|p| (RecordType::Batch, p.as_slice()))
            .collect();
        let e = j.append_many(&refs).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::NoSpace {
                    op: IoOp::Write,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.action(), ErrorAction::RetryLater);
        assert!(!j.is_poisoned());
        assert_eq!(j.written(), written);
        assert_eq!(j.durable(), written);
        // The partial record bytes were cut off again.
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), written.offset);
        // Single append also refused while full.
        let e = j.append(RecordType::Cut, b"x").unwrap_err();
        assert!(e.is_back_pressure());

        // Space frees up: the same batch goes through with the same sequences.
        ctl.lock().unwrap().space_budget = None;
        let a = j.append_many(&refs).unwrap();
        assert_eq!(a.first_seq, 6);
        j.sync().unwrap();
        drop(j);

        let j = Journal::open(dir.path(), cfg(engine, 1 << 20)).unwrap();
        assert_eq!(j.recovery_report().truncated_bytes, 0);
        let got = read_all(&j);
        assert_eq!(got.len(), 8);
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.payload, payload(i as u64, 1000));
        }
    }
}

#[test]
fn enospc_while_creating_segment_is_back_pressure() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (eng, ctl) = FaultyEngine::wrap(engine);
        let mut j = Journal::open_with_engine(dir.path(), cfg(engine, 4096), eng).unwrap();
        j.append(RecordType::Batch, &payload(0, 3000)).unwrap();
        // Next append needs a roll-over; the new segment's header write fails.
        ctl.lock().unwrap().space_budget = Some(0);
        let e = j.append(RecordType::Batch, &payload(1, 3000)).unwrap_err();
        assert!(e.is_back_pressure(), "{e:?}");
        // The roll-over sealed (synced) the old segment first.
        assert_eq!(j.durable().next_seq, 2);
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .ends_with(".tmp"))
        );
        ctl.lock().unwrap().space_budget = None;
        j.append(RecordType::Batch, &payload(1, 3000)).unwrap();
        j.sync().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 2);
        drop(j);
        let j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        assert_eq!(read_all(&j).len(), 2);
    }
}

#[test]
fn failed_fsync_is_fatal_and_never_retried() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (eng, ctl) = FaultyEngine::wrap(engine);
        let mut j = Journal::open_with_engine(dir.path(), cfg(engine, 1 << 20), eng).unwrap();
        j.append(RecordType::Batch, b"durable").unwrap();
        let durable = j.sync().unwrap();
        j.append(RecordType::Batch, b"lost?").unwrap();
        ctl.lock().unwrap().fail_sync = true;
        let e = j.sync().unwrap_err();
        assert!(matches!(e, JournalError::SyncFailed { .. }), "{e:?}");
        assert!(e.is_fatal());
        assert!(e.to_string().contains("poisoned"));
        assert!(j.is_poisoned());
        assert_eq!(
            j.durable(),
            durable,
            "durable must not advance on failed sync"
        );
        // Even once the device "recovers", the journal refuses to pretend.
        ctl.lock().unwrap().fail_sync = false;
        let e = j.sync().unwrap_err();
        assert!(matches!(e, JournalError::Poisoned { .. }), "{e:?}");
        let e = j.append(RecordType::Batch, b"more").unwrap_err();
        assert!(matches!(e, JournalError::Poisoned { .. }), "{e:?}");
        assert_eq!(e.action(), ErrorAction::ReopenJournal);
        assert!(j.read_from(1).unwrap().count() == 1);
        drop(j);
        // Reopen recovers from what is on disk; the durable record is there.
        let j = Journal::open(dir.path(), cfg(engine, 1 << 20)).unwrap();
        let got = read_all(&j);
        assert!(!got.is_empty());
        assert_eq!(got[0].payload, b"durable");
    }
}

#[test]
fn failed_fsync_during_rollover_is_fatal() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (eng, ctl) = FaultyEngine::wrap(engine);
        let mut j = Journal::open_with_engine(dir.path(), cfg(engine, 4096), eng).unwrap();
        j.append(RecordType::Batch, &payload(0, 3000)).unwrap();
        ctl.lock().unwrap().fail_sync = true;
        let e = j.append(RecordType::Batch, &payload(1, 3000)).unwrap_err();
        assert!(matches!(e, JournalError::SyncFailed { .. }), "{e:?}");
        assert!(j.is_poisoned());
    }
}

#[test]
fn short_writes_are_completed() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (eng, ctl) = FaultyEngine::wrap(engine);
        ctl.lock().unwrap().short_write_max = Some(7);
        let mut j = Journal::open_with_engine(dir.path(), cfg(engine, 8192), eng).unwrap();
        for i in 0..20 {
            j.append(RecordType::Batch, &payload(i, 333)).unwrap();
        }
        let batch: Vec<Vec<u8>> = (20..25).map(|i| payload(i, 50)).collect();
        let refs: Vec<(RecordType, &[u8])> = batch
            .iter()
            .map(|p| (RecordType::Cut, p.as_slice()))
            .collect();
        j.append_many(&refs).unwrap();
        j.sync().unwrap();
        assert!(
            ctl.lock().unwrap().writes > 25 * 10,
            "writes were not split"
        );
        drop(j);
        let j = Journal::open(dir.path(), cfg(engine, 8192)).unwrap();
        assert_eq!(j.recovery_report().truncated_bytes, 0);
        let got = read_all(&j);
        assert_eq!(got.len(), 25);
        assert_eq!(got[3].payload, payload(3, 333));
        assert_eq!(got[22].payload, payload(22, 50));
        assert_eq!(got[22].kind, RecordType::Cut);
    }
}

#[test]
fn other_write_errors_poison() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (eng, ctl) = FaultyEngine::wrap(engine);
        let mut j = Journal::open_with_engine(dir.path(), cfg(engine, 1 << 20), eng).unwrap();
        j.append(RecordType::Batch, b"ok").unwrap();
        j.sync().unwrap();
        ctl.lock().unwrap().write_errno = Some(5); // EIO
        let e = j.append(RecordType::Batch, b"bad").unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::Io {
                    op: IoOp::Write,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.is_fatal() && j.is_poisoned());
        ctl.lock().unwrap().write_errno = None;
        assert!(matches!(
            j.append(RecordType::Batch, b"x").unwrap_err(),
            JournalError::Poisoned { .. }
        ));
    }
}
