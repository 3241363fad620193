//! Replication over a lossy link, per QUIC congestion controller: the agent's initial sync
//! of a loop device full of random (incompressible) data, through the test kit's fault
//! proxy with a round-trip delay and random loss both ways, until the process server has
//! acknowledged every batch. Cubic and BBR (the agent's `congestion` setting) alternate
//! within each repetition; medians are reported, and the ratio of the two in one run.
//!
//! Invariants: every run starts a fresh process server, store and agent (nothing cached
//! between runs); a run that does not finish within its timeout fails the bench rather
//! than reporting a number.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use testkit::{FaultConfig, FaultProxy, Faults, Site};

use super::common::median;
use crate::workspace_root;

const CONTROLLERS: [&str; 2] = ["cubic", "bbr"];

/// One initial sync of `mib` MiB through the proxy with `loss` and `rtt`; MB/s.
fn one_run(cc: &str, mib: u64, loss: f64, rtt: Duration, seed: u64) -> anyhow::Result<f64> {
    let site = Site::builder("bench-link")
        .file_target()
        .start()
        .context("cargo xtask bench link needs root (BPF, loop devices)")?;
    let disk = site.loop_device("disk.img", mib << 20);
    {
        use rand::{RngExt as _, SeedableRng as _};
        use std::io::Write as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk.path)?;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            rng.fill(&mut buf[..]);
            f.write_all(&buf)?;
        }
        f.sync_all()?;
    }
    let faults = Faults {
        drop: loss,
        delay: rtt / 2,
        ..Faults::default()
    };
    let proxy = FaultProxy::start(site.ps.data_addr(), FaultConfig::both(faults), seed)?;
    let config = site.path().join("agent.toml");
    std::fs::write(&config, format!("congestion = \"{cc}\"\n"))?;
    let started = Instant::now();
    let agent = site.replicator_via(
        proxy.addr(),
        &[&disk.path],
        &["--config", config.to_str().context("non-UTF-8 path")?],
    );
    let timeout = Duration::from_secs(600);
    loop {
        let done = agent.stats().is_some_and(|s| {
            let d = &s["disks"][0];
            d["syncing"] == false
                && d["pushed_seq"].as_u64().is_some_and(|p| p > 0)
                && d["pushed_seq"] == d["acked_seq"]
        });
        if done {
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "{cc} at {:.0}% loss: the initial sync was not acknowledged within {timeout:?}:\n{}",
                loss * 100.0,
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = started.elapsed().as_secs_f64();
    let c = proxy.counts();
    eprintln!(
        "  {cc:5} loss {:4.1}%: {mib} MiB in {secs:6.2} s = {:6.2} MB/s ({} of {} datagrams \
         dropped)",
        loss * 100.0,
        (mib << 20) as f64 / secs / 1e6,
        c.dropped,
        c.from_clients + c.from_server
    );
    Ok((mib << 20) as f64 / secs / 1e6)
}

pub(super) fn link(mib: u64, losses: &[f64], rtt_ms: u64, reps: usize) -> anyhow::Result<()> {
    crate::release_binaries()?;
    let rtt = Duration::from_millis(rtt_ms);
    let mut rows = Vec::new();
    println!("| loss | cubic MB/s | bbr MB/s | bbr / cubic |\n| --- | --- | --- | --- |");
    for &loss in losses {
        let mut by_cc: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut ratios = Vec::new();
        for rep in 0..reps {
            // Alternate which controller goes first.
            let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut this = [0.0; 2];
            for i in order {
                let seed = 1000 + rep as u64;
                this[i] = one_run(CONTROLLERS[i], mib, loss, rtt, seed)?;
                by_cc[i].push(this[i]);
            }
            ratios.push(this[1] / this[0]);
        }
        let (cubic, bbr, ratio) = (
            median(&mut by_cc[0]),
            median(&mut by_cc[1]),
            median(&mut ratios),
        );
        println!(
            "| {:.1}% | {cubic:.2} | {bbr:.2} | {ratio:.2}x |",
            loss * 100.0
        );
        rows.push(json!({
            "loss": loss, "cubic_mb_s": cubic, "bbr_mb_s": bbr, "bbr_over_cubic": ratio,
            "cubic_runs": by_cc[0], "bbr_runs": by_cc[1],
        }));
    }
    let v = json!({
        "mib": mib, "rtt_ms": rtt_ms, "reps": reps, "rows": rows,
        "command": format!(
            "cargo xtask bench link --mib {mib} --rtt-ms {rtt_ms} --reps {reps} --loss {}",
            losses.iter().map(|l| format!("{l}")).collect::<Vec<_>>().join(",")
        ),
    });
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("link.json"), serde_json::to_vec_pretty(&v)?)?;
    println!("wrote {}", out_dir.join("link.json").display());
    Ok(())
}
