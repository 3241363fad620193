//! Replication through a faulty network (issue 17): the agent replicates to the process
//! server through a [`FaultProxy`] that loses, duplicates, reorders, delays and corrupts
//! datagrams, partitions the link and flaps it, under a write workload. Each test checks
//! that the faults really happened (the proxy's counters), that the disk's latest recovery
//! point equals the device byte for byte at quiesce, that recovery points were made, and
//! that the agent never started a new epoch (no full resync). Under loss, duplication,
//! reordering and corruption the workload is the oracle's, and a sample of the points made
//! under faults passes its write-order checker. And when the agent's address changes (the
//! proxy moves it to a new source port, as a NAT rebinding would), the QUIC connection
//! migrates: no reconnect, no new epoch.
//!
//! Needs root. Skips loudly without it, and fails under `CI=true`.

use std::{
    io::Write as _,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ripcord_oracle::monotonic_ns;
use ripcord_tests::{assert_same, http_get, metric};
use testkit::{
    FaultConfig, FaultProxy, Faults, Flap, Site, Workload,
    replication::{Replicator, failover, points, wait_for, wait_for_point},
};

const MIB: u64 = 1 << 20;

/// Random data over the first `bytes` of `dev` (so that a full resync would show in the
/// bytes sent), synced.
fn prefill(dev: &Path, bytes: u64, seed: u64) {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..bytes / MIB {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// A paced writer: 4 KiB writes at random offsets (about 160 a second), a discard and a
/// zero-out of up to 1 MiB now and then, until finished; stopped and joined on drop too
/// (a failing test leaves nothing writing to its device).
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Writer {
    fn start(dev: &Path, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, flag) = (dev.to_owned(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut w = Workload::new(&dev, seed).unwrap();
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                w.burst(4).unwrap();
                if i.is_multiple_of(20) {
                    w.discards(1).unwrap();
                    w.zeroouts(1).unwrap();
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            w.report.bytes
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; the bytes changed (discards and zero-outs included).
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("running");
        t.join().expect("the writer failed")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The agent's first disk in its stats file.
fn disk_stats(agent: &Replicator) -> serde_json::Value {
    agent
        .stats()
        .map(|s| s["disks"][0].clone())
        .unwrap_or_default()
}

fn num(d: &serde_json::Value, key: &str) -> u64 {
    d[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in agent stats {d}"))
}

/// Wait until the agent has pushed something and the server acknowledged all of it.
fn wait_all_acked(agent: &Replicator, timeout: Duration) {
    wait_for("every pushed batch to be acknowledged", timeout, || {
        let d = disk_stats(agent);
        let (p, a) = (d["pushed_seq"].as_u64(), d["acked_seq"].as_u64());
        Ok(p.is_some_and(|p| p > 0) && p == a)
    })
    .unwrap_or_else(|e| panic!("{e:#}; stats {}\n{}", disk_stats(agent), agent.log()));
}

fn bytes_in(site: &Site, disk_id: &str) -> u64 {
    metric(
        &http_get(site.ps.metrics_port, "/metrics"),
        "ripcord_ps_bytes_in_total",
        disk_id,
    ) as u64
}

/// What a finished run left, for its checks.
struct Quiesced {
    /// The agent's last stats of the disk.
    stats: serde_json::Value,
    /// Every recovery point of the disk in the store.
    points: Vec<serde_json::Value>,
    /// The agent's log.
    log: String,
}

/// Stop the agent cleanly (it flushes and waits for acknowledgements), wait until the
/// store holds a point with everything it pushed, stop the server, fail over to that
/// point and compare it with the device; check that the disk stayed in `epoch`.
fn quiesce(site: &mut Site, agent: Replicator, dev: &Path, disk_id: &str, epoch: u64) -> Quiesced {
    let stats_file = agent.stats_file.clone();
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "the agent did not stop cleanly:\n{log}");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_file).unwrap()).unwrap();
    let stats = stats["disks"][0].clone();
    assert_eq!(
        num(&stats, "pushed_seq"),
        num(&stats, "acked_seq"),
        "stopped with unacknowledged batches: {stats}"
    );
    let target = site.target().to_owned();
    let pass = site.ps.passphrase_file.clone();
    let last = wait_for_point(
        &target,
        disk_id,
        &pass,
        num(&stats, "pushed_seq"),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e:#}\nprocess server log:\n{}", site.ps.logs()));
    site.ps.stop().unwrap();
    // The same epoch throughout: the agent's, the store's, and one epoch start on the
    // server (a reconnect that started a new epoch would resync the whole disk).
    assert_eq!(
        num(&stats, "epoch"),
        epoch,
        "the agent changed epochs: {stats}"
    );
    let points = points(&target, disk_id, &pass).unwrap();
    for p in &points {
        assert_eq!(
            p["epoch"].as_u64(),
            Some(epoch),
            "a point of another epoch: {p}"
        );
    }
    let logs = site.ps.logs();
    assert_eq!(
        logs.matches("new epoch: full resync").count(),
        1,
        "the server started more than one epoch:\n{logs}"
    );
    let image = site.path().join("latest.img");
    let id = last["id"].as_str().unwrap();
    let (ok, _, err) = failover(&target, disk_id, id, &image, &pass).unwrap();
    assert!(ok, "failover to {id} failed: {err}");
    assert_same(&image, dev, "the latest recovery point");
    std::fs::remove_file(&image).unwrap();
    Quiesced { stats, points, log }
}

/// The agent read the device again (`bytes_read`, stats `before` and `after` the faults)
/// for what the workload changed (`written` bytes, discards and zero-outs included), not
/// for a second copy of the disk: a resync reads all of it again.
fn assert_no_second_copy(before: &serde_json::Value, after: &serde_json::Value, written: u64) {
    let reread = num(after, "bytes_read") - num(before, "bytes_read");
    let size = num(after, "size_bytes");
    assert!(
        reread < size / 2 && reread < written + 8 * MIB,
        "the agent read {reread} B of its {size} B device after the initial sync, for \
         {written} B written"
    );
}

/// Recovery points made after `t` (CLOCK_MONOTONIC ns).
fn points_after(points: &[serde_json::Value], t: u64) -> usize {
    points
        .iter()
        .filter(|p| p["mono_ns"].as_u64().is_some_and(|m| m > t))
        .count()
}

#[test]
fn replication_survives_a_lossy_network() {
    let Some(mut site) = Site::builder("replication_survives_a_lossy_network")
        .file_target()
        .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 128 * MIB);
    // A clean link for the initial sync, then the lossy one under the workload.
    let proxy = FaultProxy::start(site.ps.data_addr(), FaultConfig::default(), 17).unwrap();
    let agent = site.replicator_via(proxy.addr(), &[&disk.path], &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    wait_all_acked(&agent, Duration::from_secs(60));
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let before = disk_stats(&agent);
    let epoch = num(&before, "epoch");

    let start = monotonic_ns();
    proxy.set(FaultConfig::both(Faults {
        drop: 0.05,
        duplicate: 0.02,
        reorder: 0.05,
        corrupt: 0.01,
        delay: Duration::from_millis(1),
        jitter: Duration::from_millis(4),
    }));
    // The oracle's workload (stamped blocks, flushes, discards), so that the points made
    // under faults can be checked as crash states of the source.
    let oracle_log = site.path().join("oracle.log");
    let (seconds, iops, blocks) = (20, 300, 2);
    let mut workload = Oracle(
        Command::new(testkit::binary("ripcord-oracle"))
            .args([
                "workload",
                "--qd",
                "4",
                "--flush-every",
                "32",
                "--seed",
                "7",
            ])
            .args(["--discard-percent", "3", "--seconds", &seconds.to_string()])
            .args(["--iops", &iops.to_string()])
            .args(["--blocks-per-write", &blocks.to_string()])
            .arg("--device")
            .arg(&disk.path)
            .arg("--log")
            .arg(&oracle_log)
            .spawn()
            .unwrap(),
    );
    assert!(
        workload.0.wait().unwrap().success(),
        "the oracle workload failed"
    );
    let during = disk_stats(&agent);
    // The agent drains and stops through the lossy link too.
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    let counts = proxy.counts();
    eprintln!(
        "proxy: {counts:?}\nagent before {before}\nat the end {}",
        done.stats
    );
    for (what, n) in [
        ("dropped", counts.dropped),
        ("duplicated", counts.duplicated),
        ("reordered", counts.reordered),
        ("corrupted", counts.corrupted),
        ("delayed", counts.delayed),
    ] {
        assert!(n > 0, "the proxy never {what} a datagram: {counts:?}");
    }
    // Batches went through the lossy link while the workload ran.
    assert!(
        num(&during, "acked_seq") > num(&before, "acked_seq"),
        "nothing was acknowledged through the lossy link: before {before}, during {during}"
    );
    let made = points_after(&done.points, start);
    assert!(
        made >= 5,
        "only {made} recovery points under the lossy link ({} in all)",
        done.points.len()
    );
    // No byte bound here: the agent reads discarded ranges back too (the oracle discards
    // about twice what it writes), so what it reads is not bounded by `written`; the
    // epoch checks in `quiesce` are what rule a resync out.
    // Points made under faults, a sample spread over the run: each is a crash state of
    // the source (the write-order checker), as the latest equals the device.
    let under: Vec<_> = done
        .points
        .iter()
        .filter(|p| p["mono_ns"].as_u64().is_some_and(|m| m > start))
        .collect();
    let image = site.path().join("point.img");
    let step = under.len().div_ceil(8).max(1);
    let mut checked = 0;
    for p in under.iter().step_by(step) {
        let id = p["id"].as_str().unwrap();
        let (ok, _, err) = failover(
            site.target(),
            &disk_id,
            id,
            &image,
            &site.ps.passphrase_file,
        )
        .unwrap();
        assert!(ok, "failover to {id} failed: {err}");
        let t = p["mono_ns"].as_u64().unwrap().to_string();
        let out = Command::new(testkit::binary("ripcord-oracle"))
            .args(["check", "--time", &t, "--image"])
            .arg(&image)
            .arg("--log")
            .arg(&oracle_log)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "recovery point {id} (T={t}), made under faults, is not a crash state of the \
             source:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    eprintln!(
        "{} recovery points ({made} under faults, {checked} of them checked); agent log has \
         {} reconnects",
        done.points.len(),
        done.log.matches("disk stream accepted").count() - 1
    );
}

/// The oracle's workload process, killed if the test fails while it runs.
struct Oracle(std::process::Child);

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_partition_heals_without_a_resync() {
    let Some(mut site) = Site::builder("a_partition_heals_without_a_resync")
        .file_target()
        .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 128 * MIB);
    prefill(&disk.path, 64 * MIB, 3);
    let proxy = FaultProxy::start(site.ps.data_addr(), FaultConfig::default(), 18).unwrap();
    let agent = site.replicator_via(proxy.addr(), &[&disk.path], &[]);
    agent.wait_synced(Duration::from_secs(90)).unwrap();
    wait_all_acked(&agent, Duration::from_secs(60));
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let before = disk_stats(&agent);
    let epoch = num(&before, "epoch");
    let synced_in = bytes_in(&site, &disk_id);
    assert!(
        synced_in > 60 * MIB,
        "the initial sync sent only {synced_in} B of 64 MiB of data"
    );

    let w = Writer::start(&disk.path, 4);
    std::thread::sleep(Duration::from_secs(3));
    let partition = Duration::from_secs(8);
    let cut_at = Instant::now();
    proxy.partition_for(partition);
    // Once what was in flight has settled (and the status file, rewritten every second,
    // shows it), nothing is acknowledged until the link heals, and the agent shows what
    // waits.
    std::thread::sleep(Duration::from_secs(2));
    let acked_in = num(&disk_stats(&agent), "acked_seq");
    let mut waiting = 0u64;
    let mut last = serde_json::Value::Null;
    while cut_at.elapsed() < partition - Duration::from_millis(500) {
        last = disk_stats(&agent);
        let unacked = num(&last, "pushed_seq") - num(&last, "acked_seq");
        waiting = waiting.max(unacked.max(num(&last, "unacked_bytes")));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        num(&last, "acked_seq"),
        acked_in,
        "batches were acknowledged through a partition: {last}"
    );
    assert!(
        waiting > 0,
        "the agent's status never showed unacknowledged data during the partition: {last}"
    );
    while cut_at.elapsed() < partition {
        std::thread::sleep(Duration::from_millis(50));
    }
    let healed = monotonic_ns();
    // After healing, replication continues: what was pushed during the partition is
    // acknowledged.
    let pushed = num(&disk_stats(&agent), "pushed_seq");
    wait_for(
        "acknowledgements after the partition",
        Duration::from_secs(60),
        || Ok(num(&disk_stats(&agent), "acked_seq") >= pushed),
    )
    .unwrap_or_else(|e| panic!("{e:#}; stats {}\n{}", disk_stats(&agent), agent.log()));
    std::thread::sleep(Duration::from_secs(3));
    let written = w.finish();
    let sent = bytes_in(&site, &disk_id) - synced_in;
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    let counts = proxy.counts();
    eprintln!(
        "proxy: {counts:?}\nwritten {written} B, journaled {sent} B after the initial sync \
         ({synced_in} B); agent before {before}\nat the end {}",
        done.stats
    );
    assert!(
        counts.partitioned > 0,
        "the partition dropped nothing: {counts:?}"
    );
    assert!(
        num(&done.stats, "reconnects") > 0,
        "the agent never reconnected across an 8 s partition: {}",
        done.stats
    );
    // Not a second full copy: after the initial sync (64 MiB of data), about what the
    // workload changed went over the link and was read from the device.
    assert!(
        sent < synced_in / 2 && sent < written + 8 * MIB,
        "{sent} B journaled after the initial sync ({synced_in} B) for {written} B written"
    );
    assert_no_second_copy(&before, &done.stats, written);
    let made = points_after(&done.points, healed);
    assert!(
        made >= 2,
        "only {made} recovery points after the partition healed"
    );
}

#[test]
fn a_flapping_link_loses_nothing() {
    let Some(mut site) = Site::builder("a_flapping_link_loses_nothing")
        .file_target()
        .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 128 * MIB);
    prefill(&disk.path, 16 * MIB, 5);
    let proxy = FaultProxy::start(site.ps.data_addr(), FaultConfig::default(), 19).unwrap();
    let agent = site.replicator_via(proxy.addr(), &[&disk.path], &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    wait_all_acked(&agent, Duration::from_secs(60));
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let before = disk_stats(&agent);
    let epoch = num(&before, "epoch");

    let w = Writer::start(&disk.path, 6);
    proxy.set(FaultConfig {
        flap: Some(Flap {
            up: Duration::from_secs(1),
            down: Duration::from_millis(500),
        }),
        ..FaultConfig::default()
    });
    std::thread::sleep(Duration::from_secs(10));
    proxy.set(FaultConfig::default());
    let healed = monotonic_ns();
    let flapped = proxy.counts();
    std::thread::sleep(Duration::from_secs(4));
    let written = w.finish();
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    eprintln!(
        "proxy after flapping: {flapped:?}\nwritten {written} B; agent before {before}\nat the \
         end {}",
        done.stats
    );
    assert!(
        flapped.partitioned > 0,
        "the flapping dropped nothing: {flapped:?}"
    );
    let made = points_after(&done.points, healed);
    assert!(made >= 2, "only {made} recovery points after the flapping");
    assert_no_second_copy(&before, &done.stats, written);
}

/// Connection migration (issue 17, item 2): the agent's address changes three times as the
/// server sees it (a new source port each time, as after a NAT rebinding or a new address)
/// while it replicates. The QUIC connection follows the agent to each new address: no
/// reconnect, no new epoch, no second copy, and the replica equals the device.
#[test]
fn an_agent_whose_address_changes_keeps_replicating_on_its_connection() {
    let Some(mut site) =
        Site::builder("an_agent_whose_address_changes_keeps_replicating_on_its_connection")
            .file_target()
            .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);
    prefill(&disk.path, 8 * MIB, 8);
    let proxy = FaultProxy::start(site.ps.data_addr(), FaultConfig::default(), 23).unwrap();
    let agent = site.replicator_via(proxy.addr(), &[&disk.path], &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    wait_all_acked(&agent, Duration::from_secs(60));
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let before = disk_stats(&agent);
    let epoch = num(&before, "epoch");

    let w = Writer::start(&disk.path, 12);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        let acked = num(&disk_stats(&agent), "acked_seq");
        proxy.rebind();
        // Data keeps flowing on the new path.
        wait_for(
            "batches acknowledged after the move",
            Duration::from_secs(30),
            || Ok(num(&disk_stats(&agent), "acked_seq") > acked),
        )
        .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
    }
    let written = w.finish();
    let counts = proxy.counts();
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    eprintln!("proxy: {counts:?}\nat the end {}", done.stats);
    assert_eq!(
        counts.rebound, 3,
        "the agent did not move three times: {counts:?}"
    );
    assert_eq!(
        num(&done.stats, "reconnects"),
        0,
        "the agent reconnected instead of migrating:\n{}",
        done.log
    );
    // What was sent after the initial sync is what the writer changed, not a second copy.
    let sent = num(&done.stats, "data_bytes") - num(&before, "data_bytes");
    assert!(
        sent < written + 8 * MIB,
        "the agent sent {sent} B of data after its initial sync for {written} B written"
    );
}
