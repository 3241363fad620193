//! Clocks in nanoseconds: CLOCK_MONOTONIC (the clock of the BPF programs'
//! `bpf_ktime_get_ns`, so agent instants and event times compare directly) and the wall
//! clock (recovery points' times).

/// CLOCK_MONOTONIC in ns.
pub fn now_mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusive `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Unix time in ns (0 if the clock is before 1970).
pub fn now_wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
