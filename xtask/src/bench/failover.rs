//! Failover speed: materialise the latest point of a replicated disk from a local target
//! store vs `cp --sparse=always` of the source image, and the store's size after a paced
//! churn vs the bytes written.
//!
//! Invariants: the page cache is dropped before every timed run, runs alternate and
//! medians are reported; the failed-over image must equal the source sector for sector or
//! the bench fails.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::json;
use testkit::{LoopDevice, Scratch};

use super::common::{fill_three_quarters, fio_churn, median};
use crate::workspace_root;

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

pub(super) fn failover(size_mib: u64, churn_secs: u64) -> anyhow::Result<()> {
    use testkit::replication::{AgentIdentity, ProcessServer, Replicator, ripcord, wait_for_point};
    crate::release_binaries()?;
    let scratch = Scratch::new("bench-failover");
    let dev = LoopDevice::create(&scratch.path.join("disk.img"), size_mib << 20)?;
    let fill_mib = fill_three_quarters(&dev.path, size_mib)?;
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
    let written = fill_mib as f64 * 1048576.0 + churn_mbps * 1e6 * churn_secs as f64;
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
