//! `ripcord-ps replay`: rebuild a disk image from its journal alone (and the deployment
//! passphrase, which unwraps the disk's data key).

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt as _, FileTypeExt as _},
    path::Path,
};

use anyhow::{Context as _, bail, ensure};
use ripcord_journal::Journal;
use ripcord_proto::{DiskId, ExtentKind, FLAG_COMPRESSED, aead};
use ripcord_seal::{DataKey, Flags, Sealer, escrow::unwrap_data_key};

use crate::{
    deploy,
    disk::{Entry, decode_entry, journal_config, journal_dir},
    registry::Registry,
};

/// Where to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Everything in the journal.
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
    pub batches: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub cut: Option<u64>,
    pub size_bytes: u64,
}

/// Writes extents to a file (punching holes for zeroes) or a block device.
struct Output {
    file: File,
    is_block: bool,
    zeros: Vec<u8>,
}

impl Output {
    fn open(path: &Path, size: u64) -> anyhow::Result<Output> {
        let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!is_block)
            .truncate(!is_block)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !is_block {
            file.set_len(size)?;
        }
        Ok(Output {
            file,
            is_block,
            zeros: vec![0; 1 << 20],
        })
    }

    /// Make a file output `size` bytes long (a block device keeps its size).
    fn resize(&mut self, size: u64) -> anyhow::Result<()> {
        if !self.is_block {
            self.file.set_len(size)?;
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> anyhow::Result<()> {
        if !self.is_block {
            use nix::fcntl::{FallocateFlags, fallocate};
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if fallocate(&self.file, punch, offset as i64, len as i64).is_ok() {
                return Ok(());
            }
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.zeros.len() as u64) as usize;
            self.file.write_all_at(&self.zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
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

    // Find the last epoch and, if asked, the cut to stop at.
    let mut last_epoch_start = None;
    let mut last_cut = None;
    for r in journal.read_from(journal.first_seq())? {
        let r = r?;
        match decode_entry(r.kind, &r.payload)? {
            Entry::EpochStart(_) => {
                last_epoch_start = Some(r.seq);
                last_cut = None;
            }
            Entry::Cut(c) => last_cut = Some(c.id),
            Entry::Batch(_) => {}
        }
    }
    let stop_at = match until {
        Until::End => None,
        Until::LastCut => {
            Some(last_cut.context("the journal's last epoch has no consistency cut yet")?)
        }
        Until::Cut(id) => Some(id),
    };

    let mut report = ReplayReport::default();
    let mut key: Option<DataKey> = None;
    let mut out: Option<Output> = None;
    let mut sealer = Sealer::new();
    let mut plain = Vec::new();
    for r in journal.read_from(journal.first_seq())? {
        let r = r?;
        let entry = decode_entry(r.kind, &r.payload)
            .with_context(|| format!("journal record {}", r.seq))?;
        let in_last_epoch = last_epoch_start.is_some_and(|s| r.seq >= s);
        match entry {
            Entry::EpochStart(pd) => {
                let context = aead::key_context(&machine, &disk);
                key = Some(
                    unwrap_data_key(&pd.wrapped_key, &secret, &context).with_context(|| {
                        format!("unwrapping the data key of epoch {}", pd.epoch)
                    })?,
                );
                report.epoch = pd.epoch;
                report.size_bytes = pd.size_bytes;
                match &mut out {
                    None => out = Some(Output::open(output, pd.size_bytes)?),
                    // A resized device starts a new epoch at its new size.
                    Some(o) => o.resize(pd.size_bytes)?,
                }
            }
            Entry::Batch(b) => {
                let (Some(key), Some(out)) = (&key, &mut out) else {
                    bail!("journal record {} is a batch before any epoch start", r.seq);
                };
                let data_sectors: u64 = b
                    .extents
                    .iter()
                    .filter(|e| e.kind == ExtentKind::Data)
                    .map(|e| u64::from(e.sectors))
                    .sum();
                let aad = aead::batch_aad(
                    &machine,
                    &disk,
                    b.epoch,
                    b.first_seq,
                    b.last_seq,
                    &b.extents,
                );
                let nonce = aead::nonce(b.epoch, b.first_seq)?;
                let flags = if b.flags & FLAG_COMPRESSED != 0 {
                    Flags::Zstd
                } else {
                    Flags::Stored
                };
                sealer
                    .open_into(
                        key,
                        &aad,
                        nonce,
                        flags,
                        &b.payload,
                        (data_sectors * 512) as usize,
                        &mut plain,
                    )
                    .with_context(|| {
                        format!(
                            "batch {} (journal record {}) failed authentication",
                            b.first_seq, r.seq
                        )
                    })?;
                ensure!(
                    plain.len() as u64 == data_sectors * 512,
                    "batch {}: {} plaintext bytes for {} data sectors",
                    b.first_seq,
                    plain.len(),
                    data_sectors
                );
                let mut at = 0usize;
                for e in &b.extents {
                    let off = e.sector * 512;
                    let len = u64::from(e.sectors) * 512;
                    ensure!(
                        off + len <= report.size_bytes,
                        "extent beyond the disk at sector {}",
                        e.sector
                    );
                    match e.kind {
                        ExtentKind::Data => {
                            out.file.write_all_at(&plain[at..at + len as usize], off)?;
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
            }
            Entry::Cut(c) => {
                if in_last_epoch && stop_at == Some(c.id) {
                    report.cut = Some(c.id);
                    break;
                }
            }
        }
    }
    if let Some(id) = stop_at {
        ensure!(
            report.cut == Some(id),
            "cut {id} not found in the last epoch"
        );
    }
    let out = out.context("the journal holds no epoch yet: nothing to replay")?;
    out.file.sync_all()?;
    Ok(report)
}
