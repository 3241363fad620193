//! Random crashes under a replicated workload (issue 17, item 3): the agent and the process
//! server are killed with SIGKILL at random moments, ten times in one run, while the oracle
//! workload stamps every block it writes. The chaos engine ([`testkit::chaos`], the same
//! one `cargo xtask chaos` runs for hours with every fault) checks every invariant:
//!
//! - **nothing acknowledged is lost**: the batch the agent had acknowledged just before
//!   each kill is durable in the target store at the end (and a restarted server that
//!   resumed behind an acknowledgement would be refused by the agent, which says so);
//! - **every recovery point is a crash state of the source**: each point in the store is
//!   failed over and passes the oracle's write-order checker;
//! - **the replica equals the device at quiesce**.
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

#[test]
fn random_kills_of_agent_and_server_lose_nothing_and_every_point_is_a_crash_state() {
    let Some(mut site) = Site::builder(
        "random_kills_of_agent_and_server_lose_nothing_and_every_point_is_a_crash_state",
    )
    .file_target()
    .start() else {
        return;
    };
    let seed = std::env::var("RIPCORD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("crash schedule seed: {seed} (replay with RIPCORD_CRASH_SEED={seed})");
    let config = ChaosConfig {
        duration: Duration::from_secs(600),
        max_faults: 10,
        faults: vec![Fault::KillAgent, Fault::KillServer],
        seed,
        disk_mib: 64,
        check_points: 0,
    };
    let report = testkit::chaos::run(&mut site, &config).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{report}\nschedule: {:#?}", report.schedule);
    assert_eq!(report.schedule.len(), 10, "{report}");
    assert!(
        report.points_checked == report.points && report.points > 0,
        "{report}"
    );
}
