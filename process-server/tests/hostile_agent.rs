//! Attacker: a registered agent writing its own disk, sending frames the target store or
//! failover would refuse later. Each is refused with a named error, nothing reaches the
//! journal, and the disk's durable state is unchanged, so the uploader never meets them.

use ripcord_journal::{JournalConfig, SpaceThresholds};
use ripcord_process_server::disk::DiskCore;
use ripcord_proto::{
    Batch, DiskId, DurableState, ErrorCode, Extent, ExtentKind, FLAG_SEALED, Message, ProtectDisk,
};

const DISK: DiskId = DiskId([9; 16]);

fn batch(epoch: u64, first: u64, last: u64, flags: u32, extents: Vec<Extent>) -> Batch {
    Batch {
        disk_id: DISK,
        epoch,
        first_seq: first,
        last_seq: last,
        extents,
        flags,
        payload: vec![0xab; 64],
    }
}

fn data(sector: u64, sectors: u32) -> Extent {
    Extent {
        sector,
        sectors,
        kind: ExtentKind::Data,
    }
}

fn framed(b: Batch) -> (Message, Vec<u8>) {
    let msg = Message::Batch(b);
    let raw = msg.to_frame().unwrap();
    (msg, raw)
}

/// Small segments, and no free-space floor: this test is about frames, not back-pressure
/// (a nearly full disk must not make it wait).
fn journal_config() -> JournalConfig {
    JournalConfig {
        segment_size: 1 << 20,
        space: SpaceThresholds {
            min_free_bytes: 0,
            min_free_percent: 0.0,
        },
        ..JournalConfig::default()
    }
}

fn journal_records(core: &DiskCore) -> usize {
    let j = core.journal();
    j.read_from(j.first_seq()).unwrap().count()
}

#[test]
fn frames_the_store_would_refuse_are_refused_at_ingest_and_never_journaled() {
    let cache = tempfile::tempdir().unwrap();
    let mut core = DiskCore::open(cache.path(), DISK, journal_config()).unwrap();
    let pd = ProtectDisk {
        disk_id: DISK,
        size_bytes: 1 << 20,
        sector_size: 512,
        epoch: 1,
        wrapped_key: vec![1; 48],
    };
    let raw = Message::ProtectDisk(pd.clone()).to_frame().unwrap();
    core.protect(&pd, &raw, false).unwrap().unwrap();
    let applied = core
        .apply(&[framed(batch(1, 1, 1, FLAG_SEALED, vec![data(0, 8)]))])
        .unwrap();
    assert!(applied.error.is_none());
    let durable = DurableState {
        epoch: 1,
        durable_seq: 1,
        last_cut: None,
    };
    assert_eq!(core.durable_state(), durable);
    let records = journal_records(&core);

    for (hostile, why) in [
        (
            batch(1, 2, 9, FLAG_SEALED, vec![data(0, 8)]),
            "exactly one sequence",
        ),
        (batch(1, 2, 2, FLAG_SEALED, vec![]), "no extent"),
        (
            batch(1, 2, 2, FLAG_SEALED, vec![data(2044, 8)]),
            "outside the disk",
        ),
        (batch(1, 2, 2, 0, vec![data(0, 8)]), "not sealed"),
        (
            batch(5, 1, 1, FLAG_SEALED, vec![data(0, 8)]),
            "epoch 5 arrived before its ProtectDisk",
        ),
    ] {
        let applied = core.apply(&[framed(hostile)]).unwrap();
        let err = applied.error.expect("a hostile frame was accepted");
        assert!(
            matches!(err.code, ErrorCode::BadFrame | ErrorCode::OutOfOrder),
            "{err:?}"
        );
        assert!(err.message.contains(why), "{why}: {}", err.message);
        assert_eq!(journal_records(&core), records, "{why}: journaled");
        assert_eq!(core.durable_state(), durable, "{why}: state changed");
    }

    // The disk goes on from where it was: the next good batch is appended and durable.
    let applied = core
        .apply(&[framed(batch(1, 2, 2, FLAG_SEALED, vec![data(8, 8)]))])
        .unwrap();
    assert!(applied.error.is_none(), "{:?}", applied.error);
    assert_eq!(core.durable_state().durable_seq, 2);
    assert_eq!(journal_records(&core), records + 1);
}

#[test]
fn a_malformed_protect_disk_starts_no_epoch() {
    let cache = tempfile::tempdir().unwrap();
    let mut core = DiskCore::open(cache.path(), DISK, journal_config()).unwrap();
    let pd = ProtectDisk {
        disk_id: DISK,
        size_bytes: 1000,
        sector_size: 512,
        epoch: 3,
        wrapped_key: vec![1; 48],
    };
    let raw = Message::ProtectDisk(pd.clone()).to_frame().unwrap();
    let err = core.protect(&pd, &raw, false).unwrap().unwrap_err();
    assert!(
        err.message.contains("multiple of its sector size"),
        "{}",
        err.message
    );
    assert_eq!(core.durable_state().epoch, 0);
    assert_eq!(journal_records(&core), 0);
    // Without an accepted ProtectDisk no batch is taken either.
    let applied = core
        .apply(&[framed(batch(3, 1, 1, FLAG_SEALED, vec![data(0, 1)]))])
        .unwrap();
    assert!(applied.error.is_some());
    assert_eq!(journal_records(&core), 0);
}

/// Attacker (or a confused agent): a stream that asks to continue an epoch the server
/// does not hold is refused with `CannotContinue` (never started anew: the store may hold
/// that epoch already), and a `ProtectDisk` of the current epoch with another data key
/// but no `ContinueEpoch` is refused; neither reaches the journal.
#[test]
fn epochs_are_continued_only_when_held_and_asked_for() {
    let cache = tempfile::tempdir().unwrap();
    let mut core = DiskCore::open(cache.path(), DISK, journal_config()).unwrap();
    let pd = |epoch: u64, key: u8| ProtectDisk {
        disk_id: DISK,
        size_bytes: 1 << 20,
        sector_size: 512,
        epoch,
        wrapped_key: vec![key; 48],
    };
    let open = |core: &mut DiskCore, pd: &ProtectDisk, continues: bool| {
        let raw = Message::ProtectDisk(pd.clone()).to_frame().unwrap();
        core.protect(pd, &raw, continues).unwrap()
    };
    let err = open(&mut core, &pd(3, 1), true).unwrap_err();
    assert_eq!(err.code, ErrorCode::CannotContinue, "{}", err.message);
    assert!(err.message.contains("no epoch"), "{}", err.message);
    assert_eq!(journal_records(&core), 0);

    open(&mut core, &pd(3, 1), false).unwrap();
    let records = journal_records(&core);
    let err = open(&mut core, &pd(4, 2), true).unwrap_err();
    assert_eq!(err.code, ErrorCode::CannotContinue, "{}", err.message);
    assert!(err.message.contains("epoch 3"), "{}", err.message);
    let err = open(&mut core, &pd(3, 2), false).unwrap_err();
    assert_eq!(err.code, ErrorCode::StaleEpoch, "{}", err.message);
    assert!(err.message.contains("another data key"), "{}", err.message);
    assert_eq!(journal_records(&core), records, "a refusal was journaled");

    // Asked for, with the epoch held: a rotation, answered with where it continues.
    match open(&mut core, &pd(3, 2), true).unwrap() {
        ripcord_process_server::disk::Opened::Continued(c) => {
            assert_eq!((c.epoch, c.resume_from_seq, c.next_cut_id), (3, 1, 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(journal_records(&core), records + 1);
}
