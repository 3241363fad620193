//! Retention and garbage collection.
//!
//! # Protocol (safe against one concurrent [`crate::DiskWriter`])
//!
//! One GC per disk at a time; any number of readers and one writer may run
//! concurrently. All objects are immutable; GC only creates objects with new
//! names and deletes objects, in this order:
//!
//! 0. List epochs (the newest one is the one the writer may still write),
//!    then read the catalog.
//! 1. **Expire points** ([`crate::catalog`]): a point expires when the writer
//!    *committed* it before the cutoff (`committed_ns`, the server's clock; the
//!    agent's `time_ns` plays no part), except the newest point (the highest
//!    `(epoch, cut id)`, so a reopened writer still sees its newest cut id). GC
//!    first puts an expiry mark (cutoff and newest point, never decreasing), from
//!    which on no reader lists an expired point whatever object still holds it
//!    (a segment a concurrent compaction merged, a rewrite a crash interrupted);
//!    then it rewrites each segment holding expired entries without them (new
//!    segment first, then the old deleted; one left empty is just deleted). The
//!    points retained are exactly those readers list from then on, so freeing
//!    the data of the others in step 3 never breaks a listed point.
//! 2. **Drop whole epochs** that have no retained point and are not the
//!    newest epoch (the writer only writes the newest epoch): catalog,
//!    index, checkpoints, packs, then the epoch object last (a crash midway
//!    is finished by the next run).
//! 3. **Per kept epoch**, from a snapshot of its index taken *after* the
//!    catalog was read: a batch is *needed* if it holds the latest copy of
//!    some sector at a retained point, or — in the newest epoch — at any seq
//!    `>= W`, where `W` is the seq of the newest committed cut of that epoch
//!    (expired or not). Cuts are committed in id order with non-decreasing
//!    seqs and the writer ignores ids at or below the newest committed one,
//!    so any point committed after the catalog was read has seq `>= W`.
//!    (Batches after `W` are all kept; with no cut yet, all are kept.)
//!    `C0` = newest checkpoint at or before the oldest such seq.
//!    * packs whose needed bytes are below `rewrite_below` of their size are
//!      copied (needed records verbatim, no keys) into new packs;
//!    * every live index object that references a dead or rewritten pack is
//!      rewritten as generation `g+1` (unneeded entries dropped, relocated
//!      entries updated) and only then is generation `g` deleted;
//!    * segments entirely at or below `C0` and checkpoints older than `C0`
//!      are deleted (`C0` stays, so the writer's durable seq is still
//!      discoverable; the newest segment is never below `C0`).
//! 4. **Delete packs through a grace period**: a pack that no live index
//!    object references is recorded in a `gc/*.doomed` marker with the time it
//!    was first seen unreferenced. It is deleted by a later run only when it
//!    has been unreferenced for `grace` *and* the object itself is older than
//!    `grace`. This covers (a) packs the writer uploaded but has not yet
//!    indexed, and (b) a writer or reader that read an older index
//!    generation: a checkpoint the writer builds from it is committed within
//!    one flush, so a later run sees the reference and keeps the pack.
//!
//! Requirements on the writer: commit (flush) within `grace` of uploading a
//! pack (flush at least every `grace / 2`). Readers that race a GC may see
//! [`crate::Error::NotFound`] for an index object and should retry.

use crate::error::{Error, Result};
use crate::format::{self, Checkpoint, Segment};
use crate::resolve::ExtentMap;
use crate::store::{Listed, Store};

mod packs;
use crate::types::{BatchLocation, DiskId};
use packs::NewPack;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// GC tuning.
#[derive(Clone, Debug)]
pub struct GcConfig {
    /// How long a pack must be unreferenced (and old) before deletion (default 1 h).
    pub grace: Duration,
    /// Packs whose needed bytes are below this fraction of their size are
    /// rewritten (default 0.5).
    pub rewrite_below: f64,
    /// Target size of packs written by rewrites (default 48 MiB).
    pub pack_target_bytes: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace: Duration::from_secs(3600),
            rewrite_below: 0.5,
            pack_target_bytes: 48 << 20,
        }
    }
}

/// What a GC run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Ids of the points expired by this run (their catalog entries removed).
    pub points_expired: Vec<String>,
    /// Epochs deleted whole.
    pub epochs_deleted: Vec<u64>,
    /// Packs deleted (whole epochs and after grace).
    pub packs_deleted: usize,
    /// Bytes of the deleted packs.
    pub bytes_deleted: u64,
    /// Packs whose needed records were copied into new packs.
    pub packs_rewritten: usize,
    /// New packs written by rewrites.
    pub packs_written: usize,
    /// Bytes copied by rewrites.
    pub bytes_copied: u64,
    /// Index objects (segments/checkpoints) written as a new generation.
    pub index_rewritten: usize,
    /// Index objects deleted (old generations, segments below a checkpoint,
    /// old checkpoints).
    pub index_deleted: usize,
    /// Unreferenced packs waiting for their grace period.
    pub packs_awaiting_grace: usize,
}

impl GcReport {
    /// Whether the run deleted or rewrote nothing.
    pub fn is_noop(&self) -> bool {
        self.points_expired.is_empty()
            && self.epochs_deleted.is_empty()
            && self.packs_deleted == 0
            && self.packs_rewritten == 0
            && self.index_rewritten == 0
            && self.index_deleted == 0
    }
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} points expired, {} epochs deleted, {} packs deleted ({} MiB), {} packs \
             rewritten into {} ({} MiB copied), {} index objects rewritten and {} deleted",
            self.points_expired.len(),
            self.epochs_deleted.len(),
            self.packs_deleted,
            self.bytes_deleted >> 20,
            self.packs_rewritten,
            self.packs_written,
            self.bytes_copied >> 20,
            self.index_rewritten,
            self.index_deleted,
        )?;
        if self.packs_awaiting_grace > 0 {
            write!(
                f,
                "; {} unreferenced packs wait for their grace period",
                self.packs_awaiting_grace
            )?;
        }
        Ok(())
    }
}

fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Store {
    /// Applies retention to `disk` with the default [`GcConfig`] and the
    /// current time: points committed (by the writer's clock) before
    /// `keep_after_time_ns` expire, the newest always stays. See the
    /// [module docs](crate::gc) for the protocol.
    pub async fn apply_retention(
        &self,
        disk: &DiskId,
        keep_after_time_ns: u64,
    ) -> Result<GcReport> {
        self.apply_retention_with(
            disk,
            keep_after_time_ns,
            &GcConfig::default(),
            SystemTime::now(),
        )
        .await
    }

    /// [`Store::apply_retention`] with an explicit config and clock.
    pub async fn apply_retention_with(
        &self,
        disk: &DiskId,
        keep_after_time_ns: u64,
        cfg: &GcConfig,
        now: SystemTime,
    ) -> Result<GcReport> {
        let mut rep = GcReport::default();
        let dd = format::disk_dir(disk);

        // Epochs are listed before the catalog is read: if the writer moves
        // to a new epoch meanwhile, the epoch it left is still treated as the
        // newest here (and the new one is not touched).
        let epochs: BTreeSet<u64> = self
            .list(&format!("{dd}/epochs"))
            .await?
            .iter()
            .filter_map(|l| format::parse_epoch(&l.name))
            .collect();
        let latest = epochs.iter().copied().max();

        // 1. Expire points (by the writer's commit time; crate::catalog).
        let (cuts, retained, expired) = self.expire_points(disk, keep_after_time_ns).await?;
        rep.points_expired = expired;
        // Cuts committed later have a higher id and so a seq at or above the
        // newest committed cut's seq: every seq from there on is a potential
        // future point.
        let future_from = latest.map(|l| {
            cuts.iter()
                .filter(|c| c.epoch == l)
                .map(|c| c.seq)
                .max()
                .unwrap_or(0)
        });

        // 2. Whole epochs.
        let mut packs = self.list(&format!("{dd}/packs")).await?;
        let mut kept = Vec::new();
        for &e in &epochs {
            if Some(e) != latest && !retained.iter().any(|c| c.epoch == e) {
                self.delete_epoch(disk, e, &packs, &mut rep).await?;
            } else {
                kept.push(e);
            }
        }
        // Packs of deleted epochs, and of epochs created after the listing.
        packs.retain(|p| format::parse_pack(&p.name).is_some_and(|(e, _)| kept.contains(&e)));

        // 3. Compact kept epochs.
        let sizes: HashMap<&str, u64> = packs.iter().map(|p| (p.name.as_str(), p.size)).collect();
        let mut referenced: HashSet<String> = HashSet::new();
        for &e in &kept {
            let pts: Vec<u64> = retained
                .iter()
                .filter(|c| c.epoch == e)
                .map(|c| c.seq)
                .collect();
            let fut = if Some(e) == latest { future_from } else { None };
            self.compact_epoch(disk, e, fut, pts, &sizes, cfg, &mut referenced, &mut rep)
                .await?;
        }

        // 4. Grace-period deletion of unreferenced packs.
        self.sweep_packs(disk, &packs, &referenced, cfg, now, &mut rep)
            .await?;
        tracing::info!(disk = %disk, ?rep, "retention applied");
        Ok(rep)
    }

    async fn delete_epoch(
        &self,
        disk: &DiskId,
        e: u64,
        packs: &[Listed],
        rep: &mut GcReport,
    ) -> Result<()> {
        let dd = format::disk_dir(disk);
        let pre = format!("{e:020}-");
        let base = |n: &str| n.rsplit('/').next().unwrap_or("").starts_with(&pre);
        for dir in ["catalog", "index", "checkpoints", "keys"] {
            for l in self.list(&format!("{dd}/{dir}")).await? {
                if base(&l.name) {
                    self.delete(&l.name).await?;
                    if !matches!(dir, "catalog" | "keys") {
                        rep.index_deleted += 1;
                    }
                }
            }
        }
        for p in packs.iter().filter(|p| base(&p.name)) {
            self.delete(&p.name).await?;
            rep.packs_deleted += 1;
            rep.bytes_deleted += p.size;
        }
        self.delete(&format::epoch_name(disk, e)).await?;
        rep.epochs_deleted.push(e);
        tracing::info!(disk = %disk, epoch = e, "epoch deleted");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn compact_epoch(
        &self,
        disk: &DiskId,
        e: u64,
        future_from: Option<u64>,
        mut points: Vec<u64>,
        sizes: &HashMap<&str, u64>,
        cfg: &GcConfig,
        referenced: &mut HashSet<String>,
        rep: &mut GcReport,
    ) -> Result<()> {
        let idx = self.epoch_index(disk, e, None).await?;
        for name in &idx.superseded {
            self.delete(name).await?;
            rep.index_deleted += 1;
        }
        let d = idx.durable();
        let mut fut = future_from.map(|w| w.min(d));
        points.retain(|&p| p <= d);
        if points.is_empty() && fut.is_none() {
            // Defensive: nothing known to anchor on, keep every batch.
            fut = Some(0);
        }
        if let Some(w) = fut {
            points.push(w);
        }
        points.sort_unstable();
        points.dedup();
        let min_p = points[0];
        let c0 = idx
            .checkpoints
            .iter()
            .rev()
            .find(|c| c.seq <= min_p)
            .cloned();
        let c0_seq = c0.as_ref().map_or(0, |c| c.seq);

        // Live objects after this run.
        let mut ckpts: Vec<Checkpoint> = Vec::new();
        for c in idx.checkpoints.iter().filter(|c| c.seq >= c0_seq) {
            ckpts.push(self.read_checkpoint(disk, c).await?);
        }
        let live_segs: Vec<_> = idx
            .segments
            .iter()
            .filter(|s| s.last > c0_seq)
            .cloned()
            .collect();
        let segs: Vec<Segment> = self.read_segments(disk, &live_segs).await?;

        // Needed batches.
        let mut map = ckpts
            .first()
            .filter(|c| c.seq == c0_seq)
            .map(ExtentMap::from_checkpoint)
            .unwrap_or_default();
        let mut needed: BTreeSet<u64> = BTreeSet::new();
        let mut pi = 0;
        for ent in segs
            .iter()
            .flat_map(|s| s.entries.iter())
            .filter(|x| x.loc.seq > c0_seq)
        {
            while pi < points.len() && points[pi] < ent.loc.seq {
                needed.extend(map.referenced());
                pi += 1;
            }
            if fut.is_some_and(|w| ent.loc.seq > w) {
                needed.insert(ent.loc.seq);
            }
            map.apply(ent);
        }
        if pi < points.len() {
            needed.extend(map.referenced());
        }

        // Needed bytes per pack, over every location live objects reference.
        let mut all_locs: BTreeMap<(String, u64), BatchLocation> = BTreeMap::new();
        for l in ckpts.iter().flat_map(|c| c.locations.iter()) {
            all_locs.insert((l.pack.clone(), l.offset), l.clone());
        }
        for x in segs.iter().flat_map(|s| s.entries.iter()) {
            all_locs.insert((x.loc.pack.clone(), x.loc.offset), x.loc.clone());
        }
        let mut needed_bytes: BTreeMap<&str, u64> = BTreeMap::new();
        for ((pack, _), l) in &all_locs {
            let nb = needed_bytes.entry(pack.as_str()).or_default();
            if needed.contains(&l.seq) {
                *nb += l.length;
            }
        }
        let mut dead: HashSet<String> = HashSet::new();
        let mut rewrite: Vec<String> = Vec::new();
        for (&pack, &nb) in &needed_bytes {
            let Some(&size) = sizes.get(pack) else {
                tracing::warn!(pack, "index references a missing pack; run verify");
                continue;
            };
            if nb == 0 {
                dead.insert(pack.to_string());
            } else if (nb as f64) < cfg.rewrite_below * size as f64 {
                rewrite.push(pack.to_string());
            }
        }

        // Copy needed records of sparse packs into new packs.
        let mut reloc: HashMap<(String, u64), BatchLocation> = HashMap::new();
        let mut out = NewPack::default();
        for pack in &rewrite {
            let recs: Vec<&BatchLocation> = all_locs
                .range((pack.clone(), 0)..=(pack.clone(), u64::MAX))
                .map(|(_, l)| l)
                .filter(|l| needed.contains(&l.seq))
                .collect();
            let ranges: Vec<_> = recs.iter().map(|l| l.offset..l.offset + l.length).collect();
            let bufs = self.get_ranges(pack, &ranges).await?;
            for (l, b) in recs.iter().zip(bufs) {
                let r = format::named(format::decode_record(&b), pack)?;
                if r.crc != l.checksum || r.seq != l.seq || r.len != l.length {
                    return Err(Error::corrupt(
                        pack,
                        crate::error::Corruption::Mismatch {
                            what: "index entry during GC rewrite",
                        },
                    ));
                }
                let nl = out.push(disk, e, l, &b);
                reloc.insert((pack.clone(), l.offset), nl);
                rep.bytes_copied += l.length;
                if out.buf.len() as u64 >= cfg.pack_target_bytes {
                    out.upload(self, rep).await?;
                }
            }
            rep.packs_rewritten += 1;
        }
        out.upload(self, rep).await?;

        // Rewrite affected index objects (new generation first, then delete old).
        let gone = |p: &str| dead.contains(p) || rewrite.iter().any(|r| r == p);
        let fix = |l: &BatchLocation| {
            reloc
                .get(&(l.pack.clone(), l.offset))
                .cloned()
                .unwrap_or_else(|| l.clone())
        };
        for (seg, sname) in segs.iter().zip(&live_segs) {
            let mut keep = seg.clone();
            if seg.entries.iter().any(|x| gone(&x.loc.pack)) {
                keep.generation += 1;
                keep.entries = seg
                    .entries
                    .iter()
                    .filter(|x| x.loc.seq > c0_seq && needed.contains(&x.loc.seq))
                    .map(|x| {
                        let mut x = x.clone();
                        x.loc = fix(&x.loc);
                        x
                    })
                    .collect();
                let name = format::index_name(disk, e, keep.first, keep.last, keep.generation);
                self.put(&name, format::encode_segment(disk, &keep)).await?;
                self.delete(&sname.name).await?;
                rep.index_rewritten += 1;
                rep.index_deleted += 1;
            }
            referenced.extend(keep.entries.iter().map(|x| x.loc.pack.clone()));
        }
        for ck in &ckpts {
            let mut keep = ck.clone();
            if ck.locations.iter().any(|l| gone(&l.pack)) {
                keep.generation += 1;
                // Zero and discard runs name their batch like data runs do (its
                // authenticated extents are what makes them trustworthy), so they go
                // and stay with it.
                keep.runs.retain(|(_, _, t)| needed.contains(&t.seq()));
                let refs: HashSet<u64> = keep.runs.iter().map(|(_, _, t)| t.seq()).collect();
                keep.locations = ck
                    .locations
                    .iter()
                    .filter(|l| refs.contains(&l.seq))
                    .map(&fix)
                    .collect();
                let name = format::checkpoint_name(disk, e, keep.seq, keep.generation);
                self.put(&name, format::encode_checkpoint(disk, &keep))
                    .await?;
                self.delete(&format::checkpoint_name(disk, e, ck.seq, ck.generation))
                    .await?;
                rep.index_rewritten += 1;
                rep.index_deleted += 1;
            }
            referenced.extend(keep.locations.iter().map(|l| l.pack.clone()));
        }

        // Drop index history no retained point needs.
        if c0.is_some() {
            for s in idx.segments.iter().filter(|s| s.last <= c0_seq) {
                self.delete(&s.name).await?;
                rep.index_deleted += 1;
            }
            for c in idx.checkpoints.iter().filter(|c| c.seq < c0_seq) {
                self.delete(&c.name).await?;
                rep.index_deleted += 1;
            }
        }
        Ok(())
    }
}
