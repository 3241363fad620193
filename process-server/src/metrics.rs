//! Prometheus metrics on `GET /metrics` (prometheus-client text format).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    disk::{DiskCore, DiskCounters},
    server::State,
    uploader::UploadStatus,
};

/// Every per-disk series names the disk and the machine it belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiskLabel {
    pub disk: String,
    pub machine: String,
}

/// `ripcord_ps_disk_info`: the device a disk's owner says it protects the disk as.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiskInfoLabel {
    pub disk: String,
    pub machine: String,
    pub device: String,
}

/// `ripcord_ps_health_signal{signal}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabel {
    pub signal: String,
}

/// The process server's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub errors: Counter,
    bytes_in: Family<DiskLabel, Counter>,
    batches: Family<DiskLabel, Counter>,
    cuts: Family<DiskLabel, Counter>,
    duplicates: Family<DiskLabel, Counter>,
    syncs: Family<DiskLabel, Counter>,
    backpressure: Family<DiskLabel, Counter>,
    durable_seq: Family<DiskLabel, Gauge>,
    epoch: Family<DiskLabel, Gauge>,
    journal_bytes: Family<DiskLabel, Gauge>,
    last_durable: Family<DiskLabel, Gauge>,
    upload_errors: Family<DiskLabel, Counter>,
    uploads_failing: Family<DiskLabel, Gauge>,
    point_age: Family<DiskLabel, Gauge>,
    retention: Family<DiskLabel, Gauge>,
    lag: Family<DiskLabel, Gauge>,
    /// 1 while a disk's acknowledgements are held for cache space (set by the disk itself,
    /// live: no group commit happens while it is held).
    space_held: Family<DiskLabel, Gauge>,
    /// The server's health level (0 green, 1 orange, 2 red) and each signal's.
    pub health: Gauge,
    health_signal: Family<SignalLabel, Gauge>,
    /// Always 1; its labels name the disk's device (an info metric: the device stays out
    /// of the other series' labels, so a renamed device starts no new series; join with
    /// `* on(disk) group_left(device) ripcord_ps_disk_info`).
    disk_info: Family<DiskInfoLabel, Gauge>,
    /// The label of each disk's `disk_info` series, to drop it when the name changes.
    info_labels: Mutex<HashMap<String, DiskInfoLabel>>,
    seen: Mutex<HashMap<String, DiskCounters>>,
    /// Upload status per disk, read at each scrape; with the errors already counted.
    uploads: Mutex<HashMap<DiskLabel, WatchedUpload>>,
}

/// A disk as [`Metrics::disk_states`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskState {
    pub disk: String,
    pub machine: String,
    /// The owner's name for it (`?` when it never said).
    pub device: String,
    /// `None` until this server's first group commit of the disk.
    pub epoch: Option<u64>,
    /// Newest batch durable in the journal (`None` as `epoch`).
    pub durable_seq: Option<u64>,
    /// When the newest recovery point was committed in the store, if one was.
    pub newest_point_at: Option<SystemTime>,
    /// Up to when that point holds every write of the disk
    /// ([`UploadStatus::current_as_of`]).
    pub current_as_of: Option<SystemTime>,
}

/// A disk's upload status and how many of its errors the counter already holds.
type WatchedUpload = (Arc<Mutex<UploadStatus>>, u64);

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ripcord_ps");
        let m = Metrics {
            connections: Gauge::default(),
            errors: Counter::default(),
            bytes_in: Family::default(),
            batches: Family::default(),
            cuts: Family::default(),
            duplicates: Family::default(),
            syncs: Family::default(),
            backpressure: Family::default(),
            durable_seq: Family::default(),
            epoch: Family::default(),
            journal_bytes: Family::default(),
            last_durable: Family::default(),
            upload_errors: Family::default(),
            uploads_failing: Family::default(),
            point_age: Family::default(),
            retention: Family::default(),
            lag: Family::default(),
            space_held: Family::default(),
            health: Gauge::default(),
            health_signal: Family::default(),
            disk_info: Family::default(),
            info_labels: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register("connections", "Connected agents", m.connections.clone());
        registry.register("errors", "Streams refused or failed", m.errors.clone());
        registry.register("bytes_in", "Batch bytes journaled", m.bytes_in.clone());
        registry.register("batches", "Batches journaled", m.batches.clone());
        registry.register("cuts", "Consistency cuts journaled", m.cuts.clone());
        registry.register(
            "duplicates",
            "Batches received again after a reconnect",
            m.duplicates.clone(),
        );
        registry.register(
            "syncs",
            "Journal fdatasyncs (group commits)",
            m.syncs.clone(),
        );
        registry.register(
            "backpressure_waits",
            "Times acknowledgements were held for cache space",
            m.backpressure.clone(),
        );
        registry.register(
            "acks_held_for_space",
            "1 while acknowledgements are held because the cache has too little free space",
            m.space_held.clone(),
        );
        registry.register(
            "health",
            "Health of this process server: 0 green, 1 orange, 2 red (the worst signal)",
            m.health.clone(),
        );
        registry.register(
            "health_signal",
            "Health of each signal (cpu, memory, cache, upload): 0 green, 1 orange, 2 red",
            m.health_signal.clone(),
        );
        registry.register(
            "durable_seq",
            "Highest durable sequence of the current epoch",
            m.durable_seq.clone(),
        );
        registry.register("epoch", "Current replication epoch", m.epoch.clone());
        registry.register(
            "journal_bytes_written",
            "Bytes written to the journal since start",
            m.journal_bytes.clone(),
        );
        registry.register(
            "last_durable_timestamp_seconds",
            "Unix time of the last group commit (replication lag = now - this)",
            m.last_durable.clone(),
        );
        registry.register(
            "upload_errors",
            "Failed attempts to upload a disk's journal to the target store",
            m.upload_errors.clone(),
        );
        registry.register(
            "uploads_failing",
            "1 while uploads of the disk to the target store fail",
            m.uploads_failing.clone(),
        );
        registry.register(
            "newest_point_age_seconds",
            "Seconds since the disk's newest recovery point was committed (or since this \
             server started, if none was)",
            m.point_age.clone(),
        );
        registry.register(
            "retention_seconds",
            "How long the disk's recovery points are kept now: its machine's policy's \
             retention, else the server's retention-secs (absent until the policies are known)",
            m.retention.clone(),
        );
        registry.register(
            "lag_seconds",
            "Seconds of the disk's writes a failover to its newest recovery point could \
             lose: 0 while that point holds every batch this server made durable and the \
             disk's stream is open (an idle disk), else the time since it last did",
            m.lag.clone(),
        );
        registry.register(
            "disk_info",
            "1 per disk; the device label is the path its machine says it protects the disk \
             as (the agent's claim, \"?\" if it said none)",
            m.disk_info.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The gauge a disk sets while it holds acknowledgements for cache space.
    pub fn space_held(&self, disk: &str, machine: &str) -> Gauge {
        self.space_held
            .get_or_create(&DiskLabel {
                disk: disk.to_owned(),
                machine: machine.to_owned(),
            })
            .clone()
    }

    /// Names `disk`'s device in `ripcord_ps_disk_info` (replacing the name it had).
    pub fn disk_info(&self, disk: &str, machine: &str, device: Option<&str>) {
        let label = DiskInfoLabel {
            disk: disk.to_owned(),
            machine: machine.to_owned(),
            device: device.unwrap_or("?").to_owned(),
        };
        let mut labels = self.info_labels.lock().expect("metrics lock");
        if let Some(old) = labels.insert(disk.to_owned(), label.clone())
            && old != label
        {
            self.disk_info.remove(&old);
        }
        self.disk_info.get_or_create(&label).set(1);
    }

    /// The upload status of a disk, reported at each scrape (one per disk).
    pub fn upload_status(&self, disk: &str, machine: &str) -> Arc<Mutex<UploadStatus>> {
        let label = DiskLabel {
            disk: disk.to_owned(),
            machine: machine.to_owned(),
        };
        let mut uploads = self.uploads.lock().expect("metrics lock");
        Arc::clone(&uploads.entry(label).or_default().0)
    }

    /// Fold a disk's counters in after a group commit.
    pub fn observe(&self, disk: &str, machine: &str, core: &DiskCore) {
        let label = DiskLabel {
            disk: disk.to_owned(),
            machine: machine.to_owned(),
        };
        let c = core.counters;
        let mut seen = self.seen.lock().expect("metrics lock");
        let prev = seen.insert(disk.to_owned(), c).unwrap_or_default();
        self.bytes_in
            .get_or_create(&label)
            .inc_by(c.bytes_in - prev.bytes_in);
        self.batches
            .get_or_create(&label)
            .inc_by(c.batches - prev.batches);
        self.cuts.get_or_create(&label).inc_by(c.cuts - prev.cuts);
        self.duplicates
            .get_or_create(&label)
            .inc_by(c.duplicates - prev.duplicates);
        self.syncs
            .get_or_create(&label)
            .inc_by(c.syncs - prev.syncs);
        self.backpressure
            .get_or_create(&label)
            .inc_by(c.backpressure_waits - prev.backpressure_waits);
        let st = core.durable_state();
        self.durable_seq
            .get_or_create(&label)
            .set(st.durable_seq as i64);
        self.epoch.get_or_create(&label).set(st.epoch as i64);
        self.journal_bytes
            .get_or_create(&label)
            .set(core.journal().metrics().bytes_written as i64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_durable.get_or_create(&label).set(now as i64);
    }

    /// Every disk this server holds, as its metrics show it now (for the configuration
    /// role's database).
    pub fn disk_states(&self) -> Vec<DiskState> {
        let labels: Vec<DiskInfoLabel> = self
            .info_labels
            .lock()
            .expect("metrics lock")
            .values()
            .cloned()
            .collect();
        let uploads = self.uploads.lock().expect("metrics lock");
        labels
            .into_iter()
            .map(|info| {
                let label = DiskLabel {
                    disk: info.disk.clone(),
                    machine: info.machine.clone(),
                };
                let gauge = |f: &Family<DiskLabel, Gauge>| {
                    f.get(&label).and_then(|g| u64::try_from(g.get()).ok())
                };
                let (newest_point_at, current_as_of) =
                    uploads.get(&label).map_or((None, None), |(status, _)| {
                        let st = status.lock().expect("status lock");
                        (
                            st.point_seen.then_some(st.newest_point_at),
                            st.current_as_of(),
                        )
                    });
                DiskState {
                    current_as_of,
                    epoch: gauge(&self.epoch),
                    durable_seq: gauge(&self.durable_seq),
                    newest_point_at,
                    disk: info.disk,
                    machine: info.machine,
                    device: info.device,
                }
            })
            .collect()
    }

    /// Publishes a health report.
    pub fn set_health(&self, report: &crate::health::HealthReport) {
        self.health.set(report.level as i64);
        for s in &report.signals {
            self.health_signal
                .get_or_create(&SignalLabel {
                    signal: s.signal.clone(),
                })
                .set(s.level as i64);
        }
    }

    /// How long uploads have failed, for the disk that has failed longest (`None` while
    /// every disk uploads, or when nothing is uploaded).
    pub fn upload_failing_for(&self) -> Option<std::time::Duration> {
        self.uploads
            .lock()
            .expect("metrics lock")
            .values()
            .filter_map(|(status, _)| {
                let st = status.lock().expect("status lock");
                st.failing.as_ref().map(|(since, _)| since.elapsed())
            })
            .max()
    }

    pub fn render(&self) -> String {
        for (label, (status, counted)) in self.uploads.lock().expect("metrics lock").iter_mut() {
            let st = status.lock().expect("status lock");
            self.upload_errors
                .get_or_create(label)
                .inc_by(st.errors - *counted);
            *counted = st.errors;
            self.uploads_failing
                .get_or_create(label)
                .set(i64::from(st.failing.is_some()));
            self.point_age
                .get_or_create(label)
                .set(st.point_age().as_secs() as i64);
            self.lag.get_or_create(label).set(st.lag().as_secs() as i64);
            if let Some(r) = st.retention {
                self.retention
                    .get_or_create(label)
                    .set(i64::try_from(r.as_secs()).unwrap_or(i64::MAX));
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serve `GET /metrics` on `addr` from a thread, and on the configuration role its status
/// page on `/` and `/status` ([`crate::status_page`]) and the deployment's metrics
/// ([`crate::config_metrics`]).
pub fn spawn_http(addr: SocketAddr, state: Arc<State>) -> anyhow::Result<()> {
    // The configuration role also serves its status page there.
    let db = state
        .control
        .is_some()
        .then(|| crate::control::db_path(&state.dep.dir));
    let metrics_db = db.clone();
    ripcord_metrics_http::serve_with_pages(
        addr,
        move || {
            let own = state.metrics.render();
            match &metrics_db {
                Some(db) => {
                    let body = own.strip_suffix("# EOF\n").unwrap_or(&own);
                    format!("{body}{}# EOF\n", crate::config_metrics::render(db))
                }
                None => own,
            }
        },
        move |path| match (&db, path) {
            (Some(db), "/" | "/status") => Some(ripcord_metrics_http::Page {
                content_type: "text/html; charset=utf-8",
                body: crate::status_page::render(db),
            }),
            _ => None,
        },
    )
}
