//! Failover from the target store: recovery points, test failover, the disaster drill and
//! damaged data. Real agent, process server, QUIC, loop devices and file systems.
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

use ripcord_restore::output_guard::{self, Destination};
use ripcord_tests::{assert_same, disaster_drill, replicated_ext4, verify_store};
use testkit::{
    Lab, LoopDevice, Mount, Site, Workload,
    fixture::FILE_TARGET_DIR,
    replication::{failover, ripcord, wait_for_point},
};

const MIB: u64 = 1 << 20;

#[test]
fn disaster_drill_fails_over_from_the_store_and_passphrase_alone() {
    let Some(mut site) =
        Site::builder("disaster_drill_fails_over_from_the_store_and_passphrase_alone")
            .file_target()
            .start()
    else {
        return;
    };
    disaster_drill(&mut site);
}

#[test]
fn a_flipped_byte_in_a_pack_fails_verify_and_failover_by_name() {
    let Some(mut site) =
        Site::builder("a_flipped_byte_in_a_pack_fails_verify_and_failover_by_name")
            .file_target()
            .start()
    else {
        return;
    };
    let target_dir = site.path().join(FILE_TARGET_DIR);
    let target = site.target().to_owned();
    let (_disk, disk_id) = replicated_ext4(&mut site);
    let ps = &site.ps;
    let (ok, out, err) = verify_store(&target, &ps.passphrase_file);
    assert!(ok, "verify of an intact store failed: {out}{err}");

    // Flip a byte in every 4 KiB of every pack: whatever batches the latest point needs,
    // some are damaged (a single flip could land in data no retained point reads).
    let packs: Vec<_> = walk(&target_dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    assert!(!packs.is_empty(), "no pack in the store");
    let mut names = Vec::new();
    for pack in &packs {
        let mut bytes = std::fs::read(pack).unwrap();
        for i in (2048..bytes.len()).step_by(4096) {
            bytes[i] ^= 0x01;
        }
        std::fs::write(pack, &bytes).unwrap();
        names.push(pack.file_name().unwrap().to_string_lossy().into_owned());
    }
    let named = |text: &str| names.iter().any(|n| text.contains(n.as_str()));

    let (ok, out, err) = verify_store(&target, &ps.passphrase_file);
    assert!(!ok, "verify passed damaged packs");
    assert!(
        named(&out) || named(&err),
        "verify did not name a damaged pack:\n{out}\n{err}"
    );
    let image = site.path().join("img");
    let (ok, _, err) = failover(&target, &disk_id, "latest", &image, &ps.passphrase_file).unwrap();
    assert!(!ok, "failover used a damaged pack");
    assert!(named(&err), "failover did not name the damaged pack: {err}");
    assert!(!image.exists(), "a damaged image was left behind");
}

#[test]
fn test_failover_while_replication_goes_on_loses_nothing() {
    let Some(mut site) = Site::builder("test_failover_while_replication_goes_on_loses_nothing")
        .file_target()
        .start()
    else {
        return;
    };
    let target = site.target().to_owned();
    let disk = site.loop_device("disk.img", 128 * MIB);
    let agent = site.replicator(&[&disk.path]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (disk.path.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut w = Workload::new(&dev, 3).unwrap();
            while !stop.load(Ordering::Relaxed) {
                w.direct_writes(3).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    wait_for_point(
        &target,
        &disk_id,
        &site.ps.passphrase_file,
        1,
        Duration::from_secs(60),
    )
    .unwrap();
    let scratch = site.path().join("tf");
    for _ in 0..2 {
        let (ok, out, err) = ripcord(
            &[
                "test-failover",
                "--target",
                &target,
                "--disk",
                &disk_id,
                "--scratch",
                scratch.to_str().unwrap(),
            ],
            &site.ps.passphrase_file,
        )
        .unwrap();
        assert!(ok, "test failover failed: {err}");
        assert!(out.contains("test image"), "{out}");
    }
    let (ok, out, _) = ripcord(
        &[
            "test-failover",
            "cleanup",
            "--scratch",
            scratch.to_str().unwrap(),
        ],
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(ok && out.contains("removed"), "{out}");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let (log, _) = site.final_point(agent, &disk_id);
    assert!(
        log.matches("disk stream accepted").count() == 1,
        "replication was disturbed:\n{log}"
    );
    site.ps.stop().unwrap();
    let image = site.path().join("final.img");
    let (ok, _, err) = failover(
        &target,
        &disk_id,
        "latest",
        &image,
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(ok, "{err}");
    assert_same(&image, &disk.path, "final failover after test failovers");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn retention_expires_points_and_frees_their_data() {
    let Some(mut site) = Site::builder("retention_expires_points_and_frees_their_data")
        .file_target()
        .ps_config("retention-secs = 4\ngc-interval-secs = 1")
        .start()
    else {
        return;
    };
    let target_dir = site.path().join(FILE_TARGET_DIR);
    let target = site.target().to_owned();
    let disk = site.loop_device("disk.img", 64 * MIB);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    // Overwrite the same 8 MiB again and again: old versions become garbage once the points
    // that need them expire.
    let mut written = 0u64;
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.path)
        .unwrap();
    for round in 0..24u8 {
        use std::os::unix::fs::FileExt as _;
        let buf: Vec<u8> = (0..8 * MIB)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(round))
            .collect();
        dev.write_all_at(&buf, 0).unwrap();
        dev.sync_all().unwrap();
        written += buf.len() as u64;
        std::thread::sleep(Duration::from_millis(500));
    }
    let first_points =
        testkit::replication::points(&target, &disk_id, &site.ps.passphrase_file).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    site.final_point(agent, &disk_id);
    std::thread::sleep(Duration::from_secs(3)); // one more retention pass
    site.ps.stop().unwrap();
    let ps = &site.ps;

    let points = testkit::replication::points(&target, &disk_id, &ps.passphrase_file).unwrap();
    let oldest_before = first_points.first().expect("points during the workload")["time_ns"]
        .as_u64()
        .unwrap();
    let oldest_now = points.first().expect("the newest point is always kept")["time_ns"]
        .as_u64()
        .unwrap();
    assert!(oldest_now > oldest_before, "no point expired: {points:?}");
    let pack_bytes: u64 = walk(&target_dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        pack_bytes < written / 3,
        "expired data not freed: {pack_bytes} bytes of packs for {written} bytes written"
    );
    // Every retained point still restores; the newest equals the device.
    let image = site.path().join("r.img");
    for p in &points {
        let (ok, _, err) = failover(
            &target,
            &disk_id,
            p["id"].as_str().unwrap(),
            &image,
            &ps.passphrase_file,
        )
        .unwrap();
        assert!(ok, "retained point {} does not restore: {err}", p["id"]);
    }
    assert_same(&image, &disk.path, "newest retained point");
    let (ok, out, err) = ripcord(&["verify", "--target", &target], &ps.passphrase_file).unwrap();
    assert!(ok, "verify after GC: {out}{err}");
}

/// Every sampled crash-consistent point of an ext4 and an xfs disk under a file workload
/// mounts (journal/log replay on the copy) and then checks clean.
#[test]
fn ext4_and_xfs_crash_points_mount_and_check_clean() {
    let Some(mut site) = Site::builder("ext4_and_xfs_crash_points_mount_and_check_clean")
        .file_target()
        .start()
    else {
        return;
    };
    let target = site.target().to_owned();
    let ext4 = site.loop_device("ext4.img", 320 * MIB);
    let xfs = site.loop_device("xfs.img", 320 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", ext4.path.to_str().unwrap()]).unwrap();
    testkit::run("mkfs.xfs", &["-q", "-f", xfs.path.to_str().unwrap()]).unwrap();
    let agent = site.replicator(&[&ext4.path, &xfs.path]);
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let m1 = Mount::new(&ext4.path, &site.path().join("m-ext4"), &["-t", "ext4"]).unwrap();
    let m2 = Mount::new(&xfs.path, &site.path().join("m-xfs"), &["-t", "xfs"]).unwrap();
    // Rounds of the file workload (each in a fresh directory, the one before it deleted)
    // until both disks have at least 10 points: the sample must span the workload
    // however fast this build runs it.
    let acked_cuts =
        |stats: &serde_json::Value, i: usize| stats["disks"][i]["acked_cuts"].as_u64().unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    for round in 0u64.. {
        let (d1, d2) = (
            m1.dir.join(format!("r{round}")),
            m2.dir.join(format!("r{round}")),
        );
        let t1 = std::thread::spawn(move || {
            testkit::file_workload(&d1, 21 + 2 * round, 80, 1 << 20).unwrap()
        });
        let t2 = std::thread::spawn(move || {
            testkit::file_workload(&d2, 22 + 2 * round, 80, 1 << 20).unwrap()
        });
        t1.join().unwrap();
        t2.join().unwrap();
        if round > 0 {
            for m in [&m1, &m2] {
                std::fs::remove_dir_all(m.dir.join(format!("r{}", round - 1))).unwrap();
            }
        }
        let stats = agent.stats().unwrap_or_default();
        if (acked_cuts(&stats, 0) >= 10 && acked_cuts(&stats, 1) >= 10)
            || std::time::Instant::now() > deadline
        {
            break;
        }
    }
    m1.unmount().unwrap();
    m2.unmount().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "{log}");
    let (ps, id, dir) = (&site.ps, &site.id, site.path());
    for (dev, fs) in [(&ext4, "ext4"), (&xfs, "xfs")] {
        let disk_id = id.disk_id(&dev.path).unwrap();
        let points = testkit::replication::points(&target, &disk_id, &ps.passphrase_file).unwrap();
        assert!(points.len() >= 5, "{fs}: only {} points", points.len());
        let step = (points.len() / 8).max(1);
        for p in points.iter().step_by(step) {
            let pid = p["id"].as_str().unwrap();
            let image = dir.join(format!("{fs}-{pid}.img"));
            let (ok, _, err) =
                failover(&target, &disk_id, pid, &image, &ps.passphrase_file).unwrap();
            assert!(ok, "{fs} point {pid}: {err}");
            let lo = LoopDevice::attach(&image).unwrap();
            // Mounting replays the journal on the copy, as a recovered machine would.
            let mnt = Mount::new(&lo.path, &dir.join("check"), &["-t", fs])
                .unwrap_or_else(|e| panic!("{fs} point {pid} does not mount: {e:#}"));
            mnt.unmount().unwrap();
            let check = if fs == "ext4" {
                testkit::run("e2fsck", &["-fn", lo.path.to_str().unwrap()])
            } else {
                testkit::run("xfs_repair", &["-n", lo.path.to_str().unwrap()])
            };
            check.unwrap_or_else(|e| panic!("{fs} point {pid} is not clean: {e:#}"));
            drop(lo);
            std::fs::remove_file(&image).unwrap();
        }
    }
    site.ps.stop().unwrap();
}

/// Application-consistent points: with `app-interval-secs = 2` the agent runs the hooks,
/// freezes the mounted file system around a cut, and thaws. A `frozen` hook copies the device
/// while it is frozen; every app point restores to exactly that copy, and to a file
/// system that needs no journal recovery.
#[test]
fn app_consistent_points_equal_the_source_while_frozen() {
    app_points_equal_the_frozen_source(
        "app_consistent_points_equal_the_source_while_frozen",
        "ext4",
    );
}

/// The same on xfs.
#[test]
fn xfs_app_consistent_points_equal_the_source_while_frozen() {
    app_points_equal_the_frozen_source(
        "xfs_app_consistent_points_equal_the_source_while_frozen",
        "xfs",
    );
}

/// Skips (returns) without root; see [`Site::new`].
fn app_points_equal_the_frozen_source(test: &str, fs: &str) {
    let Some(mut site) = Site::builder(test).file_target().start() else {
        return;
    };
    let target = site.target().to_owned();
    // xfs needs at least 300 MB.
    let disk = site.loop_device("disk.img", 320 * MIB);
    let dev = disk.path.to_str().unwrap();
    match fs {
        "ext4" => testkit::run("mkfs.ext4", &["-q", "-F", dev]).unwrap(),
        _ => testkit::run("mkfs.xfs", &["-q", "-f", dev]).unwrap(),
    }

    let hooks = site.path().join("hooks");
    let copies = site.path().join("frozen");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::create_dir_all(&copies).unwrap();
    let hook = hooks.join("10-copy-while-frozen");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n[ \"$1\" = frozen ] || exit 0\nt=$({oracle} now)\n\
             dd if={dev} of={copies}/$t.img bs=1M iflag=direct status=none\n",
            oracle = testkit::binary("ripcord-oracle").display(),
            dev = disk.path.display(),
            copies = copies.display(),
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = site.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "app-interval-secs = 2\nhooks-dir = {:?}\nfreeze-timeout-ms = 10000\n",
            hooks.display().to_string()
        ),
    )
    .unwrap();
    let agent = site.replicator_with(&[&disk.path], &["--config", config.to_str().unwrap()], &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let mnt = Mount::new(&disk.path, &site.path().join("mnt"), &["-t", fs]).unwrap();
    // Write until three frozen copies exist (the file system changes between them).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seed = 1;
    while std::fs::read_dir(&copies).unwrap().count() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than 3 app-consistent freezes in 60 s; agent log:\n{}",
            agent.log()
        );
        testkit::file_workload(&mnt.dir, seed, 10, 1 << 20).unwrap();
        seed += 1;
    }
    mnt.unmount().unwrap();
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    site.final_point(agent, &disk_id);
    site.ps.stop().unwrap();
    let (ps, dir) = (&site.ps, site.path());

    let all = testkit::replication::points(&target, &disk_id, &ps.passphrase_file).unwrap();
    let app: Vec<_> = all.iter().filter(|p| p["kind"] == "app").collect();
    assert!(
        app.len() >= 2,
        "only {} app-consistent points: {all:?}",
        app.len()
    );
    let mut frozen: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&copies)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let t = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            (t, p)
        })
        .collect();
    frozen.sort();
    let image = dir.join("app.img");
    for p in &app {
        let t = p["mono_ns"].as_u64().unwrap();
        // The copy taken in the freeze this point was cut in: the last one before it.
        let (_, copy) = frozen
            .iter()
            .rev()
            .find(|(c, _)| *c < t)
            .unwrap_or_else(|| panic!("no frozen copy before app point {p}"));
        let pid = p["id"].as_str().unwrap();
        let (ok, _, err) = failover(&target, &disk_id, pid, &image, &ps.passphrase_file).unwrap();
        assert!(ok, "failover to {pid} failed: {err}");
        assert_same(
            &image,
            copy,
            &format!("app point {pid} vs the device while frozen"),
        );
        // ext4 is clean without journal recovery; a frozen xfs keeps a log record that
        // xfs_repair wants replayed, so it is mounted once (on the copy) first.
        let lo = LoopDevice::attach(&image).unwrap();
        let check = match fs {
            "ext4" => testkit::run("e2fsck", &["-fn", lo.path.to_str().unwrap()]),
            _ => {
                let m = Mount::new(&lo.path, &dir.join("check"), &["-t", "xfs"])
                    .unwrap_or_else(|e| panic!("xfs app point {pid} does not mount: {e:#}"));
                m.unmount().unwrap();
                testkit::run("xfs_repair", &["-n", lo.path.to_str().unwrap()])
            }
        };
        check.unwrap_or_else(|e| panic!("{fs} app point {pid} is not clean: {e:#}"));
        drop(lo);
    }
    // `latest-app` picks the newest of them.
    let (ok, out, err) =
        failover(&target, &disk_id, "latest-app", &image, &ps.passphrase_file).unwrap();
    assert!(ok, "latest-app failed: {err}");
    let newest = app.last().unwrap()["id"].as_str().unwrap();
    assert!(
        out.contains(newest),
        "latest-app chose another point: {out}"
    );
}

/// A device open exclusively elsewhere is refused at once without a grace, waited for
/// within one (a `kill -9`ed master target's io_uring writes keep its claim for a moment
/// after the process is reaped: CI saw a restart refused so), and refused once the grace
/// runs out, naming the cause.
#[test]
fn a_device_held_exclusively_is_waited_for_only_within_the_grace() {
    use std::os::unix::fs::OpenOptionsExt as _;
    let Some(lab) = Lab::new("a_device_held_exclusively_is_waited_for_only_within_the_grace")
    else {
        return;
    };
    let dev = lab.loop_device("held.img", 8 * MIB);
    let locks = lab.subdir("locks");
    let hold = |for_: Duration| {
        let held = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(&dev.path)
            .expect("holding the device exclusively");
        std::thread::spawn(move || {
            std::thread::sleep(for_);
            drop(held);
        })
    };
    let check = |grace| output_guard::check_output(&dev.path, false, &locks, grace);

    let holder = hold(Duration::from_secs(2));
    let e = check(Duration::ZERO).expect_err("a held device without a grace");
    assert!(format!("{e:#}").contains("open exclusively"), "{e:#}");
    let started = std::time::Instant::now();
    match check(Duration::from_secs(20)).expect("released within the grace") {
        Destination::Device { .. } => {}
        d => panic!("{d:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it was never held"
    );
    holder.join().unwrap();

    let holder = hold(Duration::from_secs(4));
    let started = std::time::Instant::now();
    let e = check(Duration::from_secs(1)).expect_err("held past the grace");
    assert!(format!("{e:#}").contains("open exclusively"), "{e:#}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the grace was not waited"
    );
    holder.join().unwrap();
}
