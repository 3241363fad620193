//! Random crashes under a replicated workload (issue 17, item 3): the agent, the process
//! server (with its uploader) and a master target that follows the disk onto a second
//! device are killed with SIGKILL at random moments, 200 times in one run, while the oracle
//! workload stamps every block it writes. The chaos engine ([`testkit::chaos`], the same
//! one `cargo xtask chaos` runs for hours with every fault) checks every invariant:
//!
//! - **nothing acknowledged is lost**: the batch the agent had acknowledged just before
//!   each kill is durable in the target store at the end (and a restarted server that
//!   resumed behind an acknowledgement would be refused by the agent, which says so);
//! - **every recovery point is a crash state of the source**: each point in the store is
//!   failed over and passes the oracle's write-order checker;
//! - **the replica equals the device at quiesce**, and so does the master target's device
//!   once it reached the final point.
//!
//! Agent kills are drawn least often: until an agent restarts without a resync (issue 14),
//! each one starts a new epoch with a full copy of the disk.
//!
//! The schedule comes from a seeded RNG; the seed is printed, and `RIPCORD_CRASH_SEED`
//! replays a run.
//!
//! Needs root. Skips loudly without it, and fails under `CI=true`.

use std::time::Duration;

use rand::RngExt as _;
use testkit::{
    Site,
    chaos::{ChaosConfig, Fault},
};

const KILLS: usize = 200;

#[test]
fn two_hundred_random_kills_lose_nothing_and_every_point_is_a_crash_state() {
    let Some(mut site) =
        Site::builder("two_hundred_random_kills_lose_nothing_and_every_point_is_a_crash_state")
            .file_target()
            .start()
    else {
        return;
    };
    let seed = std::env::var("RIPCORD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("crash schedule seed: {seed} (replay with RIPCORD_CRASH_SEED={seed})");
    let config = ChaosConfig {
        max_faults: KILLS,
        disk_mib: 16,
        check_points: 0,
        pause_ms: 100..900,
        down_ms: 0..600,
        ..ChaosConfig::new(
            seed,
            vec![
                Fault::KillServer,
                Fault::KillServer,
                Fault::KillAgent,
                Fault::KillMasterTarget,
                Fault::KillMasterTarget,
            ],
            Duration::from_secs(3600),
        )
    };
    let report = testkit::chaos::run(&mut site, &config).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{report}");
    assert_eq!(report.kills(), KILLS as u64, "{report}");
    for fault in [Fault::KillAgent, Fault::KillServer, Fault::KillMasterTarget] {
        assert!(
            report.injected.get(fault.name()).is_some_and(|&n| n > 0),
            "no {} in 200 kills:\n{report}",
            fault.name()
        );
    }
    assert!(
        report.points_checked == report.points && report.points > 0,
        "{report}"
    );
    assert!(report.master_target_checked, "{report}");
}
