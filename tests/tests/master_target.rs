//! The master target (`ripcord-mt`) keeps a second device at a protected disk's newest
//! recovery point: real agent, process server, QUIC, loop devices and target store.
//!
//! Needs root. Skips loudly without it, and fails under `CI=true`.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ripcord_tests::{assert_same, http_get, metric};
use testkit::{
    Mount, Site, Workload,
    master_target::{MasterTarget, mt_command, mt_failback, mt_status},
    replication::{Replicator, failover, wait_for, wait_for_point},
};

const MIB: u64 = 1 << 20;

#[test]
fn the_master_target_keeps_a_device_at_the_newest_point_through_ten_kills() {
    let Some(site) =
        Site::builder("the_master_target_keeps_a_device_at_the_newest_point_through_ten_kills")
            .file_target()
            .start()
    else {
        return;
    };
    let source = site.loop_device("source.img", 64 * MIB);
    // The device the points go to starts with other data everywhere: a full apply must
    // leave nothing of it.
    let dest = site.loop_device("dest.img", 64 * MIB);
    Workload::new(&dest.path, 99)
        .unwrap()
        .direct_writes(400)
        .unwrap();
    let state_dir = site.path().join("mt-state");
    let (code, none) = mt_status(&state_dir);
    assert_eq!(code, Some(3), "status without a followed disk must exit 3");
    assert!(none.is_empty());

    let agent = site.replicator(&[&source.path]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (source.path.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut w = Workload::new(&dev, 7).unwrap();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                w.direct_writes(4).unwrap();
                if round.is_multiple_of(10) {
                    w.discards(1).unwrap();
                    w.zeroouts(1).unwrap();
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk = site.id.disk_id(&source.path).unwrap();
    let pass = site.ps.passphrase_file.clone();
    wait_for_point(site.target(), &disk, &pass, 1, Duration::from_secs(60)).unwrap();

    // Ten kill -9s at random moments while points keep arriving.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut between = 0;
    let mut logs = String::new();
    for run in 0..10 {
        let mut mt = MasterTarget::start(&site, &disk, &dest.path, &state_dir, run);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(300 + rng % 1200));
        mt.kill9();
        logs += &mt.log();
        let (code, states) = mt_status(&state_dir);
        assert_eq!(code, Some(0), "status after a kill");
        assert_eq!(states.len(), 1, "{states:?}");
        if !states[0]["moving_to"].is_null() {
            between += 1;
        }
    }
    eprintln!("{between} of 10 kills left the device between two points");

    // A backlog builds while no master target runs; then the source is quiesced.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let (_, point) = site.final_point(agent, &disk);
    // A kill the moment the catch-up step has begun: the restart must rewrite what that
    // step may have written, although no later write touches it again.
    let state_file = state_dir.join(format!("{disk}.json"));
    let mut mt = MasterTarget::start(&site, &disk, &dest.path, &state_dir, 10);
    wait_for(
        "the catch-up step to begin",
        Duration::from_secs(60),
        || {
            let state: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state_file)?).unwrap_or_default();
            Ok(!state["moving_to"].is_null())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mt.log()));
    mt.kill9();
    logs += &mt.log();
    let (_, states) = mt_status(&state_dir);
    assert!(
        !states[0]["moving_to"].is_null(),
        "the step finished before the kill; the test did not interrupt it: {states:?}"
    );
    let mt = MasterTarget::start(&site, &disk, &dest.path, &state_dir, 11);
    wait_for(
        "the master target to reach the final point",
        Duration::from_secs(120),
        || {
            let (_, states) = mt_status(&state_dir);
            Ok(states
                .first()
                .is_some_and(|s| s["moving_to"].is_null() && s["applied"]["id"] == point["id"]))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mt.log()));
    let metrics = http_get(mt.metrics_port, "/metrics");
    let label = format!("disk=\"{disk}\"");
    assert_eq!(
        metric(&metrics, "ripcord_mt_consistent", &label),
        1.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "ripcord_mt_bytes_written_total", &label) >= (64 * MIB) as f64);
    assert!(metric(&metrics, "ripcord_mt_point_age_seconds", &label) > 0.0);
    let log_path = mt.log.clone();
    assert!(mt.stop(), "ripcord-mt did not stop cleanly");
    let last_log = std::fs::read_to_string(log_path).unwrap();
    logs += &last_log;
    assert!(
        last_log.contains(&format!(
            "exactly at point {}",
            point["id"].as_str().unwrap()
        )),
        "the stop does not say where the device is:\n{last_log}"
    );
    assert_same(&source.path, &dest.path, "device after the master target");

    // Resuming never copied the whole disk again: once a step finished, later steps
    // (after kills mid-step too) wrote only what changed.
    let first_done = logs.find("at point ").expect("no step ever finished");
    let after = first_done + logs[first_done..].find('\n').unwrap();
    assert!(
        !logs[after..].contains("full copy"),
        "a restart copied the whole disk again:\n{logs}"
    );

    // The state file vouches only for its own device.
    let other = site.loop_device("other.img", 64 * MIB);
    let out = mt_command(&site, "follow", &disk, &other.path, &state_dir)
        .arg("--once")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "another device was accepted: {err}");
    assert!(
        err.contains("--reset"),
        "the refusal does not say what to do: {err}"
    );
}

fn ext4_files(device: &Path, mnt: &Path, seed: u64) {
    let m = Mount::new(device, mnt, &["-t", "ext4"]).unwrap();
    testkit::file_workload(&m.dir, seed, 20, 1 << 20).unwrap();
    m.unmount().unwrap();
}

#[test]
fn failback_round_trip_leaves_the_original_disk_at_the_recovered_machines_final_point() {
    let Some(site) = Site::builder(
        "failback_round_trip_leaves_the_original_disk_at_the_recovered_machines_final_point",
    )
    .file_target()
    .start() else {
        return;
    };
    let target = site.target().to_owned();
    let pass = site.ps.passphrase_file.clone();
    let mnt = site.path().join("mnt");

    // The original machine A protects its ext4 disk.
    let a = site.loop_device("a.img", 96 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", a.path.to_str().unwrap()]).unwrap();
    let agent_a = site.replicator(&[&a.path]);
    ext4_files(&a.path, &mnt, 1);
    agent_a.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_a = site.id.disk_id(&a.path).unwrap();
    let failover_point = site.final_point(agent_a, &disk_a).1;

    // Failover: the recovered machine B starts from that point on its own device.
    let b = site.loop_device("b.img", 96 * MIB);
    let id = failover_point["id"].as_str().unwrap();
    let (ok, _, err) = failover(&target, &disk_a, id, &b.path, &pass).unwrap();
    assert!(ok, "failover to B failed: {err}");

    // Divergence both ways: A is written after the failover point, B runs the workload.
    ext4_files(&a.path, &mnt, 2);
    ext4_files(&b.path, &mnt, 3);

    // Reprotect: B's own agent replicates back; the master target keeps A at B's newest
    // point while B keeps working.
    let recovered = site.register("recovered");
    let agent_b = Replicator::start(&recovered, &[&b.path], &[]).unwrap();
    let disk_b = recovered.disk_id(&b.path).unwrap();
    assert_ne!(
        disk_a, disk_b,
        "the recovered machine's disk has its own id"
    );
    let state_dir = site.path().join("mt-state");
    let mt = MasterTarget::start(&site, &disk_b, &a.path, &state_dir, 0);
    ext4_files(&b.path, &mnt, 4);
    agent_b.wait_synced(Duration::from_secs(60)).unwrap();
    wait_for(
        "the master target to apply a point of B",
        Duration::from_secs(90),
        || {
            Ok(mt_status(&state_dir)
                .1
                .first()
                .is_some_and(|s| !s["applied"].is_null()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mt.log()));

    // Failback: the application and B's agent stop (its last point is B's final state),
    // the master target applies it and stops there.
    ext4_files(&b.path, &mnt, 5);
    let last = site.final_point(agent_b, &disk_b).1;
    assert!(mt.stop(), "ripcord-mt follow did not stop cleanly");
    let (ok, out, err) = mt_failback(&site, &disk_b, &a.path, &state_dir);
    assert!(ok, "failback failed:\n{out}\n{err}");
    let last_id = last["id"].as_str().unwrap();
    assert!(
        out.contains(&format!("exactly at point {last_id}")),
        "failback does not say which point A holds:\n{out}"
    );
    assert_same(&b.path, &a.path, "A after failback against B's final state");
    testkit::run("e2fsck", &["-fn", a.path.to_str().unwrap()]).unwrap();

    // Re-enable: A is protected forward again, and its new points are what A holds.
    let agent_a = site.replicator(&[&a.path]);
    ext4_files(&a.path, &mnt, 6);
    agent_a.wait_synced(Duration::from_secs(60)).unwrap();
    let forward = site.final_point(agent_a, &disk_a).1;
    let image = site.path().join("forward.img");
    let id = forward["id"].as_str().unwrap();
    let (ok, _, err) = failover(&target, &disk_a, id, &image, &pass).unwrap();
    assert!(ok, "failover of A's forward point failed: {err}");
    assert_same(&a.path, &image, "A's forward point against A");
    testkit::run("e2fsck", &["-fn", image.to_str().unwrap()]).unwrap();
}
