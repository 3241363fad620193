//! Consistency-group points (issue 16's benchmark, its group half): 2, 16 and 64 member
//! machines on this one host, each a real `ripcord-agent` with its own identity and loop
//! device, one process server with the configuration role, one group with a 1 s interval
//! (the shortest, 60 points a minute at most). A writer touches every member's device
//! (4 KiB O_DIRECT writes, round robin) so cuts have data to carry. Measured over a
//! window: complete group points per minute (read from the target store, as failover
//! sees them) and their clock-error bounds; the members' misses from their status files.
//!
//! Invariants: every point counted is complete (every member disk stamped at its instant,
//! `ripcord_store::groups`); the numbers are those of this machine, where all members
//! share two cores and wake for the same instant: a worst case for lateness, not a
//! typical deployment (one agent per host).

use std::{
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::json;
use testkit::{
    LoopDevice, Scratch,
    replication::{AgentIdentity, ProcessServer, Replicator, now_ns, ripcord},
};

use super::common::median;
use crate::workspace_root;

const DEVICE_MIB: u64 = 8;

/// Keeps writing 4 KiB blocks to `devices` in turn until dropped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(devices: &[std::path::PathBuf], per_sec: u64) -> anyhow::Result<Writer> {
        let files = devices
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(d)
                    .with_context(|| format!("opening {}", d.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            let off = buf.as_ptr().align_offset(4096);
            let pause = Duration::from_nanos(1_000_000_000 / per_sec.max(1));
            let blocks = DEVICE_MIB * 256;
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                buf[off..off + 8].copy_from_slice(&n.to_le_bytes());
                let f = &files[(n as usize) % files.len()];
                let _ = f.write_all_at(&buf[off..off + 4096], (n * 7919 % blocks) * 4096);
                std::thread::sleep(pause);
            }
        });
        Ok(Writer {
            stop,
            thread: Some(thread),
        })
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

/// One group size: points per minute over `window`, and the bounds of those points.
fn members(n: usize, window: Duration) -> anyhow::Result<serde_json::Value> {
    let scratch = Scratch::new(&format!("bench-group-{n}"));
    let target = format!("file://{}", scratch.path.join("target-store").display());
    let ps = ProcessServer::start_with_target(&scratch.path, Some(&target))?;
    let dep = ps.dir.to_str().context("path")?.to_owned();
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let (ok, out, err) = ripcord(args, &ps.passphrase_file)?;
        ensure!(ok, "ripcord {args:?}: {out}{err}");
        Ok(out)
    };
    cli(&[
        "group",
        "create",
        "--deployment",
        &dep,
        "--name",
        "bench",
        "--interval-secs",
        "1",
    ])?;
    // Every machine is registered before any agent runs: placement judges a server's load
    // (decision 0023), and 64 agents starting beside it would be that load.
    eprintln!("group bench: {n} members: registering");
    let mut ids = Vec::new();
    let mut devices = Vec::new();
    for i in 0..n {
        let machine = format!("m{i:02}");
        devices.push(LoopDevice::create(
            &scratch.path.join(format!("{machine}.img")),
            DEVICE_MIB << 20,
        )?);
        ids.push(AgentIdentity::register(&ps, &scratch.path, &machine)?);
        cli(&[
            "group",
            "add",
            "--deployment",
            &dep,
            "--name",
            "bench",
            "--machine",
            &machine,
        ])?;
    }
    eprintln!("group bench: {n} members: starting agents");
    let agents = ids
        .iter()
        .zip(&devices)
        .map(|(id, dev)| Replicator::start(id, &[&dev.path], &[]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for a in &agents {
        a.wait_synced(Duration::from_secs(300))?;
    }
    let paths: Vec<_> = devices.iter().map(|d| d.path.clone()).collect();
    let writer = Writer::start(&paths, 200)?;
    // The group is scheduled once every member has reported its disk (health tick), then
    // the agents learn it within a refresh: wait for the first complete point.
    let list = |since: u64| -> anyhow::Result<Vec<serde_json::Value>> {
        let out = cli(&[
            "group",
            "points",
            "--deployment",
            &dep,
            "--target",
            &target,
            "--name",
            "bench",
            "--json",
        ])?;
        out.lines()
            .map(|l| Ok(serde_json::from_str::<serde_json::Value>(l)?))
            .filter(|p| {
                p.as_ref()
                    .map_or(true, |p| p["instant_ns"].as_u64().unwrap_or(0) >= since)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while list(0)?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "no complete group point of {n} members within 120 s"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let start = now_ns();
    std::thread::sleep(window);
    let end = now_ns();
    drop(writer);
    // Points of the window whose members are all committed (the upload interval).
    std::thread::sleep(Duration::from_secs(5));
    let points: Vec<_> = list(start)?
        .into_iter()
        .filter(|p| p["instant_ns"].as_u64().unwrap_or(u64::MAX) < end)
        .collect();
    let instants = (end - start) / 1_000_000_000;
    let mut bounds: Vec<f64> = points
        .iter()
        .map(|p| p["bound_ns"].as_u64().unwrap_or(0) as f64 / 1000.0)
        .collect();
    bounds.sort_by(f64::total_cmp);
    let misses: u64 = agents
        .iter()
        .filter_map(|a| a.stats())
        .filter_map(|s| {
            s["disks"].as_array().map(|d| {
                d.iter()
                    .filter_map(|d| d["group_misses"].as_u64())
                    .sum::<u64>()
            })
        })
        .sum();
    let per_minute = points.len() as f64 * 60.0 / window.as_secs_f64();
    let max = bounds.last().copied().unwrap_or(0.0);
    let p99 = bounds
        .get(((bounds.len() as f64 * 0.99) as usize).min(bounds.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    let med = median(&mut bounds.clone());
    println!(
        "  {n:>2} members: {per_minute:>5.1} points/min ({} of {instants} instants), bound median \
         {med:.0} µs, p99 {p99:.0} µs, max {max:.0} µs; member misses {misses}",
        points.len()
    );
    drop(agents);
    Ok(json!({
        "members": n,
        "window_s": window.as_secs_f64(),
        "instants": instants,
        "points": points.len(),
        "points_per_minute": per_minute,
        "bound_median_us": med,
        "bound_p99_us": p99,
        "bound_max_us": max,
        "member_misses": misses,
    }))
}

pub(super) fn group(sizes: &[usize], window_secs: u64) -> anyhow::Result<()> {
    crate::release_binaries()?;
    println!(
        "\ngroup points, interval 1 s, {window_secs} s window, members on this {}-core host",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut runs = Vec::new();
    for &n in sizes {
        runs.push(members(n, Duration::from_secs(window_secs))?);
    }
    let v = json!({
        "interval_ms": 1000,
        "runs": runs,
        "cores": std::thread::available_parallelism().map_or(0, usize::from),
    });
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("group.json"), serde_json::to_vec_pretty(&v)?)?;
    println!(
        "wrote {} (plan failover vs one by one: `cargo xtask bench plan`)",
        out_dir.join("group.json").display()
    );
    Ok(())
}
