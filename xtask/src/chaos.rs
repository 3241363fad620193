//! `cargo xtask chaos`: the chaos engine of the test kit ([`testkit::chaos`]) for long runs,
//! every fault enabled unless `--fault` picks some; prints the table of faults injected and
//! invariants checked. Fails (exit 1) at the first broken invariant, with the seed.

use std::time::Duration;

use anyhow::{Context as _, bail};
use rand::RngExt as _;
use testkit::chaos::{ChaosConfig, Fault};

fn parse_fault(name: &str) -> anyhow::Result<Fault> {
    Ok(match name {
        "kill-agent" => Fault::KillAgent,
        "kill-server" => Fault::KillServer,
        "lossy-network" => Fault::LossyNetwork,
        "partition" => Fault::Partition,
        "flap" => Fault::Flap,
        "rebind" => Fault::Rebind,
        "kill-mt" => Fault::KillMasterTarget,
        other => bail!(
            "unknown fault {other:?}: kill-agent, kill-server, kill-mt, lossy-network, \
             partition, flap or rebind"
        ),
    })
}

pub fn run(
    minutes: u64,
    seed: Option<u64>,
    faults: &[String],
    check_points: usize,
) -> anyhow::Result<()> {
    let faults = if faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        faults
            .iter()
            .map(|f| parse_fault(f))
            .collect::<anyhow::Result<_>>()?
    };
    crate::release_binaries()?;
    let seed = seed.unwrap_or_else(|| rand::rng().random());
    eprintln!("chaos: {minutes} min, seed {seed} (replay with --seed {seed})");
    let Some(mut site) = testkit::Site::builder("xtask-chaos").file_target().start() else {
        bail!("cargo xtask chaos needs root (BPF, loop devices)");
    };
    let config = ChaosConfig {
        check_points,
        ..ChaosConfig::new(seed, faults, Duration::from_secs(minutes * 60))
    };
    let report = testkit::chaos::run(&mut site, &config)
        .with_context(|| format!("chaos run with seed {seed} broke an invariant"))?;
    println!("{report}");
    Ok(())
}
