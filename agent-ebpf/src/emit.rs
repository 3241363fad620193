//! Reporting changes: one `ChangeEvent` per protected range a change touches, into the
//! `EVENTS` ring; when the ring is full, the range goes into the slot's overflow bitmap and
//! the drop counter is bumped (never a silent drop).

use agent_common::{
    ChangeEvent, DiskRanges, MAX_OVERFLOW_BITS_PER_EVENT, MAX_RANGES_PER_DISK,
    OVERFLOW_BITS_PER_SLOT, OVERFLOW_WORDS_PER_SLOT, ProtectedRange, SlotStats, control, op,
};
use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};

use crate::{
    CONTROL, EVENTS, OVERFLOW, STATS, WAKEUP_BYTES,
    atomic::{fetch_inc, fetch_or},
    kernel::global,
};

#[inline(always)]
pub(crate) fn bump(index: u32) -> u64 {
    match CONTROL.get_ptr_mut(index) {
        Some(p) => fetch_inc(p),
        None => 0,
    }
}

/// Emit `flags` for `[sector, sector + nr)` of disk `dev` (absolute sectors) on every
/// protected range it touches; `nr == 0` (a flush) goes to every range of the disk.
#[inline(always)]
pub(crate) fn emit_on_disk(
    disk: &DiskRanges,
    sector: u64,
    nr: u32,
    flags: u32,
    error: i32,
    now: u64,
) {
    let end = sector.saturating_add(nr as u64);
    let count = disk.count as usize;
    for i in 0..MAX_RANGES_PER_DISK {
        if i >= count {
            break;
        }
        let r = &disk.ranges[i];
        if nr == 0 {
            emit(r, 0, 0, flags, error, now);
            continue;
        }
        if let Some((lo, hi)) = clip(r, sector, end) {
            emit(r, lo - r.start, (hi - lo) as u32, flags, error, now);
        }
    }
}

/// A change the probes cannot place (a passthrough write) on `disk`: every protected
/// range of it is read again whole (`overflow_all`), and the cause is counted.
#[inline(always)]
pub(crate) fn mark_every_range_changed(disk: &DiskRanges) {
    let count = disk.count as usize;
    for i in 0..MAX_RANGES_PER_DISK {
        if i >= count {
            break;
        }
        let Some(stats) = STATS.get_ptr_mut(disk.ranges[i].slot) else {
            continue;
        };
        // SAFETY: `stats` is a valid map value pointer; the field addresses are in bounds.
        unsafe {
            fetch_inc(&raw mut (*stats).passthrough_out);
            fetch_inc(&raw mut (*stats).overflow_all);
        }
    }
}

/// The part of `[start, end)` (absolute sectors) inside protected range `r`, if any.
#[inline(always)]
pub(crate) fn clip(r: &ProtectedRange, start: u64, end: u64) -> Option<(u64, u64)> {
    let lo = if start > r.start { start } else { r.start };
    let r_end = r.start.saturating_add(r.len);
    let hi = if end < r_end { end } else { r_end };
    if lo < hi { Some((lo, hi)) } else { None }
}

#[inline(always)]
pub(crate) fn emit(
    r: &ProtectedRange,
    sector: u64,
    sectors: u32,
    flags: u32,
    error: i32,
    now: u64,
) {
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
            if flags & op::LOST != 0 {
                bump(control::LOST_DROPPED);
            }
            if flags & op::CHANGES_DATA != 0 {
                mark_overflow(r, sector, sectors as u64, stats);
            }
        }
    }
}

#[inline(always)]
pub(crate) fn mark_overflow(r: &ProtectedRange, sector: u64, sectors: u64, stats: *mut SlotStats) {
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
