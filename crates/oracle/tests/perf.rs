//! Checker throughput on a 1 GiB region (ignored by default; run with
//! `cargo test --release --test perf -- --ignored --nocapture`).

use std::time::Instant;

use ripcord_oracle::check::{CheckOptions, check_file};
use ripcord_oracle::sim::{SimOptions, simulate, synthesize_image};
use ripcord_oracle::{Log, Region};

#[test]
#[ignore]
fn check_1gib_region() {
    let so = SimOptions {
        seed: 5,
        region: Region {
            start: 0,
            len: 262_144,
        },
        ops: 400_000,
        qd: 16,
        max_blocks: 16,
        ..Default::default()
    };
    let bytes = simulate(&so);
    let log = Log::from_bytes(&bytes).unwrap();
    let t = log.end_ns.unwrap() + 1;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, synthesize_image(&log, t)).unwrap();
    let start = Instant::now();
    let rep = check_file(&img, &log, t, &CheckOptions::default()).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(rep.passed(), "{rep}");
    eprintln!(
        "{} ops, 1 GiB region checked in {secs:.2}s ({:.0} MB/s)",
        log.ops.len(),
        1073.7 / secs
    );
}
