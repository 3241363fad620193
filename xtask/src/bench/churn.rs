//! Replication churn: fio at full speed and paced on a protected RAM-backed loop device
//! with the agent and a process server on this machine, then the saturation runs.
//!
//! Invariants: every replicated phase waits until the agent has caught up (nothing dirty,
//! everything pushed acknowledged) before it is measured as done, so throughput counts
//! only data that reached the server; the RAM-backed device is removed on every exit.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::ensure;
use serde_json::{Value, json};
use testkit::{LoopDevice, Scratch};

use super::common::{RemoveDirOnDrop, cpu_seconds, fio_churn, peak_rss_mib};
use crate::workspace_root;

/// (bytes sent, cuts placed, caught up) of the agent's first disk.
fn agent_totals(r: &testkit::replication::Replicator) -> (f64, f64, bool) {
    let s = r.stats().unwrap_or_default();
    let d = &s["disks"][0];
    let data = d["data_bytes"].as_f64().unwrap_or(0.0) + d["zero_bytes"].as_f64().unwrap_or(0.0);
    let caught_up = d["syncing"] == false
        && d["dirty_bytes"].as_u64() == Some(0)
        && d["pushed_seq"] == d["acked_seq"];
    (data, d["cuts"].as_f64().unwrap_or(0.0), caught_up)
}

/// Run `fio` against the protected device and measure what replication does meanwhile.
fn replicated_phase(
    agent: &testkit::replication::Replicator,
    ps_pid: u32,
    dev: &Path,
    args: &[&str],
    runtime: u64,
) -> anyhow::Result<Value> {
    let (data0, cuts0, _) = agent_totals(agent);
    let (a0, p0) = (cpu_seconds(agent.pid()), cpu_seconds(ps_pid));
    let t0 = Instant::now();
    let mbps = fio_churn(dev, args, runtime)?;
    let fio_secs = t0.elapsed().as_secs_f64();
    let (_, cuts_during_fio, _) = agent_totals(agent);
    // Let the agent drain what fio left dirty.
    let deadline = Instant::now() + Duration::from_secs(300);
    std::thread::sleep(Duration::from_millis(600));
    loop {
        let (_, _, done) = agent_totals(agent);
        if done {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent did not catch up within 300 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t0.elapsed().as_secs_f64();
    let (data1, _, _) = agent_totals(agent);
    let (a1, p1) = (cpu_seconds(agent.pid()), cpu_seconds(ps_pid));
    Ok(json!({
        "fio_mbps": mbps,
        "replicated_mbps": (data1 - data0) / secs / 1e6,
        "catch_up_s": secs - fio_secs,
        "cuts_per_s_under_load": (cuts_during_fio - cuts0) / fio_secs,
        "agent_cpu_pct": (a1 - a0) / secs * 100.0,
        "ps_cpu_pct": (p1 - p0) / secs * 100.0,
    }))
}

pub(super) fn churn(runtime: u64, size_mib: u64, saturation_secs: u64) -> anyhow::Result<()> {
    use testkit::replication::{AgentIdentity, ProcessServer, Replicator};
    crate::release_binaries()?;
    let scratch = Scratch::new("bench-churn");
    let shm_dir = PathBuf::from(format!("/dev/shm/ripcord-churn-{}", std::process::id()));
    std::fs::create_dir_all(&shm_dir)?;
    let _guard = RemoveDirOnDrop(shm_dir.clone());
    // The protected device is RAM-backed so the pipeline, not the source disk, is measured;
    // the process server's cache is on the root disk.
    let dev = LoopDevice::create(&shm_dir.join("disk.img"), size_mib << 20)?;
    let seq: &[&str] = &["--rw=write", "--bs=1M", "--iodepth=8"];
    let rand: &[&str] = &["--rw=randwrite", "--bs=64k", "--iodepth=16"];
    let paced: &[&str] = &["--rw=randwrite", "--bs=64k", "--iodepth=4", "--rate=100m"];

    eprintln!("churn: baseline fio without replication");
    let seq_without = fio_churn(&dev.path, seq, runtime)?;
    let rand_without = fio_churn(&dev.path, rand, runtime)?;

    let mut ps = ProcessServer::start(&scratch.path)?;
    let id = AgentIdentity::register(&ps, &scratch.path, "bench")?;
    let agent = Replicator::start(&id, &[&dev.path], &[])?;
    agent.wait_synced(Duration::from_secs(600))?;
    eprintln!("churn: initial sync done; 100 MB/s paced phase (RPO lag)");
    let paced_phase = replicated_phase(&agent, ps.pid(), &dev.path, paced, runtime)?;
    let lag = agent.stats().unwrap_or_default()["lag_ms"].clone();
    eprintln!("churn: full-speed sequential 1 MiB");
    let seq_phase = replicated_phase(&agent, ps.pid(), &dev.path, seq, runtime)?;
    eprintln!("churn: full-speed random 64 KiB");
    let rand_phase = replicated_phase(&agent, ps.pid(), &dev.path, rand, runtime)?;
    let ps_rss = peak_rss_mib(ps.pid());
    let agent_rss = peak_rss_mib(agent.pid());
    let (ok, log) = agent.stop()?;
    ensure!(ok, "agent failed:\n{log}");
    let saturation = if saturation_secs > 0 {
        let capacity = rand_phase["replicated_mbps"].as_f64().unwrap_or(0.0);
        crate::saturation::saturation(&scratch.path, &shm_dir, &id, capacity, saturation_secs)?
    } else {
        Value::Null
    };
    ps.stop()?;

    let v = json!({
        "saturation": saturation,
        "runtime_s": runtime,
        "device_mib": size_mib,
        "seq_1m": { "fio_mbps_without": seq_without, "with": seq_phase },
        "rand_64k": { "fio_mbps_without": rand_without, "with": rand_phase },
        "paced_100mbps": { "with": paced_phase, "rpo_lag_ms": lag },
        "agent_peak_rss_mib": agent_rss,
        "ps_peak_rss_mib": ps_rss,
    });
    let f = |p: &Value, k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    println!("\nchurn (half-compressible data, {runtime} s per phase)");
    println!(
        "workload        fio MB/s without   with   ratio   replicated MB/s   agent CPU %   ps CPU %"
    );
    for (name, without, phase) in [
        ("seq 1 MiB", seq_without, &seq_phase),
        ("rand 64 KiB", rand_without, &rand_phase),
    ] {
        println!(
            "{name:<14} {without:>16.1} {:>6.1} {:>7.3} {:>17.1} {:>13.0} {:>10.0}",
            f(phase, "fio_mbps"),
            f(phase, "fio_mbps") / without,
            f(phase, "replicated_mbps"),
            f(phase, "agent_cpu_pct"),
            f(phase, "ps_cpu_pct"),
        );
    }
    println!(
        "crash-consistent cuts per second under load: seq {:.1}, rand {:.1}, paced {:.1}",
        f(&seq_phase, "cuts_per_s_under_load"),
        f(&rand_phase, "cuts_per_s_under_load"),
        f(&paced_phase, "cuts_per_s_under_load")
    );
    println!(
        "paced 100 MB/s: RPO lag (write completion to durable on the server) p50 {} ms, p99 {} ms, max {} ms",
        lag["p50"], lag["p99"], lag["max"]
    );
    println!("peak RSS: agent {agent_rss:.0} MiB, process server {ps_rss:.0} MiB");
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("churn.json"), serde_json::to_vec_pretty(&v)?)?;
    println!("wrote {}", out.join("churn.json").display());
    Ok(())
}
