//! The configuration role's database writer (`roles` includes `config`): it keeps
//! `<deployment>/control.db` ([`ripcord_control`]) up to date with the heartbeat and
//! health of this server and of the process servers that report to it
//! (`crate::reporting`), the health alerts, the machines registered here and the state of
//! their disks.
//!
//! # Invariants
//! - **The data path never waits for the database.** Events go through a bounded queue
//!   to a thread of their own ([`ControlLink::send`] never blocks); when the queue is full
//!   (the database is slow or its disk is stuck) events are dropped and counted, and the
//!   periodic reports repair the state on the next tick. Nothing here is a source of
//!   truth for replication: the registry, the journals and the store are.
//! - A database that cannot be opened stops the server at start, with its path named; one
//!   that fails later is logged once per kind of failure and retried with the next event.
//! - An alert follows its signal's level: raised when it leaves green, raised again (the
//!   old one cleared) when its severity changes, cleared when it is green again.
//! - A process server silent for the heartbeat window (`health.heartbeat-window-secs`) is
//!   disconnected: marked red with a critical `health-heartbeat` alert, which its next
//!   report clears. Nobody is marked before this role has run for a window itself, so a
//!   restart of the configuration role does not find every server silent.
//! - A disk whose lag ([`ripcord_control::Disk::lag_secs`]) exceeds its RPO threshold (its
//!   machine's policy, else [`ripcord_control::DEFAULT_RPO_THRESHOLD_SECS`]) has an `rpo`
//!   alert: a warning over the threshold, critical over twice it, cleared once under it.
//!   An idle disk whose agent is connected has no lag, so only data at risk alerts.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use ripcord_control::{ControlDb, DiskReport, Health, ProcessServer, Severity};

use crate::health::HealthReport;

/// Events queued for the database thread before new ones are dropped.
const QUEUE: usize = 1024;

/// How often the database thread looks for silent process servers and lagging disks.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The alert of a process server silent for the heartbeat window.
const HEARTBEAT_ALERT: &str = "health-heartbeat";
/// The alert of a disk lagging past its RPO threshold (the subject is the disk).
const RPO_ALERT: &str = "rpo";
/// Lags are judged only this long after the role starts: by then every live server has
/// reported its disks (every health tick, 5 s by default), so a restart does not alert on
/// the currency recorded before it.
const RPO_START_GRACE: Duration = Duration::from_secs(15);

/// Each disk's lag is sampled at most this often for the status page's chart ...
pub const LAG_SAMPLE_SECS: i64 = 5;
/// ... and kept this long (the chart's span).
pub const LAG_KEEP_SECS: i64 = 3600;

/// The configuration database's file in a deployment.
pub fn db_path(deployment: &Path) -> std::path::PathBuf {
    deployment.join("control.db")
}

/// What the server tells the configuration role.
#[derive(Debug)]
pub enum Event {
    /// A health report: the heartbeat, and the alerts of its signals.
    Health(HealthReport),
    /// A machine registered (or renewed its certificate) here.
    Machine { id: String, cert_sha256: String },
    /// The disks this server holds, as of now.
    Disks(Vec<DiskReport>),
}

/// The queue to the database thread.
pub struct ControlLink {
    /// This server's id: the subject of [`ControlLink::send`]'s events.
    server_id: String,
    events: Mutex<Option<SyncSender<(String, Event)>>>,
    dropped: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Who this server is, for its row in `process_servers`.
pub struct Identity<'a> {
    pub server_id: &'a str,
    pub address: String,
    pub cert_sha256: String,
    /// Where it runs (`crate::join::fingerprint`).
    pub fingerprint: String,
    /// Machines registered before the database existed (or while it was down).
    pub machines: Vec<(String, String)>,
}

impl ControlLink {
    /// Opens the database in `deployment`, records this server and the machines it knows,
    /// and starts the thread; servers silent for `heartbeat_window` are disconnected.
    pub fn start(
        deployment: &Path,
        me: Identity<'_>,
        heartbeat_window: Duration,
    ) -> anyhow::Result<ControlLink> {
        let path = db_path(deployment);
        let mut db = ControlDb::open(&path)?;
        let now = unix_now();
        db.upsert_process_server(&ProcessServer {
            id: me.server_id.to_owned(),
            address: me.address,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cert_sha256: me.cert_sha256,
            config_role: true,
            registered_at: now,
            last_heartbeat: None,
            health: Health::Red,
            fingerprint: me.fingerprint,
            load: None,
        })
        .with_context(|| format!("recording this server in {}", path.display()))?;
        for (id, cert) in &me.machines {
            db.register_machine(id, cert, now, me.server_id)
                .with_context(|| format!("recording machine {id} in {}", path.display()))?;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("ripcord-control".into())
            .spawn(move || apply_events(db, rx, heartbeat_window))
            .context("starting the configuration database thread")?;
        tracing::info!(db = %path.display(), "configuration role: keeping the configuration database");
        Ok(ControlLink {
            server_id: me.server_id.to_owned(),
            events: Mutex::new(Some(tx)),
            dropped: AtomicU64::new(0),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `event` about this server; never blocks (see the module doc).
    pub fn send(&self, event: Event) {
        self.send_for(self.server_id.clone(), event);
    }

    /// Queues `event` about process server `server` (one that reported it); never blocks.
    pub fn send_for(&self, server: String, event: Event) {
        let events = self.events.lock().expect("control queue lock");
        let Some(tx) = events.as_ref() else {
            return;
        };
        match tx.try_send((server, event)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "the configuration database falls behind (its disk is slow or \
                         stuck): dropping its updates until it catches up; replication is \
                         not affected"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Applies what is queued and stops the thread.
    pub fn stop(&self) {
        drop(self.events.lock().expect("control queue lock").take());
        if let Some(thread) = self.thread.lock().expect("control thread lock").take()
            && thread.join().is_err()
        {
            tracing::error!("the configuration database thread panicked");
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The database thread: applies events until the link stops, marks silent servers and
/// alerts on lagging disks.
fn apply_events(mut db: ControlDb, events: Receiver<(String, Event)>, heartbeat_window: Duration) {
    // The alerts servers left open before a restart, by server and kind: cleared if their
    // signal is green now, kept if it is not.
    let mut alerts: HashMap<String, HashMap<String, Health>> = HashMap::new();
    match db.open_alerts() {
        Ok(open) => {
            for a in open
                .into_iter()
                .filter(|a| a.kind.starts_with("health-") || a.kind == RPO_ALERT)
            {
                let level = if a.severity == "critical" {
                    Health::Red
                } else {
                    Health::Orange
                };
                alerts.entry(a.subject).or_default().insert(a.kind, level);
            }
        }
        Err(e) => tracing::warn!("configuration database: reading open alerts: {e:#}"),
    }
    let mut failing: Option<&'static str> = None;
    // Logs a failure once per kind, and its end.
    let mut note = |what: &'static str, result: anyhow::Result<()>| match result {
        Ok(()) if failing == Some(what) => {
            tracing::info!("configuration database: {what} updates work again");
            failing = None;
        }
        Ok(()) => {}
        Err(e) if failing != Some(what) => {
            tracing::warn!("configuration database: recording {what}: {e:#}");
            failing = Some(what);
        }
        Err(_) => {}
    };
    let started = Instant::now();
    let mut next_check = started + CHECK_EVERY;
    loop {
        match events.recv_timeout(next_check.saturating_duration_since(Instant::now())) {
            Ok((server_id, event)) => {
                let (what, result) = apply_event(&mut db, &server_id, event, &mut alerts);
                note(what, result.with_context(|| format!("from {server_id}")));
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() < next_check {
            continue;
        }
        next_check = Instant::now() + CHECK_EVERY;
        if started.elapsed() >= heartbeat_window {
            let window = heartbeat_window.as_secs() as i64;
            note("silence", mark_silent(&mut db, window, &mut alerts));
        }
        if started.elapsed() >= RPO_START_GRACE {
            note("rpo", check_rpo(&mut db, unix_now(), &mut alerts));
        }
    }
}

/// Applies one event about process server `server_id`.
fn apply_event(
    db: &mut ControlDb,
    server_id: &str,
    event: Event,
    alerts: &mut HashMap<String, HashMap<String, Health>>,
) -> (&'static str, anyhow::Result<()>) {
    match event {
        Event::Health(report) => {
            let open = alerts.entry(server_id.to_owned()).or_default();
            ("health", record_health(db, server_id, &report, open))
        }
        Event::Machine { id, cert_sha256 } => (
            "machine",
            db.register_machine(&id, &cert_sha256, unix_now(), server_id)
                .map_err(anyhow::Error::from),
        ),
        Event::Disks(disks) => (
            "disks",
            db.record_disks(&disks)
                .and_then(|()| db.sample_lag(unix_now(), LAG_SAMPLE_SECS, LAG_KEEP_SECS))
                .map_err(anyhow::Error::from),
        ),
    }
}

/// Marks every process server silent for longer than `window` seconds red, with a
/// critical alert, once (its next report clears both).
fn mark_silent(
    db: &mut ControlDb,
    window: i64,
    alerts: &mut HashMap<String, HashMap<String, Health>>,
) -> anyhow::Result<()> {
    let now = unix_now();
    for s in db.process_servers()? {
        let Some(last) = s.last_heartbeat.filter(|_| s.silent(now, window)) else {
            continue;
        };
        let open = alerts.entry(s.id.clone()).or_default();
        if open.get(HEARTBEAT_ALERT) == Some(&Health::Red) {
            continue;
        }
        let detail = format!(
            "disconnected: no heartbeat for {} s (the window is {window} s)",
            now - last
        );
        tracing::warn!(server = %s.id, "process server {detail}; it takes no new machines");
        db.mark_red(&s.id)?;
        db.raise_alert(&s.id, HEARTBEAT_ALERT, Severity::Critical, &detail, now)?;
        open.insert(HEARTBEAT_ALERT.to_owned(), Health::Red);
    }
    Ok(())
}

/// Raises, escalates and clears each disk's RPO alert at `now` (see the module doc).
fn check_rpo(
    db: &mut ControlDb,
    now: i64,
    alerts: &mut HashMap<String, HashMap<String, Health>>,
) -> anyhow::Result<()> {
    for (disk, threshold, policy) in db.disks_with_rpo_threshold()? {
        let Some(lag) = disk.lag_secs(now) else {
            continue;
        };
        let threshold_i = i64::try_from(threshold).unwrap_or(i64::MAX);
        let level = if lag > threshold_i.saturating_mul(2) {
            Health::Red
        } else if lag > threshold_i {
            Health::Orange
        } else {
            Health::Green
        };
        let open = alerts.entry(disk.id.clone()).or_default();
        let before = open.get(RPO_ALERT).copied().unwrap_or(Health::Green);
        if before == level {
            continue;
        }
        if before != Health::Green {
            db.clear_alert(&disk.id, RPO_ALERT, now)?;
        }
        if level != Health::Green {
            let (severity, over) = if level == Health::Red {
                (Severity::Critical, "twice ")
            } else {
                (Severity::Warning, "")
            };
            let detail = format!(
                "{} ({}): lag {lag} s, over {over}the RPO threshold of {threshold} s ({})",
                disk.device,
                disk.machine,
                policy.map_or_else(|| "the default".to_owned(), |p| format!("policy {p}"))
            );
            tracing::warn!(disk = %disk.id, "{detail}");
            db.raise_alert(&disk.id, RPO_ALERT, severity, &detail, now)?;
        } else {
            tracing::info!(disk = %disk.id, device = disk.device, "lag back under the RPO threshold");
        }
        open.insert(RPO_ALERT.to_owned(), level);
    }
    Ok(())
}

/// The heartbeat, and each signal's alert following its level.
fn record_health(
    db: &mut ControlDb,
    server_id: &str,
    report: &HealthReport,
    alerts: &mut HashMap<String, Health>,
) -> anyhow::Result<()> {
    let at = (report.updated_unix_ms / 1000) as i64;
    db.heartbeat(server_id, at, report.level)?;
    if alerts
        .get(HEARTBEAT_ALERT)
        .is_some_and(|&h| h != Health::Green)
    {
        tracing::info!(server = %server_id, "process server reports again");
        db.clear_alert(server_id, HEARTBEAT_ALERT, at)?;
        alerts.insert(HEARTBEAT_ALERT.to_owned(), Health::Green);
    }
    if let Some(load) = report.load {
        db.record_load(
            server_id,
            &ripcord_control::ServerLoad {
                cpu_percent: load.cpu_percent,
                memory_percent: load.memory_percent,
                cache_free_percent: load.cache_free_percent,
            },
        )?;
    }
    for signal in &report.signals {
        let kind = format!("health-{}", signal.signal);
        let before = alerts.get(&kind).copied().unwrap_or(Health::Green);
        if before == signal.level {
            continue;
        }
        if before != Health::Green {
            db.clear_alert(server_id, &kind, at)?;
        }
        if signal.level != Health::Green {
            let severity = if signal.level == Health::Red {
                Severity::Critical
            } else {
                Severity::Warning
            };
            db.raise_alert(server_id, &kind, severity, &signal.detail, at)?;
        }
        alerts.insert(kind, signal.level);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::SignalReport;

    fn report(at_ms: u64, cache: Health, cpu: Health) -> HealthReport {
        let signal = |name: &str, level| SignalReport {
            signal: name.to_owned(),
            level,
            detail: format!("{name} is {level}"),
        };
        HealthReport {
            level: cache.max(cpu),
            signals: vec![signal("cache", cache), signal("cpu", cpu)],
            updated_unix_ms: at_ms,
            sample_ms: 1000,
            load: None,
        }
    }

    fn db_with_server(dir: &Path) -> ControlDb {
        let mut db = ControlDb::open(&db_path(dir)).unwrap();
        db.upsert_process_server(&ProcessServer {
            id: "ps1".into(),
            address: "ps1:9443".into(),
            version: "0".into(),
            cert_sha256: "00".into(),
            config_role: true,
            registered_at: 0,
            last_heartbeat: None,
            health: Health::Red,
            fingerprint: String::new(),
            load: None,
        })
        .unwrap();
        db
    }

    #[test]
    fn an_alert_follows_its_signal_and_survives_a_restart_of_the_server() {
        let tmp = tempfile::tempdir().unwrap();
        let mut db = db_with_server(tmp.path());
        let mut alerts = HashMap::new();
        let open = |db: &ControlDb| -> Vec<(String, String)> {
            db.open_alerts()
                .unwrap()
                .into_iter()
                .map(|a| (a.kind, a.severity))
                .collect()
        };
        record_health(
            &mut db,
            "ps1",
            &report(1000, Health::Green, Health::Green),
            &mut alerts,
        )
        .unwrap();
        assert!(open(&db).is_empty());
        record_health(
            &mut db,
            "ps1",
            &report(2000, Health::Orange, Health::Green),
            &mut alerts,
        )
        .unwrap();
        assert_eq!(open(&db), [("health-cache".into(), "warning".into())]);
        record_health(
            &mut db,
            "ps1",
            &report(3000, Health::Red, Health::Orange),
            &mut alerts,
        )
        .unwrap();
        assert_eq!(
            open(&db),
            [
                ("health-cache".into(), "critical".into()),
                ("health-cpu".into(), "warning".into())
            ],
            "the escalation did not replace the warning"
        );
        assert_eq!(db.process_servers().unwrap()[0].health, Health::Red);
        assert_eq!(db.process_servers().unwrap()[0].last_heartbeat, Some(3));
        drop(db);

        // A restarted server finds its open alerts and clears them once green.
        let db = ControlDb::open(&db_path(tmp.path())).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send((
            "ps1".to_owned(),
            Event::Health(report(4000, Health::Green, Health::Green)),
        ))
        .unwrap();
        drop(tx);
        apply_events(db, rx, Duration::from_secs(60));
        let db = ControlDb::open(&db_path(tmp.path())).unwrap();
        assert!(open(&db).is_empty(), "{:?}", open(&db));
        assert_eq!(db.all_alerts().unwrap().len(), 3);
        assert_eq!(db.process_servers().unwrap()[0].health, Health::Green);
    }

    #[test]
    fn a_lagging_disk_is_warned_then_critical_then_cleared_by_its_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let mut db = db_with_server(tmp.path());
        db.register_machine("db01", "aa", 0, "ps1").unwrap();
        let report = |last_point_at, current_at| ripcord_control::DiskReport {
            id: "d1".into(),
            machine: "db01".into(),
            device: "/dev/sdb".into(),
            size_bytes: 1,
            epoch: Some(1),
            acked_seq: Some(7),
            last_point_at: Some(last_point_at),
            current_at,
        };
        let mut alerts = HashMap::new();
        let rpo = |db: &ControlDb| -> Vec<(String, String)> {
            db.open_alerts()
                .unwrap()
                .into_iter()
                .filter(|a| a.kind == RPO_ALERT)
                .map(|a| (a.severity, a.message))
                .collect()
        };
        // The default threshold (900 s): a point 1000 s old is a warning, unless the
        // point has been current since (an idle disk).
        db.record_disks(&[report(0, None)]).unwrap();
        check_rpo(&mut db, 1000, &mut alerts).unwrap();
        let open = rpo(&db);
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].0, "warning");
        assert!(
            open[0].1.contains("lag 1000 s") && open[0].1.contains("900 s (the default)"),
            "{}",
            open[0].1
        );
        check_rpo(&mut db, 1001, &mut alerts).unwrap();
        assert_eq!(db.open_alerts().unwrap().len(), 1, "raised once");
        db.record_disks(&[report(0, Some(995))]).unwrap();
        check_rpo(&mut db, 1000, &mut alerts).unwrap();
        assert!(rpo(&db).is_empty(), "an idle disk's point is current");

        // A policy of 60 s: 200 s is over twice it, critical.
        db.set_policy(
            &ripcord_control::Policy {
                name: "gold".into(),
                rpo_threshold_secs: 60,
                retention_secs: 3600,
                app_interval_secs: 600,
            },
            "test",
            0,
        )
        .unwrap();
        db.assign_policy("db01", "gold", "test", 0).unwrap();
        check_rpo(&mut db, 1195, &mut alerts).unwrap();
        let open = rpo(&db);
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].0, "critical");
        assert!(open[0].1.contains("policy gold"), "{}", open[0].1);
        check_rpo(&mut db, 1000, &mut alerts).unwrap();
        assert!(rpo(&db).is_empty(), "cleared under the threshold");
        assert_eq!(db.all_alerts().unwrap().len(), 2);
    }

    #[test]
    fn a_silent_server_is_marked_red_once_and_cleared_by_its_next_report() {
        let tmp = tempfile::tempdir().unwrap();
        let mut db = db_with_server(tmp.path());
        let mut alerts = HashMap::new();
        let now = unix_now();
        let fresh = report((now as u64 - 5) * 1000, Health::Green, Health::Green);
        record_health(
            &mut db,
            "ps1",
            &fresh,
            alerts.entry("ps1".into()).or_default(),
        )
        .unwrap();
        mark_silent(&mut db, 10, &mut alerts).unwrap();
        assert_eq!(db.process_servers().unwrap()[0].health, Health::Green);
        assert!(db.open_alerts().unwrap().is_empty(), "within the window");

        let old = report((now as u64 - 30) * 1000, Health::Green, Health::Green);
        record_health(
            &mut db,
            "ps1",
            &old,
            alerts.entry("ps1".into()).or_default(),
        )
        .unwrap();
        mark_silent(&mut db, 10, &mut alerts).unwrap();
        mark_silent(&mut db, 10, &mut alerts).unwrap();
        assert_eq!(db.process_servers().unwrap()[0].health, Health::Red);
        let open = db.open_alerts().unwrap();
        assert_eq!(open.len(), 1, "raised once: {open:?}");
        assert_eq!(
            (open[0].kind.as_str(), open[0].severity.as_str()),
            (HEARTBEAT_ALERT, "critical")
        );
        assert!(
            open[0].message.contains("disconnected"),
            "{}",
            open[0].message
        );

        record_health(
            &mut db,
            "ps1",
            &fresh,
            alerts.entry("ps1".into()).or_default(),
        )
        .unwrap();
        assert_eq!(db.process_servers().unwrap()[0].health, Health::Green);
        assert!(db.open_alerts().unwrap().is_empty());
    }

    #[test]
    fn a_restarted_configuration_role_waits_a_window_before_calling_anyone_silent() {
        let tmp = tempfile::tempdir().unwrap();
        let mut db = db_with_server(tmp.path());
        let long_ago = report(1000, Health::Green, Health::Green);
        record_health(&mut db, "ps1", &long_ago, &mut HashMap::new()).unwrap();
        drop(db);
        let path = db_path(tmp.path());
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Event)>(4);
        let db = ControlDb::open(&path).unwrap();
        let thread = std::thread::spawn(move || apply_events(db, rx, Duration::from_secs(3)));
        let health = || {
            ControlDb::open_read_only(&path)
                .unwrap()
                .process_servers()
                .unwrap()[0]
                .health
        };
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(health(), Health::Green, "marked before a window had passed");
        std::thread::sleep(Duration::from_millis(3000));
        assert_eq!(health(), Health::Red, "not marked after the window");
        drop(tx);
        thread.join().unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking_the_sender() {
        // A queue nobody reads: the database thread stuck on a frozen disk.
        let (tx, _stuck) = std::sync::mpsc::sync_channel(QUEUE);
        let link = ControlLink {
            server_id: "ps1".into(),
            events: Mutex::new(Some(tx)),
            dropped: AtomicU64::new(0),
            thread: Mutex::new(None),
        };
        for _ in 0..QUEUE + 10 {
            link.send(Event::Disks(Vec::new()));
        }
        assert_eq!(link.dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn the_link_records_this_server_the_known_machines_and_new_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let link = ControlLink::start(
            tmp.path(),
            Identity {
                server_id: "ps1",
                address: "ps1:9443".into(),
                cert_sha256: "00".into(),
                fingerprint: String::new(),
                machines: vec![("m1".into(), "aa".into())],
            },
            Duration::from_secs(60),
        )
        .unwrap();
        link.send(Event::Machine {
            id: "m2".into(),
            cert_sha256: "bb".into(),
        });
        link.stop();
        let db = ControlDb::open(&db_path(tmp.path())).unwrap();
        let servers = db.process_servers().unwrap();
        assert_eq!((servers.len(), servers[0].config_role), (1, true));
        let machines: Vec<(String, Option<String>)> = db
            .machines()
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.process_server))
            .collect();
        assert_eq!(
            machines,
            [
                ("m1".into(), Some("ps1".into())),
                ("m2".into(), Some("ps1".into()))
            ]
        );
    }
}
