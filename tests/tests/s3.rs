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
use testkit::{Garage, Scratch, garage::require_garage, require_root};

#[test]
fn disaster_drill_fails_over_from_an_s3_store_and_passphrase_alone() {
    const NAME: &str = "disaster_drill_fails_over_from_an_s3_store_and_passphrase_alone";
    if !require_root(NAME) || !require_garage(NAME) {
        return;
    }
    let dir = Scratch::new("s3-drill");
    let garage = Garage::start(&dir.path.join("garage")).unwrap_or_else(|e| panic!("{e:#}"));
    // SAFETY: this is the binary's only test and it has not started any thread; the test
    // harness's main thread only waits for the result and does not touch the environment.
    unsafe { garage.export_env() };
    let target = garage.url();

    let pass = disaster_drill(&dir.path, &target);

    let (ok, out, err) = verify_store(&target, &pass);
    assert!(
        ok,
        "verify of the S3 store failed:\n{out}{err}\nGarage log:\n{}",
        garage.log()
    );
}
