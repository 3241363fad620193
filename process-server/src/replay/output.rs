//! The replay output: an image file (created sparse, zeroes punched as holes) or a block
//! device (zeroes written).

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt as _, FileTypeExt as _},
    path::Path,
};

use anyhow::Context as _;

/// Writes extents to a file (punching holes for zeroes) or a block device.
pub(super) struct Output {
    file: File,
    is_block: bool,
    zeros: Vec<u8>,
}

impl Output {
    pub(super) fn open(path: &Path, size: u64) -> anyhow::Result<Output> {
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

    pub(super) fn write(&self, data: &[u8], offset: u64) -> anyhow::Result<()> {
        self.file
            .write_all_at(data, offset)
            .with_context(|| format!("writing {} bytes at offset {offset}", data.len()))
    }

    pub(super) fn zero(&mut self, offset: u64, len: u64) -> anyhow::Result<()> {
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

    /// Makes everything written durable.
    pub(super) fn finish(self) -> anyhow::Result<()> {
        self.file.sync_all().context("syncing the replay output")
    }
}
