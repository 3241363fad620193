//! App-consistent points: hook scripts, and freezing the file systems mounted on the
//! protected devices (`FIFREEZE`/`FITHAW`) around a cut.
//!
//! Order: every hook with `pre-freeze`, freeze every file system, every hook with
//! `frozen`, the cut, thaw, every hook with `post-thaw`. A freeze is always undone: by the
//! guard's `Drop` on every path, and by a watchdog thread once the freeze timeout passes,
//! so an agent that hangs (or a cut that never comes) cannot leave applications blocked.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::RecvTimeoutError,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::device::{BlockDevice, DevId};

// `FIFREEZE` = `_IOWR('X', 119, int)` and `FITHAW` = `_IOWR('X', 120, int)`
// (include/uapi/linux/fs.h). The kernel ignores their argument, so they are called with the
// integer 0, as fsfreeze(8) does: `ioctl_write_int_bad!` passes an int by value under the
// request code built from the definition.
nix::ioctl_write_int_bad!(
    fifreeze,
    nix::request_code_readwrite!(b'X', 119, size_of::<libc::c_int>())
);
nix::ioctl_write_int_bad!(
    fithaw,
    nix::request_code_readwrite!(b'X', 120, size_of::<libc::c_int>())
);
const _: () =
    assert!(nix::request_code_readwrite!(b'X', 119, size_of::<libc::c_int>()) == 0xC004_5877);
const _: () =
    assert!(nix::request_code_readwrite!(b'X', 120, size_of::<libc::c_int>()) == 0xC004_5878);

/// Mount points of the file systems on `devices` (a mount on a partition of a protected
/// whole disk counts), from /proc/self/mountinfo.
pub fn mounts_on(devices: &[BlockDevice]) -> anyhow::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(parse_mountinfo(&info, |dev| {
        devices.iter().any(|d| {
            d.dev == dev || (d.dev == d.disk && parent_disk(dev).is_some_and(|p| p == d.disk))
        })
    }))
}

/// Mount points (field 5) whose device (field 3, `major:minor`) `wanted` accepts, each
/// once, in mountinfo order.
fn parse_mountinfo(info: &str, wanted: impl Fn(DevId) -> bool) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(devno), Some(mount)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let Some((major, minor)) = devno.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        // Octal escapes (\040 for a space) as the kernel writes them.
        let path = PathBuf::from(unescape(mount));
        if wanted(DevId { major, minor }) && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The whole disk of partition `dev`, from sysfs.
fn parent_disk(dev: DevId) -> Option<DevId> {
    let sys = PathBuf::from(format!("/sys/dev/block/{dev}"));
    if !sys.join("partition").exists() {
        return None;
    }
    let text = std::fs::read_to_string(sys.join("..").join("dev")).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some(DevId {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// Run every executable in `dir` (sorted by name) with `phase` as its argument, each
/// bounded by `timeout`. Fails on the first hook that fails or times out.
pub fn run_hooks(dir: &Path, phase: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut hooks: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_executable(p))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading hooks in {}", dir.display())),
    };
    hooks.sort();
    for hook in hooks {
        let mut child = Command::new(&hook)
            .arg(phase)
            .spawn()
            .with_context(|| format!("running hook {}", hook.display()))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "hook {} {phase} took longer than {timeout:?}",
                    hook.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            bail!("hook {} {phase} failed ({status})", hook.display());
        }
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// File systems frozen until this is dropped (or the watchdog fires).
pub struct Frozen {
    files: Arc<Vec<(PathBuf, File)>>,
    disarmed: Arc<AtomicBool>,
    /// Dropping it wakes the watchdog, which then exits.
    _wake: std::sync::mpsc::Sender<()>,
}

impl Frozen {
    /// Freeze every mount in `mounts`; on a failure, thaw those already frozen and fail.
    /// The watchdog thaws them all after `timeout` whatever happens to the caller.
    pub fn freeze(mounts: &[PathBuf], timeout: Duration) -> anyhow::Result<Frozen> {
        let mut files = Vec::new();
        for m in mounts {
            let f = File::open(m).with_context(|| format!("opening {}", m.display()))?;
            // SAFETY: FIFREEZE reads no argument memory; the fd is a valid open file.
            if let Err(errno) = unsafe { fifreeze(f.as_raw_fd(), 0) } {
                thaw_all(&files);
                return Err(std::io::Error::from(errno))
                    .with_context(|| format!("FIFREEZE {}", m.display()));
            }
            files.push((m.clone(), f));
        }
        let files = Arc::new(files);
        let disarmed = Arc::new(AtomicBool::new(false));
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        {
            let (files, disarmed) = (Arc::clone(&files), Arc::clone(&disarmed));
            std::thread::spawn(move || {
                // Returns early when the guard is dropped (the sender goes away).
                if woken.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout)
                    && !disarmed.swap(true, Ordering::AcqRel)
                {
                    tracing::warn!("freeze timeout ({timeout:?}) passed: thawing");
                    thaw_all(&files);
                }
            });
        }
        Ok(Frozen {
            files,
            disarmed,
            _wake: wake,
        })
    }

    /// Whether the watchdog already thawed (the freeze took too long).
    pub fn expired(&self) -> bool {
        self.disarmed.load(Ordering::Acquire)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.disarmed.swap(true, Ordering::AcqRel) {
            thaw_all(&self.files);
        }
    }
}

fn thaw_all(files: &[(PathBuf, File)]) {
    for (m, f) in files {
        // SAFETY: as in `freeze`.
        if let Err(errno) = unsafe { fithaw(f.as_raw_fd(), 0) } {
            tracing::error!(
                "FITHAW {}: {} (thaw it with `fsfreeze -u`)",
                m.display(),
                std::io::Error::from(errno)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_select_by_device() {
        let info = "22 1 7:0 / /mnt/a\\040b rw,relatime shared:1 - ext4 /dev/loop0 rw\n\
                    23 1 7:1 / /mnt/other rw - xfs /dev/loop1 rw\n\
                    24 1 7:0 /sub /mnt/bind rw - ext4 /dev/loop0 rw\n\
                    garbage\n";
        let got = parse_mountinfo(info, |d| d == DevId { major: 7, minor: 0 });
        assert_eq!(
            got,
            vec![PathBuf::from("/mnt/a b"), PathBuf::from("/mnt/bind")]
        );
    }

    #[test]
    fn hooks_run_in_order_and_failures_are_named() {
        let dir = std::env::temp_dir().join(format!("ripcord-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let write = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        write("10-a", &format!("echo a $1 >> {}", log.display()));
        write("20-b", &format!("echo b $1 >> {}", log.display()));
        std::fs::write(dir.join("README"), "not executable").unwrap();
        run_hooks(&dir, "pre-freeze", Duration::from_secs(5)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "a pre-freeze\nb pre-freeze\n"
        );
        write("30-fail", "exit 3");
        let e = run_hooks(&dir, "frozen", Duration::from_secs(5)).unwrap_err();
        assert!(format!("{e:#}").contains("30-fail frozen failed"), "{e:#}");
        write("30-fail", "sleep 5");
        let e = run_hooks(&dir, "post-thaw", Duration::from_millis(200)).unwrap_err();
        assert!(format!("{e:#}").contains("longer than"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(run_hooks(&dir, "pre-freeze", Duration::from_secs(1)).is_ok());
    }
}
