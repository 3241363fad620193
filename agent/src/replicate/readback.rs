//! Verified readback: read changed ranges back from the device with O_DIRECT, in rounds
//! that are either *clean* (a crash-consistent cut may follow) or *raced*.
//!
//! A round at instant T: snapshot the write generations, drain the change events that
//! completed before T into the dirty set, then read every dirty range. A range whose
//! generation moved during its read raced a write queued after T; it goes back into the
//! dirty set and the round is not clean. If every read was clean and nothing stayed
//! dirty, the data sent so far equals the device at T (writes in flight at T may or may
//! not be included, as in a real crash), so a cut may be placed after it.
//! See docs/decisions/0003-verified-readback.md.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
};

use anyhow::Context as _;

use crate::device::BlockDevice;

/// Largest single read, in bytes.
pub const MAX_READ: usize = 1 << 20;

/// A page-aligned buffer for O_DIRECT, without unsafe code: over-allocate and slice.
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        const ALIGN: usize = 4096;
        let raw = vec![0u8; len + ALIGN];
        let off = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, off, len }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

/// Attempts per read before it counts as failed (a transient error, e.g. a path failover
/// under multipath, usually clears on the next try).
pub const READ_ATTEMPTS: u32 = 3;

/// Environment variable for tests: when set to N > 0, every N-th read fails (all its
/// attempts) with an injected I/O error.
pub const FAULT_READ_ENV: &str = "RIPCORD_FAULT_READ_ERRORS";

/// O_DIRECT reader of one protected device (partition-relative sectors).
pub struct DeviceReader {
    file: File,
    buf: AlignedBuf,
    /// Logical block size in 512-byte sectors.
    lbs_sectors: u64,
    sectors: u64,
    /// Injected read failures (see [`FAULT_READ_ENV`]): every N-th read, and reads so far.
    fault_every: u64,
    reads: u64,
}

impl DeviceReader {
    pub fn open(dev: &BlockDevice) -> anyhow::Result<DeviceReader> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev.path)
            .with_context(|| format!("opening {} with O_DIRECT", dev.path.display()))?;
        let fault_every = match std::env::var(FAULT_READ_ENV) {
            Err(_) => 0,
            Ok(v) => v
                .parse()
                .with_context(|| format!("{FAULT_READ_ENV}={v:?} is not a number"))?,
        };
        if fault_every > 0 {
            tracing::warn!(
                "FAULT INJECTION: every {fault_every}th read of {} fails ({FAULT_READ_ENV}); \
                 for tests only",
                dev.path.display()
            );
        }
        Ok(DeviceReader {
            file,
            buf: AlignedBuf::new(MAX_READ),
            lbs_sectors: u64::from(dev.logical_block_size / 512).max(1),
            sectors: dev.sectors,
            fault_every,
            reads: 0,
        })
    }

    /// Whether this read is one the fault injection fails (see [`FAULT_READ_ENV`]).
    fn injected_failure(&mut self) -> bool {
        self.reads += 1;
        self.fault_every > 0 && self.reads.is_multiple_of(self.fault_every)
    }

    /// Split `[sector, sector + len)` into reads of at most [`MAX_READ`], widened to the
    /// logical block size and clipped to the device.
    pub fn pieces(&self, sector: u64, len: u64) -> Vec<(u64, u64)> {
        let a = self.lbs_sectors;
        let start = sector / a * a;
        let end = (sector + len)
            .div_ceil(a)
            .saturating_mul(a)
            .min(self.sectors);
        let step = (MAX_READ as u64 / 512) / a * a;
        (start..end)
            .step_by(step as usize)
            .map(|s| (s, step.min(end - s)))
            .collect()
    }

    /// Writes back the block device's own dirty page cache over `[sector, sector + len)`
    /// and waits for it: buffered writes to the device node and a file system's metadata
    /// buffers (ext4 keeps them in the device's page cache until checkpoint). An O_DIRECT
    /// read flushes exactly these pages before it reads (`kiocb_write_and_wait`), so a
    /// read made without this first races writes the agent itself started; made before a
    /// round's instant, the writes complete before it and the reads after it are clean.
    /// Pages already clean cost a walk of the page-cache tags, no I/O.
    pub fn write_back(&self, sector: u64, len: u64) -> std::io::Result<()> {
        let (offset, bytes) = (
            sector * 512,
            len.min(self.sectors - sector.min(self.sectors)) * 512,
        );
        ripcord_crashsafe::write_back_range(
            &self.file,
            offset,
            bytes,
            ripcord_crashsafe::WriteBack::AndWait,
        )
    }

    /// Read `buf.len()` bytes (whole sectors, `buf` aligned for O_DIRECT) at `sector`.
    pub fn read_into(&mut self, sector: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        if self.injected_failure() {
            anyhow::bail!(
                "reading {} bytes at sector {sector}: injected I/O error",
                buf.len()
            );
        }
        read_retrying(&self.file, buf, sector * 512)
            .with_context(|| format!("reading {} bytes at sector {sector}", buf.len()))
    }

    /// Read `len` sectors (at most [`MAX_READ`] bytes) at `sector`.
    pub fn read(&mut self, sector: u64, len: u64) -> anyhow::Result<&[u8]> {
        let bytes = (len * 512) as usize;
        anyhow::ensure!(
            bytes <= MAX_READ,
            "read of {bytes} bytes exceeds {MAX_READ}"
        );
        if self.injected_failure() {
            anyhow::bail!("reading {len} sectors at sector {sector}: injected I/O error");
        }
        let buf = &mut self.buf.as_mut_slice()[..bytes];
        read_retrying(&self.file, buf, sector * 512)
            .with_context(|| format!("reading {len} sectors at sector {sector}"))?;
        Ok(&self.buf.as_slice()[..bytes])
    }
}

/// `read_exact_at`, tried up to [`READ_ATTEMPTS`] times.
fn read_retrying(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut attempt = 1;
    loop {
        match file.read_exact_at(buf, offset) {
            Ok(()) => return Ok(()),
            Err(e) if attempt < READ_ATTEMPTS => {
                tracing::debug!(offset, attempt, "read failed, retrying: {e}");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.as_mut_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(b.as_slice().len(), 8192);
    }

    fn reader(lbs: u64, sectors: u64) -> DeviceReader {
        DeviceReader {
            file: File::open("/dev/null").unwrap(),
            buf: AlignedBuf::new(512),
            lbs_sectors: lbs,
            sectors,
            fault_every: 0,
            reads: 0,
        }
    }

    #[test]
    fn injected_failures_hit_every_nth_read_only() {
        let mut r = reader(1, 8);
        r.fault_every = 3;
        let failed: Vec<bool> = (0..6).map(|_| r.injected_failure()).collect();
        assert_eq!(failed, [false, false, true, false, false, true]);
    }

    #[test]
    fn pieces_are_bounded_aligned_and_clipped() {
        let r = reader(1, 10_000);
        assert_eq!(r.pieces(5, 3), vec![(5, 3)]);
        assert_eq!(r.pieces(0, 4096), vec![(0, 2048), (2048, 2048)]);
        assert_eq!(r.pieces(9_990, 100), vec![(9_990, 10)]);
        let r = reader(8, 10_000);
        assert_eq!(r.pieces(5, 4), vec![(0, 16)]);
        assert!(
            r.pieces(0, 5000)
                .iter()
                .all(|&(s, l)| s % 8 == 0 && l % 8 == 0 && l <= 2048)
        );
    }
}
