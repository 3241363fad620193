//! The classification rule on hand-built logs.

use std::io::Cursor;

use ripcord_oracle::block::{BLOCK_SIZE, Stamp, make_block};
use ripcord_oracle::check::{Class, Initial, classify_block};
use ripcord_oracle::log::{LogHeader, LogWriter};
use ripcord_oracle::{Log, OpKind, Region, check};

const RUN: u64 = 0xfeed;

/// (kind, seq, first, count, submit, complete-or-None, result).
type OpSpec = (OpKind, u64, u64, u32, u64, Option<u64>, i32);

/// Ops as (kind, seq, first, count, submit, complete-or-None, result); events are written
/// in time order, with an End record if every op completed.
fn log_of(ops: &[OpSpec]) -> Log {
    let h = LogHeader {
        run_id: RUN,
        region: Region { start: 0, len: 8 },
        start_ns: 10,
    };
    let mut ev: Vec<(u64, bool, usize)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        ev.push((o.4, false, i));
        if let Some(c) = o.5 {
            ev.push((c, true, i));
        }
    }
    ev.sort();
    let last = ev.last().map_or(10, |e| e.0);
    let mut w = LogWriter::new(Vec::new(), &h).unwrap();
    for (t, done, i) in ev {
        let o = ops[i];
        if done {
            w.complete(o.1, t, o.6).unwrap();
        } else {
            w.submit(o.0, o.1, o.2, o.3, t).unwrap();
        }
    }
    if ops.iter().all(|o| o.5.is_some()) {
        w.end(last + 1, ops.len() as u64).unwrap();
    }
    Log::from_bytes(&w.into_inner()).unwrap()
}

fn wr(seq: u64, first: u64, count: u32, s: u64, c: u64) -> OpSpec {
    (
        OpKind::Write,
        seq,
        first,
        count,
        s,
        Some(c),
        count as i32 * 4096,
    )
}

fn stamped(block: u64, seq: u64, first: u64) -> Vec<u8> {
    make_block(&Stamp {
        run_id: RUN,
        lba: block,
        seq,
        index: (block - first) as u32,
    })
}

fn cls(log: &Log, bytes: &[u8], block: u64, t: u64) -> (Class, bool) {
    let v = classify_block(bytes, block, log, t, Initial::Zero);
    (v.class, v.legal)
}

const ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

#[test]
fn single_write_boundaries() {
    let log = log_of(&[wr(1, 0, 1, 100, 200)]);
    let w1 = stamped(0, 1, 0);
    // T <= submit: the write is future; zero is the only legal content.
    assert_eq!(cls(&log, &w1, 0, 100), (Class::Future, false));
    assert_eq!(cls(&log, &ZERO, 0, 100), (Class::Zero, true));
    // In flight: both.
    assert_eq!(cls(&log, &w1, 0, 101), (Class::Valid, true));
    assert_eq!(cls(&log, &ZERO, 0, 150), (Class::Zero, true));
    // T == complete: still in flight (completed-before means complete < T).
    assert_eq!(cls(&log, &ZERO, 0, 200), (Class::Zero, true));
    // After completion: only the write.
    assert_eq!(cls(&log, &w1, 0, 201), (Class::Valid, true));
    assert_eq!(cls(&log, &ZERO, 0, 201), (Class::Zero, false));
}

#[test]
fn overwrite_and_discard() {
    let log = log_of(&[
        wr(1, 0, 2, 100, 200),
        wr(2, 0, 1, 300, 400),
        (OpKind::Discard, 3, 0, 2, 500, Some(600), 0),
        wr(4, 1, 1, 700, 800),
    ]);
    let (w1, w2) = (stamped(0, 1, 0), stamped(0, 2, 0));
    assert_eq!(cls(&log, &w2, 0, 250), (Class::Future, false));
    assert_eq!(cls(&log, &w1, 0, 350), (Class::Valid, true));
    assert_eq!(cls(&log, &w2, 0, 350), (Class::Valid, true));
    assert_eq!(cls(&log, &ZERO, 0, 350), (Class::Zero, false));
    assert_eq!(cls(&log, &w1, 0, 401), (Class::Stale, false));
    // Discard in flight: old or zero; completed: zero only.
    assert_eq!(cls(&log, &ZERO, 0, 550), (Class::Zero, true));
    assert_eq!(cls(&log, &w2, 0, 550), (Class::Valid, true));
    assert_eq!(cls(&log, &w2, 0, 601), (Class::Stale, false));
    assert_eq!(cls(&log, &ZERO, 0, 601), (Class::Zero, true));
    // Block 1: written by seq 1 (index 1), discarded, rewritten by seq 4.
    let b1w1 = stamped(1, 1, 0);
    assert_eq!(cls(&log, &b1w1, 1, 450), (Class::Valid, true));
    assert_eq!(cls(&log, &ZERO, 1, 750), (Class::Zero, true));
    assert_eq!(cls(&log, &stamped(1, 4, 1), 1, 801), (Class::Valid, true));
    assert_eq!(cls(&log, &ZERO, 1, 801), (Class::Zero, false));
    // Wrong index within the write: not something seq 1 wrote.
    let wrong = make_block(&Stamp {
        run_id: RUN,
        lba: 1,
        seq: 1,
        index: 0,
    });
    assert_eq!(cls(&log, &wrong, 1, 450).0, Class::Foreign);
}

#[test]
fn foreign_misdirected_unknown_and_initial_any() {
    let log = log_of(&[wr(1, 0, 1, 100, 200), wr(2, 3, 1, 100, 200)]);
    let other_run = make_block(&Stamp {
        run_id: RUN + 1,
        lba: 2,
        seq: 1,
        index: 0,
    });
    let garbage = vec![0xa5u8; BLOCK_SIZE];
    assert_eq!(cls(&log, &other_run, 2, 300), (Class::Foreign, false));
    assert_eq!(cls(&log, &garbage, 2, 300), (Class::Foreign, false));
    // With --initial any, untouched blocks may hold anything not of this run.
    let any = |b: &[u8], blk, t| {
        let v = classify_block(b, blk, &log, t, Initial::Any);
        (v.class, v.legal)
    };
    assert_eq!(any(&other_run, 2, 300), (Class::Foreign, true));
    assert_eq!(any(&garbage, 2, 300), (Class::Foreign, true));
    assert_eq!(any(&garbage, 0, 150), (Class::Foreign, true)); // first write in flight
    assert_eq!(any(&garbage, 0, 300), (Class::Foreign, false)); // written since
    // This run's stamp, other lba.
    assert_eq!(cls(&log, &stamped(0, 1, 0), 0, 300), (Class::Valid, true));
    let mut moved = stamped(0, 1, 0);
    moved.truncate(BLOCK_SIZE);
    assert_eq!(cls(&log, &moved, 5, 300), (Class::Misdirected, false));
    // Seq beyond the log (its record was lost): future.
    let beyond = make_block(&Stamp {
        run_id: RUN,
        lba: 2,
        seq: 99,
        index: 0,
    });
    assert_eq!(cls(&log, &beyond, 2, 300), (Class::Future, false));
}

#[test]
fn never_completed_and_failed_ops_allow_both() {
    let log = log_of(&[
        (OpKind::Write, 1, 0, 1, 100, None, 0),
        (OpKind::Write, 2, 1, 1, 100, Some(200), -5),
        wr(3, 1, 1, 300, 400),
    ]);
    for t in [101, 10_000] {
        assert_eq!(cls(&log, &stamped(0, 1, 0), 0, t), (Class::Valid, true));
        assert_eq!(cls(&log, &ZERO, 0, t), (Class::Zero, true));
    }
    // Failed write: old or new until a later write completes.
    assert_eq!(cls(&log, &stamped(1, 2, 1), 1, 250), (Class::Valid, true));
    assert_eq!(cls(&log, &ZERO, 1, 250), (Class::Zero, true));
    assert_eq!(cls(&log, &stamped(1, 2, 1), 1, 401), (Class::Stale, false));
}

#[test]
fn partial_multiblock_write_in_flight_passes_whole_image() {
    let log = log_of(&[wr(1, 0, 4, 100, 200), wr(2, 0, 4, 300, 400)]);
    let mut img = vec![0u8; 8 * BLOCK_SIZE];
    for b in 0..4u64 {
        let seq = if b % 2 == 0 { 2 } else { 1 };
        img[b as usize * BLOCK_SIZE..][..BLOCK_SIZE].copy_from_slice(&stamped(b, seq, 0));
    }
    let rep = check(&mut Cursor::new(&img), &log, 350).unwrap();
    assert!(rep.passed(), "{rep}");
    assert_eq!(rep.count(Class::Valid).total, 4);
    assert_eq!(rep.count(Class::Zero).total, 4);
    // After seq 2 completed, the seq-1 blocks are stale, and the report names them.
    let rep = check(&mut Cursor::new(&img), &log, 401).unwrap();
    assert!(!rep.passed());
    assert_eq!(rep.illegal, 2);
    let text = rep.to_string();
    assert!(
        text.contains("block 1: stale") && text.contains("block 3: stale"),
        "{text}"
    );
    assert!(text.contains("seq 2 (last completed before T)"), "{text}");
    let bb = rep.bad_block(1).unwrap();
    assert!(bb.context.iter().any(|o| o.seq == 1) && bb.context.iter().any(|o| o.seq == 2));
}

#[test]
fn image_too_short_is_an_error() {
    let log = log_of(&[wr(1, 0, 1, 100, 200)]);
    let img = vec![0u8; 3 * BLOCK_SIZE];
    let e = check(&mut Cursor::new(&img), &log, 300).unwrap_err();
    assert!(e.to_string().contains("image too short"), "{e}");
}
