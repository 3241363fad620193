//! Types shared by ripcord's BPF programs (`ripcord-agent-ebpf`) and the user-space agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding, so the kernel and user space agree
//! on one layout without hand-synced copies. Sizes are checked at compile time.
//!
//! # Slots
//! Every protected device (a whole disk or a partition of one) gets a *slot*: an index into
//! the per-slot maps (statistics, overflow bitmap). The in-kernel filter is the `PROTECTED`
//! hash map, keyed by the kernel `dev_t` of the *whole disk* (block tracepoints always report
//! the disk and absolute sectors, also for partitions); its value lists the disk's protected
//! ranges, each naming its slot.
#![no_std]

use core::mem::size_of;

/// Most protected devices (slots) one agent tracks.
pub const MAX_SLOTS: u32 = 64;
/// Most protected ranges (partitions, or the whole disk) on one disk.
pub const MAX_RANGES_PER_DISK: usize = 8;
/// Bits of overflow bitmap per slot. The agent picks each slot's granularity so the device
/// fits: at least [`MIN_OVERFLOW_SHIFT`], coarser for devices over 64 GiB.
pub const OVERFLOW_BITS_PER_SLOT: u64 = 65_536;
/// 64-bit words of overflow bitmap per slot.
pub const OVERFLOW_WORDS_PER_SLOT: u32 = (OVERFLOW_BITS_PER_SLOT / 64) as u32;
/// Entries of the `OVERFLOW` array map.
pub const OVERFLOW_WORDS: u32 = MAX_SLOTS * OVERFLOW_WORDS_PER_SLOT;
/// Finest overflow granularity: 2^4 sectors = 8 KiB per bit (devices up to 512 MiB);
/// larger devices get coarser bits so the bitmap keeps its fixed size (1 MiB per bit at
/// 64 GiB). Fine bits keep a dropped 4 KiB write from costing a 1 MiB re-read.
pub const MIN_OVERFLOW_SHIFT: u32 = 4;
/// Most bits one event may set in the overflow bitmap; a wider event marks the whole slot
/// (`SlotStats::overflow_all`), which makes the agent resynchronise the whole device.
pub const MAX_OVERFLOW_BITS_PER_EVENT: u64 = 256;

/// log2 of the entries of the `WRITE_GEN` array.
pub const WRITE_GEN_BITS: u32 = 18;
/// Entries of the `WRITE_GEN` array (regions hash into it): 2 MiB, covering 4 GiB of
/// 16 KiB regions before collisions start (which only cause conservative re-reads).
pub const WRITE_GEN_ENTRIES: u32 = 1 << WRITE_GEN_BITS;
/// Sectors per write-generation region, as a shift: 2^5 sectors = 16 KiB. Small regions
/// keep unrelated writes from marking a readback as raced (a false race costs a re-read
/// and delays the next crash-consistent cut).
pub const WRITE_GEN_REGION_SHIFT: u32 = 5;
/// Most regions one queued write bumps one by one (2 MiB); a wider write bumps the slot's
/// `SlotStats::wide_gen` instead, which the agent treats as "every region raced".
pub const MAX_GEN_REGIONS_PER_WRITE: u64 = 128;

/// Default size of the event ring buffer in bytes (a power of two, page multiple).
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// Operation flags of a [`ChangeEvent`].
pub mod op {
    /// Data written.
    pub const WRITE: u32 = 1 << 0;
    /// Range discarded (contents undefined afterwards; loop devices read zeroes).
    pub const DISCARD: u32 = 1 << 1;
    /// Range set to zeroes (REQ_OP_WRITE_ZEROES).
    pub const WRITE_ZEROES: u32 = 1 << 2;
    /// Cache flush (REQ_OP_FLUSH, or REQ_PREFLUSH on a write).
    pub const FLUSH: u32 = 1 << 3;
    /// Forced unit access: this write was durable on completion.
    pub const FUA: u32 = 1 << 4;
    /// Secure erase (treated as a discard).
    pub const SECURE_ERASE: u32 = 1 << 5;
    /// The request completed with an error. Its range may hold partial data, so the agent
    /// still treats it as changed.
    pub const ERROR: u32 = 1 << 6;
    /// The completion of a queued write was never observed (see [`InflightBio`]): its
    /// entry was replaced by a newer bio at the same address, so it has completed. Its
    /// range must be read back; `time_ns` is its queue time.
    pub const LOST: u32 = 1 << 7;
    /// A driver-private request that sent data to the device (`REQ_OP_DRV_OUT`: SCSI
    /// `SG_IO` with data out, NVMe I/O passthrough, io_uring `uring_cmd`). The probes cannot
    /// tell which sectors it changed, if any: the completion probe counts it on every
    /// protected range of its disk as a whole-device overflow (read everything again).
    pub const PASSTHROUGH_OUT: u32 = 1 << 8;
    /// Every flag that changes device contents at a known range.
    pub const CHANGES_DATA: u32 = WRITE | DISCARD | WRITE_ZEROES | SECURE_ERASE | LOST;
}

/// A protected range of a disk: a partition, or the whole disk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedRange {
    /// First sector of the range on the whole disk.
    pub start: u64,
    /// Length in 512-byte sectors.
    pub len: u64,
    /// Slot index (< [`MAX_SLOTS`]).
    pub slot: u32,
    /// log2 of sectors per overflow-bitmap bit for this slot.
    pub overflow_shift: u32,
}
const _: () = assert!(size_of::<ProtectedRange>() == 24);

/// Value of the `PROTECTED` map: the protected ranges of one disk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskRanges {
    /// Used entries of `ranges`.
    pub count: u32,
    pub _pad: u32,
    pub ranges: [ProtectedRange; MAX_RANGES_PER_DISK],
}
const _: () = assert!(size_of::<DiskRanges>() == 8 + 24 * MAX_RANGES_PER_DISK);

/// One completed block operation on a protected device, as the BPF program reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeEvent {
    /// Completion time, CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub time_ns: u64,
    /// Per-slot sequence number, from 0. A gap means events were dropped (and the range
    /// of the dropped ones is in the overflow bitmap).
    pub seq: u64,
    /// First sector, relative to the protected device (partition-relative).
    pub sector: u64,
    /// Length in 512-byte sectors (0 for a flush).
    pub sectors: u32,
    /// Slot of the protected device.
    pub slot: u32,
    /// [`op`] flags.
    pub op: u32,
    /// The `blk_status_t` the request completed with, 0 on success.
    pub error: i32,
}
/// Size of [`ChangeEvent`] in the ring buffer.
pub const CHANGE_EVENT_SIZE: usize = 40;
const _: () = assert!(size_of::<ChangeEvent>() == CHANGE_EVENT_SIZE);

/// A data bio queued on a protected disk whose completion has not been seen yet: one slot
/// of the `INFLIGHT` table, an mmap-able array of [`INFLIGHT_SLOTS`] entries addressed by
/// the bio's address ([`inflight_slot`], open addressing over [`INFLIGHT_PROBES`] slots).
///
/// Protocol (every transition of `bio` is an atomic compare-and-swap):
/// - `block_bio_queue` claims a free slot (`0 -> INFLIGHT_CLAIMING`), writes the other
///   fields, then publishes (`INFLIGHT_CLAIMING -> bio`). If the bio's address is still
///   in the table, the bio that had it completed unseen: the queue probe frees that slot
///   (`bio -> 0`) and reports it as [`op::LOST`]. No free slot among the probes: the
///   write is counted in `control::UNTRACKED` (the agent resynchronises everything).
/// - The request completion probe frees the slots of the request's bios (`bio -> 0`);
///   `block_bio_complete` frees those of bios that end without a request.
/// - The agent reads slots through the mapping (`bio`, the fields, then `bio` and
///   `queued_ns` again: a slot that changed meanwhile is skipped, which is safe since it
///   was claimed after the walk began), and frees the slots it reported stalled.
///
/// No lock and no allocation: a queued write costs a few loads and two CAS, a completed
/// one a load and a CAS per bio (the hash map it replaces took a bucket lock and a
/// free-list operation for each).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightBio {
    /// The bio's address (`struct bio *`); 0: free; [`INFLIGHT_CLAIMING`]: being filled.
    pub bio: u64,
    /// Queue time, CLOCK_MONOTONIC ns. With `bio`, identifies the write.
    pub queued_ns: u64,
    /// First sector on the whole disk.
    pub sector: u64,
    /// Kernel `dev_t` of the whole disk.
    pub dev: u32,
    /// Length in sectors.
    pub sectors: u32,
    /// [`op`] flags.
    pub op: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<InflightBio>() == 40);
/// Words (u64) per [`InflightBio`], as the agent reads them through the mapping.
pub const INFLIGHT_WORDS_PER_SLOT: u32 = 5;

/// Slots of the `INFLIGHT` table: far above any device queue depth (a power of two).
pub const INFLIGHT_SLOTS: u32 = 1 << 13;
/// Consecutive slots a bio may occupy (open addressing).
pub const INFLIGHT_PROBES: u32 = 4;
/// `InflightBio::bio` of a slot whose claimer is still writing it.
pub const INFLIGHT_CLAIMING: u64 = 1;

/// Slot `probe` (0..[`INFLIGHT_PROBES`]) of the bio at address `bio`: Fibonacci hashing
/// of the address (bios are slab objects; the low bits carry little).
#[inline(always)]
pub fn inflight_slot(bio: u64, probe: u32) -> u32 {
    let h = ((bio >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        >> (64 - INFLIGHT_SLOTS.trailing_zeros())) as u32;
    h.wrapping_add(probe) & (INFLIGHT_SLOTS - 1)
}

/// Most bios of one request the completion probe walks. The entries of any further bios
/// stay and are re-read after a while (safe, rare); a discard with more bios than this
/// counts as scattered ([`control::SCATTERED_DISCARDS`]).
pub const MAX_BIOS_PER_REQUEST: u32 = 256;

/// Indexes of the `CONTROL` array shared by the programs and the agent.
pub mod control {
    /// Unused (was the next in-flight id).
    pub const UNUSED_1: u32 = 1;
    /// Data bios that could not be tracked (no free in-flight slot among their probes).
    pub const UNTRACKED: u32 = 2;
    /// Runs of the completion probes that failed to read the kernel's structures.
    pub const COMPLETE_ERRORS: u32 = 3;
    /// Runs of the queue probe that failed to read the kernel's structures.
    pub const QUEUE_ERRORS: u32 = 4;
    /// Fault injection for tests: when nonzero, the request completion probe ignores
    /// every N-th data completion, as if the kernel had not run it.
    pub const FAULT_SKIP_EVERY: u32 = 5;
    /// Data completions counted for [`FAULT_SKIP_EVERY`].
    pub const FAULT_COUNTER: u32 = 6;
    /// [`super::op::LOST`] reports that did not fit in the ring (their ranges are in the
    /// overflow bitmap, which the round drains after its instant).
    pub const LOST_DROPPED: u32 = 7;
    /// Discard completions whose bios are not one contiguous run (merged from unrelated
    /// ranges where the device allows several discard segments per request): not
    /// reported as zeroes; their bios' entries stay and are re-read as stalled writes.
    pub const SCATTERED_DISCARDS: u32 = 8;
    /// Runs of the passthrough probe that could not read the kernel's request: which disk
    /// a passthrough write changed is unknown, so every protected device is read again.
    pub const PASSTHROUGH_ERRORS: u32 = 9;
    /// Completed bios whose in-flight entry the completion probe left in the table, to be
    /// reported lost and re-read: a request with more than one bio whose entry is wider
    /// than the piece that completed (split or partly completed bios; the probe reports
    /// one per request).
    pub const LEFT_IN_FLIGHT: u32 = 10;
    /// Entries of the array.
    pub const LEN: u32 = 11;
}

/// Per-slot counters, updated atomically by the BPF programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Next sequence number to hand out.
    pub seq: u64,
    /// Events that could not be reserved in the ring buffer (their ranges are in the
    /// overflow bitmap).
    pub dropped: u64,
    /// Dropped events too wide for the bitmap: the whole device must be resynchronised.
    pub overflow_all: u64,
    /// Generation bumped by queued writes too wide for per-region generations.
    pub wide_gen: u64,
    /// Passthrough requests with data out ([`op::PASSTHROUGH_OUT`]) completed on the
    /// slot's disk; each also bumped `overflow_all`.
    pub passthrough_out: u64,
}
const _: () = assert!(size_of::<SlotStats>() == 40);

/// Where the BPF programs find what they need in the kernel's block-layer structures, and
/// the kernel's operation codes: read from the running kernel's BTF at load time (the
/// programs are raw tracepoints, whose arguments are `struct request *` and
/// `struct bio *`), and set as one global before loading.
///
/// Offsets are in bytes; `flag_*` are masks of `cmd_flags`/`bi_opf`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockLayout {
    /// `struct request`: `q`, `__sector`, `cmd_flags`.
    pub rq_q: u32,
    pub rq_sector: u32,
    pub rq_cmd_flags: u32,
    /// `struct request_queue`: `disk`.
    pub q_disk: u32,
    /// `struct gendisk`: `major`, `first_minor`.
    pub disk_major: u32,
    pub disk_first_minor: u32,
    /// `struct bio`: `bi_bdev`, `bi_opf`, `bi_iter.bi_sector`, `bi_iter.bi_size`.
    pub bio_bdev: u32,
    pub bio_opf: u32,
    pub bio_sector: u32,
    pub bio_size: u32,
    /// `struct block_device`: `bd_disk`.
    pub bdev_disk: u32,
    /// `struct bio`: `bi_status` (one byte), `bi_next`.
    pub bio_status: u32,
    pub bio_next: u32,
    /// `struct request`: `bio` (the first of its bios).
    pub rq_bio: u32,
    /// `enum req_op` values.
    pub op_write: u32,
    pub op_zone_append: u32,
    pub op_flush: u32,
    pub op_discard: u32,
    pub op_secure_erase: u32,
    pub op_write_zeroes: u32,
    /// `REQ_OP_DRV_OUT`: driver-private requests with data out (passthrough).
    pub op_drv_out: u32,
    /// `REQ_FUA` and `REQ_PREFLUSH` masks.
    pub flag_fua: u32,
    pub flag_preflush: u32,
    /// Nonzero when the bio fields the probes read (`bi_bdev`, `bi_opf`,
    /// `bi_iter.bi_sector`, `bi_iter.bi_size`, `bi_next`) all lie, naturally aligned, in
    /// the first [`LAYOUT_WINDOW_BYTES`] of `struct bio`: the probes then read them in one
    /// go.
    pub bio_window: u32,
    /// The same for the request fields the completion probe reads (`q`, `cmd_flags`,
    /// `__sector`, `bio`).
    pub rq_window: u32,
}
const _: () = assert!(size_of::<BlockLayout>() == 100);

/// Bytes at the start of a `struct bio` or `struct request` read at once when their
/// fields fit (see [`BlockLayout::bio_window`]).
pub const LAYOUT_WINDOW_BYTES: u32 = 64;

/// Whether a field of `size` bytes at `offset` lies naturally aligned in the window.
pub const fn in_layout_window(offset: u32, size: u32) -> bool {
    offset + size <= LAYOUT_WINDOW_BYTES && offset.is_multiple_of(size)
}

/// Bits of `cmd_flags`/`bi_opf` holding the operation (`REQ_OP_BITS`; 8 since Linux 4.10).
pub const REQ_OP_MASK: u32 = 0xff;

impl BlockLayout {
    /// [`op`] flags of a request or bio with flags `opf`.
    #[inline(always)]
    pub fn op_flags(&self, opf: u32) -> u32 {
        let code = opf & REQ_OP_MASK;
        let mut flags = if code == self.op_write || code == self.op_zone_append {
            op::WRITE
        } else if code == self.op_discard {
            op::DISCARD
        } else if code == self.op_secure_erase {
            op::SECURE_ERASE
        } else if code == self.op_write_zeroes {
            op::WRITE_ZEROES
        } else if code == self.op_flush {
            op::FLUSH
        } else if code == self.op_drv_out {
            op::PASSTHROUGH_OUT
        } else {
            0
        };
        if opf & self.flag_fua != 0 && flags & op::WRITE != 0 {
            flags |= op::FUA;
        }
        if opf & self.flag_preflush != 0 {
            flags |= op::FLUSH;
        }
        flags
    }
}

/// Kernel-internal `dev_t` (`MKDEV`: 12-bit major, 20-bit minor) as block tracepoints
/// report it.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Index into `WRITE_GEN` of a region of a slot: a multiplicative hash, so regions of
/// different slots spread out. Collisions only cause false "raced" verdicts (safe).
#[inline(always)]
pub const fn write_gen_index(slot: u32, region: u64) -> u32 {
    let h = (region ^ ((slot as u64) << 48)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - WRITE_GEN_BITS)) as u32
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these types are repr(C), have no padding (checked by the size asserts
    // above) and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ProtectedRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DiskRanges {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ChangeEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InflightBio {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_slots_are_in_bounds_consecutive_and_spread() {
        extern crate std;
        let mut used = std::collections::HashSet::new();
        // Bios are slab objects: addresses 256 bytes apart in one page run.
        for i in 0..1024u64 {
            let bio = 0xffff_8880_1234_0000 + i * 256;
            let first = inflight_slot(bio, 0);
            for p in 0..INFLIGHT_PROBES {
                let s = inflight_slot(bio, p);
                assert!(s < INFLIGHT_SLOTS);
                assert_eq!(s, (first + p) % INFLIGHT_SLOTS);
            }
            used.insert(first);
        }
        // 1024 addresses over 8192 slots: a poor hash would pile them up.
        assert!(used.len() > 900, "only {} distinct first slots", used.len());
    }

    /// Linux 6.x values (include/linux/blk_types.h).
    fn layout() -> BlockLayout {
        BlockLayout {
            op_write: 1,
            op_flush: 2,
            op_discard: 3,
            op_secure_erase: 5,
            op_zone_append: 7,
            op_write_zeroes: 9,
            op_drv_out: 35,
            flag_fua: 1 << 17,
            flag_preflush: 1 << 18,
            ..BlockLayout::default()
        }
    }

    #[test]
    fn op_decoding() {
        let l = layout();
        assert_eq!(l.op_flags(1), op::WRITE);
        assert_eq!(
            l.op_flags(1 | 1 << 11),
            op::WRITE,
            "other modifier bits ignored"
        );
        assert_eq!(l.op_flags(1 | 1 << 17), op::WRITE | op::FUA);
        assert_eq!(
            l.op_flags(1 | 1 << 17 | 1 << 18),
            op::WRITE | op::FUA | op::FLUSH
        );
        assert_eq!(l.op_flags(7), op::WRITE, "zone append writes data");
        assert_eq!(l.op_flags(2), op::FLUSH);
        assert_eq!(l.op_flags(2 | 1 << 18), op::FLUSH);
        assert_eq!(l.op_flags(3), op::DISCARD);
        assert_eq!(l.op_flags(5), op::SECURE_ERASE);
        assert_eq!(l.op_flags(9), op::WRITE_ZEROES);
        assert_eq!(l.op_flags(0), 0, "read");
        assert_eq!(
            l.op_flags(34),
            0,
            "driver-private, data in (SG_IO INQUIRY and the like)"
        );
        assert_eq!(
            l.op_flags(35),
            op::PASSTHROUGH_OUT,
            "driver-private, data out: may have written anywhere"
        );
        assert_eq!(
            l.op_flags(35) & op::CHANGES_DATA,
            0,
            "a passthrough write has no range to read back or zero"
        );
        assert_eq!(l.op_flags(1 << 17), 0, "a read with FUA changes nothing");
    }

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(kernel_dev(7, 0), 7 << 20);
        assert_eq!(kernel_dev(259, 3), (259 << 20) | 3);
    }

    #[test]
    fn write_gen_index_in_range_and_spread() {
        let mut seen = [false; 64];
        for region in 0..10_000u64 {
            let i = write_gen_index(3, region);
            assert!(i < WRITE_GEN_ENTRIES);
            seen[(i >> (WRITE_GEN_BITS - 6)) as usize] = true;
        }
        assert!(
            seen.iter().filter(|s| **s).count() > 48,
            "hash clusters: {seen:?}"
        );
        assert_ne!(write_gen_index(0, 5), write_gen_index(1, 5));
    }
}
