//! `ripcord-ps serve`: the QUIC endpoints and the per-connection, per-disk drivers around
//! the sans-IO receiver.
//!
//! A connection (mutual TLS; the peer's machine id comes from its certificate) opens a
//! control stream (Hello / HelloAck) and then one bidirectional stream per disk:
//! ProtectDisk, then Batch and Cut frames one way and Acks the other. A blocking worker per
//! stream journals frames in groups with one fdatasync per group (group commit) and sends
//! the acks the receiver releases.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use quinn::SendStream;
use ripcord_proto::{DiskId, ErrorCode, ErrorMessage, Message, handshake::answer_hello};
use ripcord_transport::{
    MachineStore, Registrar, TokenStore, TransportOptions, endpoint::server_endpoint_with,
    registration_endpoint, serve_registration,
};
use tokio::sync::mpsc;

use crate::{
    deploy::{Deployment, machines_dir, tokens_dir},
    disk::{DiskCore, journal_config},
    frames::{Budget, FrameReader, Received},
    metrics::Metrics,
    peers::Peers,
    registry::{ClaimError, Registry},
};

/// Unauthenticated handshakes in progress at once; more are refused until some finish.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// How long a stopping server waits for its connections to close before it exits anyway
/// (what they held and was not acknowledged is sent again by their agents).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

struct DiskSlot {
    core: Arc<Mutex<DiskCore>>,
    /// Uploads this disk's journal to the target store (if one is configured); kept so
    /// the task lives as long as the slot.
    _uploader: Option<tokio::task::JoinHandle<()>>,
    /// The stream currently driving this disk; a new stream for the disk replaces it.
    driver: Option<tokio::task::AbortHandle>,
}

/// Shared server state.
pub struct State {
    dep: Deployment,
    escrow_key: [u8; 32],
    registry: Mutex<Registry>,
    disks: tokio::sync::Mutex<HashMap<DiskId, DiskSlot>>,
    tokens: TokenStore,
    machines: MachineStore,
    peers: Peers,
    /// Bytes of frames all connections may hold in memory (`max-inflight-mib`).
    inflight: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress (see [`MAX_PENDING_HANDSHAKES`]).
    handshakes: Arc<tokio::sync::Semaphore>,
    store: Option<ripcord_store::Store>,
    pub metrics: Metrics,
    /// Set when the server stops (see [`DiskCore::stop_waiting_when`]).
    stopping: Arc<AtomicBool>,
}

impl State {
    /// Open (or return) a disk's journal, starting its uploader once.
    async fn disk_core(
        self: &Arc<Self>,
        disk: DiskId,
        owner: &str,
    ) -> anyhow::Result<Arc<Mutex<DiskCore>>> {
        let mut disks = self.disks.lock().await;
        if let Some(slot) = disks.get(&disk) {
            return Ok(Arc::clone(&slot.core));
        }
        let cache = self.dep.config.cache_dir(&self.dep.dir);
        let cfg = journal_config(&self.dep.config);
        let mut core =
            tokio::task::spawn_blocking(move || DiskCore::open(&cache, disk, cfg)).await??;
        core.stop_waiting_when(Arc::clone(&self.stopping));
        let core = Arc::new(Mutex::new(core));
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
                Arc::clone(&core),
                cfg,
                status,
            ))
        });
        disks.insert(
            disk,
            DiskSlot {
                core: Arc::clone(&core),
                _uploader: uploader,
                driver: None,
            },
        );
        Ok(core)
    }
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
    let register =
        registration_endpoint(dep.config.register_listen, &dep.identity).with_context(|| {
            format!(
                "binding the registration endpoint on {}",
                dep.config.register_listen
            )
        })?;
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
    let existing: Vec<(DiskId, String)> = registry
        .iter()
        .filter_map(|(hex, rec)| Some((hex.parse::<DiskId>().ok()?, rec.owner.clone())))
        .collect();
    let state = Arc::new(State {
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
        for (disk, owner) in existing {
            // A journal that cannot be opened quarantines its disk only: each stream of
            // that disk fails opening it again, with the same error, until it is repaired.
            if crate::disk::journal_dir(&cache, &disk).exists()
                && let Err(e) = state.disk_core(disk, &owner).await
            {
                tracing::error!(
                    disk = %disk, machine = owner,
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
    tracing::info!(
        data = %data.local_addr()?, register = %register.local_addr()?,
        "ripcord-ps serving"
    );
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
                    if let Err(e) = connection(state, incoming, handshake).await {
                        tracing::info!(%remote, "connection ended: {}", ripcord_types::report(e.as_ref()));
                    }
                });
            }
            Some(incoming) = register.accept() => {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let registrar = Registrar {
                        ca: &state.dep.ca,
                        tokens: &state.tokens,
                        machines: &state.machines,
                        escrow_key: state.escrow_key,
                        data_port: state.dep.config.listen.port(),
                        client_validity: Duration::from_secs(state.dep.config.client_cert_secs),
                    };
                    // serve_registration logs the outcome.
                    let _ = serve_registration(incoming, &registrar).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    stop(&state, &data, &register).await;
    watcher.abort();
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
async fn stop(state: &State, data: &quinn::Endpoint, register: &quinn::Endpoint) {
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
    register.close(0u32.into(), b"shutdown");
    let idle = async {
        tokio::join!(data.wait_idle(), register.wait_idle());
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

async fn send_message(send: &mut SendStream, msg: &Message) -> anyhow::Result<()> {
    let frame = msg.to_frame()?;
    send.write_all(&frame).await?;
    Ok(())
}

async fn refuse(send: &mut SendStream, code: ErrorCode, disk: Option<DiskId>, message: String) {
    let msg = Message::Error(ErrorMessage {
        code,
        disk_id: disk,
        message,
    });
    let _ = send_message(send, &msg).await;
    let _ = send.finish();
}

async fn connection(
    state: Arc<State>,
    incoming: quinn::Incoming,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    // The handshake fails for peers without a certificate from our CA, and admission for
    // a certificate that is not its machine's current one: nothing of theirs is parsed.
    let conn = incoming.await.context("TLS handshake");
    drop(handshake);
    let conn = conn?;
    let admitted = state.peers.admit(&conn).context("refused")?;
    let budget = Budget::for_connection(&state.inflight);
    let machine = admitted.machine.as_str().to_owned();
    state.metrics.connections.inc();
    let result = async {
        let (mut send, recv) = conn.accept_bi().await?;
        let mut reader = FrameReader::new(recv, budget.clone());
        let hello = match reader.next().await? {
            Some(Received {
                msg: Message::Hello(h),
                ..
            }) => h,
            other => bail!(
                "expected Hello, got {:?}",
                other.map(|r| r.msg.message_type())
            ),
        };
        if hello.machine_id != machine {
            refuse(
                &mut send,
                ErrorCode::NotOwner,
                None,
                format!(
                    "hello names machine {:?} but the certificate is for {machine:?}",
                    hello.machine_id
                ),
            )
            .await;
            bail!("machine id mismatch");
        }
        match answer_hello(&hello, &state.dep.config.server_id, state.escrow_key) {
            Ok(ack) => send_message(&mut send, &ack).await?,
            Err((e, msg)) => {
                let _ = send_message(&mut send, &msg).await;
                bail!("{e}");
            }
        }
        tracing::info!(%machine, agent = %hello.agent_version, "agent connected");
        loop {
            let (send, recv) = conn.accept_bi().await?;
            let state = Arc::clone(&state);
            let machine = machine.clone();
            let reader = FrameReader::new(recv, budget.clone());
            tokio::spawn(async move {
                if let Err(e) = disk_stream(state, machine.clone(), send, reader).await {
                    tracing::info!(%machine, "disk stream ended: {}", ripcord_types::report(e.as_ref()));
                }
            });
        }
    }
    .await;
    state.metrics.connections.dec();
    result
}

async fn disk_stream(
    state: Arc<State>,
    machine: String,
    mut send: SendStream,
    mut reader: FrameReader,
) -> anyhow::Result<()> {
    let (pd, raw) = match reader.next().await? {
        Some(Received {
            msg: Message::ProtectDisk(pd),
            raw,
            ..
        }) => (pd, raw),
        other => {
            let got = other.map(|r| r.msg.message_type());
            refuse(
                &mut send,
                ErrorCode::BadFrame,
                None,
                format!("expected ProtectDisk, got {got:?}"),
            )
            .await;
            bail!("expected ProtectDisk");
        }
    };
    let disk = pd.disk_id;
    let disk_hex = disk.to_string();
    // Nothing of a malformed ProtectDisk reaches the registry or the journal.
    if let Err(why) = crate::ingest::check_protect(&pd) {
        state.metrics.errors.inc();
        refuse(&mut send, ErrorCode::BadFrame, Some(disk), why.clone()).await;
        bail!("ProtectDisk refused: {why}");
    }
    // Ownership first: a machine may only write its own disks.
    let claim = state
        .registry
        .lock()
        .expect("registry lock")
        .claim(&machine, &pd);
    match claim {
        Ok(()) => {}
        Err(e @ ClaimError::NotOwner { .. }) => {
            state.metrics.errors.inc();
            refuse(&mut send, ErrorCode::NotOwner, Some(disk), e.to_string()).await;
            bail!("{e}");
        }
        Err(e @ ClaimError::TooManyDisks { .. }) => {
            state.metrics.errors.inc();
            refuse(
                &mut send,
                ErrorCode::Backpressure,
                Some(disk),
                e.to_string(),
            )
            .await;
            bail!("{e}");
        }
        Err(e) => return Err(e.into()),
    }

    let core = state.disk_core(disk, &machine).await?;
    if let Some(old) = state
        .disks
        .lock()
        .await
        .get_mut(&disk)
        .and_then(|s| s.driver.take())
    {
        old.abort();
    }

    let reply = {
        let core = Arc::clone(&core);
        let pd = pd.clone();
        tokio::task::spawn_blocking(move || core.lock().expect("disk lock").protect(&pd, &raw))
            .await??
    };
    match reply {
        Ok(accepted) => send_message(&mut send, &Message::DiskAccepted(accepted)).await?,
        Err(err) => {
            let _ = send_message(&mut send, &Message::Error(err)).await;
            bail!("ProtectDisk refused");
        }
    }
    tracing::info!(%machine, disk = %disk_hex, epoch = pd.epoch, "disk stream open");

    // Worker: journals groups of frames, one fdatasync per group, emits acks.
    // Frames wait here with their memory reserved (see `frames`): bounded in bytes.
    let (frames_tx, mut frames_rx) = mpsc::channel::<Received>(256);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let group_bytes = (state.dep.config.group_commit_mib << 20) as usize;
    let worker_state = Arc::clone(&state);
    let worker_machine = machine.clone();
    // The worker waits for frames without holding a thread; a blocking thread is taken
    // only while a group is journaled (write + fdatasync).
    let worker = tokio::spawn(async move {
        while let Some(first) = frames_rx.recv().await {
            let mut bytes = first.raw.len();
            let mut group = vec![(first.msg, first.raw)];
            let mut reserved = vec![first.budget];
            while bytes < group_bytes {
                match frames_rx.try_recv() {
                    Ok(f) => {
                        bytes += f.raw.len();
                        group.push((f.msg, f.raw));
                        reserved.push(f.budget);
                    }
                    Err(_) => break,
                }
            }
            let (core, state, disk_hex, machine) = (
                Arc::clone(&core),
                Arc::clone(&worker_state),
                disk_hex.clone(),
                worker_machine.clone(),
            );
            let applied = tokio::task::spawn_blocking(move || {
                let mut core = core.lock().expect("disk lock");
                let applied = core.apply(&group);
                state.metrics.observe(&disk_hex, &machine, &core);
                applied
            })
            .await??;
            // Journaled: their memory is free for the next frames.
            drop(reserved);
            for ack in applied.acks {
                let _ = out_tx.send(Message::Ack(ack));
            }
            if let Some(err) = applied.error {
                worker_state.metrics.errors.inc();
                let _ = out_tx.send(Message::Error(err));
                break;
            }
        }
        Ok::<(), anyhow::Error>(())
    });
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            let is_error = matches!(msg, Message::Error(_));
            if send_message(&mut send, &msg).await.is_err() || is_error {
                let _ = send.finish();
                break;
            }
        }
    });

    let reader_task = tokio::spawn(async move {
        while let Some(frame) = reader.next().await? {
            if frames_tx.send(frame).await.is_err() {
                break;
            }
        }
        Ok::<(), anyhow::Error>(())
    });
    {
        let mut disks = state.disks.lock().await;
        if let Some(slot) = disks.get_mut(&disk) {
            slot.driver = Some(reader_task.abort_handle());
        }
    }
    let read_result = reader_task.await;
    let worker_result = worker.await;
    // The worker dropped its sender: the writer sends the last acks and ends.
    let _ = writer.await;
    match read_result {
        Ok(r) => r?,
        Err(e) if e.is_cancelled() => {
            tracing::info!(disk = %disk, "stream replaced by a newer one")
        }
        Err(e) => return Err(e.into()),
    }
    worker_result??;
    Ok(())
}
