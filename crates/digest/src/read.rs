//! Reading a block range of a device for hashing.
//!
//! Invariants:
//! - Reads are 4 MiB at 4 MiB-aligned offsets from the range's start (a multiple of 4 KiB),
//!   by one reader thread while the caller's thread hashes the previous chunk (two chunks
//!   in flight, 8 MiB of buffers).
//! - A block device is read with O_DIRECT through a second open of the same file (via
//!   `/proc/self/fd`, so the caller's file flags are untouched), so the page cache is
//!   neither used nor evicted; if that open or a direct read is refused (`EINVAL`:
//!   alignment, or no O_DIRECT support), the rest is read through the caller's file,
//!   buffered, with a sequential-access hint. Regular files are always read buffered.
//! - Blocks are handed to the caller in order, exactly once each; a device that ends
//!   before the stated size is [`DigestError::ShortDevice`], never a shorter scan.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::FileExt as _, unix::fs::OpenOptionsExt as _},
    sync::mpsc,
};

use crate::{BLOCK_SIZE, Digest, DigestError, DigestKey};

/// Bytes per read.
pub const CHUNK: usize = 4 << 20;
/// Buffers in flight between the reader thread and the hasher.
const BUFFERS: usize = 2;
/// O_DIRECT buffer and offset alignment (covers 512 and 4096 logical blocks).
const ALIGN: usize = 4096;

/// A 4 MiB buffer whose usable part starts at a 4 KiB-aligned address.
struct Chunk {
    buf: Vec<u8>,
    start: usize,
}

impl Chunk {
    fn new() -> Chunk {
        let buf = vec![0u8; CHUNK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Chunk { buf, start }
    }

    fn data(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + CHUNK]
    }
}

/// Where the reader reads from: a second, O_DIRECT open of a block device, or the
/// caller's file, buffered.
pub(crate) struct Source<'a> {
    pub(crate) direct: Option<File>,
    buffered: &'a File,
}

impl<'a> Source<'a> {
    pub(crate) fn open(file: &'a File) -> Source<'a> {
        let is_block = file
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
        let direct = is_block
            .then(|| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
                    .ok()
            })
            .flatten();
        let source = Source {
            direct,
            buffered: file,
        };
        if source.direct.is_none() {
            source.advise_sequential();
        }
        source
    }

    fn advise_sequential(&self) {
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open
        // for the life of `self.buffered`. A failure only loses a hint.
        unsafe {
            libc::posix_fadvise(self.buffered.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }

    /// Fills `buf[..want]` from `offset`; `buf.len()` is `want` rounded up to [`ALIGN`]
    /// (or more), which direct reads use. Returns the bytes read (< `want` only at the end
    /// of the device).
    fn read(&mut self, buf: &mut [u8], offset: u64, want: usize) -> io::Result<usize> {
        let mut got = 0;
        while got < want {
            let pos = offset + got as u64;
            let r = match &self.direct {
                Some(direct) => {
                    let len = (want - got).next_multiple_of(ALIGN).min(buf.len() - got);
                    match direct.read_at(&mut buf[got..got + len], pos) {
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            self.direct = None;
                            self.advise_sequential();
                            continue;
                        }
                        r => r,
                    }
                }
                None => self.buffered.read_at(&mut buf[got..want], pos),
            };
            match r {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got.min(want))
    }
}

/// Reads blocks `first..first + count` of a device of `size` bytes and hands each block's
/// digest to `on_block`, in order.
pub(crate) fn scan(
    key: &DigestKey,
    file: &File,
    size: u64,
    first: u64,
    count: u64,
    mut progress: impl FnMut(u64),
    mut on_block: impl FnMut(Digest),
) -> Result<(), DigestError> {
    let start = first * BLOCK_SIZE as u64;
    let end = ((first + count) * BLOCK_SIZE as u64).min(size);
    if start >= end {
        return Ok(());
    }
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<(Chunk, usize), DigestError>>(BUFFERS);
    let (free_tx, free_rx) = mpsc::sync_channel::<Chunk>(BUFFERS);
    for _ in 0..BUFFERS {
        free_tx.send(Chunk::new()).expect("the receiver is here");
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut source = Source::open(file);
            let mut pos = start;
            // Ends when the range is read, on an error, or when the hasher is gone.
            while pos < end {
                let Ok(mut chunk) = free_rx.recv() else {
                    return;
                };
                let want = (end - pos).min(CHUNK as u64) as usize;
                let sent = match source.read(chunk.data(), pos, want) {
                    Ok(n) if n == want => full_tx.send(Ok((chunk, want))),
                    Ok(n) => full_tx.send(Err(DigestError::ShortDevice {
                        at: pos + n as u64,
                        size,
                    })),
                    Err(source) => full_tx.send(Err(DigestError::Read {
                        offset: pos,
                        source,
                    })),
                };
                if sent.is_err() {
                    return;
                }
                pos += want as u64;
            }
        });
        let mut done = 0u64;
        while start + done < end {
            // The reader sends until the end or an error, so a closed channel cannot
            // come before either.
            let (mut chunk, len) = full_rx
                .recv()
                .expect("the reader sends every chunk or an error")?;
            for block in chunk.data()[..len].chunks(BLOCK_SIZE) {
                on_block(key.block(block));
            }
            done += len as u64;
            progress(done);
            // The reader may already have finished; then the buffer is not needed.
            let _ = free_tx.send(chunk);
        }
        Ok(())
    })
}
