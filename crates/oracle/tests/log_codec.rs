//! Log encoder/decoder: round trip, garbage, truncation, and the lost-tail safety argument.

use std::io::Cursor;

use proptest::prelude::*;
use ripcord_oracle::check::{CheckOptions, check_with};
use ripcord_oracle::log::{LOG_HEADER_LEN, LogHeader, LogWriter};
use ripcord_oracle::sim::{SimOptions, apply, simulate, synthesize_image};
use ripcord_oracle::{Error, Log, LogError, Op, OpKind, Region};

fn header() -> LogHeader {
    LogHeader {
        run_id: 0x1234,
        region: Region {
            start: 10,
            len: 100,
        },
        start_ns: 1000,
    }
}

#[test]
fn roundtrip_exact() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.submit(OpKind::Write, 1, 10, 4, 1001).unwrap();
    w.submit(OpKind::Flush, 2, 0, 0, 1001).unwrap();
    w.submit(OpKind::Discard, 3, 50, 60, 1002).unwrap();
    w.complete(3, 1003, 0).unwrap();
    w.complete(1, 1004, 16384).unwrap();
    w.complete(2, 1005, -5).unwrap();
    w.end(1006, 3).unwrap();
    let log = Log::from_bytes(&w.into_inner()).unwrap();
    assert_eq!(log.header, header());
    assert_eq!(log.end_ns, Some(1006));
    assert_eq!(log.last_event_ns, 1006);
    assert_eq!(log.torn_tail_bytes, 0);
    let o = |kind, seq, first_block, block_count, submit_ns, c, r| Op {
        kind,
        seq,
        first_block,
        block_count,
        submit_ns,
        complete_ns: Some(c),
        result: Some(r),
    };
    assert_eq!(
        log.ops,
        vec![
            o(OpKind::Write, 1, 10, 4, 1001, 1004, 16384),
            o(OpKind::Flush, 2, 0, 0, 1001, 1005, -5),
            o(OpKind::Discard, 3, 50, 60, 1002, 1003, 0),
        ]
    );
    assert!(log.ops[0].ok() && !log.ops[1].ok() && log.ops[2].ok());
}

fn bad(build: impl FnOnce(&mut LogWriter<Vec<u8>>)) -> LogError {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    build(&mut w);
    // Append a valid trailing record so the damage is not mistaken for a torn tail.
    Log::from_bytes(&w.into_inner()).unwrap_err()
}

#[test]
fn inconsistent_logs_are_rejected() {
    let e = bad(|w| {
        w.submit(OpKind::Write, 2, 10, 1, 1001).unwrap();
        w.submit(OpKind::Write, 2, 11, 1, 1001).unwrap();
    });
    assert!(matches!(e, LogError::Inconsistent { .. }), "{e}");
    let e = bad(|w| w.complete(9, 1001, 0).unwrap());
    assert!(e.to_string().contains("unknown seq 9"), "{e}");
    let e = bad(|w| w.submit(OpKind::Write, 1, 105, 10, 1001).unwrap());
    assert!(e.to_string().contains("outside region"), "{e}");
    let e = bad(|w| {
        w.submit(OpKind::Write, 1, 10, 1, 1001).unwrap();
        w.complete(1, 999, 4096).unwrap();
    });
    assert!(e.to_string().contains("before it was submitted"), "{e}");
    let e = bad(|w| {
        w.submit(OpKind::Write, 1, 10, 1, 1005).unwrap();
        w.submit(OpKind::Write, 2, 12, 1, 1001).unwrap();
    });
    assert!(e.to_string().contains("backwards"), "{e}");
    let e = bad(|w| {
        w.submit(OpKind::Write, 1, 10, 1, 1001).unwrap();
        w.end(1002, 1).unwrap();
    });
    assert!(e.to_string().contains("End says"), "{e}");
}

#[test]
fn header_errors() {
    assert!(matches!(Log::from_bytes(b"short"), Err(LogError::NotALog)));
    let good = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
    let mut v = good.clone();
    v[8] = 9;
    assert!(matches!(Log::from_bytes(&v), Err(LogError::Version(_))));
    let mut v = good.clone();
    v[20] ^= 1;
    assert!(matches!(Log::from_bytes(&v), Err(LogError::Header(_))));
    assert!(Log::from_bytes(&good).unwrap().ops.is_empty());
}

#[test]
fn damage_in_the_middle_is_an_error_but_at_the_end_a_torn_tail() {
    let bytes = simulate(&SimOptions {
        ops: 50,
        ..Default::default()
    });
    let full = Log::from_bytes(&bytes).unwrap();
    let mut v = bytes.clone();
    v[LOG_HEADER_LEN + 10] ^= 0x40; // inside the first record
    assert!(matches!(Log::from_bytes(&v), Err(LogError::Corrupt { .. })));
    let mut v = bytes.clone();
    let n = v.len();
    v[n - 6] ^= 0x40; // inside the End record (the last one)
    let log = Log::from_bytes(&v).unwrap();
    assert_eq!(log.torn_tail_bytes, 2 + 16 + 4);
    assert_eq!(log.end_ns, None);
    assert_eq!(log.ops, full.ops);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Log::from_bytes(&bytes);
    }

    #[test]
    fn garbage_after_valid_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut v = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
        v.extend_from_slice(&tail);
        let _ = Log::from_bytes(&v);
    }

    #[test]
    fn flipped_bytes_never_panic(seed in 1u64..1000, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut v = simulate(&SimOptions { seed, ops: 40, ..Default::default() });
        let i = pos.index(v.len());
        v[i] ^= 1 << bit;
        let _ = Log::from_bytes(&v);
    }

    /// Every prefix of a valid log decodes to a consistent prefix of the ops.
    #[test]
    fn truncation_yields_a_prefix(seed in 1u64..1000, cut in any::<prop::sample::Index>()) {
        let bytes = simulate(&SimOptions { seed, ops: 60, ..Default::default() });
        let full = Log::from_bytes(&bytes).unwrap();
        let n = LOG_HEADER_LEN + cut.index(bytes.len() - LOG_HEADER_LEN + 1);
        let log = Log::from_bytes(&bytes[..n]).unwrap();
        prop_assert!(log.torn_tail_bytes < 38);
        prop_assert!(log.ops.len() <= full.ops.len());
        for (a, b) in log.ops.iter().zip(&full.ops) {
            prop_assert_eq!(a.seq, b.seq);
            prop_assert_eq!(a.submit_ns, b.submit_ns);
            prop_assert!(a.complete_ns.is_none() || a.complete_ns == b.complete_ns);
            // A lost completion is always later than every surviving timestamp.
            if a.complete_ns.is_none() {
                prop_assert!(b.complete_ns.is_none_or(|c| c >= log.last_event_ns));
            }
        }
        // Lost submissions happened at or after the last surviving timestamp.
        for b in &full.ops[log.ops.len()..] {
            prop_assert!(b.submit_ns >= log.last_event_ns);
        }
        prop_assert_eq!(log.ended_cleanly(), n == bytes.len());
    }

    /// The safety argument of the lost-tail policy: for any T <= last_event_ns of the
    /// truncated log, the checker's verdict on any image is the same with the truncated log
    /// as with the full one; for a later T it refuses.
    #[test]
    fn truncated_log_gives_same_verdicts(
        seed in 1u64..1000,
        cut in any::<prop::sample::Index>(),
        tpick in any::<prop::sample::Index>(),
        mutate in any::<prop::sample::Index>(),
    ) {
        let so = SimOptions { seed, ops: 300, region: Region { start: 0, len: 64 }, crash: seed % 2 == 0, ..Default::default() };
        let bytes = simulate(&so);
        let full = Log::from_bytes(&bytes).unwrap();
        let n = LOG_HEADER_LEN + cut.index(bytes.len() - LOG_HEADER_LEN + 1);
        let trunc = Log::from_bytes(&bytes[..n]).unwrap();
        let lo = trunc.header.start_ns;
        let t = lo + tpick.index((trunc.last_event_ns - lo + 1) as usize) as u64;
        let mut img = synthesize_image(&full, t);
        // Put some write (any time, possibly future or stale) into some block.
        let writes: Vec<&Op> = full.ops.iter().filter(|o| o.kind == OpKind::Write).collect();
        let w = writes[mutate.index(writes.len())];
        apply(&mut img, &full, w, w.first_block);
        let opts = CheckOptions::default();
        let a = check_with(&mut Cursor::new(&img), &full, t, &opts).unwrap();
        let b = check_with(&mut Cursor::new(&img), &trunc, t, &opts).unwrap();
        prop_assert_eq!(a.counts, b.counts, "full:\n{}\ntruncated:\n{}", a, b);
        if !trunc.ended_cleanly() {
            let e = check_with(&mut Cursor::new(&img), &trunc, trunc.last_event_ns + 1, &opts).unwrap_err();
            let beyond = matches!(e, Error::TimeBeyondLog { .. });
            prop_assert!(beyond, "{}", e);
        }
    }
}
