//! Digest speed: `DigestMap::compute` (the release `digest_device` example of
//! crates/digest) vs a plain sequential read of the same device, `dd bs=4M iflag=direct`.
//!
//! Invariants: the device is a loop device with `--direct-io=on` over a file on the root
//! disk (not tmpfs), filled with random data (no zero regions to skip); the page cache is
//! dropped before every timed run; runs alternate and medians are reported. The loop
//! device and its file are removed on drop, also when the bench fails.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::json;
use testkit::{LoopDevice, Scratch};

use super::common::median;
use crate::workspace_root;

fn drop_caches() -> anyhow::Result<()> {
    testkit::run("sync", &[])?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

fn example_binary() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release/examples/digest_device")
}

pub(super) fn digest(size_mib: u64, reps: usize) -> anyhow::Result<()> {
    ensure!(
        reps > 0 && size_mib > 0 && size_mib.is_multiple_of(4),
        "--reps must be positive and --size-mib a positive multiple of 4"
    );
    crate::cargo(&[
        "build",
        "--release",
        "-p",
        "ripcord-digest",
        "--example",
        "digest_device",
    ])?;
    let bin = example_binary();
    let scratch = Scratch::new("bench-digest");
    let dev = LoopDevice::create_with(
        &scratch.path.join("disk.img"),
        size_mib << 20,
        &["--direct-io=on"],
    )?;
    let dev_s = dev.path.to_str().context("device path")?.to_owned();
    eprintln!("digest bench: filling {dev_s} ({size_mib} MiB) with random data");
    testkit::run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={dev_s}"),
            "bs=4M",
            &format!("count={}", size_mib / 4),
            "oflag=direct",
            "status=none",
        ],
    )?;
    let (mut dd_mbps, mut digest_mbps) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        drop_caches()?;
        let t0 = Instant::now();
        testkit::run(
            "dd",
            &[
                &format!("if={dev_s}"),
                "of=/dev/null",
                "bs=4M",
                "iflag=direct",
                "status=none",
            ],
        )?;
        let dd = (size_mib << 20) as f64 / t0.elapsed().as_secs_f64() / 1e6;
        drop_caches()?;
        let out = Command::new(&bin)
            .arg(&dev_s)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "digest_device failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("digest_device output")?;
        let seconds = v["seconds"].as_f64().context("no seconds")?;
        ensure!(
            v["bytes"].as_u64() == Some(size_mib << 20),
            "digest_device read {} bytes, expected {}",
            v["bytes"],
            size_mib << 20
        );
        let dg = (size_mib << 20) as f64 / seconds / 1e6;
        eprintln!("  run {}: dd {dd:.0} MB/s, digest {dg:.0} MB/s", rep + 1);
        dd_mbps.push(dd);
        digest_mbps.push(dg);
    }
    let (dd, dg) = (median(&mut dd_mbps), median(&mut digest_mbps));
    println!(
        "digest bench ({size_mib} MiB loop device, direct-io, random data, median of {reps}):"
    );
    println!("  sequential read (dd bs=4M iflag=direct): {dd:>8.0} MB/s");
    println!("  DigestMap::compute (blocks + regions):   {dg:>8.0} MB/s");
    println!(
        "  ratio digest / read:                     {:>8.2}",
        dg / dd
    );
    let v = json!({
        "size_mib": size_mib,
        "reps": reps,
        "read_mbps": dd,
        "digest_mbps": dg,
        "ratio": dg / dd,
        "read_runs_mbps": dd_mbps,
        "digest_runs_mbps": digest_mbps,
    });
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("digest.json"), serde_json::to_vec_pretty(&v)?)?;
    println!("wrote {}", out_dir.join("digest.json").display());
    drop(dev);
    Ok(())
}
