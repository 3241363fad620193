//! Starting the write-back of a restore's output early.
//!
//! A restore writes far more than it reads (a batch decompresses to several times its
//! stored size), through the page cache, and makes it durable with one `fsync` at the end.
//! Left to itself the kernel starts writing dirty pages back only past
//! `dirty_background_ratio` (gigabytes on a large host), so the device reads the store
//! and sits idle for writes, then writes everything while nothing is read: the two
//! phases add up. Starting the write-back of each range as soon as it is written keeps
//! the device writing while batches are fetched and decrypted.
//!
//! This only moves the write-back earlier: durability still comes from the caller's
//! final `fsync`, which waits for what was started here and writes whatever was dirtied
//! again (a page shared by two runs written from two threads).

use std::{fs::File, os::fd::AsRawFd as _};

/// Starts writing back `len` bytes of `file` at `offset` from the page cache, without
/// waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; it blocks only while the
/// device's queue is full).
pub fn start(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a plain syscall on a descriptor `file` keeps open; no memory is passed.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt as _;

    #[test]
    fn written_ranges_keep_their_bytes_and_become_durable_with_the_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(8 << 20).unwrap();
        // A range, an unaligned one, one past what was written, and an empty one.
        file.write_all_at(&vec![0x5a; 3 << 20], 512).unwrap();
        start(&file, 512, 3 << 20).unwrap();
        start(&file, 1 << 20, 1000).unwrap();
        start(&file, 6 << 20, 1 << 20).unwrap();
        start(&file, 0, 0).unwrap();
        file.sync_all().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..512].iter().all(|&b| b == 0));
        assert!(bytes[512..512 + (3 << 20)].iter().all(|&b| b == 0x5a));
        assert!(bytes[512 + (3 << 20)..].iter().all(|&b| b == 0));
    }
}
