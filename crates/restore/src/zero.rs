//! Making a range of a restore's output read as zeros without sending zero bytes through
//! the page cache: `BLKZEROOUT` on a block device (the device may unmap or use
//! write-zeroes), `fallocate(PUNCH_HOLE)` on an image file (it stays sparse). Where the
//! kernel or file system does not offer either, zero bytes are written.
//!
//! Both calls act on the page cache consistently with buffered writes made *before* them
//! (the kernel invalidates the range, zeroing only the part of a partial page that lies
//! in it), and both are made durable by the caller's final `fsync`/`fdatasync`. They are
//! not safe against a buffered write to the same page made *concurrently* (the page may
//! be read back before the zeroing reaches the device and written over it later): a
//! restore that writes from several threads uses [`write_zeros`] instead.

use std::{fs::File, os::fd::AsRawFd as _, os::unix::fs::FileExt as _};

use anyhow::Context as _;

// BLKZEROOUT = _IO(0x12, 127) (include/uapi/linux/fs.h) reads a `u64[2]` (offset,
// length) through its argument although its request code declares none: a "bad" ioctl
// in nix's terms.
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
const _: () = assert!(nix::request_code_none!(0x12, 127) == 0x127f);

/// Makes `len` bytes at `offset` of `file` read as zeros. Offsets and lengths must be
/// multiples of 512 on a block device. Only for a single writer (see the module doc).
pub fn zero_range(file: &File, is_block: bool, offset: u64, len: u64) -> anyhow::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let done = if is_block {
        let range = [offset, len];
        // SAFETY: `range` is a live `[u64; 2]` for the call; the fd is open for writing.
        match unsafe { blkzeroout(file.as_raw_fd(), &raw const range) } {
            Ok(_) => true,
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOTTY) => false,
            Err(e) => {
                return Err(e).with_context(|| format!("BLKZEROOUT of {len} bytes at {offset}"));
            }
        }
    } else {
        use nix::fcntl::{FallocateFlags, fallocate};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(file, flags, offset as i64, len as i64) {
            Ok(()) => true,
            Err(nix::errno::Errno::EOPNOTSUPP) => false,
            Err(e) => {
                return Err(e).with_context(|| format!("punching {len} bytes at {offset}"));
            }
        }
    };
    if !done {
        write_zeros(file, offset, len)?;
    }
    Ok(())
}

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Writes `len` zero bytes at `offset` (through the page cache, like any other write).
pub fn write_zeros(file: &File, offset: u64, len: u64) -> anyhow::Result<()> {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + at)
            .with_context(|| format!("writing zeros at byte {}", offset + at))?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_punched_image_range_reads_zero_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&vec![0xa5; 4 << 20], 0).unwrap();
        file.sync_all().unwrap();
        zero_range(&file, false, 512 * 3, 3 << 20).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4 << 20, "the size is kept");
        assert!(bytes[..1536].iter().all(|&b| b == 0xa5), "before the range");
        let end = 1536 + (3 << 20);
        assert!(bytes[1536..end].iter().all(|&b| b == 0), "the range");
        assert!(bytes[end..].iter().all(|&b| b == 0xa5), "after the range");
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated < 3 << 20,
            "{allocated} bytes still allocated: not sparse"
        );
    }
}
