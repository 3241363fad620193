//! Plan failover speed (issue 16's benchmark, its recovery-plan half): four replicated
//! machines, one disk each (three quarters filled with half-compressible data, the rest
//! zeroes), failed over by one `ripcord plan failover` (the machines of a group in
//! parallel) vs four `ripcord failover` one after another.
//!
//! Invariants: the page cache is dropped before every timed run, the two ways alternate,
//! medians are reported; every image must equal its source device sector for sector after
//! every run, or the bench fails.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::json;
use testkit::{
    LoopDevice, Scratch,
    replication::{AgentIdentity, ProcessServer, Replicator, ripcord, wait_for_point},
};

use super::common::{fill_three_quarters, median};
use crate::workspace_root;

const MACHINES: usize = 4;

pub(super) fn plan(size_mib: u64, reps: usize) -> anyhow::Result<()> {
    crate::release_binaries()?;
    let scratch = Scratch::new("bench-plan");
    let devices = (0..MACHINES)
        .map(|i| LoopDevice::create(&scratch.path.join(format!("disk-{i}.img")), size_mib << 20))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (i, dev) in devices.iter().enumerate() {
        eprintln!("plan bench: filling disk {i}");
        fill_three_quarters(&dev.path, size_mib)?;
    }
    let target = format!("file://{}", scratch.path.join("target-store").display());
    let mut ps = ProcessServer::start_with_target(&scratch.path, Some(&target))?;
    let id = AgentIdentity::register(&ps, &scratch.path, "bench")?;
    let paths: Vec<_> = devices.iter().map(|d| d.path.as_path()).collect();
    let agent = Replicator::start(&id, &paths, &[])?;
    agent.wait_synced(Duration::from_secs(1800))?;
    let stats = agent.stats_file.clone();
    let (ok, log) = agent.stop()?;
    ensure!(ok, "the agent did not stop cleanly:\n{log}");
    let mut disks = Vec::new();
    for dev in &devices {
        let disk = id.disk_id(&dev.path)?;
        let last = Replicator::pushed_seq_of(&stats, Some(&disk));
        wait_for_point(
            &target,
            &disk,
            &ps.passphrase_file,
            last,
            Duration::from_secs(900),
        )?;
        disks.push(disk);
    }
    ps.stop()?;

    let outputs: Vec<_> = (0..MACHINES)
        .map(|i| scratch.path.join(format!("recovered-{i}.img")))
        .collect();
    let plan_file = scratch.path.join("plan.toml");
    let mut text =
        format!("name = \"bench\"\ntarget = \"{target}\"\n\n[[group]]\nname = \"all\"\n");
    for (i, (disk, out)) in disks.iter().zip(&outputs).enumerate() {
        text += &format!(
            "[[group.machine]]\nname = \"m{i}\"\ndisks = [{{ disk = \"{disk}\", output = \"{}\" }}]\n",
            out.display()
        );
    }
    std::fs::write(&plan_file, text)?;
    let state = scratch.path.join("plan-state");
    let fresh = || -> anyhow::Result<()> {
        for out in &outputs {
            let _ = std::fs::remove_file(out);
        }
        let _ = std::fs::remove_dir_all(&state);
        testkit::run("sync", &[])?;
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        Ok(())
    };
    let check = |how: &str| -> anyhow::Result<()> {
        for (out, dev) in outputs.iter().zip(&devices) {
            let diff = testkit::sys::diff_sectors(out, &dev.path)?;
            ensure!(
                diff.is_empty(),
                "{how}: {} differs from its source in {} sectors",
                out.display(),
                testkit::ranges::total(&diff)
            );
        }
        Ok(())
    };
    let (mut one_by_one, mut planned) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        // Alternate which goes first: the second run of a pair finds a warmer machine.
        for plan_first in [rep % 2 == 1, rep % 2 == 0] {
            fresh()?;
            let t0 = Instant::now();
            if plan_first {
                let (ok, out, err) = ripcord(
                    &[
                        "plan",
                        "failover",
                        "--plan",
                        plan_file.to_str().context("path")?,
                        "--state-dir",
                        state.to_str().context("path")?,
                    ],
                    &ps.passphrase_file,
                )?;
                ensure!(ok, "plan failover failed: {out}{err}");
                planned.push(t0.elapsed().as_secs_f64());
                check("plan failover")?;
            } else {
                for (disk, out) in disks.iter().zip(&outputs) {
                    let (ok, _, err) = ripcord(
                        &[
                            "failover",
                            "--target",
                            &target,
                            "--disk",
                            disk,
                            "--output",
                            out.to_str().context("path")?,
                        ],
                        &ps.passphrase_file,
                    )?;
                    ensure!(ok, "failover of {disk} failed: {err}");
                }
                one_by_one.push(t0.elapsed().as_secs_f64());
                check("failover one by one")?;
            }
        }
    }
    let (t_seq, t_plan) = (
        median(&mut one_by_one.clone()),
        median(&mut planned.clone()),
    );
    let ratio = t_plan / t_seq;
    println!(
        "\nfailover of {MACHINES} machines of {size_mib} MiB (latest points, local target store), \
         medians of {reps}"
    );
    println!("  one by one (ripcord failover x{MACHINES})  {t_seq:>8.2} s   runs {one_by_one:.2?}");
    println!("  one plan, one group (parallel)     {t_plan:>8.2} s   runs {planned:.2?}");
    println!("  plan / one by one: {ratio:.2} (goal <= 0.5)");
    let v = json!({
        "machines": MACHINES,
        "disk_mib": size_mib,
        "one_by_one_s": t_seq,
        "one_by_one_runs_s": one_by_one,
        "plan_s": t_plan,
        "plan_runs_s": planned,
        "plan_to_one_by_one": ratio,
        "cores": std::thread::available_parallelism().map_or(0, usize::from),
    });
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("plan.json"), serde_json::to_vec_pretty(&v)?)?;
    println!("wrote {}", out_dir.join("plan.json").display());
    Ok(())
}
