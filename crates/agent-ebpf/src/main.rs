//! ripcord's block-change capture programs.
//!
//! * `block_rq_complete`: every completed write, discard, write-zeroes and flush on a
//!   protected device becomes a [`ChangeEvent`] in the `EVENTS` ring buffer. When the ring
//!   is full the event's range is set in the slot's overflow bitmap and the drop counter
//!   is bumped: never a silent drop.
//! * `block_bio_queue`: every *queued* write bumps the write generation of the regions it
//!   covers (`WRITE_GEN`), so the agent can tell whether a newer write was queued while it
//!   read a region back.
//!
//! Tracepoint field offsets come from tracefs at load time (globals below), so this object
//! does not depend on one kernel's struct layout.
//!
//! On the host (`cargo clippy --workspace`, `cargo test --workspace`) this compiles to an
//! empty program, so workspace-wide commands need no special casing.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// core's atomic types have no read-modify-write operations on the BPF target; the
// intrinsics lower to BPF atomic instructions (kernel >= 5.12 for fetch variants).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "BPF atomics need core::intrinsics")
)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code))]

use agent_common::{
    ChangeEvent, DiskRanges, MAX_GEN_REGIONS_PER_WRITE, MAX_OVERFLOW_BITS_PER_EVENT,
    MAX_RANGES_PER_DISK, MAX_SLOTS, OVERFLOW_BITS_PER_SLOT, OVERFLOW_WORDS,
    OVERFLOW_WORDS_PER_SLOT, ProtectedRange, SlotStats, WRITE_GEN_ENTRIES, WRITE_GEN_REGION_SHIFT,
    op, parse_rwbs, write_gen_index,
};
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::TracePointContext,
};

// Field offsets of block:block_rq_complete, set by the agent from tracefs.
#[unsafe(no_mangle)]
static RQ_DEV_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_SECTOR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_NR_SECTOR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_ERROR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_RWBS_OFF: u32 = 0;
// Field offsets of block:block_bio_queue.
#[unsafe(no_mangle)]
static BQ_DEV_OFF: u32 = 0;
#[unsafe(no_mangle)]
static BQ_SECTOR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static BQ_NR_SECTOR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static BQ_RWBS_OFF: u32 = 0;
/// Wake the consumer only once this many bytes wait in the ring; below it the agent's
/// poll timeout collects them. Batches wakeups instead of one per event.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 64 * 1024;

#[map]
static PROTECTED: HashMap<u32, DiskRanges> = HashMap::with_max_entries(MAX_SLOTS, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(agent_common::DEFAULT_RING_BYTES, 0);
#[map]
static STATS: Array<SlotStats> = Array::with_max_entries(MAX_SLOTS, 0);
#[map]
static OVERFLOW: Array<u64> = Array::with_max_entries(OVERFLOW_WORDS, BPF_F_MMAPABLE);
#[map]
static WRITE_GEN: Array<u64> = Array::with_max_entries(WRITE_GEN_ENTRIES, BPF_F_MMAPABLE);

#[inline(always)]
fn global<T: Copy>(v: &T) -> T {
    // SAFETY: a volatile read of a static keeps the compiler from folding the placeholder
    // value; the loader patches the real value into .rodata.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn field<T>(ctx: &TracePointContext, off: &u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad offset yields Err.
    unsafe { ctx.read_at::<T>(global(off) as usize) }
}

/// Atomic `*ptr += 1`, returning the old value. SeqCst: LLVM's BPF backend lowers a
/// relaxed fetch-and-add whose result is used to the plain (non-fetching) instruction.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn fetch_inc(ptr: *mut u64) -> u64 {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: `ptr` points into a map value, valid for the program's run and 8-aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(ptr, 1) }
}

/// Atomic `*ptr |= bits`.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn fetch_or(ptr: *mut u64, bits: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_or};
    // SAFETY: as in `fetch_inc`.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, bits) };
}

// Host builds (type-checking only): the same operations through core's atomics.
#[cfg(not(target_arch = "bpf"))]
fn fetch_inc(ptr: *mut u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(ptr) }
        .fetch_add(1, core::sync::atomic::Ordering::SeqCst)
}

#[cfg(not(target_arch = "bpf"))]
fn fetch_or(ptr: *mut u64, bits: u64) {
    // SAFETY: as above.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(ptr) }
        .fetch_or(bits, core::sync::atomic::Ordering::Relaxed);
}

#[tracepoint]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    let _ = try_rq_complete(&ctx);
    0
}

fn try_rq_complete(ctx: &TracePointContext) -> Result<(), i32> {
    let dev: u32 = field(ctx, &RQ_DEV_OFF)?;
    // SAFETY: the value is only read in this program run.
    let Some(disk) = (unsafe { PROTECTED.get(dev) }) else {
        return Ok(());
    };
    let rwbs: u64 = field(ctx, &RQ_RWBS_OFF)?;
    let mut flags = parse_rwbs(rwbs);
    if flags & (op::CHANGES_DATA | op::FLUSH) == 0 {
        return Ok(());
    }
    let sector: u64 = field(ctx, &RQ_SECTOR_OFF)?;
    let nr: u32 = field(ctx, &RQ_NR_SECTOR_OFF)?;
    let error: i32 = field(ctx, &RQ_ERROR_OFF)?;
    if error != 0 {
        flags |= op::ERROR;
    }
    if nr == 0 && flags & op::FLUSH == 0 {
        // The flush machinery completes the original request with 0 bytes: nothing new.
        return Ok(());
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let end = sector.saturating_add(nr as u64);
    let count = disk.count as usize;
    for i in 0..MAX_RANGES_PER_DISK {
        if i >= count {
            break;
        }
        let r = &disk.ranges[i];
        if nr == 0 {
            // A flush covers every range of the disk.
            emit(r, 0, 0, flags, error, now);
            continue;
        }
        let lo = if sector > r.start { sector } else { r.start };
        let r_end = r.start.saturating_add(r.len);
        let hi = if end < r_end { end } else { r_end };
        if lo < hi {
            emit(r, lo - r.start, (hi - lo) as u32, flags, error, now);
        }
    }
    Ok(())
}

#[inline(always)]
fn emit(r: &ProtectedRange, sector: u64, sectors: u32, flags: u32, error: i32, now: u64) {
    let Some(stats) = STATS.get_ptr_mut(r.slot) else {
        return;
    };
    // SAFETY: `stats` is a valid map value pointer; the field address is in bounds.
    let seq = fetch_inc(unsafe { &raw mut (*stats).seq });
    let event = ChangeEvent {
        time_ns: now,
        seq,
        sector,
        sectors,
        slot: r.slot,
        op: flags,
        error,
    };
    match EVENTS.reserve::<ChangeEvent>(0) {
        Some(mut entry) => {
            entry.write(event);
            let wake = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= global(&WAKEUP_BYTES) {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(wake as u64);
        }
        None => {
            // SAFETY: as above.
            fetch_inc(unsafe { &raw mut (*stats).dropped });
            if flags & op::CHANGES_DATA != 0 {
                mark_overflow(r, sector, sectors as u64, stats);
            }
        }
    }
}

#[inline(always)]
fn mark_overflow(r: &ProtectedRange, sector: u64, sectors: u64, stats: *mut SlotStats) {
    if sectors == 0 {
        return;
    }
    let shift = r.overflow_shift & 63;
    let first = sector >> shift;
    let last = (sector + sectors - 1) >> shift;
    if last - first >= MAX_OVERFLOW_BITS_PER_EVENT || last >= OVERFLOW_BITS_PER_SLOT {
        // SAFETY: as in `emit`.
        fetch_inc(unsafe { &raw mut (*stats).overflow_all });
        return;
    }
    let base = r.slot as u64 * OVERFLOW_WORDS_PER_SLOT as u64;
    for i in 0..MAX_OVERFLOW_BITS_PER_EVENT {
        let bit = first + i;
        if bit > last {
            break;
        }
        let word = (base + (bit >> 6)) as u32;
        if let Some(p) = OVERFLOW.get_ptr_mut(word) {
            fetch_or(p, 1 << (bit & 63));
        }
    }
}

#[tracepoint]
pub fn block_bio_queue(ctx: TracePointContext) -> u32 {
    let _ = try_bio_queue(&ctx);
    0
}

fn try_bio_queue(ctx: &TracePointContext) -> Result<(), i32> {
    let dev: u32 = field(ctx, &BQ_DEV_OFF)?;
    // SAFETY: the value is only read in this program run.
    let Some(disk) = (unsafe { PROTECTED.get(dev) }) else {
        return Ok(());
    };
    let rwbs: u64 = field(ctx, &BQ_RWBS_OFF)?;
    if parse_rwbs(rwbs) & op::CHANGES_DATA == 0 {
        return Ok(());
    }
    let sector: u64 = field(ctx, &BQ_SECTOR_OFF)?;
    let nr: u32 = field(ctx, &BQ_NR_SECTOR_OFF)?;
    if nr == 0 {
        return Ok(());
    }
    let end = sector.saturating_add(nr as u64);
    let count = disk.count as usize;
    for i in 0..MAX_RANGES_PER_DISK {
        if i >= count {
            break;
        }
        let r = &disk.ranges[i];
        let lo = if sector > r.start { sector } else { r.start };
        let r_end = r.start.saturating_add(r.len);
        let hi = if end < r_end { end } else { r_end };
        if lo >= hi {
            continue;
        }
        let Some(stats) = STATS.get_ptr_mut(r.slot) else {
            continue;
        };
        // SAFETY: `stats` is a valid map value pointer.
        fetch_inc(unsafe { &raw mut (*stats).queued });
        let first = (lo - r.start) >> WRITE_GEN_REGION_SHIFT;
        let last = (hi - r.start - 1) >> WRITE_GEN_REGION_SHIFT;
        if last - first >= MAX_GEN_REGIONS_PER_WRITE {
            // SAFETY: as above.
            fetch_inc(unsafe { &raw mut (*stats).wide_gen });
            continue;
        }
        for j in 0..MAX_GEN_REGIONS_PER_WRITE {
            let region = first + j;
            if region > last {
                break;
            }
            if let Some(p) = WRITE_GEN.get_ptr_mut(write_gen_index(r.slot, region)) {
                fetch_inc(p);
            }
        }
    }
    Ok(())
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
