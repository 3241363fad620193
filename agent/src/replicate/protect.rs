//! `ripcord-agent protect`: capture, read back, seal and replicate protected devices to
//! the process server until SIGINT/SIGTERM, then flush everything and wait for it to be
//! durable on the server.
//!
//! A start **continues** a disk's epoch when its acknowledged-digest map (`acked_map`)
//! vouches for what the server holds: under a new data key (a key rotation, decision
//! 0025), from where the server is, with a sync that reads the whole device but sends only
//! the blocks that differ (written while the agent was down, or in flight when it died).
//! Otherwise (no map, another size, a server that does not hold the epoch) it starts a
//! new epoch with a full initial sync (zero regions skipped). A protected
//! device that changes size (checked every second, and when a round's read fails) ends
//! the epoch at once and starts a new one at the new size: writes to a grown range were
//! not captured before, and the new epoch's sync reads every sector after its capture is
//! attached, so none is missed.
//!
//! Before anything else, the agent locks its state directory and every device (`lock`):
//! a second agent is refused with the holder's pid. How it stops, and what it says when
//! it does, is in `stop` and `outcome`; what it reports while it runs, in `status`.

use std::{
    net::ToSocketAddrs as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ripcord_proto::DiskId;
use ripcord_seal::DataKey;
use ripcord_transport::Identity;
use tokio::sync::mpsc;

use super::{
    acked_map::AckedMap,
    batch::BatchBuilder,
    config::AgentConfig,
    group::{self, SharedGroupClock},
    metrics::AgentMetrics,
    net::{self, Continuation, DiskLink, LinkStats, NetConfig},
    outcome::{self, EpochEnd},
    pipeline::{CutRequest, DiskProducer, Outgoing, RoundConfig, round},
    points::{self, FreezeStats, GapPolicy, GapState},
    renew::{MachineIdentity, RenewTarget, renew_forever},
    state::AgentState,
    status::{StatsView, StatusWriter, SyncProgress},
    stop::{Abandoned, Stop, send_or_stop},
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

/// A group cut due within this much takes the next round (which then waits for its
/// instant): longer than an idle wait plus a typical round, so instants are not missed.
const GROUP_LEAD: Duration = Duration::from_millis(150);

/// An application-consistent group point starts this much earlier still: its pre-freeze
/// hooks must be done, and its file systems written back, before it freezes
/// (`points::GROUP_FREEZE_MARGIN` before the instant). Rounds pause meanwhile: changes
/// wait as dirty ranges, nothing is lost, the lag grows by at most this.
const GROUP_APP_LEAD: Duration = Duration::from_secs(2);

pub fn run(opts: ProtectOptions) -> anyhow::Result<()> {
    preflight::require()?;
    crate::clock::check_skew()?;
    let cfg = &opts.config;
    let stop = Stop::install(Duration::from_secs(cfg.drain_timeout_secs))?;
    super::state::ensure_state_dir(&cfg.state_dir)?;
    let devs = devices(&opts)?
        .iter()
        .map(|p| BlockDevice::resolve(p))
        .collect::<Result<Vec<_>, _>>()?;
    // Held until the agent exits: one agent per state directory and per device.
    let _locks = super::lock::lock_all(&cfg.state_dir, &devs)?;
    super::freeze::thaw_left_frozen(&cfg.state_dir);
    let metrics = Arc::new(AgentMetrics::new());
    if !cfg.metrics_addr.is_empty() {
        let addr = cfg.metrics_addr.parse().context("metrics-addr")?;
        // Replication matters more than its metrics: a taken port is reported, not fatal.
        match super::metrics::spawn_http(addr, Arc::clone(&metrics)) {
            Ok(()) => tracing::info!(%addr, "metrics on http://{addr}/metrics"),
            Err(e) => tracing::error!("no metrics endpoint: {e:#}"),
        }
    }
    let mut may_continue = true;
    loop {
        match run_epoch(&opts, &stop, &metrics, may_continue)? {
            Ended::Stopped => return Ok(()),
            Ended::Resized(why) => tracing::warn!(
                "{why}: protecting the new size in a new epoch (full sync of the disk; \
                 recovery points taken before keep the old size)"
            ),
            Ended::CannotContinue(why) => tracing::warn!(
                "the process server cannot continue the epoch ({why}): starting a new epoch \
                 (full sync)"
            ),
        }
        may_continue = false;
    }
}

/// How one epoch of protection ended.
pub(crate) enum Ended {
    /// SIGINT/SIGTERM: the outcome was logged.
    Stopped,
    /// A protected device changed size (what happened, for the log). The old epoch's
    /// points stand; a new epoch protects the new size.
    Resized(String),
    /// The server cannot continue an epoch this start tried to continue (why): a new
    /// epoch starts.
    CannotContinue(String),
}

/// The devices to protect: from the command line, else the config file.
fn devices(opts: &ProtectOptions) -> anyhow::Result<Vec<PathBuf>> {
    let devices = if opts.devices.is_empty() {
        opts.config.devices.clone()
    } else {
        opts.devices.clone()
    };
    if devices.is_empty() {
        bail!("no devices to protect: name them on the command line or in the config file");
    }
    Ok(devices)
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
    stop: &Stop,
    metrics: &Arc<AgentMetrics>,
    may_continue: bool,
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
    let devs = devices(opts)?
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
    let mut ids = Vec::new();
    let mut continuations = Vec::new();
    for dev in &devs {
        let size = dev.sectors * 512;
        let continued = match state.current_epoch(&dev.path)? {
            Some((id, epoch)) if may_continue => {
                AckedMap::open(&cfg.state_dir, &DiskId(id), epoch, size)?.map(|m| (id, epoch, m))
            }
            _ => None,
        };
        let continues = continued.is_some();
        let (id, epoch, map) = match continued {
            Some(c) => c,
            None => {
                let (id, epoch) = state.next_epoch(&dev.path, &cfg.state_dir)?;
                let map = AckedMap::create(&cfg.state_dir, &DiskId(id), epoch, size)?;
                (id, epoch, map)
            }
        };
        let map = Arc::new(std::sync::Mutex::new(map));
        let disk = DiskId(id);
        ids.push((disk, epoch));
        // A fresh data key per process: nonces (epoch, seq) never repeat under one key.
        let key = DataKey::generate()?;
        let builder = BatchBuilder::new(
            &machine,
            disk,
            epoch,
            DataKey::from_bytes(*key.expose_bytes()),
            cfg.zstd_level,
            cfg.batch_kib << 10,
        )
        .with_acked_map(Arc::clone(&map));
        let mut producer = DiskProducer::new(dev.clone(), builder)?;
        producer.discards_read_zero = cfg.discards_read_zero.for_device(dev);
        producer.delta = continues.then(|| Arc::clone(&map));
        tracing::info!(
            device = %dev.path.display(),
            "discards are {}",
            discard_mode(producer.discards_read_zero)
        );
        producers.push(producer);
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let mut link = DiskLink::new(
            disk,
            epoch,
            size,
            dev.logical_block_size,
            Arc::new(key),
            (cfg.window_mib << 20) / 2,
            rx,
        );
        link.device = dev.path.display().to_string();
        link.acked = Some(map);
        let continuation = continues.then(|| Arc::new(Continuation::default()));
        link.continuation = continuation.clone();
        continuations.push(continuation);
        link_stats.push(Arc::clone(&link.stats));
        links.push(link);
        senders.push(tx);
        if continues {
            tracing::info!(
                device = %dev.path.display(), disk = %disk, epoch, size,
                "protecting: continuing the epoch (the sync sends only blocks the server \
                 does not hold)"
            );
        } else {
            tracing::info!(
                device = %dev.path.display(), disk = %disk, epoch, size,
                "protecting (full initial sync)"
            );
        }
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
    let group_clock = SharedGroupClock::default();
    let machine_policy = crate::replicate::policy::SharedPolicy::default();
    let net_cfg = NetConfig {
        server: server_addr,
        server_name,
        identity: Arc::clone(&identity),
        escrow_key,
        window_bytes: cfg.window_mib << 20,
        congestion: cfg.congestion.into(),
        group_clock: Arc::clone(&group_clock),
        policy: machine_policy.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("ripcord-net")
        .build()?;
    let mut net = rt.spawn(net::run(net_cfg, links));
    // Runs until the runtime is dropped at the end of the epoch.
    let _renewal =
        renew_target.map(|target| rt.spawn(async move { renew_forever(&identity, target).await }));

    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")?;
    }
    // A continued epoch goes on from where the server is: nothing is sealed before its
    // stream opened (capture runs meanwhile; what it sees waits in the ring buffer).
    while continuations
        .iter()
        .flatten()
        .any(|c| c.start.get().is_none())
    {
        if let Some(why) = continuations.iter().flatten().find_map(|c| c.refused.get()) {
            return Ok(Ended::CannotContinue(why.clone()));
        }
        if stop.requested() {
            tracing::info!("stopped before the process server answered");
            return Ok(Ended::Stopped);
        }
        if net.is_finished() {
            // A refusal is set before the network side ends; any other failure is
            // reported below.
            if let Some(why) = continuations.iter().flatten().find_map(|c| c.refused.get()) {
                return Ok(Ended::CannotContinue(why.clone()));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (p, c) in producers.iter_mut().zip(&continuations) {
        if let Some(seq) = c.as_ref().and_then(|c| c.start.get()) {
            p.builder.continue_at(*seq);
        }
    }
    let round_cfg = RoundConfig {
        round_sectors: cfg.round_mib << 11,
        sync_chunk_sectors: cfg.sync_chunk_mib << 11,
        cut_interval: Duration::from_millis(cfg.cut_interval_ms),
        cut: CutRequest::Interval,
        frozen_until: None,
    };
    let policy = GapPolicy::from_config(cfg);
    let mut gaps = vec![GapState::default(); producers.len()];
    let mut churn = vec![ChurnWatch::default(); producers.len()];
    let mut freezes = FreezeStats::default();
    let mut last_app = Instant::now();
    let total: u64 = devs.iter().map(|d| d.sectors * 512).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "initial sync {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template"),
    );
    let mut progress = (!console_is_tty()).then(|| {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        SyncProgress::new(producers.len())
    });
    let status_paths: Vec<std::path::PathBuf> =
        std::iter::once(super::status::status_path(&cfg.state_dir))
            .chain(opts.stats_file.clone())
            .collect();
    let view = StatsView {
        server: &server,
        ids: &ids,
        links: &link_stats,
    };
    // At once, so `status` shows the epoch before the first round (which may wait for the
    // server); refreshed every second from then on, also during a long round.
    let status = StatusWriter::start(
        status_paths,
        link_stats.clone(),
        producers
            .iter()
            .map(|p| Arc::clone(&p.sync_progress))
            .collect(),
        view.json(&producers, &gaps, &churn, &freezes),
    )?;
    let started = Instant::now();
    let mut last_stats = Instant::now();
    let mut sync_logged = false;
    let mut net_failed = None;
    let mut abandoned = false;
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
        let stopping = stop.requested();
        let in_sync = producers.iter().any(DiskProducer::syncing);
        let mut send = |slot: usize, item: Outgoing| -> anyhow::Result<()> {
            send_or_stop(&rt, &senders[slot], &link_stats[slot], item, stop, in_sync)
        };
        // A group cut due soon takes this round: it waits for the instant (decision 0027).
        let mut target = (!in_sync)
            .then(|| group::next_target(&group_clock, GROUP_LEAD, GROUP_APP_LEAD))
            .flatten();
        if let Some(app_target) = target.filter(|t| t.app) {
            target = points::take_group_app_point(
                &mut capture,
                &mut producers,
                &round_cfg,
                &mut send,
                cfg,
                app_target,
            );
            if target.is_none() {
                continue;
            }
        }
        let this_round = match target {
            Some(target) => RoundConfig {
                cut: CutRequest::Group(target),
                ..round_cfg
            },
            None => round_cfg,
        };
        let worked = match round(&mut capture, &mut producers, &this_round, &mut send) {
            Ok(w) => w,
            Err(e) if e.downcast_ref::<Abandoned>().is_some() => {
                abandoned = true;
                break;
            }
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
        if let Some(p) = &mut progress {
            p.observe(&producers);
        }
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
            metrics.update(&view.samples(&producers, &gaps, &churn), &freezes);
            status.write(view.json(&producers, &gaps, &churn, &freezes))?;
        }
        if net.is_finished() {
            break;
        }
        if stopping {
            // Quiesce: everything completed before the stop has been read in a round
            // after it; leave when nothing is dirty (or when the drain timeout passes under
            // endless writes). During the initial sync, stop at once: the next start
            // begins a new epoch anyway.
            let quiet = producers
                .iter()
                .all(|p| p.dirty.is_empty() && p.zeroed.is_empty());
            if quiet || producers.iter().any(|p| p.syncing()) || stop.abandon().is_some() {
                break;
            }
            continue;
        }
        if let Some(interval) = machine_policy.app_interval(cfg.app_interval_secs)
            && last_app.elapsed() >= interval
            && producers.iter().all(|p| !p.syncing())
        {
            last_app = Instant::now();
            match points::app_point(&mut capture, &mut producers, &round_cfg, &mut send, cfg) {
                Ok(point) => tracing::info!(
                    "application-consistent point taken (hooks run: {}; file systems frozen: {})",
                    point.hooks,
                    point.frozen
                ),
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
        for p in &producers {
            if let Some(m) = p.builder.acked_map() {
                m.lock().expect("acked map lock").checkpoint_if_due()?;
            }
        }
        if !worked {
            capture.wait(Duration::from_millis(50))?;
        }
    }
    let end = EpochEnd {
        rt,
        net: &mut net,
        server: &server,
        stop,
        capture: &mut capture,
        producers: &mut producers,
        round_cfg: &round_cfg,
        senders,
        links: &link_stats,
        net_failed,
        abandoned,
        resize,
    };
    let ended = outcome::finish(end);
    status.write(view.json(&producers, &gaps, &churn, &freezes))?;
    ended
}

/// How discards on a disk are replicated, for status and logs.
pub(crate) fn discard_mode(read_zero: bool) -> &'static str {
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
pub(crate) struct ChurnWatch {
    backlog_since: Option<Instant>,
    pub(crate) alerted: bool,
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
