//! Capture overhead: fio on a loop device with and without `ripcord-agent watch`
//! attached, alternating runs, and the BPF programs' own run time per write.
//!
//! Invariants: each with/without pair runs back to back on the same device, and only
//! medians and their ratios are reported; `kernel.bpf_stats_enabled` is restored to its
//! previous value when the cost run ends, whatever happens.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use testkit::{LoopDevice, Scratch};

use super::common::{RemoveDirOnDrop, median};
use crate::{cargo, workspace_root};

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

pub(super) fn capture(reps: usize, runtime: u64, size_mib: u64) -> anyhow::Result<()> {
    ensure!(
        reps >= 1 && runtime >= 1,
        "--reps and --runtime must be at least 1"
    );
    cargo(&["build", "--release", "-p", "ripcord-agent"])?;
    let agent = workspace_root().join("target/release/ripcord-agent");
    let scratch = Scratch::new("bench");

    let shm_dir = PathBuf::from(format!("/dev/shm/ripcord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&shm_dir)?;
    let _shm_guard = RemoveDirOnDrop(shm_dir.clone());

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
