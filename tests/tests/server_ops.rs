//! The process server for operators: it stops within a bound even while a full cache holds
//! its journal writes; a full cache holds acknowledgements and replication resumes by
//! itself when space returns; a cache disk that stops taking writes holds acknowledgements
//! while the server keeps answering; and a full target store is named, counted and
//! recovered from without anyone's help.
//!
//! Needs root (tmpfs mounts, loop devices, BPF). Skips loudly without it, and fails under
//! `CI=true`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ripcord_tests::{http_get, metric, write_random_at};
use testkit::{LoopDevice, Mount, Scratch, Site, replication::wait_for, sys::Frozen};

const MIB: u64 = 1 << 20;

/// A tmpfs of `mib` MiB at `dir`.
fn tmpfs(dir: &Path, mib: u64) -> Mount {
    Mount::new(
        Path::new("tmpfs"),
        dir,
        &["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700")],
    )
    .expect("mounting a tmpfs")
}

/// Fills the file system of `dir` with a file `filler` until `leave_mib` MiB stay free.
fn fill_leaving(dir: &Path, leave_mib: u64) {
    fill_leaving_with(dir, "filler", leave_mib);
}

/// Fills the file system of `dir` with a new file `name` until `leave_mib` MiB stay free.
fn fill_leaving_with(dir: &Path, name: &str, leave_mib: u64) {
    let st = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    let free = st.blocks_available() * st.fragment_size();
    let fill = free.saturating_sub(leave_mib * MIB);
    let mut f = std::fs::File::create(dir.join(name)).expect("filler");
    let chunk = vec![0x5au8; MIB as usize];
    let mut done = 0;
    while done + MIB <= fill {
        f.write_all(&chunk).expect("filling");
        done += MIB;
    }
    f.sync_all().unwrap();
}

/// Writes `mib` MiB of incompressible data at the start of `device`.
fn write_random(device: &Path, mib: u64) {
    write_random_at(device, 0, mib, 7);
}

/// A site whose process server caches on a tmpfs of `mib` MiB (`segment-mib = 4`, then
/// `extra` ps.toml lines); `build` adds to the site. The tmpfs lives outside the site's
/// scratch directory, and the fields drop in order: the site (its server killed), then the
/// tmpfs (unmounted), then its directory. Bind it whole: a field left out of a pattern
/// would be dropped at once.
struct CacheSite {
    site: Site,
    cache_dir: PathBuf,
    _cache: Mount,
    _cache_device: Option<LoopDevice>,
    _root: Scratch,
}

/// What the process server's cache lives on.
#[derive(Clone, Copy)]
enum CacheFs {
    Tmpfs,
    /// ext4 on a loop device: a file system that can be frozen.
    Ext4,
}

fn cache_site(
    test: &str,
    mib: u64,
    extra: &str,
    build: impl FnOnce(testkit::fixture::SiteBuilder) -> testkit::fixture::SiteBuilder,
) -> Option<CacheSite> {
    cache_site_on(test, CacheFs::Tmpfs, mib, extra, build)
}

fn cache_site_on(
    test: &str,
    fs: CacheFs,
    mib: u64,
    extra: &str,
    build: impl FnOnce(testkit::fixture::SiteBuilder) -> testkit::fixture::SiteBuilder,
) -> Option<CacheSite> {
    if !testkit::require_root(test) {
        return None;
    }
    let root = Scratch::new(&format!("{mib}m-cache"));
    let cache_dir = root.path.join("cache");
    let (cache, cache_device) = match fs {
        CacheFs::Tmpfs => (tmpfs(&cache_dir, mib), None),
        CacheFs::Ext4 => {
            let device = LoopDevice::create(&root.path.join("cache.img"), mib * MIB)
                .expect("a loop device for the cache");
            let dev = device.path.to_str().expect("path");
            testkit::sys::run("mkfs.ext4", &["-q", dev]).expect("mkfs.ext4 on the cache device");
            let mount = Mount::new(&device.path, &cache_dir, &[]).expect("mounting the cache");
            (mount, Some(device))
        }
    };
    let site = build(Site::builder(test).ps_config(&format!(
        "cache-dir = \"{}\"\nsegment-mib = 4\n{extra}",
        cache_dir.display()
    )))
    .start()?;
    Some(CacheSite {
        site,
        cache_dir,
        _cache: cache,
        _cache_device: cache_device,
        _root: root,
    })
}

#[test]
fn a_server_held_by_a_full_cache_still_stops_within_a_bound() {
    let test = "a_server_held_by_a_full_cache_still_stops_within_a_bound";
    let Some(mut c) = cache_site(test, 48, "", |b| b) else {
        return;
    };
    let (site, cache_dir) = (&mut c.site, c.cache_dir.clone());
    let disk = site.loop_device("disk.img", 32 * MIB);
    write_random(&disk.path, 24);
    // Less than min-free-mib (16) stays free: the server holds every acknowledgement.
    fill_leaving(&cache_dir, 10);
    let agent = site.replicator(&[&disk.path]);
    wait_for(
        "the server to hold acknowledgements",
        Duration::from_secs(30),
        || Ok(site.ps.logs().contains("holding acknowledgements")),
    )
    .unwrap();

    let started = Instant::now();
    let stopped = site.ps.stop();
    let took = started.elapsed();
    drop(agent);
    let logs = site.ps.logs();
    assert!(
        stopped.is_ok() && took < Duration::from_secs(15),
        "ripcord-ps took {took:?} to stop while its cache was full ({stopped:?}):\n{logs}"
    );
    assert!(
        logs.contains("shutting down:") && logs.contains("not yet journaled"),
        "the server did not say what it was leaving behind:\n{logs}"
    );
}

/// A full cache holds the agent's acknowledgements (back-pressure) and loses nothing; once
/// space returns, replication resumes by itself in the same epoch (no resync), and the
/// newest point equals the device.
#[test]
fn a_full_cache_holds_acknowledgements_and_replication_resumes_when_space_returns() {
    let test = "a_full_cache_holds_acknowledgements_and_replication_resumes_when_space_returns";
    let Some(c) = cache_site(test, 48, "", |b| b.file_target()) else {
        return;
    };
    let (site, cache_dir) = (&c.site, &c.cache_dir);
    let disk = site.loop_device("disk.img", 32 * MIB);
    write_random(&disk.path, 8);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let acked = |field: &str| {
        agent
            .stats()
            .and_then(|s| s["disks"][0][field].as_u64())
            .unwrap_or(0)
    };
    wait_for(
        "the initial sync to be acknowledged",
        Duration::from_secs(60),
        || Ok(acked("acked_seq") > 0 && acked("acked_seq") == acked("pushed_seq")),
    )
    .unwrap();

    // Less than min-free-mib (16) stays free: new writes are held, not acknowledged.
    fill_leaving(cache_dir, 10);
    write_random_at(&disk.path, 12, 12, 11);
    wait_for(
        "the server to hold acknowledgements",
        Duration::from_secs(30),
        || Ok(site.ps.logs().contains("holding acknowledgements")),
    )
    .unwrap();
    wait_for(
        "the agent to push the new data",
        Duration::from_secs(30),
        || Ok(acked("pushed_seq") > acked("acked_seq")),
    )
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
    let held_at = acked("acked_seq");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        acked("acked_seq"),
        held_at,
        "batches were acknowledged while the cache had no space for them"
    );
    // Operators see the hold while it lasts.
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "ripcord_ps_acks_held_for_space",
            "machine=\"host\""
        ),
        1.0,
        "the hold does not show in the metrics:\n{metrics}"
    );

    // Space returns: everything pushed is acknowledged without anyone's help.
    std::fs::remove_file(cache_dir.join("filler")).unwrap();
    wait_for(
        "the held batches to be acknowledged",
        Duration::from_secs(60),
        || Ok(acked("acked_seq") == acked("pushed_seq") && acked("acked_seq") > held_at),
    )
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "ripcord_ps_acks_held_for_space",
            "machine=\"host\""
        ),
        0.0,
        "the hold still shows after it ended:\n{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "ripcord_ps_backpressure_waits_total",
            "machine=\"host\""
        ) >= 1.0,
        "the hold is not counted:\n{metrics}"
    );
    assert!(
        site.ps.logs().contains("cache space is back"),
        "the server did not say the hold ended:\n{}",
        site.ps.logs()
    );
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let (log, point) = site.final_point(agent, &disk_id);
    assert_eq!(
        point["epoch"].as_u64(),
        Some(1),
        "replication started over in a new epoch: {point}\n{log}"
    );
    let image = site.path().join("replica.img");
    let id = point["id"].as_str().unwrap();
    let (ok, _, err) = testkit::replication::failover(
        site.target(),
        &disk_id,
        id,
        &image,
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(ok, "failover to {id} failed: {err}");
    let diff = testkit::sys::diff_sectors(&image, &disk.path).expect("compare");
    assert!(
        diff.is_empty(),
        "the replica differs from the device in {} sectors",
        testkit::ranges::total(&diff)
    );
}

/// A cache disk that stops taking writes (frozen: every journal write and fsync waits)
/// holds acknowledgements, and the server keeps answering meanwhile: its metrics, and the
/// handshake of a restarted agent whose two disk streams open while both journals are
/// stuck in a group commit (opening a stream for a disk must not wait for that disk's
/// journal on a runtime worker; with two workers, two such waits silence the server).
/// Once the cache thaws, replication resumes and every replica equals its device.
#[test]
fn a_stalled_cache_disk_holds_acknowledgements_but_the_server_keeps_answering() {
    let test = "a_stalled_cache_disk_holds_acknowledgements_but_the_server_keeps_answering";
    let Some(c) = cache_site_on(test, CacheFs::Ext4, 256, "", |b| b.file_target()) else {
        return;
    };
    let (site, cache_dir) = (&c.site, &c.cache_dir);
    let disks = [
        site.loop_device("a.img", 32 * MIB),
        site.loop_device("b.img", 32 * MIB),
    ];
    let paths: Vec<&Path> = disks.iter().map(|d| d.path.as_path()).collect();
    for (n, d) in paths.iter().enumerate() {
        write_random_at(d, 0, 4, n as u64);
    }
    let mut agent = site.replicator(&paths);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let ids: Vec<String> = paths.iter().map(|p| site.id.disk_id(p).unwrap()).collect();
    let seqs = |agent: &testkit::replication::Replicator, field: &str| -> Vec<u64> {
        let stats = agent.stats().unwrap_or_default();
        ids.iter()
            .map(|id| {
                stats["disks"]
                    .as_array()
                    .and_then(|d| d.iter().find(|d| d["disk_id"] == id.as_str()))
                    .and_then(|d| d[field].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    };
    wait_for(
        "the initial sync to be acknowledged",
        Duration::from_secs(60),
        || Ok(seqs(&agent, "acked_seq") == seqs(&agent, "pushed_seq")),
    )
    .unwrap();

    // The cache freezes with both disks' streams writing: their group commits wait.
    let frozen = Frozen::new(cache_dir).expect("freezing the cache");
    let frozen_at = Instant::now();
    for (n, d) in paths.iter().enumerate() {
        write_random_at(d, 8, 4, 10 + n as u64);
    }
    wait_for(
        "the agent to push batches the frozen cache cannot journal",
        Duration::from_secs(30),
        || {
            let (pushed, acked) = (seqs(&agent, "pushed_seq"), seqs(&agent, "acked_seq"));
            Ok(pushed.iter().zip(&acked).all(|(p, a)| p > a))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
    let held = seqs(&agent, "acked_seq");

    // The agent dies and comes back: its new connection opens both disks' streams while
    // the old streams' group commits still hold the journals.
    agent.kill9();
    drop(agent);
    let agent = site.replicator(&paths);
    let restarted_at = Instant::now();
    // For 12 s (twice the agent's idle timeout), the server answers its metrics within 2 s
    // every time it is asked, and the agent's handshake completes.
    let mut slowest = Duration::ZERO;
    while restarted_at.elapsed() < Duration::from_secs(12) {
        let asked = Instant::now();
        let metrics = http_get(site.ps.metrics_port, "/metrics");
        slowest = slowest.max(asked.elapsed());
        assert!(
            metrics.contains("ripcord_ps_connections"),
            "the metrics endpoint answered without metrics:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        slowest < Duration::from_secs(2),
        "the server took {slowest:?} to answer its metrics while the cache was frozen"
    );
    let log = agent.log();
    assert!(
        log.contains("connected to")
            && !log.contains("no answer from the process server")
            && !log.contains("reconnecting in"),
        "the server did not answer the restarted agent while the cache was frozen:\n{log}\n\
         process server log:\n{}",
        site.ps.logs()
    );
    assert_eq!(
        seqs(&agent, "acked_seq").iter().max(),
        Some(&0),
        "the restarted agent got acknowledgements while the cache was frozen (held before: \
         {held:?})"
    );

    // The cache thaws after about 20 s: everything goes through, nothing was lost.
    std::thread::sleep(Duration::from_secs(20).saturating_sub(frozen_at.elapsed()));
    frozen.thaw().expect("thawing the cache");
    agent.wait_synced(Duration::from_secs(90)).unwrap();
    let (log, points) =
        site.final_points(agent, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    for ((point, id), device) in points.iter().zip(&ids).zip(&paths) {
        let image = site.path().join(format!("{id}.img"));
        let point_id = point["id"].as_str().unwrap();
        let (ok, _, err) = testkit::replication::failover(
            site.target(),
            id,
            point_id,
            &image,
            &site.ps.passphrase_file,
        )
        .unwrap();
        assert!(ok, "failover of {id} to {point_id} failed: {err}\n{log}");
        let diff = testkit::sys::diff_sectors(&image, device).expect("compare");
        assert!(
            diff.is_empty(),
            "the replica of {} differs from the device in {} sectors",
            device.display(),
            testkit::ranges::total(&diff)
        );
    }
}

/// `ripcord-ps health` as an operator's monitoring sees it.
fn health(site: &Site) -> (i32, String) {
    let out = std::process::Command::new(testkit::binary("ripcord-ps"))
        .args(["health", "--dir"])
        .arg(&site.ps.dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Health follows the seeds' table on the cache signal: free space at 25-30% turns the
/// server orange, below 25% red, and it is green again once space returns; each level shows
/// in `ripcord-ps health` (text and exit status), the metrics and the log.
#[test]
fn a_filling_cache_turns_the_server_orange_then_red_then_green_again() {
    let test = "a_filling_cache_turns_the_server_orange_then_red_then_green_again";
    let health_config = "[health]\nsample-ms = 200\ncache-window-secs = 1\n";
    let Some(c) = cache_site(test, 100, health_config, |b| b) else {
        return;
    };
    let (site, cache_dir) = (&c.site, &c.cache_dir);
    let level = |want: i32, name: &str| {
        wait_for(
            &format!("the server to turn {name}"),
            Duration::from_secs(20),
            || Ok(health(site).0 == want),
        )
        .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", health(site), site.ps.logs()));
        let (_, text) = health(site);
        assert!(
            text.starts_with(&format!("health: {name}")),
            "ripcord-ps health says:\n{text}"
        );
        let metrics = http_get(site.ps.metrics_port, "/metrics");
        assert_eq!(
            metric(&metrics, "ripcord_ps_health ", ""),
            f64::from(want),
            "{metrics}"
        );
        text
    };
    let text = level(0, "green");
    assert!(text.contains("cpu") && text.contains("upload"), "{text}");

    fill_leaving_with(cache_dir, "filler", 28);
    let text = level(1, "orange");
    assert!(
        text.lines()
            .any(|l| l.contains("cache") && l.contains("orange")),
        "the cache is not named as the cause:\n{text}"
    );
    fill_leaving_with(cache_dir, "more", 15);
    level(2, "red");
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    assert_eq!(
        metric(&metrics, "ripcord_ps_health_signal", "signal=\"cache\""),
        2.0,
        "{metrics}"
    );
    // The configuration role holds the alert while the signal is red.
    let status = ripcord_tests::ripcord_status(&site.ps.dir);
    let alerts = status["alerts"].as_array().unwrap();
    assert!(
        alerts
            .iter()
            .any(|a| a["kind"] == "health-cache" && a["severity"] == "critical"),
        "no critical cache alert in the configuration database: {status:#}"
    );
    std::fs::remove_file(cache_dir.join("filler")).unwrap();
    std::fs::remove_file(cache_dir.join("more")).unwrap();
    level(0, "green");
    wait_for("the cache alert to clear", Duration::from_secs(20), || {
        let status = ripcord_tests::ripcord_status(&site.ps.dir);
        Ok(!status["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "health-cache"))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:#}", ripcord_tests::ripcord_status(&site.ps.dir)));
    let logs = site.ps.logs();
    for said in [
        "health is orange: cache",
        "health is red: cache",
        "health is green again",
    ] {
        assert!(
            logs.contains(said),
            "the log does not say {said:?}:\n{logs}"
        );
    }
}

#[test]
fn a_full_target_is_named_counted_and_recovered_from() {
    if !testkit::require_root("a_full_target_is_named_counted_and_recovered_from") {
        return;
    }
    let target_root = Scratch::new("full-target");
    let target_dir = target_root.path.join("store");
    let _target = tmpfs(&target_dir, 40);
    let Some(site) = Site::builder("a_full_target_is_named_counted_and_recovered_from")
        .target(&format!("file://{}", target_dir.display()))
        .ps_config("[health]\nsample-ms = 200\nupload-warn-secs = 2\nupload-critical-secs = 4\n")
        .start()
    else {
        return;
    };
    // The deployment's escrow file is in the store; now leave too little for the data.
    fill_leaving(&target_dir, 2);
    let disk = site.loop_device("disk.img", 32 * MIB);
    write_random(&disk.path, 16);
    let agent = site.replicator(&[&disk.path]);

    let failure = "the target's file system is full";
    wait_for(
        "an upload failure to be logged",
        Duration::from_secs(60),
        || Ok(site.ps.logs().contains(failure)),
    )
    .unwrap();
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    assert_eq!(
        metric(&metrics, "ripcord_ps_uploads_failing", "machine=\"host\""),
        1.0,
        "{metrics}"
    );
    // Retries go on (with backoff), but the log says it once, not once per attempt.
    std::thread::sleep(Duration::from_secs(8));
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    let attempts = metric(
        &metrics,
        "ripcord_ps_upload_errors_total",
        "machine=\"host\"",
    );
    let logs = site.ps.logs();
    let logged = logs.matches(failure).count();
    assert!(
        attempts >= 3.0 && logged <= 2,
        "{attempts} failed attempts logged {logged} times:\n{logs}"
    );
    assert!(
        !logs.contains("check connectivity"),
        "a full disk was blamed on the network:\n{logs}"
    );
    // The agent hears it too: its data is durable on the server but makes no points.
    wait_for("the agent to learn", Duration::from_secs(20), || {
        Ok(agent
            .log()
            .contains("cannot upload this disk's data to the target store"))
    })
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));

    // Failing uploads turn the server red once they have failed for the critical time.
    wait_for("the server to turn red", Duration::from_secs(30), || {
        Ok(health(&site).0 == 2)
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", health(&site)));
    let (_, text) = health(&site);
    assert!(
        text.lines()
            .any(|l| l.contains("upload") && l.contains("red") && l.contains("failing for")),
        "the failing uploads are not named as the cause:\n{text}"
    );

    // Space returns: uploads resume by themselves and recovery points appear.
    std::fs::remove_file(target_dir.join("filler")).unwrap();
    wait_for("uploads to recover", Duration::from_secs(60), || {
        Ok(site.ps.logs().contains("uploads work again"))
    })
    .unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    testkit::replication::wait_for_point(
        site.target(),
        &disk_id,
        &site.ps.passphrase_file,
        1,
        Duration::from_secs(60),
    )
    .unwrap();
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    assert_eq!(
        metric(&metrics, "ripcord_ps_uploads_failing", "machine=\"host\""),
        0.0,
        "{metrics}"
    );
    wait_for("the server to turn green", Duration::from_secs(30), || {
        Ok(health(&site).0 == 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", health(&site)));
    wait_for(
        "the agent to hear of the recovery",
        Duration::from_secs(20),
        || Ok(agent.log().contains("the process server uploads again")),
    )
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
    drop(agent);
}

/// A disk whose data stops becoming recovery points (the target fills up after a first
/// point) is warned about once its newest point is older than `point-age-warn-secs`, and
/// the point's age is a metric that drops again once points are made. The device the
/// agent protects stands next to the disk id in the metrics, the points list and the logs.
#[test]
fn a_disk_whose_newest_point_grows_old_is_warned_about_and_its_age_is_a_metric() {
    let test = "a_disk_whose_newest_point_grows_old_is_warned_about_and_its_age_is_a_metric";
    if !testkit::require_root(test) {
        return;
    }
    let target_root = Scratch::new("stale-target");
    let target_dir = target_root.path.join("store");
    let _target = tmpfs(&target_dir, 64);
    let Some(site) = Site::builder(test)
        .target(&format!("file://{}", target_dir.display()))
        .ps_config("point-age-warn-secs = 10\n")
        .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let pushed = testkit::replication::Replicator::pushed_seq(&agent.stats_file);
    testkit::replication::wait_for_point(
        site.target(),
        &disk_id,
        &site.ps.passphrase_file,
        pushed,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", site.ps.logs()));
    let age = |metrics: &str| {
        metric(
            metrics,
            "ripcord_ps_newest_point_age_seconds",
            &format!("disk=\"{disk_id}\""),
        )
    };
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    let fresh = age(&metrics);
    assert!(fresh < 10.0, "the point just made is {fresh} s old");

    // The device the agent protects stands next to the disk id: in the metrics (an info
    // series), in the points list (JSON and table) and in the server's log lines.
    let device = disk.path.display().to_string();
    let info = metrics
        .lines()
        .find(|l| l.starts_with("ripcord_ps_disk_info{") && l.contains(&disk_id))
        .unwrap_or_else(|| panic!("no ripcord_ps_disk_info for {disk_id}:\n{metrics}"));
    assert!(
        info.contains(&format!("device=\"{device}\""))
            && info.contains("machine=\"host\"")
            && info.ends_with(" 1"),
        "the info series does not name the device {device}: {info}"
    );
    let listed =
        testkit::replication::points(site.target(), &disk_id, &site.ps.passphrase_file).unwrap();
    assert!(
        listed.iter().all(|p| p["device"] == device.as_str()),
        "points list --json does not name the device {device}: {listed:?}"
    );
    let (ok, table, err) = testkit::replication::ripcord(
        &[
            "points",
            "list",
            "--target",
            site.target(),
            "--disk",
            &disk_id,
        ],
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(ok, "ripcord points list failed: {err}");
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        table.lines().next().is_some_and(|h| h.contains("device"))
            && row.contains(&disk_id)
            && row.contains(&device)
            && row.contains("host"),
        "the points table does not name the device {device}:\n{table}"
    );
    let logs = site.ps.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("disk stream open") && l.contains(&disk_id) && l.contains(&device)),
        "the server's log does not name the device {device}:\n{logs}"
    );

    // The target fills up; new data waits in the journal and makes no points.
    fill_leaving(&target_dir, 0);
    write_random(&disk.path, 8);
    let stale =
        |l: &&str| l.contains("the newest recovery point is ") && l.contains("uploads fail");
    wait_for("the stale-point warning", Duration::from_secs(60), || {
        Ok(site.ps.logs().lines().any(|l| stale(&l)))
    })
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", site.ps.logs()));
    let logs = site.ps.logs();
    let line = logs.lines().find(stale).unwrap();
    assert!(
        line.contains("old while new data waits in the journal")
            && line.contains(&disk_id)
            && line.contains(&device)
            && line.contains("host"),
        "the warning does not say which disk, how old and why:\n{line}"
    );
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    let old = age(&metrics);
    assert!(
        old >= 10.0,
        "the newest point is only {old} s old:\n{metrics}"
    );

    // Space returns: points are made again and the age drops.
    std::fs::remove_file(target_dir.join("filler")).unwrap();
    wait_for("a new recovery point", Duration::from_secs(60), || {
        Ok(age(&http_get(site.ps.metrics_port, "/metrics")) < 10.0)
    })
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", site.ps.logs()));
    drop(agent);
}

/// `ripcord-ps` (the binary at `bin`) with `args` as `uid` (root if `None`): (success,
/// stdout + stderr).
fn ps_as(bin: &Path, uid: Option<u32>, args: &[&str]) -> (bool, String) {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("running ripcord-ps");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_deployment_is_private_and_its_tools_say_what_they_mean() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(site) =
        Site::builder("a_deployment_is_private_and_its_tools_say_what_they_mean").start()
    else {
        return;
    };
    let dir = site.ps.dir.to_str().unwrap().to_owned();
    // A copy of the binary that `nobody` may run (the build directory may be private).
    let bin = site.subdir("bin").join("ripcord-ps");
    std::fs::copy(testkit::binary("ripcord-ps"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for d in [site.path(), bin.parent().unwrap()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&site.ps.dir), 0o700, "deployment directory");
    for file in ["ca/ca.key", "escrow.json", "server/server.key"] {
        let m = mode(&site.ps.dir.join(file));
        assert_eq!(m & 0o077, 0, "{file} is readable by others (mode {m:o})");
    }

    // Someone else (nobody) is told they may not read it, not that it is no deployment.
    let (ok, out) = ps_as(&bin, Some(65534), &["machines", "list", "--dir", &dir]);
    assert!(!ok && out.contains("permission denied"), "{out}");
    assert!(!out.contains("not a deployment"), "{out}");
    // A directory without a deployment is named as such, with the command that makes one.
    let empty = site.subdir("empty");
    let (ok, out) = ps_as(
        &bin,
        None,
        &["machines", "list", "--dir", empty.to_str().unwrap()],
    );
    assert!(
        !ok && out.contains("is not a deployment") && out.contains("ripcord-ps init"),
        "{out}"
    );

    // A token comes with everything needed to use it.
    let (ok, out) = ps_as(&bin, None, &["token", "--dir", &dir]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("ca-hash: {}", site.ps.ca_hash))
            && out.contains("ripcord-agent register --server localhost:")
            && out.contains(&format!("--ca-hash {}", site.ps.ca_hash)),
        "{out}"
    );
    let (ok, out) = ps_as(&bin, None, &["machines", "list", "--json", "--dir", &dir]);
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("machines list --json: {e}: {out}"));
    assert!(ok && line["machine"] == "host", "{out}");
}

#[test]
fn a_cache_too_small_for_min_free_mib_is_refused_at_start() {
    if !testkit::require_root("a_cache_too_small_for_min_free_mib_is_refused_at_start") {
        return;
    }
    let cache_root = Scratch::new("small-cache");
    let cache_dir = cache_root.path.join("cache");
    let _cache = tmpfs(&cache_dir, 16);
    let lab = testkit::Lab::new("a_cache_too_small_for_min_free_mib_is_refused_at_start").unwrap();
    let err = testkit::replication::ProcessServer::start_with_config(
        lab.path(),
        None,
        &format!("cache-dir = \"{}\"\n", cache_dir.display()),
    )
    .err()
    .expect("a server whose cache can never leave min-free-mib free started");
    let text = format!("{err:#}");
    assert!(
        text.contains("holds 16 MiB in all") && text.contains("min-free-mib"),
        "{text}"
    );
}
