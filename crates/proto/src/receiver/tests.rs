//! Unit tests of the [`Receiver`](super::Receiver): batch classification, acks only after
//! durability, cuts that need data and durability, epoch change, restore.

use super::*;
use crate::wire::CutKind;

const D: DiskId = DiskId([1; 16]);

fn batch(epoch: u64, first: u64, last: u64) -> Batch {
    Batch {
        disk_id: D,
        epoch,
        first_seq: first,
        last_seq: last,
        extents: vec![],
        flags: 0,
        payload: vec![],
    }
}
fn cut(seq: u64, id: u64) -> Cut {
    Cut {
        mono_ns: 0,
        disk_id: D,
        epoch: 1,
        seq,
        time_ns: 0,
        kind: CutKind::Crash,
        id,
        mac: [0; 32],
        group: None,
    }
}

#[test]
fn classifies_batches() {
    let mut r = Receiver::new(D, 1);
    assert_eq!(r.handle_batch(&batch(1, 1, 3)), BatchAction::Append);
    assert_eq!(r.handle_batch(&batch(1, 1, 3)), BatchAction::Duplicate);
    assert_eq!(
        r.handle_batch(&batch(1, 6, 6)),
        BatchAction::Gap {
            expected: 4,
            got: 6
        }
    );
    assert!(matches!(
        r.handle_batch(&batch(1, 3, 5)),
        BatchAction::Reject(RejectReason::Overlap { .. })
    ));
    assert!(matches!(
        r.handle_batch(&batch(0, 4, 4)),
        BatchAction::Reject(RejectReason::StaleEpoch { got: 0, current: 1 })
    ));
    assert_eq!(r.received_seq(), 3);
}

#[test]
fn ack_only_after_durable() {
    let mut r = Receiver::new(D, 1);
    assert_eq!(r.handle_batch(&batch(1, 1, 2)), BatchAction::Append);
    assert_eq!(r.handle_batch(&batch(1, 3, 4)), BatchAction::Append);
    assert_eq!(r.poll_ack(), None, "nothing durable yet");
    assert_eq!(
        r.handle_durable(5),
        Err(DurableError::BeyondReceived {
            seq: 5,
            received_seq: 4
        })
    );
    r.handle_durable(2).unwrap();
    let a = r.poll_ack().unwrap();
    assert_eq!(a.durable_seq, 2);
    assert_eq!(r.poll_ack(), None);
    // duplicate triggers a re-ack of the durable position only
    assert_eq!(r.handle_batch(&batch(1, 3, 4)), BatchAction::Duplicate);
    assert_eq!(r.poll_ack().unwrap().durable_seq, 2);
}

#[test]
fn cuts_need_data_and_durability() {
    let mut r = Receiver::new(D, 1);
    assert_eq!(
        r.handle_cut(&cut(1, 1)),
        CutAction::Reject(RejectReason::CutAheadOfData {
            seq: 1,
            received_seq: 0
        })
    );
    r.handle_batch(&batch(1, 1, 2));
    assert_eq!(r.handle_cut(&cut(2, 1)), CutAction::Record);
    assert_eq!(r.handle_cut(&cut(2, 1)), CutAction::Duplicate);
    assert_eq!(r.poll_ack().unwrap().durable_cut_id, 0);
    r.handle_cut_durable(1).unwrap();
    assert_eq!(r.poll_ack(), None, "cut durable but its data is not");
    r.handle_durable(2).unwrap();
    let a = r.poll_ack().unwrap();
    assert_eq!((a.durable_seq, a.durable_cut_id), (2, 1));
    assert!(r.handle_cut_durable(2).is_err());
    r.handle_batch(&batch(1, 3, 3));
    assert_eq!(
        r.handle_cut(&cut(3, 3)),
        CutAction::Reject(RejectReason::CutGap {
            expected: 2,
            got: 3
        })
    );
    assert_eq!(
        r.handle_cut(&cut(1, 2)),
        CutAction::Reject(RejectReason::CutBeforePrevious {
            seq: 1,
            previous_seq: 2
        })
    );
    assert_eq!(
        r.durable_state(),
        DurableState {
            epoch: 1,
            durable_seq: 2,
            last_cut: Some(CutPos { id: 1, seq: 2 })
        }
    );
}

#[test]
fn a_batch_cannot_start_an_epoch_only_protect_disk_can() {
    let mut r = Receiver::new(D, 1);
    r.handle_batch(&batch(1, 1, 5));
    r.handle_durable(5).unwrap();
    // A hostile or broken agent: a batch of a future epoch is refused, and what is
    // durable is not reset by it.
    assert_eq!(
        r.handle_batch(&batch(2, 1, 1)),
        BatchAction::Reject(RejectReason::FutureEpoch { got: 2, current: 1 })
    );
    assert_eq!((r.epoch(), r.received_seq(), r.durable_seq()), (1, 5, 5));
    let p = ProtectDisk {
        wrapped_key: vec![],
        disk_id: D,
        size_bytes: 1 << 30,
        sector_size: 512,
        epoch: 2,
    };
    assert!(matches!(
        r.handle_protect(&p),
        ProtectOutcome::NewEpoch {
            previous_epoch: 1,
            ..
        }
    ));
    assert_eq!((r.epoch(), r.received_seq(), r.durable_seq()), (2, 0, 0));
    assert_eq!(r.handle_batch(&batch(2, 1, 1)), BatchAction::Append);
    let p = ProtectDisk {
        wrapped_key: vec![],
        disk_id: D,
        size_bytes: 1 << 30,
        sector_size: 512,
        epoch: 3,
    };
    match r.handle_protect(&p) {
        ProtectOutcome::NewEpoch {
            previous_epoch: 2,
            accepted,
        } => assert_eq!(accepted.resume_from_seq, 1),
        other => panic!("{other:?}"),
    }
    let stale = ProtectDisk { epoch: 1, ..p };
    assert!(matches!(
        r.handle_protect(&stale),
        ProtectOutcome::Reject(RejectReason::StaleEpoch { .. })
    ));
}

#[test]
fn restore_resumes_after_durable() {
    let mut r = Receiver::restore(
        D,
        DurableState {
            epoch: 4,
            durable_seq: 10,
            last_cut: Some(CutPos { id: 3, seq: 12 }),
        },
    );
    let p = ProtectDisk {
        wrapped_key: vec![],
        disk_id: D,
        size_bytes: 4096,
        sector_size: 4096,
        epoch: 4,
    };
    match r.handle_protect(&p) {
        ProtectOutcome::Resume(a) => assert_eq!(a.resume_from_seq, 11),
        other => panic!("{other:?}"),
    }
    // Cut 3 is durable but its data (12) is not yet: not acknowledged.
    assert_eq!(r.poll_ack(), None);
    let b = Batch {
        epoch: 4,
        ..batch(4, 11, 12)
    };
    assert_eq!(r.handle_batch(&b), BatchAction::Append);
    r.handle_durable(12).unwrap();
    assert_eq!(r.poll_ack().unwrap().durable_cut_id, 3);
}
