//! Reading side: index listing, extent maps, point resolution and batch fetch.

use crate::error::{Corruption, Error, Result};
use crate::format::{self, Checkpoint, CkptName, IndexEntry, RunTarget, SegName, Segment, named};
use crate::store::{FETCH_CONCURRENCY, Store};
use crate::types::{
    BatchLocation, DiskId, Extent, ExtentKind, Plan, RecoveryPoint, Run, SECTOR_BYTES, SealedBatch,
};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Sector -> source map of one epoch at some seq. Keys are start sectors;
/// values are (end sector exclusive, target). Non-overlapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ExtentMap {
    m: BTreeMap<u64, (u64, RunTarget)>,
}

fn advance(t: RunTarget, sectors: u64) -> RunTarget {
    match t {
        RunTarget::Data { seq, offset } => RunTarget::Data {
            seq,
            offset: offset + sectors * SECTOR_BYTES,
        },
        other => other,
    }
}

impl ExtentMap {
    pub fn from_checkpoint(c: &Checkpoint) -> ExtentMap {
        ExtentMap {
            m: c.runs.iter().map(|&(s, l, t)| (s, (s + l, t))).collect(),
        }
    }

    /// Sets `[start, end)` to `t`, trimming/splitting what it overlaps.
    pub fn insert(&mut self, start: u64, end: u64, t: RunTarget) {
        if start >= end {
            return;
        }
        let mut tail = None;
        while let Some((&s, &(e, old))) = self.m.range(..end).next_back() {
            if e <= start {
                break;
            }
            self.m.remove(&s);
            if e > end {
                tail = Some((end, (e, advance(old, end - s))));
            }
            if s < start {
                self.m.insert(s, (start, old));
                break;
            }
        }
        if let Some((k, v)) = tail {
            self.m.insert(k, v);
        }
        self.m.insert(start, (end, t));
    }

    /// Applies one index entry's extents in order.
    pub fn apply(&mut self, e: &IndexEntry) {
        self.apply_extents(e.loc.seq, &e.extents);
    }

    /// Applies batch `seq`'s extents in order (later extents win where they overlap).
    pub fn apply_extents(&mut self, seq: u64, extents: &[Extent]) {
        let mut off = 0u64;
        for x in extents {
            let start = x.sector;
            let end = x.sector.saturating_add(u64::from(x.sectors));
            let t = match x.kind {
                ExtentKind::Data => {
                    let t = RunTarget::Data { seq, offset: off };
                    off += u64::from(x.sectors) * SECTOR_BYTES;
                    t
                }
                ExtentKind::Zero => RunTarget::Zero { seq },
                ExtentKind::Discard => RunTarget::Discard { seq },
            };
            self.insert(start, end, t);
        }
    }

    /// True when `[start, end)` is entirely mapped, contiguously, to `want` advanced
    /// sector by sector (the map may split the range into several entries).
    pub fn covers(&self, start: u64, end: u64, want: RunTarget) -> bool {
        let mut at = start;
        while at < end {
            let Some((&s, &(e, t))) = self.m.range(..=at).next_back() else {
                return false;
            };
            if e <= at || advance(t, at - s) != advance(want, at - start) {
                return false;
            }
            at = e;
        }
        true
    }

    pub fn runs(&self) -> impl Iterator<Item = (u64, u64, RunTarget)> + '_ {
        self.m.iter().map(|(&s, &(e, t))| (s, e - s, t))
    }

    /// Every batch a run comes from (of any kind: zero and discard runs are checked
    /// against their batch's authenticated extents too, so their batches are kept).
    pub fn referenced(&self) -> BTreeSet<u64> {
        self.m.values().map(|(_, t)| t.seq()).collect()
    }
}

/// What [`Store::load_map`] read: the extent map, the location of every batch it
/// references, and the index object (checkpoint or segment) that placed each of them.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub map: ExtentMap,
    pub locs: HashMap<u64, BatchLocation>,
    pub placed_by: BTreeMap<u64, String>,
}

/// Index objects of one epoch, newest generation only unless stated.
#[derive(Debug, Clone, Default)]
pub(crate) struct EpochIndex {
    /// Newest-generation segments, sorted by first seq.
    pub segments: Vec<SegName>,
    /// Newest-generation checkpoints, sorted by seq.
    pub checkpoints: Vec<CkptName>,
    /// Older generations (superseded; safe to delete).
    pub superseded: Vec<String>,
}

impl EpochIndex {
    /// Highest seq known committed (0 if none).
    pub fn durable(&self) -> u64 {
        let s = self.segments.iter().map(|s| s.last).max().unwrap_or(0);
        let c = self.checkpoints.iter().map(|c| c.seq).max().unwrap_or(0);
        s.max(c)
    }
}

pub(crate) fn index_dir(disk: &DiskId) -> String {
    format!("{}/index", format::disk_dir(disk))
}
pub(crate) fn ckpt_dir(disk: &DiskId) -> String {
    format!("{}/checkpoints", format::disk_dir(disk))
}

impl Store {
    /// Lists the index objects of `epoch`; if `after_ckpt` is set, only
    /// segments whose last seq is greater than it (listing pushed down).
    pub(crate) async fn epoch_index(
        &self,
        disk: &DiskId,
        epoch: u64,
        after: Option<u64>,
    ) -> Result<EpochIndex> {
        self.epoch_index_parts(disk, epoch, true, Some(after)).await
    }

    /// Like [`Store::epoch_index`], listing checkpoints only if `ckpts` and
    /// segments only if `segs` is `Some(after)`.
    pub(crate) async fn epoch_index_parts(
        &self,
        disk: &DiskId,
        epoch: u64,
        ckpts: bool,
        segs: Option<Option<u64>>,
    ) -> Result<EpochIndex> {
        let cdir = ckpt_dir(disk);
        let idir = index_dir(disk);
        let start = format!("{cdir}/{epoch:020}-");
        let cks = if ckpts {
            self.list_after(&cdir, Some(&start)).await?
        } else {
            Vec::new()
        };
        let mut ck: BTreeMap<u64, CkptName> = BTreeMap::new();
        let mut out = EpochIndex::default();
        for l in cks {
            let Some(c) = format::parse_checkpoint(&l.name) else {
                continue;
            };
            if c.epoch != epoch {
                continue;
            }
            match ck.get(&c.seq) {
                Some(o) if o.generation >= c.generation => out.superseded.push(c.name),
                _ => {
                    if let Some(o) = ck.insert(c.seq, c) {
                        out.superseded.push(o.name);
                    }
                }
            }
        }
        let segs = match segs {
            None => Vec::new(),
            Some(after) => {
                let offset = match after {
                    Some(a) => format!("{idir}/{epoch:020}-{a:020}-~"),
                    None => format!("{idir}/{epoch:020}-"),
                };
                self.list_after(&idir, Some(&offset)).await?
            }
        };
        let mut sg: BTreeMap<(u64, u64), SegName> = BTreeMap::new();
        for l in segs {
            let Some(s) = format::parse_index(&l.name) else {
                continue;
            };
            if s.epoch != epoch {
                continue;
            }
            match sg.get(&(s.first, s.last)) {
                Some(o) if o.generation >= s.generation => out.superseded.push(s.name),
                _ => {
                    if let Some(o) = sg.insert((s.first, s.last), s) {
                        out.superseded.push(o.name);
                    }
                }
            }
        }
        out.checkpoints = ck.into_values().collect();
        out.segments = sg.into_values().collect();
        Ok(out)
    }

    pub(crate) async fn read_segment(&self, disk: &DiskId, s: &SegName) -> Result<Segment> {
        let b = self.get(&s.name).await?;
        named(format::decode_segment(&b, disk, s), &s.name)
    }

    pub(crate) async fn read_checkpoint(&self, disk: &DiskId, c: &CkptName) -> Result<Checkpoint> {
        let b = self.get(&c.name).await?;
        named(format::decode_checkpoint(&b, disk, c), &c.name)
    }

    pub(crate) async fn read_segments(
        &self,
        disk: &DiskId,
        segs: &[SegName],
    ) -> Result<Vec<Segment>> {
        futures::stream::iter(segs.iter().cloned())
            .map(|s| async move { self.read_segment(disk, &s).await })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Extent map of `epoch` as of `seq`: the newest checkpoint at or before
    /// `seq` plus the segments after it, with the location of every batch it
    /// references and the index object that placed it.
    pub(crate) async fn load_map(&self, disk: &DiskId, epoch: u64, seq: u64) -> Result<Loaded> {
        let ck_list = self.epoch_index_parts(disk, epoch, true, None).await?;
        let base = ck_list
            .checkpoints
            .iter()
            .rev()
            .find(|c| c.seq <= seq)
            .cloned();
        let base_seq = base.as_ref().map_or(0, |c| c.seq);
        let idx = self
            .epoch_index_parts(disk, epoch, false, Some(Some(base_seq)))
            .await?;
        let mut segs: Vec<SegName> = idx
            .segments
            .into_iter()
            .filter(|s| s.first <= seq)
            .collect();
        segs.sort_by_key(|s| s.first);
        // The segments must cover (base_seq, seq] without gaps.
        let mut next = base_seq + 1;
        for s in &segs {
            if s.first > next {
                break;
            }
            next = next.max(s.last + 1);
        }
        if next <= seq {
            return Err(Error::NotDurable {
                disk: disk.to_string(),
                epoch,
                seq,
                durable: next - 1,
            });
        }
        let (mut map, mut locs) = match &base {
            Some(c) => {
                let ck = self.read_checkpoint(disk, c).await?;
                let map = ExtentMap::from_checkpoint(&ck);
                let locs: HashMap<u64, (BatchLocation, &str)> = ck
                    .locations
                    .into_iter()
                    .map(|l| (l.seq, (l, c.name.as_str())))
                    .collect();
                (map, locs)
            }
            None => (ExtentMap::default(), HashMap::new()),
        };
        let read = self.read_segments(disk, &segs).await?;
        for (seg, name) in read.iter().zip(&segs) {
            for e in seg
                .entries
                .iter()
                .filter(|e| e.loc.seq > base_seq && e.loc.seq <= seq)
            {
                map.apply(e);
                locs.insert(e.loc.seq, (e.loc.clone(), name.name.as_str()));
            }
        }
        let refs = map.referenced();
        locs.retain(|s, _| refs.contains(s));
        if let Some(missing) = refs.iter().find(|s| !locs.contains_key(s)) {
            return Err(Error::MissingBatch {
                disk: disk.to_string(),
                epoch,
                seq: *missing,
                object: base
                    .as_ref()
                    .map_or_else(|| index_dir(disk), |c| c.name.clone()),
            });
        }
        let mut placed_by = BTreeMap::new();
        let locs = locs
            .into_iter()
            .map(|(s, (l, by))| {
                placed_by.insert(s, by.to_string());
                (s, l)
            })
            .collect();
        Ok(Loaded {
            map,
            locs,
            placed_by,
        })
    }

    /// Resolves a recovery point to a [`Plan`]: reads the epoch object, the
    /// newest checkpoint at or before the point and the index segments after
    /// it (never the packs).
    pub async fn resolve(&self, disk: &DiskId, point: &RecoveryPoint) -> Result<Plan> {
        self.resolve_seq(disk, point.epoch, point.seq).await
    }

    /// Highest seq of `epoch` whose batches are all committed (0 = none): the disk as
    /// of it can be resolved with [`Store::resolve_seq`] even when no cut is there.
    pub async fn durable_seq(&self, disk: &DiskId, epoch: u64) -> Result<u64> {
        Ok(self.epoch_index(disk, epoch, None).await?.durable())
    }

    /// Resolves the disk as of batch `seq` of `epoch` (every batch `<= seq` applied),
    /// which need not be a recovery point: for integrators that continue from there with
    /// batches of their own (`ripcord-ps replay` adds the journal's). A `seq` above
    /// [`Store::durable_seq`] is [`Error::NotDurable`].
    pub async fn resolve_seq(&self, disk: &DiskId, epoch: u64, seq: u64) -> Result<Plan> {
        let Loaded {
            map,
            locs,
            placed_by,
        } = self.load_map(disk, epoch, seq).await?;
        let epoch = self.epoch_info(disk, epoch).await?;
        let runs = map
            .runs()
            .map(|(s, l, t)| Run {
                sector: s,
                sectors: l,
                source: t.into(),
            })
            .collect();
        Ok(Plan {
            size_bytes: epoch.size_bytes,
            epoch,
            runs,
            locations: locs.into_iter().collect(),
            placed_by,
        })
    }

    /// Fetches one batch with a range request and checks it: record checksum,
    /// and that it is the record the location names. Errors name the pack.
    pub async fn fetch_batch(&self, loc: &BatchLocation) -> Result<SealedBatch> {
        let end = loc.offset.checked_add(loc.length).ok_or_else(|| {
            Error::corrupt(
                &loc.pack,
                Corruption::Invalid {
                    what: "batch location range",
                },
            )
        })?;
        let b = self.get_range(&loc.pack, loc.offset..end).await?;
        check_record(&b, loc)
    }

    /// Fetches several batches, coalescing range requests per pack. Output is
    /// in the order of `locs`.
    pub async fn fetch_batches(&self, locs: &[BatchLocation]) -> Result<Vec<SealedBatch>> {
        let mut by_pack: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, l) in locs.iter().enumerate() {
            by_pack.entry(&l.pack).or_default().push(i);
        }
        let mut out: Vec<Option<SealedBatch>> = vec![None; locs.len()];
        for (pack, idxs) in by_pack {
            let ranges: Vec<_> = idxs
                .iter()
                .map(|&i| locs[i].offset..locs[i].offset.saturating_add(locs[i].length))
                .collect();
            let bufs = self.get_ranges(pack, &ranges).await?;
            for (&i, b) in idxs.iter().zip(bufs) {
                out[i] = Some(check_record(&b, &locs[i])?);
            }
        }
        Ok(out.into_iter().map(|b| b.expect("filled")).collect())
    }
}

fn check_record(b: &[u8], loc: &BatchLocation) -> Result<SealedBatch> {
    if (b.len() as u64) != loc.length {
        return Err(Error::corrupt(
            &loc.pack,
            Corruption::Truncated {
                what: "batch record",
                needed: loc.length,
                offset: loc.offset,
                len: b.len() as u64,
            },
        ));
    }
    let r = named(format::decode_record(b), &loc.pack)?;
    if r.len != loc.length || r.crc != loc.checksum || r.seq != loc.seq || r.epoch != loc.epoch {
        return Err(Error::corrupt(
            &loc.pack,
            Corruption::Mismatch {
                what: "index entry (seq/epoch/checksum)",
            },
        ));
    }
    Ok(SealedBatch {
        epoch: r.epoch,
        seq: r.seq,
        extents: r.extents,
        flags: r.flags,
        sealed: r.sealed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ops: &[(u64, u64, u64)]) -> Vec<Option<u64>> {
        let mut v = vec![None; 64];
        for &(s, e, t) in ops {
            for x in v.iter_mut().take(e as usize).skip(s as usize) {
                *x = Some(t);
            }
        }
        v
    }

    proptest::proptest! {
        #[test]
        fn extent_map_matches_naive(ops in proptest::collection::vec((0u64..64, 1u64..20, 0u64..1000), 0..40)) {
            let ops: Vec<_> = ops.into_iter().map(|(s, l, t)| (s, (s + l).min(64), t)).collect();
            let mut m = ExtentMap::default();
            for &(s, e, t) in &ops {
                m.insert(s, e, RunTarget::Data { seq: t, offset: s * SECTOR_BYTES });
            }
            let mut got = vec![None; 64];
            let mut prev_end = 0;
            for (s, l, t) in m.runs() {
                proptest::prop_assert!(s >= prev_end);
                prev_end = s + l;
                for x in s..s + l {
                    if let RunTarget::Data { seq, offset } = t {
                        // offset advances with the sector.
                        proptest::prop_assert_eq!(offset + (x - s) * SECTOR_BYTES, x * SECTOR_BYTES);
                        got[x as usize] = Some(seq);
                    }
                }
            }
            proptest::prop_assert_eq!(got, naive(&ops));
        }
    }
}
