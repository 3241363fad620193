//! `ripcord-mt` against a signed test store (no root needed): it steps from point to
//! point writing only what changed, never goes back, and refuses a store tampered with by
//! **someone who can write the bucket** (leaked store credentials, or a compromised
//! process server): a forged point leaves the device exactly where it was, and a moved
//! write stops the step with the device reported between points, never as done.

use std::{
    path::Path,
    process::{Command, Output},
};

use ripcord_restore::testing::{DISK, EPOCH, Fixture, SIZE, assert_image};
use ripcord_store::format;

fn mt(f: &Fixture, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ripcord-mt"))
        .args(args)
        .env_remove("RIPCORD_PASSPHRASE")
        .env("RIPCORD_LOG", "warn")
        .current_dir(f.tmp.path())
        .output()
        .expect("running ripcord-mt")
}

fn failback(f: &Fixture, image: &Path, point: &str) -> Output {
    let (url, disk, pass) = (f.url(), DISK.to_string(), f.pass());
    let state = f.tmp.path().join("mt-state");
    mt(
        f,
        &[
            "failback",
            "--target",
            &url,
            "--disk",
            &disk,
            "--device",
            image.to_str().unwrap(),
            "--point",
            point,
            "--state-dir",
            state.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    )
}

/// The one state file, as JSON.
fn state(f: &Fixture) -> serde_json::Value {
    let dir = f.tmp.path().join("mt-state");
    let out = mt(
        f,
        &["status", "--json", "--state-dir", dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON state")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_from_point_to_point_writing_only_what_changed() {
    let f = Fixture::new().await;
    let image = f.tmp.path().join("device.img");
    let o = failback(&f, &image, &format!("{EPOCH}-1"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("exactly at point 1-1"),
        "{}",
        text(&o)
    );
    assert_image(&image, &f.images[0]);
    let s = state(&f);
    assert_eq!(s["applied"]["id"], "1-1");
    assert!(s["moving_to"].is_null());
    assert_eq!(
        s["bytes_written"], SIZE,
        "the first step writes the whole disk"
    );

    let o = failback(&f, &image, "latest");
    assert!(o.status.success(), "{}", text(&o));
    assert_image(&image, &f.images[1]);
    // Batches 5 and 6 wrote 16 + 8 + 8 + 24 sectors after cut 1: exactly those are written.
    let delta = state(&f)["bytes_written"].as_u64().unwrap() - SIZE;
    assert_eq!(delta, 56 * 512, "the second step wrote more than changed");

    let o = failback(&f, &image, &format!("{EPOCH}-1"));
    assert!(!o.status.success(), "went back to an earlier point");
    assert!(text(&o).contains("never goes back"), "{}", text(&o));
    assert_image(&image, &f.images[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_point_is_refused_and_the_device_stays_exactly_at_its_point() {
    let f = Fixture::new().await;
    let image = f.tmp.path().join("device.img");
    assert!(failback(&f, &image, "1-1").status.success());
    // Move cut 2 to batch 5 (its MAC was made over batch 6).
    let name = f.object("catalog", &format!("-{0:020}-{0:020}-00-", 2));
    let parsed = format::parse_catalog(&name).unwrap();
    let mut entries = format::decode_catalog(&f.read(&name), &DISK, &parsed).unwrap();
    entries[0].cut.seq = 5;
    f.write(&name, format::encode_catalog(&DISK, EPOCH, 0, &entries));

    let o = failback(&f, &image, "latest");
    assert!(
        !o.status.success(),
        "a forged point was applied:\n{}",
        text(&o)
    );
    assert!(text(&o).contains("not authentic"), "{}", text(&o));
    assert!(
        text(&o).contains(&name),
        "the catalog object is not named:\n{}",
        text(&o)
    );
    let s = state(&f);
    assert_eq!(s["applied"]["id"], "1-1");
    assert!(s["moving_to"].is_null(), "the device left its point: {s}");
    assert_image(&image, &f.images[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_write_stops_the_step_and_the_device_is_reported_between_points() {
    let f = Fixture::new().await;
    let image = f.tmp.path().join("device.img");
    assert!(failback(&f, &image, "1-1").status.success());
    // Batch 6's data placed 1000 sectors away from where the agent wrote it.
    let segment = f.tamper_index(6, |x| x[1].sector += 1000);

    let o = failback(&f, &image, "latest");
    assert!(
        !o.status.success(),
        "a moved write was applied:\n{}",
        text(&o)
    );
    assert!(
        text(&o).contains(&segment),
        "the index object is not named:\n{}",
        text(&o)
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("failback done"),
        "{}",
        text(&o)
    );
    let s = state(&f);
    assert_eq!(
        s["moving_to"]["id"], "1-2",
        "the state must say between points: {s}"
    );
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&segment)),
        "{s}"
    );
    let dir = f.tmp.path().join("mt-state");
    let out = mt(&f, &["status", "--state-dir", dir.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("between points 1-1 and 1-2"),
        "{}",
        text(&out)
    );
}
