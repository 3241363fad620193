//! ripcord's block-change capture programs, on raw tracepoints.
//!
//! * `block_rq_complete(struct request *, blk_status_t, unsigned int nr_bytes)`: every
//!   completed write, discard, write-zeroes and flush on a protected device becomes a
//!   [`ChangeEvent`] in the `EVENTS` ring buffer. When the ring is full the event's range
//!   is set in the slot's overflow bitmap and the drop counter is bumped: never a silent
//!   drop. Only the bios a completion ends have their in-flight entries freed (a request
//!   may complete in pieces), and a discard whose bios are not one contiguous run is left
//!   to the in-flight entries (re-read, never zeroed: see `bios_contiguous`).
//! * `block_rq_passthrough`, on the same tracepoint: a passthrough request with data out
//!   (`REQ_OP_DRV_OUT`: `SG_IO`, NVMe or io_uring passthrough) on a protected disk has no
//!   range the probes can trust: it marks every protected range of its disk for a
//!   whole-device re-read (`SlotStats::passthrough_out`, docs/decisions/0020).
//! * `block_bio_queue(struct bio *)`: every *queued* write bumps the write generation of
//!   the regions it covers (`WRITE_GEN`), so the agent can tell whether a newer write was
//!   queued while it read a region back.
//!
//! Raw tracepoints, not perf-event tracepoints: the kernel runs a perf-event tracepoint
//! program only if no BPF program at all is running on that CPU, so a completion in a
//! softirq that interrupted the queue probe was skipped without a trace. Raw tracepoint
//! programs are only skipped if the *same* program is interrupted (the agent detects that
//! from the program's `recursion_misses` and resynchronises). They also skip building the
//! perf record. Field offsets and operation codes come from the kernel's BTF at load time
//! (the `LAYOUT` global), so this object does not depend on one kernel's struct layout.
//!
//! Maps:
//!
//! | map | key → value | written by | cleared by |
//! | --- | --- | --- | --- |
//! | `PROTECTED` | whole-disk `dev_t` → protected ranges and their slots | agent, at start | never |
//! | `EVENTS` | ring of [`ChangeEvent`]s | completion probes | agent (consumer) |
//! | `STATS` | slot → sequence, drop and wide-write counters | all probes | never (counters) |
//! | `OVERFLOW` | bitmap of regions whose events were dropped (mmap) | completion probes | agent (swap to 0) |
//! | `CONTROL` | counters and settings (`agent_common::control`) | probes; agent (settings) | never |
//! | `INFLIGHT` | lock-free table of queued, uncompleted data bios (mmap) | queue probe | completion probes; queue probe on address reuse |
//! | `WRITE_GEN` | per-region write generations (mmap) | queue probe | never (compared) |
//! | `AYA_LOGS` | ring of aya-log records | any probe, on a diagnostic | agent (logger) |
//!
//! Diagnostics go through aya-log (`AYA_LOGS`, into the agent's `tracing` output): a probe
//! that cannot read the kernel's structures, a full in-flight table (warn), a scattered
//! discard (debug). The agent cuts levels at load time (`RIPCORD_BPF_LOG`, default warn),
//! so the verifier prunes disabled statements and the hot path pays nothing for them.
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

mod atomic;
mod emit;
mod inflight;
mod kernel;

use agent_common::{
    BlockLayout, DiskRanges, INFLIGHT_SLOTS, InflightBio, MAX_BIOS_PER_REQUEST,
    MAX_GEN_REGIONS_PER_WRITE, MAX_RANGES_PER_DISK, MAX_SLOTS, OVERFLOW_WORDS, SlotStats,
    WRITE_GEN_ENTRIES, WRITE_GEN_REGION_SHIFT, control, op, write_gen_index,
};
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::bpf_ktime_get_ns,
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::RawTracePointContext,
};
use aya_log_ebpf::{debug, warn};

use crate::{
    atomic::fetch_inc,
    emit::{bump, clip, emit_on_disk, mark_every_range_changed},
    inflight::{Exact, inflight_peek, inflight_put, inflight_take, inflight_take_exact},
    kernel::{Bio, Window, bdev_disk_dev, disk_dev, kread, read_bio},
};

/// Kernel structure offsets and operation codes, set by the agent from BTF.
#[unsafe(no_mangle)]
static LAYOUT: BlockLayout = BlockLayout {
    rq_q: 0,
    rq_sector: 0,
    rq_cmd_flags: 0,
    q_disk: 0,
    disk_major: 0,
    disk_first_minor: 0,
    bio_bdev: 0,
    bio_opf: 0,
    bio_sector: 0,
    bio_size: 0,
    bdev_disk: 0,
    op_write: 0,
    op_zone_append: 0,
    op_flush: 0,
    op_discard: 0,
    op_secure_erase: 0,
    op_write_zeroes: 0,
    op_drv_out: 0,
    flag_fua: 0,
    flag_preflush: 0,
    bio_window: 0,
    rq_window: 0,
    bio_status: 0,
    bio_next: 0,
    rq_bio: 0,
};
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
/// Counters and settings shared with the agent (`agent_common::control`).
#[map]
static CONTROL: Array<u64> = Array::with_max_entries(control::LEN, 0);
/// Queued data bios whose completion has not been seen: a lock-free table addressed by
/// the bio's address (protocol in `agent_common::InflightBio`).
#[map]
static INFLIGHT: Array<InflightBio> = Array::with_max_entries(INFLIGHT_SLOTS, BPF_F_MMAPABLE);
#[map]
static WRITE_GEN: Array<u64> = Array::with_max_entries(WRITE_GEN_ENTRIES, BPF_F_MMAPABLE);

// Host builds (type-checking only): the same operations through core's atomics.

#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn block_rq_complete(ctx: RawTracePointContext) -> i32 {
    if try_rq_complete(&ctx).is_err() {
        bump(control::COMPLETE_ERRORS);
        warn!(
            &ctx,
            "block_rq_complete: cannot read the kernel's request; its writes stay in flight \
             and are re-read"
        );
    }
    0
}

fn try_rq_complete(ctx: &RawTracePointContext) -> Result<(), i32> {
    // SAFETY: a volatile read of the global the loader patched (see `global`).
    let layout: BlockLayout = unsafe { core::ptr::read_volatile(&LAYOUT) };
    let rq: u64 = ctx.arg(0);
    let status = ctx.arg::<u64>(1) as u8;
    let nr_bytes = ctx.arg::<u64>(2) as u32;
    // One read for the request's fields where they fit the window (every kernel so far).
    let (q, cmd_flags, sector, first_bio) = if layout.rq_window != 0 {
        let w: Window = kread(rq, 0)?;
        (
            w.u64_at(layout.rq_q),
            w.u32_at(layout.rq_cmd_flags),
            w.u64_at(layout.rq_sector),
            w.u64_at(layout.rq_bio),
        )
    } else {
        (
            kread::<u64>(rq, layout.rq_q)?,
            kread::<u32>(rq, layout.rq_cmd_flags)?,
            kread::<u64>(rq, layout.rq_sector)?,
            kread::<u64>(rq, layout.rq_bio)?,
        )
    };
    // Reads (most completions on most disks) leave before any device lookup.
    let mut flags = layout.op_flags(cmd_flags);
    // (Passthrough writes are `block_rq_passthrough`'s.)
    if flags & (op::CHANGES_DATA | op::FLUSH) == 0 {
        return Ok(());
    }
    let nr = nr_bytes >> 9;
    if nr == 0 && flags & op::FLUSH == 0 {
        // The flush machinery completes the original request with 0 bytes: nothing new.
        return Ok(());
    }
    let disk: u64 = kread(q, layout.q_disk)?;
    let dev = disk_dev(&layout, disk)?;
    // SAFETY: the value is only read in this program run.
    let Some(disk) = (unsafe { PROTECTED.get(dev) }) else {
        return Ok(());
    };
    let error = status as i32;
    if error != 0 {
        flags |= op::ERROR;
    }
    if flags & op::CHANGES_DATA != 0 && nr != 0 {
        let every = CONTROL.get(control::FAULT_SKIP_EVERY).copied().unwrap_or(0);
        if every != 0 && bump(control::FAULT_COUNTER) % every == every - 1 {
            // Injected: as if the kernel had not run this program.
            debug!(
                ctx,
                "fault injection: completion of {} sectors at {} ignored", nr, sector
            );
            return Ok(());
        }
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if flags & op::CHANGES_DATA == 0 || nr == 0 {
        emit_on_disk(disk, sector, 0, flags, error, now);
        return Ok(());
    }
    // Only discards merge bios of unrelated ranges into one request
    // (`bio_attempt_discard_merge`, where `max_discard_segments > 1`, as on NVMe): the
    // request's start and length would zero live data between them. Such a completion is
    // not reported; its bios' in-flight entries stay, so the agent re-reads their ranges
    // (reported stalled), never zeroes them.
    if flags & op::DISCARD != 0 && !bios_contiguous(&layout, first_bio, sector, nr_bytes)? {
        bump(control::SCATTERED_DISCARDS);
        debug!(
            ctx,
            "a discard of {} sectors at {} holds bios of other ranges: left to re-read", nr, sector
        );
        return Ok(());
    }
    // Every other request's bios are contiguous, and the tracepoint gives the start of the
    // completed piece.
    emit_on_disk(disk, sector, nr, flags, error, now);
    let other = take_completed_bios(&layout, first_bio, nr_bytes)?;
    if other == 0 {
        return Ok(());
    }
    // The piece of it that completed (its iterator is not advanced yet).
    let piece = read_bio(&layout, other)?;
    let piece_start = piece.sector;
    let piece_end = piece.sector.saturating_add(u64::from(piece.size >> 9));
    // A bio whose entry is not the piece that ended it. Either the bio was split, and the
    // pieces the kernel cut off it completed in requests of their own, any of which this
    // program may have missed (a skipped run leaves no trace but `recursion_misses`): its
    // whole queued range is reported. Or the entry is a stale one of an earlier bio at this
    // address whose completion went unseen: reported lost, as the queue probe does on
    // address reuse. Reported before the entry is freed, as every completion is (a reader
    // always finds a write in the table or in the ring).
    if let Some(entry) = inflight_peek(other) {
        // SAFETY: the value is only read in this program run.
        if let Some(owner) = unsafe { PROTECTED.get(entry.dev) } {
            let within = entry.sector <= piece_start
                && piece_end <= entry.sector.saturating_add(u64::from(entry.sectors));
            // A lost report carries the lost bio's queue time, as the queue probe's does.
            let (op, at) = if within {
                (entry.op, now)
            } else {
                (op::LOST, entry.queued_ns)
            };
            emit_on_disk(owner, entry.sector, entry.sectors, op, 0, at);
        }
        let _ = inflight_take(other);
    }
    Ok(())
}

/// Free the in-flight entries of the bios a completion of `nr_bytes` ends (the
/// tracepoint fires before the kernel unlinks them). A completion that ends inside a bio
/// (a request completed in pieces) keeps that bio's entry: it is still in flight.
///
/// Only an entry that is exactly the piece that completed is freed here. Returns the first
/// bio whose entry is another range (0: none), for the caller to report and free; more of
/// them in one request (rare) stay in the table (counted in `control::LEFT_IN_FLIGHT`),
/// and are reported lost and read back.
#[inline(always)]
fn take_completed_bios(layout: &BlockLayout, first_bio: u64, nr_bytes: u32) -> Result<u64, i32> {
    let mut remaining = nr_bytes as u64;
    let mut bio = first_bio;
    let mut other = 0u64;
    for _ in 0..MAX_BIOS_PER_REQUEST {
        if bio == 0 || remaining == 0 {
            break;
        }
        let b = read_bio(layout, bio)?;
        let bio_bytes = u64::from(b.size);
        if bio_bytes > remaining {
            break;
        }
        remaining -= bio_bytes;
        let end = b.sector.saturating_add(bio_bytes >> 9);
        if let Exact::Other = inflight_take_exact(bio, b.sector, end) {
            if other == 0 {
                other = bio;
            } else {
                bump(control::LEFT_IN_FLIGHT);
            }
        }
        bio = b.next;
    }
    Ok(other)
}

/// Whether the bios a completion of `nr_bytes` at `sector` ends are one contiguous run
/// from `sector` (false when the walk cannot tell: more bios than it covers).
#[inline(always)]
fn bios_contiguous(
    layout: &BlockLayout,
    first_bio: u64,
    sector: u64,
    nr_bytes: u32,
) -> Result<bool, i32> {
    let mut remaining = nr_bytes as u64;
    let mut expected = sector;
    let mut bio = first_bio;
    for _ in 0..MAX_BIOS_PER_REQUEST {
        if bio == 0 || remaining == 0 {
            break;
        }
        let b = read_bio(layout, bio)?;
        if b.sector != expected {
            return Ok(false);
        }
        let bio_bytes = u64::from(b.size);
        let done = if bio_bytes > remaining {
            remaining
        } else {
            bio_bytes
        };
        remaining -= done;
        expected += done >> 9;
        bio = b.next;
    }
    Ok(remaining == 0)
}

/// Passthrough requests with data out ([`op::PASSTHROUGH_OUT`]) on a protected disk. A
/// program of its own on the same tracepoint: folded into `block_rq_complete`, the extra
/// branch pushed that program past the verifier's budget of a million instructions.
#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn block_rq_passthrough(ctx: RawTracePointContext) -> i32 {
    if try_rq_passthrough(&ctx).is_err() {
        // Unknown which disk it wrote: every protected device is read again whole.
        bump(control::PASSTHROUGH_ERRORS);
        warn!(
            &ctx,
            "block_rq_complete: cannot read a passthrough request; every protected device \
             is read again"
        );
    }
    0
}

fn try_rq_passthrough(ctx: &RawTracePointContext) -> Result<(), i32> {
    // SAFETY: a volatile read of the global the loader patched (see `global`).
    let layout: BlockLayout = unsafe { core::ptr::read_volatile(&LAYOUT) };
    let rq: u64 = ctx.arg(0);
    let cmd_flags: u32 = kread(rq, layout.rq_cmd_flags)?;
    if layout.op_flags(cmd_flags) & op::PASSTHROUGH_OUT == 0 {
        return Ok(());
    }
    // No bio range says what it wrote (its sector means nothing; the command it carries
    // addresses the whole disk): every protected range of the disk is read again. It never
    // passed the queue probe, so it has no in-flight entry to free.
    let q: u64 = kread(rq, layout.rq_q)?;
    let disk: u64 = kread(q, layout.q_disk)?;
    let dev = disk_dev(&layout, disk)?;
    // SAFETY: the value is only read in this program run.
    if let Some(disk) = unsafe { PROTECTED.get(dev) } {
        mark_every_range_changed(disk);
    }
    Ok(())
}

#[raw_tracepoint(tracepoint = "block_bio_complete")]
pub fn block_bio_complete(ctx: RawTracePointContext) -> i32 {
    if try_bio_complete(&ctx).is_err() {
        bump(control::COMPLETE_ERRORS);
        warn!(
            &ctx,
            "block_bio_complete: cannot read the kernel's bio; its write stays in flight \
             and is re-read"
        );
    }
    0
}

/// `block_bio_complete(struct request_queue *, struct bio *)`: fires for traced bios that
/// end without a request completion tracing them (bio-based drivers such as zram, md and
/// device-mapper, and bios failed before a request was allocated); the request path
/// clears the bio's trace flag instead. The bio's iterator may have advanced, so the range
/// comes from the queue-time entry.
///
/// A data bio on a protected disk without an entry was queued before the queue probe was
/// attached (or found the table full, which the queue probe counts): its range is
/// unknown, so every protected range of its disk is marked for resynchronisation
/// (`overflow_all`), as for an event too wide for the bitmap.
fn try_bio_complete(ctx: &RawTracePointContext) -> Result<(), i32> {
    // SAFETY: as in `try_rq_complete`.
    let layout: BlockLayout = unsafe { core::ptr::read_volatile(&LAYOUT) };
    let bio: u64 = ctx.arg(1);
    // Read before taking the entry: on failure it stays and the agent re-reads the range.
    let status: u8 = kread(bio, layout.bio_status)?;
    let Some(entry) = inflight_take(bio) else {
        return untracked_bio_complete(ctx, &layout, bio);
    };
    // SAFETY: the value is only read in this program run.
    let Some(disk) = (unsafe { PROTECTED.get(entry.dev) }) else {
        return Ok(());
    };
    let mut flags = entry.op;
    if status != 0 {
        flags |= op::ERROR;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    emit_on_disk(disk, entry.sector, entry.sectors, flags, status as i32, now);
    Ok(())
}

/// A completed bio without an in-flight entry (see `try_bio_complete`).
#[inline(always)]
fn untracked_bio_complete(
    ctx: &RawTracePointContext,
    layout: &BlockLayout,
    bio: u64,
) -> Result<(), i32> {
    let b = read_bio(layout, bio)?;
    if layout.op_flags(b.opf) & op::CHANGES_DATA == 0 {
        return Ok(());
    }
    let dev = bdev_disk_dev(layout, b.bdev)?;
    // SAFETY: the value is only read in this program run.
    let Some(disk) = (unsafe { PROTECTED.get(dev) }) else {
        return Ok(());
    };
    let count = disk.count as usize;
    for i in 0..MAX_RANGES_PER_DISK {
        if i >= count {
            break;
        }
        if let Some(stats) = STATS.get_ptr_mut(disk.ranges[i].slot) {
            // SAFETY: `stats` is a valid map value pointer; the field address is in bounds.
            fetch_inc(unsafe { &raw mut (*stats).overflow_all });
        }
    }
    warn!(
        ctx,
        "an untracked write on disk {}:{} completed (queued before the probes attached): \
         resynchronising its protected devices",
        dev >> 20,
        dev & 0xf_ffff
    );
    Ok(())
}

#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue(ctx: RawTracePointContext) -> i32 {
    if try_bio_queue(&ctx).is_err() {
        bump(control::QUEUE_ERRORS);
        warn!(
            &ctx,
            "block_bio_queue: cannot read the kernel's bio; every protected device is \
             resynchronised"
        );
    }
    0
}

fn try_bio_queue(ctx: &RawTracePointContext) -> Result<(), i32> {
    // SAFETY: as in `try_rq_complete`.
    let layout: BlockLayout = unsafe { core::ptr::read_volatile(&LAYOUT) };
    let bio: u64 = ctx.arg(0);
    let Bio {
        bdev,
        opf,
        sector,
        size,
        ..
    } = read_bio(&layout, bio)?;
    // Reads and empty bios leave before any device lookup.
    let flags = layout.op_flags(opf);
    if flags & op::CHANGES_DATA == 0 {
        return Ok(());
    }
    // Queued bios are already remapped to absolute disk sectors.
    let nr = size >> 9;
    if nr == 0 {
        return Ok(());
    }
    let dev = bdev_disk_dev(&layout, bdev)?;
    // SAFETY: the value is only read in this program run.
    let Some(disk) = (unsafe { PROTECTED.get(dev) }) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(old) = inflight_take(bio) {
        // This address belonged to a bio whose completion was never seen: report it now,
        // before the address is tracked again (its data must be read back).
        // SAFETY: the value is only read in this program run.
        if let Some(old_disk) = unsafe { PROTECTED.get(old.dev) } {
            emit_on_disk(
                old_disk,
                old.sector,
                old.sectors,
                op::LOST,
                0,
                old.queued_ns,
            );
        }
    }
    if !inflight_put(InflightBio {
        bio,
        queued_ns: now,
        sector,
        dev,
        sectors: nr,
        op: flags & !op::FLUSH,
        _pad: 0,
    }) {
        bump(control::UNTRACKED);
        warn!(
            ctx,
            "in-flight table full: a write at sector {} of disk {}:{} is not tracked; every \
             protected device is resynchronised",
            sector,
            dev >> 20,
            dev & 0xf_ffff
        );
    }
    let end = sector.saturating_add(nr as u64);
    let count = disk.count as usize;
    for i in 0..MAX_RANGES_PER_DISK {
        if i >= count {
            break;
        }
        let r = &disk.ranges[i];
        let Some((lo, hi)) = clip(r, sector, end) else {
            continue;
        };
        let Some(stats) = STATS.get_ptr_mut(r.slot) else {
            continue;
        };
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
