//! Shared mappings of BPF maps: `BPF_F_MMAPABLE` arrays of u64 read and swapped
//! atomically alongside the programs' atomic updates, and the ring buffer's consumer and
//! producer positions.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use aya::maps::MapData;

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

/// A shared mapping of a BPF_F_MMAPABLE array of u64, read and swapped atomically
/// alongside the BPF programs' atomic updates.
pub(crate) struct MmapWords {
    ptr: NonNull<u64>,
    pub(crate) len: usize,
    bytes: usize,
    _map: MapData,
}

impl MmapWords {
    pub(crate) fn new(map: MapData, len: u32) -> anyhow::Result<Self> {
        let bytes = (len as usize * 8).next_multiple_of(page_size());
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd created with BPF_F_MMAPABLE; length covers the
        // array's values, rounded to pages as the kernel requires.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of a BPF array");
        }
        let ptr = NonNull::new(ptr.cast::<u64>()).context("mmap returned null")?;
        Ok(Self {
            ptr,
            len: len as usize,
            bytes,
            _map: map,
        })
    }

    pub(crate) fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len, "word {i} out of {}", self.len);
        // SAFETY: in bounds of the live mapping, 8-aligned (page-aligned base); the kernel
        // only touches these words atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(i)) }
    }
}

impl Drop for MmapWords {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Read-only views of the ring buffer's consumer and producer positions (the first word
/// of its first and second pages), to tell "empty" from "a record still being written".
pub(crate) struct RingPositions {
    pub(crate) consumer: NonNull<u64>,
    pub(crate) producer: NonNull<u64>,
    page: usize,
}

impl RingPositions {
    pub(crate) fn new(fd: std::os::fd::RawFd) -> anyhow::Result<RingPositions> {
        let page = page_size();
        let map = |offset: usize| -> anyhow::Result<NonNull<u64>> {
            // SAFETY: mapping one page of a BPF ring buffer fd read-only at the offsets the
            // kernel defines (consumer page at 0, producer page at one page).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error())
                    .context("mmap of the ring buffer positions");
            }
            NonNull::new(p.cast::<u64>()).context("mmap returned null")
        };
        Ok(RingPositions {
            consumer: map(0)?,
            producer: map(page)?,
            page,
        })
    }

    pub(crate) fn load(p: NonNull<u64>) -> u64 {
        // SAFETY: the pointer is a live, page-aligned mapping; the kernel updates the word
        // with release stores.
        unsafe { AtomicU64::from_ptr(p.as_ptr()) }.load(Ordering::Acquire)
    }
}

impl Drop for RingPositions {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe {
            libc::munmap(self.consumer.as_ptr().cast(), self.page);
            libc::munmap(self.producer.as_ptr().cast(), self.page);
        }
    }
}
