//! What the process server checks in an agent's frames before journaling them: everything
//! the target store or failover would refuse later.
//!
//! Invariant: a frame that fails here is refused with an error to its agent and never
//! reaches the journal. A journaled frame that the uploader cannot store would jam the
//! disk's uploads forever and, through the shared cache, acknowledgements for every disk.
//! The wire decoder has already bounded every size; the receiver checks order and epochs.

use ripcord_proto::{Batch, FLAG_COMPRESSED, FLAG_SEALED, ProtectDisk};
use ripcord_types::SECTOR_BYTES;

/// The geometry a disk's `ProtectDisk` announced, which its batches must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Disk size in 512-byte sectors.
    pub sectors: u64,
}

/// Checks a `ProtectDisk`; returns the geometry its batches are checked against.
pub fn check_protect(pd: &ProtectDisk) -> Result<Geometry, String> {
    if pd.epoch == 0 {
        return Err("epoch 0 is not an epoch (epochs start at 1)".into());
    }
    if !matches!(pd.sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(format!(
            "sector size {} is not 512, 1024, 2048 or 4096",
            pd.sector_size
        ));
    }
    if pd.size_bytes == 0 || !pd.size_bytes.is_multiple_of(u64::from(pd.sector_size)) {
        return Err(format!(
            "disk size {} is not a positive multiple of its sector size {}",
            pd.size_bytes, pd.sector_size
        ));
    }
    if pd.wrapped_key.is_empty() {
        return Err("no wrapped data key: failover could never decrypt this disk".into());
    }
    Ok(Geometry {
        sectors: pd.size_bytes / SECTOR_BYTES,
    })
}

/// Checks a batch against its disk's geometry.
pub fn check_batch(b: &Batch, geometry: Geometry) -> Result<(), String> {
    if b.first_seq == 0 || b.first_seq != b.last_seq {
        return Err(format!(
            "batch covers sequences {}..={}: each batch carries exactly one sequence, from 1",
            b.first_seq, b.last_seq
        ));
    }
    if b.flags & FLAG_SEALED == 0 {
        return Err(format!("batch {} is not sealed", b.first_seq));
    }
    if b.flags & !(FLAG_SEALED | FLAG_COMPRESSED) != 0 {
        return Err(format!(
            "batch {} has unknown flags {:#x}",
            b.first_seq, b.flags
        ));
    }
    if b.extents.is_empty() {
        return Err(format!("batch {} describes no extent", b.first_seq));
    }
    for x in &b.extents {
        let end = x.sector.checked_add(u64::from(x.sectors));
        if x.sectors == 0 || end.is_none_or(|end| end > geometry.sectors) {
            return Err(format!(
                "batch {} has extent {}+{} outside the disk's {} sectors",
                b.first_seq, x.sector, x.sectors, geometry.sectors
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ripcord_proto::DiskId;
    use ripcord_proto::{Extent, ExtentKind};

    use super::*;

    fn batch(first: u64, last: u64, flags: u32, extents: Vec<Extent>) -> Batch {
        Batch {
            disk_id: DiskId([1; 16]),
            epoch: 1,
            first_seq: first,
            last_seq: last,
            extents,
            flags,
            payload: vec![0; 16],
        }
    }

    fn data(sector: u64, sectors: u32) -> Extent {
        Extent {
            sector,
            sectors,
            kind: ExtentKind::Data,
        }
    }

    #[test]
    fn hostile_batches_are_named() {
        let g = Geometry { sectors: 2048 };
        let ok = batch(1, 1, FLAG_SEALED | FLAG_COMPRESSED, vec![data(2040, 8)]);
        check_batch(&ok, g).unwrap();
        for (bad, why) in [
            (batch(0, 0, FLAG_SEALED, vec![data(0, 8)]), "from 1"),
            (batch(5, 9, FLAG_SEALED, vec![data(0, 8)]), "exactly one"),
            (batch(9, 5, FLAG_SEALED, vec![data(0, 8)]), "exactly one"),
            (batch(1, 1, 0, vec![data(0, 8)]), "not sealed"),
            (
                batch(1, 1, FLAG_SEALED | 0x80, vec![data(0, 8)]),
                "unknown flags",
            ),
            (batch(1, 1, FLAG_SEALED, vec![]), "no extent"),
            (batch(1, 1, FLAG_SEALED, vec![data(2041, 8)]), "outside"),
            (batch(1, 1, FLAG_SEALED, vec![data(0, 0)]), "outside"),
            (
                batch(1, 1, FLAG_SEALED, vec![data(u64::MAX - 2, 8)]),
                "outside",
            ),
        ] {
            let err = check_batch(&bad, g).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn hostile_protect_disk_is_named() {
        let pd = ProtectDisk {
            disk_id: DiskId([1; 16]),
            size_bytes: 1 << 20,
            sector_size: 4096,
            epoch: 1,
            wrapped_key: vec![1; 48],
        };
        assert_eq!(check_protect(&pd).unwrap().sectors, 2048);
        for (bad, why) in [
            (
                ProtectDisk {
                    epoch: 0,
                    ..pd.clone()
                },
                "epoch 0",
            ),
            (
                ProtectDisk {
                    sector_size: 513,
                    ..pd.clone()
                },
                "sector size",
            ),
            (
                ProtectDisk {
                    size_bytes: 0,
                    ..pd.clone()
                },
                "positive multiple",
            ),
            (
                ProtectDisk {
                    size_bytes: 4097,
                    ..pd.clone()
                },
                "positive multiple",
            ),
            (
                ProtectDisk {
                    wrapped_key: vec![],
                    ..pd.clone()
                },
                "wrapped data key",
            ),
        ] {
            let err = check_protect(&bad).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
