//! The disaster drill of `failover.rs` with the target store on S3: a real S3-compatible
//! server (single-node Garage) started by the test, reached by the process server and the
//! `ripcord` CLI through object_store's `AWS_*` environment.
//!
//! Needs root and `garage` (`cargo xtask setup` installs it). Skips loudly without either,
//! and fails under `CI=true`.
//!
//! This binary holds a single test on purpose: the test sets the `AWS_*` variables in its
//! own environment so that every process it spawns inherits them, which is only sound while
//! no other thread runs.

use ripcord_tests::{disaster_drill, verify_store};
use testkit::{Garage, Lab, Site, garage::require_garage};

#[test]
fn disaster_drill_fails_over_from_an_s3_store_and_passphrase_alone() {
    const NAME: &str = "disaster_drill_fails_over_from_an_s3_store_and_passphrase_alone";
    let Some(lab) = Lab::new(NAME) else { return };
    if !require_garage(NAME) {
        return;
    }
    let garage = Garage::start(&lab.path().join("garage")).unwrap_or_else(|e| panic!("{e:#}"));
    // SAFETY: this is the binary's only test and it has not started any thread; the test
    // harness's main thread only waits for the result and does not touch the environment.
    unsafe { garage.export_env() };
    let mut site = Site::builder(NAME).s3(garage).start_on(lab);
    let target = site.target().to_owned();

    let pass = disaster_drill(&mut site);

    let (ok, out, err) = verify_store(&target, &pass);
    assert!(
        ok,
        "verify of the S3 store failed:\n{out}{err}\nGarage log:\n{}",
        site.garage().log()
    );
}
