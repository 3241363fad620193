//! Offline verification: reads every object and checks checksums, structure
//! and cross-references. Damaged objects are reported by name.

use crate::error::{Corruption, Error, Result};
use crate::format;
use crate::store::Store;
use crate::types::{BatchLocation, DiskId, RecoveryPoint};
use std::collections::{BTreeSet, HashMap, HashSet};

/// One damaged object.
#[derive(Debug)]
pub struct Damage {
    /// Object name (relative to the store root).
    pub object: String,
    /// What is wrong with it.
    pub error: Error,
}

/// Result of [`Store::verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Disks checked.
    pub disks: usize,
    /// Objects read.
    pub objects_checked: u64,
    /// Batch records checked.
    pub batches_checked: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Recovery points resolved.
    pub points_checked: u64,
    /// Packs no index references (uploads in flight or awaiting GC; not damage).
    pub unreferenced_packs: Vec<String>,
    /// Damaged objects.
    pub damaged: Vec<Damage>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damaged.is_empty()
    }

    /// Names of the damaged objects (deduplicated, sorted).
    pub fn damaged_objects(&self) -> Vec<String> {
        let s: BTreeSet<String> = self.damaged.iter().map(|d| d.object.clone()).collect();
        s.into_iter().collect()
    }

    fn damage(&mut self, object: &str, error: Error) {
        tracing::warn!(object, %error, "damaged object");
        self.damaged.push(Damage {
            object: object.to_string(),
            error,
        });
    }
}

/// (length, crc, seq) of a record by offset.
type PackRecords = HashMap<u64, (u64, u32, u64)>;

impl Store {
    /// Verifies one disk, or every disk when `disk` is `None`. Returns an
    /// error only when the store cannot be listed; damage is in the report.
    pub async fn verify(&self, disk: Option<&DiskId>) -> Result<VerifyReport> {
        let disks = match disk {
            Some(d) => vec![*d],
            None => self.list_disks().await?,
        };
        let mut rep = VerifyReport::default();
        for d in &disks {
            self.verify_disk(d, &mut rep).await?;
        }
        rep.disks = disks.len();
        Ok(rep)
    }

    async fn verify_disk(&self, disk: &DiskId, rep: &mut VerifyReport) -> Result<()> {
        let dd = format::disk_dir(disk);
        // Epoch objects.
        let mut epochs = BTreeSet::new();
        for l in self.list(&format!("{dd}/epochs")).await? {
            let Some(e) = format::parse_epoch(&l.name) else {
                continue;
            };
            rep.objects_checked += 1;
            rep.bytes_read += l.size;
            match self.epoch_info(disk, e).await {
                Ok(_) => {
                    epochs.insert(e);
                }
                Err(err) => rep.damage(&l.name, err),
            }
        }
        // Key rotations: each decodes under its name and belongs to a stored epoch.
        for l in self.list(&format!("{dd}/keys")).await? {
            let Some((e, from_seq)) = format::parse_key_rotation(&l.name) else {
                continue;
            };
            rep.objects_checked += 1;
            rep.bytes_read += l.size;
            let decoded = match self.get(&l.name).await {
                Ok(b) => format::decode_key_rotation(&b, e, from_seq)
                    .map_err(|c| Error::corrupt(&l.name, c)),
                Err(err) => Err(err),
            };
            match decoded {
                Err(err) => rep.damage(&l.name, err),
                Ok(_) if !epochs.contains(&e) => rep.damage(
                    &l.name,
                    Error::UnknownEpoch {
                        disk: disk.to_string(),
                        epoch: e,
                        object: format::epoch_name(disk, e),
                    },
                ),
                Ok(_) => {}
            }
        }
        // Packs: read whole, check every record and the footer.
        let mut packs: HashMap<String, Option<PackRecords>> = HashMap::new();
        for l in self.list(&format!("{dd}/packs")).await? {
            rep.objects_checked += 1;
            let parsed = match self.get(&l.name).await {
                Ok(b) => {
                    rep.bytes_read += b.len() as u64;
                    format::parse_pack_bytes(&b, disk).and_then(|p| {
                        match format::parse_pack(&l.name) {
                            Some((e, _)) if e == p.epoch => Ok(p),
                            _ => Err(Corruption::Mismatch {
                                what: "object name (epoch)",
                            }),
                        }
                    })
                }
                Err(err) => {
                    rep.damage(&l.name, err);
                    packs.insert(l.name.clone(), None);
                    continue;
                }
            };
            match parsed {
                Ok(p) => {
                    rep.batches_checked += p.records.len() as u64;
                    let recs = p
                        .records
                        .iter()
                        .map(|(d, _)| (d.offset, (d.length, d.crc, d.seq)))
                        .collect();
                    packs.insert(l.name.clone(), Some(recs));
                }
                Err(c) => {
                    rep.damage(&l.name, Error::corrupt(&l.name, c));
                    packs.insert(l.name.clone(), None);
                }
            }
        }
        // Index objects of every epoch named anywhere.
        let mut idx_epochs = epochs.clone();
        for dir in ["index", "checkpoints"] {
            for l in self.list(&format!("{dd}/{dir}")).await? {
                if let Some(e) = l
                    .name
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.split('-').next()?.parse().ok())
                {
                    idx_epochs.insert(e);
                }
            }
        }
        let mut referenced: HashSet<String> = HashSet::new();
        for &e in &idx_epochs {
            if !epochs.contains(&e) {
                rep.damage(
                    &format::epoch_name(disk, e),
                    Error::UnknownEpoch {
                        disk: disk.to_string(),
                        epoch: e,
                        object: format::epoch_name(disk, e),
                    },
                );
            }
            let idx = self.epoch_index(disk, e, None).await?;
            for s in &idx.segments {
                rep.objects_checked += 1;
                match self.read_segment(disk, s).await {
                    Ok(seg) => {
                        let locs: Vec<&BatchLocation> =
                            seg.entries.iter().map(|x| &x.loc).collect();
                        check_refs(&s.name, &locs, &packs, &mut referenced, rep);
                    }
                    Err(err) => rep.damage(&s.name, err),
                }
            }
            for c in &idx.checkpoints {
                rep.objects_checked += 1;
                match self.read_checkpoint(disk, c).await {
                    Ok(ck) => {
                        let locs: Vec<&BatchLocation> = ck.locations.iter().collect();
                        check_refs(&c.name, &locs, &packs, &mut referenced, rep);
                    }
                    Err(err) => rep.damage(&c.name, err),
                }
            }
        }
        // Catalog: decode every segment (structure, CRC, name against contents),
        // and resolve every point readers would list, once.
        let listing = self.catalog_listing(disk).await?;
        let mut resolved: HashSet<(u64, u64)> = HashSet::new();
        for n in &listing.segments {
            rep.objects_checked += 1;
            let entries = match self.read_catalog(disk, n).await {
                Ok(v) => v,
                Err(err) => {
                    rep.damage(&n.name, err);
                    continue;
                }
            };
            for x in entries {
                if listing.expired(&x) || !resolved.insert((x.cut.epoch, x.cut.cut_id)) {
                    continue;
                }
                rep.points_checked += 1;
                if let Err(err) = self.resolve(disk, &RecoveryPoint::from_cut(&x.cut)).await {
                    let obj = err.object().unwrap_or(&n.name).to_string();
                    if obj != n.name {
                        // Report the point as unresolvable too.
                        rep.damage(
                            &n.name,
                            Error::corrupt(&n.name, Corruption::Dangling(obj.clone())),
                        );
                    }
                    rep.damage(&obj, err);
                }
            }
        }
        // GC markers.
        for l in self.list(&format!("{dd}/gc")).await? {
            rep.objects_checked += 1;
            if let Err(err) = self
                .get(&l.name)
                .await
                .and_then(|b| format::named(format::decode_pending_delete(&b), &l.name))
            {
                rep.damage(&l.name, err);
            }
        }
        let mut unref: Vec<String> = packs
            .keys()
            .filter(|p| !referenced.contains(*p))
            .cloned()
            .collect();
        unref.sort();
        rep.unreferenced_packs.extend(unref);
        Ok(())
    }
}

fn check_refs(
    object: &str,
    locs: &[&BatchLocation],
    packs: &HashMap<String, Option<PackRecords>>,
    referenced: &mut HashSet<String>,
    rep: &mut VerifyReport,
) {
    for l in locs {
        referenced.insert(l.pack.clone());
        match packs.get(&l.pack) {
            None => {
                rep.damage(
                    object,
                    Error::corrupt(object, Corruption::Dangling(l.pack.clone())),
                );
                return;
            }
            Some(None) => {} // pack itself already reported
            Some(Some(recs)) => {
                if recs.get(&l.offset) != Some(&(l.length, l.checksum, l.seq)) {
                    rep.damage(
                        object,
                        Error::corrupt(
                            object,
                            Corruption::DanglingRecord {
                                pack: l.pack.clone(),
                                offset: l.offset,
                                length: l.length,
                            },
                        ),
                    );
                    return;
                }
            }
        }
    }
}
