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
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use quinn::{RecvStream, SendStream};
use ripcord_proto::{
    DiskId, ErrorCode, ErrorMessage, Message, decode_frame, handshake::answer_hello,
};
use ripcord_transport::{
    MachineStore, Registrar, TokenStore, registration_endpoint, serve_registration, server_endpoint,
};
use tokio::sync::mpsc;

use crate::{
    deploy::{Deployment, machines_dir, tokens_dir},
    disk::{DiskCore, journal_config},
    metrics::Metrics,
    peers::Peers,
    registry::{ClaimError, Registry},
};

/// Most bytes buffered per stream while decoding frames.
const READ_CHUNK: usize = 4 << 20;

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
    store: Option<ripcord_store::Store>,
    pub metrics: Metrics,
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
        let core = tokio::task::spawn_blocking(move || DiskCore::open(&cache, disk, cfg)).await??;
        let core = Arc::new(Mutex::new(core));
        let uploader = self.store.clone().map(|store| {
            let (core, owner) = (Arc::clone(&core), owner.to_owned());
            let cfg = crate::uploader::UploadConfig {
                interval: std::time::Duration::from_millis(self.dep.config.upload_interval_ms),
                bytes: 32 << 20,
                retention: std::time::Duration::from_secs(self.dep.config.retention_secs),
                gc_interval: std::time::Duration::from_secs(self.dep.config.gc_interval_secs),
            };
            tokio::spawn(async move {
                loop {
                    let r = crate::uploader::run(
                        store.clone(),
                        disk,
                        owner.clone(),
                        Arc::clone(&core),
                        cfg,
                    )
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(disk = %disk, "upload failed: {e:#}; retrying in 2 s");
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            })
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
    let escrow_key = dep.escrow.public_key;
    let registry = Registry::open(&dep.dir.join("disks.json"))?;
    let tokens = TokenStore::open_or_create(&tokens_dir(&dep.dir))?;
    let machines = MachineStore::open(&machines_dir(&dep.dir))?;
    let data = server_endpoint(dep.config.listen, &dep.identity)
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
        machines,
        store,
        metrics: Metrics::new(),
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
                tracing::error!(disk = %disk, "disk quarantined: {e:#}");
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
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = connection(state, incoming).await {
                        tracing::info!(%remote, "connection ended: {e:#}");
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
    tracing::info!("shutting down");
    watcher.abort();
    data.close(0u32.into(), b"shutdown");
    register.close(0u32.into(), b"shutdown");
    data.wait_idle().await;
    Ok(())
}

/// Frame reader over a QUIC receive stream; keeps the raw bytes of each frame.
struct FrameReader {
    recv: RecvStream,
    buf: Vec<u8>,
    pos: usize,
}

impl FrameReader {
    fn new(recv: RecvStream) -> Self {
        FrameReader {
            recv,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// A frame already buffered, if any.
    fn buffered(&mut self) -> anyhow::Result<Option<(Message, Vec<u8>)>> {
        match decode_frame(&self.buf[self.pos..])? {
            Some((msg, used)) => {
                let raw = self.buf[self.pos..self.pos + used].to_vec();
                self.pos += used;
                Ok(Some((msg, raw)))
            }
            None => Ok(None),
        }
    }

    /// The next frame; `None` at the end of the stream.
    async fn next(&mut self) -> anyhow::Result<Option<(Message, Vec<u8>)>> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(Some(f));
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => bail!(
                    "stream ended inside a frame ({} bytes left)",
                    self.buf.len()
                ),
            }
        }
    }

    /// True if a whole frame is buffered (so the caller can batch without waiting).
    fn has_frame(&self) -> bool {
        matches!(decode_frame(&self.buf[self.pos..]), Ok(Some(_)) | Err(_))
    }
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

async fn connection(state: Arc<State>, incoming: quinn::Incoming) -> anyhow::Result<()> {
    // The handshake fails for peers without a certificate from our CA, and admission for
    // a certificate that is not its machine's current one: nothing of theirs is parsed.
    let conn = incoming.await.context("TLS handshake")?;
    let admitted = state.peers.admit(&conn).context("refused")?;
    let machine = admitted.machine.as_str().to_owned();
    state.metrics.connections.inc();
    let result = async {
        let (mut send, recv) = conn.accept_bi().await?;
        let mut reader = FrameReader::new(recv);
        let hello = match reader.next().await? {
            Some((Message::Hello(h), _)) => h,
            other => bail!(
                "expected Hello, got {:?}",
                other.map(|(m, _)| m.message_type())
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
            tokio::spawn(async move {
                if let Err(e) = disk_stream(state, machine.clone(), send, recv).await {
                    tracing::info!(%machine, "disk stream ended: {e:#}");
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
    recv: RecvStream,
) -> anyhow::Result<()> {
    let mut reader = FrameReader::new(recv);
    let (pd, raw) = match reader.next().await? {
        Some((Message::ProtectDisk(pd), raw)) => (pd, raw),
        other => {
            let got = other.map(|(m, _)| m.message_type());
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
    let (frames_tx, mut frames_rx) = mpsc::channel::<(Message, Vec<u8>)>(256);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let group_bytes = (state.dep.config.group_commit_mib << 20) as usize;
    let worker_state = Arc::clone(&state);
    let worker = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        while let Some(first) = frames_rx.blocking_recv() {
            let mut group = vec![first];
            let mut bytes = group[0].1.len();
            while bytes < group_bytes {
                match frames_rx.try_recv() {
                    Ok(f) => {
                        bytes += f.1.len();
                        group.push(f);
                    }
                    Err(_) => break,
                }
            }
            let mut core = core.lock().expect("disk lock");
            let applied = core.apply(&group)?;
            worker_state.metrics.observe(&disk_hex, &core);
            drop(core);
            for ack in applied.acks {
                let _ = out_tx.send(Message::Ack(ack));
            }
            if let Some(err) = applied.error {
                worker_state.metrics.errors.inc();
                let _ = out_tx.send(Message::Error(err));
                break;
            }
        }
        Ok(())
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
        loop {
            match reader.next().await {
                Ok(Some(frame)) => {
                    if frames_tx.send(frame).await.is_err() {
                        break;
                    }
                    // Hand over everything already buffered without awaiting more data.
                    while reader.has_frame() {
                        match reader.buffered() {
                            Ok(Some(frame)) => {
                                if frames_tx.send(frame).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(e),
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
