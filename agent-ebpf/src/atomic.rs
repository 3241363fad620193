//! Atomic operations on map values shared between CPUs (and with the agent through mmap).
//!
//! core's atomic types have no read-modify-write operations on the BPF target; the
//! intrinsics lower to BPF atomic instructions (kernel >= 5.12 for the fetch variants).
//! Host builds (type-checking only) use core's atomics for the same operations.

/// Atomic `*ptr += 1`, returning the old value. SeqCst: LLVM's BPF backend lowers a
/// relaxed fetch-and-add whose result is used to the plain (non-fetching) instruction.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub(crate) fn fetch_inc(ptr: *mut u64) -> u64 {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: `ptr` points into a map value, valid for the program's run and 8-aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(ptr, 1) }
}

/// Atomic `*ptr |= bits`.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub(crate) fn fetch_or(ptr: *mut u64, bits: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_or};
    // SAFETY: as in `fetch_inc`.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, bits) };
}

/// Atomic compare-and-swap of `*ptr` from `old` to `new`; returns the previous value (the
/// swap happened if it equals `old`).
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub(crate) fn cas(ptr: *mut u64, old: u64, new: u64) -> u64 {
    use core::intrinsics::{AtomicOrdering, atomic_cxchg};
    // SAFETY: as in `fetch_inc`.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(ptr, old, new)
    }
    .0
}

#[cfg(not(target_arch = "bpf"))]
pub(crate) fn cas(ptr: *mut u64, old: u64, new: u64) -> u64 {
    // SAFETY: as above.
    match unsafe { core::sync::atomic::AtomicU64::from_ptr(ptr) }.compare_exchange(
        old,
        new,
        core::sync::atomic::Ordering::SeqCst,
        core::sync::atomic::Ordering::SeqCst,
    ) {
        Ok(v) | Err(v) => v,
    }
}

/// A volatile load of `*ptr` (a slot another CPU may change).
#[inline(always)]
pub(crate) fn load(ptr: *const u64) -> u64 {
    // SAFETY: `ptr` points into a map value, valid for the program's run.
    unsafe { core::ptr::read_volatile(ptr) }
}

#[cfg(not(target_arch = "bpf"))]
pub(crate) fn fetch_inc(ptr: *mut u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(ptr) }
        .fetch_add(1, core::sync::atomic::Ordering::SeqCst)
}

#[cfg(not(target_arch = "bpf"))]
pub(crate) fn fetch_or(ptr: *mut u64, bits: u64) {
    // SAFETY: as above.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(ptr) }
        .fetch_or(bits, core::sync::atomic::Ordering::Relaxed);
}
