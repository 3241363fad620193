//! The replication pipeline's network side: one QUIC connection (mutual TLS) to the
//! process server, a control stream (Hello), and one stream per disk driving the sans-IO
//! [`Sender`]: push sealed batches while the window allows, resend from the server's
//! durable position after a reconnect, and record acknowledgement lag.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use quinn::{Connection, RecvStream, SendStream};
use ripcord_proto::{
    DiskId, ErrorCode, Hello, Message, PROTOCOL_VERSION, PushError, Sender, SenderConfig,
    SenderEvent, aead, decode_frame, describe_received, handshake::check_hello_ack,
};
use ripcord_seal::{DataKey, escrow::wrap_data_key};
use ripcord_transport::{
    CLOSE_CERTIFICATE_REFUSED, TransportOptions, connect, endpoint::client_endpoint_with,
};
use tokio::sync::mpsc;

use super::{
    acked_map::SharedAckedMap, group::SharedGroupClock, pipeline::Outgoing, renew::MachineIdentity,
};

mod control;
mod open;
use crate::clock::now_mono_ns;

/// A refusal that reconnecting will not fix (the agent stops).
#[derive(Debug, thiserror::Error)]
#[error("the process server refused disk {disk} ({code}): {message}")]
pub struct Refused {
    pub disk: String,
    pub code: ErrorCode,
    pub message: String,
}

/// The session cannot be trusted or will never be accepted: the agent stops rather than
/// retry.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// The server's hello carries an escrow key other than the one pinned at
    /// registration: a compromised or foreign process server would learn every data key
    /// wrapped to it.
    #[error(
        "the process server at {server} presented escrow key {presented}, but registration \
         pinned {pinned}: refusing to hand it any data key (a compromised or foreign \
         server?). If the deployment really changed, register this machine again"
    )]
    EscrowKeyMismatch {
        server: SocketAddr,
        presented: String,
        pinned: String,
    },
    /// The server refused this machine's certificate (removed by an operator, or
    /// superseded by a newer certificate that this agent did not make).
    #[error("the process server refused this machine's certificate: {reason}")]
    CertificateRefused { reason: String },
    /// The certificate expired (the message says what to do).
    #[error("{0:#}")]
    CertificateExpired(anyhow::Error),
}

/// Acknowledged-durable counters of one disk, shared with the stats writer.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub pushed_seq: AtomicU64,
    pub acked_seq: AtomicU64,
    pub acked_cuts: AtomicU64,
    pub reconnects: AtomicU64,
    /// Sealed bytes handed to the network side and not yet acknowledged durable.
    pub unacked_bytes: AtomicU64,
    /// Lag samples: write completion to durable on the server, in microseconds.
    pub lag_us: Mutex<Vec<u64>>,
    /// What the server last said about the disk's recovery points in the target store.
    pub store: Mutex<Option<ripcord_proto::StoreStatus>>,
}

impl LinkStats {
    /// Takes the server's news about the target store, saying so when uploads begin to
    /// fail (no new recovery points) or work again.
    fn store_status(&self, disk: &str, now: ripcord_proto::StoreStatus) {
        let mut last = self.store.lock().expect("store status lock");
        let was_failing = last.as_ref().is_some_and(|s| !s.failure.is_empty());
        if !now.failure.is_empty() && last.as_ref().is_none_or(|s| s.failure != now.failure) {
            tracing::warn!(
                disk,
                "the process server cannot upload this disk's data to the target store, so \
                 no new recovery points are made (the newest is {} s old); its data stays \
                 durable on the server meanwhile: {}",
                now.point_age_secs,
                now.failure
            );
        } else if now.failure.is_empty() && was_failing {
            tracing::info!(
                disk,
                "the process server uploads again: recovery points are being made (newest: \
                 cut {} of epoch {})",
                now.committed_cut_id,
                now.epoch
            );
        }
        *last = Some(now);
    }
}

/// How a continued epoch's stream opened, shared with the producer side: it seals
/// nothing before the server says where the epoch goes on.
#[derive(Debug, Default)]
pub struct Continuation {
    /// The first sequence this process seals (the server's `EpochContinued`).
    pub start: std::sync::OnceLock<u64>,
    /// Why the server cannot continue the epoch (a new epoch must start).
    pub refused: std::sync::OnceLock<String>,
}

/// One disk's stream state, kept across reconnects.
pub struct DiskLink {
    pub disk: DiskId,
    /// The device path the disk is protected as, told to servers of protocol 3 on (for
    /// their logs, metrics and recovery point lists; empty: not told).
    pub device: String,
    pub epoch: u64,
    pub size_bytes: u64,
    pub sector_size: u32,
    key: Arc<DataKey>,
    wrapped_key: Option<Vec<u8>>,
    sender: Sender,
    sender_config: SenderConfig,
    /// Set when this process continues the epoch (the agent restarted): the stream opens
    /// with `ContinueEpoch`, and the sender starts where the server is.
    pub continuation: Option<Arc<Continuation>>,
    /// Told every acknowledgement (see `acked_map`).
    pub acked: Option<SharedAckedMap>,
    rx: mpsc::Receiver<Outgoing>,
    pending: Option<Outgoing>,
    rx_closed: bool,
    /// (last_seq, oldest change time) of sent batches, for lag.
    lag: VecDeque<(u64, u64)>,
    /// (last_seq, sealed bytes) of batches pushed and not yet acknowledged.
    unacked: VecDeque<(u64, u64)>,
    pub stats: Arc<LinkStats>,
}

impl DiskLink {
    pub fn new(
        disk: DiskId,
        epoch: u64,
        size_bytes: u64,
        sector_size: u32,
        key: Arc<DataKey>,
        window_bytes: usize,
        rx: mpsc::Receiver<Outgoing>,
    ) -> DiskLink {
        let config = SenderConfig {
            max_inflight_bytes: window_bytes * 2 / 3,
            max_buffered_bytes: window_bytes,
            ack_timeout: Duration::from_secs(15),
            ..SenderConfig::default()
        };
        DiskLink {
            disk,
            device: String::new(),
            epoch,
            size_bytes,
            sector_size,
            key,
            wrapped_key: None,
            sender: Sender::new(disk, epoch, config.clone()),
            sender_config: config,
            continuation: None,
            acked: None,
            rx,
            pending: None,
            rx_closed: false,
            lag: VecDeque::new(),
            unacked: VecDeque::new(),
            stats: Arc::new(LinkStats::default()),
        }
    }

    /// Hand `item` to the sender. Returns false (and keeps the item in `pending`) when the
    /// sender's buffer is full: the caller stops pulling from the producer until acks
    /// make room, so nothing is dropped.
    fn push(&mut self, item: Outgoing) -> anyhow::Result<bool> {
        match item {
            Outgoing::Batch(b, oldest) => {
                let last = b.last_seq;
                let bytes = b.payload.len() as u64;
                match self.sender.push(b) {
                    Ok(()) => {}
                    Err(PushError::BufferFull(b)) => {
                        self.pending = Some(Outgoing::Batch(*b, oldest));
                        return Ok(false);
                    }
                    Err(e) => bail!("sender refused a batch: {e}"),
                }
                self.stats.pushed_seq.store(last, Ordering::Relaxed);
                self.unacked.push_back((last, bytes));
                if let Some(t) = oldest {
                    self.lag.push_back((last, t));
                }
            }
            Outgoing::Cut {
                time_ns,
                mono_ns,
                seq,
                app,
                group,
            } => {
                let kind = if app {
                    ripcord_proto::CutKind::App
                } else {
                    ripcord_proto::CutKind::Crash
                };
                // The cut's MAC under the disk's data key: the process server and the
                // bucket carry it but cannot forge it; failover checks it (decision 0012).
                let key = &self.key;
                let authenticate =
                    |c: &ripcord_proto::Cut| ripcord_seal::point_mac(key, &aead::cut_message(c));
                match self
                    .sender
                    .push_cut_at(kind, time_ns, mono_ns, seq, group, authenticate)
                {
                    Ok(_) => {}
                    Err(PushError::CutBufferFull) => {
                        self.pending = Some(item);
                        return Ok(false);
                    }
                    Err(e) => bail!("sender refused a cut: {e}"),
                }
            }
        }
        Ok(true)
    }

    /// Batches up to `seq` are durable on the server: they no longer count as
    /// unacknowledged.
    fn acked_through(&mut self, seq: u64) -> anyhow::Result<()> {
        if let Some(m) = &self.acked {
            m.lock().expect("acked map lock").acked_through(seq)?;
        }
        while let Some(&(last, bytes)) = self.unacked.front() {
            if last > seq {
                break;
            }
            self.stats.unacked_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.unacked.pop_front();
        }
        Ok(())
    }

    /// Done: the producer finished and everything is acknowledged.
    fn finished(&self) -> bool {
        self.rx_closed && self.pending.is_none() && self.sender.is_idle()
    }
}

/// Where and who.
pub struct NetConfig {
    pub server: SocketAddr,
    pub server_name: String,
    /// The machine's certificate, renewed in the background.
    pub identity: Arc<MachineIdentity>,
    /// The escrow public key pinned at registration.
    pub escrow_key: [u8; 32],
    /// Unacknowledged bytes the agent may hold (bounds memory): half of it is the QUIC
    /// send window, the rest the sender's batch buffer.
    pub window_bytes: usize,
    /// Congestion controller of the connection (agent config `congestion`).
    pub congestion: ripcord_transport::endpoint::Congestion,
    /// Where the group's coordinator clock is, fed by the control stream (protocol 5 on).
    pub group_clock: SharedGroupClock,
    /// The machine's policy, fed by the control stream (protocol 6 on).
    pub policy: crate::replicate::policy::SharedPolicy,
}

/// Frame reader over a QUIC receive stream.
struct FrameReader {
    recv: RecvStream,
    buf: Vec<u8>,
}

impl FrameReader {
    async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            if let Some((msg, used)) = decode_frame(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(1 << 20, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => bail!("stream ended inside a frame"),
            }
        }
    }
}

async fn send_msg(send: &mut SendStream, msg: &Message) -> anyhow::Result<()> {
    send.write_all(&msg.to_frame()?).await?;
    Ok(())
}

/// Run until every link is finished (the producer closed its channel and everything was
/// acknowledged). Reconnects with backoff on connection loss; stops on a [`Refused`].
pub async fn run(cfg: NetConfig, mut links: Vec<DiskLink>) -> anyhow::Result<()> {
    let machine = cfg
        .identity
        .current()
        .map_err(Untrusted::CertificateExpired)?
        .machine_id()
        .as_str()
        .to_owned();
    const FIRST_BACKOFF: Duration = Duration::from_millis(200);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        match session(&cfg, &machine, &mut links).await {
            Ok(()) => return Ok(()),
            Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
            Err(e) if e.downcast_ref::<Untrusted>().is_some() => return Err(e),
            Err(e) => {
                if started.elapsed() > Duration::from_secs(2) {
                    // The session was up for a while: retry quickly again.
                    backoff = FIRST_BACKOFF;
                }
                if no_answer(&e) {
                    tracing::warn!(
                        "no answer from the process server at {} (data endpoint); check that \
                         `ripcord-ps serve` runs there and the port is open (UDP); retrying \
                         in {backoff:?}",
                        cfg.server
                    );
                } else {
                    tracing::warn!(
                        "connection to {} lost: {e:#}; reconnecting in {backoff:?}",
                        cfg.server
                    );
                }
                for l in &mut links {
                    l.sender.handle_disconnect();
                    l.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Whether `e` is a handshake that got no answer at all (nothing listens there, or a
/// firewall drops the packets), as opposed to a refusal or a lost connection.
fn no_answer(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ripcord_transport::EndpointError>(),
            Some(ripcord_transport::EndpointError::Handshake(
                quinn::ConnectionError::TimedOut
            ))
        ) || matches!(
            cause.downcast_ref::<quinn::ConnectionError>(),
            Some(quinn::ConnectionError::TimedOut)
        )
    })
}

async fn session(cfg: &NetConfig, machine: &str, links: &mut [DiskLink]) -> anyhow::Result<()> {
    let options = TransportOptions {
        send_window: (cfg.window_bytes / 2) as u64,
        congestion: cfg.congestion,
        ..TransportOptions::default()
    };
    let bind = if cfg.server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let identity = cfg
        .identity
        .current()
        .map_err(Untrusted::CertificateExpired)?;
    let endpoint = client_endpoint_with(bind.parse().expect("literal"), &identity, &options)?;
    let conn = connect(&endpoint, cfg.server, &cfg.server_name)
        .await
        .with_context(|| format!("connecting to {}", cfg.server))?;
    let result = serve_links(cfg, machine, links, &conn).await;
    if let Some(quinn::ConnectionError::ApplicationClosed(close)) = conn.close_reason()
        && close.error_code == quinn::VarInt::from_u32(CLOSE_CERTIFICATE_REFUSED)
    {
        if cfg.identity.replacement_for(&identity).await.is_some() {
            bail!("the certificate was renewed; reconnecting with the new one");
        }
        return Err(Untrusted::CertificateRefused {
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        }
        .into());
    }
    result?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(())
}

/// One connected session: hello, then every disk's stream until all are finished.
async fn serve_links(
    cfg: &NetConfig,
    machine: &str,
    links: &mut [DiskLink],
    conn: &Connection,
) -> anyhow::Result<()> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut reader = FrameReader {
        recv,
        buf: Vec::new(),
    };
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        machine_id: machine.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    send_msg(&mut send, &Message::Hello(hello)).await?;
    let (escrow, version) = match reader.next().await? {
        Some(Message::HelloAck(ack)) => {
            let version = check_hello_ack(PROTOCOL_VERSION, &ack)?;
            if ack.escrow_key != cfg.escrow_key {
                return Err(Untrusted::EscrowKeyMismatch {
                    server: cfg.server,
                    presented: hex::encode(ack.escrow_key),
                    pinned: hex::encode(cfg.escrow_key),
                }
                .into());
            }
            tracing::info!(server = %ack.server_id, "connected to {}", cfg.server);
            (ack.escrow_key, version)
        }
        Some(Message::Error(e)) => bail!(
            "the process server refused the session ({}): {}",
            e.code,
            e.message
        ),
        other => bail!(
            "expected HelloAck, got {}",
            describe_received(other.as_ref().map(Message::message_type))
        ),
    };
    for l in links.iter_mut() {
        if l.wrapped_key.is_none() {
            let ctx = aead::key_context(machine, &l.disk);
            l.wrapped_key = Some(wrap_data_key(&l.key, &escrow, &ctx)?);
        }
    }
    let drivers = futures_join_all(links.iter_mut().map(|l| drive(conn, version, l)));
    let results = if version >= 5 {
        tokio::select! {
            results = drivers => results,
            failed = control::run(send, reader, &cfg.group_clock, &cfg.policy) => return failed,
        }
    } else {
        drivers.await
    };
    for r in results {
        r?;
    }
    Ok(())
}

/// Join futures without an extra dependency: spawn-free, polls all concurrently.
async fn futures_join_all<F: std::future::Future<Output = anyhow::Result<()>>>(
    futs: impl Iterator<Item = F>,
) -> Vec<anyhow::Result<()>> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut results: Vec<Option<anyhow::Result<()>>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => {
                        // One failure fails the session: the others are dropped below.
                        let failed = r.is_err();
                        results[i] = Some(r);
                        if failed {
                            return std::task::Poll::Ready(());
                        }
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
}

async fn drive(conn: &Connection, version: u16, l: &mut DiskLink) -> anyhow::Result<()> {
    let disk_hex = l.disk.to_string();
    let (mut send, recv) = conn.open_bi().await?;
    let mut reader = FrameReader {
        recv,
        buf: Vec::new(),
    };
    let resume_from = open::open_stream(&mut send, &mut reader, version, l).await?;
    tracing::info!(disk = %disk_hex, epoch = l.epoch, resume_from, "disk stream accepted");
    let mut buf = Vec::with_capacity(8 << 20);
    loop {
        // Take what the window allows.
        while l.sender.can_push() {
            let item = match l.pending.take() {
                Some(i) => i,
                None => match l.rx.try_recv() {
                    Ok(i) => i,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        l.rx_closed = true;
                        break;
                    }
                },
            };
            if !l.push(item)? {
                break;
            }
        }
        // Send what the in-flight window allows.
        buf.clear();
        while l.sender.poll_transmit(Instant::now(), &mut buf).is_some() {
            if buf.len() >= 4 << 20 {
                send.write_all(&buf).await?;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            send.write_all(&buf).await?;
        }
        if l.finished() {
            let _ = send.finish();
            return Ok(());
        }
        let timeout = l.sender.poll_timeout();
        let want_more = l.sender.can_push() && l.pending.is_none() && !l.rx_closed;
        tokio::select! {
            item = l.rx.recv(), if want_more => match item {
                Some(i) => {
                    l.push(i)?;
                }
                None => l.rx_closed = true,
            },
            msg = reader.next() => match msg? {
                Some(Message::Ack(ack)) => {
                    l.sender.handle_ack(Instant::now(), &ack).map_err(|e| anyhow::anyhow!("bad ack: {e}"))?;
                    l.stats.acked_seq.store(ack.durable_seq, Ordering::Relaxed);
                    l.acked_through(ack.durable_seq)?;
                    l.stats.acked_cuts.store(ack.durable_cut_id, Ordering::Relaxed);
                    let now = now_mono_ns();
                    let mut samples = l.stats.lag_us.lock().expect("lag lock");
                    while let Some(&(seq, t)) = l.lag.front() {
                        if seq > ack.durable_seq {
                            break;
                        }
                        samples.push(now.saturating_sub(t) / 1000);
                        l.lag.pop_front();
                    }
                    if samples.len() > 100_000 {
                        samples.drain(..50_000);
                    }
                }
                Some(Message::StoreStatus(st)) => l.stats.store_status(&disk_hex, st),
                Some(Message::Error(e)) => {
                    if matches!(e.code, ErrorCode::NotOwner | ErrorCode::StaleEpoch) {
                        return Err(Refused { disk: disk_hex, code: e.code, message: e.message }.into());
                    }
                    bail!("the process server stopped the disk stream ({}): {}", e.code, e.message);
                }
                Some(other) => bail!("unexpected {} frame on a disk stream", other.message_type()),
                None => bail!("server closed the disk stream"),
            },
            () = sleep_until(timeout) => {
                l.sender.handle_timeout(Instant::now());
                if let Some(SenderEvent::ReconnectRequired { acked_seq }) = l.sender.poll_event() {
                    bail!("no acknowledgement progress (acked {acked_seq}); reconnecting");
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
