//! One agent per device and per state directory, enforced locally with advisory locks.
//!
//! Two agents protecting one device start epochs in turn and evict each other on the
//! process server (`StaleEpoch`); two agents on one state directory race on `state.json`.
//! So `protect` takes, before it starts an epoch, and holds until it exits:
//!
//! - `<state-dir>/agent.lock`;
//! - for every protected device, `/run/ripcord/lock/<MAJ>:<MIN>.lock` (the directory is
//!   created with mode 0700), whatever state directory the agent uses.
//!
//! Each is an exclusive `flock(LOCK_EX | LOCK_NB)` on the file, whose contents are the
//! holder's pid (for the message that refuses a second agent). The kernel drops the lock
//! when the holder dies, so a killed agent never leaves a device locked. Others (the
//! `ripcord` CLI, `ripcord-agent status`) tell whether a running agent protects a device
//! by probing the same file with `flock(LOCK_SH | LOCK_NB)`: the path and these semantics
//! are an interface.

use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use ripcord_crashsafe::FileLock;

use crate::device::{BlockDevice, DevId};

pub use ripcord_crashsafe::DEVICE_LOCK_DIR;

/// The lock file of the state directory `state_dir`.
pub fn state_dir_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.lock")
}

/// The lock file of device `dev`.
pub fn device_lock_path(dev: DevId) -> PathBuf {
    Path::new(DEVICE_LOCK_DIR).join(format!("{dev}.lock"))
}

/// Locks held by a running `protect`: released when dropped (or when the process dies).
#[derive(Debug)]
pub struct AgentLocks {
    _held: Vec<FileLock>,
}

/// Take the state directory's lock, then every device's, or fail saying who holds it.
pub fn lock_all(state_dir: &Path, devices: &[BlockDevice]) -> anyhow::Result<AgentLocks> {
    let mut held = Vec::new();
    let path = state_dir_lock_path(state_dir);
    let Some(lock) = take(&path)? else {
        bail!(
            "the state directory {} is already in use by another ripcord-agent ({}, lock {}): \
             run one agent per state directory",
            state_dir.display(),
            holder(&path),
            path.display()
        );
    };
    held.push(lock);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(DEVICE_LOCK_DIR)
        .with_context(|| format!("creating {DEVICE_LOCK_DIR}"))?;
    // Created by someone else with a looser mode? Tighten it: only root probes the locks.
    std::fs::set_permissions(DEVICE_LOCK_DIR, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {DEVICE_LOCK_DIR}"))?;
    for dev in devices {
        let path = device_lock_path(dev.dev);
        let Some(lock) = take(&path)? else {
            bail!(
                "{} is already protected by another ripcord-agent ({}, lock {}): stop that \
                 agent first; a device is protected by one agent only",
                dev.path.display(),
                holder(&path),
                path.display()
            );
        };
        held.push(lock);
    }
    Ok(AgentLocks { _held: held })
}

/// Take the lock at `path` and write our pid into it; `None` when another process holds it.
fn take(path: &Path) -> anyhow::Result<Option<FileLock>> {
    let lock = ripcord_crashsafe::try_lock_exclusive(path)
        .with_context(|| format!("locking {}", path.display()))?;
    if let Some(lock) = &lock {
        lock.write_owner(&format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(lock)
}

/// "pid N" from a held lock file, or what is known.
fn holder(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().parse::<u32>().is_ok() => format!("pid {}", text.trim()),
        _ => "pid unknown".to_owned(),
    }
}

/// `Some("pid N")` when an agent runs with state directory `state_dir` (its lock is held).
pub fn agent_running(state_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = state_dir_lock_path(state_dir);
    let held = ripcord_crashsafe::is_locked(&path)
        .with_context(|| format!("probing {}", path.display()))?;
    Ok(held.then(|| holder(&path)))
}
