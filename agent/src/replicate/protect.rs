//! `ripcord-agent protect`: capture, read back, seal and replicate protected devices to
//! the process server until SIGINT/SIGTERM, then flush everything and wait for it to be
//! durable on the server.
//!
//! Every start is a new epoch per disk with a full initial sync (zero regions skipped): the
//! agent was not tracking while it was down, so nothing else would be safe. A protected
//! device that changes size (checked every second, and when a round's read fails) ends
//! the epoch at once and starts a new one at the new size: writes to a grown range were
//! not captured before, and the new epoch's sync reads every sector after its capture is
//! attached, so none is missed.

use std::{
    net::ToSocketAddrs as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ripcord_proto::DiskId;
use ripcord_seal::DataKey;
use ripcord_transport::Identity;
use serde_json::json;
use tokio::sync::mpsc;

use super::{
    batch::BatchBuilder,
    config::AgentConfig,
    metrics::{AgentMetrics, DiskSample},
    net::{self, DiskLink, LinkStats, NetConfig},
    pipeline::{CutRequest, DiskProducer, Outgoing, RoundConfig, round},
    points::{self, FreezeStats, GapPolicy, GapState},
    renew::{MachineIdentity, RenewTarget, renew_forever},
    state::AgentState,
};
use crate::{
    capture::{Capture, CaptureConfig},
    device::BlockDevice,
    preflight,
};

/// Options of `protect` (config file values, overridden by flags).
pub struct ProtectOptions {
    pub config: AgentConfig,
    pub devices: Vec<PathBuf>,
    pub ready_file: Option<PathBuf>,
    pub stats_file: Option<PathBuf>,
}

/// Items buffered between the producer and the network side, per disk.
const CHANNEL_DEPTH: usize = 2;

pub fn run(opts: ProtectOptions) -> anyhow::Result<()> {
    preflight::require()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let cfg = &opts.config;
    let metrics = Arc::new(AgentMetrics::new());
    if !cfg.metrics_addr.is_empty() {
        let addr = cfg.metrics_addr.parse().context("metrics-addr")?;
        // Replication matters more than its metrics: a taken port is reported, not fatal.
        match super::metrics::spawn_http(addr, Arc::clone(&metrics)) {
            Ok(()) => tracing::info!(%addr, "metrics on http://{addr}/metrics"),
            Err(e) => tracing::error!("no metrics endpoint: {e:#}"),
        }
    }
    loop {
        match run_epoch(&opts, &stop, &metrics)? {
            Ended::Stopped => return Ok(()),
            Ended::Resized(why) => tracing::warn!(
                "{why}: protecting the new size in a new epoch (full sync of the disk; \
                 recovery points taken before keep the old size)"
            ),
        }
    }
}

/// How one epoch of protection ended.
enum Ended {
    /// SIGINT/SIGTERM: everything is durable on the server.
    Stopped,
    /// A protected device changed size (what happened, for the log). The old epoch's
    /// points stand; a new epoch protects the new size.
    Resized(String),
}

/// The first protected device whose size differs from when protection started.
fn resized(devs: &[BlockDevice]) -> Option<String> {
    devs.iter().find_map(|d| match d.current_sectors() {
        Ok(now) if now != d.sectors => Some(format!(
            "{} changed size from {} to {} bytes",
            d.path.display(),
            d.sectors * 512,
            now * 512
        )),
        _ => None,
    })
}

/// Protect the configured devices in a new epoch, until a signal or a resize.
fn run_epoch(
    opts: &ProtectOptions,
    stop: &Arc<AtomicBool>,
    metrics: &Arc<AgentMetrics>,
) -> anyhow::Result<Ended> {
    let cfg = &opts.config;
    let identity = Identity::load(&cfg.state_dir).with_context(|| {
        format!(
            "no agent identity in {}: run `ripcord-agent register --server HOST:PORT --token T \
             --ca-hash H` first",
            cfg.state_dir.display()
        )
    })?;
    let machine = identity.machine_id().as_str().to_owned();
    let mut state = AgentState::load(&cfg.state_dir)?;
    let escrow_key = state.pinned_escrow_key()?;
    let server = cfg
        .server
        .clone()
        .or_else(|| state.server.clone())
        .context("no process server: give --server HOST:PORT or register first")?;
    let server_name = state.server_name.clone().unwrap_or_else(|| {
        server
            .rsplit_once(':')
            .map_or(server.clone(), |(h, _)| h.to_owned())
    });
    let server_addr = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))?;
    let devices: Vec<PathBuf> = if opts.devices.is_empty() {
        cfg.devices.clone()
    } else {
        opts.devices.clone()
    };
    if devices.is_empty() {
        bail!("no devices to protect: name them on the command line or in the config file");
    }
    let devs = devices
        .iter()
        .map(|p| BlockDevice::resolve(p))
        .collect::<Result<Vec<_>, _>>()?;

    // Tracking starts before anything is read: the initial sync then misses nothing.
    let mut capture = Capture::start(
        &devs,
        CaptureConfig {
            ring_bytes: cfg.ring_bytes,
            ..CaptureConfig::default()
        },
    )?;

    let mut producers = Vec::new();
    let mut links = Vec::new();
    let mut senders = Vec::new();
    let mut link_stats: Vec<Arc<LinkStats>> = Vec::new();
    for dev in &devs {
        let (id, epoch) = state.next_epoch(&dev.path, &cfg.state_dir)?;
        let disk = DiskId(id);
        // A fresh data key per epoch: nonces (epoch, seq) never repeat under one key.
        let key = DataKey::generate()?;
        let builder = BatchBuilder::new(
            &machine,
            disk,
            epoch,
            DataKey::from_bytes(*key.expose_bytes()),
            cfg.zstd_level,
            cfg.batch_kib << 10,
        );
        let mut producer = DiskProducer::new(dev.clone(), builder)?;
        producer.discards_read_zero = cfg.discards_read_zero.for_device(dev);
        tracing::info!(
            device = %dev.path.display(),
            "discards are {}",
            discard_mode(producer.discards_read_zero)
        );
        producers.push(producer);
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let link = DiskLink::new(
            disk,
            epoch,
            dev.sectors * 512,
            dev.logical_block_size,
            Arc::new(key),
            (cfg.window_mib << 20) / 2,
            rx,
        );
        link_stats.push(Arc::clone(&link.stats));
        links.push(link);
        senders.push(tx);
        tracing::info!(
            device = %dev.path.display(), disk = %disk, epoch,
            size = dev.sectors * 512, "protecting (full initial sync)"
        );
    }

    let identity = Arc::new(MachineIdentity::new(identity));
    let renew_target = state.register_server.clone().map(|server| RenewTarget {
        server,
        server_name: server_name.clone(),
        state_dir: cfg.state_dir.clone(),
    });
    if renew_target.is_none() {
        tracing::warn!(
            "state.json has no registration endpoint (registered by an older version): the \
             certificate will not renew by itself; run `ripcord-agent register` once"
        );
    }
    let net_cfg = NetConfig {
        server: server_addr,
        server_name,
        identity: Arc::clone(&identity),
        escrow_key,
        window_bytes: cfg.window_mib << 20,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("ripcord-net")
        .build()?;
    let net = rt.spawn(net::run(net_cfg, links));
    // Runs until the runtime is dropped at the end of the epoch.
    let _renewal =
        renew_target.map(|target| rt.spawn(async move { renew_forever(&identity, target).await }));

    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")?;
    }
    let round_cfg = RoundConfig {
        round_sectors: cfg.round_mib << 11,
        sync_chunk_sectors: cfg.sync_chunk_mib << 11,
        cut_interval: Duration::from_millis(cfg.cut_interval_ms),
        cut: CutRequest::Interval,
    };
    let policy = GapPolicy::from_config(cfg);
    let mut gaps = vec![GapState::default(); producers.len()];
    let mut churn = vec![ChurnWatch::default(); producers.len()];
    let mut freezes = FreezeStats::default();
    let app_interval =
        (cfg.app_interval_secs > 0).then(|| Duration::from_secs(cfg.app_interval_secs));
    let mut last_app = Instant::now();
    let total: u64 = devs.iter().map(|d| d.sectors * 512).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "initial sync {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template"),
    );
    if !console_is_tty() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = Instant::now();
    let mut last_stats = Instant::now();
    let mut sync_logged = false;
    let mut net_failed = None;
    let mut resize = None;
    let mut last_size_check = Instant::now();
    loop {
        if last_size_check.elapsed() >= SIZE_CHECK_INTERVAL {
            last_size_check = Instant::now();
            resize = resized(&devs);
            if resize.is_some() {
                // Stop at once: the new epoch's full sync reads everything again, and a
                // shrunk device cannot be read to its old end.
                break;
            }
        }
        let stopping = stop.load(Ordering::Relaxed);
        let mut send = |slot: usize, item: Outgoing| -> anyhow::Result<()> {
            senders[slot]
                .blocking_send(item)
                .map_err(|_| anyhow::anyhow!("the network side stopped"))
        };
        let worked = match round(&mut capture, &mut producers, &round_cfg, &mut send) {
            Ok(w) => w,
            Err(e) if net.is_finished() => {
                net_failed = Some(e);
                break;
            }
            Err(e) => {
                // A read past a shrunk device's new end fails the round: a resize, not
                // an error.
                resize = resized(&devs);
                if resize.is_some() {
                    break;
                }
                return Err(e);
            }
        };
        let synced: u64 = producers.iter().map(|p| p.synced_sectors() * 512).sum();
        bar.set_position(synced);
        if !sync_logged && producers.iter().all(|p| !p.syncing()) {
            sync_logged = true;
            bar.finish_and_clear();
            tracing::info!(
                secs = started.elapsed().as_secs_f64(),
                "initial sync read complete"
            );
        }
        for (w, p) in churn.iter_mut().zip(&producers) {
            w.observe(p, &policy);
        }
        if last_stats.elapsed() >= Duration::from_millis(500) {
            last_stats = Instant::now();
            let view = StatsView {
                producers: &producers,
                links: &link_stats,
                gaps: &gaps,
                churn: &churn,
                freezes: &freezes,
            };
            metrics.update(&view.samples(), &freezes);
            if let Some(path) = &opts.stats_file {
                write_stats(path, &view)?;
            }
        }
        if net.is_finished() {
            break;
        }
        if stopping {
            // Quiesce: everything completed before the stop has been read in a round
            // after it; leave when nothing is dirty. During the initial sync, stop at once:
            // the next start begins a new epoch anyway.
            let quiet = producers
                .iter()
                .all(|p| p.dirty.is_empty() && p.zeroed.is_empty());
            if quiet || producers.iter().any(|p| p.syncing()) {
                break;
            }
            continue;
        }
        if let Some(interval) = app_interval
            && last_app.elapsed() >= interval
            && producers.iter().all(|p| !p.syncing())
        {
            last_app = Instant::now();
            match points::app_point(&mut capture, &mut producers, &round_cfg, &mut send, cfg) {
                Ok(()) => tracing::info!("application-consistent point taken"),
                Err(e) => tracing::warn!("no application-consistent point this time: {e:#}"),
            }
            continue;
        }
        let forced = points::due_for_forced_point(&policy, &producers, &mut gaps)?;
        if !forced.due.is_empty() {
            match points::forced_point(
                &mut capture,
                &mut producers,
                &round_cfg,
                &mut send,
                &policy,
                &forced,
                &mut freezes,
            ) {
                Ok(stall) => tracing::info!(
                    stall_ms = stall.as_secs_f64() * 1e3,
                    "forced point: file systems frozen for one clean round"
                ),
                Err(e) => tracing::warn!("no forced point this time: {e:#}"),
            }
            continue;
        }
        if !worked {
            capture.wait(Duration::from_millis(50))?;
        }
    }
    // A last round places the final cut if the previous one was rate-limited.
    if net_failed.is_none() && !net.is_finished() && resize.is_none() {
        let mut send = |slot: usize, item: Outgoing| -> anyhow::Result<()> {
            senders[slot]
                .blocking_send(item)
                .map_err(|_| anyhow::anyhow!("the network side stopped"))
        };
        std::thread::sleep(round_cfg.cut_interval);
        // Until everything read has a cut after it (writes still arriving are bounded by
        // the deadline).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            round(&mut capture, &mut producers, &round_cfg, &mut send)?;
            if !producers.iter().any(DiskProducer::has_pending_changes)
                || Instant::now() >= deadline
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    capture.detach()?;
    drop(senders);
    tracing::info!("waiting for the process server to acknowledge everything");
    let result = rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(120), net).await {
            Ok(joined) => joined.map_err(anyhow::Error::from)?,
            Err(_) => bail!("the process server did not acknowledge everything within 120 s"),
        }
    });
    if let Some(path) = &opts.stats_file {
        let view = StatsView {
            producers: &producers,
            links: &link_stats,
            gaps: &gaps,
            churn: &churn,
            freezes: &freezes,
        };
        write_stats(path, &view)?;
    }
    if let Some(e) = net_failed {
        return Err(e.context(result.err().map(|e| format!("{e:#}")).unwrap_or_default()));
    }
    result?;
    if let Some(why) = resize {
        return Ok(Ended::Resized(why));
    }
    tracing::info!("all data durable on the process server; stopped");
    Ok(Ended::Stopped)
}

/// How discards on a disk are replicated, for status and logs.
fn discard_mode(read_zero: bool) -> &'static str {
    if read_zero {
        "sent as zeroes"
    } else {
        "read back"
    }
}

/// How often the protected devices' sizes are checked.
const SIZE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

fn console_is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Tells when churn outruns replication: for longer than the point-gap bound, no round
/// could take every change waiting at its instant (the backlog exceeded `round-mib` each
/// time). Changes that complete while a round reads are normal and do not count.
#[derive(Debug, Default, Clone)]
struct ChurnWatch {
    backlog_since: Option<Instant>,
    alerted: bool,
}

impl ChurnWatch {
    fn observe(&mut self, p: &DiskProducer, policy: &GapPolicy) {
        if p.took_all_changes() || p.syncing() {
            self.backlog_since = None;
            self.alerted = false;
            return;
        }
        let since = *self.backlog_since.get_or_insert_with(Instant::now);
        if !self.alerted && since.elapsed() > policy.max_gap {
            self.alerted = true;
            tracing::warn!(
                device = %p.dev.path.display(),
                dirty_bytes = p.dirty.sectors() * 512,
                "churn exceeds what replication sustains: no round could read all waiting \
                 changes for longer than max-point-gap"
            );
        }
    }
}

/// Everything the stats file and the metrics report.
struct StatsView<'a> {
    producers: &'a [DiskProducer],
    links: &'a [Arc<LinkStats>],
    gaps: &'a [GapState],
    churn: &'a [ChurnWatch],
    freezes: &'a FreezeStats,
}

impl StatsView<'_> {
    fn samples(&self) -> Vec<DiskSample<'_>> {
        self.producers
            .iter()
            .zip(self.gaps.iter().zip(self.churn))
            .map(|(p, (g, c))| DiskSample {
                device: p.dev.path.to_str().unwrap_or("?"),
                counters: p.counters,
                dirty_bytes: (p.dirty.sectors() + p.zeroed.sectors()) * 512,
                point_gap: p.point_gap(),
                point_age: p.point_age(),
                largest_gap: p.largest_gap,
                gap_alert: g.alerted,
                churn_alert: c.alerted,
            })
            .collect()
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn write_stats(path: &std::path::Path, view: &StatsView<'_>) -> anyhow::Result<()> {
    let mut all_lag = Vec::new();
    let disks: Vec<_> = view
        .producers
        .iter()
        .zip(view.links)
        .zip(view.samples())
        .map(|((p, l), sample)| {
            all_lag.extend(l.lag_us.lock().expect("lag lock").iter().copied());
            let c = p.counters;
            json!({
                "device": p.dev.path,
                "size_bytes": p.dev.sectors * 512,
                "discards": discard_mode(p.discards_read_zero),
                "syncing": p.syncing(),
                "synced_bytes": p.synced_sectors() * 512,
                "dirty_bytes": sample.dirty_bytes,
                "next_seq": p.builder.next_seq(),
                "pushed_seq": l.pushed_seq.load(Ordering::Relaxed),
                "acked_seq": l.acked_seq.load(Ordering::Relaxed),
                "acked_cuts": l.acked_cuts.load(Ordering::Relaxed),
                "store": l.store.lock().expect("store status lock").as_ref().map(|s| json!({
                    "epoch": s.epoch,
                    "committed_cut": s.committed_cut_id,
                    "point_age_secs": s.point_age_secs,
                    "failure": s.failure,
                })),
                "reconnects": l.reconnects.load(Ordering::Relaxed),
                "bytes_read": c.bytes_read,
                "read_errors": c.read_errors,
                "data_bytes": c.data_bytes,
                "zero_bytes": c.zero_bytes,
                "batches": c.batches,
                "cuts": c.cuts,
                "rounds": c.rounds,
                "clean_rounds": c.clean_rounds,
                "drain_ms": c.drain_us / 1000,
                "read_ms": c.read_us / 1000,
                "send_ms": c.send_us / 1000,
                "blocked_ms": c.blocked_us / 1000,
                "raced_reads": c.raced_reads,
                "dropped": c.dropped,
                "missed": c.missed,
                "lost_completions": c.lost_completions,
                "app_cuts": c.app_cuts,
                "forced_cuts": c.forced_cuts,
                "point_gap_ms": sample.point_gap.map(|g| g.as_millis() as u64),
                "point_age_ms": sample.point_age.map(|g| g.as_millis() as u64),
                "largest_point_gap_ms": p.largest_gap.as_millis() as u64,
                "point_gap_alert": sample.gap_alert,
                "churn_alert": sample.churn_alert,
            })
        })
        .collect();
    all_lag.sort_unstable();
    let mut stalls = view.freezes.stalls_us.clone();
    stalls.sort_unstable();
    let v = json!({
        "disks": disks,
        "lag_ms": {
            "samples": all_lag.len(),
            "p50": percentile(&all_lag, 0.5) as f64 / 1000.0,
            "p99": percentile(&all_lag, 0.99) as f64 / 1000.0,
            "max": all_lag.last().copied().unwrap_or(0) as f64 / 1000.0,
        },
        "forced_freezes": {
            "attempts": view.freezes.attempts,
            "failures": view.freezes.failures,
            "stall_ms_p50": percentile(&stalls, 0.5) as f64 / 1000.0,
            "stall_ms_p99": percentile(&stalls, 0.99) as f64 / 1000.0,
            "stall_ms_max": stalls.last().copied().unwrap_or(0) as f64 / 1000.0,
        },
        "peak_rss_kib": rss_kib(),
    });
    // Rewritten twice a second and read live: whole, not durable.
    ripcord_crashsafe::replace_atomic(path, &serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))
}
