//! Round trip, durable-vs-written, reader bounds, engine selection, locking.

mod common;

use common::*;
use proptest::prelude::*;
use ripcord_journal::{
    EngineChoice, EngineKind, ErrorAction, Journal, JournalError, MAX_RECORD_PAYLOAD, RecordType,
};

fn roundtrip_case(engine: EngineChoice, recs: &[(u8, usize)], batch: usize, seg: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    {
        let mut j = Journal::open(dir.path(), cfg(engine, seg)).unwrap();
        assert!(j.recovery_report().created);
        let datas: Vec<(RecordType, Vec<u8>)> = recs
            .iter()
            .enumerate()
            .map(|(i, &(k, len))| (kind_of(k), payload(i as u64, len)))
            .collect();
        for chunk in datas.chunks(batch.max(1)) {
            if chunk.len() == 1 {
                let a = j.append(chunk[0].0, &chunk[0].1).unwrap();
                assert_eq!(a.count, 1);
            } else {
                let refs: Vec<(RecordType, &[u8])> =
                    chunk.iter().map(|(k, p)| (*k, p.as_slice())).collect();
                j.append_many(&refs).unwrap();
            }
        }
        let d = j.sync().unwrap();
        assert_eq!(d, j.written());
        assert_eq!(d.next_seq, 1 + recs.len() as u64);
        let m = j.metrics();
        assert_eq!(m.records_appended, recs.len() as u64);
        let bytes: u64 = recs
            .iter()
            .map(|&(_, l)| ripcord_journal::record_size(l))
            .sum();
        assert_eq!(m.bytes_written, bytes);
        assert_eq!(m.live_segments, segment_files(dir.path()).len());
        for (i, (k, p)) in datas.into_iter().enumerate() {
            expected.push((i as u64 + 1, k, p));
        }
    }
    let j = Journal::open(dir.path(), cfg(engine, seg)).unwrap();
    let rep = j.recovery_report();
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(rep.records, recs.len() as u64);
    let got = read_all(&j);
    assert_eq!(got.len(), expected.len());
    for (r, (seq, k, p)) in got.iter().zip(&expected) {
        assert_eq!(r.seq, *seq);
        assert_eq!(r.kind, *k);
        assert_eq!(&r.payload, p);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn roundtrip_random_records(
        recs in prop::collection::vec((0u8..3, prop_oneof![0usize..64, 0usize..20_000]), 1..80),
        batch in 1usize..9,
        seg in prop_oneof![Just(4096u64), Just(64 * 1024), Just(64 << 20)],
    ) {
        for engine in engines() {
            roundtrip_case(engine, &recs, batch, seg);
        }
    }
}

#[test]
fn max_record_size_enforced() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), cfg(engine, 64 << 20)).unwrap();
        let big = vec![0xA5u8; MAX_RECORD_PAYLOAD];
        j.append(RecordType::Batch, &big).unwrap();
        let too_big = vec![0u8; MAX_RECORD_PAYLOAD + 1];
        let e = j.append(RecordType::Batch, &too_big).unwrap_err();
        assert!(matches!(e, JournalError::RecordTooLarge { .. }), "{e}");
        assert_eq!(e.action(), ErrorAction::FixCaller);
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(dir.path(), cfg(engine, 64 << 20)).unwrap();
        let got = read_all(&j);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, big);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    /// Durable never runs ahead of written, advances only on sync (or the
    /// seal at roll-over, which syncs), and readers only see durable records.
    #[test]
    fn durable_never_exceeds_synced(ops in prop::collection::vec(0u8..4, 1..60)) {
        for engine in engines() {
            let dir = tempfile::tempdir().unwrap();
            let (eng, ctl) = FaultyEngine::wrap(engine);
            let mut j = Journal::open_with_engine(dir.path(), cfg(engine, 8192), eng).unwrap();
            let mut synced_next = j.durable().next_seq;
            for (i, op) in ops.iter().enumerate() {
                let before_written = j.written().next_seq;
                let syncs_before = ctl.lock().unwrap().syncs;
                if *op == 3 {
                    let d = j.sync().unwrap();
                    synced_next = before_written;
                    prop_assert_eq!(d.next_seq, before_written);
                } else {
                    j.append(kind_of(*op), &payload(i as u64, 1500)).unwrap();
                    if ctl.lock().unwrap().syncs > syncs_before {
                        // roll-over sealed (synced) what was written before this append
                        synced_next = before_written;
                    }
                }
                prop_assert_eq!(j.durable().next_seq, synced_next);
                prop_assert!(j.durable().next_seq <= j.written().next_seq);
                let visible = j.read_from(j.first_seq()).unwrap().count() as u64;
                prop_assert_eq!(visible, j.durable().next_seq - j.first_seq());
            }
        }
    }
}

#[test]
fn sync_without_new_writes_is_noop() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), cfg(engine, 1 << 20)).unwrap();
        j.sync().unwrap();
        assert_eq!(j.metrics().syncs, 0);
        j.append(RecordType::Cut, b"").unwrap();
        assert_eq!(j.durable().next_seq, 1);
        assert_eq!(j.written().next_seq, 2);
        j.sync().unwrap();
        j.sync().unwrap();
        assert_eq!(j.metrics().syncs, 1);
        assert_eq!(j.durable().next_seq, 2);
    }
}

#[test]
fn read_from_middle_and_bounds() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), cfg(engine, 4096)).unwrap();
        for i in 0..50u64 {
            j.append(RecordType::Batch, &payload(i, 300)).unwrap();
        }
        j.sync().unwrap();
        let from30: Vec<_> = j
            .read_from(30)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(from30.len(), 21);
        assert_eq!(from30[0].seq, 30);
        assert_eq!(from30[0].payload, payload(29, 300));
        assert_eq!(j.read_from(51).unwrap().count(), 0);
        let e = j.read_from(52).unwrap_err();
        assert!(matches!(e, JournalError::BeyondEnd { .. }), "{e}");
        let e = j.read_from(0).unwrap_err();
        assert!(matches!(e, JournalError::Trimmed { .. }), "{e}");
    }
}

#[test]
fn engine_selection() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), cfg(EngineChoice::Sync, 1 << 20)).unwrap();
    assert_eq!(j.engine_kind(), EngineKind::Sync);
    drop(j);
    if engines().contains(&EngineChoice::IoUring) {
        let j = Journal::open(dir.path(), cfg(EngineChoice::IoUring, 1 << 20)).unwrap();
        assert_eq!(j.engine_kind(), EngineKind::IoUring);
        drop(j);
        let j = Journal::open(dir.path(), cfg(EngineChoice::Auto, 1 << 20)).unwrap();
        assert_eq!(j.engine_kind(), EngineKind::IoUring);
    }
}

#[test]
fn second_open_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let _j = Journal::open(dir.path(), cfg(EngineChoice::Sync, 1 << 20)).unwrap();
    let e = Journal::open(dir.path(), cfg(EngineChoice::Sync, 1 << 20)).unwrap_err();
    assert!(matches!(e, JournalError::Locked { .. }), "{e}");
}

#[test]
fn invalid_config_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let e = Journal::open(dir.path(), cfg(EngineChoice::Sync, 100)).unwrap_err();
    assert!(matches!(e, JournalError::InvalidConfig(_)), "{e}");
}

#[test]
fn space_status_and_back_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(EngineChoice::Sync, 1 << 20);
    c.space.min_free_bytes = 0;
    c.space.min_free_percent = 0.0;
    let j = Journal::open(dir.path(), c).unwrap();
    let s = j.check_space().unwrap();
    assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes && s.accepting());
    drop(j);
    c.space.min_free_bytes = u64::MAX;
    let j = Journal::open(dir.path(), c).unwrap();
    assert!(j.space_status().unwrap().below_threshold);
    let e = j.check_space().unwrap_err();
    assert!(matches!(e, JournalError::LowSpace { .. }), "{e}");
    assert!(e.is_back_pressure());
}
