//! File helpers of the PKI: private directories, and crash-safe writes (from
//! `ripcord-crashsafe`).

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

pub(crate) use ripcord_crashsafe::{MODE_PUBLIC, MODE_SECRET};

/// Creates `dir` (and parents) if missing; newly created directories get mode 0700.
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Durably replaces `path` with `contents`, created with `mode` from the start (see
/// `ripcord_crashsafe::write_atomic`).
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    ripcord_crashsafe::write_atomic(path, contents, mode)
}

/// Reads a whole file as UTF-8 text.
pub(crate) fn read_text(path: &Path) -> io::Result<String> {
    fs::read_to_string(path)
}
