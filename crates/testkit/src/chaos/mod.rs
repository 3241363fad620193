//! Chaos (issue 17): faults at random moments against a replicated oracle workload, with
//! every invariant checked. One engine for the CI test (`tests/tests/crashes.rs`: kills
//! only, a few minutes) and `cargo xtask chaos --minutes N` (every fault, long runs).
//!
//! The agent replicates one loop device through a [`FaultProxy`] while `ripcord-oracle
//! workload` stamps every block it writes; when [`Fault::KillMasterTarget`] is enabled, a
//! master target (`ripcord-mt follow`) keeps a second loop device at the newest point.
//! Until the time or the fault budget runs out, the engine waits until the agent streams
//! (its sync done, a point of its epoch acknowledged, a batch acknowledged since the last
//! fault), waits a random moment, and injects one fault drawn from the enabled [`Fault`]s
//! ([`inject`]). Then it quiesces and checks ([`verify`]):
//!
//! - **nothing acknowledged is lost**: the (epoch, seq) the agent had acknowledged just
//!   before each fault is durable in the target store at the end;
//! - **every recovery point is a crash state of the source**: each point (or an even sample
//!   of `check_points` of them) is failed over and passes the oracle's write-order checker;
//! - **the final point equals the device**, byte for byte, once the workload stopped and
//!   the agent stopped cleanly;
//! - **the master target's device equals the device** once it reached the final point.
//!
//! Nothing expires from the store within a run, and every agent kill stores a new full
//! copy of the disk: the engine stops injecting (and says so in the report) when the
//! scratch file system has less than 4 GiB free, rather than letting the process server's
//! back-pressure end the run as a false failure.
//!
//! The schedule comes from `seed` (printed in the report), so a run can be replayed. A
//! failed run says which invariant broke, with the schedule so far, and writes every
//! component's log to `/var/tmp/ripcord-chaos-<seed>.log`.

use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use rand::{RngExt as _, SeedableRng as _};

use crate::{
    FaultConfig, FaultProxy, Site,
    master_target::MasterTarget,
    replication::{Replicator, wait_for},
};

mod inject;
mod verify;

use inject::{MasterTargetRig, Rig};
use verify::Source;

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
    /// SIGKILL the master target, restart it after up to 1.5 s (it resumes from its state
    /// file: the point it holds, or the step it was in).
    KillMasterTarget,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::KillAgent,
        Fault::KillServer,
        Fault::LossyNetwork,
        Fault::Partition,
        Fault::Flap,
        Fault::Rebind,
        Fault::KillMasterTarget,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillAgent => "kill -9 agent",
            Fault::KillServer => "kill -9 process server",
            Fault::LossyNetwork => "lossy network",
            Fault::Partition => "partition",
            Fault::Flap => "flapping link",
            Fault::Rebind => "address change",
            Fault::KillMasterTarget => "kill -9 master target",
        }
    }
}

/// What to run.
pub struct ChaosConfig {
    /// Stop injecting after this long...
    pub duration: Duration,
    /// ...or after this many faults.
    pub max_faults: usize,
    /// The faults to draw from, uniformly: list one twice to draw it twice as often.
    pub faults: Vec<Fault>,
    pub seed: u64,
    pub disk_mib: u64,
    /// Points to check with the oracle (evenly spread); 0 checks every point.
    pub check_points: usize,
    /// Once the agent streams, the next fault comes after a random pause in this range (ms).
    pub pause_ms: Range<u64>,
    /// A killed component stays down for a random time in this range (ms).
    pub down_ms: Range<u64>,
}

impl ChaosConfig {
    /// `faults` for `duration`, the long-run defaults for the rest: 64 MiB, at most one
    /// fault every 0.2-2.5 s, killed components down 50-1500 ms, 200 points checked.
    pub fn new(seed: u64, faults: Vec<Fault>, duration: Duration) -> ChaosConfig {
        ChaosConfig {
            duration,
            max_faults: usize::MAX,
            faults,
            seed,
            disk_mib: 64,
            check_points: 200,
            pause_ms: 200..2500,
            down_ms: 50..1500,
        }
    }
}

/// What happened and what was checked.
#[derive(Debug)]
pub struct ChaosReport {
    pub seed: u64,
    /// Faults injected, by name.
    pub injected: BTreeMap<&'static str, u64>,
    /// Seconds from each fault's end until the agent acknowledged a new batch, by fault
    /// name (the agent's stats file, rewritten every second, is the clock: ±1 s).
    pub recovery_secs: BTreeMap<&'static str, Vec<f64>>,
    /// Each fault: what, at which acknowledged (epoch, seq).
    pub schedule: Vec<String>,
    /// Acknowledged positions checked durable at the end.
    pub acks_checked: usize,
    pub epochs: usize,
    pub points: usize,
    pub points_checked: usize,
    /// Whether a master target ran, and reached the final point equal to the device.
    pub master_target_checked: bool,
    /// Why the run stopped injecting before its time or fault budget, if it did.
    pub stopped_early: Option<String>,
    /// Datagrams dropped, duplicated, reordered, corrupted or partitioned by the proxy.
    pub datagrams_faulted: u64,
    pub secs: f64,
}

impl ChaosReport {
    /// Kills of any component.
    pub fn kills(&self) -> u64 {
        self.injected
            .iter()
            .filter(|(name, _)| name.starts_with("kill"))
            .map(|(_, n)| n)
            .sum()
    }
}

fn median_and_max(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "chaos run, seed {} ({:.0} s)", self.seed, self.secs)?;
        if let Some(why) = &self.stopped_early {
            writeln!(f, "{why}")?;
        }
        writeln!(
            f,
            "| fault | injected | replicating again after (median / max, ±1 s) |\n| --- | --- | --- |"
        )?;
        for (name, n) in &self.injected {
            match self.recovery_secs.get(name).filter(|v| !v.is_empty()) {
                Some(v) => {
                    let (med, max) = median_and_max(v);
                    writeln!(f, "| {name} | {n} | {med:.1} s / {max:.1} s |")?;
                }
                None => writeln!(f, "| {name} | {n} | - |")?,
            }
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
        if self.master_target_checked {
            writeln!(f, "| master target's device equals the final point | yes |")?;
        }
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

/// What a run has done so far: kept outside [`run_inner`] so that a failure can report it.
#[derive(Default)]
struct Progress {
    schedule: Vec<String>,
    /// Logs of the agents and master targets killed so far.
    logs: String,
    agent: Option<Replicator>,
    master_target: Option<MasterTarget>,
}

/// The running agent.
fn agent(run: &Progress) -> &Replicator {
    run.agent.as_ref().expect("the agent runs")
}

/// Runs the chaos on `site` (a site with a target store); see the module doc.
pub fn run(site: &mut Site, cfg: &ChaosConfig) -> anyhow::Result<ChaosReport> {
    let mut progress = Progress::default();
    run_inner(site, cfg, &mut progress).map_err(|e| {
        let mut logs = progress.logs.clone();
        if let Some(a) = &progress.agent {
            logs += &format!("\n=== current agent ===\n{}", a.log());
        }
        if let Some(mt) = &progress.master_target {
            logs += &format!("\n=== current master target ===\n{}", mt.log());
        }
        let ps = site.ps.logs();
        let file = PathBuf::from(format!("/var/tmp/ripcord-chaos-{}.log", cfg.seed));
        let written = std::fs::write(
            &file,
            format!(
                "{e:#}\n\n=== schedule ===\n{}\n\n=== process server ===\n{ps}\n{logs}",
                progress.schedule.join("\n")
            ),
        );
        let tail = |s: &str| {
            let lines: Vec<_> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        anyhow::anyhow!(
            "{e:#}\n(seed {}; last faults:\n{}\nprocess server log, last lines:\n{}\n{})",
            cfg.seed,
            tail(&progress.schedule.join("\n")),
            tail(&ps),
            match written {
                Ok(()) => format!("every log is in {}", file.display()),
                Err(w) => format!("writing the logs to {} failed: {w}", file.display()),
            }
        )
    })
}

fn run_inner(
    site: &mut Site,
    cfg: &ChaosConfig,
    run: &mut Progress,
) -> anyhow::Result<ChaosReport> {
    ensure!(!cfg.faults.is_empty(), "no fault enabled");
    let started = Instant::now();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let disk = site.loop_device("chaos.img", cfg.disk_mib << 20);
    let config = site.path().join("chaos-agent.toml");
    std::fs::write(&config, "cut-interval-ms = 500\n")?;
    let mut rig = Rig {
        proxy: FaultProxy::start(site.ps.data_addr(), FaultConfig::default(), cfg.seed)?,
        disk: disk.path.clone(),
        agent_args: vec![
            "--config".to_owned(),
            config.to_str().context("non-UTF-8 path")?.to_owned(),
        ],
        master_target: None,
    };
    run.agent = Some(rig.start_agent(site));
    agent(run).wait_synced(Duration::from_secs(120))?;
    let disk_id = site.id.disk_id(&disk.path)?;
    let log = site.path().join("chaos-oracle.log");
    let mut workload = Workload(oracle_workload(&disk.path, &log)?);
    // The master target keeps a second device at the newest point.
    let mt_device = cfg
        .faults
        .contains(&Fault::KillMasterTarget)
        .then(|| site.loop_device("chaos-mt.img", cfg.disk_mib << 20));
    if let Some(dev) = &mt_device {
        let mt = MasterTargetRig {
            disk: disk_id.clone(),
            device: dev.path.clone(),
            state: site.path().join("chaos-mt-state"),
            runs: 0,
        };
        run.master_target = Some(mt.start(site));
        rig.master_target = Some(mt);
    }

    let mut acked_at = Vec::new();
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut recovery_secs: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut stopped_early = None;
    while started.elapsed() < cfg.duration && run.schedule.len() < cfg.max_faults {
        // Every agent kill stores a full copy of the disk (a new epoch), and nothing
        // expires within a run: stop before the store fills the file system, which would
        // hold acknowledgements (back-pressure) and end the run as a false failure.
        let free = free_bytes(site.path())?;
        if free < MIN_FREE_BYTES {
            stopped_early = Some(format!(
                "stopped injecting after {:.0} s: {} MiB free on the scratch file system",
                started.elapsed().as_secs_f64(),
                free >> 20
            ));
            eprintln!("chaos: {}", stopped_early.as_deref().unwrap_or_default());
            break;
        }
        wait_streaming(agent(run), acked_at.last().copied())?;
        std::thread::sleep(Duration::from_millis(
            rng.random_range(cfg.pause_ms.clone()),
        ));
        let at = acked(agent(run)).context("the agent has no stats")?;
        acked_at.push(at);
        let fault = cfg.faults[rng.random_range(0..cfg.faults.len())];
        let down = Duration::from_millis(rng.random_range(cfg.down_ms.clone()));
        let what = rig.inject(site, run, fault, down, &mut rng)?;
        *injected.entry(fault.name()).or_default() += 1;
        let line = format!("{} at {at:?} {what}", fault.name());
        eprintln!(
            "chaos {:7.1} s, fault {}: {line}",
            started.elapsed().as_secs_f64(),
            run.schedule.len() + 1
        );
        run.schedule.push(line);
        let ended = Instant::now();
        if let Some(status) = workload.0.try_wait()? {
            bail!("the oracle workload ended early ({status})");
        }
        if fault != Fault::KillMasterTarget {
            let now = acked(agent(run)).max(Some(at));
            wait_streaming(agent(run), now)?;
            recovery_secs
                .entry(fault.name())
                .or_default()
                .push(ended.elapsed().as_secs_f64());
        }
    }
    wait_streaming(agent(run), acked_at.last().copied())?;

    // Quiesce: the workload finishes its log (SIGINT), the agent pushes its final point.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workload.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    ensure!(workload.0.wait()?.success(), "the oracle workload failed");
    agent(run).wait_synced(Duration::from_secs(120))?;
    let (log_tail, final_point) =
        site.final_point(run.agent.take().expect("the agent runs"), &disk_id);
    run.logs.push_str(&log_tail);
    ensure!(
        !run.logs.contains("refused"),
        "a restarted server resumed behind an acknowledgement:\n{}",
        run.logs
    );
    let datagrams_faulted = {
        let c = rig.proxy.counts();
        c.dropped + c.duplicated + c.reordered + c.corrupted + c.partitioned
    };
    let mt_rig = rig.master_target.take();
    drop(rig);
    site.ps.stop()?;

    let source = Source {
        target: site.target().to_owned(),
        passphrase: site.ps.passphrase_file.clone(),
        disk_id,
        device: disk.path.clone(),
        oracle_log: log,
    };
    verify::acknowledged_batches_are_durable(&source, &acked_at, &run.schedule)?;
    let final_id = final_point["id"]
        .as_str()
        .context("the final point has no id")?;
    let image = site.path().join("chaos-point.img");
    let points = verify::points_are_crash_states(&source, cfg.check_points, final_id, &image)?;
    if let Some(mt_rig) = &mt_rig {
        let mt = run.master_target.take().expect("the master target runs");
        verify::master_target_reaches(&source, mt, mt_rig, final_id)?;
    }
    Ok(ChaosReport {
        seed: cfg.seed,
        injected,
        recovery_secs,
        schedule: std::mem::take(&mut run.schedule),
        acks_checked: acked_at.len(),
        epochs: points.epochs,
        points: points.total,
        points_checked: points.checked,
        master_target_checked: mt_device.is_some(),
        stopped_early,
        datagrams_faulted,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Below this much free space on the scratch file system the engine stops injecting.
const MIN_FREE_BYTES: u64 = 4 << 30;

fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}
