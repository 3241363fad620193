//! `cargo xtask bench churn`, saturation part: how recovery points hold up when churn
//! approaches and exceeds what replication sustains.
//!
//! ext4 on a RAM-backed protected loop device; fio random writes (4 KiB and 64 KiB, QD32,
//! half-compressible) on a preallocated file, paced at 50 %, 80 % and 150 % of the
//! replication throughput measured by the full-speed random phase. Each run gets a fresh
//! agent (so its counters are the run's), with the default point-gap policy (15 s bound,
//! forced points by freezing the file system at half of it). Reported per run: points per
//! minute, the largest gap between points (sampled every 250 ms from the agent's stats),
//! forced points and the p99 of their stalls, RPO p99 as replication lag (completion to
//! durable on the process server) and as the age of the newest point (what a disaster at
//! a random instant would lose), and whether the churn alert fired.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use testkit::{
    LoopDevice, Mount,
    replication::{AgentIdentity, Replicator},
};

use crate::bench::fio_churn;

const PACES: [f64; 3] = [0.5, 0.8, 1.5];
const BLOCK_SIZES: [&str; 2] = ["4k", "64k"];
/// The file the writers churn, MiB (the device is twice that).
const FILE_MIB: u64 = 512;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Run every (block size, pace) pair against `capacity_mbps` (replicated MB/s at full
/// speed) and print the table. `dir` holds the agent config; `shm` the device backing.
pub fn saturation(
    dir: &Path,
    shm: &Path,
    id: &AgentIdentity,
    capacity_mbps: f64,
    runtime: u64,
) -> anyhow::Result<Value> {
    ensure!(
        capacity_mbps.is_finite() && capacity_mbps > 1.0,
        "no replication throughput to pace against ({capacity_mbps} MB/s)"
    );
    let dev = LoopDevice::create(&shm.join("sat.img"), (FILE_MIB * 2) << 20)?;
    testkit::run(
        "mkfs.ext4",
        &["-q", "-F", dev.path.to_str().context("path")?],
    )?;
    let mnt = Mount::new(&dev.path, &dir.join("sat-mnt"), &["-t", "ext4"])?;
    let file = mnt.dir.join("churn.dat");
    testkit::run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", file.display()),
            "bs=1M",
            &format!("count={FILE_MIB}"),
            "oflag=direct",
            "status=none",
        ],
    )?;
    testkit::run("sync", &[])?;
    let config = dir.join("sat-agent.toml");
    std::fs::write(&config, "metrics-addr = \"\"\n")?;
    let mut runs = Vec::new();
    for bs in BLOCK_SIZES {
        for pace in PACES {
            let mbps = capacity_mbps * pace;
            eprintln!(
                "churn: saturation {bs} QD32 paced at {:.0} % ({mbps:.0} MB/s), {runtime} s",
                pace * 100.0
            );
            let agent = Replicator::start(
                id,
                &[&dev.path],
                &["--config", config.to_str().context("path")?],
            )?;
            agent.wait_synced(Duration::from_secs(600))?;
            let r = one_run(&agent, &file, bs, mbps, runtime)?;
            let (ok, log) = agent.stop()?;
            ensure!(ok, "agent failed:\n{log}");
            runs.push(json!({ "bs": bs, "pace": pace, "target_mbps": mbps, "result": r }));
        }
    }
    mnt.unmount()?;
    print_table(&runs, capacity_mbps, runtime);
    Ok(json!({ "capacity_mbps": capacity_mbps, "runs": runs }))
}

fn one_run(
    agent: &Replicator,
    file: &Path,
    bs: &str,
    mbps: f64,
    runtime: u64,
) -> anyhow::Result<Value> {
    let file = file.to_owned();
    let args: Vec<String> = vec![
        "--rw=randwrite".into(),
        format!("--bs={bs}"),
        "--iodepth=32".into(),
        format!("--rate={}k", (mbps * 1000.0) as u64),
        "--fallocate=none".into(),
        format!("--size={FILE_MIB}m"),
    ];
    let t0 = Instant::now();
    let fio = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fio_churn(&file, &a, runtime)
    });
    let stat = |k: &str| -> f64 {
        agent.stats().unwrap_or_default()["disks"][0][k]
            .as_f64()
            .unwrap_or(0.0)
    };
    let cuts0 = stat("cuts");
    let mut ages = Vec::new();
    let mut churn_alert = false;
    while !fio.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        let s = agent.stats().unwrap_or_default();
        let d = &s["disks"][0];
        ages.push(d["point_gap_ms"].as_f64().unwrap_or(0.0) / 1000.0);
        churn_alert |= d["churn_alert"].as_bool().unwrap_or(false);
    }
    let fio_mbps = fio
        .join()
        .map_err(|_| anyhow::anyhow!("fio thread panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    let s = agent.stats().unwrap_or_default();
    let d = &s["disks"][0];
    let points = d["cuts"].as_f64().unwrap_or(0.0) - cuts0;
    ages.sort_by(f64::total_cmp);
    Ok(json!({
        "fio_mbps": fio_mbps,
        "points_per_min": points / secs * 60.0,
        "largest_gap_s": ages.last().copied().unwrap_or(f64::NAN),
        "forced_points": d["forced_cuts"],
        "forced_failures": s["forced_freezes"]["failures"],
        "stall_p99_ms": s["forced_freezes"]["stall_ms_p99"],
        "lag_p99_ms": s["lag_ms"]["p99"],
        "point_age_p99_s": percentile(&ages, 0.99),
        "churn_alert": churn_alert,
    }))
}

fn print_table(runs: &[Value], capacity: f64, runtime: u64) {
    println!(
        "\nsaturation: ext4, fio randwrite QD32 on a preallocated file, {runtime} s per run, \
         paced against {capacity:.0} MB/s replicated"
    );
    println!(
        "bs    pace  fio MB/s  points/min  largest gap s  forced  stall p99 ms  lag p99 ms  \
         point age p99 s  churn alert"
    );
    for r in runs {
        let x = &r["result"];
        let f = |k: &str| x[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<5} {:>4.0}% {:>9.1} {:>11.1} {:>14.2} {:>7} {:>13.1} {:>11.1} {:>16.2}  {}",
            r["bs"].as_str().unwrap_or("?"),
            r["pace"].as_f64().unwrap_or(0.0) * 100.0,
            f("fio_mbps"),
            f("points_per_min"),
            f("largest_gap_s"),
            x["forced_points"],
            f("stall_p99_ms"),
            f("lag_p99_ms"),
            f("point_age_p99_s"),
            x["churn_alert"],
        );
    }
}
