//! The `INFLIGHT` table: queued data bios whose completion has not been seen, addressed
//! by the bio's address (protocol in `agent_common::InflightBio`). Every transition of a
//! slot's key is a compare-and-swap, so the probes on all CPUs and the agent's reader never
//! see a half-written entry as published.

use agent_common::{INFLIGHT_CLAIMING, INFLIGHT_PROBES, InflightBio, inflight_slot};

use crate::{
    INFLIGHT,
    atomic::{cas, load},
};

/// Free the in-flight slot of `bio`, if it has one; returns the entry it held.
#[inline(always)]
pub(crate) fn inflight_take(bio: u64) -> Option<InflightBio> {
    for p in 0..INFLIGHT_PROBES {
        let Some(e) = INFLIGHT.get_ptr_mut(inflight_slot(bio, p)) else {
            continue;
        };
        // SAFETY: `e` is a valid map value pointer; the field address is in bounds.
        let key = unsafe { &raw mut (*e).bio };
        if load(key) != bio {
            continue;
        }
        // SAFETY: as above; a copy (fields may be rewritten once the slot is freed).
        let entry = unsafe { core::ptr::read_volatile(e) };
        if cas(key, bio, 0) == bio {
            return Some(entry);
        }
    }
    None
}

/// What [`inflight_take_exact`] found.
pub(crate) enum Exact {
    /// No entry for the bio.
    Absent,
    /// Its entry was exactly `[sector, end)`, and is freed.
    Taken,
    /// Its entry is another range (a split bio's whole range, or a stale entry of an
    /// earlier bio at this address): left in place.
    Other,
}

/// Free `bio`'s entry if it is exactly `[sector, end)` of disk sectors.
#[inline(always)]
pub(crate) fn inflight_take_exact(bio: u64, sector: u64, end: u64) -> Exact {
    for p in 0..INFLIGHT_PROBES {
        let Some(e) = INFLIGHT.get_ptr_mut(inflight_slot(bio, p)) else {
            continue;
        };
        // SAFETY: `e` is a valid map value pointer; the field addresses are in bounds.
        let key = unsafe { &raw mut (*e).bio };
        if load(key) != bio {
            continue;
        }
        // SAFETY: as above.
        let (start, sectors) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*e).sector),
                core::ptr::read_volatile(&raw const (*e).sectors),
            )
        };
        if start != sector || start.saturating_add(u64::from(sectors)) != end {
            return Exact::Other;
        }
        if cas(key, bio, 0) == bio {
            return Exact::Taken;
        }
    }
    Exact::Absent
}

/// A copy of `bio`'s entry, left in place.
#[inline(always)]
pub(crate) fn inflight_peek(bio: u64) -> Option<InflightBio> {
    for p in 0..INFLIGHT_PROBES {
        let Some(e) = INFLIGHT.get_ptr_mut(inflight_slot(bio, p)) else {
            continue;
        };
        // SAFETY: `e` is a valid map value pointer; the field address is in bounds.
        let key = unsafe { &raw mut (*e).bio };
        if load(key) != bio {
            continue;
        }
        // SAFETY: as above; a copy.
        return Some(unsafe { core::ptr::read_volatile(e) });
    }
    None
}

/// Claim a free slot among `entry.bio`'s probes and publish `entry` in it; false if all
/// are taken.
#[inline(always)]
pub(crate) fn inflight_put(entry: InflightBio) -> bool {
    for p in 0..INFLIGHT_PROBES {
        let Some(e) = INFLIGHT.get_ptr_mut(inflight_slot(entry.bio, p)) else {
            continue;
        };
        // SAFETY: `e` is a valid map value pointer; the field addresses are in bounds.
        let key = unsafe { &raw mut (*e).bio };
        if load(key) != 0 || cas(key, 0, INFLIGHT_CLAIMING) != 0 {
            continue;
        }
        // SAFETY: the slot is ours until published; readers skip a claiming slot.
        unsafe {
            core::ptr::write_volatile(&raw mut (*e).queued_ns, entry.queued_ns);
            core::ptr::write_volatile(&raw mut (*e).sector, entry.sector);
            core::ptr::write_volatile(&raw mut (*e).dev, entry.dev);
            core::ptr::write_volatile(&raw mut (*e).sectors, entry.sectors);
            core::ptr::write_volatile(&raw mut (*e).op, entry.op);
        }
        // Publishing with a full barrier: the fields are visible before the key.
        cas(key, INFLIGHT_CLAIMING, entry.bio);
        return true;
    }
    false
}
