//! Recovery points under real churn: eight concurrent O_DIRECT writers with a hot set,
//! paced near half of what replication sustains, as a database writes.
//!
//! - On ext4 (the writers on a preallocated file): a point at least every
//!   `max-point-gap` for the whole run (the agent may force one by freezing the file
//!   system), and every point, failed over and mounted (journal replayed on the copy),
//!   holds a file that passes the write-order checker at the point's instant.
//! - On a raw device (nothing to freeze): every point that exists passes the checker on
//!   the device image, the gap the agent reports (stats and Prometheus) matches what the
//!   store holds, and a gap past the bound is never silent: it raises the alert.
//!
//! Needs root. Skips loudly without it, and fails under `CI=true`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use ripcord_tests::{http_get, metric};
use testkit::{
    LoopDevice, Mount, Site,
    replication::{ProcessServer, Replicator, failover, free_tcp_port, points, wait_for_point},
};

const MIB: u64 = 1 << 20;

/// Oracle writers: 8 in flight, 1 to `max_blocks` blocks of 4 KiB each, a hot set of
/// `hot_blocks` at the start of the region, an fdatasync every 64 writes. (At 2000 op/s
/// and 16 blocks: about 70 MB/s.)
fn churn(
    target: &Path,
    log: &Path,
    seconds: u32,
    max_blocks: u32,
    hot_blocks: u32,
    extra: &[&str],
) -> Child {
    Command::new(testkit::binary("ripcord-oracle"))
        .args(["workload", "--qd", "8"])
        .args(["--blocks-per-write", &max_blocks.to_string()])
        .args([
            "--flush-every",
            "64",
            "--discard-percent",
            "0",
            "--seed",
            "11",
        ])
        .args(["--seconds", &seconds.to_string()])
        .args(["--hot-blocks", &hot_blocks.to_string()])
        .args(extra)
        .arg("--device")
        .arg(target)
        .arg("--log")
        .arg(log)
        .spawn()
        .unwrap()
}

/// Agent config for these runs.
fn agent_config(dir: &Path, max_gap_ms: u64, metrics_port: u16) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "cut-interval-ms = 1500\nmax-point-gap-ms = {max_gap_ms}\n\
             forced-freeze-ms = 2000\nmetrics-addr = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )
    .unwrap();
    path
}

/// Instants (CLOCK_MONOTONIC ns) of the points, sorted, with their ids.
fn point_instants(all: &[serde_json::Value]) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = all
        .iter()
        .map(|p| {
            (
                p["mono_ns"].as_u64().unwrap(),
                p["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Largest gap (ns) between consecutive points inside `[from, to]`, counting from `from`
/// to the first point and from the last point to `to`.
fn largest_gap(instants: &[(u64, String)], from: u64, to: u64) -> u64 {
    let mut marks: Vec<u64> = vec![from];
    marks.extend(instants.iter().map(|p| p.0).filter(|&t| t > from && t < to));
    marks.push(to);
    marks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

fn check(image: &Path, log: &Path, t: u64, what: &str) {
    let out = Command::new(testkit::binary("ripcord-oracle"))
        .args(["check", "--time", &t.to_string(), "--image"])
        .arg(image)
        .arg("--log")
        .arg(log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what} (T={t}) is not a crash state of the source:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stop_and_settle(
    agent: Replicator,
    ps: &mut ProcessServer,
    target: &str,
    disk_id: &str,
) -> serde_json::Value {
    let stats_file = agent.stats_file.clone();
    let (ok, alog) = agent.stop().unwrap();
    assert!(ok, "agent failed:\n{alog}");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_file).unwrap()).unwrap();
    wait_for_point(
        target,
        disk_id,
        &ps.passphrase_file,
        stats["disks"][0]["pushed_seq"].as_u64().unwrap(),
        Duration::from_secs(60),
    )
    .unwrap();
    ps.stop().unwrap();
    stats
}

#[test]
fn ext4_under_hot_churn_gets_a_point_every_max_gap_and_every_point_is_exact() {
    const MAX_GAP_MS: u64 = 5000;
    let Some(mut site) =
        Site::builder("ext4_under_hot_churn_gets_a_point_every_max_gap_and_every_point_is_exact")
            .file_target()
            .start()
    else {
        return;
    };
    let target = site.target().to_owned();
    let disk = site.loop_device("disk.img", 256 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", disk.path.to_str().unwrap()]).unwrap();
    let mnt = Mount::new(&disk.path, &site.path().join("mnt"), &["-t", "ext4"]).unwrap();
    // Preallocated by writing it whole: the writers then overwrite allocated blocks
    // (no extent conversion, so a completed O_DIRECT write is on the device).
    let data = mnt.dir.join("table.db");
    testkit::run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", data.display()),
            "bs=1M",
            "count=128",
            "oflag=direct",
            "status=none",
        ],
    )
    .unwrap();
    testkit::run("sync", &[]).unwrap();

    let port = free_tcp_port();
    let config = agent_config(site.path(), MAX_GAP_MS, port);
    let agent = site.replicator_with(&[&disk.path], &["--config", config.to_str().unwrap()], &[]);
    agent.wait_synced(Duration::from_secs(120)).unwrap();

    let log = site.path().join("oracle.log");
    let start = ripcord_oracle::monotonic_ns();
    let mut writers = churn(
        &data,
        &log,
        60,
        16,
        256,
        &["--iops", "2000", "--hot-percent", "50"],
    );
    std::thread::sleep(Duration::from_secs(30));
    let mid = http_get(port, "/metrics");
    assert!(writers.wait().unwrap().success(), "workload failed");
    let end = ripcord_oracle::monotonic_ns();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let stats = stop_and_settle(agent, &mut site.ps, &target, &disk_id);
    mnt.unmount().unwrap();
    let (ps, dir) = (&site.ps, site.path());
    let d = &stats["disks"][0];
    eprintln!(
        "agent stats: {d}\nforced freezes: {}",
        stats["forced_freezes"]
    );
    assert!(
        metric(&mid, "ripcord_agent_points_total", "") > 0.0,
        "no points halfway through:\n{mid}"
    );

    let all = points(&target, &disk_id, &ps.passphrase_file).unwrap();
    let instants = point_instants(&all);
    let gap = largest_gap(&instants, start, end);
    assert!(
        gap <= MAX_GAP_MS * 1_000_000,
        "a gap of {:.2} s between points under churn (bound {MAX_GAP_MS} ms); stats: {d}",
        gap as f64 / 1e9
    );
    // Every point of the run: failed over, mounted on a copy (journal replay), and the
    // file checked against the writers' log at the point's instant.
    let image = dir.join("point.img");
    let copy = dir.join("point-table.db");
    let mut checked = 0;
    for (t, pid) in instants.iter().filter(|(t, _)| *t >= start) {
        let (ok, _, err) = failover(&target, &disk_id, pid, &image, &ps.passphrase_file).unwrap();
        assert!(ok, "failover to {pid} failed: {err}");
        let lo = LoopDevice::attach(&image).unwrap();
        let m = Mount::new(&lo.path, &dir.join("point-mnt"), &["-t", "ext4"])
            .unwrap_or_else(|e| panic!("point {pid} does not mount: {e:#}"));
        std::fs::copy(m.dir.join("table.db"), &copy).unwrap();
        m.unmount().unwrap();
        drop(lo);
        check(&copy, &log, *t, &format!("ext4 point {pid}"));
        checked += 1;
    }
    assert!(
        checked as u64 >= (end - start) / (MAX_GAP_MS * 1_000_000),
        "only {checked} points in the run"
    );
    eprintln!(
        "ext4 churn: {checked} points checked, largest gap {:.2} s, {} forced, stalls {}",
        gap as f64 / 1e9,
        d["forced_cuts"],
        stats["forced_freezes"]
    );
}

#[test]
fn raw_device_points_are_exact_and_a_long_gap_raises_the_alert() {
    const MAX_GAP_MS: u64 = 3000;
    let Some(mut site) =
        Site::builder("raw_device_points_are_exact_and_a_long_gap_raises_the_alert")
            .file_target()
            .start()
    else {
        return;
    };
    let target = site.target().to_owned();
    let disk = site.loop_device("disk.img", 128 * MIB);
    let port = free_tcp_port();
    let config = agent_config(site.path(), MAX_GAP_MS, port);
    let agent = site.replicator_with(&[&disk.path], &["--config", config.to_str().unwrap()], &[]);
    agent.wait_synced(Duration::from_secs(120)).unwrap();

    // The same writers, then a storm on 8 hot blocks as fast as they go, for four times
    // the bound: a readback round can only be clean in the instants no write is queued.
    let log = site.path().join("oracle.log");
    let start = ripcord_oracle::monotonic_ns();
    let mut writers = churn(
        &disk.path,
        &log,
        20,
        16,
        256,
        &[
            "--iops",
            "2000",
            "--hot-percent",
            "50",
            "--region",
            "0:16384",
        ],
    );
    assert!(writers.wait().unwrap().success(), "workload failed");
    let storm_log = site.path().join("storm.log");
    let storm_start = ripcord_oracle::monotonic_ns();
    let mut storm = churn(
        &disk.path,
        &storm_log,
        (MAX_GAP_MS * 4 / 1000) as u32,
        1,
        8,
        &["--hot-percent", "100", "--region", "16384:8"],
    );
    // Sample what the agent says while the storm goes on.
    let mut samples = Vec::new();
    while storm.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(700));
        let m = http_get(port, "/metrics");
        let s = agent.stats().unwrap();
        samples.push((ripcord_oracle::monotonic_ns(), m, s));
    }
    assert!(storm.wait().unwrap().success(), "storm failed");
    let end = ripcord_oracle::monotonic_ns();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let stats = stop_and_settle(agent, &mut site.ps, &target, &disk_id);
    let (ps, dir) = (&site.ps, site.path());
    let d = &stats["disks"][0];
    eprintln!("agent stats: {d}");

    let all = points(&target, &disk_id, &ps.passphrase_file).unwrap();
    let instants = point_instants(&all);
    // The agent's own account of gaps agrees with the store's points: its largest gap
    // is at least the largest the store shows during the storm (when points are
    // hardest), and an open gap past the bound shows as the alert, in stats and metrics.
    let store_gap = largest_gap(&instants, storm_start, end);
    let reported = d["largest_point_gap_ms"].as_u64().unwrap() * 1_000_000;
    let mut alerted = false;
    for (at, m, s) in &samples {
        let age = metric(m, "ripcord_agent_point_gap_seconds", "");
        assert!(
            metric(m, "ripcord_agent_newest_point_age_seconds", "") + 0.5 >= age,
            "changes waited longer than the newest point is old:\n{m}"
        );
        let alert = metric(m, "ripcord_agent_point_gap_alert", "") == 1.0;
        let gap_ms = s["disks"][0]["point_gap_ms"].as_u64().unwrap_or(0);
        if age > (MAX_GAP_MS as f64 / 1000.0) + 1.0 {
            assert!(alert, "gap of {age} s at {at} without the alert:\n{m}");
        }
        if gap_ms > MAX_GAP_MS + 1000 {
            assert!(
                s["disks"][0]["point_gap_alert"].as_bool().unwrap(),
                "stats show a {gap_ms} ms gap without the alert: {s}"
            );
        }
        alerted |= alert;
    }
    if store_gap > (MAX_GAP_MS + 1500) * 1_000_000 {
        assert!(
            alerted,
            "the store shows a {:.2} s gap during the storm and the agent never raised \
             the alert",
            store_gap as f64 / 1e9
        );
    }
    // Points are cut at round instants the store orders: a store gap can only be
    // larger than the agent's by the time a cut takes to arrive.
    assert!(
        reported + 1_000_000_000 >= store_gap.min(end - storm_start),
        "the agent reports a largest gap of {} ms, the store shows {:.2} s",
        reported / 1_000_000,
        store_gap as f64 / 1e9
    );

    // Every point is exact: the device image at its instant, for both workloads.
    let image = dir.join("point.img");
    let mut checked = 0;
    for (t, pid) in instants.iter().filter(|(t, _)| *t >= start) {
        let (ok, _, err) = failover(&target, &disk_id, pid, &image, &ps.passphrase_file).unwrap();
        assert!(ok, "failover to {pid} failed: {err}");
        check(&image, &log, *t, &format!("raw point {pid} (writers)"));
        check(&image, &storm_log, *t, &format!("raw point {pid} (storm)"));
        checked += 1;
    }
    assert!(checked > 0, "no point during the run; stats: {d}");
    eprintln!(
        "raw churn: {checked} points checked; largest gap during the storm {:.2} s \
         (agent: {} ms), alert raised: {alerted}",
        store_gap as f64 / 1e9,
        reported / 1_000_000
    );
}
