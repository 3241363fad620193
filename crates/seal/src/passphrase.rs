//! Reading the deployment passphrase: the one home for every ripcord tool that asks for
//! it (the `ripcord` operator tool; the process server's `init` and `replay`).
//!
//! # Where it comes from, in this order
//! 1. a file (`--passphrase-file`): its first line, without the line ending;
//! 2. the `RIPCORD_PASSPHRASE` environment variable;
//! 3. a prompt on the terminal, without echo, when standard input is a terminal.
//!
//! # The file must be private
//! The passphrase opens every disk's data, so a file holding it is refused when its group
//! or others may read or write it (`mode & 0o077 != 0`), as ssh refuses such private keys.
//! The error says which and gives the `chmod 600` that fixes it. Create it private from
//! the start: `(umask 077; echo '...' > pass)`.
//!
//! The passphrase is returned in [`Zeroizing`] bytes, wiped when dropped.

use std::{
    io::IsTerminal as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

/// The environment variable read when no file is given.
pub const PASSPHRASE_ENV: &str = "RIPCORD_PASSPHRASE";

/// The shortest passphrase accepted (the process server's `init` sets it with this rule).
pub const MIN_PASSPHRASE_LEN: usize = 8;

/// Why no passphrase could be read.
#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    /// The file could not be read (missing, permissions); fix the path or the file.
    #[error("cannot read passphrase file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is open to group or others; refused until `chmod 600`.
    #[error(
        "passphrase file {p} is {what} by others (mode {mode:04o}); run chmod 600 {p}",
        p = .path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// "readable" or "writable".
        what: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// No file, no environment variable, and no terminal to prompt on.
    #[error(
        "give the deployment passphrase with --passphrase-file, {PASSPHRASE_ENV}, or at the \
         prompt (run from a terminal)"
    )]
    Missing,
    /// The terminal prompt failed.
    #[error("cannot read the passphrase from the terminal: {0}")]
    Terminal(#[source] std::io::Error),
    /// Too short to be a deployment passphrase.
    #[error("the deployment passphrase must be at least {MIN_PASSPHRASE_LEN} characters")]
    TooShort,
}

/// Reads the deployment passphrase from `file`, else `RIPCORD_PASSPHRASE`, else a terminal
/// prompt (see the module doc), refusing a file that group or others may read or write.
pub fn read_passphrase(file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>, PassphraseError> {
    let pass: Zeroizing<String> = match file {
        Some(path) => {
            check_private(path)?;
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                PassphraseError::Read {
                    path: path.to_owned(),
                    source,
                }
            })?);
            Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
        }
        None => match std::env::var(PASSPHRASE_ENV) {
            Ok(p) => Zeroizing::new(p),
            Err(_) if std::io::stdin().is_terminal() => Zeroizing::new(
                rpassword::prompt_password("deployment passphrase: ")
                    .map_err(PassphraseError::Terminal)?,
            ),
            Err(_) => return Err(PassphraseError::Missing),
        },
    };
    if pass.chars().count() < MIN_PASSPHRASE_LEN {
        return Err(PassphraseError::TooShort);
    }
    Ok(Zeroizing::new(pass.as_bytes().to_vec()))
}

/// Refuses a passphrase file that group or others may read or write.
pub fn check_private(path: &Path) -> Result<(), PassphraseError> {
    let meta = std::fs::metadata(path).map_err(|source| PassphraseError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(PassphraseError::Exposed {
        path: path.to_owned(),
        what: if mode & 0o044 != 0 {
            "readable"
        } else {
            "writable"
        },
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join(format!("pass-{mode:o}"));
        std::fs::write(&path, "a long passphrase\nsecond line\n").expect("writing");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn a_private_file_gives_its_first_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = file_with_mode(dir.path(), 0o600);
        let pass = read_passphrase(Some(&path)).expect("a 0600 file is accepted");
        assert_eq!(pass.as_slice(), b"a long passphrase");
    }

    #[test]
    fn a_file_readable_by_others_is_refused_with_the_chmod_that_fixes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = file_with_mode(dir.path(), 0o644);
        let e = read_passphrase(Some(&path)).expect_err("a 0644 file must be refused");
        assert_eq!(
            e.to_string(),
            format!(
                "passphrase file {p} is readable by others (mode 0644); run chmod 600 {p}",
                p = path.display()
            )
        );
    }

    #[test]
    fn a_file_writable_by_the_group_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = file_with_mode(dir.path(), 0o620);
        let e = read_passphrase(Some(&path)).expect_err("a 0620 file must be refused");
        assert!(
            e.to_string().contains("is writable by others (mode 0620)"),
            "{e}"
        );
    }

    #[test]
    fn a_short_passphrase_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("short");
        std::fs::write(&path, "short\n").expect("writing");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = read_passphrase(Some(&path)).expect_err("too short");
        assert!(matches!(e, PassphraseError::TooShort), "{e}");
    }
}
