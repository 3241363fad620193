//! Points that need the file systems frozen: application-consistent points on the
//! policy's interval, and forced crash-consistent points when a disk has gone too long
//! without a clean round.
//!
//! A readback round cannot be clean while a hot block is rewritten faster than it can be
//! read back (see pipeline.rs). On a device with a mounted file system the agent then
//! forces a point: `FIFREEZE` (which waits for the writes in flight and blocks new ones),
//! rounds until each overdue disk has a cut, `FITHAW`. The freeze is bounded by
//! `forced-freeze-ms` (and the watchdog of `freeze.rs`), and every stall is measured. A
//! device without a file system cannot be paused this way: its gap is only reported.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    config::AgentConfig,
    freeze,
    group::GroupTarget,
    pipeline::{CutRequest, DiskProducer, Outgoing, RoundConfig, round},
};
use crate::capture::Capture;

/// When to force a point, from the agent configuration.
#[derive(Clone, Debug)]
pub struct GapPolicy {
    /// The bound on the time between two points of a disk.
    pub max_gap: Duration,
    /// Force a point once a disk's gap reaches this (half the bound).
    pub force_after: Duration,
    /// Whether forcing (freezing) is allowed at all.
    pub forced_points: bool,
    /// Longest a forced point may hold the file systems frozen.
    pub freeze_limit: Duration,
    /// Least time between two forced attempts on a disk (a quarter of the bound).
    pub retry_after: Duration,
    /// Where a freeze is recorded while held (`freeze::FROZEN_MARKER`).
    pub frozen_marker: PathBuf,
}

impl GapPolicy {
    pub fn from_config(cfg: &AgentConfig) -> GapPolicy {
        let max_gap = Duration::from_millis(cfg.max_point_gap_ms);
        GapPolicy {
            max_gap,
            force_after: max_gap / 2,
            forced_points: cfg.forced_points,
            freeze_limit: Duration::from_millis(cfg.forced_freeze_ms),
            retry_after: max_gap / 4,
            frozen_marker: cfg.state_dir.join(super::freeze::FROZEN_MARKER),
        }
    }
}

/// What forced points have cost so far.
#[derive(Debug, Default)]
pub struct FreezeStats {
    /// Forced freezes attempted, and those that ended without a cut on every disk.
    pub attempts: u64,
    pub failures: u64,
    /// How long each forced freeze held the file systems, in microseconds.
    pub stalls_us: Vec<u64>,
}

/// Per-disk state of the gap policy.
#[derive(Debug, Default, Clone)]
pub struct GapState {
    last_attempt: Option<Instant>,
    /// The gap passed the bound and it was reported (cleared by the next point).
    pub alerted: bool,
}

/// Disks due for a forced point, and what to freeze for them.
#[derive(Debug, Default)]
pub struct ForcedTarget {
    /// Slots of the disks that need a point.
    pub due: Vec<usize>,
    /// The mounts of the file systems on them.
    pub mounts: Vec<PathBuf>,
}

/// Disks (by slot) that should get a forced point now, with the mounts to freeze; and
/// the gap alerts, logged once per episode. Checks mountinfo only when a disk is due.
pub fn due_for_forced_point(
    policy: &GapPolicy,
    producers: &[DiskProducer],
    gaps: &mut [GapState],
) -> anyhow::Result<ForcedTarget> {
    let mut due = Vec::new();
    let mut mounts = Vec::new();
    for (slot, p) in producers.iter().enumerate() {
        let Some(gap) = p.point_gap() else { continue };
        let state = &mut gaps[slot];
        if gap < policy.max_gap {
            state.alerted = false;
        } else if !state.alerted {
            state.alerted = true;
            tracing::warn!(
                device = %p.dev.path.display(),
                gap_secs = gap.as_secs_f64(),
                bound_secs = policy.max_gap.as_secs_f64(),
                "changes have waited longer than max-point-gap for a recovery point: writes \
                 race every readback round and no forced point could be taken (no mounted \
                 file system to freeze, forced points off, or the freeze found no clean \
                 round)"
            );
        }
        if !policy.forced_points || gap < policy.force_after {
            continue;
        }
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < policy.retry_after)
        {
            continue;
        }
        state.last_attempt = Some(Instant::now());
        let on_dev = freeze::mounts_on(std::slice::from_ref(&p.dev))?;
        if on_dev.is_empty() {
            continue;
        }
        due.push(slot);
        for m in on_dev {
            if !mounts.contains(&m) {
                mounts.push(m);
            }
        }
    }
    Ok(ForcedTarget { due, mounts })
}

/// Freeze the target's mounts, run rounds that may place forced cuts until every disk it
/// names has one or `policy.freeze_limit` passes, thaw. Returns how long the file systems were
/// frozen; an error if some disk got no cut.
pub fn forced_point(
    capture: &mut Capture,
    producers: &mut [DiskProducer],
    round_cfg: &RoundConfig,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
    policy: &GapPolicy,
    target: &ForcedTarget,
    stats: &mut FreezeStats,
) -> anyhow::Result<Duration> {
    let (due, mounts) = (&target.due, &target.mounts);
    stats.attempts += 1;
    let before: Vec<u64> = producers.iter().map(|p| p.counters.cuts).collect();
    let forced_cfg = RoundConfig {
        cut: CutRequest::Forced,
        ..*round_cfg
    };
    let started = Instant::now();
    let frozen = freeze::Frozen::freeze(mounts, policy.freeze_limit, &policy.frozen_marker)?;
    let result = loop {
        if due.iter().all(|&s| producers[s].counters.cuts > before[s]) {
            break Ok(());
        }
        if frozen.expired() || started.elapsed() >= policy.freeze_limit {
            break Err(anyhow::anyhow!(
                "no clean round within forced-freeze-ms ({:?})",
                policy.freeze_limit
            ));
        }
        if let Err(e) = round(capture, producers, &forced_cfg, send) {
            break Err(e);
        }
    };
    drop(frozen);
    let stall = started.elapsed();
    stats.stalls_us.push(stall.as_micros() as u64);
    if result.is_err() {
        stats.failures += 1;
    }
    result.map(|()| stall)
}

/// Hooks, freeze, one clean round with an application-consistent cut on every disk,
/// thaw, hooks (see `freeze.rs`).
pub fn app_point(
    capture: &mut Capture,
    producers: &mut [DiskProducer],
    round_cfg: &RoundConfig,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
    cfg: &AgentConfig,
) -> anyhow::Result<AppPoint> {
    let env = [("RIPCORD_POINT", "app".to_owned())];
    cut_while_frozen(
        capture,
        producers,
        round_cfg,
        send,
        cfg,
        CutRequest::App,
        &env,
        &|_| Ok(()),
        &|| Ok(()),
    )
}

/// The application-consistent group point due at `target` ([`group_app_point`]), logged;
/// if it cannot be taken, the crash-consistent target of the same instant, for the round
/// that then cuts at it (so the group still gets its point), else `None`.
pub fn take_group_app_point(
    capture: &mut Capture,
    producers: &mut [DiskProducer],
    round_cfg: &RoundConfig,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
    cfg: &AgentConfig,
    target: GroupTarget,
) -> Option<GroupTarget> {
    match group_app_point(capture, producers, round_cfg, send, cfg, target) {
        Ok(p) => {
            tracing::info!(
                instant_ns = target.stamp.instant_ns,
                hooks = %p.hooks,
                frozen = %p.frozen,
                "application-consistent group cut taken"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                instant_ns = target.stamp.instant_ns,
                "no application-consistent group point this time: {e:#}; a crash-consistent \
                 group cut instead"
            );
            Some(target.crash_consistent())
        }
    }
}

/// An application-consistent **group** point (decision 0028): hooks, freeze, and, if the
/// file systems were frozen before the instant in real time (the freeze's end plus the
/// offset's error is before the instant on this clock), rounds at the instant until every
/// disk has an application-consistent group cut; thaw, hooks. Every member that gets this
/// far was frozen over the coordinator's instant, so the members' cuts are their states
/// at one moment at which all of them were quiesced, without any message between them.
/// Every disk must carry a mounted file system: a disk with none would be cut live,
/// late, and labelled as if frozen.
pub fn group_app_point(
    capture: &mut Capture,
    producers: &mut [DiskProducer],
    round_cfg: &RoundConfig,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
    cfg: &AgentConfig,
    target: GroupTarget,
) -> anyhow::Result<AppPoint> {
    debug_assert!(target.app);
    for p in producers.iter() {
        anyhow::ensure!(
            !freeze::mounts_on(std::slice::from_ref(&p.dev))?.is_empty(),
            "{} has no mounted file system to freeze",
            p.dev.path.display()
        );
    }
    let env = [
        ("RIPCORD_POINT", "group-app".to_owned()),
        ("RIPCORD_GROUP", target.stamp.group.to_string()),
        (
            "RIPCORD_GROUP_INSTANT_NS",
            target.stamp.instant_ns.to_string(),
        ),
    ];
    // Frozen by the instant less the offset's error (as it will have grown by then), or
    // no point. The freeze comes as late as is safe: the dirty data written back first
    // (so FIFREEZE itself is short), then the freeze `GROUP_FREEZE_MARGIN` before that
    // deadline, so applications stall for about the margin, not the whole lead.
    let deadline = target.local_ns.saturating_sub(target.error_at_instant());
    let freeze_at = deadline.saturating_sub(GROUP_FREEZE_MARGIN.as_nanos() as u64);
    let in_time = |what: &str| {
        let (wall, mono) = (crate::clock::now_wall_ns(), crate::clock::now_mono_ns());
        anyhow::ensure!(
            target.clock_at(wall, mono).is_some(),
            "the wall clock was stepped since the group instant was scheduled"
        );
        anyhow::ensure!(
            wall < deadline,
            "{what} {:.1} ms too late for the group instant (the pre-freeze hooks and the \
             freeze took longer than the lead)",
            (wall - deadline) as f64 / 1e6
        );
        Ok(())
    };
    let before_freeze = |mounts: &[std::path::PathBuf]| {
        for m in mounts {
            let f = std::fs::File::open(m).with_context(|| format!("opening {}", m.display()))?;
            nix::unistd::syncfs(&f).with_context(|| format!("syncfs {}", m.display()))?;
        }
        let now = crate::clock::now_wall_ns();
        std::thread::sleep(Duration::from_nanos(freeze_at.saturating_sub(now)));
        in_time("ready to freeze")
    };
    cut_while_frozen(
        capture,
        producers,
        round_cfg,
        send,
        cfg,
        CutRequest::Group(target),
        &env,
        &before_freeze,
        &|| in_time("frozen"),
    )
}

/// The sequence of both kinds of application-consistent point: pre-freeze hooks,
/// `before_freeze` (given the mounts), freeze, `frozen_check`, frozen hooks, rounds with
/// `cut` until every disk has an application-consistent cut taken while frozen
/// (`RoundConfig::frozen_until`), thaw, post-thaw hooks. The file systems are thawed on
/// every path (guard, watchdog, and the next agent for a killed one: `freeze`).
#[allow(clippy::too_many_arguments)]
fn cut_while_frozen(
    capture: &mut Capture,
    producers: &mut [DiskProducer],
    round_cfg: &RoundConfig,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
    cfg: &AgentConfig,
    cut: CutRequest,
    env: &[(&str, String)],
    before_freeze: &dyn Fn(&[std::path::PathBuf]) -> anyhow::Result<()>,
    frozen_check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<AppPoint> {
    let timeout = Duration::from_millis(cfg.freeze_timeout_ms);
    let devs: Vec<_> = producers.iter().map(|p| p.dev.clone()).collect();
    let mounts = freeze::mounts_on(&devs)?;
    // Checked before anything runs: a hook that cannot run fails the attempt (see the
    // `freeze` module doc).
    let hooks = match freeze::hooks_in(&cfg.hooks_dir)? {
        Some(hooks) => hooks,
        None => {
            tracing::warn!(
                "hooks directory {} does not exist: no application is asked to quiesce; the \
                 point only freezes the file systems",
                cfg.hooks_dir.display()
            );
            Vec::new()
        }
    };
    freeze::run_hooks(&hooks, "pre-freeze", env, timeout)?;
    let result = (|| -> anyhow::Result<()> {
        before_freeze(&mounts)?;
        let marker = cfg.state_dir.join(freeze::FROZEN_MARKER);
        let frozen = freeze::Frozen::freeze(&mounts, timeout, &marker)?;
        frozen_check()?;
        freeze::run_hooks(&hooks, "frozen", env, timeout)?;
        let before: Vec<u64> = producers.iter().map(|p| p.counters.app_cuts).collect();
        let frozen_cfg = RoundConfig {
            cut,
            frozen_until: Some(frozen.held_until()),
            ..*round_cfg
        };
        loop {
            anyhow::ensure!(
                !frozen.expired(),
                "no clean round within the freeze timeout ({timeout:?})"
            );
            round(capture, producers, &frozen_cfg, send).context("a round while frozen")?;
            if producers
                .iter()
                .zip(&before)
                .all(|(p, &b)| p.counters.app_cuts > b)
            {
                break;
            }
        }
        drop(frozen);
        Ok(())
    })();
    let thawed = freeze::run_hooks(&hooks, "post-thaw", env, timeout);
    result?;
    thawed?;
    let names = |v: Vec<String>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    Ok(AppPoint {
        hooks: names(
            hooks
                .iter()
                .filter_map(|h| h.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
        ),
        frozen: names(mounts.iter().map(|m| m.display().to_string()).collect()),
    })
}

/// How long before a group's application-consistent instant (less the clock's error) its
/// members freeze: room for FIFREEZE of file systems whose dirty data was just written
/// back. A freeze that ends later than the instant less the error takes no point.
const GROUP_FREEZE_MARGIN: Duration = Duration::from_millis(250);

/// What an application-consistent point did, for the log.
#[derive(Debug)]
pub struct AppPoint {
    /// The hooks that ran (names), or "none".
    pub hooks: String,
    /// The file systems frozen (mount points), or "none".
    pub frozen: String,
}
