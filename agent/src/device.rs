//! Resolving a block device path to what the BPF filter needs: the whole disk's `dev_t`
//! and the sector range the device covers on it (a partition's start and length).

use std::{
    fmt,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// Major and minor number of a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DevId {
    /// The kernel-internal encoding block tracepoints report.
    pub fn kernel(self) -> u32 {
        agent_common::kernel_dev(self.major, self.minor)
    }

    fn parse(s: &str) -> Option<DevId> {
        let (ma, mi) = s.trim().split_once(':')?;
        Some(DevId {
            major: ma.parse().ok()?,
            minor: mi.parse().ok()?,
        })
    }
}

/// A block device the agent protects: a whole disk or one partition of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// The path the user gave.
    pub path: PathBuf,
    /// The device itself (the partition's own number for a partition).
    pub dev: DevId,
    /// The whole disk (equal to `dev` for a whole disk).
    pub disk: DevId,
    /// First sector on the disk (0 for a whole disk).
    pub start: u64,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size in bytes.
    pub logical_block_size: u32,
}

/// Why a path cannot be protected.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a block device")]
    NotBlock(PathBuf),
    #[error("{path}: unexpected contents {contents:?} in sysfs")]
    Sysfs { path: PathBuf, contents: String },
    #[error("{0} has size 0 (a loop device without a backing file?)")]
    Empty(PathBuf),
    #[error(
        "{path} is a zoned device ({model}): its zone-append writes land where the device \
         chooses, which the probes cannot see; zoned devices are not supported"
    )]
    Zoned { path: PathBuf, model: String },
}

fn read_sysfs(path: &Path) -> Result<String, DeviceError> {
    std::fs::read_to_string(path).map_err(|source| DeviceError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64, DeviceError> {
    let s = read_sysfs(path)?;
    s.trim().parse().map_err(|_| DeviceError::Sysfs {
        path: path.to_owned(),
        contents: s,
    })
}

impl BlockDevice {
    /// Look up `path` (e.g. `/dev/loop0` or `/dev/loop0p1`) in sysfs.
    pub fn resolve(path: &Path) -> Result<BlockDevice, DeviceError> {
        let meta = std::fs::metadata(path).map_err(|source| DeviceError::Io {
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_block_device() {
            return Err(DeviceError::NotBlock(path.to_owned()));
        }
        let rdev = meta.rdev();
        let dev = DevId {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        };
        let sys = PathBuf::from(format!("/sys/dev/block/{dev}"));
        let sectors = read_u64(&sys.join("size"))?;
        if sectors == 0 {
            return Err(DeviceError::Empty(path.to_owned()));
        }
        let (disk, start, disk_sys) = if sys.join("partition").exists() {
            let start = read_u64(&sys.join("start"))?;
            // A partition's sysfs directory sits inside its disk's.
            let disk_sys = sys.join("..");
            let dev_file = disk_sys.join("dev");
            let s = read_sysfs(&dev_file)?;
            let disk = DevId::parse(&s).ok_or(DeviceError::Sysfs {
                path: dev_file,
                contents: s,
            })?;
            (disk, start, disk_sys)
        } else {
            (dev, 0, sys)
        };
        let logical_block_size = read_u64(&disk_sys.join("queue/logical_block_size"))? as u32;
        // `none` on every conventional device; absent on kernels without zoned support.
        let zoned = std::fs::read_to_string(disk_sys.join("queue/zoned")).unwrap_or_default();
        let zoned = zoned.trim();
        if !zoned.is_empty() && zoned != "none" {
            return Err(DeviceError::Zoned {
                path: path.to_owned(),
                model: zoned.to_owned(),
            });
        }
        Ok(BlockDevice {
            path: path.to_owned(),
            dev,
            disk,
            start,
            sectors,
            logical_block_size,
        })
    }

    /// The device's size now, in 512-byte sectors (it changes when a disk or partition is
    /// resized: `losetup -c`, `growpart`, a cloud disk resize).
    pub fn current_sectors(&self) -> Result<u64, DeviceError> {
        read_u64(&PathBuf::from(format!("/sys/dev/block/{}/size", self.dev)))
    }

    /// Whether the disk's driver is known to read discarded ranges as zeroes: loop (a
    /// discard punches a hole in the backing file) and zram (it frees the page). Other
    /// drivers may return old data after a discard.
    pub fn driver_zeroes_discards(&self) -> bool {
        let disk = PathBuf::from(format!("/sys/dev/block/{}", self.disk));
        std::fs::canonicalize(disk).is_ok_and(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("loop") || n.starts_with("zram"))
        })
    }

    /// A short name for logs: the path's file name.
    pub fn name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// log2 of sectors per overflow-bitmap bit: 8 KiB, or coarser so the device fits the
    /// slot's fixed-size bitmap.
    pub fn overflow_shift(&self) -> u32 {
        let mut shift = agent_common::MIN_OVERFLOW_SHIFT;
        while self.sectors.div_ceil(1 << shift) > agent_common::OVERFLOW_BITS_PER_SLOT {
            shift += 1;
        }
        shift
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(sectors: u64) -> BlockDevice {
        BlockDevice {
            path: "/dev/x".into(),
            dev: DevId { major: 7, minor: 0 },
            disk: DevId { major: 7, minor: 0 },
            start: 0,
            sectors,
            logical_block_size: 512,
        }
    }

    #[test]
    fn overflow_granularity_fits_the_bitmap() {
        assert_eq!(dev(2048).overflow_shift(), 4);
        // 512 MiB exactly fits at 8 KiB per bit; 64 GiB at 1 MiB per bit.
        assert_eq!(dev(1 << 20).overflow_shift(), 4);
        assert_eq!(dev((1 << 20) + 1).overflow_shift(), 5);
        assert_eq!(dev(64 << 21).overflow_shift(), 11);
        assert_eq!(dev((64 << 21) + 1).overflow_shift(), 12);
        let big = dev(16 << 31); // 16 TiB
        let shift = big.overflow_shift();
        assert!(big.sectors.div_ceil(1 << shift) <= agent_common::OVERFLOW_BITS_PER_SLOT);
        assert!(big.sectors.div_ceil(1 << (shift - 1)) > agent_common::OVERFLOW_BITS_PER_SLOT);
    }

    #[test]
    fn parses_dev_ids() {
        assert_eq!(
            DevId::parse("259:3\n"),
            Some(DevId {
                major: 259,
                minor: 3
            })
        );
        assert_eq!(DevId::parse("259"), None);
        assert_eq!(DevId { major: 7, minor: 1 }.to_string(), "7:1");
    }

    #[test]
    fn rejects_non_block_devices() {
        let err = BlockDevice::resolve(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, DeviceError::NotBlock(_)), "{err}");
        let err = BlockDevice::resolve(Path::new("/nonexistent/dev")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dev"), "{err}");
    }
}
