//! App-consistent points: hook scripts, and freezing the file systems mounted on the
//! protected devices (`FIFREEZE`/`FITHAW`) around a cut.
//!
//! Order: every hook with `pre-freeze`, freeze every file system, every hook with
//! `frozen`, the cut, thaw, every hook with `post-thaw`. A freeze is always undone: by the
//! guard's `Drop` on every path, and by a watchdog thread once the freeze timeout passes,
//! so an agent that hangs (or a cut that never comes) cannot leave applications blocked.
//!
//! # Hooks, and when a point is application-consistent
//! A hook is a file in the hooks directory whose name is made of letters, digits, `_` and
//! `-` (as run-parts(8): `README.md`, `x.dpkg-old` or `.swp` files are not hooks). Each runs
//! in its own process group, with its output logged line by line prefixed with its name;
//! one that outlives the freeze timeout is killed with its whole process group.
//!
//! Besides its phase (its only argument), a hook is told which point it serves in its
//! environment: `RIPCORD_POINT` is `app` (the machine's own application-consistent
//! point) or `group-app` (an application-consistent group point, decision 0028), and for
//! the latter `RIPCORD_GROUP` (the group's id, 32 hex digits) and
//! `RIPCORD_GROUP_INSTANT_NS` (the coordinator's instant, ns since the Unix epoch, as
//! `ripcord group points` lists it).
//!
//! A point is reported as application-consistent only if every hook ran and succeeded in
//! every phase and every file system was frozen. A hook that is not executable (or any
//! hook that fails or times out) therefore fails the attempt with a warning naming it:
//! no application-consistent point is reported, and crash-consistent points go on as
//! always. A missing hooks directory means no hooks are configured: the agent warns, and
//! the point (file systems frozen, no application asked to quiesce) is taken; its log line
//! says that no hook ran and which file systems were frozen.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
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

/// The hooks in `dir`, sorted by name: `None` when the directory does not exist (no hooks
/// configured). Fails, naming it, on a hook that is not an executable file.
pub fn hooks_in(dir: &Path) -> anyhow::Result<Option<Vec<PathBuf>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading hooks in {}", dir.display())),
    };
    let mut hooks = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading hooks in {}", dir.display()))?
            .path();
        let is_hook_name = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if !is_hook_name {
            tracing::debug!(
                "{} is not a hook (its name has other characters than letters, digits, _ and -)",
                path.display()
            );
            continue;
        }
        if !is_executable(&path) {
            bail!(
                "hook {} is not an executable file: it cannot run, so this point would not be \
                 application-consistent (chmod +x it, or move it out of {})",
                path.display(),
                dir.display()
            );
        }
        hooks.push(path);
    }
    hooks.sort();
    Ok(Some(hooks))
}

/// Run every hook in `hooks` with `phase` as its argument and `env` added to its
/// environment (see the module doc), each bounded by `timeout`. Fails on the first hook
/// that fails or times out (that one is killed with its process group).
pub fn run_hooks(
    hooks: &[PathBuf],
    phase: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<()> {
    for hook in hooks {
        run_hook(hook, phase, env, timeout)?;
    }
    Ok(())
}

fn run_hook(
    hook: &Path,
    phase: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let name = hook.file_name().map_or_else(
        || hook.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut child = Command::new(hook)
        .arg(phase)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills whatever it started too.
        .process_group(0)
        .spawn()
        .with_context(|| format!("running hook {}", hook.display()))?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let out = child
        .stdout
        .take()
        .map(|o| log_lines(&name, o, done_tx.clone()));
    let err = child.stderr.take().map(|e| log_lines(&name, e, done_tx));
    let readers = usize::from(out.is_some()) + usize::from(err.is_some());
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            if let Err(e) = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL) {
                tracing::warn!("killing hook {name}'s process group {pgid}: {e}");
            }
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Its last lines (bounded: a daemon it left behind may hold the pipes open).
    let flush_by = Instant::now() + Duration::from_secs(1);
    for _ in 0..readers {
        if done_rx
            .recv_timeout(flush_by.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    match status {
        None => bail!(
            "hook {} {phase} took longer than {timeout:?}: killed it and its process group",
            hook.display()
        ),
        Some(s) if !s.success() => bail!("hook {} {phase} failed ({s})", hook.display()),
        Some(_) => {
            tracing::info!("hook {name} {phase}: ok");
            Ok(())
        }
    }
}

/// Log every line read from `pipe` as `[hook NAME] line`; signal `done` at its end.
fn log_lines(
    name: &str,
    pipe: impl std::io::Read + Send + 'static,
    done: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    use std::io::BufRead as _;
    let name = name.to_owned();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            match line {
                Ok(line) => tracing::info!("[hook {name}] {line}"),
                Err(_) => break,
            }
        }
        let _ = done.send(());
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The file in the agent's state directory listing the mounts it holds frozen, one path
/// per line, written before the first FIFREEZE and removed after the thaw: what an agent
/// killed while frozen leaves for its successor ([`thaw_left_frozen`]).
pub const FROZEN_MARKER: &str = "frozen-mounts";

/// Thaws the file systems a killed agent left frozen (its watchdog died with it), as its
/// marker in `state_dir` lists them, with a warning naming each; then removes the marker.
/// A freeze someone else made (a backup tool's) is not in the marker and is left alone.
/// FITHAW of a file system that is not frozen fails (EINVAL) and changes nothing.
pub fn thaw_left_frozen(state_dir: &Path) {
    let marker = state_dir.join(FROZEN_MARKER);
    let Ok(listed) = std::fs::read_to_string(&marker) else {
        return;
    };
    for m in listed.lines().filter(|l| !l.is_empty()).map(Path::new) {
        let Ok(f) = File::open(m) else { continue };
        // SAFETY: as in `Frozen::freeze`.
        if unsafe { fithaw(f.as_raw_fd(), 0) }.is_ok() {
            tracing::warn!(
                mount = %m.display(),
                "{} was left frozen by an agent stopped during an application-consistent \
                 point: thawed",
                m.display()
            );
        }
    }
    if let Err(e) = std::fs::remove_file(&marker) {
        tracing::warn!("removing {}: {e}", marker.display());
    }
}

/// File systems frozen until this is dropped (or the watchdog fires).
pub struct Frozen {
    files: Arc<Vec<(PathBuf, File)>>,
    /// The marker listing them ([`FROZEN_MARKER`]), removed once they are thawed.
    marker: Arc<PathBuf>,
    disarmed: Arc<AtomicBool>,
    /// The watchdog cannot thaw before this (its timer starts after it).
    held_until: Instant,
    /// Dropping it wakes the watchdog, which then exits.
    _wake: std::sync::mpsc::Sender<()>,
}

impl Frozen {
    /// Freeze every mount in `mounts`, listed first in the marker file `marker` (see
    /// [`FROZEN_MARKER`]); on a failure, thaw those already frozen and fail. The watchdog
    /// thaws them all after `timeout` whatever happens to the caller.
    pub fn freeze(mounts: &[PathBuf], timeout: Duration, marker: &Path) -> anyhow::Result<Frozen> {
        let listed: String = mounts
            .iter()
            .map(|m| format!("{}\n", m.display()))
            .collect();
        std::fs::write(marker, listed).with_context(|| format!("writing {}", marker.display()))?;
        let marker = Arc::new(marker.to_owned());
        let mut files = Vec::new();
        for m in mounts {
            let f = match File::open(m) {
                Ok(f) => f,
                Err(e) => {
                    thaw_all(&files, &marker);
                    return Err(e).with_context(|| format!("opening {}", m.display()));
                }
            };
            // SAFETY: FIFREEZE reads no argument memory; the fd is a valid open file.
            if let Err(errno) = unsafe { fifreeze(f.as_raw_fd(), 0) } {
                thaw_all(&files, &marker);
                return Err(std::io::Error::from(errno))
                    .with_context(|| format!("FIFREEZE {}", m.display()));
            }
            files.push((m.clone(), f));
        }
        let files = Arc::new(files);
        let disarmed = Arc::new(AtomicBool::new(false));
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let held_until = Instant::now() + timeout;
        {
            let (files, disarmed, marker) = (
                Arc::clone(&files),
                Arc::clone(&disarmed),
                Arc::clone(&marker),
            );
            std::thread::spawn(move || {
                // Returns early when the guard is dropped (the sender goes away).
                if woken.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout)
                    && !disarmed.swap(true, Ordering::AcqRel)
                {
                    tracing::warn!("freeze timeout ({timeout:?}) passed: thawing");
                    thaw_all(&files, &marker);
                }
            });
        }
        Ok(Frozen {
            files,
            marker,
            disarmed,
            held_until,
            _wake: wake,
        })
    }

    /// Before this instant the file systems are certainly still frozen: the watchdog's
    /// timer starts after it is taken, and nothing else thaws while the guard lives. A cut
    /// whose snapshot is taken before it is a state of the frozen file systems.
    pub fn held_until(&self) -> Instant {
        self.held_until
    }

    /// Whether the watchdog already thawed (the freeze took too long).
    pub fn expired(&self) -> bool {
        self.disarmed.load(Ordering::Acquire)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.disarmed.swap(true, Ordering::AcqRel) {
            thaw_all(&self.files, &self.marker);
        }
    }
}

/// Thaws `files`, then removes the marker that lists them.
fn thaw_all(files: &[(PathBuf, File)], marker: &Path) {
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
    if let Err(e) = std::fs::remove_file(marker)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", marker.display());
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

    fn hook_dir(name: &str) -> (PathBuf, impl Fn(&str, &str)) {
        let dir = std::env::temp_dir().join(format!("ripcord-hooks-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.clone();
        let write = move |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            let p = d.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        (dir, write)
    }

    #[test]
    fn hooks_run_in_order_and_failures_are_named() {
        let (dir, write) = hook_dir("order");
        let log = dir.join("log.txt");
        write("10-a", &format!("echo a $1 >> {}", log.display()));
        write("20-b", &format!("echo b $1 >> {}", log.display()));
        std::fs::write(dir.join("README.md"), "not a hook").unwrap();
        let hooks = hooks_in(&dir).unwrap().unwrap();
        run_hooks(&hooks, "pre-freeze", &[], Duration::from_secs(5)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "a pre-freeze\nb pre-freeze\n"
        );
        write("30-fail", "exit 3");
        let hooks = hooks_in(&dir).unwrap().unwrap();
        let e = run_hooks(&hooks, "frozen", &[], Duration::from_secs(5)).unwrap_err();
        assert!(format!("{e:#}").contains("30-fail frozen failed"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            hooks_in(&dir).unwrap().is_none(),
            "a missing directory has no hooks"
        );
    }

    #[test]
    fn a_hook_that_is_not_executable_is_named_not_skipped() {
        let (dir, write) = hook_dir("noexec");
        write("10-a", "true");
        std::fs::write(dir.join("20-db-flush"), "#!/bin/sh\ntrue\n").unwrap();
        let e = hooks_in(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            format!("{e:#}").contains("20-db-flush is not an executable file"),
            "{e:#}"
        );
    }

    #[test]
    fn a_timed_out_hook_is_killed_with_its_process_group() {
        let (dir, write) = hook_dir("timeout");
        let pid_file = dir.join("pid");
        write(
            "10-slow",
            &format!("sleep 300 &\necho $! > {}\nwait", pid_file.display()),
        );
        let hooks = hooks_in(&dir).unwrap().unwrap();
        let started = Instant::now();
        let e = run_hooks(&hooks, "frozen", &[], Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("longer than"), "{e:#}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Gone, or a zombie waiting for a reaper: not running.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if matches!(state, None | Some("Z" | "X")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hook's background child {pid} still runs: {stat}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
