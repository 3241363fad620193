//! What `ripcord failover` may overwrite: the checks made before a single byte is read
//! from the store, so a mistyped `--output` never destroys a disk in use or an image.
//!
//! # The rule
//! A **block device** is refused when any of these holds, naming every reason found:
//! - it, or one of its partitions, is **mounted** (`/proc/self/mountinfo`, matched by
//!   major:minor);
//! - it, or one of its partitions, has **holders** (`/sys/dev/block/MAJ:MIN/holders/`:
//!   device mapper, LVM, RAID, bcache built on it);
//! - it, a partition of it, or the disk it is a partition of, is **protected by a running
//!   agent**: the agent holds `flock(LOCK_EX)` on `/run/ripcord/lock/MAJ:MIN.lock` while it
//!   protects a device, so a non-blocking `flock(LOCK_SH)` on an existing lock file that
//!   fails with `EWOULDBLOCK` means protected (a stale file with no holder does not);
//! - it is **open exclusively by someone else**: it is opened with `O_EXCL`, which for a
//!   block device fails with `EBUSY` while it is mounted or held. The exclusive open is
//!   kept for the whole failover, so nobody can mount it meanwhile. When that is the only
//!   reason, the open is retried for the caller's `busy_grace`: a writer killed with
//!   `kill -9` keeps its exclusive claim until the kernel has torn down its io_uring
//!   rings, which finish their in-flight writes after the process is reaped.
//!
//! An **image file** that already exists is refused (and left untouched); the image is
//! written under `<output>.partial` (mode 0600, created new) and moved into place only if
//! `<output>` still does not exist. Anything else that exists (a directory, a character
//! device) is always refused.
//!
//! `--force` overrides every one of these — including a mounted device, whose file
//! system is then destroyed under its users: it is for an operator who has checked what
//! is on the device. Each overridden reason is still printed as a warning.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where a running agent keeps one lock file per protected device, `MAJ:MIN.lock`.
pub const AGENT_LOCK_DIR: &str = ripcord_crashsafe::DEVICE_LOCK_DIR;

/// A checked failover output.
#[derive(Debug)]
pub enum Destination {
    /// A block device, open for writing (exclusively unless `--force` overrode a refusal).
    Device { path: PathBuf, file: File },
    /// A new image file; `replace`: an existing file may be replaced (`--force`).
    Image { path: PathBuf, replace: bool },
}

/// A block device number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevNum {
    pub major: u64,
    pub minor: u64,
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DevNum {
    fn parse(s: &str) -> Option<DevNum> {
        let (ma, mi) = s.trim().split_once(':')?;
        Some(DevNum {
            major: ma.parse().ok()?,
            minor: mi.parse().ok()?,
        })
    }

    fn sys(&self) -> PathBuf {
        PathBuf::from(format!("/sys/dev/block/{self}"))
    }
}

/// Checks `path` against the rule of the module doc (agent locks under `lock_dir`); a
/// device busy for no other reason is retried for `busy_grace`.
pub fn check_output(
    path: &Path,
    force: bool,
    lock_dir: &Path,
    busy_grace: Duration,
) -> anyhow::Result<Destination> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Destination::Image {
                path: path.to_owned(),
                replace: false,
            });
        }
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let dev = DevNum {
            major: nix::sys::stat::major(rdev),
            minor: nix::sys::stat::minor(rdev),
        };
        return check_device(path, dev, force, lock_dir, busy_grace);
    }
    if !meta.is_file() {
        bail!(
            "{} is neither an image file nor a block device; give a new file name or a \
             block device",
            path.display()
        );
    }
    if !force {
        bail!(
            "{} already exists; refusing to overwrite it (give a new name, or --force to \
             replace it)",
            path.display()
        );
    }
    eprintln!(
        "warning: --force: replacing the existing {}",
        path.display()
    );
    Ok(Destination::Image {
        path: path.to_owned(),
        replace: true,
    })
}

fn check_device(
    path: &Path,
    dev: DevNum,
    force: bool,
    lock_dir: &Path,
    busy_grace: Duration,
) -> anyhow::Result<Destination> {
    let shown = path.display();
    let parts = partitions(dev);
    let mut family = vec![dev];
    family.extend(parts.iter().copied());
    let mut reasons = Vec::new();
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for (d, on) in mounts(&mountinfo, &family) {
        reasons.push(if d == dev {
            format!("{shown} is mounted on {on}")
        } else {
            format!("its partition {d} is mounted on {on}")
        });
    }
    for d in &family {
        let held: Vec<String> = std::fs::read_dir(d.sys().join("holders"))
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !held.is_empty() {
            reasons.push(format!(
                "{} is held by {} (device mapper, LVM, RAID or similar is built on it)",
                if *d == dev {
                    shown.to_string()
                } else {
                    format!("its partition {d}")
                },
                held.join(", ")
            ));
        }
    }
    let mut lockable = family.clone();
    lockable.extend(parent(dev));
    for d in lockable {
        if agent_protects(lock_dir, d)? {
            reasons.push(format!(
                "device {d} is protected by a running ripcord agent (it holds {}); stop \
                 protecting it first",
                lock_file(lock_dir, d).display()
            ));
        }
    }
    let deadline = Instant::now() + busy_grace;
    let mut exclusive = open_exclusive(path);
    if reasons.is_empty() && is_busy(&exclusive) && !busy_grace.is_zero() {
        eprintln!(
            "{shown} is open exclusively elsewhere; waiting up to {} s for it to be \
             released (a writer killed moments ago holds it until its in-flight writes end)",
            busy_grace.as_secs()
        );
        while is_busy(&exclusive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            exclusive = open_exclusive(path);
        }
    }
    let file = match exclusive {
        Ok(file) if reasons.is_empty() => Some(file),
        Ok(_) => None,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            if reasons.is_empty() {
                reasons.push(format!(
                    "{shown} is in use (open exclusively by a file system, a device mapper, \
                     or another failover)"
                ));
            }
            None
        }
        Err(e) => return Err(e).with_context(|| format!("opening {shown} for writing")),
    };
    if let Some(file) = file {
        return device(path, file);
    }
    if !force {
        bail!(
            "refusing to overwrite {shown}: {}. Everything on it would be lost; check the \
             device, or pass --force to write anyway",
            reasons.join("; ")
        );
    }
    for r in &reasons {
        eprintln!("warning: --force: writing anyway although {r}");
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {shown} for writing"))?;
    device(path, file)
}

fn device(path: &Path, file: File) -> anyhow::Result<Destination> {
    Ok(Destination::Device {
        path: path.to_owned(),
        file,
    })
}

/// The mounts (device, mount point) in `mountinfo` of any device of `devs`.
fn mounts(mountinfo: &str, devs: &[DevNum]) -> Vec<(DevNum, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let d = DevNum::parse(f.nth(2)?)?;
            let on = f.nth(1)?.replace("\\040", " ");
            devs.contains(&d).then_some((d, on))
        })
        .collect()
}

/// The partitions of `dev` (sysfs subdirectories with a `partition` file).
fn partitions(dev: DevNum) -> Vec<DevNum> {
    let Ok(entries) = std::fs::read_dir(dev.sys()) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("partition").exists())
        .filter_map(|p| DevNum::parse(&std::fs::read_to_string(p.join("dev")).ok()?))
        .collect()
}

/// The whole disk `dev` is a partition of.
fn parent(dev: DevNum) -> Option<DevNum> {
    let sys = dev.sys();
    if !sys.join("partition").exists() {
        return None;
    }
    let whole = std::fs::canonicalize(&sys).ok()?.parent()?.join("dev");
    DevNum::parse(&std::fs::read_to_string(whole).ok()?)
}

fn open_exclusive(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
}

fn is_busy(open: &std::io::Result<File>) -> bool {
    matches!(open, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

/// The lock file a running agent holds while it protects `dev`.
pub fn lock_file(lock_dir: &Path, dev: DevNum) -> PathBuf {
    lock_dir.join(format!("{dev}.lock"))
}

/// Whether a running agent protects `dev`: its lock file exists and a shared lock on it
/// is refused (see the module doc).
pub fn agent_protects(lock_dir: &Path, dev: DevNum) -> anyhow::Result<bool> {
    use nix::fcntl::{Flock, FlockArg};
    let path = lock_file(lock_dir, dev);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_unlocked_on_drop) => Ok(false),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(e).with_context(|| format!("flock of {}", path.display())),
    }
}

/// Creates `path` new, mode 0600 (an image holds a disk's data); `force` first removes a
/// leftover from an interrupted run.
pub fn create_private(path: &Path, force: bool) -> anyhow::Result<File> {
    if force {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} exists: another failover into it is running, or one was interrupted \
                     (remove it, or pass --force)",
                    path.display()
                )
            } else {
                format!("creating {}", path.display())
            }
        })
}

/// Moves the finished image `tmp` to `path` durably; unless `replace`, refuses (keeping
/// `tmp`) if `path` appeared in the meantime.
pub fn publish(tmp: &Path, path: &Path, replace: bool) -> anyhow::Result<()> {
    if replace {
        ripcord_crashsafe::rename_durable(tmp, path)
    } else {
        ripcord_crashsafe::rename_durable_new(tmp, path)
    }
    .with_context(|| {
        format!(
            "moving the finished image {} to {}",
            tmp.display(),
            path.display()
        )
    })
}

/// `<path>.partial`: where the image of `path` is written first.
pub fn partial(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_matched_by_device_number_and_gives_the_mount_point() {
        let info = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 7:3 / /srv rw - ext4 /dev/loop3 rw\n\
                    38 35 259:1 / /data rw - xfs /dev/loop3p1 rw\n";
        let loop3 = DevNum { major: 7, minor: 3 };
        let p1 = DevNum {
            major: 259,
            minor: 1,
        };
        assert_eq!(mounts(info, &[loop3]), vec![(loop3, "/srv".to_owned())]);
        assert_eq!(mounts(info, &[p1]), vec![(p1, "/data".to_owned())]);
        assert_eq!(
            mounts(
                info,
                &[DevNum {
                    major: 98,
                    minor: 0
                }]
            )[0]
            .1,
            "/mnt/a b"
        );
        assert!(mounts(info, &[DevNum { major: 7, minor: 4 }]).is_empty());
    }

    #[test]
    fn a_device_is_protected_only_while_an_agent_holds_its_lock() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = DevNum {
            major: 7,
            minor: 42,
        };
        assert!(!agent_protects(dir.path(), dev).expect("no lock file"));
        let path = lock_file(dir.path(), dev);
        let file = File::create(&path).expect("lock file");
        assert!(!agent_protects(dir.path(), dev).expect("a stale lock file"));
        // Another open file description, as the agent's would be.
        let held = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .expect("taking the agent's lock");
        assert!(agent_protects(dir.path(), dev).expect("a held lock"));
        drop(held);
        assert!(!agent_protects(dir.path(), dev).expect("a released lock"));
    }

    #[test]
    fn an_existing_image_is_refused_without_force_and_replaced_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock_dir = dir.path().join("locks");
        let img = dir.path().join("disk.img");
        match check_output(&img, false, &lock_dir, Duration::ZERO).expect("a new file") {
            Destination::Image { replace, .. } => assert!(!replace),
            d => panic!("{d:?}"),
        }
        std::fs::write(&img, b"precious").expect("writing");
        let e = check_output(&img, false, &lock_dir, Duration::ZERO).expect_err("an existing file");
        assert!(e.to_string().contains("already exists"), "{e}");
        match check_output(&img, true, &lock_dir, Duration::ZERO).expect("--force") {
            Destination::Image { replace, .. } => assert!(replace),
            d => panic!("{d:?}"),
        }
        let e = check_output(dir.path(), true, &lock_dir, Duration::ZERO).expect_err("a directory");
        assert!(e.to_string().contains("neither"), "{e}");
    }
}
