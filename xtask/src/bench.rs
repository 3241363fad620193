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
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Capture {
            reps,
            runtime,
            size_mib,
        } => capture(reps, runtime, size_mib),
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

    /// Stop and return (events, dropped).
    fn stop(mut self) -> anyhow::Result<(u64, u64)> {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait()?;
        ensure!(status.success(), "ripcord-agent failed: {status}");
        let v: Value = serde_json::from_slice(&std::fs::read(&self.stats)?)?;
        Ok((
            v[0]["events"].as_u64().unwrap_or(0),
            v[0]["dropped"].as_u64().unwrap_or(0),
        ))
    }
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
