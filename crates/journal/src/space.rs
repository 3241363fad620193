//! Free-space back-pressure for the cache file system.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{IoOp, JournalError, Result};

/// Thresholds below which the process server should stop acknowledging.
/// Both are checked; falling below either one triggers back-pressure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpaceThresholds {
    /// Minimum bytes available (to unprivileged users, `f_bavail`).
    pub min_free_bytes: u64,
    /// Minimum percentage (0.0–100.0) of the file system available.
    pub min_free_percent: f64,
}

impl Default for SpaceThresholds {
    /// 1 GiB and 5 %.
    fn default() -> Self {
        SpaceThresholds {
            min_free_bytes: 1 << 30,
            min_free_percent: 5.0,
        }
    }
}

/// Snapshot of the cache file system's space against the thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpaceStatus {
    /// Bytes available to unprivileged users.
    pub free_bytes: u64,
    /// Total size of the file system in bytes.
    pub total_bytes: u64,
    /// `free_bytes` as a percentage of `total_bytes`.
    pub free_percent: f64,
    /// True when free space is below either threshold: stop acknowledging.
    pub below_threshold: bool,
}

impl SpaceStatus {
    /// True when the server may keep accepting data.
    pub fn accepting(&self) -> bool {
        !self.below_threshold
    }
}

/// Query `statvfs(path)` and compare against `thresholds`.
pub fn space_status(path: &Path, thresholds: &SpaceThresholds) -> Result<SpaceStatus> {
    let err = |source: io::Error| JournalError::Io {
        op: IoOp::Statvfs,
        path: path.to_path_buf(),
        source,
    };
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    let free_bytes = st.f_bavail as u64 * frsize;
    let total_bytes = st.f_blocks as u64 * frsize;
    let free_percent = if total_bytes == 0 {
        0.0
    } else {
        free_bytes as f64 * 100.0 / total_bytes as f64
    };
    Ok(SpaceStatus {
        free_bytes,
        total_bytes,
        free_percent,
        below_threshold: free_bytes < thresholds.min_free_bytes
            || free_percent < thresholds.min_free_percent,
    })
}
