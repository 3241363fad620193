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

/// Environment variable that shifts this agent's wall clock by a signed number of
/// nanoseconds: tests use it to simulate a host whose clock is off (two agents on one
/// machine otherwise share a clock). Logged loudly at start when set.
pub const SKEW_ENV: &str = "RIPCORD_TEST_CLOCK_SKEW_NS";

/// The simulated skew of [`SKEW_ENV`] (0 when unset; a value that does not parse is an
/// error at start, see [`check_skew`]).
fn skew_ns() -> i64 {
    static SKEW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var(SKEW_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// Refuses a [`SKEW_ENV`] that does not parse, and warns when one is set.
pub fn check_skew() -> anyhow::Result<()> {
    if let Ok(v) = std::env::var(SKEW_ENV) {
        let skew: i64 = v.trim().parse().map_err(|_| {
            anyhow::anyhow!("{SKEW_ENV}={v:?} is not a signed number of nanoseconds")
        })?;
        tracing::warn!(
            skew_ns = skew,
            "{SKEW_ENV} is set: this agent's wall clock is shifted on purpose (a test)"
        );
    }
    Ok(())
}

/// Unix time in ns (0 if the clock is before 1970), shifted by [`SKEW_ENV`] if set.
pub fn now_wall_ns() -> u64 {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    ns.saturating_add_signed(skew_ns())
}
