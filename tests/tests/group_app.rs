//! Application-consistent group points (issue 16, decision 0028): two machines with ext4,
//! each with its own agent, identity and loop device, freeze over the group's instant; a
//! `frozen` hook on each copies its device while frozen, and every application-consistent
//! group point restores, on every member, to exactly that member's copy. A coordinator
//! (the process server with the configuration role) killed during a freeze leaves no file
//! system frozen beyond the freeze timeout. Real binaries, real BPF, real QUIC on
//! loopback, real file systems, failover through the CLI.
//!
//! Needs root (loop devices, BPF, mounts). Skips loudly without it, and fails under
//! `CI=true`.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ripcord_tests::{
    assert_same,
    groups::{self, member_point},
};
use testkit::{
    LoopDevice, Mount, Site,
    replication::{Replicator, failover},
};

const MIB: u64 = 1 << 20;
/// Application-consistent group points checked.
const APP_POINTS: usize = 3;

/// One member machine's disk (ext4), its hooks and its agent's config file.
struct Member {
    dev: LoopDevice,
    /// Where its `frozen` hook copies the device, one `<instant>.img` per group-app point.
    copies: PathBuf,
    config: PathBuf,
}

/// A member named `name`: a 64 MiB ext4 loop device, a hook that copies the device while
/// frozen for a group point (then runs `then`, a shell line), and a config that uses it
/// with `freeze_timeout_ms`.
fn member(site: &Site, name: &str, then: &str, freeze_timeout_ms: u64) -> Member {
    let dev = site.loop_device(&format!("{name}.img"), 64 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", dev.path.to_str().unwrap()]).unwrap();
    let hooks = site.subdir(&format!("hooks-{name}"));
    let copies = site.subdir(&format!("frozen-{name}"));
    let hook = hooks.join("10-copy-while-frozen");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n[ \"$1\" = frozen ] && [ \"$RIPCORD_POINT\" = group-app ] || exit 0\n\
             date +%s%N > {copies}/$RIPCORD_GROUP_INSTANT_NS.frozen-at\n\
             dd if={dev} of={copies}/$RIPCORD_GROUP_INSTANT_NS.img bs=1M iflag=direct \
             status=none\n{then}\n",
            dev = dev.path.display(),
            copies = copies.display(),
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = site.path().join(format!("agent-{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "hooks-dir = {:?}\nfreeze-timeout-ms = {freeze_timeout_ms}\nmetrics-addr = \"\"\n",
            hooks.display().to_string()
        ),
    )
    .unwrap();
    Member {
        dev,
        copies,
        config,
    }
}

/// Writes files on every mount until `stop`, one round of `file_workload` each in turn.
fn write_files(mounts: Vec<PathBuf>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut seed = 1;
        let mut bytes = 0;
        while !stop.load(Ordering::Relaxed) {
            for m in &mounts {
                bytes += testkit::file_workload(m, seed, 4, 256 << 10).unwrap();
                seed += 1;
            }
        }
        bytes
    })
}

#[test]
fn group_app_points_equal_every_members_frozen_copy() {
    let Some(site) = Site::builder("group_app_points_equal_every_members_frozen_copy")
        .file_target()
        .machine("app")
        .start()
    else {
        return;
    };
    let db = site.register("db");
    let a = member(&site, "a", "", 10_000);
    let b = member(&site, "b", "", 10_000);
    // A group point every second, every fifth one application-consistent; 50 ms is the
    // default limit on a point's clock-error bound.
    groups::create_group(&site, "shop", 50, &["app", "db"], &["--app-every", "5"]);
    let config_arg = |m: &Member| m.config.to_str().unwrap().to_owned();
    let (ca, cb) = (config_arg(&a), config_arg(&b));
    let agent_a = site.replicator_with(&[&a.dev.path], &["--config", &ca], &[]);
    let agent_b = Replicator::start(&db, &[&b.dev.path], &["--config", &cb]).unwrap();
    agent_a.wait_synced(Duration::from_secs(60)).unwrap();
    agent_b.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_a = site.id.disk_id(&a.dev.path).unwrap();
    let disk_b = db.disk_id(&b.dev.path).unwrap();
    let mnt_a = Mount::new(&a.dev.path, &site.path().join("mnt-a"), &["-t", "ext4"]).unwrap();
    let mnt_b = Mount::new(&b.dev.path, &site.path().join("mnt-b"), &["-t", "ext4"]).unwrap();

    let since = testkit::replication::now_ns();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_files(
        vec![mnt_a.dir.clone(), mnt_b.dir.clone()],
        Arc::clone(&stop),
    );
    let logs = || {
        format!(
            "agent A:\n{}\nagent B:\n{}\nserver:\n{}",
            agent_a.log(),
            agent_b.log(),
            site.ps.logs()
        )
    };
    let app_points = groups::wait_for_group_points(
        &site,
        "shop",
        since,
        APP_POINTS,
        Duration::from_secs(180),
        &|p| p["app"] == true,
        &logs,
    );
    // Crash-consistent group points go on between them (one late cut leaves an instant
    // without its point, so a loaded machine may need a few).
    groups::wait_for_group_points(
        &site,
        "shop",
        since,
        1,
        Duration::from_secs(120),
        &|p| p["app"] == false,
        &logs,
    );
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0);

    let image = site.path().join("restored.img");
    let mut distinct = std::collections::HashSet::new();
    for p in &app_points[..APP_POINTS] {
        let instant = p["instant_ns"].as_u64().unwrap();
        assert!(p["bound_ns"].as_u64().unwrap() <= 50_000_000, "{p}");
        for (disk, m) in [(&disk_a, &a), (&disk_b, &b)] {
            let point = member_point(p, disk);
            let (ok, out, err) =
                failover(site.target(), disk, point, &image, &site.ps.passphrase_file).unwrap();
            assert!(ok, "failover of {disk} to {point}:\n{out}{err}");
            assert!(out.contains("app-consistent"), "{out}");
            // Frozen before the coordinator's instant (the hook runs once it is frozen;
            // both clocks are this host's, so no skew enters).
            let frozen_at: u64 =
                std::fs::read_to_string(m.copies.join(format!("{instant}.frozen-at")))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
            assert!(
                frozen_at < instant,
                "{disk} was frozen at {frozen_at}, after the group instant {instant}"
            );
            let copy = m.copies.join(format!("{instant}.img"));
            assert!(
                copy.exists(),
                "no frozen copy of {disk} for the group instant {instant}: {p}\n{}",
                logs()
            );
            assert_same(
                &image,
                &copy,
                &format!("{disk} at group-app point {instant} vs its device while frozen"),
            );
            testkit::run("e2fsck", &["-fn", image.to_str().unwrap()]).unwrap();
            let sum = testkit::sys::run_output("sha256sum", &[image.to_str().unwrap()]).unwrap();
            distinct.insert(sum.split_whitespace().next().unwrap_or_default().to_owned());
        }
    }
    // The points are not all the same state: the file systems changed between them.
    assert!(
        distinct.len() > 2,
        "only {} distinct images among the app points",
        distinct.len()
    );
    // The agents first: one killed while frozen would leave its file system frozen (the
    // mounts' drop thaws that too).
    drop(agent_a);
    drop(agent_b);
    drop(mnt_a);
    drop(mnt_b);
}

/// Whether a file can be written (and synced) on `dir` within `within`; a frozen file
/// system blocks the write. The writing thread is left behind if it is still blocked.
fn writable_within(dir: &Path, within: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let file = dir.join("probe");
    std::thread::spawn(move || {
        use std::io::Write as _;
        let r = std::fs::File::create(&file).and_then(|mut f| {
            f.write_all(b"thawed")?;
            f.sync_all()
        });
        let _ = tx.send(r.is_ok());
    });
    rx.recv_timeout(within).unwrap_or(false)
}

#[test]
fn a_coordinator_killed_during_a_group_freeze_leaves_nothing_frozen_beyond_the_timeout() {
    const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
    let Some(mut site) = Site::builder(
        "a_coordinator_killed_during_a_group_freeze_leaves_nothing_frozen_beyond_the_timeout",
    )
    .file_target()
    .machine("app")
    .start() else {
        return;
    };
    let db = site.register("db");
    let marker = site.path().join("frozen-marker");
    // A's frozen hook says it is frozen, then holds the freeze 2 s: the test kills the
    // coordinator meanwhile.
    let then = format!("touch {}; sleep 2", marker.display());
    let timeout_ms = FREEZE_TIMEOUT.as_millis() as u64;
    let a = member(&site, "a", &then, timeout_ms);
    let b = member(&site, "b", "", timeout_ms);
    groups::create_group(&site, "shop", 50, &["app", "db"], &["--app-every", "5"]);
    let (ca, cb) = (
        a.config.to_str().unwrap().to_owned(),
        b.config.to_str().unwrap().to_owned(),
    );
    let agent_a = site.replicator_with(&[&a.dev.path], &["--config", &ca], &[]);
    let agent_b = Replicator::start(&db, &[&b.dev.path], &["--config", &cb]).unwrap();
    agent_a.wait_synced(Duration::from_secs(60)).unwrap();
    agent_b.wait_synced(Duration::from_secs(60)).unwrap();
    let mnt_a = Mount::new(&a.dev.path, &site.path().join("mnt-a"), &["-t", "ext4"]).unwrap();
    let mnt_b = Mount::new(&b.dev.path, &site.path().join("mnt-b"), &["-t", "ext4"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "no group freeze on A within 120 s:\n{}",
            agent_a.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let frozen_seen = Instant::now();
    site.ps.kill9();
    // A was frozen when the coordinator died; both file systems must take writes again
    // within the freeze timeout (from A's freeze, before the marker) plus a margin.
    let limit = FREEZE_TIMEOUT + Duration::from_secs(3);
    for (name, mnt) in [("A", &mnt_a), ("B", &mnt_b)] {
        let left = limit.saturating_sub(frozen_seen.elapsed());
        assert!(
            writable_within(&mnt.dir, left),
            "{name}'s file system still frozen {:?} after the coordinator died frozen \
             (freeze timeout {FREEZE_TIMEOUT:?}):\nagent A:\n{}\nagent B:\n{}",
            frozen_seen.elapsed(),
            agent_a.log(),
            agent_b.log()
        );
    }
    eprintln!(
        "both file systems writable {:?} after the coordinator was killed during the freeze",
        frozen_seen.elapsed()
    );
    drop(agent_a);
    drop(agent_b);
    drop(mnt_a);
    drop(mnt_b);
}

/// An agent killed during an application-consistent point leaves its file systems frozen
/// (its watchdog dies with it) and its marker listing them; the next agent on the device
/// thaws what the marker lists at start-up and says so. A freeze someone else made (no
/// marker: a backup tool's) is left alone.
#[test]
fn an_agent_thaws_what_a_killed_agent_left_frozen_and_nothing_else() {
    let Some(site) =
        Site::builder("an_agent_thaws_what_a_killed_agent_left_frozen_and_nothing_else")
            .file_target()
            .start()
    else {
        return;
    };
    let dev = site.loop_device("disk.img", 32 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", dev.path.to_str().unwrap()]).unwrap();
    let mnt = Mount::new(&dev.path, &site.path().join("mnt"), &["-t", "ext4"]).unwrap();
    let dir = mnt.dir.to_str().unwrap().to_owned();
    testkit::run("fsfreeze", &["-f", &dir]).unwrap();
    assert!(
        !writable_within(&mnt.dir, Duration::from_millis(500)),
        "fsfreeze did not freeze"
    );
    // Someone else's freeze: the agent leaves it.
    let agent = site.replicator(&[&dev.path]);
    assert!(
        !writable_within(&mnt.dir, Duration::from_secs(2)),
        "the agent thawed a freeze it did not make:\n{}",
        agent.log()
    );
    drop(agent);
    // What a killed agent leaves: the freeze, and its marker.
    std::fs::write(site.id.state_dir.join("frozen-mounts"), format!("{dir}\n")).unwrap();
    let agent = site.replicator(&[&dev.path]);
    assert!(
        writable_within(&mnt.dir, Duration::from_secs(10)),
        "still frozen after the agent started:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("was left frozen by an agent"),
        "the agent did not say it thawed:\n{}",
        agent.log()
    );
    assert!(!site.id.state_dir.join("frozen-mounts").exists());
    drop(agent);
    drop(mnt);
}
