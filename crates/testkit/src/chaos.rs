//! Chaos (issue 17): faults at random moments against a replicated oracle workload, with
//! every invariant checked. One engine for the CI test (`tests/tests/crashes.rs`: kills
//! only, a few minutes) and `cargo xtask chaos --minutes N` (every fault, long runs).
//!
//! The agent replicates one loop device through a [`FaultProxy`] while `ripcord-oracle
//! workload` stamps every block it writes. Until the time or the fault budget runs out, the
//! engine waits until the agent streams (its sync done, a point of its epoch
//! acknowledged, a batch acknowledged since the last fault), waits a random moment, and
//! injects one fault drawn from the enabled [`Fault`]s. Then it quiesces and checks:
//!
//! - **nothing acknowledged is lost**: the (epoch, seq) the agent had acknowledged just
//!   before each fault is durable in the target store at the end;
//! - **every recovery point is a crash state of the source**: each point (or an even sample
//!   of `check_points` of them) is failed over and passes the oracle's write-order checker;
//! - **the final point equals the device**, byte for byte, once the workload stopped and
//!   the agent stopped cleanly.
//!
//! The schedule comes from `seed` (printed in the report), so a run can be replayed.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use rand::{RngExt as _, SeedableRng as _};

use crate::{
    FaultConfig, FaultProxy, Faults, Flap, Site,
    replication::{Replicator, oracle_check_point, points, wait_for},
};

/// A fault the engine may inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL the agent, restart it after up to 1.5 s (a new epoch: a full sync).
    KillAgent,
    /// SIGKILL the process server, restart it after up to 1.5 s.
    KillServer,
    /// 2-15% loss, duplicates, reordering, 1% corruption and jitter, both ways, 3-10 s.
    LossyNetwork,
    /// No datagram either way for 2-9 s.
    Partition,
    /// 1 s up, 0.3-0.8 s down, for 5-10 s.
    Flap,
    /// The agent's address changes (its QUIC connection migrates).
    Rebind,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillAgent,
        Fault::KillServer,
        Fault::LossyNetwork,
        Fault::Partition,
        Fault::Flap,
        Fault::Rebind,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillAgent => "kill -9 agent",
            Fault::KillServer => "kill -9 process server",
            Fault::LossyNetwork => "lossy network",
            Fault::Partition => "partition",
            Fault::Flap => "flapping link",
            Fault::Rebind => "address change",
        }
    }
}

/// What to run.
pub struct ChaosConfig {
    /// Stop injecting after this long...
    pub duration: Duration,
    /// ...or after this many faults.
    pub max_faults: usize,
    pub faults: Vec<Fault>,
    pub seed: u64,
    pub disk_mib: u64,
    /// Points to check with the oracle (evenly spread); 0 checks every point.
    pub check_points: usize,
}

/// What happened and what was checked.
#[derive(Debug)]
pub struct ChaosReport {
    pub seed: u64,
    /// Faults injected, by name.
    pub injected: BTreeMap<&'static str, u64>,
    /// Each fault: what, at which acknowledged (epoch, seq).
    pub schedule: Vec<String>,
    /// Acknowledged positions checked durable at the end.
    pub acks_checked: usize,
    pub epochs: usize,
    pub points: usize,
    pub points_checked: usize,
    /// Datagrams dropped, duplicated, reordered, corrupted or partitioned by the proxy.
    pub datagrams_faulted: u64,
    pub secs: f64,
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "chaos run, seed {} ({:.0} s)", self.seed, self.secs)?;
        writeln!(f, "| fault | injected |\n| --- | --- |")?;
        for (name, n) in &self.injected {
            writeln!(f, "| {name} | {n} |")?;
        }
        writeln!(f, "\n| invariant | checked |\n| --- | --- |")?;
        writeln!(
            f,
            "| acknowledged batches durable in the store | {} positions |",
            self.acks_checked
        )?;
        writeln!(
            f,
            "| recovery points are crash states (oracle) | {} of {} points, {} epochs |",
            self.points_checked, self.points, self.epochs
        )?;
        writeln!(f, "| final point equals the device | yes |")?;
        write!(
            f,
            "(datagrams faulted by the proxy: {})",
            self.datagrams_faulted
        )
    }
}

fn disk_stats(agent: &Replicator) -> Option<serde_json::Value> {
    Some(agent.stats()?["disks"][0].clone())
}

fn acked(agent: &Replicator) -> Option<(u64, u64)> {
    let d = disk_stats(agent)?;
    Some((d["epoch"].as_u64()?, d["acked_seq"].as_u64()?))
}

/// Until the agent streams: sync done, a point of this epoch acknowledged, and a batch
/// acknowledged past `after`.
fn wait_streaming(agent: &Replicator, after: Option<(u64, u64)>) -> anyhow::Result<()> {
    wait_for("the agent to stream", Duration::from_secs(180), || {
        Ok(disk_stats(agent).is_some_and(|d| {
            let at = d["epoch"].as_u64().zip(d["acked_seq"].as_u64());
            d["syncing"] == false && d["acked_cuts"].as_u64().unwrap_or(0) > 0 && at > after
        }))
    })
    .with_context(|| format!("agent log:\n{}", agent.log()))
}

fn oracle_workload(device: &Path, log: &Path) -> anyhow::Result<Child> {
    Command::new(crate::binary("ripcord-oracle"))
        .args(["workload", "--seconds", "86400"])
        .args(["--qd", "4", "--iops", "800", "--flush-every", "32"])
        .args(["--discard-percent", "3", "--seed", "11"])
        .arg("--device")
        .arg(device)
        .arg("--log")
        .arg(log)
        .spawn()
        .context("starting the oracle workload")
}

/// The workload, stopped (SIGKILL) if the run ends early.
struct Workload(Child);

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the chaos on `site` (a site with a target store); see the module doc.
pub fn run(site: &mut Site, cfg: &ChaosConfig) -> anyhow::Result<ChaosReport> {
    ensure!(!cfg.faults.is_empty(), "no fault enabled");
    let started = Instant::now();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let target = site.target().to_owned();
    let pass = site.ps.passphrase_file.clone();
    let disk = site.loop_device("chaos.img", cfg.disk_mib << 20);
    let config = site.path().join("chaos-agent.toml");
    std::fs::write(&config, "cut-interval-ms = 500\n")?;
    let extra = ["--config", config.to_str().context("non-UTF-8 path")?];
    let proxy = FaultProxy::start(site.ps.data_addr(), FaultConfig::default(), cfg.seed)?;
    let mut agent = site.replicator_via(proxy.addr(), &[&disk.path], &extra);
    agent.wait_synced(Duration::from_secs(120))?;
    let disk_id = site.id.disk_id(&disk.path)?;
    let log = site.path().join("chaos-oracle.log");
    let mut workload = Workload(oracle_workload(&disk.path, &log)?);

    let mut acked_at = Vec::new();
    let mut schedule = Vec::new();
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut agent_logs = String::new();
    while started.elapsed() < cfg.duration && schedule.len() < cfg.max_faults {
        wait_streaming(&agent, acked_at.last().copied())?;
        std::thread::sleep(Duration::from_millis(rng.random_range(200..2500)));
        let at = acked(&agent).context("the agent has no stats")?;
        acked_at.push(at);
        let fault = cfg.faults[rng.random_range(0..cfg.faults.len())];
        let down = Duration::from_millis(rng.random_range(50..1500));
        let what = match fault {
            Fault::KillAgent => {
                agent.kill9();
                agent_logs.push_str(&agent.log());
                std::thread::sleep(down);
                agent = site.replicator_via(proxy.addr(), &[&disk.path], &extra);
                format!("down {down:?}")
            }
            Fault::KillServer => {
                site.ps.kill9();
                std::thread::sleep(down);
                site.ps.spawn().context("restarting the process server")?;
                format!("down {down:?}")
            }
            Fault::LossyNetwork => {
                let rate = rng.random_range(0.02..0.15);
                let f = Faults {
                    drop: rate,
                    duplicate: rate / 2.0,
                    reorder: rate,
                    corrupt: 0.01,
                    delay: Duration::from_millis(1),
                    jitter: Duration::from_millis(4),
                };
                let d = Duration::from_millis(rng.random_range(3000..10_000));
                proxy.set(FaultConfig::both(f));
                std::thread::sleep(d);
                proxy.set(FaultConfig::default());
                format!("{:.0}% loss for {d:?}", rate * 100.0)
            }
            Fault::Partition => {
                let d = Duration::from_millis(rng.random_range(2000..9000));
                proxy.partition_for(d);
                std::thread::sleep(d);
                format!("for {d:?}")
            }
            Fault::Flap => {
                let down = Duration::from_millis(rng.random_range(300..800));
                let d = Duration::from_millis(rng.random_range(5000..10_000));
                proxy.set(FaultConfig {
                    flap: Some(Flap {
                        up: Duration::from_secs(1),
                        down,
                    }),
                    ..FaultConfig::default()
                });
                std::thread::sleep(d);
                proxy.set(FaultConfig::default());
                format!(
                    "down {down:?} of every {:?}, for {d:?}",
                    down + Duration::from_secs(1)
                )
            }
            Fault::Rebind => {
                proxy.rebind();
                String::new()
            }
        };
        *injected.entry(fault.name()).or_default() += 1;
        schedule.push(format!("{} at {at:?} {what}", fault.name()));
        if let Some(status) = workload.0.try_wait()? {
            bail!("the oracle workload ended early ({status})");
        }
    }
    wait_streaming(&agent, acked_at.last().copied())?;

    // Quiesce: the workload finishes its log (SIGINT), the agent pushes its final point.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workload.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    ensure!(workload.0.wait()?.success(), "the oracle workload failed");
    agent.wait_synced(Duration::from_secs(120))?;
    let (log_tail, final_point) = site.final_point(agent, &disk_id);
    agent_logs.push_str(&log_tail);
    ensure!(
        !agent_logs.contains("refused"),
        "a restarted server resumed behind an acknowledgement:\n{agent_logs}"
    );
    let datagrams_faulted = {
        let c = proxy.counts();
        c.dropped + c.duplicated + c.reordered + c.corrupted + c.partitioned
    };
    drop(proxy);
    site.ps.stop()?;

    // Nothing acknowledged was lost.
    let durable = durable_seqs(&target, &disk_id)?;
    for (i, &(epoch, seq)) in acked_at.iter().enumerate() {
        let have = durable.get(&epoch).copied();
        ensure!(
            have.is_some_and(|d| d >= seq),
            "fault {i} ({}): batch {seq} of epoch {epoch} was acknowledged, but the store holds \
             that epoch durable only through {have:?} (seed {})",
            schedule[i],
            cfg.seed
        );
    }

    // Every point (or a sample) is a crash state; the last one is the device.
    let all = points(&target, &disk_id, &pass)?;
    let step = if cfg.check_points == 0 || all.len() <= cfg.check_points {
        1
    } else {
        all.len().div_ceil(cfg.check_points)
    };
    let image = site.path().join("chaos-point.img");
    let mut checked = 0;
    for p in all.iter().step_by(step) {
        oracle_check_point(&target, &disk_id, p, &image, &pass, &log)
            .map_err(|e| anyhow::anyhow!("{e}\n(seed {}, schedule {schedule:#?})", cfg.seed))?;
        checked += 1;
    }
    let id = final_point["id"]
        .as_str()
        .context("the final point has no id")?;
    let (ok, _, err) = crate::replication::failover(&target, &disk_id, id, &image, &pass)?;
    ensure!(ok, "failover to the final point {id} failed: {err}");
    let diff = crate::sys::diff_sectors(&image, &disk.path)?;
    ensure!(
        diff.is_empty(),
        "the final point {id} differs from the device in {} sectors, first {:?} (seed {})",
        crate::ranges::total(&diff),
        &diff[..diff.len().min(5)],
        cfg.seed
    );
    let _ = std::fs::remove_file(&image);
    let epochs = all
        .iter()
        .filter_map(|p| p["epoch"].as_u64())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    Ok(ChaosReport {
        seed: cfg.seed,
        injected,
        schedule,
        acks_checked: acked_at.len(),
        epochs,
        points: all.len(),
        points_checked: checked,
        datagrams_faulted,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Highest seq of each epoch of `disk` whose batches are all committed in the store.
fn durable_seqs(target: &str, disk: &str) -> anyhow::Result<BTreeMap<u64, u64>> {
    let disk: ripcord_store::DiskId = disk.parse()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let store = ripcord_store::Store::open_existing(target).await?;
            let mut out = BTreeMap::new();
            for info in store.epochs(&disk).await? {
                out.insert(info.epoch, store.durable_seq(&disk, info.epoch).await?);
            }
            Ok(out)
        })
}
