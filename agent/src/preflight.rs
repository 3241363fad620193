//! Start-up checks that say exactly what is missing and how to fix it, before the BPF
//! loader fails with an errno.

/// One unmet requirement, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (fix: {})", self.what, self.fix)
    }
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Parse `CapEff:` from /proc/self/status.
fn effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

fn has_caps(caps: u64) -> bool {
    let has = |c: u32| caps & (1 << c) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Parse "major.minor" from a kernel release string like "6.18.0-12-amd64".
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Oldest kernel with everything the programs use: BPF ring buffer (5.8), atomic
/// fetch-and-add/or instructions (5.12), mmap-able arrays (5.5).
pub const MIN_KERNEL: (u32, u32) = (5, 12);

/// Check everything capture needs. An empty list means go.
pub fn check() -> Vec<Problem> {
    let mut problems = Vec::new();
    match std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(effective_caps)
    {
        Some(caps) if has_caps(caps) => {}
        _ => problems.push(Problem {
            what: "missing privileges: loading BPF programs needs CAP_BPF and CAP_PERFMON \
                   (or CAP_SYS_ADMIN)"
                .into(),
            fix: "run ripcord-agent as root".into(),
        }),
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        _ => problems.push(Problem {
            what: format!(
                "kernel {:?} is too old: ripcord needs Linux {}.{} or newer (BPF ring buffer, \
                 atomic instructions)",
                release.trim(),
                MIN_KERNEL.0,
                MIN_KERNEL.1
            ),
            fix: "upgrade the kernel".into(),
        }),
    }
    // The probes are raw tracepoints on the block layer; what they read of its structures
    // is located through the kernel's BTF.
    match crate::btf::Btf::kernel().and_then(|b| crate::btf::block_layout(&b)) {
        Ok(_) => {}
        Err(e) => problems.push(Problem {
            what: format!("{e:#}"),
            fix: "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's \
                  kernel is)"
                .into(),
        }),
    }
    problems
}

/// Run [`check`] and fail with every problem and its fix; raise RLIMIT_MEMLOCK on success.
pub fn require() -> anyhow::Result<()> {
    let problems = check();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
        anyhow::bail!("cannot capture on this machine:\n{}", list.join("\n"));
    }
    raise_memlock();
    Ok(())
}

/// Raise RLIMIT_MEMLOCK for kernels that still charge BPF maps to it (before 5.11).
pub fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let caps = effective_caps(status).unwrap();
        assert!(has_caps(caps));
        assert!(!has_caps(0));
        assert!(has_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!has_caps(1 << CAP_BPF));
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
    }

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(kernel_version("6.18.0-12-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
    }
}
