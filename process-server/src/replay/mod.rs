//! `ripcord-ps replay`: rebuild a disk image from the journal, and from the target store
//! for what the uploader already trimmed from the journal (docs/decisions/0011).
//!
//! The image is the disk's last epoch as of a seq `T` (the newest batch anywhere, or a
//! cut's seq):
//! 1. While the journal holds the epoch's start record, it holds every batch of the epoch
//!    (trimming goes in order), and the journal alone rebuilds the image.
//! 2. Once the start record is trimmed, the store holds the epoch: its description (size,
//!    wrapped key) and every batch through its durable seq `D`, which covers every
//!    trimmed record. The image is the store's disk as of `min(D, T)`, then the journal's
//!    batches after that, through `T`. The two must join without a gap: replay refuses
//!    (naming both positions) rather than write an image that skips a batch.
//!
//! Every batch, from either source, is authenticated with the epoch's data key of its
//! sequence (the epoch's own, or a key rotation's: from the journal's rotation records and
//! the store's rotation objects), unwrapped with the passphrase, before any of its bytes
//! is written.

mod output;

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, bail, ensure};
use ripcord_journal::Journal;
use ripcord_proto::{DiskId, Extent, ExtentKind, FLAG_COMPRESSED, ProtectDisk, aead};
use ripcord_seal::{Flags, KeyRing, Sealer, escrow::unwrap_data_key};
use ripcord_store::{RunSource, Store};

use crate::{
    deploy,
    disk::{Entry, decode_entry, journal_config, journal_dir},
    registry::Registry,
};
use output::Output;

/// Where to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Everything in the journal (and the store).
    End,
    /// The last consistency cut of the last epoch.
    LastCut,
    /// A given cut id of the last epoch.
    Cut(u64),
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub epoch: u64,
    /// Batches applied (from the store and the journal).
    pub batches: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub cut: Option<u64>,
    pub size_bytes: u64,
    /// The image was taken from the target store as of this seq (the journal's start
    /// record of the epoch had been trimmed); `None`: from the journal alone.
    pub store_seq: Option<u64>,
}

/// The newest epoch in the journal: its start record, if still there, its cuts and its
/// newest batch.
#[derive(Default)]
struct JournalScan {
    epoch: Option<u64>,
    start: Option<ProtectDisk>,
    /// Cut id -> seq.
    cuts: BTreeMap<u64, u64>,
    /// Key rotations: first seq -> wrapped key.
    rotations: BTreeMap<u64, Vec<u8>>,
}

fn scan(journal: &Journal) -> anyhow::Result<JournalScan> {
    let mut s = JournalScan::default();
    for r in journal.read_from(journal.first_seq())? {
        let r = r?;
        let entry = decode_entry(r.kind, &r.payload)
            .with_context(|| format!("journal record {}", r.seq))?;
        let epoch = entry.epoch();
        if s.epoch.is_none_or(|e| epoch > e) {
            s = JournalScan {
                epoch: Some(epoch),
                ..JournalScan::default()
            };
        }
        match entry {
            Entry::EpochStart(pd) => s.start = Some(pd),
            Entry::KeyRotation { from_seq, pd } => {
                s.rotations.insert(from_seq, pd.wrapped_key);
            }
            Entry::Cut(c) => {
                s.cuts.insert(c.id, c.seq);
            }
            Entry::Batch(_) => {}
        }
    }
    Ok(s)
}

/// Unseals batches of one epoch.
struct Opener {
    keys: KeyRing,
    machine: String,
    disk: DiskId,
    sealer: Sealer,
    plain: Vec<u8>,
}

impl Opener {
    /// Authenticates and decrypts one batch; returns its plaintext (the Data extents'
    /// bytes, in extent order).
    fn open(
        &mut self,
        epoch: u64,
        (first_seq, last_seq): (u64, u64),
        extents: &[Extent],
        flags: u32,
        payload: &[u8],
        source: &str,
    ) -> anyhow::Result<&[u8]> {
        let data_bytes: u64 = extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| u64::from(e.sectors) * 512)
            .sum();
        let aad = aead::batch_aad(
            &self.machine,
            &self.disk,
            epoch,
            first_seq,
            last_seq,
            extents,
        );
        let nonce = aead::nonce(epoch, first_seq)?;
        let flags = if flags & FLAG_COMPRESSED != 0 {
            Flags::Zstd
        } else {
            Flags::Stored
        };
        self.sealer
            .open_into(
                self.keys.for_seq(first_seq),
                &aad,
                nonce,
                flags,
                payload,
                data_bytes as usize,
                &mut self.plain,
            )
            .with_context(|| format!("batch {first_seq} ({source}) failed authentication"))?;
        ensure!(
            self.plain.len() as u64 == data_bytes,
            "batch {first_seq} ({source}): {} plaintext bytes for {data_bytes} bytes of data extents",
            self.plain.len(),
        );
        Ok(&self.plain)
    }
}

/// The epoch to rebuild and where its image starts.
struct Base {
    epoch: u64,
    size_bytes: u64,
    wrapped_key: Vec<u8>,
    /// Key rotations (first seq -> wrapped key), from every source.
    rotations: BTreeMap<u64, Vec<u8>>,
    /// Cut id -> seq, from every source.
    cuts: BTreeMap<u64, u64>,
    /// The store, when the journal no longer holds the epoch's start.
    store: Option<(Store, u64)>,
}

/// Rebuild `disk` into `output`.
pub fn replay(
    deployment: &Path,
    disk: DiskId,
    output: &Path,
    passphrase: &[u8],
    until: Until,
) -> anyhow::Result<ReplayReport> {
    let dep = deploy::open(deployment)?;
    let secret = dep.escrow.unlock(passphrase)?;
    let registry = Registry::open(&deployment.join("disks.json"))?;
    let record = registry
        .get(&disk)
        .with_context(|| format!("disk {} is not in the registry", disk))?;
    let machine = record.owner.clone();
    let dir = journal_dir(&dep.config.cache_dir(deployment), &disk);
    ensure!(
        dir.exists(),
        "no journal for disk {} in {}",
        disk,
        dir.display()
    );
    let journal = Journal::open(&dir, journal_config(&dep.config)).with_context(|| {
        format!(
            "opening {} (stop `ripcord-ps serve` first: it holds the journal)",
            dir.display()
        )
    })?;
    let scan = scan(&journal)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime for the target store")?;
    let base = match scan.start {
        Some(pd) => Base {
            epoch: pd.epoch,
            size_bytes: pd.size_bytes,
            wrapped_key: pd.wrapped_key,
            rotations: scan.rotations,
            cuts: scan.cuts,
            store: None,
        },
        None => {
            let Some(url) = dep.config.target.as_deref() else {
                match scan.epoch {
                    None => {
                        bail!("the journal of disk {disk} holds no epoch yet: nothing to replay")
                    }
                    Some(e) => bail!(
                        "the journal of disk {disk} no longer holds the start of epoch {e} and \
                         no target store is configured to read it from"
                    ),
                }
            };
            rt.block_on(store_base(url, &disk, &scan, until))
                .with_context(|| {
                    format!(
                        "the journal's start of the epoch was trimmed after upload; reading \
                         the epoch from the target store {url}"
                    )
                })?
        }
    };
    let stop_seq = match until {
        Until::End => None,
        Until::LastCut => Some(
            *base
                .cuts
                .last_key_value()
                .context("the last epoch has no consistency cut yet")?
                .1,
        ),
        Until::Cut(id) => Some(
            *base
                .cuts
                .get(&id)
                .with_context(|| format!("cut {id} not found in the last epoch"))?,
        ),
    };

    let context = aead::key_context(&machine, &disk);
    let key = unwrap_data_key(&base.wrapped_key, &secret, &context)
        .with_context(|| format!("unwrapping the data key of epoch {}", base.epoch))?;
    let mut keys = KeyRing::new(key);
    for (&from_seq, wrapped) in &base.rotations {
        let key = unwrap_data_key(wrapped, &secret, &context).with_context(|| {
            format!(
                "unwrapping the data key of epoch {} from batch {from_seq}",
                base.epoch
            )
        })?;
        keys.rotate(from_seq, key)?;
    }
    let mut opener = Opener {
        keys,
        machine,
        disk,
        sealer: Sealer::new(),
        plain: Vec::new(),
    };
    let mut report = ReplayReport {
        epoch: base.epoch,
        size_bytes: base.size_bytes,
        cut: match until {
            Until::End => None,
            Until::LastCut => base.cuts.last_key_value().map(|(&id, _)| id),
            Until::Cut(id) => Some(id),
        },
        ..ReplayReport::default()
    };
    let mut out = Output::open(output, base.size_bytes)?;
    let mut through = 0;
    if let Some((store, durable)) = &base.store {
        let seq = stop_seq.map_or(*durable, |s| s.min(*durable));
        rt.block_on(write_store_image(
            store,
            &disk,
            base.epoch,
            seq,
            &mut opener,
            &mut out,
            &mut report,
        ))?;
        report.store_seq = Some(seq);
        through = seq;
    }

    for r in journal.read_from(journal.first_seq())? {
        let r = r?;
        let Entry::Batch(b) = decode_entry(r.kind, &r.payload)
            .with_context(|| format!("journal record {}", r.seq))?
        else {
            continue;
        };
        if b.epoch != base.epoch || b.last_seq <= through {
            continue;
        }
        if stop_seq.is_some_and(|s| b.first_seq > s) {
            break;
        }
        if b.first_seq != through + 1 {
            bail!(
                "journal record {} holds batch {} of epoch {} but the image so far is \
                 through batch {through}{}: a batch is missing",
                r.seq,
                b.first_seq,
                b.epoch,
                if report.store_seq.is_some() {
                    " (from the target store)"
                } else {
                    ""
                }
            );
        }
        let source = format!("journal record {}", r.seq);
        let plain = opener.open(
            b.epoch,
            (b.first_seq, b.last_seq),
            &b.extents,
            b.flags,
            &b.payload,
            &source,
        )?;
        let mut at = 0usize;
        for e in &b.extents {
            let (off, len) = (e.sector * 512, u64::from(e.sectors) * 512);
            ensure!(
                off + len <= report.size_bytes,
                "batch {} ({source}): extent beyond the disk at sector {}",
                b.first_seq,
                e.sector
            );
            match e.kind {
                ExtentKind::Data => {
                    out.write(&plain[at..at + len as usize], off)?;
                    at += len as usize;
                    report.data_bytes += len;
                }
                ExtentKind::Zero | ExtentKind::Discard => {
                    out.zero(off, len)?;
                    report.zero_bytes += len;
                }
            }
        }
        report.batches += 1;
        through = b.last_seq;
    }
    if let Some(s) = stop_seq {
        ensure!(
            through >= s,
            "the image reaches batch {through} but the cut needs every batch through {s}"
        );
    }
    out.finish()?;
    Ok(report)
}

/// The epoch as the target store has it: the journal's newest epoch, or the store's newest
/// when the journal holds no record at all; with the journal's cuts and the store's point
/// that `until` stops at, if the journal does not hold it.
async fn store_base(
    url: &str,
    disk: &DiskId,
    scan: &JournalScan,
    until: Until,
) -> anyhow::Result<Base> {
    let (journal_epoch, journal_cuts) = (scan.epoch, &scan.cuts);
    let store = Store::open(url).await?;
    let epoch = match journal_epoch {
        Some(e) => e,
        None => {
            store
                .epochs(disk)
                .await?
                .last()
                .with_context(|| format!("neither the journal nor the store holds disk {disk}"))?
                .epoch
        }
    };
    let info = store.epoch_info(disk, epoch).await?;
    let durable = store.durable_seq(disk, epoch).await?;
    // Only the cut the replay stops at is looked up (the journal's cuts are newer than
    // the store's): no listing of every point.
    let point = match until {
        Until::End => None,
        Until::Cut(id) if journal_cuts.contains_key(&id) => None,
        Until::Cut(id) => store.point_by_id(disk, epoch, id).await?,
        Until::LastCut if !journal_cuts.is_empty() => None,
        Until::LastCut => store.latest_point_where(disk, |p| p.epoch == epoch).await?,
    };
    let mut cuts: BTreeMap<u64, u64> = point.map(|p| (p.cut_id, p.seq)).into_iter().collect();
    cuts.extend(journal_cuts);
    let mut rotations: BTreeMap<u64, Vec<u8>> = store
        .key_rotations(disk, epoch)
        .await?
        .into_iter()
        .map(|r| (r.from_seq, r.wrapped_key))
        .collect();
    if journal_epoch == Some(epoch) {
        rotations.extend(scan.rotations.clone());
    }
    Ok(Base {
        epoch,
        size_bytes: info.size_bytes,
        wrapped_key: info.wrapped_key,
        rotations,
        cuts,
        store: Some((store, durable)),
    })
}

/// Writes the store's disk as of `seq` of `epoch`: every run of its plan, zeroes where
/// no run is.
async fn write_store_image(
    store: &Store,
    disk: &DiskId,
    epoch: u64,
    seq: u64,
    opener: &mut Opener,
    out: &mut Output,
    report: &mut ReplayReport,
) -> anyhow::Result<()> {
    let plan = store.resolve_seq(disk, epoch, seq).await?;
    ensure!(
        plan.size_bytes == report.size_bytes,
        "the store's epoch {epoch} describes {} bytes, not {}",
        plan.size_bytes,
        report.size_bytes
    );
    let mut end = 0;
    for r in &plan.runs {
        let (off, len) = (r.sector * 512, r.sectors * 512);
        ensure!(
            off + len <= report.size_bytes,
            "the store's plan of epoch {epoch} reaches beyond the disk at sector {}",
            r.sector
        );
        if off > end {
            out.zero(end, off - end)?; // never written in this epoch
        }
        end = off + len;
        if !matches!(r.source, RunSource::Data { .. }) {
            out.zero(off, len)?;
            report.zero_bytes += len;
        }
    }
    if end < report.size_bytes {
        out.zero(end, report.size_bytes - end)?;
    }
    let placement = plan.placement();
    for loc in plan.batches() {
        let b = store.fetch_batch(&loc).await?;
        let plain = opener.open(
            b.epoch,
            (b.seq, b.seq),
            &b.extents,
            b.flags,
            &b.sealed,
            &format!("store object {}", loc.pack),
        )?;
        // The extents just authenticated are the only placement trusted (decision 0012).
        placement.check(loc.seq, &b.extents)?;
        for r in placement.runs_of(loc.seq) {
            let RunSource::Data { offset, .. } = r.source else {
                continue;
            };
            let len = r.sectors * 512;
            let bytes = usize::try_from(offset)
                .ok()
                .and_then(|o| plain.get(o..o + len as usize))
                .with_context(|| {
                    format!(
                        "the store's plan reads past batch {} ({})",
                        loc.seq, loc.pack
                    )
                })?;
            out.write(bytes, r.sector * 512)?;
            report.data_bytes += len;
        }
        report.batches += 1;
    }
    Ok(())
}
