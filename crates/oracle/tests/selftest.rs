//! End-to-end self-test: the real workload on a loop device (root), and fault injection on
//! synthetic images built from simulated logs (always).

use proptest::prelude::*;
use ripcord_oracle::selftest::{SelfTestOptions, device_test, is_root, synthetic_suite};
use ripcord_oracle::sim::{SimOptions, simulate};
use ripcord_oracle::{Log, Region};

#[test]
fn loop_device_self_test() {
    if !is_root() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("loop_device_self_test needs root and CI=true: refusing to skip");
        }
        eprintln!("\n!!!!!!!!!! SKIP loop_device_self_test: needs root for losetup !!!!!!!!!!\n");
        return;
    }
    let lines = device_test(&SelfTestOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    for l in lines {
        eprintln!("ok: {l}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn synthetic_faults_are_caught(
        seed in 1u64..10_000,
        qd in 1usize..24,
        max_blocks in 1u32..=16,
        discard_percent in 0u8..15,
        start in 0u64..64,
    ) {
        let so = SimOptions {
            seed, qd, max_blocks, discard_percent,
            region: Region { start, len: 400 },
            ops: 3000,
            flush_every: 16,
            crash: false,
        };
        let log = Log::from_bytes(&simulate(&so)).unwrap();
        if let Err(e) = synthetic_suite(&log, seed) {
            panic!("{e}");
        }
    }
}
