//! What `protect` is doing, for operators: the status file, progress lines, and
//! `ripcord-agent status`.
//!
//! `protect` rewrites `<state-dir>/status.json` (mode 0600; and `--stats-file` if given)
//! at least once a second, also in the middle of a long round ([`StatusWriter`]), and at
//! exit: per disk its device, disk id, epoch, initial-sync progress
//! or streaming, sequences pushed and acknowledged, the last acknowledged cut and lag.
//! `ripcord-agent status` reads it, but shows it as live only while the state
//! directory's lock (`agent.lock`, see `lock`) is held: otherwise it says that no agent
//! runs and labels what it shows as the last known state.
//!
//! Without a terminal on stderr there is no progress bar, so the initial sync logs a line
//! per disk every 5 s and at every 10 %.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use ripcord_proto::DiskId;
use serde_json::{Value, json};

use super::{
    metrics::DiskSample,
    net::LinkStats,
    pipeline::DiskProducer,
    points::{FreezeStats, GapState},
    protect::ChurnWatch,
};

/// The status file in a state directory.
pub fn status_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("status.json")
}

/// The parts of the status file and the metrics that stay put for an epoch (built once
/// per epoch); the producer side's parts are lent to each snapshot.
pub(crate) struct StatsView<'a> {
    pub server: &'a str,
    pub ids: &'a [(DiskId, u64)],
    pub links: &'a [Arc<LinkStats>],
}

impl StatsView<'_> {
    pub fn samples<'p>(
        &self,
        producers: &'p [DiskProducer],
        gaps: &[GapState],
        churn: &[ChurnWatch],
    ) -> Vec<DiskSample<'p>> {
        producers
            .iter()
            .zip(gaps.iter().zip(churn))
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

    /// The status file's contents.
    pub fn json(
        &self,
        producers: &[DiskProducer],
        gaps: &[GapState],
        churn: &[ChurnWatch],
        freezes: &FreezeStats,
    ) -> Value {
        let mut all_lag = Vec::new();
        let disks: Vec<_> = producers
            .iter()
            .zip(self.links)
            .zip(self.ids)
            .zip(self.samples(producers, gaps, churn))
            .map(|(((p, l), (disk, epoch)), sample)| {
                all_lag.extend(l.lag_us.lock().expect("lag lock").iter().copied());
                let c = p.counters;
                let mut d = json!({
                    "device": p.dev.path,
                    "disk_id": disk.to_string(),
                    "epoch": epoch,
                    "size_bytes": p.dev.sectors * 512,
                    "discards": super::protect::discard_mode(p.discards_read_zero),
                    "syncing": p.syncing(),
                    "synced_bytes": p.synced_sectors() * 512,
                    "dirty_bytes": sample.dirty_bytes,
                    "next_seq": p.builder.next_seq(),
                    "bytes_read": c.bytes_read,
                    "continued": p.delta.is_some(),
                    "delta_skipped_bytes": c.delta_skipped_bytes,
                    "read_errors": c.read_errors,
                    "passthrough_writes": c.passthrough_writes,
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
                    "group_cuts": c.group_cuts,
                    "group_misses": c.group_misses,
                    "point_gap_ms": sample.point_gap.map(|g| g.as_millis() as u64),
                    "point_age_ms": sample.point_age.map(|g| g.as_millis() as u64),
                    "largest_point_gap_ms": p.largest_gap.as_millis() as u64,
                    "point_gap_alert": sample.gap_alert,
                    "churn_alert": sample.churn_alert,
                });
                put_link(&mut d, l);
                d
            })
            .collect();
        all_lag.sort_unstable();
        let mut stalls = freezes.stalls_us.clone();
        stalls.sort_unstable();
        json!({
            "pid": std::process::id(),
            "server": self.server,
            "updated_unix_ms": unix_ms(),
            "disks": disks,
            "lag_ms": {
                "samples": all_lag.len(),
                "p50": percentile(&all_lag, 0.5) as f64 / 1000.0,
                "p99": percentile(&all_lag, 0.99) as f64 / 1000.0,
                "max": all_lag.last().copied().unwrap_or(0) as f64 / 1000.0,
            },
            "forced_freezes": {
                "attempts": freezes.attempts,
                "failures": freezes.failures,
                "stall_ms_p50": percentile(&stalls, 0.5) as f64 / 1000.0,
                "stall_ms_p99": percentile(&stalls, 0.99) as f64 / 1000.0,
                "stall_ms_max": stalls.last().copied().unwrap_or(0) as f64 / 1000.0,
            },
            "peak_rss_kib": rss_kib(),
        })
    }
}

/// Sets a disk's network-side fields (live counters) in its status object `d`.
fn put_link(d: &mut Value, l: &LinkStats) {
    let store = l
        .store
        .lock()
        .expect("store status lock")
        .as_ref()
        .map(|s| {
            json!({
                "epoch": s.epoch,
                "committed_cut": s.committed_cut_id,
                "point_age_secs": s.point_age_secs,
                "failure": s.failure,
            })
        });
    let fields = [
        ("pushed_seq", json!(l.pushed_seq.load(Ordering::Relaxed))),
        ("acked_seq", json!(l.acked_seq.load(Ordering::Relaxed))),
        ("acked_cuts", json!(l.acked_cuts.load(Ordering::Relaxed))),
        ("store", json!(store)),
        (
            "unacked_bytes",
            json!(l.unacked_bytes.load(Ordering::Relaxed)),
        ),
        ("reconnects", json!(l.reconnects.load(Ordering::Relaxed))),
    ];
    for (k, v) in fields {
        d[k] = v;
    }
}

/// The status file is rewritten at least this often while the agent runs.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// Writes the status files (atomically replaced, mode 0600): the main loop hands it a
/// full snapshot between rounds ([`StatusWriter::write`]); a thread rewrites the files
/// whenever the last write is [`STATUS_REFRESH`] old, from that snapshot with the
/// network side's live counters (sequences pushed and acknowledged, unacknowledged bytes,
/// what the server said about the store), the initial sync's live position and the time.
/// So a long round (an initial-sync chunk over a slow link, a send waiting for the
/// server) never leaves `status` a stale picture.
pub(crate) struct StatusWriter {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    paths: Vec<PathBuf>,
    links: Vec<Arc<LinkStats>>,
    /// Per disk: sectors read by the initial sync ([`DiskProducer::sync_progress`]).
    sync_progress: Vec<Arc<AtomicU64>>,
    /// The last snapshot, and when the files were last written.
    last: Mutex<(Value, Instant)>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    /// Writes `v` to every path; the caller holds `last`.
    fn write(&self, v: &Value) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(v)?;
        for path in &self.paths {
            // Rewritten every second and read live: whole, not durable.
            ripcord_crashsafe::replace_atomic_mode(path, &bytes, ripcord_crashsafe::MODE_SECRET)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The last snapshot with the live counters, now.
    fn refreshed(&self, last: &Value) -> Value {
        let mut v = last.clone();
        if let Some(disks) = v["disks"].as_array_mut() {
            for ((d, l), progress) in disks.iter_mut().zip(&self.links).zip(&self.sync_progress) {
                put_link(d, l);
                if d["syncing"] == true {
                    let live = progress.load(Ordering::Relaxed) * 512;
                    let shown = d["synced_bytes"].as_u64().unwrap_or(0);
                    d["synced_bytes"] = json!(shown.max(live));
                }
            }
        }
        v["updated_unix_ms"] = json!(unix_ms());
        v
    }

    fn refresh_until_stopped(&self) {
        let mut warned = false;
        let mut stop = self.stop.lock().expect("status stop lock");
        while !*stop {
            stop = self
                .wake
                .wait_timeout(stop, STATUS_REFRESH / 4)
                .expect("status stop lock")
                .0;
            let mut last = self.last.lock().expect("status lock");
            if *stop || last.1.elapsed() < STATUS_REFRESH {
                continue;
            }
            let v = self.refreshed(&last.0);
            match self.write(&v) {
                Ok(()) => warned = false,
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!("cannot refresh the status file: {e:#}");
                }
                Err(_) => {}
            }
            last.1 = Instant::now();
        }
    }
}

impl StatusWriter {
    /// Writes `first` to every path now and starts the refreshing thread.
    pub fn start(
        paths: Vec<PathBuf>,
        links: Vec<Arc<LinkStats>>,
        sync_progress: Vec<Arc<AtomicU64>>,
        first: Value,
    ) -> anyhow::Result<StatusWriter> {
        let shared = Arc::new(Shared {
            paths,
            links,
            sync_progress,
            last: Mutex::new((Value::Null, Instant::now())),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        shared.write(&first)?;
        *shared.last.lock().expect("status lock") = (first, Instant::now());
        let refresher = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || refresher.refresh_until_stopped())
            .context("starting the status writer thread")?;
        Ok(StatusWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Writes the full snapshot `v` now; the thread refreshes it from then on.
    pub fn write(&self, v: Value) -> anyhow::Result<()> {
        let mut last = self.shared.last.lock().expect("status lock");
        self.shared.write(&v)?;
        *last = (v, Instant::now());
        Ok(())
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        *self.shared.stop.lock().expect("status stop lock") = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// Bytes for people: "512 B", "12.0 MiB", "2.0 GiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Initial-sync progress lines for logs without a terminal: one per disk every 5 s and at
/// every 10 %.
#[derive(Debug)]
pub struct SyncProgress {
    started: Instant,
    last: Vec<(Instant, u64)>,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl SyncProgress {
    pub fn new(disks: usize) -> SyncProgress {
        let now = Instant::now();
        SyncProgress {
            started: now,
            last: vec![(now, 0); disks],
        }
    }

    /// Log a line for each syncing disk that is due one.
    pub fn observe(&mut self, producers: &[DiskProducer]) {
        for (p, (at, tenths)) in producers.iter().zip(&mut self.last) {
            if !p.syncing() {
                continue;
            }
            let total = p.dev.sectors * 512;
            let done = p.synced_sectors() * 512;
            let now_tenths = done * 10 / total.max(1);
            if at.elapsed() < PROGRESS_EVERY && now_tenths <= *tenths {
                continue;
            }
            (*at, *tenths) = (Instant::now(), now_tenths);
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 {
                format!("{:.0} s", (total - done) as f64 / rate)
            } else {
                "unknown".to_owned()
            };
            // A continued epoch's sync reads everything but sends only what differs.
            let what = if p.delta.is_some() {
                "sync after a restart (sending only what the server lacks)"
            } else {
                "initial sync"
            };
            tracing::info!(
                "{what} {}: {} of {} ({}%), {}/s, eta {eta}",
                p.dev.path.display(),
                human_bytes(done),
                human_bytes(total),
                done * 100 / total.max(1),
                human_bytes(rate as u64),
            );
        }
    }
}

/// `ripcord-agent status`: print what the agent with `state_dir` is doing. Returns
/// whether an agent runs (the caller exits 3 when none does, as `systemctl status`).
pub fn show(state_dir: &Path, as_json: bool) -> anyhow::Result<bool> {
    let running = super::lock::agent_running(state_dir)?;
    let path = status_path(state_dir);
    let last: Option<Value> = match std::fs::read(&path) {
        Ok(b) => Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if as_json {
        let v = json!({
            "running": running.is_some(),
            "state_dir": state_dir,
            "status": if running.is_some() { last.clone() } else { None },
            "last_known": if running.is_some() { None } else { last.clone() },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(running.is_some());
    }
    let age = |v: &Value| {
        let ms = unix_ms().saturating_sub(v["updated_unix_ms"].as_u64().unwrap_or(0));
        format!("{:.0} s ago", ms as f64 / 1000.0)
    };
    match (&running, &last) {
        (Some(holder), Some(v)) => println!(
            "ripcord-agent running ({holder}) with state directory {}, replicating to {}; \
             status updated {}",
            state_dir.display(),
            v["server"].as_str().unwrap_or("?"),
            age(v)
        ),
        (Some(holder), None) => {
            println!(
                "ripcord-agent running ({holder}) with state directory {}, no status yet",
                state_dir.display()
            );
            return Ok(true);
        }
        (None, Some(v)) => println!(
            "no ripcord-agent is running with state directory {} (lock {} not held); last \
             known state, written {} by the agent that stopped:",
            state_dir.display(),
            super::lock::state_dir_lock_path(state_dir).display(),
            age(v)
        ),
        (None, None) => {
            println!(
                "no ripcord-agent is running with state directory {}, and none has written a \
                 status there",
                state_dir.display()
            );
            return Ok(false);
        }
    }
    let v = last.as_ref().expect("matched above");
    for d in v["disks"].as_array().into_iter().flatten() {
        let size = d["size_bytes"].as_u64().unwrap_or(0);
        let synced = d["synced_bytes"].as_u64().unwrap_or(0);
        let state = if d["syncing"] == true {
            format!(
                "initial sync {}% ({} of {}), no recovery point yet",
                synced * 100 / size.max(1),
                human_bytes(synced),
                human_bytes(size)
            )
        } else {
            "streaming".to_owned()
        };
        println!(
            "{}  disk {}  epoch {}  {state}\n    acknowledged seq {} of {}  last cut {}  \
             unacknowledged {}  dirty {}  point age {}",
            d["device"].as_str().unwrap_or("?"),
            d["disk_id"].as_str().unwrap_or("?"),
            d["epoch"],
            d["acked_seq"],
            d["pushed_seq"],
            match d["acked_cuts"].as_u64() {
                Some(0) | None => "none".to_owned(),
                Some(c) => c.to_string(),
            },
            human_bytes(d["unacked_bytes"].as_u64().unwrap_or(0)),
            human_bytes(d["dirty_bytes"].as_u64().unwrap_or(0)),
            d["point_age_ms"]
                .as_u64()
                .map_or("-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
        );
        // What the process server last said about the target store.
        let store = &d["store"];
        if let Some(failure) = store["failure"].as_str().filter(|f| !f.is_empty()) {
            println!(
                "    NO NEW RECOVERY POINTS: the process server cannot upload ({failure}); the \
                 newest point in the target store is {} s old",
                store["point_age_secs"]
            );
        } else if store["committed_cut"].as_u64().is_some_and(|c| c > 0) {
            println!(
                "    target store: newest recovery point cut {} of epoch {}, {} s old",
                store["committed_cut"], store["epoch"], store["point_age_secs"]
            );
        }
    }
    println!(
        "lag p50 {} ms  p99 {} ms",
        v["lag_ms"]["p50"], v["lag_ms"]["p99"]
    );
    Ok(running.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_file_follows_a_round_that_takes_long() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let link = Arc::new(LinkStats::default());
        let progress = Arc::new(AtomicU64::new(0));
        // The snapshot the main loop wrote before a round that now takes long.
        let first = json!({
            "updated_unix_ms": 1,
            "disks": [{ "syncing": true, "synced_bytes": 0, "pushed_seq": 0, "acked_seq": 0 }],
        });
        let writer = StatusWriter::start(
            vec![path.clone()],
            vec![Arc::clone(&link)],
            vec![Arc::clone(&progress)],
            first,
        )
        .unwrap();
        let read = || -> Value { serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap() };
        assert_eq!(read()["updated_unix_ms"], 1);
        // In the middle of the round: the sync read 3 MiB, the network side pushed and
        // the server acknowledged.
        progress.store(6144, Ordering::Relaxed);
        link.pushed_seq.store(7, Ordering::Relaxed);
        link.acked_seq.store(5, Ordering::Relaxed);
        let deadline = Instant::now() + 3 * STATUS_REFRESH;
        let v = loop {
            let v = read();
            if v["disks"][0]["acked_seq"] == 5 || Instant::now() > deadline {
                break v;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let d = &v["disks"][0];
        assert_eq!(
            (
                d["synced_bytes"].as_u64(),
                d["pushed_seq"].as_u64(),
                d["acked_seq"].as_u64()
            ),
            (Some(3 << 20), Some(7), Some(5)),
            "the status file was not refreshed during the round: {v}"
        );
        assert!(v["updated_unix_ms"].as_u64().unwrap() > 1, "{v}");
        drop(writer);
        // Stopped with its owner: nothing rewrites the file afterwards.
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(2 * STATUS_REFRESH);
        assert!(!path.exists(), "the status thread outlived its writer");
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(12 << 20), "12.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
