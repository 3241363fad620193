//! Reading the kernel's block-layer structures: offsets come from `LAYOUT` (set by the
//! agent from BTF), every read goes through `bpf_probe_read_kernel` (a bad address is an
//! error, never a fault), and fields that share the first `LAYOUT_WINDOW_BYTES` of a
//! structure are read in one call.

use agent_common::{BlockLayout, kernel_dev};
use aya_ebpf::helpers::bpf_probe_read_kernel;

#[inline(always)]
pub(crate) fn global<T: Copy>(v: &T) -> T {
    // SAFETY: a volatile read of a static keeps the compiler from folding the placeholder
    // value; the loader patches the real value into .rodata.
    unsafe { core::ptr::read_volatile(v) }
}

/// Read a `T` at `base + offset` of kernel memory.
#[inline(always)]
pub(crate) fn kread<T>(base: u64, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one yields Err.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.map_err(|_| -1)
}

/// The first `LAYOUT_WINDOW_BYTES` of a kernel structure, read at once.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Window([u64; (agent_common::LAYOUT_WINDOW_BYTES / 8) as usize]);

impl Window {
    /// The u64 at byte `offset` (8-aligned, in the window: the agent checked).
    #[inline(always)]
    pub(crate) fn u64_at(&self, offset: u32) -> u64 {
        self.0[((offset >> 3) & 7) as usize]
    }

    /// The u32 at byte `offset` (4-aligned, in the window), little-endian.
    #[inline(always)]
    pub(crate) fn u32_at(&self, offset: u32) -> u32 {
        (self.u64_at(offset) >> ((offset & 4) * 8)) as u32
    }
}

/// Kernel `dev_t` of a `struct gendisk *`.
#[inline(always)]
pub(crate) fn disk_dev(layout: &BlockLayout, disk: u64) -> Result<u32, i32> {
    if disk == 0 {
        return Ok(0); // no disk (the tracepoint reports dev 0): never protected
    }
    if layout.disk_first_minor == layout.disk_major + 4 {
        // Adjacent (as in every kernel so far): one read instead of two.
        let both: u64 = kread(disk, layout.disk_major)?;
        return Ok(kernel_dev(both as u32, (both >> 32) as u32));
    }
    let major: i32 = kread(disk, layout.disk_major)?;
    let minor: i32 = kread(disk, layout.disk_first_minor)?;
    Ok(kernel_dev(major as u32, minor as u32))
}

/// The fields of a `struct bio` the probes use.
#[derive(Clone, Copy)]
pub(crate) struct Bio {
    /// `bi_next`: the next bio of its request.
    pub next: u64,
    /// `bi_bdev`: its block device.
    pub bdev: u64,
    /// `bi_opf`: operation and flags.
    pub opf: u32,
    /// `bi_iter.bi_sector`: first sector not yet done (absolute once queued).
    pub sector: u64,
    /// `bi_iter.bi_size`: bytes not yet done.
    pub size: u32,
}

/// Read the fields of `bio`: one read where they fit the window (every kernel so far).
#[inline(always)]
pub(crate) fn read_bio(layout: &BlockLayout, bio: u64) -> Result<Bio, i32> {
    Ok(if layout.bio_window != 0 {
        let w: Window = kread(bio, 0)?;
        Bio {
            next: w.u64_at(layout.bio_next),
            bdev: w.u64_at(layout.bio_bdev),
            opf: w.u32_at(layout.bio_opf),
            sector: w.u64_at(layout.bio_sector),
            size: w.u32_at(layout.bio_size),
        }
    } else {
        Bio {
            next: kread(bio, layout.bio_next)?,
            bdev: kread(bio, layout.bio_bdev)?,
            opf: kread(bio, layout.bio_opf)?,
            sector: kread(bio, layout.bio_sector)?,
            size: kread(bio, layout.bio_size)?,
        }
    })
}

/// Kernel `dev_t` of the whole disk of a `struct block_device *`.
#[inline(always)]
pub(crate) fn bdev_disk_dev(layout: &BlockLayout, bdev: u64) -> Result<u32, i32> {
    disk_dev(layout, kread(bdev, layout.bdev_disk)?)
}
