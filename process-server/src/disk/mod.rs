//! One protected disk on the process server: its journal on the cache disk and the
//! receiver state machine. Frames are journaled as received (sealed; the server never
//! sees plaintext); acknowledgements go out only after fdatasync. A restarted agent that
//! continues its epoch (`ContinueEpoch`) under a new key gets a `KeyRotation` record at
//! the next sequence, never a new epoch (decision 0025); `durable` keeps what a trim
//! removes from view.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::ingest::{Geometry, check_batch, check_protect};
use ripcord_journal::{Journal, JournalConfig, JournalError, RecordType, SpaceThresholds};
use ripcord_proto::{
    Ack, BatchAction, CutAction, DiskAccepted, DiskId, DurableState, EpochContinued, ErrorCode,
    ErrorMessage, Message, ProtectDisk, ProtectOutcome, Receiver, decode_frame,
};

mod durable;

use durable::{STATE_FILE, load_state, save_state, scan};

/// What a journaled record holds, decoded.
pub enum Entry {
    /// A new epoch began (full resync); the frame carries the wrapped data key.
    EpochStart(ProtectDisk),
    /// The agent restarted and continues its epoch under a new data key (the frame's)
    /// from sequence `from_seq` on: every batch before it is sealed with an older key.
    KeyRotation {
        from_seq: u64,
        pd: ProtectDisk,
    },
    Batch(ripcord_proto::Batch),
    Cut(ripcord_proto::Cut),
}

impl Entry {
    /// The epoch the record belongs to.
    pub fn epoch(&self) -> u64 {
        match self {
            Entry::EpochStart(pd) | Entry::KeyRotation { pd, .. } => pd.epoch,
            Entry::Batch(b) => b.epoch,
            Entry::Cut(c) => c.epoch,
        }
    }
}

/// How a disk stream opened: the reply to its `ProtectDisk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// A new epoch, or the same one resumed (a reconnection).
    Accepted(DiskAccepted),
    /// A restarted agent's epoch continued (the stream opened with `ContinueEpoch`).
    Continued(EpochContinued),
}

impl Opened {
    /// The first sequence the agent sends.
    pub fn resume_from_seq(&self) -> u64 {
        match self {
            Opened::Accepted(a) => a.resume_from_seq,
            Opened::Continued(c) => c.resume_from_seq,
        }
    }

    /// The reply frame.
    pub fn message(self) -> Message {
        match self {
            Opened::Accepted(a) => Message::DiskAccepted(a),
            Opened::Continued(c) => Message::EpochContinued(c),
        }
    }
}

/// A key rotation record's payload: `from_seq` (u64 LE), then the `ProtectDisk` frame.
pub fn key_rotation_payload(from_seq: u64, frame: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + frame.len());
    payload.extend_from_slice(&from_seq.to_le_bytes());
    payload.extend_from_slice(frame);
    payload
}

/// Decode one journal record's payload (an encoded protocol frame).
pub fn decode_entry(kind: RecordType, payload: &[u8]) -> anyhow::Result<Entry> {
    let (from_seq, payload) = match kind {
        RecordType::KeyRotation => {
            let (seq, frame) = payload
                .split_first_chunk::<8>()
                .context("key rotation record shorter than its sequence")?;
            (Some(u64::from_le_bytes(*seq)), frame)
        }
        _ => (None, payload),
    };
    let (msg, used) = decode_frame(payload)?.context("journal record holds a truncated frame")?;
    if used != payload.len() {
        bail!(
            "journal record has {} bytes after its frame",
            payload.len() - used
        );
    }
    Ok(match (kind, msg) {
        (RecordType::EpochStart, Message::ProtectDisk(p)) => Entry::EpochStart(p),
        (RecordType::KeyRotation, Message::ProtectDisk(pd)) => match from_seq {
            Some(from_seq @ 1..) => Entry::KeyRotation { from_seq, pd },
            _ => bail!("key rotation record from sequence 0"),
        },
        (RecordType::Batch, Message::Batch(b)) => Entry::Batch(b),
        (RecordType::Cut, Message::Cut(c)) => Entry::Cut(c),
        (kind, msg) => bail!(
            "journal record of type {kind:?} holds a {} frame",
            msg.message_type()
        ),
    })
}

/// The journal directory of a disk.
pub fn journal_dir(cache: &Path, disk: &DiskId) -> PathBuf {
    cache.join(disk.to_string())
}

/// Journal settings from the server configuration.
pub fn journal_config(cfg: &crate::config::PsConfig) -> JournalConfig {
    JournalConfig {
        segment_size: cfg.segment_mib << 20,
        space: SpaceThresholds {
            min_free_bytes: cfg.min_free_mib << 20,
            min_free_percent: cfg.min_free_percent,
        },
        // The receiver's durable state lives next to the segments it describes.
        companion_files: &[STATE_FILE],
        ..JournalConfig::default()
    }
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskCounters {
    pub batches: u64,
    pub cuts: u64,
    pub bytes_in: u64,
    pub duplicates: u64,
    pub syncs: u64,
    pub backpressure_waits: u64,
}

/// Journal + receiver of one disk.
pub struct DiskCore {
    pub disk: DiskId,
    dir: PathBuf,
    journal: Journal,
    receiver: Receiver,
    /// Set by the stream's `ProtectDisk`; batches are checked against it.
    geometry: Option<Geometry>,
    /// The wrapped data key the current epoch's newest batches are sealed with (`None`:
    /// not known, e.g. no epoch yet). A `ProtectDisk` of the current epoch with another
    /// key is a restarted agent continuing it: a key rotation.
    wrapped_key: Option<Vec<u8>>,
    pub counters: DiskCounters,
    /// The device path the owner last said it protects the disk as (its claim, for
    /// people: logs, metrics, the store's epoch descriptions).
    pub device: Option<String>,
    /// Set when the server stops: waits for cache space give up (nothing they held was
    /// acknowledged, so the agent sends it again to the next server run).
    stopping: Arc<AtomicBool>,
    /// Set to 1 while acknowledgements are held for cache space (the metric operators
    /// watch; it must show during the hold, when no group commit updates the others).
    pub space_held: prometheus_client::metrics::gauge::Gauge,
}

/// A disk's core, shared by its stream, its uploader and the server.
///
/// Invariant: the lock is taken only on a blocking thread. A holder may wait for a group
/// commit's fdatasync, for cache space, or read the journal; a runtime worker waiting on
/// it stops polling the QUIC endpoints (with two workers, two such waits and the server
/// answers nobody: no handshakes, no keep-alives, no metrics). Async code goes through
/// [`SharedDisk::with`]; [`SharedDisk::lock_blocking`] is for threads that may block.
#[derive(Clone)]
pub struct SharedDisk(Arc<Mutex<DiskCore>>);

impl SharedDisk {
    pub fn new(core: DiskCore) -> SharedDisk {
        SharedDisk(Arc::new(Mutex::new(core)))
    }

    /// Runs `f` on the core, on a blocking thread.
    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DiskCore) -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let core = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&mut core.lock().expect("disk lock")))
            .await
            .context("a task on the disk's journal panicked")
    }

    /// The core, locked: only from a thread that may block (never a runtime worker).
    pub fn lock_blocking(&self) -> MutexGuard<'_, DiskCore> {
        self.0.lock().expect("disk lock")
    }

    /// The core itself, if nobody else shares it (to close its journal).
    pub fn into_core(self) -> Result<DiskCore, SharedDisk> {
        Arc::try_unwrap(self.0)
            .map(|m| m.into_inner().expect("disk lock"))
            .map_err(SharedDisk)
    }
}

/// What applying a group of frames produced.
#[derive(Default)]
pub struct Applied {
    /// Acks to send (after the group became durable).
    pub acks: Vec<Ack>,
    /// A refusal: send it and close the stream.
    pub error: Option<ErrorMessage>,
}

impl DiskCore {
    /// Open (recovering) the journal and rebuild the receiver from it.
    pub fn open(cache: &Path, disk: DiskId, cfg: JournalConfig) -> anyhow::Result<DiskCore> {
        let dir = journal_dir(cache, &disk);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let journal = Journal::open(&dir, cfg)
            .with_context(|| format!("opening journal {}", dir.display()))?;
        let report = journal.recovery_report();
        if report.truncated_bytes > 0 {
            tracing::warn!(
                disk = %disk, bytes = report.truncated_bytes,
                "journal recovery truncated a torn tail (never acknowledged)"
            );
        }
        let (saved, saved_key) = load_state(&dir)?;
        let (state, wrapped_key) = scan(&journal, saved, saved_key)?;
        tracing::info!(
            disk = %disk, epoch = state.epoch, durable_seq = state.durable_seq,
            engine = ?journal.engine_kind(), "journal opened"
        );
        Ok(DiskCore {
            disk,
            dir,
            journal,
            receiver: Receiver::restore(disk, state),
            geometry: None,
            wrapped_key,
            counters: DiskCounters::default(),
            device: None,
            stopping: Arc::new(AtomicBool::new(false)),
            space_held: prometheus_client::metrics::gauge::Gauge::default(),
        })
    }

    /// Give up waiting for cache space once `flag` is set (the server's stop flag).
    pub fn stop_waiting_when(&mut self, flag: Arc<AtomicBool>) {
        self.stopping = flag;
    }

    fn check_stopping(&self) -> anyhow::Result<()> {
        if self.stopping.load(Ordering::Relaxed) {
            bail!(
                "the server is stopping while disk {} waits for cache space; what this \
                 group held was not acknowledged and the agent sends it again",
                self.disk
            );
        }
        Ok(())
    }

    pub fn durable_state(&self) -> DurableState {
        self.receiver.durable_state()
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Drop journal records through `seq` (uploaded). The receiver's durable position is
    /// saved first, so it survives its records leaving the journal.
    pub fn trim_through(&mut self, seq: u64) -> anyhow::Result<()> {
        save_state(
            &self.dir,
            &self.receiver.durable_state(),
            self.wrapped_key.as_deref(),
        )?;
        self.journal.trim_through(seq)?;
        Ok(())
    }

    /// Handle `ProtectDisk` (frame `raw`): resume, durably start a new epoch, or (when
    /// `continues`: the stream opened with `ContinueEpoch`) continue the current epoch
    /// under the agent's new key (a key rotation), never starting it anew.
    pub fn protect(
        &mut self,
        pd: &ProtectDisk,
        raw: &[u8],
        continues: bool,
    ) -> anyhow::Result<Result<Opened, ErrorMessage>> {
        let geometry = match check_protect(pd) {
            Ok(g) => g,
            Err(why) => return Ok(Err(error(ErrorCode::BadFrame, self.disk, &why))),
        };
        let held = self.receiver.durable_state();
        if continues && held.epoch != pd.epoch {
            let holds = match held.epoch {
                0 => "no epoch".to_owned(),
                e => format!("epoch {e} (through batch {})", held.durable_seq),
            };
            return Ok(Err(error(
                ErrorCode::CannotContinue,
                self.disk,
                &format!(
                    "this server holds {holds} of the disk, so epoch {} cannot be continued \
                     here: start a new epoch",
                    pd.epoch
                ),
            )));
        }
        // A key this server does not know yet (none recorded: journals from before keys
        // were kept) is a rotation only when the agent says it continues.
        let rotates = held.epoch == pd.epoch
            && self
                .wrapped_key
                .as_ref()
                .map_or(continues, |k| *k != pd.wrapped_key);
        if rotates && !continues {
            return Ok(Err(error(
                ErrorCode::StaleEpoch,
                self.disk,
                &format!(
                    "epoch {} is held with another data key: an agent that restarted \
                     continues it (ContinueEpoch, protocol 4) or starts a new epoch",
                    pd.epoch
                ),
            )));
        }
        let key = self.wrapped_key.clone();
        let outcome = self.receiver.handle_protect(pd);
        if matches!(
            outcome,
            ProtectOutcome::Resume(_) | ProtectOutcome::NewEpoch { .. }
        ) {
            self.geometry = Some(geometry);
        }
        let result = self.start_epoch(pd, raw, outcome, rotates);
        if result.is_err() {
            // The epoch start is not durable: the receiver must not be in it.
            self.receiver = Receiver::restore(self.disk, held);
            self.geometry = None;
            self.wrapped_key = key;
        }
        Ok(result?.map(|accepted| {
            if continues {
                Opened::Continued(EpochContinued {
                    disk_id: accepted.disk_id,
                    epoch: accepted.epoch,
                    resume_from_seq: accepted.resume_from_seq,
                    next_cut_id: self.receiver.next_cut_id(),
                })
            } else {
                Opened::Accepted(accepted)
            }
        }))
    }

    fn start_epoch(
        &mut self,
        pd: &ProtectDisk,
        raw: &[u8],
        outcome: ProtectOutcome,
        rotates: bool,
    ) -> anyhow::Result<Result<DiskAccepted, ErrorMessage>> {
        match outcome {
            ProtectOutcome::Resume(a) if !rotates => Ok(Ok(a)),
            ProtectOutcome::Resume(a) => {
                // The agent restarted and continues the epoch under a new key. What was
                // received is durable (every group is synced before the core is
                // released), so the new key begins right after it.
                anyhow::ensure!(
                    self.receiver.received_seq() + 1 == a.resume_from_seq,
                    "disk {}: received {} but durable {} at a key rotation",
                    self.disk,
                    self.receiver.received_seq(),
                    a.resume_from_seq - 1
                );
                self.wait_for_space()?;
                let payload = key_rotation_payload(a.resume_from_seq, raw);
                self.journal.append(RecordType::KeyRotation, &payload)?;
                self.journal.sync()?;
                self.wrapped_key = Some(pd.wrapped_key.clone());
                tracing::info!(
                    disk = %self.disk, epoch = pd.epoch, from_seq = a.resume_from_seq,
                    "the agent continues its epoch with a new data key (no full resync)"
                );
                Ok(Ok(a))
            }
            ProtectOutcome::NewEpoch {
                previous_epoch,
                accepted,
            } => {
                self.wait_for_space()?;
                self.journal.append(RecordType::EpochStart, raw)?;
                self.journal.sync()?;
                self.wrapped_key = Some(pd.wrapped_key.clone());
                tracing::info!(
                    disk = %self.disk, previous_epoch, epoch = pd.epoch,
                    "new epoch: full resync"
                );
                Ok(Ok(accepted))
            }
            ProtectOutcome::Reject(reason) => Ok(Err(ErrorMessage {
                code: ErrorCode::StaleEpoch,
                disk_id: Some(self.disk),
                message: reason.to_string(),
            })),
        }
    }

    /// Until the cache has space (above its floor): acknowledgements are held meanwhile.
    fn wait_for_space(&mut self) -> anyhow::Result<()> {
        self.retry_while_full(|journal| journal.check_space().map(drop))
    }

    /// Runs `attempt` until it stops failing for lack of cache space (a back-pressure
    /// error: below the floor, or ENOSPC, after which the journal rolled the record back,
    /// so nothing is lost). Meanwhile acknowledgements are held: the hold is counted, shown
    /// by the `acks_held_for_space` gauge and logged once, and its end is logged. Stops
    /// early, with an error, when the server is stopping.
    fn retry_while_full<T>(
        &mut self,
        mut attempt: impl FnMut(&mut Journal) -> Result<T, JournalError>,
    ) -> anyhow::Result<T> {
        let mut held = false;
        let result = loop {
            match attempt(&mut self.journal) {
                Ok(v) => break Ok(v),
                Err(e) if e.is_back_pressure() => {
                    if !held {
                        tracing::warn!(disk = %self.disk, "{e}; holding acknowledgements");
                        held = true;
                        self.counters.backpressure_waits += 1;
                        self.space_held.set(1);
                    }
                    if let Err(e) = self.check_stopping() {
                        break Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => break Err(e.into()),
            }
        };
        if held {
            self.space_held.set(0);
            if result.is_ok() {
                tracing::info!(disk = %self.disk, "cache space is back; acknowledging again");
            }
        }
        result
    }

    /// Journal a group of received frames, fdatasync once, and return the acks.
    ///
    /// A frame that fails [`check_batch`] or the receiver's order checks is refused
    /// (`Applied::error`) and not journaled. If journaling fails, the receiver goes back
    /// to what is durable, so the agent's resend is appended, not taken for a duplicate.
    pub fn apply(&mut self, frames: &[(Message, Vec<u8>)]) -> anyhow::Result<Applied> {
        let durable = self.receiver.durable_state();
        let result = self.apply_group(frames);
        if result.is_err() {
            self.receiver = Receiver::restore(self.disk, durable);
        }
        result
    }

    fn apply_group(&mut self, frames: &[(Message, Vec<u8>)]) -> anyhow::Result<Applied> {
        let mut out = Applied::default();
        let Some(geometry) = self.geometry else {
            out.error = Some(error(
                ErrorCode::BadFrame,
                self.disk,
                "no ProtectDisk on this stream",
            ));
            return Ok(out);
        };
        let mut last_batch = None;
        let mut last_cut = None;
        self.wait_for_space()?;
        for (msg, raw) in frames {
            match msg {
                Message::Batch(b) if let Err(why) = check_batch(b, geometry) => {
                    out.error = Some(error(ErrorCode::BadFrame, self.disk, &why));
                    break;
                }
                Message::Batch(b) => match self.receiver.handle_batch(b) {
                    BatchAction::Append => {
                        self.append_retrying(RecordType::Batch, raw)?;
                        self.counters.batches += 1;
                        self.counters.bytes_in += raw.len() as u64;
                        last_batch = Some(b.last_seq);
                    }
                    BatchAction::Duplicate => self.counters.duplicates += 1,
                    other => {
                        let msg = other.to_string();
                        out.error = Some(error(ErrorCode::OutOfOrder, self.disk, &msg));
                        break;
                    }
                },
                Message::Cut(c) => match self.receiver.handle_cut(c) {
                    CutAction::Record => {
                        self.append_retrying(RecordType::Cut, raw)?;
                        self.counters.cuts += 1;
                        last_cut = Some(c.id);
                    }
                    CutAction::Duplicate => {}
                    CutAction::Reject(r) => {
                        out.error = Some(error(
                            ErrorCode::OutOfOrder,
                            self.disk,
                            &format!("cut refused: {r}"),
                        ));
                        break;
                    }
                },
                Message::Ping(_) => {}
                other => {
                    out.error = Some(error(
                        ErrorCode::BadFrame,
                        self.disk,
                        &format!("unexpected {} frame on a disk stream", other.message_type()),
                    ));
                    break;
                }
            }
        }
        if last_batch.is_some() || last_cut.is_some() {
            self.journal.sync()?;
            self.counters.syncs += 1;
            if let Some(seq) = last_batch {
                self.receiver.handle_durable(seq)?;
            }
            if let Some(id) = last_cut {
                self.receiver.handle_cut_durable(id)?;
            }
        }
        out.acks.extend(self.receiver.poll_ack());
        Ok(out)
    }

    /// Appends a record, holding acknowledgements while the cache disk is full.
    fn append_retrying(&mut self, kind: RecordType, raw: &[u8]) -> anyhow::Result<()> {
        self.retry_while_full(|journal| journal.append(kind, raw).map(drop))
    }
}

fn error(code: ErrorCode, disk: DiskId, message: &str) -> ErrorMessage {
    ErrorMessage {
        code,
        disk_id: Some(disk),
        message: ripcord_proto::wire::clip_message(message),
    }
}
