//! Crash-safe file replacement: the one home of ripcord's "temp file, fsync, rename,
//! fsync the directory" (as neon's `crashsafe.rs`).
//!
//! # What [`write_atomic`] guarantees
//! When it returns `Ok`, `path` holds exactly `contents` and will after a crash or power
//! loss: the data was fsynced before the rename, and the directory after it (a rename is
//! only durable once its directory is). At every instant before that, `path` holds its
//! old contents or does not exist; a reader never sees a partial file. On error, `path`
//! is unchanged as far as this call goes and the temporary file is removed.
//!
//! # What the caller must do
//! - Keep one writer per path (the temporary name is unique per process and call, so
//!   concurrent writers cannot corrupt each other, but the last rename wins).
//! - Create the directory first, and make *it* durable if it is new ([`sync_dir`] of its
//!   parent).
//! - Not rely on [`replace_atomic`] for durability: it skips both fsyncs, for files that
//!   are rewritten often and only read live (status files), where a crash may leave the
//!   previous version.
//!
//! # Read-modify-write across processes
//! [`lock_exclusive`] serialises updates of a file that several processes change (the
//! running process server and an operator's `ripcord-ps token` both add to the token
//! store): take the lock, read the file, change it, [`write_atomic`] it, drop the lock.
//! Readers need no lock: they see the old or the new file.
//!
//! [`try_lock_exclusive`] marks something as in use by a running process (a protected
//! device, an agent's state directory) and fails at once when it already is; others probe
//! it with [`is_locked`]. The kernel drops the lock when its holder dies.
//!
//! # Making a file written by someone else durable
//! [`sync_file`] and [`sync_dir`] are for files another library wrote (the target store's
//! local directory, written by `object_store`): the caller fsyncs the file, then every
//! directory from its parent up to a root it knows is durable, so the file's name and the
//! names of any directories created for it survive a power cut.
//!
//! # Writing back a range early
//! [`write_back_range`] is the one home of `sync_file_range`: starting the write-back of
//! what was just written (a restore's image, so the disk writes while the store is still
//! read), or writing back and waiting for a device's own dirty page cache (the agent,
//! before a round's instant). It never makes anything durable: only an fsync does.
//!
//! # State files that find their own damage
//! [`checked`]: JSON state files with a CRC32C member, refused when it does not match.
//!
//! The journal keeps its own segment creation (temporary name, preallocation, sync,
//! rename, directory sync) because every sync there goes through its I/O engine, which
//! tests replace to inject faults.

pub mod checked;

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

/// Mode of files holding secrets (keys, tokens).
pub const MODE_SECRET: u32 = 0o600;
/// Mode of everything else.
pub const MODE_PUBLIC: u32 = 0o644;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Durably replace `path` with `contents`, created with `mode` from the start (so a
/// secret is never readable by others, not even as a temporary file). See the module doc.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    replace(path, contents, mode, true)
}

/// Replace `path` with `contents` so that readers see the old or the new file, never a
/// mix; not durable (no fsync). For status files rewritten many times a second.
pub fn replace_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    replace(path, contents, MODE_PUBLIC, false)
}

/// [`replace_atomic`] with the file created with `mode` (a status file that only its
/// owner may read).
pub fn replace_atomic_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    replace(path, contents, mode, false)
}

/// Durably rename `from` to `to`: after `Ok`, a crash leaves `to` with `from`'s contents
/// (which the caller must have fsynced) and `from` gone. Fsyncs the directory of `to`,
/// and that of `from` when it differs.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_parents(from, to)
}

/// Like [`rename_durable`], but never replaces: fails with
/// [`io::ErrorKind::AlreadyExists`] (leaving `from` in place) if `to` exists. Done as a
/// hard link then an unlink of `from`, so the check and the move are one atomic step
/// (a crash in between leaves both names, never a replaced `to`).
pub fn rename_durable_new(from: &Path, to: &Path) -> io::Result<()> {
    fs::hard_link(from, to)?;
    fs::remove_file(from)?;
    sync_parents(from, to)
}

/// Makes a move from `from` to `to` durable: fsyncs the directory of `to`, and that of
/// `from` if it is another one (the old name's removal must be durable too).
fn sync_parents(from: &Path, to: &Path) -> io::Result<()> {
    let to_dir = parent(to);
    sync_dir(&to_dir)?;
    let from_dir = parent(from);
    if from_dir != to_dir {
        sync_dir(&from_dir)?;
    }
    Ok(())
}

/// Where a running `ripcord-agent` holds `flock(LOCK_EX)` on `<MAJ>:<MIN>.lock` for each
/// device it protects; other tools (`ripcord failover`) probe it with [`is_locked`]. One
/// definition for both sides.
pub const DEVICE_LOCK_DIR: &str = "/run/ripcord/lock";

/// An exclusive advisory lock (`flock`) on a lock file; released when dropped (or when
/// the process dies, so a killed holder never leaves it stuck).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Blocks until this process holds the exclusive lock on `path` (created, mode 0600, if
/// missing). Hold it around a read-modify-write of the file it protects.
pub fn lock_exclusive(path: &Path) -> io::Result<FileLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(MODE_SECRET)
        .open(path)?;
    file.lock()?;
    Ok(FileLock { _file: file })
}

impl FileLock {
    /// Replace the lock file's contents with `owner` (e.g. the holder's pid), for whoever
    /// finds the lock taken. Not durable: a lock file only means something while held.
    pub fn write_owner(&self, owner: &str) -> io::Result<()> {
        use std::io::{Seek as _, SeekFrom};
        let mut file = &self._file;
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(owner.as_bytes())
    }
}

/// Takes the exclusive lock on `path` (created, mode 0600, if missing) without waiting:
/// `Ok(None)` when another open file description holds it (`flock(LOCK_EX | LOCK_NB)`).
/// Hold the returned lock for as long as what it guards is in use.
pub fn try_lock_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(MODE_SECRET)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(FileLock { _file: file })),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Whether someone holds an exclusive lock on `path` (probed with
/// `flock(LOCK_SH | LOCK_NB)`, released at once). A missing file is not held.
pub fn is_locked(path: &Path) -> io::Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(fs::TryLockError::WouldBlock) => Ok(true),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Fsync a directory, making the creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How far [`write_back_range`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteBack {
    /// Start writing the dirty pages back, without waiting (it blocks only while the
    /// device's queue is full).
    Start,
    /// Wait for pages already being written back, write the rest, and wait for them.
    AndWait,
}

/// Writes back the page cache of `file` over `len` bytes at `offset`
/// (`sync_file_range(2)`), as `how` says. Data only, and not durable by itself: a later
/// `fsync` of the same file still makes it durable (and writes again whatever was dirtied
/// meanwhile). A `len` of 0 does nothing (the syscall would take it as "to the end").
pub fn write_back_range(
    file: &impl std::os::fd::AsRawFd,
    offset: u64,
    len: u64,
    how: WriteBack,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let flags = match how {
        WriteBack::Start => libc::SYNC_FILE_RANGE_WRITE,
        WriteBack::AndWait => {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        }
    };
    let (offset, len) = (
        libc::off64_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        libc::off64_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
    );
    // SAFETY: a plain syscall on a descriptor the caller keeps open; no memory is passed.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Fsync a regular file's data and metadata (`fsync(2)` on a read-only descriptor, which
/// Linux allows and which flushes every write made through any descriptor of the file).
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn replace(path: &Path, contents: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        if durable {
            sync_dir(&dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn lock_exclusive_serialises_read_modify_write_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let (lock, counter) = (dir.path().join("n.lock"), dir.path().join("n"));
        write_atomic(&counter, b"0", MODE_PUBLIC).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (lock, counter) = (lock.clone(), counter.clone());
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        // Each lock_exclusive opens its own file description, as another
                        // process would.
                        let _held = lock_exclusive(&lock).unwrap();
                        let n: u32 = fs::read_to_string(&counter).unwrap().parse().unwrap();
                        std::thread::yield_now();
                        write_atomic(&counter, (n + 1).to_string().as_bytes(), MODE_PUBLIC)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fs::read_to_string(&counter).unwrap(), "100");
    }

    #[test]
    fn rename_durable_new_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a.partial"), dir.path().join("a"));
        fs::write(&from, b"new").unwrap();
        fs::write(&to, b"old").unwrap();
        let e = rename_durable_new(&from, &to).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&to).unwrap(), b"old");
        assert_eq!(fs::read(&from).unwrap(), b"new");
        fs::remove_file(&to).unwrap();
        rename_durable_new(&from, &to).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"new");
        assert!(!from.exists());
    }

    #[test]
    fn try_lock_exclusive_refuses_a_second_holder_until_the_first_drops() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("7:3.lock");
        assert!(
            !is_locked(&lock).unwrap(),
            "a missing lock file is not held"
        );
        let held = try_lock_exclusive(&lock).unwrap().expect("free lock");
        held.write_owner("1234\n").unwrap();
        assert!(is_locked(&lock).unwrap());
        assert!(try_lock_exclusive(&lock).unwrap().is_none());
        assert_eq!(fs::read_to_string(&lock).unwrap(), "1234\n");
        let mode = fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, MODE_SECRET);
        drop(held);
        assert!(!is_locked(&lock).unwrap());
        let again = try_lock_exclusive(&lock).unwrap().expect("released lock");
        again.write_owner("99").unwrap();
        assert_eq!(fs::read_to_string(&lock).unwrap(), "99");
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old", MODE_PUBLIC).unwrap();
        write_atomic(&path, b"new", MODE_SECRET).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, MODE_SECRET);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"old", MODE_PUBLIC).unwrap();
        // Renaming a file over a non-empty directory fails after the temporary is written.
        let blocker = dir.path().join("d");
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), b"x").unwrap();
        assert!(write_atomic(&blocker, b"new", MODE_PUBLIC).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "temporary left behind"
        );
    }

    #[test]
    fn rename_durable_moves_across_directories() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        fs::create_dir(dir.path().join("b")).unwrap();
        let from = dir.path().join("a/img.tmp");
        fs::write(&from, b"image").unwrap();
        let to = dir.path().join("b/img");
        rename_durable(&from, &to).unwrap();
        assert!(!from.exists());
        assert_eq!(fs::read(&to).unwrap(), b"image");
        assert!(
            rename_durable(&from, &to).is_err(),
            "renaming a missing file must fail"
        );
    }

    #[test]
    fn sync_file_syncs_an_existing_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        sync_file(&file).unwrap();
        let err = sync_file(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn replace_atomic_is_not_durable_but_still_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.json");
        replace_atomic(&path, b"{}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{}");
    }

    #[test]
    fn written_back_ranges_keep_their_bytes_and_become_durable_with_the_fsync() {
        use std::os::unix::fs::FileExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(8 << 20).unwrap();
        // A range, an unaligned one, one past what was written, and an empty one.
        file.write_all_at(&vec![0x5a; 3 << 20], 512).unwrap();
        write_back_range(&file, 512, 3 << 20, WriteBack::Start).unwrap();
        write_back_range(&file, 1 << 20, 1000, WriteBack::AndWait).unwrap();
        write_back_range(&file, 6 << 20, 1 << 20, WriteBack::Start).unwrap();
        write_back_range(&file, 0, 0, WriteBack::AndWait).unwrap();
        file.sync_all().unwrap();
        let bytes = fs::read(&path).unwrap();
        assert!(bytes[..512].iter().all(|&b| b == 0));
        assert!(bytes[512..512 + (3 << 20)].iter().all(|&b| b == 0x5a));
        assert!(bytes[512 + (3 << 20)..].iter().all(|&b| b == 0));
    }
}
