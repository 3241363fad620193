//! `cargo xtask bench`: measured as ratios within one run (these machines are noisy).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Subcommand;
use serde_json::{Value, json};
use testkit::{LoopDevice, Scratch};

use crate::{cargo, workspace_root};

#[derive(Subcommand)]
pub enum Which {
    /// Capture overhead: fio on a loop device (over a file in /dev/shm, and over a file on
    /// the root disk with direct I/O) with and without `ripcord-agent watch` attached,
    /// alternating runs. 4k random write at QD32 and QD1, 1 MiB sequential write.
    /// Writes target/bench/capture.json.
    Capture {
        /// Repetitions of each with/without pair (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds per fio run.
        #[arg(long, default_value_t = 5)]
        runtime: u64,
        /// Size of each test device in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
    /// Replication churn: fio at full speed (sequential 1 MiB, random 64 KiB,
    /// half-compressible) on a protected RAM-backed loop device with the agent and a
    /// process server on this machine, plus a 100 MB/s paced phase for RPO lag; then
    /// saturation runs (ext4, 4 KiB and 64 KiB random writes at QD32 paced at 50, 80 and
    /// 150 % of the measured replication throughput): points per minute, largest gap,
    /// forced points and their stalls, RPO. Writes target/bench/churn.json.
    Churn {
        /// Seconds per fio phase.
        #[arg(long, default_value_t = 10)]
        runtime: u64,
        /// Seconds per saturation run (0 skips them).
        #[arg(long, default_value_t = 60)]
        saturation_secs: u64,
        /// Size of the protected device in MiB.
        #[arg(long, default_value_t = 2048)]
        size_mib: u64,
    },
    /// Failover speed: materialise the latest point of a replicated disk (three quarters
    /// filled with half-compressible data) from a local target store, vs `cp
    /// --sparse=always` of the source image; and the store's size after a paced churn vs
    /// the bytes written. Writes target/bench/failover.json.
    Failover {
        /// Image size in MiB.
        #[arg(long, default_value_t = 4096)]
        size_mib: u64,
        /// Seconds of paced (20 MB/s) random overwrites after the fill.
        #[arg(long, default_value_t = 30)]
        churn_secs: u64,
    },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Capture {
            reps,
            runtime,
            size_mib,
        } => capture(reps, runtime, size_mib),
        Which::Churn {
            runtime,
            size_mib,
            saturation_secs,
        } => churn(runtime, size_mib, saturation_secs),
        Which::Failover {
            size_mib,
            churn_secs,
        } => failover(size_mib, churn_secs),
    }
}

struct Job {
    name: &'static str,
    args: &'static [&'static str],
}

const JOBS: [Job; 3] = [
    Job {
        name: "qd32",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    },
    Job {
        name: "qd1",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    },
    Job {
        name: "seq",
        args: &["--rw=write", "--bs=1M", "--iodepth=8"],
    },
];

#[derive(Clone, Copy, Debug)]
struct FioResult {
    iops: f64,
    bw_bytes: f64,
    p99_ns: f64,
}

fn fio(dev: &Path, job: &Job, runtime: u64) -> anyhow::Result<FioResult> {
    let out = Command::new("fio")
        .args([
            "--name=ripcord",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--randrepeat=0",
            "--norandommap",
            "--output-format=json",
        ])
        .arg(format!("--runtime={runtime}"))
        .arg(format!("--filename={}", dev.display()))
        .args(job.args)
        .output()
        .context("running fio (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("no JSON in fio output")?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio JSON")?;
    let w = &v["jobs"][0]["write"];
    Ok(FioResult {
        iops: w["iops"].as_f64().context("fio: no write.iops")?,
        bw_bytes: w["bw_bytes"].as_f64().context("fio: no write.bw_bytes")?,
        p99_ns: w["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(f64::NAN),
    })
}

/// A `ripcord-agent watch` without JSON output (as in production: the dirty set only).
struct Watcher {
    child: Child,
    stats: PathBuf,
}

impl Watcher {
    fn start(agent: &Path, dev: &Path, dir: &Path) -> anyhow::Result<Watcher> {
        let ready = dir.join("ready");
        let stats = dir.join("stats.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(agent)
            .args(["watch", "--interval", "0", "--ready-file"])
            .arg(&ready)
            .arg("--stats-file")
            .arg(&stats)
            .arg(dev)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ripcord-agent")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(s) = child.try_wait()? {
                bail!("ripcord-agent exited early ({s}); run it by hand to see why");
            }
            ensure!(
                Instant::now() < deadline,
                "ripcord-agent did not attach in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Watcher { child, stats })
    }

    /// (prog_id, run_cnt, run_time_ns) of every BPF program the agent holds, from
    /// `/proc/PID/fdinfo` (counted only while `kernel.bpf_stats_enabled` is 1).
    fn bpf_stats(&self) -> Vec<(u64, u64, u64)> {
        let pid = self.child.id();
        let mut out = Vec::new();
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return out;
        };
        for fd in fds.filter_map(Result::ok) {
            let is_prog = std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_string_lossy().contains("bpf-prog"));
            if !is_prog {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let id = field("prog_id:");
            if !out.iter().any(|(i, _, _)| *i == id) {
                out.push((id, field("run_cnt:"), field("run_time_ns:")));
            }
        }
        out
    }

    /// Stop and return (events, dropped).
    fn stop(mut self) -> anyhow::Result<(u64, u64)> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let status = self.child.wait()?;
        ensure!(status.success(), "ripcord-agent failed: {status}");
        let v: Value = serde_json::from_slice(&std::fs::read(&self.stats)?)?;
        Ok((
            v[0]["events"].as_u64().unwrap_or(0),
            v[0]["dropped"].as_u64().unwrap_or(0),
        ))
    }
}

/// Run `job` once with the agent attached and `kernel.bpf_stats_enabled` on: returns
/// (run count, ns per run) of each program that ran, and the programs' total time per
/// write fio completed.
fn bpf_cost(
    agent: &Path,
    dev: &Path,
    dir: &Path,
    job: &Job,
    runtime: u64,
) -> anyhow::Result<(Vec<(u64, f64)>, f64)> {
    const KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(KNOB).context("reading kernel.bpf_stats_enabled")?;
    std::fs::write(KNOB, "1").context("enabling kernel.bpf_stats_enabled")?;
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(KNOB, self.0.trim());
        }
    }
    let _restore = Restore(before);
    let w = Watcher::start(agent, dev, dir)?;
    let start = w.bpf_stats();
    let r = fio(dev, job, runtime)?;
    let end = w.bpf_stats();
    w.stop()?;
    let writes = r.iops * runtime as f64;
    let mut per_prog = Vec::new();
    let mut total_ns = 0u64;
    for (id, cnt, ns) in end {
        let (c0, n0) = start
            .iter()
            .find(|(i, _, _)| *i == id)
            .map_or((0, 0), |&(_, c, n)| (c, n));
        let (runs, time) = (cnt - c0, ns - n0);
        if runs > 0 {
            per_prog.push((runs, time as f64 / runs as f64));
            total_ns += time;
        }
    }
    per_prog.sort_by_key(|p| std::cmp::Reverse(p.0));
    Ok((per_prog, total_ns as f64 / writes.max(1.0)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn capture(reps: usize, runtime: u64, size_mib: u64) -> anyhow::Result<()> {
    ensure!(
        reps >= 1 && runtime >= 1,
        "--reps and --runtime must be at least 1"
    );
    cargo(&["build", "--release", "-p", "ripcord-agent"])?;
    let agent = workspace_root().join("target/release/ripcord-agent");
    let scratch = Scratch::new("bench");

    let shm_dir = PathBuf::from(format!("/dev/shm/ripcord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&shm_dir)?;
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _shm_guard = RemoveDir(shm_dir.clone());

    let backends: [(&str, PathBuf, &[&str]); 2] = [
        ("shm", shm_dir.join("disk.img"), &[]),
        ("disk", scratch.path.join("disk.img"), &["--direct-io=on"]),
    ];
    let mut report = BTreeMap::new();
    let mut rows = Vec::new();
    let mut total_dropped = 0;
    let mut total_events = 0;
    for (backend, file, losetup_args) in backends {
        let dev = LoopDevice::create_with(&file, size_mib << 20, losetup_args)?;
        // Allocate the backing file first so no run pays for first-touch allocation.
        testkit::run(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={}", dev.path.display()),
                "bs=1M",
                "oflag=direct",
                "status=none",
            ],
        )
        .or_else(|e| {
            if e.to_string().contains("No space left") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let mut results: BTreeMap<(&str, bool), Vec<FioResult>> = BTreeMap::new();
        for rep in 0..reps {
            for job in &JOBS {
                // Alternate which mode goes first, to cancel drift.
                let order = if rep % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                };
                for with_agent in order {
                    let watcher = if with_agent {
                        Some(Watcher::start(&agent, &dev.path, &scratch.path)?)
                    } else {
                        None
                    };
                    let r = fio(&dev.path, job, runtime)?;
                    if let Some(w) = watcher {
                        let (events, dropped) = w.stop()?;
                        total_events += events;
                        total_dropped += dropped;
                    }
                    eprintln!(
                        "  {backend} {} rep {rep} {}: {:.0} IOPS, {:.1} MB/s, p99 {:.1} us",
                        job.name,
                        if with_agent { "with agent" } else { "without" },
                        r.iops,
                        r.bw_bytes / 1e6,
                        r.p99_ns / 1e3
                    );
                    results.entry((job.name, with_agent)).or_default().push(r);
                }
            }
        }
        let med = |job: &str, with: bool, f: fn(&FioResult) -> f64| {
            median(&mut results[&(job, with)].iter().map(f).collect::<Vec<_>>())
        };
        let mut b = serde_json::Map::new();
        for (metric, job, f, unit) in [
            (
                "iops_qd32",
                "qd32",
                (|r: &FioResult| r.iops) as fn(&FioResult) -> f64,
                "IOPS",
            ),
            ("iops_qd1", "qd1", |r| r.iops, "IOPS"),
            ("p99_lat_qd1", "qd1", |r| r.p99_ns / 1e3, "us"),
            ("seq_bw", "seq", |r| r.bw_bytes / 1e6, "MB/s"),
        ] {
            let (without, with) = (med(job, false, f), med(job, true, f));
            let ratio = with / without;
            b.insert(format!("{metric}_without"), json!(without));
            b.insert(format!("{metric}_with"), json!(with));
            b.insert(format!("{metric}_ratio"), json!(ratio));
            rows.push(format!(
                "{backend:<5} {metric:<12} {without:>12.1} {with:>12.1} {ratio:>8.3}  ({unit})"
            ));
        }
        // The programs' own cost: one more run per job with the kernel's BPF statistics
        // on (they cost two clock reads per program run, so the ratio runs keep them off).
        let mut costs = serde_json::Map::new();
        for job in &JOBS {
            let (per_prog, ns_per_write) =
                bpf_cost(&agent, &dev.path, &scratch.path, job, runtime)?;
            rows.push(format!(
                "{backend:<5} bpf ns/write {:<5} {ns_per_write:>12.0}   (per program run: {})",
                job.name,
                per_prog
                    .iter()
                    .map(|(runs, ns)| format!("{ns:.0} ns x {runs}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            costs.insert(
                job.name.to_owned(),
                json!({ "ns_per_write": ns_per_write, "programs": per_prog }),
            );
        }
        b.insert("bpf_cost".into(), Value::Object(costs));
        report.insert(backend, Value::Object(b));
    }
    let worst = |key: &str, max: bool| {
        let vals = report.values().filter_map(|b| b[key].as_f64());
        if max {
            vals.fold(f64::MIN, f64::max)
        } else {
            vals.fold(f64::MAX, f64::min)
        }
    };
    let summary = json!({
        "iops_ratio_qd32": worst("iops_qd32_ratio", false),
        "iops_ratio_qd1": worst("iops_qd1_ratio", false),
        "p99_lat_ratio_qd1": worst("p99_lat_qd1_ratio", true),
        "seq_bw_ratio": worst("seq_bw_ratio", false),
        "events_dropped": total_dropped,
        "events_captured": total_events,
        "reps": reps,
        "runtime_s": runtime,
        "device_mib": size_mib,
        "note": "ratios are with/without medians; top-level ratios are the worst backend",
        "backends": report,
    });
    println!("\nbackend metric           without         with    ratio");
    for r in &rows {
        println!("{r}");
    }
    println!(
        "\nworst: iops_ratio_qd32 {:.3}, iops_ratio_qd1 {:.3}, p99_lat_ratio_qd1 {:.3}, \
         seq_bw_ratio {:.3}; events dropped {total_dropped} of {total_events}",
        summary["iops_ratio_qd32"].as_f64().unwrap_or(f64::NAN),
        summary["iops_ratio_qd1"].as_f64().unwrap_or(f64::NAN),
        summary["p99_lat_ratio_qd1"].as_f64().unwrap_or(f64::NAN),
        summary["seq_bw_ratio"].as_f64().unwrap_or(f64::NAN),
    );
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("capture.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after ") ".
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 here.
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

/// Peak resident set of a process, MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// fio writing half-compressible data; returns MB/s.
pub(crate) fn fio_churn(dev: &Path, args: &[&str], runtime: u64) -> anyhow::Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=churn",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--output-format=json",
            "--buffer_compress_percentage=50",
            "--buffer_compress_chunk=4k",
            "--refill_buffers",
            "--randrepeat=0",
        ])
        .arg(format!("--runtime={runtime}"))
        .arg(format!("--filename={}", dev.display()))
        .args(args)
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text[text.find('{').context("no fio JSON")?..])?;
    Ok(v["jobs"][0]["write"]["bw_bytes"]
        .as_f64()
        .context("no write.bw_bytes")?
        / 1e6)
}

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

pub fn churn(runtime: u64, size_mib: u64, saturation_secs: u64) -> anyhow::Result<()> {
    use testkit::replication::{AgentIdentity, ProcessServer, Replicator};
    crate::release_binaries()?;
    let scratch = Scratch::new("bench-churn");
    let shm_dir = PathBuf::from(format!("/dev/shm/ripcord-churn-{}", std::process::id()));
    std::fs::create_dir_all(&shm_dir)?;
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _guard = RemoveDir(shm_dir.clone());
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

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            total += if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            };
        }
    }
    total
}

pub fn failover(size_mib: u64, churn_secs: u64) -> anyhow::Result<()> {
    use testkit::replication::{AgentIdentity, ProcessServer, Replicator, ripcord, wait_for_point};
    crate::release_binaries()?;
    let scratch = Scratch::new("bench-failover");
    let dev = LoopDevice::create(&scratch.path.join("disk.img"), size_mib << 20)?;
    // Fill the disk: half-compressible data over the first three quarters, zeros after.
    let fill = fio_churn(
        &dev.path,
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            &format!("--size={}M", size_mib * 3 / 4),
            "--time_based=0",
        ],
        600,
    );
    fill.context("filling the disk")?;
    let target_dir = scratch.path.join("target-store");
    let target = format!("file://{}", target_dir.display());
    let mut ps = ProcessServer::start_with_target(&scratch.path, Some(&target))?;
    let id = AgentIdentity::register(&ps, &scratch.path, "bench")?;
    let agent = Replicator::start(&id, &[&dev.path], &[])?;
    agent.wait_synced(Duration::from_secs(900))?;
    // A compressed "day": paced random overwrites.
    eprintln!("failover bench: {churn_secs} s of paced churn");
    let churn_mbps = fio_churn(
        &dev.path,
        &["--rw=randwrite", "--bs=64k", "--iodepth=4", "--rate=20m"],
        churn_secs,
    )?;
    let stats_file = agent.stats_file.clone();
    let (ok, log) = agent.stop()?;
    ensure!(ok, "agent failed:\n{log}");
    let disk_id = id.disk_id(&dev.path)?;
    let last = testkit::replication::Replicator::pushed_seq(&stats_file);
    wait_for_point(
        &target,
        &disk_id,
        &ps.passphrase_file,
        last,
        Duration::from_secs(600),
    )?;
    ps.stop()?;
    let written = (size_mib * 3 / 4) as f64 * 1048576.0 + churn_mbps * 1e6 * churn_secs as f64;
    let store_bytes = dir_bytes(&target_dir) as f64;

    // Failover vs cp --sparse=always of the same image, page cache dropped before each,
    // three alternating runs (medians; this machine is noisy). Failover ends with an
    // fsync (a recovered disk must be durable), so cp is also timed with the `sync` that
    // makes its copy durable; both ratios are reported.
    let drop_caches = || {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    };
    let image = scratch.path.join("failover.img");
    let copy = scratch.path.join("copy.img");
    let (mut t_fo, mut t_cps, mut t_cp_syncs) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = String::new();
    for _ in 0..3 {
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_file(&copy);
        testkit::run("sync", &[])?;
        drop_caches();
        let t0 = Instant::now();
        let (ok, o, err) = ripcord(
            &[
                "failover",
                "--target",
                &target,
                "--disk",
                &disk_id,
                "--output",
                image.to_str().context("path")?,
            ],
            &ps.passphrase_file,
        )?;
        ensure!(ok, "failover failed: {err}");
        t_fo.push(t0.elapsed().as_secs_f64());
        out = o;
        testkit::run("sync", &[])?;
        drop_caches();
        let t0 = Instant::now();
        testkit::run(
            "cp",
            &[
                "--sparse=always",
                dev.backing.to_str().context("path")?,
                copy.to_str().context("path")?,
            ],
        )?;
        t_cps.push(t0.elapsed().as_secs_f64());
        testkit::run("sync", &[])?;
        t_cp_syncs.push(t0.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t_failover, t_cp, t_cp_sync) = (
        median(&mut t_fo),
        median(&mut t_cps),
        median(&mut t_cp_syncs),
    );
    let diff = testkit::sys::diff_sectors(&image, &dev.path)?;
    ensure!(
        diff.is_empty(),
        "the failed-over image differs from the source in {} sectors, first {:?}",
        testkit::ranges::total(&diff),
        &diff[..diff.len().min(8)]
    );

    let v = json!({
        "image_mib": size_mib,
        "failover_s": t_failover,
        "failover_runs_s": t_fo,
        "cp_sparse_s": t_cp,
        "cp_sparse_runs_s": t_cps,
        "cp_sparse_then_sync_s": t_cp_sync,
        "speed_ratio_vs_cp": t_cp / t_failover,
        "speed_ratio_vs_cp_then_sync": t_cp_sync / t_failover,
        "failover_output": out.trim(),
        "bytes_written": written,
        "store_bytes": store_bytes,
        "store_to_written_ratio": store_bytes / written,
    });
    println!(
        "\nfailover of a {size_mib} MiB image (latest point, local target store), median of 3"
    );
    println!("  ripcord failover (durable)   {t_failover:>8.2} s   runs {t_fo:.2?}");
    println!("  cp --sparse=always           {t_cp:>8.2} s   runs {t_cps:.2?}");
    println!("  cp --sparse=always; sync     {t_cp_sync:>8.2} s   runs {t_cp_syncs:.2?}");
    println!(
        "  speed ratio (cp time / failover time): {:.2}; with the sync that makes the copy durable: {:.2}",
        t_cp / t_failover,
        t_cp_sync / t_failover
    );
    println!(
        "store size after the fill + {churn_secs} s churn: {:.0} MiB for {:.0} MiB written (ratio {:.2})",
        store_bytes / 1048576.0,
        written / 1048576.0,
        store_bytes / written
    );
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("failover.json"),
        serde_json::to_vec_pretty(&v)?,
    )?;
    println!("wrote {}", out_dir.join("failover.json").display());
    Ok(())
}
