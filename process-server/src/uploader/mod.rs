//! The uploader: journal records to packs, index and recovery-point catalog in the target
//! store; then trims the journal. A recovery point is committed by the store only after all
//! its data is durable there; the journal is trimmed only through records whose content the
//! store has committed.
//!
//! Restart-safe (it is restarted after any error, and at every server start): the store's
//! writer discovers what is committed and ignores batches and cuts it already has, so
//! re-reading untrimmed journal records is harmless, and those records count as done for
//! trimming ([`Committed::cuts_through`], the durable seq, the epoch). Records of an epoch
//! older than the store's newest are skipped: a writer begins an epoch only after the
//! previous one is fully committed, so a restart between that and the trim finds them.
//!
//! [`Uploader::step`] does one round (read up to 256 durable records, upload, maybe flush
//! and trim, maybe apply retention); [`supervise`] repeats it, restarting the uploader
//! after any error with a growing delay. Tests drive `step` directly.
//!
//! Failures are visible ([`UploadStatus`]): each failed attempt counts in
//! `ripcord_ps_upload_errors_total`; the log says once what failed and what to do, then
//! again only when the cause changes or a minute has passed; recovery is logged; and a
//! disk whose journal holds data while its newest recovery point is older than
//! `point-age-warn-secs` gets a warning (the age is a metric too). How current the newest
//! point is (the lag: what a failover to it could lose, docs/decisions/0026) is kept in
//! the same status (`status.rs`).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ripcord_store::{
    Committed, CutInfo, DiskId, DiskWriter, EpochInfo, SealedBatch, Store, WriterConfig,
};

use crate::disk::{Entry, SharedDisk, decode_entry};

mod status;
pub use status::{OpenStream, UploadStatus};

/// Upload cadence.
#[derive(Clone, Copy, Debug)]
pub struct UploadConfig {
    /// Flush (pack + index + catalog) at least this often while data is pending.
    pub interval: Duration,
    /// ... or once this many bytes are pending.
    pub bytes: u64,
    /// Keep recovery points this long.
    pub retention: Duration,
    /// Run retention this often.
    pub gc_interval: Duration,
    /// Warn when the journal holds data and the newest recovery point is older than this.
    pub point_age_warn: Duration,
}

/// What a record was, for deciding how far the journal may be trimmed.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Epoch(u64),
    Batch { epoch: u64, seq: u64 },
    Cut { epoch: u64, id: u64 },
}

impl Pending {
    fn epoch(self) -> u64 {
        match self {
            Pending::Epoch(epoch) | Pending::Batch { epoch, .. } | Pending::Cut { epoch, .. } => {
                epoch
            }
        }
    }

    /// Whether the store holds everything this record carried, so it may be trimmed.
    fn done(self, c: &Committed) -> bool {
        match self {
            Pending::Epoch(e) => e <= c.epoch,
            Pending::Batch { epoch, seq } => {
                epoch < c.epoch || (epoch == c.epoch && seq <= c.durable_seq)
            }
            Pending::Cut { epoch, id } => {
                epoch < c.epoch || (epoch == c.epoch && id <= c.cuts_through)
            }
        }
    }
}

fn to_store(b: ripcord_proto::Batch) -> SealedBatch {
    SealedBatch {
        epoch: b.epoch,
        seq: b.first_seq,
        extents: b.extents,
        flags: b.flags,
        sealed: b.payload,
    }
}

/// What one [`Uploader::step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Journal records read.
    pub records: usize,
    /// The journal was trimmed through this record.
    pub trimmed_through: Option<u64>,
}

/// The uploader of one disk: a store writer and the journal records not yet trimmed.
pub struct Uploader {
    store: Store,
    disk: DiskId,
    owner: String,
    core: SharedDisk,
    cfg: UploadConfig,
    writer: DiskWriter,
    /// Next journal record to read.
    next: u64,
    /// Records read but not trimmed, in journal order.
    pending: VecDeque<(u64, Pending)>,
    last_flush: Instant,
    last_gc: Instant,
    dirty: bool,
    status: Arc<Mutex<UploadStatus>>,
    /// The machines' policies, for the owner's retention (`crate::policies`); without
    /// them `cfg.retention` applies.
    policies: Option<tokio::sync::watch::Receiver<crate::policies::Policies>>,
}

impl Uploader {
    /// Opens the store writer of `disk` (discovering what the store already has) and
    /// starts from the journal's first record.
    pub async fn open(
        store: Store,
        disk: DiskId,
        owner: String,
        core: SharedDisk,
        cfg: UploadConfig,
    ) -> anyhow::Result<Uploader> {
        let writer = store.disk_writer(disk, WriterConfig::default()).await?;
        let next = core.with(|c| c.journal().first_seq()).await?;
        Ok(Uploader {
            store,
            disk,
            owner,
            core,
            cfg,
            writer,
            next,
            pending: VecDeque::new(),
            last_flush: Instant::now(),
            last_gc: Instant::now(),
            dirty: false,
            status: Arc::default(),
            policies: None,
        })
    }

    /// Reports into `status` (kept across restarts by [`supervise`]).
    pub fn with_status(mut self, status: Arc<Mutex<UploadStatus>>) -> Uploader {
        if let Some(epoch) = self.writer.epoch()
            && self.writer.last_cut_id() > 0
        {
            let mut st = status.lock().expect("status lock");
            st.newest_point = st
                .newest_point
                .max(Some((epoch, self.writer.last_cut_id())));
        }
        self.status = status;
        self
    }

    /// Looks up the owner's policies from now on (see [`Uploader::retention`]).
    pub fn with_policies(
        mut self,
        policies: tokio::sync::watch::Receiver<crate::policies::Policies>,
    ) -> Self {
        self.policies = Some(policies);
        self
    }

    /// How long the disk's points are kept now: the owner's policy's retention, else the
    /// server's; `None` while the policies are not known yet (`crate::policies`). Notes a
    /// change in the status and the log.
    fn retention(&self) -> Option<Duration> {
        let retention = match &self.policies {
            None => self.cfg.retention,
            Some(p) => {
                crate::policies::retention_for(&p.borrow(), &self.owner, self.cfg.retention)?
            }
        };
        let mut st = self.status.lock().expect("status lock");
        if st.retention != Some(retention) {
            tracing::info!(
                disk = %self.disk, machine = self.owner,
                retention_secs = retention.as_secs(),
                "recovery points are kept {}",
                humantime::format_duration(retention)
            );
            st.retention = Some(retention);
        }
        Some(retention)
    }

    /// The status this uploader reports into.
    pub fn status(&self) -> &Arc<Mutex<UploadStatus>> {
        &self.status
    }

    /// One round: upload up to 256 durable journal records; flush (and trim what the
    /// store then holds) when the interval or size is reached or the journal is drained;
    /// apply retention when due.
    pub async fn step(&mut self) -> anyhow::Result<Step> {
        let hex = self.disk.to_string();
        // Records durable in the journal, from where we are (disk I/O of up to 256
        // records, on a blocking thread like every use of the disk lock).
        let next = self.next;
        let records: Vec<_> = self
            .core
            .with(move |core| -> anyhow::Result<Vec<_>> {
                let journal = core.journal();
                let from = next.max(journal.first_seq());
                if from >= journal.durable().next_seq {
                    return Ok(Vec::new());
                }
                Ok(journal
                    .read_from(from)?
                    .take(256)
                    .collect::<Result<Vec<_>, _>>()?)
            })
            .await??;
        let mut step = Step {
            records: records.len(),
            trimmed_through: None,
        };
        for r in &records {
            self.next = r.seq + 1;
            let entry = decode_entry(r.kind, &r.payload)
                .with_context(|| format!("journal record {}", r.seq))?;
            let pending = self
                .upload(entry)
                .await
                .with_context(|| format!("uploading journal record {} of disk {hex}", r.seq))?;
            self.pending.push_back((r.seq, pending));
        }
        let due = self.dirty
            && (self.last_flush.elapsed() >= self.cfg.interval
                || self.writer.pending_bytes() >= self.cfg.bytes
                || records.is_empty());
        if due {
            let c = self
                .writer
                .flush()
                .await
                .with_context(|| format!("uploading disk {hex}"))?;
            self.last_flush = Instant::now();
            self.dirty = false;
            let device = device_of(&self.core).await?;
            self.status.lock().expect("status lock").flushed(
                &self.disk,
                (&self.owner, &device),
                &c,
            );
            step.trimmed_through = self.trim(&c).await?;
            tracing::debug!(disk = %hex, durable_seq = c.durable_seq, "uploaded");
        }
        let DiskSummary {
            waiting,
            device,
            durable,
        } = disk_summary(&self.core).await?;
        // Looked up every step, so a policy's change shows (log, metric) within a step.
        let retention = self.retention();
        if self.last_gc.elapsed() >= self.cfg.gc_interval
            && let Some(retention) = retention
        {
            self.last_gc = Instant::now();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let keep_after = now.saturating_sub(retention).as_nanos() as u64;
            match self.store.apply_retention(&self.disk, keep_after).await {
                Ok(r) if r.is_noop() => tracing::debug!(disk = %hex, "retention: nothing to do"),
                Ok(r) => tracing::info!(
                    disk = %hex, device, machine = self.owner,
                    "retention: {r}"
                ),
                Err(e) => tracing::warn!(
                    disk = %hex, device, machine = self.owner,
                    "retention failed (retried in {} s): {}",
                    self.cfg.gc_interval.as_secs(),
                    ripcord_types::report(&e)
                ),
            }
        }
        let mut st = self.status.lock().expect("status lock");
        st.note_durable(&durable);
        st.check_stale(
            &self.disk,
            (&self.owner, &device),
            waiting,
            self.cfg.point_age_warn,
        );
        Ok(step)
    }

    /// Hands one record to the store writer; returns what to wait for before trimming it.
    async fn upload(&mut self, entry: Entry) -> anyhow::Result<Pending> {
        let pending = match &entry {
            // A rotation's key is stored before `upload` returns: done once its epoch is.
            Entry::EpochStart(pd) | Entry::KeyRotation { pd, .. } => Pending::Epoch(pd.epoch),
            Entry::Batch(b) => Pending::Batch {
                epoch: b.epoch,
                seq: b.first_seq,
            },
            Entry::Cut(c) => Pending::Cut {
                epoch: c.epoch,
                id: c.id,
            },
        };
        if self.writer.epoch().is_some_and(|e| pending.epoch() < e) {
            // Committed before the store's newest epoch began (see the module doc).
            return Ok(pending);
        }
        match entry {
            Entry::EpochStart(pd) => {
                let info = EpochInfo {
                    epoch: pd.epoch,
                    machine_id: self.owner.clone(),
                    // The owner's latest name for the disk: its claim, shown to people.
                    device: self.core.with(|c| c.device.clone()).await?,
                    size_bytes: pd.size_bytes,
                    sector_size: pd.sector_size,
                    wrapped_key: pd.wrapped_key,
                };
                // A new epoch flushes the previous one; its records are trimmed as done
                // (older epoch) by the next flush.
                self.writer.begin_epoch(&info).await?;
            }
            Entry::KeyRotation { from_seq, pd } => {
                self.writer
                    .rotate_key(&ripcord_store::KeyRotation {
                        epoch: pd.epoch,
                        from_seq,
                        wrapped_key: pd.wrapped_key,
                    })
                    .await?;
            }
            Entry::Batch(b) => {
                self.writer.add_batch(to_store(b)).await?;
                self.dirty = true;
            }
            Entry::Cut(c) => {
                self.writer.add_cut(CutInfo {
                    epoch: c.epoch,
                    cut_id: c.id,
                    seq: c.seq,
                    time_ns: c.time_ns,
                    mono_ns: c.mono_ns,
                    kind: c.kind,
                    // The agent's MAC, carried verbatim: this server holds no data key.
                    mac: c.mac,
                    // Covered by that MAC: the cut's place in a group point.
                    group: c.group,
                })?;
                self.dirty = true;
            }
        }
        Ok(pending)
    }

    /// Trims the journal through the last record whose content the store has committed.
    async fn trim(&mut self, c: &Committed) -> anyhow::Result<Option<u64>> {
        let mut trim_to = None;
        while let Some(&(seq, p)) = self.pending.front() {
            if !p.done(c) {
                break;
            }
            trim_to = Some(seq);
            self.pending.pop_front();
        }
        if let Some(seq) = trim_to {
            self.core.with(move |core| core.trim_through(seq)).await??;
        }
        Ok(trim_to)
    }
}

/// The owner's name for the disk, for log lines ("?" if it gave none).
async fn device_of(core: &SharedDisk) -> anyhow::Result<String> {
    Ok(disk_summary(core).await?.device)
}

/// What the uploader's status needs of a disk's core, read in one lock.
struct DiskSummary {
    /// Whether the journal holds records not yet trimmed (data no point covers yet).
    waiting: bool,
    /// The owner's name for the disk.
    device: String,
    /// The receiver's durable position.
    durable: ripcord_proto::DurableState,
}

async fn disk_summary(core: &SharedDisk) -> anyhow::Result<DiskSummary> {
    core.with(|core| {
        let journal = core.journal();
        DiskSummary {
            waiting: journal.first_seq() < journal.durable().next_seq,
            device: core.device.clone().unwrap_or_else(|| "?".to_owned()),
            durable: core.durable_state(),
        }
    })
    .await
}

/// Upload `disk`'s journal until `stop` is set: the uploader is reopened after any error,
/// 1 s later at first and up to 30 s later while errors go on; `status` tells the metrics
/// and the log what happens.
pub async fn supervise(
    store: Store,
    disk: DiskId,
    owner: String,
    core: SharedDisk,
    cfg: UploadConfig,
    status: Arc<Mutex<UploadStatus>>,
    policies: tokio::sync::watch::Receiver<crate::policies::Policies>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        let result: anyhow::Result<std::convert::Infallible> = async {
            let mut uploader =
                Uploader::open(store.clone(), disk, owner.clone(), core.clone(), cfg)
                    .await?
                    .with_status(Arc::clone(&status))
                    .with_policies(policies.clone());
            loop {
                let step = uploader.step().await?;
                // Back to a short delay only once the store took a flush again.
                if status.lock().expect("status lock").failing.is_none() {
                    delay = Duration::from_secs(1);
                }
                if step.records == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        .await;
        let Err(e) = result;
        let summary = disk_summary(&core).await;
        {
            let mut st = status.lock().expect("status lock");
            // Whether the newest point holds every durable batch does not depend on
            // uploads working.
            if let Ok(s) = &summary {
                st.note_durable(&s.durable);
            }
            let (waiting, device) =
                summary.map_or((true, "?".to_owned()), |s| (s.waiting, s.device));
            st.failed(&disk, (&owner, &device), &e, delay);
            st.check_stale(&disk, (&owner, &device), waiting, cfg.point_age_warn);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
