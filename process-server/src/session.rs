//! The drivers of one agent connection and of each of its disk streams.
//!
//! A connection (mutual TLS; the peer's machine id comes from its certificate) opens a
//! control stream (Hello / HelloAck) and then one bidirectional stream per disk:
//! ProtectDisk, then Batch and Cut frames one way and Acks (and, from protocol 2 on,
//! StoreStatus) the other. A worker per stream journals frames in groups with one
//! fdatasync per group (group commit) and sends the acks the receiver releases.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use quinn::SendStream;
use ripcord_proto::{
    DiskId, ErrorCode, ErrorMessage, Message, describe_received, handshake::answer_hello,
};
use tokio::sync::mpsc;

use crate::{
    frames::{Budget, FrameReader, Received},
    registry::ClaimError,
    server::State,
    uploader::UploadStatus,
};

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

pub(crate) async fn connection(
    state: Arc<State>,
    incoming: quinn::Incoming,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    // The handshake fails for peers without a certificate from our CA, and admission for
    // a certificate that is not its machine's current one: nothing of theirs is parsed.
    let conn = incoming.await.context("TLS handshake");
    drop(handshake);
    let conn = conn?;
    // A machine unknown to a joined server may have been placed here moments ago: the
    // configuration role is asked now rather than at the next report.
    if let Some(reporter) = &state.reporter
        && !state.peers.is_current(&conn)
    {
        reporter.refresh(Duration::from_secs(5)).await;
    }
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
                "expected Hello, got {}",
                describe_received(other.map(|r| r.msg.message_type()))
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
        let version = match answer_hello(&hello, &state.dep.config.server_id, state.escrow_key) {
            Ok(ack) => {
                send_message(&mut send, &ack).await?;
                match ack {
                    Message::HelloAck(a) => a.protocol_version,
                    _ => 1,
                }
            }
            Err((e, msg)) => {
                let _ = send_message(&mut send, &msg).await;
                bail!("{e}");
            }
        };
        tracing::info!(%machine, agent = %hello.agent_version, "agent connected");
        // Protocol 5 on, the control stream carries clock probes and the machine's group
        // schedule (6 on: and its policy); it lives as long as the connection.
        let _control = (version >= 5).then(|| {
            let watched = Watched {
                groups: state.groups.clone(),
                policies: state.policies.clone(),
            };
            let machine = machine.clone();
            AbortOnDrop(tokio::spawn(async move {
                if let Err(e) = control_stream(send, reader, watched, version, &machine).await {
                    tracing::info!(%machine, "control stream ended: {e:#}");
                }
            }))
        });
        loop {
            let (send, recv) = conn.accept_bi().await?;
            let state = Arc::clone(&state);
            let machine = machine.clone();
            let reader = FrameReader::new(recv, budget.clone());
            tokio::spawn(async move {
                let mut named = Named::default();
                let stream = disk_stream(state, machine.clone(), version, send, reader, &mut named);
                if let Err(e) = stream.await {
                    tracing::info!(
                        disk = named.disk, device = named.device, %machine,
                        "disk stream ended: {}", ripcord_types::report(e.as_ref())
                    );
                }
            });
        }
    }
    .await;
    state.metrics.connections.dec();
    result
}

/// Aborts a task when dropped (the connection's control stream ends with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the control stream pushes to the agent when it changes.
struct Watched {
    groups: tokio::sync::watch::Receiver<crate::groups::Schedules>,
    policies: tokio::sync::watch::Receiver<crate::policies::Policies>,
}

/// The control stream after the hello (protocol 5 on): answers clock probes with this
/// server's clock, and sends the machine's group schedule (`crate::groups`) and, protocol
/// 6 on, its policy (`crate::policies`) at once and whenever they change. A protocol 5
/// agent gets schedules without application-consistent instants (it cannot take them).
async fn control_stream(
    mut send: SendStream,
    mut reader: FrameReader,
    watched: Watched,
    version: u16,
    machine: &str,
) -> anyhow::Result<()> {
    let Watched {
        mut groups,
        mut policies,
    } = watched;
    let schedule_for = |groups: &crate::groups::Schedules| {
        let mut s = crate::groups::schedule_for(groups, machine);
        if version < 6 {
            s.app_every = 0;
        }
        s
    };
    let mut current = schedule_for(&groups.borrow_and_update());
    send_message(&mut send, &Message::GroupSchedule(current)).await?;
    let mut policy = crate::policies::update_for(&policies.borrow_and_update(), machine);
    let mut watching_policies = version >= 6;
    if watching_policies {
        send_message(&mut send, &Message::PolicyUpdate(policy)).await?;
    }
    let mut watching = true;
    loop {
        tokio::select! {
            msg = reader.next() => match msg? {
                Some(Received { msg: Message::TimeProbe(probe), .. }) => {
                    let received_ns = crate::groups::now_wall_ns();
                    let reply = ripcord_proto::TimeReply {
                        nonce: probe.nonce,
                        received_ns,
                        sent_ns: crate::groups::now_wall_ns().max(received_ns),
                    };
                    send_message(&mut send, &Message::TimeReply(reply)).await?;
                }
                Some(other) => bail!(
                    "unexpected {} frame on the control stream",
                    other.msg.message_type()
                ),
                None => return Ok(()),
            },
            changed = groups.changed(), if watching => {
                if changed.is_err() {
                    watching = false; // no source of groups on this server
                    continue;
                }
                let next = schedule_for(&groups.borrow_and_update());
                if next != current {
                    current = next;
                    send_message(&mut send, &Message::GroupSchedule(current)).await?;
                }
            }
            changed = policies.changed(), if watching_policies => {
                if changed.is_err() {
                    watching_policies = false; // no source of policies on this server
                    continue;
                }
                let next = crate::policies::update_for(&policies.borrow_and_update(), machine);
                if next != policy {
                    policy = next;
                    tracing::info!(
                        %machine,
                        assigned = policy.assigned,
                        app_interval_secs = policy.app_interval_secs,
                        "the machine's policy changed: telling its agent"
                    );
                    send_message(&mut send, &Message::PolicyUpdate(policy)).await?;
                }
            }
        }
    }
}

/// The disk and device of a stream, for the line that logs its end ("?" until known).
struct Named {
    disk: String,
    device: String,
}

impl Default for Named {
    fn default() -> Self {
        Named {
            disk: "?".to_owned(),
            device: "?".to_owned(),
        }
    }
}

async fn disk_stream(
    state: Arc<State>,
    machine: String,
    version: u16,
    mut send: SendStream,
    mut reader: FrameReader,
    named: &mut Named,
) -> anyhow::Result<()> {
    let mut first = reader.next().await?;
    // Protocol 3 on, a stream may open with the agent's name for the disk: its claim,
    // for people only, kept with the disk once its ProtectDisk is accepted.
    let mut device = None;
    if let Some(Received {
        msg: Message::DiskName(name),
        ..
    }) = &first
    {
        if version < 3 {
            refuse(
                &mut send,
                ErrorCode::BadFrame,
                Some(name.disk_id),
                format!("DiskName needs protocol version 3; this session speaks {version}"),
            )
            .await;
            bail!("DiskName on a protocol {version} session");
        }
        device = Some(name.clone());
        first = reader.next().await?;
    }
    // Protocol 4 on: a restarted agent continues its epoch (under a new key).
    let mut continues = None;
    if let Some(Received {
        msg: Message::ContinueEpoch(c),
        ..
    }) = &first
    {
        if version < 4 {
            refuse(
                &mut send,
                ErrorCode::BadFrame,
                Some(c.disk_id),
                format!("ContinueEpoch needs protocol version 4; this session speaks {version}"),
            )
            .await;
            bail!("ContinueEpoch on a protocol {version} session");
        }
        continues = Some(*c);
        first = reader.next().await?;
    }
    let (pd, raw) = match first {
        Some(Received {
            msg: Message::ProtectDisk(pd),
            raw,
            ..
        }) if device.as_ref().is_none_or(|n| n.disk_id == pd.disk_id)
            && continues.is_none_or(|c| (c.disk_id, c.epoch) == (pd.disk_id, pd.epoch)) =>
        {
            (pd, raw)
        }
        Some(Received {
            msg: Message::ProtectDisk(pd),
            ..
        }) => {
            let why = match (&device, continues) {
                (Some(n), _) if n.disk_id != pd.disk_id => format!(
                    "DiskName names disk {} but ProtectDisk announces disk {}",
                    n.disk_id, pd.disk_id
                ),
                (_, Some(c)) => format!(
                    "ContinueEpoch continues epoch {} of disk {} but ProtectDisk announces \
                     epoch {} of disk {}",
                    c.epoch, c.disk_id, pd.epoch, pd.disk_id
                ),
                _ => "the stream's opening frames disagree".to_owned(),
            };
            state.metrics.errors.inc();
            refuse(
                &mut send,
                ErrorCode::BadFrame,
                Some(pd.disk_id),
                why.clone(),
            )
            .await;
            bail!("{why}");
        }
        other => {
            let got = other.map(|r| r.msg.message_type());
            refuse(
                &mut send,
                ErrorCode::BadFrame,
                None,
                format!("expected ProtectDisk, got {}", describe_received(got)),
            )
            .await;
            bail!("expected ProtectDisk");
        }
    };
    let disk = pd.disk_id;
    let disk_hex = disk.to_string();
    let device = device.map(|n| n.device);
    named.disk.clone_from(&disk_hex);
    if let Some(d) = &device {
        named.device.clone_from(d);
    }
    // Nothing of a malformed ProtectDisk reaches the registry or the journal.
    if let Err(why) = crate::ingest::check_protect(&pd) {
        state.metrics.errors.inc();
        refuse(&mut send, ErrorCode::BadFrame, Some(disk), why.clone()).await;
        bail!("ProtectDisk refused: {why}");
    }
    // Ownership first: a machine may only write its own disks. A changed claim is saved
    // (fsync), so on a blocking thread; the registry keeps the last name told (a protocol
    // 2 agent tells none).
    let claim = {
        let (state, machine, pd) = (Arc::clone(&state), machine.clone(), pd.clone());
        tokio::task::spawn_blocking(move || {
            let mut registry = state.registry.lock().expect("registry lock");
            registry
                .claim(&machine, &pd, device.as_deref())
                .map(|()| registry.get(&disk).and_then(|r| r.device.clone()))
        })
        .await
        .context("the registry's writer panicked")?
    };
    let device = match claim {
        Ok(device) => device,
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
    };

    let core = state.disk_core(disk, &machine, device.as_deref()).await?;
    {
        let device = device.clone();
        core.with(move |core| core.device = device).await?;
    }
    state
        .metrics
        .disk_info(&disk_hex, &machine, device.as_deref());
    let shown = device.unwrap_or_else(|| "?".to_owned());
    named.device.clone_from(&shown);
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
        let pd = pd.clone();
        let continues = continues.is_some();
        core.with(move |core| core.protect(&pd, &raw, continues))
            .await??
    };
    match reply {
        Ok(opened) => send_message(&mut send, &opened.message()).await?,
        Err(err) => {
            let _ = send_message(&mut send, &Message::Error(err)).await;
            bail!("ProtectDisk refused");
        }
    }
    tracing::info!(disk = %disk_hex, device = shown, %machine, epoch = pd.epoch, "disk stream open");
    // While this is held, the disk's newest point can be current (its owner is here).
    let _open = state
        .store
        .is_some()
        .then(|| UploadStatus::stream_open(&state.metrics.upload_status(&disk_hex, &machine)));

    // Worker: journals groups of frames, one fdatasync per group, emits acks.
    // Frames wait here with their memory reserved (see `frames`): bounded in bytes.
    let (frames_tx, mut frames_rx) = mpsc::channel::<Received>(256);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let status_tx = out_tx.clone();
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
            let (state, disk_hex, machine) = (
                Arc::clone(&worker_state),
                disk_hex.clone(),
                worker_machine.clone(),
            );
            let applied = core
                .with(move |core| {
                    let applied = core.apply(&group);
                    state.metrics.observe(&disk_hex, &machine, core);
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
    // Protocol 2 on: the agent hears how its data is becoming recovery points.
    let store_status = if version >= 2 && state.store.is_some() {
        let status = state.metrics.upload_status(&disk.to_string(), &machine);
        let out = status_tx;
        Some(tokio::spawn(async move {
            let mut last: Option<(ripcord_proto::StoreStatus, std::time::Instant)> = None;
            loop {
                let now = status.lock().expect("status lock").for_agent(disk);
                let due = last.as_ref().is_none_or(|(sent, at)| {
                    (sent.epoch, sent.committed_cut_id, &sent.failure)
                        != (now.epoch, now.committed_cut_id, &now.failure)
                        || (!now.failure.is_empty() && at.elapsed() >= Duration::from_secs(10))
                });
                if due {
                    if out.send(Message::StoreStatus(now.clone())).is_err() {
                        break;
                    }
                    last = Some((now, std::time::Instant::now()));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
    } else {
        // The writer ends when every sender is gone.
        drop(status_tx);
        None
    };
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
    if let Some(task) = store_status {
        task.abort();
        let _ = task.await;
    }
    // The worker (and the status task) dropped their senders: the writer sends the last
    // acks and ends.
    let _ = writer.await;
    match read_result {
        Ok(r) => r?,
        Err(e) if e.is_cancelled() => {
            tracing::info!(disk = %disk, device = shown, %machine, "stream replaced by a newer one")
        }
        Err(e) => return Err(e.into()),
    }
    worker_result??;
    Ok(())
}
