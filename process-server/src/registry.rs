//! The disk registry (`disks.json`): which machine owns each disk, its geometry, and its
//! escrow-wrapped data key. A machine may only write disks it owns.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use ripcord_proto::{DiskId, ProtectDisk};
use serde::{Deserialize, Serialize};

use crate::deploy::write_atomic;

/// One protected disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Machine id of the owner (from its client certificate).
    pub owner: String,
    pub size_bytes: u64,
    pub sector_size: u32,
    /// Latest epoch seen.
    pub epoch: u64,
    /// Data key sealed to the deployment escrow key (hex).
    pub wrapped_key: String,
    /// The device path the owner last said it protects the disk as (its unauthenticated
    /// claim, for people: logs, metrics, recovery point lists; never used to place data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Why a claim was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("disk {disk} belongs to machine {owner:?}, not {claimant:?}")]
    NotOwner {
        disk: String,
        owner: String,
        claimant: String,
    },
    #[error(
        "machine {machine:?} already protects {MAX_DISKS_PER_MACHINE} disks; refusing disk {disk}"
    )]
    TooManyDisks { disk: String, machine: String },
    #[error("writing the disk registry: {0:#}")]
    Io(anyhow::Error),
}

/// Disks one machine may protect (bounds what a registered peer can make the server
/// hold: journals, uploaders, registry entries).
pub const MAX_DISKS_PER_MACHINE: usize = 64;

/// `disks.json`, kept in memory and rewritten crash-safely on change.
pub struct Registry {
    path: PathBuf,
    disks: BTreeMap<String, DiskRecord>,
}

impl Registry {
    pub fn open(path: &Path) -> anyhow::Result<Registry> {
        let disks = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Registry {
            path: path.to_owned(),
            disks,
        })
    }

    pub fn get(&self, disk: &DiskId) -> Option<&DiskRecord> {
        self.disks.get(&disk.to_string())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &DiskRecord)> {
        self.disks.iter()
    }

    /// Record that `machine` protects `pd.disk_id` (as `device`, if it said; else the
    /// name it gave before stays); refuse if another machine owns it. Persisted before
    /// returning.
    pub fn claim(
        &mut self,
        machine: &str,
        pd: &ProtectDisk,
        device: Option<&str>,
    ) -> Result<(), ClaimError> {
        let key = pd.disk_id.to_string();
        if let Some(existing) = self.disks.get(&key)
            && existing.owner != machine
        {
            return Err(ClaimError::NotOwner {
                disk: key,
                owner: existing.owner.clone(),
                claimant: machine.to_owned(),
            });
        }
        if !self.disks.contains_key(&key)
            && self.disks.values().filter(|d| d.owner == machine).count() >= MAX_DISKS_PER_MACHINE
        {
            return Err(ClaimError::TooManyDisks {
                disk: key,
                machine: machine.to_owned(),
            });
        }
        let record = DiskRecord {
            owner: machine.to_owned(),
            size_bytes: pd.size_bytes,
            sector_size: pd.sector_size,
            epoch: pd.epoch,
            wrapped_key: hex::encode(&pd.wrapped_key),
            device: device
                .map(str::to_owned)
                .or_else(|| self.disks.get(&key).and_then(|d| d.device.clone())),
        };
        if self.disks.get(&key) == Some(&record) {
            return Ok(());
        }
        self.disks.insert(key, record);
        let bytes = serde_json::to_vec_pretty(&self.disks).map_err(|e| ClaimError::Io(e.into()))?;
        write_atomic(&self.path, &bytes).map_err(ClaimError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pd(disk: u8, epoch: u64) -> ProtectDisk {
        ProtectDisk {
            disk_id: DiskId([disk; 16]),
            size_bytes: 1 << 30,
            sector_size: 512,
            epoch,
            wrapped_key: vec![1, 2, 3],
        }
    }

    /// A `disks.json` written before device names decodes (no name).
    #[test]
    fn records_without_a_device_still_decode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disks.json");
        let old = r#"{"0101": {"owner": "m1", "size_bytes": 512, "sector_size": 512,
            "epoch": 1, "wrapped_key": "00"}}"#;
        std::fs::write(&path, old).unwrap();
        let r = Registry::open(&path).unwrap();
        let (_, rec) = r.iter().next().unwrap();
        assert_eq!((rec.owner.as_str(), rec.device.as_deref()), ("m1", None));
    }

    #[test]
    fn owners_are_enforced_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disks.json");
        let mut r = Registry::open(&path).unwrap();
        r.claim("m1", &pd(1, 1), Some("/dev/sdb")).unwrap();
        // An agent that names nothing (protocol 2) keeps the name given before.
        r.claim("m1", &pd(1, 2), None).unwrap();
        // Another machine cannot claim the disk, nor rename it.
        let err = r.claim("m2", &pd(1, 3), Some("/dev/evil")).unwrap_err();
        assert!(matches!(err, ClaimError::NotOwner { .. }), "{err}");
        let r = Registry::open(&path).unwrap();
        let rec = r.get(&DiskId([1; 16])).unwrap();
        assert_eq!(
            (rec.owner.as_str(), rec.epoch, rec.device.as_deref()),
            ("m1", 2, Some("/dev/sdb"))
        );
    }

    /// Attacker: a registered machine announcing disk after disk.
    #[test]
    fn a_machine_protects_at_most_its_quota_of_disks() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("disks.json")).unwrap();
        let many = |i: usize| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            ProtectDisk {
                disk_id: DiskId(id),
                ..pd(0, 1)
            }
        };
        for i in 0..MAX_DISKS_PER_MACHINE {
            r.claim("hostile", &many(i), None).unwrap();
        }
        let err = r
            .claim("hostile", &many(MAX_DISKS_PER_MACHINE), None)
            .unwrap_err();
        assert!(matches!(err, ClaimError::TooManyDisks { .. }), "{err}");
        // Its existing disks still resume, and other machines are unaffected.
        r.claim("hostile", &many(0), None).unwrap();
        r.claim("honest", &many(1000), None).unwrap();
    }
}
