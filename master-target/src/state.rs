//! The master target's durable applied position, one file per disk
//! (`<state-dir>/<disk>.json`, mode 0600, replaced atomically and durably).
//!
//! # Invariants
//! - `moving_to` is written durably **before** the first byte of a step reaches the device,
//!   and cleared (with `applied` set to it) only **after** the device was synced. So when
//!   `moving_to` is `None`, the device is exactly the disk's image at `applied`; when it is
//!   `Some`, the device is somewhere between `applied` and `moving_to` and is not
//!   consistent until a later step finishes.
//! - A step from `applied` (epoch E, seq a) to any point of epoch E with seq ≥ the
//!   interrupted target rewrites every sector whose newest writer is after a, which covers
//!   every sector an interrupted step could have touched: resuming never needs a full copy.
//!   A step into another epoch, or to a point before the interrupted target, rewrites the
//!   whole disk.
//! - `identity` binds the file to one device (block: major:minor and size; file: device
//!   and inode), so a state file never vouches for another device's contents.
//! - The file is a checked JSON file ([`ripcord_crashsafe::checked`]: a CRC32C member over
//!   the rest; unknown members refused). A flipped bit could otherwise move `applied` to
//!   another point or clear `moving_to`, and the master target would report a device
//!   consistent that is not; a damaged file is refused by name and never replaced.

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use ripcord_store::{CutKind, DiskId, RecoveryPoint};
use serde::{Deserialize, Serialize};

/// The version of the state file format this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// The largest state file read (they are a few hundred bytes).
const MAX_STATE_BYTES: u64 = 64 << 10;

/// A recovery point, as far as the master target needs to remember it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointRef {
    /// `<epoch>-<cut>`.
    pub id: String,
    pub epoch: u64,
    pub cut_id: u64,
    /// The point covers every batch of `epoch` up to this one.
    pub seq: u64,
    /// The agent's wall-clock time of the cut, unix ns.
    pub time_ns: u64,
    /// `true` for an application-consistent point.
    pub app_consistent: bool,
}

impl PointRef {
    pub fn of(p: &RecoveryPoint) -> PointRef {
        PointRef {
            id: p.id.clone(),
            epoch: p.epoch,
            cut_id: p.cut_id,
            seq: p.seq,
            time_ns: p.time_ns,
            app_consistent: p.kind == CutKind::App,
        }
    }

    /// Whether `p` is later than this point (a later epoch, or a later cut of this one).
    pub fn is_before(&self, p: &RecoveryPoint) -> bool {
        (p.epoch, p.seq, p.cut_id) > (self.epoch, self.seq, self.cut_id)
    }
}

/// What one disk's device holds, durably.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyState {
    pub version: u32,
    /// The disk whose points are applied (32 hex digits).
    pub disk: String,
    /// The device or image they are applied to.
    pub device: PathBuf,
    /// Which device that is (see the module doc).
    pub identity: String,
    /// The last point the device was left exactly at.
    pub applied: Option<PointRef>,
    /// A step under way: the device is between `applied` and this point.
    pub moving_to: Option<PointRef>,
    /// Bytes written to the device by all steps so far (data and zeros).
    pub bytes_written: u64,
    /// Unix ns of the last change.
    pub updated_ns: u64,
    /// The last step's error, if it failed (cleared by a step that succeeds).
    pub last_error: Option<String>,
}

impl ApplyState {
    pub fn new(disk: &DiskId, device: &Path, identity: String) -> ApplyState {
        ApplyState {
            version: STATE_VERSION,
            disk: disk.to_string(),
            device: device.to_owned(),
            identity,
            applied: None,
            moving_to: None,
            bytes_written: 0,
            updated_ns: now_ns(),
            last_error: None,
        }
    }

    /// The device is exactly at a recovery point (`applied`, with no step under way).
    pub fn consistent(&self) -> Option<&PointRef> {
        match self.moving_to {
            None => self.applied.as_ref(),
            Some(_) => None,
        }
    }

    /// The state file of `disk` in `dir`.
    pub fn path(dir: &Path, disk: &DiskId) -> PathBuf {
        dir.join(format!("{disk}.json"))
    }

    /// Reads a state file; `None` if there is none. A damaged or foreign file is an
    /// error naming it (it is never silently replaced: it is the only record of what
    /// the device holds).
    pub fn load(path: &Path) -> anyhow::Result<Option<ApplyState>> {
        let md = match std::fs::metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if md.len() > MAX_STATE_BYTES {
            bail!(
                "{} is {} bytes, more than a master-target state file can be ({MAX_STATE_BYTES}); \
                 it is not one",
                path.display(),
                md.len()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (s, checksum): (ApplyState, _) = ripcord_crashsafe::checked::from_checked_json(&bytes)
            .with_context(|| {
                format!(
                    "{} is damaged or not a master-target state file; it records what the device \
                 holds, so it is not replaced: move it away to start over with a full copy",
                    path.display()
                )
            })?;
        if checksum == ripcord_crashsafe::checked::Checksum::Absent {
            tracing::warn!(
                "{} has no checksum (written by an older version); it gets one at the next \
                 save",
                path.display()
            );
        }
        if s.version != STATE_VERSION {
            bail!(
                "{} has state format {}, this ripcord-mt reads {STATE_VERSION}",
                path.display(),
                s.version
            );
        }
        Ok(Some(s))
    }

    /// Durably replaces the state file (mode 0600).
    pub fn save(&mut self, path: &Path) -> anyhow::Result<()> {
        self.updated_ns = now_ns();
        let bytes = ripcord_crashsafe::checked::to_checked_json(self).expect("state serializes");
        ripcord_crashsafe::write_atomic(path, &bytes, ripcord_crashsafe::MODE_SECRET)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Which device `file` (opened from `path`) is: `block MAJ:MIN SIZE` or `file DEV:INO`.
pub fn identity(file: &std::fs::File, size: u64) -> anyhow::Result<String> {
    let md = file.metadata().context("reading the device's metadata")?;
    Ok(if md.file_type().is_block_device() {
        let rdev = md.rdev();
        format!(
            "block {}:{} {size}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        )
    } else {
        format!("file {}:{}", md.dev(), md.ino())
    })
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(epoch: u64, cut_id: u64, seq: u64) -> PointRef {
        PointRef {
            id: format!("{epoch}-{cut_id}"),
            epoch,
            cut_id,
            seq,
            time_ns: 1,
            app_consistent: false,
        }
    }

    #[test]
    fn consistent_only_without_a_step_under_way() {
        let mut s = ApplyState::new(&DiskId([7; 16]), Path::new("/dev/x"), "block 7:0 1".into());
        assert_eq!(s.consistent(), None, "nothing applied yet");
        s.applied = Some(point(1, 2, 10));
        assert_eq!(s.consistent(), Some(&point(1, 2, 10)));
        s.moving_to = Some(point(1, 3, 20));
        assert_eq!(s.consistent(), None, "between 1-2 and 1-3");
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId([9; 16]);
        let path = ApplyState::path(dir.path(), &disk);
        assert_eq!(ApplyState::load(&path).unwrap(), None);
        let mut s = ApplyState::new(&disk, Path::new("/dev/x"), "file 1:2".into());
        s.applied = Some(point(2, 5, 40));
        s.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ApplyState::load(&path).unwrap(), Some(s));
        std::fs::write(&path, b"{\"version\": 1, \"disk\": ").unwrap();
        let e = format!("{:#}", ApplyState::load(&path).unwrap_err());
        assert!(
            e.contains("damaged or not a master-target state file"),
            "{e}"
        );
        std::fs::write(&path, vec![b' '; 100 << 10]).unwrap();
        let e = format!("{:#}", ApplyState::load(&path).unwrap_err());
        assert!(e.contains("more than a master-target state file"), "{e}");
    }

    /// Every single-bit flip of a saved state (mid-step, so that both `applied` and
    /// `moving_to` are at stake) is refused naming the file, or reads the same state:
    /// never another point, never "consistent" for a device between two points.
    #[test]
    fn a_flipped_bit_never_moves_the_applied_point() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskId([3; 16]);
        let path = ApplyState::path(dir.path(), &disk);
        let mut s = ApplyState::new(&disk, Path::new("/dev/sdc"), "block 8:32 1048576".into());
        s.applied = Some(point(3, 17, 140));
        s.moving_to = Some(point(3, 18, 151));
        s.save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut refused = 0;
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                std::fs::write(&path, &bad).unwrap();
                match ApplyState::load(&path) {
                    Err(e) => {
                        let e = format!("{e:#}");
                        assert!(e.contains(&path.display().to_string()), "{e}");
                        refused += 1;
                    }
                    Ok(loaded) => assert_eq!(loaded, Some(s.clone()), "bit {bit} of byte {i}"),
                }
            }
        }
        assert!(refused > good.len() * 7, "only {refused} flips refused");
    }
}
