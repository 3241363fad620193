//! Helpers the benches share: fio writing half-compressible data, the median of a
//! sample, a process's CPU seconds and peak RSS from `/proc`, and a directory removed
//! when its guard drops.
//!
//! Invariants: the `/proc` readers never fail (a process that is gone reads as 0), so a
//! bench reports what it measured rather than aborting at the end of a long run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Removes a directory (and everything in it) when dropped.
pub(super) struct RemoveDirOnDrop(pub(super) PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Median of `v` (sorted in place; the mean of the middle two for an even length).
pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU seconds (user + system) of a process so far.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
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
pub(super) fn peak_rss_mib(pid: u32) -> f64 {
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

/// Fills the first three quarters of `dev` (`size_mib` MiB) with half-compressible data
/// (fio, 1 MiB sequential writes), leaving zeroes after: the disk the failover and plan
/// benches replicate. Returns the MiB written.
pub(super) fn fill_three_quarters(dev: &Path, size_mib: u64) -> anyhow::Result<u64> {
    let fill_mib = size_mib * 3 / 4;
    fio_churn(
        dev,
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            &format!("--size={fill_mib}M"),
            "--time_based=0",
        ],
        600,
    )
    .with_context(|| format!("filling {}", dev.display()))?;
    Ok(fill_mib)
}
