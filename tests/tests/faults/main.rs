//! Replication through a faulty network (issue 17), under a write workload.
//!
//! - [`proxy`]: the agent replicates through a [`FaultProxy`] that loses, duplicates,
//!   reorders, delays and corrupts datagrams (a minute of it, with 200 ms flaps),
//!   partitions the link (30 s), flaps it, and moves the agent to a new source port (as a
//!   NAT rebinding would).
//! - [`netns`]: the agent runs in its own network namespace behind a real veth interface:
//!   its address changes on that interface, and nftables rules cut the link.
//!
//! Each test checks that the faults really happened (the proxy's counters, the agent's
//! reconnects), that the disk's latest recovery point equals the device byte for byte at
//! quiesce, that recovery points were made, and that the agent never started a new epoch
//! (no full resync). Under loss, duplication, reordering and corruption the workload is
//! the oracle's, and every point made under faults passes its write-order checker. When
//! the agent's address changes, the QUIC connection migrates: no reconnect, no new epoch.
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
    replication::{Replicator, failover, oracle_check_point, points, wait_for, wait_for_point},
};

mod netns;
mod proxy;

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

/// One agent replicating one loop device through a fault-free [`FaultProxy`], its initial
/// sync done and acknowledged: where every test here starts.
struct Replicating {
    site: Site,
    disk: testkit::LoopDevice,
    proxy: FaultProxy,
    agent: Replicator,
    /// The network namespace the agent runs in, if any (the proxy then listens on the host
    /// side of its veth pair).
    netns: Option<testkit::Netns>,
    disk_id: String,
    /// The agent's stats of the disk once synced.
    before: serde_json::Value,
    epoch: u64,
}

/// What [`replicating`] sets up.
#[derive(Default)]
struct Setup<'a> {
    test: &'a str,
    disk_mib: u64,
    /// MiB of random data written first (so that a full resync would show in the bytes
    /// sent).
    prefill_mib: u64,
    seed: u64,
    /// The agent's configuration (TOML).
    agent_toml: &'a str,
    /// Run the agent in a network namespace of this name and subnet (`10.<net>.0.0/24`).
    netns: Option<(&'a str, u8)>,
}

/// `None` when the test skips (not root; [`Site`] says so).
fn replicating(s: Setup) -> Option<Replicating> {
    let site = Site::builder(s.test).file_target().start()?;
    let netns = s
        .netns
        .map(|(name, net)| testkit::Netns::new(name, net).unwrap());
    let disk = site.loop_device("disk.img", s.disk_mib * MIB);
    if s.prefill_mib > 0 {
        prefill(&disk.path, s.prefill_mib * MIB, s.seed);
    }
    let listen: std::net::SocketAddr = match &netns {
        Some(ns) => (ns.host_addr, 0).into(),
        None => (std::net::Ipv4Addr::LOCALHOST, 0).into(),
    };
    let proxy =
        FaultProxy::start_on(listen, site.ps.data_addr(), FaultConfig::default(), s.seed).unwrap();
    let config = site.path().join("agent.toml");
    std::fs::write(&config, s.agent_toml).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let agent = match &netns {
        Some(ns) => site.replicator_in(ns, proxy.addr(), &[&disk.path], &args),
        None => site.replicator_via(proxy.addr(), &[&disk.path], &args),
    };
    agent.wait_synced(Duration::from_secs(90)).unwrap();
    wait_all_acked(&agent, Duration::from_secs(60));
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let before = disk_stats(&agent);
    let epoch = num(&before, "epoch");
    Some(Replicating {
        site,
        disk,
        proxy,
        agent,
        netns,
        disk_id,
        before,
        epoch,
    })
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

/// The oracle's workload process, killed if the test fails while it runs.
struct Oracle(std::process::Child);

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
