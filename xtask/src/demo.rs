//! `cargo xtask demo`: protect a loop device, run a workload, verify the capture.

use std::time::Instant;

use anyhow::{Context as _, ensure};
use testkit::{AgentProcess, LoopDevice, Mount, Scratch, dev_id, ranges};

use crate::cargo;

const MIB: u64 = 1 << 20;

pub fn run(size_mib: u64) -> anyhow::Result<()> {
    ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the demo needs root (BPF probes, loop devices, mounts)"
    );
    ensure!(size_mib >= 64, "--size-mib must be at least 64");
    cargo(&["build", "--release", "-p", "ripcord-agent"])?;
    let agent = crate::workspace_root().join("target/release/ripcord-agent");

    let dir = Scratch::new("demo");
    println!("\n== ripcord demo: block-change capture ==");
    let disk = LoopDevice::create(&dir.path.join("disk.img"), size_mib * MIB)?;
    println!(
        "1. protected disk: {} ({size_mib} MiB loop device over a sparse file)",
        disk.path.display()
    );
    testkit::run(
        "mkfs.ext4",
        &["-q", "-F", disk.path.to_str().context("path")?],
    )?;
    let before = dir.path.join("before.img");
    testkit::run(
        "cp",
        &[
            "--sparse=always",
            disk.backing.to_str().context("path")?,
            before.to_str().context("path")?,
        ],
    )?;
    println!("2. ext4 created; reference copy taken");

    let watcher = AgentProcess::watch(&agent, &[&disk.path], &["--interval", "1"], &dir.path)?;
    println!("3. ripcord-agent attached to block:block_rq_complete and block:block_bio_queue");
    let started = Instant::now();
    let mnt = Mount::new(&disk.path, &dir.path.join("mnt"), &["-t", "ext4"])?;
    let files = (size_mib / 8).clamp(16, 200) as usize;
    let bytes = testkit::file_workload(&mnt.dir, 2026, files, 4 << 20)?;
    mnt.unmount()?;
    println!(
        "4. workload: {files} files, {:.1} MiB written with fsync, some deleted and renamed, \
         unmounted ({:.1} s)",
        bytes as f64 / MIB as f64,
        started.elapsed().as_secs_f64()
    );
    let run = watcher.stop()?;
    let dev = dev_id(&disk.path);
    let stats = run.stats_for(&dev);
    let count = |op: &str| run.changes.iter().filter(|e| e.op == op).count();
    let captured = ranges::union(run.ranges(&dev, true));
    println!(
        "5. captured {} events (write {}, discard {}, write-zeroes {}, flush {}), {} dropped; \
         {:.1} MiB dirty in {} extents",
        stats.events,
        count("write"),
        count("discard"),
        count("write-zeroes"),
        count("flush"),
        stats.dropped,
        ranges::total(&captured) as f64 * 512.0 / MIB as f64,
        captured.len()
    );

    let changed = testkit::sys::diff_sectors(&before, &disk.path)?;
    let lost = ranges::difference(&changed, &captured);
    ensure!(
        lost.is_empty(),
        "VERIFY FAILED: {} changed sectors were not captured, first {:?}",
        ranges::total(&lost),
        &lost[..lost.len().min(5)]
    );
    println!(
        "6. VERIFIED: all {} sectors ({:.1} MiB) that differ from the reference copy are in \
         the captured set",
        ranges::total(&changed),
        ranges::total(&changed) as f64 * 512.0 / MIB as f64
    );
    println!("\ndemo passed; cleaning up {}", dir.path.display());
    Ok(())
}
