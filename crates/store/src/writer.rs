//! The per-disk writer used by the uploader.
//!
//! Commit protocol of one [`DiskWriter::flush`]:
//! 1. upload the pending pack(s) (immutable, random-suffixed names);
//! 2. put one index segment `index/<E>-<last>-<first>-00000000.idx` listing
//!    every batch of those packs: from here the batches are durable;
//! 3. put one catalog segment holding every cut whose `seq` is now durable, each
//!    stamped with this writer's clock (its commit time, which retention uses), then
//!    run at most one catalog compaction step (see [`crate::catalog`]; best effort);
//! 4. every `checkpoint_every_batches` batches, put a checkpoint (the extent
//!    map as of the durable seq), built from the previous checkpoint and the
//!    segments after it.
//!
//! A crash between any two steps leaves the store consistent: an uploaded but
//! unindexed pack is an orphan that GC deletes after its grace period; a cut
//! not yet in the catalog is re-sent by the journal; a missing checkpoint only
//! makes resolution read a few more segments. Reopening a writer discovers the
//! last epoch, the durable seq and the newest committed cut id (from the catalog
//! segment names alone), and ignores replayed batches/cuts at or below them.

use crate::error::{Error, Result};
use crate::format::CatalogEntry;
use crate::format::{self, Checkpoint, DirEntry, IndexEntry, Segment};
use crate::store::Store;
use crate::types::{
    BatchLocation, Committed, CutInfo, DiskId, EpochInfo, ExtentKind, KeyRotation, SealedBatch,
};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writer tuning.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// A pack is uploaded once it reaches this size (default 48 MiB). Every
    /// flush also uploads the partial pack, so the flush cadence bounds pack
    /// size from below.
    pub pack_target_bytes: u64,
    /// Write a checkpoint after this many newly committed batches (default 4096).
    pub checkpoint_every_batches: u64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            pack_target_bytes: 48 << 20,
            checkpoint_every_batches: 4096,
        }
    }
}

#[derive(Debug)]
struct PackBuf {
    name: String,
    buf: Vec<u8>,
    dir: Vec<DirEntry>,
    entries: Vec<IndexEntry>,
}

/// Writes the batches, cuts and epochs of one disk. Single writer per disk.
#[derive(Debug)]
pub struct DiskWriter {
    store: Store,
    disk: DiskId,
    cfg: WriterConfig,
    epoch: Option<EpochInfo>,
    durable: u64,
    accepted: u64,
    open_pack: Option<PackBuf>,
    sealed_packs: Vec<PackBuf>,
    uncommitted: Vec<IndexEntry>,
    pending_cuts: BTreeMap<u64, CutInfo>,
    /// Commit time of pending cuts a flush already tried to commit, by cut id: a retry
    /// writes the same entry, so every copy of an entry is identical.
    stamps: BTreeMap<u64, u64>,
    max_cut_id: u64,
    reported: Vec<u64>,
    last_ckpt: u64,
}

impl Store {
    /// Opens the writer of `disk`, discovering what is already committed
    /// (epoch, durable seq, newest cut) so the uploader resumes without
    /// duplicates or gaps.
    pub async fn disk_writer(&self, disk: DiskId, cfg: WriterConfig) -> Result<DiskWriter> {
        let mut w = DiskWriter {
            store: self.clone(),
            disk,
            cfg,
            epoch: None,
            durable: 0,
            accepted: 0,
            open_pack: None,
            sealed_packs: Vec::new(),
            uncommitted: Vec::new(),
            pending_cuts: BTreeMap::new(),
            stamps: BTreeMap::new(),
            max_cut_id: 0,
            reported: Vec::new(),
            last_ckpt: 0,
        };
        let epochs = self
            .list(&format!("{}/epochs", format::disk_dir(&disk)))
            .await?;
        let Some(e) = epochs
            .iter()
            .filter_map(|l| format::parse_epoch(&l.name))
            .max()
        else {
            return Ok(w);
        };
        w.epoch = Some(self.epoch_info(&disk, e).await?);
        let idx = self.epoch_index(&disk, e, None).await?;
        w.durable = idx.durable();
        w.accepted = w.durable;
        w.last_ckpt = idx.checkpoints.iter().map(|c| c.seq).max().unwrap_or(0);
        // Names alone: the newest point is never expired (crate::catalog, invariant 3).
        w.max_cut_id = self
            .catalog_listing(&disk)
            .await?
            .segments
            .iter()
            .filter(|n| n.epoch == e)
            .map(|n| n.last)
            .max()
            .unwrap_or(0);
        tracing::info!(disk = %disk, epoch = e, durable = w.durable, max_cut = w.max_cut_id, "writer resumed");
        Ok(w)
    }
}

impl DiskWriter {
    /// Current epoch, if any.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch.as_ref().map(|e| e.epoch)
    }

    /// Highest committed seq of the current epoch (0 = none).
    pub fn durable_seq(&self) -> u64 {
        self.durable
    }

    /// The seq the next [`DiskWriter::add_batch`] must carry.
    pub fn next_seq(&self) -> u64 {
        self.accepted + 1
    }

    /// Newest cut id accepted (committed or pending) in the current epoch.
    pub fn last_cut_id(&self) -> u64 {
        self.max_cut_id
    }

    /// Bytes buffered or uploaded but not yet committed.
    pub fn pending_bytes(&self) -> u64 {
        let open = self.open_pack.as_ref().map_or(0, |p| p.buf.len() as u64);
        open + self
            .sealed_packs
            .iter()
            .map(|p| p.buf.len() as u64)
            .sum::<u64>()
    }

    fn disk_hex(&self) -> String {
        self.disk.to_string()
    }

    /// Starts (or confirms) an epoch. A new, higher epoch first flushes the
    /// previous one (the returned [`Committed`] reports that flush), then
    /// stores `epochs/<E>.json` before any pack of the epoch.
    pub async fn begin_epoch(&mut self, info: &EpochInfo) -> Result<Option<Committed>> {
        let mut flushed = None;
        if let Some(cur) = self.epoch.clone() {
            if info.epoch < cur.epoch {
                return Err(Error::EpochRegression {
                    disk: self.disk_hex(),
                    current: cur.epoch,
                    got: info.epoch,
                });
            }
            if info.epoch == cur.epoch {
                // The device name is the agent's claim, for people: a new one (a renamed
                // device, an epoch begun before names were kept) is no conflict, and the
                // stored description stays as it is.
                let unnamed = |e: &EpochInfo| EpochInfo {
                    device: None,
                    ..e.clone()
                };
                if unnamed(&cur) != unnamed(info) {
                    return Err(Error::EpochConflict {
                        disk: self.disk_hex(),
                        epoch: info.epoch,
                        object: format::epoch_name(&self.disk, info.epoch),
                    });
                }
                return Ok(None);
            }
            flushed = Some(self.flush().await?);
            if !self.pending_cuts.is_empty() {
                tracing::warn!(disk = %self.disk, epoch = cur.epoch, n = self.pending_cuts.len(),
                    "dropping cuts never made durable before the epoch ended");
            }
        }
        self.store
            .put(
                &format::epoch_name(&self.disk, info.epoch),
                format::encode_epoch(info),
            )
            .await?;
        self.epoch = Some(info.clone());
        self.durable = 0;
        self.accepted = 0;
        self.pending_cuts.clear();
        self.stamps.clear();
        self.max_cut_id = 0;
        self.reported.clear();
        self.last_ckpt = 0;
        Ok(flushed)
    }

    /// Stores a key rotation of the current epoch (see `format::key`): before any batch
    /// sealed with its key is added. Storing one again is harmless (same name, same
    /// bytes: a journal replayed after a restart).
    pub async fn rotate_key(&mut self, rotation: &KeyRotation) -> Result<()> {
        self.check_epoch(rotation.epoch)?;
        self.store
            .put(
                &format::key_rotation_name(&self.disk, rotation.epoch, rotation.from_seq),
                format::encode_key_rotation(rotation),
            )
            .await?;
        tracing::info!(disk = %self.disk, epoch = rotation.epoch, from_seq = rotation.from_seq,
            "key rotation stored");
        Ok(())
    }

    fn check_epoch(&self, epoch: u64) -> Result<()> {
        match &self.epoch {
            None => Err(Error::NoEpoch {
                disk: self.disk_hex(),
            }),
            Some(e) if e.epoch != epoch => Err(Error::WrongEpoch {
                disk: self.disk_hex(),
                current: e.epoch,
                got: epoch,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Adds one batch. Returns `Ok(false)` for a duplicate of an already
    /// accepted seq (ignored). Seqs must be contiguous from 1 within an
    /// epoch. When the open pack reaches the target size it is uploaded here;
    /// if that upload fails the batch stays accepted and the upload is retried
    /// by the next `add_batch`/`flush`.
    pub async fn add_batch(&mut self, b: SealedBatch) -> Result<bool> {
        self.check_epoch(b.epoch)?;
        if b.seq <= self.accepted {
            tracing::debug!(disk = %self.disk, seq = b.seq, "duplicate batch ignored");
            return Ok(false);
        }
        if b.seq != self.accepted + 1 {
            return Err(Error::SeqGap {
                disk: self.disk_hex(),
                epoch: b.epoch,
                expected: self.accepted + 1,
                got: b.seq,
            });
        }
        if b.extents.len() as u64 > format::MAX_EXTENTS
            || b.sealed.len() as u64 > format::MAX_SEALED
        {
            return Err(Error::InvalidBatch {
                seq: b.seq,
                reason: "too many extents or sealed payload larger than 1 GiB",
            });
        }
        if b.extents
            .iter()
            .any(|x| x.sector.checked_add(u64::from(x.sectors)).is_none())
        {
            return Err(Error::InvalidBatch {
                seq: b.seq,
                reason: "extent range overflows",
            });
        }
        let pack = self.open_pack.get_or_insert_with(|| PackBuf {
            name: format::pack_name(&self.disk, b.epoch, b.seq),
            buf: format::pack_header(&self.disk, b.epoch),
            dir: Vec::new(),
            entries: Vec::new(),
        });
        let (rec, crc) = format::encode_record(b.epoch, b.seq, b.flags, &b.extents, &b.sealed);
        let offset = pack.buf.len() as u64;
        pack.buf.extend_from_slice(&rec);
        pack.dir.push(DirEntry {
            seq: b.seq,
            offset,
            length: rec.len() as u64,
            crc,
        });
        pack.entries.push(IndexEntry {
            loc: BatchLocation {
                pack: pack.name.clone(),
                offset,
                length: rec.len() as u64,
                epoch: b.epoch,
                seq: b.seq,
                checksum: crc,
            },
            flags: b.flags,
            extents: b.extents,
        });
        self.accepted = b.seq;
        if pack.buf.len() as u64 >= self.cfg.pack_target_bytes {
            self.seal_open_pack();
            self.upload_packs().await?;
        }
        Ok(true)
    }

    fn seal_open_pack(&mut self) {
        if let Some(mut p) = self.open_pack.take() {
            let footer = format::pack_footer(&p.dir);
            p.buf.extend_from_slice(&footer);
            self.sealed_packs.push(p);
        }
    }

    async fn upload_packs(&mut self) -> Result<()> {
        while let Some(p) = self.sealed_packs.first() {
            // Same name on retry: a put that succeeded but reported failure
            // is simply overwritten with identical bytes.
            self.store.put(&p.name, p.buf.clone()).await?;
            let p = self.sealed_packs.remove(0);
            tracing::debug!(pack = %p.name, bytes = p.buf.len(), batches = p.entries.len(), "pack uploaded");
            self.uncommitted.extend(p.entries);
        }
        Ok(())
    }

    /// Adds a cut. It is committed to the catalog by the first flush after
    /// every batch with `seq <= cut.seq` is durable. Cuts with an id at or
    /// below the newest accepted one are duplicates and ignored (`Ok(false)`).
    pub fn add_cut(&mut self, c: CutInfo) -> Result<bool> {
        self.check_epoch(c.epoch)?;
        if c.cut_id <= self.max_cut_id {
            return Ok(false);
        }
        self.max_cut_id = c.cut_id;
        self.pending_cuts.insert(c.cut_id, c);
        Ok(true)
    }

    /// Uploads the pending pack, commits its index segment, commits cuts that
    /// are now fully durable and writes a checkpoint when due. On error the
    /// store stays consistent and calling `flush` again resumes where it
    /// failed. Cuts are stamped with the system clock (see [`DiskWriter::flush_at`]).
    pub async fn flush(&mut self) -> Result<Committed> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.flush_at(now).await
    }

    /// [`DiskWriter::flush`] with an explicit clock: cuts it commits carry `now_ns`
    /// (unix ns) as their commit time, the time retention compares.
    pub async fn flush_at(&mut self, now_ns: u64) -> Result<Committed> {
        let Some(epoch) = self.epoch.as_ref().map(|e| e.epoch) else {
            return Ok(Committed {
                epoch: 0,
                durable_seq: 0,
                cuts_committed: Vec::new(),
                cuts_through: 0,
            });
        };
        self.seal_open_pack();
        self.upload_packs().await?;
        if let (Some(first), Some(last)) = (self.uncommitted.first(), self.uncommitted.last()) {
            let seg = Segment {
                epoch,
                first: first.loc.seq,
                last: last.loc.seq,
                generation: 0,
                entries: self.uncommitted.clone(),
            };
            let name = format::index_name(&self.disk, epoch, seg.first, seg.last, 0);
            self.store
                .put(&name, format::encode_segment(&self.disk, &seg))
                .await?;
            tracing::debug!(index = %name, batches = seg.entries.len(), "index segment committed");
            self.durable = seg.last;
            self.uncommitted.clear();
        }
        let ready: Vec<CutInfo> = self
            .pending_cuts
            .values()
            .filter(|c| c.seq <= self.durable)
            .copied()
            .collect();
        if !ready.is_empty() {
            let entries: Vec<CatalogEntry> = ready
                .iter()
                .map(|&cut| CatalogEntry {
                    cut,
                    committed_ns: *self.stamps.entry(cut.cut_id).or_insert(now_ns),
                })
                .collect();
            let name = self
                .store
                .put_catalog_segment(&self.disk, epoch, &entries)
                .await?;
            tracing::debug!(catalog = %name, cuts = entries.len(), "cuts committed");
            for c in &ready {
                self.pending_cuts.remove(&c.cut_id);
                self.stamps.remove(&c.cut_id);
                self.reported.push(c.cut_id);
            }
            if let Err(e) = self.store.compact_catalog(&self.disk, epoch).await {
                tracing::warn!(disk = %self.disk, epoch, error = %e,
                    "catalog compaction failed (retried after the next commit)");
            }
        }
        if self.durable >= self.last_ckpt + self.cfg.checkpoint_every_batches.max(1) {
            self.write_checkpoint(epoch).await?;
        }
        // Pending cuts are the only ones not done; everything accepted below the lowest
        // of them is in the catalog (or a duplicate of a cut that is).
        let cuts_through = self
            .pending_cuts
            .keys()
            .next()
            .map_or(self.max_cut_id, |&lowest| lowest - 1);
        Ok(Committed {
            epoch,
            durable_seq: self.durable,
            cuts_committed: std::mem::take(&mut self.reported),
            cuts_through,
        })
    }

    async fn write_checkpoint(&mut self, epoch: u64) -> Result<()> {
        let seq = self.durable;
        let crate::resolve::Loaded { map, locs, .. } =
            self.store.load_map(&self.disk, epoch, seq).await?;
        let mut locations: Vec<BatchLocation> = locs.into_values().collect();
        locations.sort_by_key(|l| l.seq);
        let ck = Checkpoint {
            epoch,
            seq,
            generation: 0,
            locations,
            runs: map.runs().collect(),
        };
        let name = format::checkpoint_name(&self.disk, epoch, seq, 0);
        self.store
            .put(&name, format::encode_checkpoint(&self.disk, &ck))
            .await?;
        tracing::debug!(checkpoint = %name, runs = ck.runs.len(), "checkpoint written");
        self.last_ckpt = seq;
        Ok(())
    }
}

/// Bytes of plaintext a batch's Data extents describe (for integrators that
/// want to check an unsealed payload).
pub fn data_len(extents: &[crate::types::Extent]) -> u64 {
    extents
        .iter()
        .filter(|x| x.kind == ExtentKind::Data)
        .map(|x| u64::from(x.sectors) * crate::types::SECTOR_BYTES)
        .sum()
}
