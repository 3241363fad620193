//! The catalog of recovery points: segments, their compaction, expiry and readers.
//!
//! # Objects
//!
//! * **Segments** `catalog/<E>-<first>-<last>-<level:02>-<rand>.cat` (layout in
//!   [`format`](crate::format), `catalog.rs`): every committed cut of epoch `E` with an id
//!   in `first..=last` that the object holds, each with the agent's fields (its group stamp
//!   included) and MAC verbatim and `committed_ns`, the writer's clock at the flush that
//!   committed it.
//! * **Legacy entries** `catalog/<E>-<cut>.cut` (format 2): read as one-entry level-0
//!   segments whose commit time is the agent's `time_ns`; compaction folds those of the
//!   epoch being written into segments.
//! * **Expiry marks** `catalog/retention-<K>-<E>-<C>.ret` (empty; the name is the
//!   content), one per retention run that expired something new: every entry with
//!   `committed_ns < K` and `(epoch, cut id) < (E, C)` is expired, whatever object still
//!   holds it. A mark another one implies (larger or equal `K` and `(E, C)`) is deleted,
//!   so normally one remains.
//!
//! # Writing and compaction (tiered, in the writer)
//!
//! Each [`DiskWriter::flush`](crate::DiskWriter::flush) that commits cuts puts **one**
//! level-0 segment holding all of them. Then, at most once per such flush, it compacts
//! the current epoch: at the lowest level `L` holding [`CATALOG_FANOUT`] (`F`) or more
//! segments, the `F` with the lowest ranges are merged (entries de-duplicated, expired
//! ones dropped) into one level-`L+1` segment. A level-`L` segment so holds the points of
//! about `F^L` flushes; every level keeps fewer than `F` segments in the steady state, so
//! an epoch has `O(F · log_F(flushes))` segments and each entry is rewritten
//! `O(log_F(flushes))` times. One merge per flush keeps up (a flush adds one segment, a
//! merge removes `F - 1`). Compaction is an optimisation: its failure is logged, never
//! fails the flush. Older epochs are no longer written, so their segments stay as they
//! are until retention removes them.
//!
//! # Crash safety: the invariants
//!
//! 1. **Every committed, unexpired entry is always in at least one existing object.** A
//!    merge puts its output (durably) before it deletes any input; a retention rewrite
//!    puts the shortened segment before deleting the original. A crash in between leaves
//!    **overlapping segments**: readers de-duplicate by `(epoch, cut id)`, and the next
//!    merge folds the duplicates. Every copy of an entry is identical: merges and
//!    rewrites copy entries verbatim, and the writer stamps a cut's commit time once, at
//!    its first attempt, so a retried flush (after a put whose success was not reported)
//!    writes the same entry again. Which copy a reader keeps does not matter.
//! 2. **An expired entry never comes back.** Retention first puts an expiry mark, then
//!    rewrites segments; a mark is deleted only once a mark that implies it is stored.
//!    Readers drop every entry a listed mark expires, so an entry that a concurrent merge
//!    copied from a segment retention was rewriting (or a crash left in an overlapping
//!    copy) is never listed again, and its batches may be freed (see [`crate::gc`]).
//! 3. **The newest point is never expired**, so the highest cut id of the newest epoch is
//!    always in some segment name: a reopened writer learns it from the listing alone.
//!
//! Readers racing a merge or a rewrite may see [`crate::Error::NotFound`] for a segment
//! deleted after they listed it; they list again (a few times) before reporting it.

use crate::error::{Error, Result};
use crate::format::{self, CatName, CatalogEntry, named};
use crate::store::{FETCH_CONCURRENCY, Store};
use crate::types::{CutInfo, DiskId, RecoveryPoint};
use futures::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How many segments of one level a compaction merges (`F`).
pub const CATALOG_FANOUT: usize = 16;

/// How often a reader lists again after a segment vanished under it.
const READ_ATTEMPTS: usize = 5;

/// An expiry mark: entries committed before `before_ns` and older than `newest` are gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Expiry {
    pub before_ns: u64,
    pub newest: (u64, u64),
}

impl Expiry {
    fn expires(&self, x: &CatalogEntry) -> bool {
        x.committed_ns < self.before_ns && (x.cut.epoch, x.cut.cut_id) < self.newest
    }
}

/// A listing of the catalog directory.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Segments (and legacy entries), sorted by (epoch, first, last, level, name).
    pub segments: Vec<CatName>,
    /// Expiry marks with their object names.
    pub marks: Vec<(String, Expiry)>,
}

impl Listing {
    /// Whether an expiry mark of this listing expires `x`.
    pub(crate) fn expired(&self, x: &CatalogEntry) -> bool {
        self.marks.iter().any(|(_, m)| m.expires(x))
    }
}

/// One catalog entry and the object it was read from.
pub(crate) type Held = (Arc<str>, CatalogEntry);

fn expiry_name(disk: &DiskId, m: &Expiry) -> String {
    format!(
        "{}/catalog/retention-{:020}-{:020}-{:020}.ret",
        format::disk_dir(disk),
        m.before_ns,
        m.newest.0,
        m.newest.1
    )
}

fn parse_expiry(name: &str) -> Option<Expiry> {
    let stem = name.rsplit('/').next()?.strip_prefix("retention-")?;
    let n: Vec<u64> = stem
        .strip_suffix(".ret")?
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    (n.len() == 3).then(|| Expiry {
        before_ns: n[0],
        newest: (n[1], n[2]),
    })
}

/// Sorted by (epoch, cut id), one entry per point (copies are identical), without the
/// expired ones.
fn dedup(mut v: Vec<Held>, listing: &Listing) -> Vec<Held> {
    v.retain(|(_, x)| !listing.expired(x));
    v.sort_by_key(|(_, x)| (x.cut.epoch, x.cut.cut_id, x.committed_ns));
    v.dedup_by_key(|(_, x)| (x.cut.epoch, x.cut.cut_id));
    v
}

impl RecoveryPoint {
    fn from_entry(object: &Arc<str>, x: &CatalogEntry) -> RecoveryPoint {
        let mut p = RecoveryPoint::from_cut(&x.cut);
        p.committed_ns = x.committed_ns;
        p.catalog_object = object.clone();
        p
    }
}

impl Store {
    /// Lists the catalog directory of `disk`.
    pub(crate) async fn catalog_listing(&self, disk: &DiskId) -> Result<Listing> {
        let mut l = Listing::default();
        for o in self
            .list(&format!("{}/catalog", format::disk_dir(disk)))
            .await?
        {
            if let Some(n) = format::parse_catalog(&o.name) {
                l.segments.push(n);
            } else if let Some(m) = parse_expiry(&o.name) {
                l.marks.push((o.name, m));
            }
        }
        l.segments.sort_by(|a, b| {
            (a.epoch, a.first, a.last, a.level, &a.name)
                .cmp(&(b.epoch, b.first, b.last, b.level, &b.name))
        });
        Ok(l)
    }

    /// Reads one catalog object (segment or legacy entry), checked against its name.
    pub(crate) async fn read_catalog(
        &self,
        disk: &DiskId,
        n: &CatName,
    ) -> Result<Vec<CatalogEntry>> {
        let b = self.get(&n.name).await?;
        if n.legacy {
            let cut = named(format::decode_cut(&b, disk, (n.epoch, n.first)), &n.name)?;
            return Ok(vec![CatalogEntry {
                cut,
                committed_ns: cut.time_ns,
            }]);
        }
        named(format::decode_catalog(&b, disk, n), &n.name)
    }

    /// Reads the given catalog objects concurrently, in order.
    async fn read_catalogs(
        &self,
        disk: &DiskId,
        names: &[CatName],
    ) -> Result<Vec<(Arc<str>, Vec<CatalogEntry>)>> {
        futures::stream::iter(names.iter().cloned())
            .map(|n| async move {
                let v = self.read_catalog(disk, &n).await?;
                Ok::<_, Error>((Arc::from(n.name.as_str()), v))
            })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Runs `f` on a fresh listing, listing again when a segment vanished meanwhile.
    async fn with_listing<T, F, Fut>(&self, disk: &DiskId, f: F) -> Result<T>
    where
        F: Fn(Listing) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            match f(self.catalog_listing(disk).await?).await {
                Err(Error::NotFound { object })
                    if attempt < READ_ATTEMPTS && object.contains("/catalog/") =>
                {
                    tracing::debug!(
                        object,
                        "catalog object vanished while reading; listing again"
                    );
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// Every segment with its entries, and the listing they came from.
    pub(crate) async fn catalog_segments(
        &self,
        disk: &DiskId,
    ) -> Result<(Listing, Vec<(Arc<str>, Vec<CatalogEntry>)>)> {
        self.with_listing(disk, |l| async move {
            let segs = self.read_catalogs(disk, &l.segments).await?;
            Ok((l, segs))
        })
        .await
    }

    /// Catalog entries of `disk` (unexpired, one per point, with the object holding each),
    /// sorted by (epoch, cut id).
    pub(crate) async fn catalog(&self, disk: &DiskId) -> Result<Vec<Held>> {
        let (l, segs) = self.catalog_segments(disk).await?;
        let n = segs.iter().map(|(_, v)| v.len()).sum();
        let mut all: Vec<Held> = Vec::with_capacity(n);
        for (o, v) in segs {
            all.extend(v.into_iter().map(|x| (o.clone(), x)));
        }
        Ok(dedup(all, &l))
    }

    /// All retained recovery points of `disk`, sorted by time (then epoch, cut id).
    /// Reads every catalog segment: `O(segments)` objects (see [`crate::catalog`]).
    pub async fn points(&self, disk: &DiskId) -> Result<Vec<RecoveryPoint>> {
        let mut v: Vec<RecoveryPoint> = self
            .catalog(disk)
            .await?
            .iter()
            .map(|(o, x)| RecoveryPoint::from_entry(o, x))
            .collect();
        v.sort_by_key(|p| (p.time_ns, p.epoch, p.cut_id));
        Ok(v)
    }

    /// The newest point of `disk`: the highest cut id of the newest epoch that has one,
    /// the last the agent cut. Reads only the segment(s) whose name says they can hold it
    /// (usually one). `None` when the catalog is empty.
    ///
    /// This is the newest by the agent's own order; it is also the newest by `time_ns`
    /// unless the agent's wall clock stepped back.
    pub async fn latest_point(&self, disk: &DiskId) -> Result<Option<RecoveryPoint>> {
        self.latest_point_where(disk, |_| true).await
    }

    /// The highest `(epoch, cut id)` point for which `pred` holds. Reads segments from
    /// the newest range down and stops as soon as no unread segment can hold a higher
    /// match: for a predicate most recent points satisfy, that is one or two segments.
    pub async fn latest_point_where(
        &self,
        disk: &DiskId,
        pred: impl Fn(&RecoveryPoint) -> bool,
    ) -> Result<Option<RecoveryPoint>> {
        let pred = &pred;
        self.with_listing(disk, |l| async move {
            let mut order = l.segments.clone();
            order.sort_by_key(|n| std::cmp::Reverse((n.epoch, n.last)));
            let mut best: Option<RecoveryPoint> = None;
            for n in &order {
                if best
                    .as_ref()
                    .is_some_and(|b| (b.epoch, b.cut_id) >= (n.epoch, n.last))
                {
                    break;
                }
                let o: Arc<str> = Arc::from(n.name.as_str());
                for x in self.read_catalog(disk, n).await?.iter().rev() {
                    if best
                        .as_ref()
                        .is_some_and(|b| (b.epoch, b.cut_id) >= (x.cut.epoch, x.cut.cut_id))
                    {
                        break;
                    }
                    if l.expired(x) {
                        continue;
                    }
                    let p = RecoveryPoint::from_entry(&o, x);
                    if pred(&p) {
                        best = Some(p);
                        break;
                    }
                }
            }
            Ok(best)
        })
        .await
    }

    /// The point `<epoch>-<cut_id>`, reading only the segments whose range holds it.
    pub async fn point_by_id(
        &self,
        disk: &DiskId,
        epoch: u64,
        cut_id: u64,
    ) -> Result<Option<RecoveryPoint>> {
        self.with_listing(disk, |l| async move {
            for n in l
                .segments
                .iter()
                .filter(|n| n.epoch == epoch && (n.first..=n.last).contains(&cut_id))
            {
                let v = self.read_catalog(disk, n).await?;
                if let Ok(i) = v.binary_search_by_key(&cut_id, |x| x.cut.cut_id)
                    && !l.expired(&v[i])
                {
                    return Ok(Some(RecoveryPoint::from_entry(
                        &Arc::from(n.name.as_str()),
                        &v[i],
                    )));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Commits `entries` (non-empty, sorted by id, of `epoch`) as one level-0 segment.
    pub(crate) async fn put_catalog_segment(
        &self,
        disk: &DiskId,
        epoch: u64,
        entries: &[CatalogEntry],
    ) -> Result<String> {
        let (first, last) = (entries[0].cut.cut_id, entries[entries.len() - 1].cut.cut_id);
        let name = format::catalog_name(disk, epoch, first, last, 0);
        self.put(&name, format::encode_catalog(disk, epoch, 0, entries))
            .await?;
        Ok(name)
    }

    /// One compaction step for `epoch` (see the module docs): merges the `F` lowest
    /// segments of the lowest level holding at least `F`. Returns the merged segment's
    /// name, or `None` when no level is full.
    pub(crate) async fn compact_catalog(
        &self,
        disk: &DiskId,
        epoch: u64,
    ) -> Result<Option<String>> {
        let l = self.catalog_listing(disk).await?;
        let mut levels: BTreeMap<u8, Vec<&CatName>> = BTreeMap::new();
        for n in l.segments.iter().filter(|n| n.epoch == epoch) {
            levels.entry(n.level).or_default().push(n);
        }
        let Some((&level, inputs)) = levels.iter().find(|(_, v)| v.len() >= CATALOG_FANOUT) else {
            return Ok(None);
        };
        let inputs: Vec<CatName> = inputs[..CATALOG_FANOUT]
            .iter()
            .map(|&n| n.clone())
            .collect();
        let out_level = level.saturating_add(1);
        let mut all: Vec<Held> = Vec::new();
        for (o, v) in self.read_catalogs(disk, &inputs).await? {
            all.extend(v.into_iter().map(|x| (o.clone(), x)));
        }
        let merged: Vec<CatalogEntry> = dedup(all, &l).into_iter().map(|(_, x)| x).collect();
        let name = match (merged.first(), merged.last()) {
            (Some(a), Some(z)) => {
                let name = format::catalog_name(disk, epoch, a.cut.cut_id, z.cut.cut_id, out_level);
                self.put(
                    &name,
                    format::encode_catalog(disk, epoch, out_level, &merged),
                )
                .await?;
                Some(name)
            }
            // Every input entry expired: nothing to keep.
            _ => None,
        };
        for n in &inputs {
            self.delete(&n.name).await?;
        }
        tracing::debug!(disk = %disk, epoch, level, entries = merged.len(), merged = ?name,
            "catalog segments merged");
        Ok(name)
    }

    /// Retention step 1 (see [`crate::gc`]): expires every entry committed before
    /// `keep_after_ns` except the newest point, first by an expiry mark, then by
    /// rewriting or deleting the segments holding them. Returns every entry read (for the
    /// newest epoch's newest seq), the retained ones and the expired points' ids.
    pub(crate) async fn expire_points(
        &self,
        disk: &DiskId,
        keep_after_ns: u64,
    ) -> Result<(Vec<CutInfo>, Vec<CutInfo>, Vec<String>)> {
        let (l, segs) = self.catalog_segments(disk).await?;
        let mut all: Vec<Held> = Vec::new();
        for (o, v) in &segs {
            all.extend(v.iter().map(|x| (o.clone(), *x)));
        }
        let before = dedup(all, &l);
        let Some(newest) = before
            .iter()
            .map(|(_, x)| (x.cut.epoch, x.cut.cut_id))
            .max()
        else {
            return Ok((Vec::new(), Vec::new(), Vec::new()));
        };
        // The mark goes first; one another mark already implies is not needed, and marks
        // this one implies are deleted after it is stored. Marks are never merged: a
        // later run's smaller cutoff must not meet an earlier run's newest point.
        let mark = Expiry {
            before_ns: keep_after_ns,
            newest,
        };
        let (gone, kept): (Vec<Held>, Vec<Held>) =
            before.into_iter().partition(|(_, x)| mark.expires(x));
        let implies = |a: &Expiry, b: &Expiry| a.before_ns >= b.before_ns && a.newest >= b.newest;
        if !gone.is_empty() && !l.marks.iter().any(|(_, m)| implies(m, &mark)) {
            self.put(&expiry_name(disk, &mark), Vec::new()).await?;
            for (name, m) in &l.marks {
                if implies(&mark, m) {
                    self.delete(name).await?;
                }
            }
        }
        let expired = |x: &CatalogEntry| mark.expires(x) || l.expired(x);
        for (n, (_, v)) in l.segments.iter().zip(&segs) {
            let keep: Vec<CatalogEntry> = v.iter().filter(|x| !expired(x)).copied().collect();
            if keep.len() == v.len() {
                continue;
            }
            if let (Some(a), Some(z)) = (keep.first(), keep.last()) {
                let name = format::catalog_name(disk, n.epoch, a.cut.cut_id, z.cut.cut_id, n.level);
                self.put(&name, format::encode_catalog(disk, n.epoch, n.level, &keep))
                    .await?;
            }
            self.delete(&n.name).await?;
        }
        let all = gone.iter().chain(&kept).map(|(_, x)| x.cut).collect();
        let ids = gone
            .iter()
            .map(|(_, x)| format!("{}-{}", x.cut.epoch, x.cut.cut_id))
            .collect();
        Ok((all, kept.into_iter().map(|(_, x)| x.cut).collect(), ids))
    }
}
