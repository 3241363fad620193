//! `ripcord-ps serve`: the server's shared state, its QUIC endpoints, its start checks and
//! its bounded stop. Each connection and disk stream is driven by `session`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use ripcord_proto::DiskId;
use ripcord_transport::{
    MachineStore, Registrar, TokenStore, TransportOptions,
    control::CONTROL_ALPN,
    endpoint::server_endpoint_with,
    register::{negotiated_alpn, serve_registration_connection},
    registration_endpoint,
};

use crate::{
    config::Role,
    control::{ControlLink, Event},
    deploy::{Deployment, machines_dir, tokens_dir},
    disk::{DiskCore, SharedDisk, journal_config},
    metrics::Metrics,
    peers::Peers,
    registry::Registry,
};

/// Unauthenticated handshakes in progress at once; more are refused until some finish.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// How long a registration or control handshake may take.
const REGISTER_HANDSHAKE: Duration = Duration::from_secs(10);

/// The next connection of `endpoint`, or never when there is none.
async fn accept(endpoint: Option<&quinn::Endpoint>) -> Option<quinn::Incoming> {
    match endpoint {
        Some(endpoint) => endpoint.accept().await,
        None => std::future::pending().await,
    }
}

/// How long a stopping server waits for its connections to close before it exits anyway
/// (what they held and was not acknowledged is sent again by their agents).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub(crate) struct DiskSlot {
    pub(crate) core: SharedDisk,
    /// Uploads this disk's journal to the target store (if one is configured); kept so
    /// the task lives as long as the slot.
    _uploader: Option<tokio::task::JoinHandle<()>>,
    /// The stream currently driving this disk; a new stream for the disk replaces it.
    pub(crate) driver: Option<tokio::task::AbortHandle>,
}

/// Shared server state.
pub struct State {
    pub(crate) dep: Deployment,
    pub(crate) escrow_key: [u8; 32],
    pub(crate) registry: Mutex<Registry>,
    pub(crate) disks: tokio::sync::Mutex<HashMap<DiskId, DiskSlot>>,
    pub(crate) tokens: TokenStore,
    pub(crate) machines: MachineStore,
    pub(crate) peers: Peers,
    /// Bytes of frames all connections may hold in memory (`max-inflight-mib`).
    pub(crate) inflight: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress (see [`MAX_PENDING_HANDSHAKES`]).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
    pub(crate) store: Option<ripcord_store::Store>,
    pub metrics: Metrics,
    /// Set when the server stops (see [`DiskCore::stop_waiting_when`]).
    pub(crate) stopping: Arc<AtomicBool>,
    /// The configuration database, when this server runs the config role.
    pub(crate) control: Option<ControlLink>,
    /// The live process of each server reporting to this configuration role.
    pub(crate) instances: crate::reporting::Instances,
    /// The reporter to the configuration role, when this server joined one.
    pub(crate) reporter: Option<crate::reporting::Reporter>,
    /// Each machine's consistency-group schedule (`crate::groups`).
    pub(crate) groups: tokio::sync::watch::Receiver<crate::groups::Schedules>,
    /// Each machine's policy settings (`crate::policies`).
    pub(crate) policies: tokio::sync::watch::Receiver<crate::policies::Policies>,
}

impl State {
    /// Open (or return) a disk's journal, starting its uploader once; `device` is the
    /// owner's name for the disk, if known.
    pub(crate) async fn disk_core(
        self: &Arc<Self>,
        disk: DiskId,
        owner: &str,
        device: Option<&str>,
    ) -> anyhow::Result<SharedDisk> {
        let mut disks = self.disks.lock().await;
        if let Some(slot) = disks.get(&disk) {
            return Ok(slot.core.clone());
        }
        let cache = self.dep.config.cache_dir(&self.dep.dir);
        let cfg = journal_config(&self.dep.config);
        let mut core =
            tokio::task::spawn_blocking(move || DiskCore::open(&cache, disk, cfg)).await??;
        core.stop_waiting_when(Arc::clone(&self.stopping));
        core.device = device.map(str::to_owned);
        core.space_held = self.metrics.space_held(&disk.to_string(), owner);
        self.metrics.disk_info(&disk.to_string(), owner, device);
        let core = SharedDisk::new(core);
        let uploader = self.store.clone().map(|store| {
            let config = &self.dep.config;
            let cfg = crate::uploader::UploadConfig {
                interval: Duration::from_millis(config.upload_interval_ms),
                bytes: 32 << 20,
                retention: Duration::from_secs(config.retention_secs),
                gc_interval: Duration::from_secs(config.gc_interval_secs),
                point_age_warn: Duration::from_secs(config.point_age_warn_secs),
            };
            let status = self.metrics.upload_status(&disk.to_string(), owner);
            tokio::spawn(crate::uploader::supervise(
                store,
                disk,
                owner.to_owned(),
                core.clone(),
                cfg,
                status,
                self.policies.clone(),
            ))
        });
        disks.insert(
            disk,
            DiskSlot {
                core: core.clone(),
                _uploader: uploader,
                driver: None,
            },
        );
        Ok(core)
    }
}

/// Samples the health signals until aborted (see [`crate::health`]): publishes each
/// report as metrics and in `health.json`, and logs every change of level.
async fn watch_health(state: Arc<State>) {
    let cfg = state.dep.config.health.clone();
    let mut sampler = crate::health::Sampler::new(state.dep.config.cache_dir(&state.dep.dir));
    let mut monitor = crate::health::Monitor::new(cfg.clone(), state.store.is_some());
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.sample_ms));
    let mut level = None;
    let mut failed = false;
    loop {
        tick.tick().await;
        let sample = match sampler.sample(state.metrics.upload_failing_for()) {
            Ok(s) => s,
            Err(e) => {
                if !std::mem::replace(&mut failed, true) {
                    tracing::warn!("health: {}", ripcord_types::report(e.as_ref()));
                }
                continue;
            }
        };
        failed = false;
        let report = monitor.push(std::time::Instant::now(), sample);
        crate::health::log_change(level, &report);
        level = Some(report.level);
        state.metrics.set_health(&report);
        if let Some(control) = &state.control {
            control.send(Event::Health(report.clone()));
            control.send(Event::Disks(disk_reports(&state)));
        }
        if let Some(reporter) = &state.reporter {
            reporter.send(crate::reporting::ReportBody {
                health: Some(report.clone()),
                disks: disk_reports(&state),
            });
        }
        if let Err(e) = crate::health::write_report(&state.dep.dir, &report) {
            tracing::warn!("health: {e:#}");
        }
    }
}

/// The disks this server holds, for the configuration database: what the metrics show,
/// with each disk's size from the registry. Empty while a claim holds the registry (it
/// may be waiting on a slow or frozen disk, and this runs on a runtime worker); the next
/// health tick reports again.
fn disk_reports(state: &State) -> Vec<ripcord_control::DiskReport> {
    let Ok(registry) = state.registry.try_lock() else {
        return Vec::new();
    };
    state
        .metrics
        .disk_states()
        .into_iter()
        .map(|d| {
            let size_bytes = d
                .disk
                .parse::<DiskId>()
                .ok()
                .and_then(|id| registry.get(&id).map(|r| r.size_bytes))
                .unwrap_or(0);
            let unix = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64)
            };
            ripcord_control::DiskReport {
                last_point_at: d.newest_point_at.map(unix),
                current_at: d.current_as_of.map(unix),
                id: d.disk,
                machine: d.machine,
                device: d.device,
                size_bytes,
                epoch: d.epoch,
                acked_seq: d.durable_seq,
            }
        })
        .collect()
}

/// Opens the configuration database if this server runs the config role.
fn start_control(
    dep: &Deployment,
    machines: &MachineStore,
    data_addr: std::net::SocketAddr,
) -> anyhow::Result<Option<ControlLink>> {
    if !dep.config.runs(Role::Config) {
        return Ok(None);
    }
    let known = machines
        .list()
        .context("listing the registered machines for the configuration database")?
        .into_iter()
        .map(|m| (m.machine_id.to_string(), hex::encode(m.cert_sha256)))
        .collect();
    let cert = dep
        .identity
        .cert_chain()
        .first()
        .context("the server identity has no certificate")?;
    let link = ControlLink::start(
        &dep.dir,
        crate::control::Identity {
            server_id: &dep.config.server_id,
            address: format!(
                "{}:{}",
                dep.identity
                    .names()
                    .first()
                    .map_or(dep.config.server_id.as_str(), String::as_str),
                data_addr.port()
            ),
            cert_sha256: hex::encode(ripcord_transport::pki::sha256(cert)),
            fingerprint: crate::join::fingerprint(&dep.dir)?,
            machines: known,
        },
        Duration::from_secs(dep.config.health.heartbeat_window_secs),
    )?;
    Ok(Some(link))
}

/// Run until `shutdown` resolves.
pub async fn serve(
    dep: Deployment,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    check_cache_size(&dep)?;
    let escrow_key = dep.escrow.public_key;
    let registry = Registry::open(&dep.dir.join("disks.json"))?;
    let tokens = TokenStore::open_or_create(&tokens_dir(&dep.dir))?;
    let machines = MachineStore::open(&machines_dir(&dep.dir))?;
    // Smaller receive windows than an agent's defaults: what a peer can make this server
    // buffer before the journal takes it is bounded per connection (see `frames`).
    let options = TransportOptions {
        stream_receive_window: 16 << 20,
        receive_window: 24 << 20,
        ..TransportOptions::default()
    };
    let data = server_endpoint_with(dep.config.listen, &dep.identity, &options)
        .with_context(|| format!("binding the data endpoint on {}", dep.config.listen))?;
    // Agents register where the CA key is; a server that joined a deployment has none.
    let register = match dep.ca {
        Some(_) => Some(
            registration_endpoint(dep.config.register_listen, &dep.identity).with_context(
                || {
                    format!(
                        "binding the registration endpoint on {}",
                        dep.config.register_listen
                    )
                },
            )?,
        ),
        None => None,
    };
    let reporter = match &dep.config.config_role {
        Some(config_role) => Some(
            crate::reporting::start_reporting(
                config_role,
                &dep.identity,
                crate::join::fingerprint(&dep.dir)?,
                machines.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let store = match &dep.config.target {
        Some(url) => {
            let store = ripcord_store::Store::open(url)
                .await
                .with_context(|| format!("opening the target store {url}"))?;
            // The disaster rule: the store alone (plus the passphrase) must suffice.
            crate::deploy::claim_store_escrow(&store, url, &dep.escrow).await?;
            Some(store)
        }
        None => None,
    };
    let existing: Vec<(DiskId, String, Option<String>)> = registry
        .iter()
        .filter_map(|(hex, rec)| {
            let disk = hex.parse::<DiskId>().ok()?;
            Some((disk, rec.owner.clone(), rec.device.clone()))
        })
        .collect();
    let control = start_control(&dep, &machines, data.local_addr()?)?;
    let (groups, policies) = if control.is_some() {
        let db = crate::control::db_path(&dep.dir);
        (
            crate::groups::watch_control_db(&db),
            crate::policies::watch_control_db(&db),
        )
    } else if let Some(reporter) = &reporter {
        (reporter.groups.clone(), reporter.policies.clone())
    } else {
        (crate::groups::unscheduled(), crate::policies::none())
    };
    let state = Arc::new(State {
        groups,
        policies,
        control,
        instances: crate::reporting::Instances::default(),
        reporter,
        escrow_key,
        registry: Mutex::new(registry),
        disks: tokio::sync::Mutex::new(HashMap::new()),
        tokens,
        peers: Peers::new(machines.clone()),
        inflight: Arc::new(tokio::sync::Semaphore::new(
            (dep.config.max_inflight_mib as usize) << 20,
        )),
        handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES)),
        machines,
        store,
        metrics: Metrics::new(),
        stopping: Arc::new(AtomicBool::new(false)),
        dep,
    });
    // Journals left from before a restart keep uploading without waiting for their agent.
    if state.store.is_some() {
        let cache = state.dep.config.cache_dir(&state.dep.dir);
        for (disk, owner, device) in existing {
            // A journal that cannot be opened quarantines its disk only: each stream of
            // that disk fails opening it again, with the same error, until it is repaired.
            if crate::disk::journal_dir(&cache, &disk).exists()
                && let Err(e) = state.disk_core(disk, &owner, device.as_deref()).await
            {
                tracing::error!(
                    disk = %disk, device = device.as_deref().unwrap_or("?"), machine = owner,
                    "disk quarantined: {}", ripcord_types::report(e.as_ref())
                );
            }
        }
    }
    let watcher = {
        let state = Arc::clone(&state);
        tokio::spawn(async move { state.peers.watch().await })
    };
    if let Some(addr) = state.dep.config.metrics_listen {
        crate::metrics::spawn_http(addr, Arc::clone(&state))?;
    }
    let health = tokio::spawn(watch_health(Arc::clone(&state)));
    match &register {
        Some(register) => tracing::info!(
            data = %data.local_addr()?, register = %register.local_addr()?,
            "ripcord-ps serving"
        ),
        None => {
            tracing::info!(data = %data.local_addr()?, "ripcord-ps serving (registers no agents: joined a deployment)")
        }
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(incoming) = data.accept() => {
                // A spoofed source address costs us one Retry packet, never a handshake.
                if !incoming.remote_address_validated() && incoming.may_retry() {
                    let _ = incoming.retry();
                    continue;
                }
                let Ok(handshake) = Arc::clone(&state.handshakes).try_acquire_owned() else {
                    tracing::warn!(
                        remote = %incoming.remote_address(),
                        "{MAX_PENDING_HANDSHAKES} handshakes already in progress; refusing"
                    );
                    incoming.refuse();
                    continue;
                };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = crate::session::connection(state, incoming, handshake).await {
                        tracing::info!(%remote, "connection ended: {}", ripcord_types::report(e.as_ref()));
                    }
                });
            }
            Some(incoming) = accept(register.as_ref()) => {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    let conn = match tokio::time::timeout(REGISTER_HANDSHAKE, incoming).await {
                        Ok(Ok(conn)) => conn,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, "registration handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "registration handshake timed out");
                            return;
                        }
                    };
                    if negotiated_alpn(&conn) == CONTROL_ALPN {
                        if state.control.is_some() {
                            crate::reporting::serve_control(state, conn).await;
                        } else {
                            conn.close(1u32.into(), b"this server does not run the config role");
                        }
                        return;
                    }
                    let Some(ca) = state.dep.ca.as_ref() else {
                        return;
                    };
                    // The configuration role places each machine (and records it before
                    // the agent is answered); a server without it keeps its machines.
                    let placer = state.control.is_some().then(|| crate::placement::Placer {
                        db: crate::control::db_path(&state.dep.dir),
                        own_id: state.dep.config.server_id.clone(),
                        heartbeat_window_secs: state.dep.config.health.heartbeat_window_secs
                            as i64,
                    });
                    let registrar = Registrar {
                        ca,
                        tokens: &state.tokens,
                        machines: &state.machines,
                        escrow_key: state.escrow_key,
                        data_port: state.dep.config.listen.port(),
                        client_validity: Duration::from_secs(state.dep.config.client_cert_secs),
                        placement: placer.as_ref().map(|p| p as &dyn ripcord_transport::Placement),
                    };
                    // serve_registration_connection logs the outcome.
                    if let Ok(registered) = serve_registration_connection(conn, &registrar).await
                        && let Some(placed) = &registered.placed
                        && placed.data_server.is_some()
                    {
                        tracing::info!(
                            machine = %registered.machine_id, server = placed.server_id,
                            "machine placed on another process server"
                        );
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    stop(&state, &data, register.as_ref()).await;
    watcher.abort();
    health.abort();
    let st = Arc::clone(&state);
    tokio::task::spawn_blocking(move || {
        if let Some(control) = &st.control {
            control.stop();
        }
    })
    .await
    .context("stopping the configuration database thread")?;
    Ok(())
}

/// Refuses a cache file system too small to ever leave `min-free-mib` free (acknowledgements
/// could never be given), and warns when it starts below its thresholds.
fn check_cache_size(dep: &Deployment) -> anyhow::Result<()> {
    let cache = dep.config.cache_dir(&dep.dir);
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cfg = journal_config(&dep.config);
    let space = ripcord_journal::space_status(&cache, &cfg.space)?;
    let needed = cfg.space.min_free_bytes + cfg.segment_size;
    if space.total_bytes <= needed {
        bail!(
            "the cache file system at {} holds {} MiB in all, but min-free-mib ({}) plus one \
             journal segment ({} MiB) must stay free: no write could ever be acknowledged. \
             Use a larger cache disk (cache-dir) or lower min-free-mib in ps.toml",
            cache.display(),
            space.total_bytes >> 20,
            dep.config.min_free_mib,
            dep.config.segment_mib
        );
    }
    if !space.accepting() {
        tracing::warn!(
            "the cache file system at {} has {} MiB ({:.1}%) free, under min-free-mib ({}) or \
             min-free-percent ({}): writes are not acknowledged until space is freed",
            cache.display(),
            space.free_bytes >> 20,
            space.free_percent,
            dep.config.min_free_mib,
            dep.config.min_free_percent
        );
    }
    Ok(())
}

/// Stops within [`SHUTDOWN_GRACE`]: waits for cache space end at once (see
/// [`DiskCore::stop_waiting_when`]), connections are closed, and what is still in flight
/// is named in the log. Everything acknowledged is already durable in the journals.
async fn stop(state: &State, data: &quinn::Endpoint, register: Option<&quinn::Endpoint>) {
    let in_flight_mib = |state: &State| {
        let max = (state.dep.config.max_inflight_mib as usize) << 20;
        (max - state.inflight.available_permits().min(max)) >> 20
    };
    tracing::info!(
        connections = data.open_connections(),
        "shutting down: {} MiB received and not yet journaled will not be acknowledged \
         (their agents send them again)",
        in_flight_mib(state)
    );
    state.stopping.store(true, Ordering::Relaxed);
    data.close(0u32.into(), b"shutdown");
    if let Some(register) = register {
        register.close(0u32.into(), b"shutdown");
    }
    let idle = async {
        tokio::join!(data.wait_idle(), async {
            if let Some(register) = register {
                register.wait_idle().await;
            }
        });
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, idle).await.is_err() {
        tracing::warn!(
            connections = data.open_connections(),
            "connections did not close within {} s; stopping anyway",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    tracing::info!("stopped");
}
