//! The uploader: journal records to packs, index and recovery-point catalog in the target
//! store; then trims the journal. A recovery point is committed by the store only after all
//! its data is durable there; the journal is trimmed only through records whose content the
//! store has committed.
//!
//! Restart-safe: the store's writer discovers what is committed and ignores batches it
//! already has, so re-reading untrimmed journal records is harmless.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ripcord_store::{Committed, CutInfo, DiskId, EpochInfo, SealedBatch, Store, WriterConfig};

use crate::disk::{DiskCore, Entry, decode_entry};

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
}

/// What a record was, for deciding how far the journal may be trimmed.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Epoch(u64),
    Batch { epoch: u64, seq: u64 },
    Cut { epoch: u64, id: u64 },
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

/// Upload `disk`'s journal forever (until the task is dropped).
pub async fn run(
    store: Store,
    disk: DiskId,
    owner: String,
    core: Arc<Mutex<DiskCore>>,
    cfg: UploadConfig,
) -> anyhow::Result<()> {
    let hex = disk.to_string();
    let mut writer = store.disk_writer(disk, WriterConfig::default()).await?;
    let mut next = core.lock().expect("disk lock").journal().first_seq();
    let mut pending: VecDeque<(u64, Pending)> = VecDeque::new();
    let mut committed_cuts: Vec<(u64, u64)> = Vec::new();
    let mut last_flush = Instant::now();
    let mut last_gc = Instant::now();
    let mut dirty = false;
    loop {
        // Records durable in the journal, from where we are.
        let records: Vec<_> = {
            let core = core.lock().expect("disk lock");
            let journal = core.journal();
            let from = next.max(journal.first_seq());
            if from >= journal.durable().next_seq {
                Vec::new()
            } else {
                journal
                    .read_from(from)?
                    .take(256)
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        for r in &records {
            next = r.seq + 1;
            match decode_entry(r.kind, &r.payload)
                .with_context(|| format!("journal record {}", r.seq))?
            {
                Entry::EpochStart(pd) => {
                    let info = EpochInfo {
                        epoch: pd.epoch,
                        machine_id: owner.clone(),
                        size_bytes: pd.size_bytes,
                        sector_size: pd.sector_size,
                        wrapped_key: pd.wrapped_key,
                    };
                    if let Some(c) = writer.begin_epoch(&info).await? {
                        note(&mut committed_cuts, &c);
                    }
                    pending.push_back((r.seq, Pending::Epoch(pd.epoch)));
                }
                Entry::Batch(b) => {
                    let (epoch, seq) = (b.epoch, b.first_seq);
                    writer.add_batch(to_store(b)).await?;
                    pending.push_back((r.seq, Pending::Batch { epoch, seq }));
                    dirty = true;
                }
                Entry::Cut(c) => {
                    writer.add_cut(CutInfo {
                        epoch: c.epoch,
                        cut_id: c.id,
                        seq: c.seq,
                        time_ns: c.time_ns,
                        mono_ns: c.mono_ns,
                        kind: c.kind,
                    })?;
                    pending.push_back((
                        r.seq,
                        Pending::Cut {
                            epoch: c.epoch,
                            id: c.id,
                        },
                    ));
                    dirty = true;
                }
            }
        }
        let due = dirty
            && (last_flush.elapsed() >= cfg.interval
                || writer.pending_bytes() >= cfg.bytes
                || records.is_empty());
        if due {
            let c = writer
                .flush()
                .await
                .with_context(|| format!("uploading disk {hex}"))?;
            note(&mut committed_cuts, &c);
            last_flush = Instant::now();
            dirty = false;
            // Trim through the last record whose content the store has committed.
            let mut trim_to = None;
            while let Some(&(seq, p)) = pending.front() {
                let done = match p {
                    Pending::Epoch(e) => e <= c.epoch,
                    Pending::Batch { epoch, seq } => {
                        epoch < c.epoch || (epoch == c.epoch && seq <= c.durable_seq)
                    }
                    Pending::Cut { epoch, id } => {
                        epoch < c.epoch || committed_cuts.contains(&(epoch, id))
                    }
                };
                if !done {
                    break;
                }
                trim_to = Some(seq);
                pending.pop_front();
            }
            if let Some(seq) = trim_to {
                let mut core = core.lock().expect("disk lock");
                core.trim_through(seq)?;
            }
            tracing::debug!(disk = %hex, durable_seq = c.durable_seq, "uploaded");
        }
        if last_gc.elapsed() >= cfg.gc_interval {
            last_gc = Instant::now();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let keep_after = now.saturating_sub(cfg.retention).as_nanos() as u64;
            match store.apply_retention(&disk, keep_after).await {
                Ok(r) => tracing::info!(disk = %hex, report = ?r, "retention applied"),
                Err(e) => tracing::warn!(disk = %hex, "retention failed (will retry): {e}"),
            }
        }
        if records.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn note(cuts: &mut Vec<(u64, u64)>, c: &Committed) {
    cuts.extend(c.cuts_committed.iter().map(|&id| (c.epoch, id)));
    if cuts.len() > 4096 {
        cuts.drain(..2048);
    }
}
