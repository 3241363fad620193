//! Error types. Every error about stored data names the object (relative to
//! the store root) so an operator can find it.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with the bytes of a stored object.
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    /// The object ends before a field.
    #[error("truncated: {what} needs {needed} bytes at offset {offset} but the object has {len}")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Offset of the field.
        offset: u64,
        /// Object (or record) length.
        len: u64,
    },
    /// The magic number is wrong (not an object of the expected kind).
    #[error("bad magic for {what}")]
    BadMagic {
        /// What was expected.
        what: &'static str,
    },
    /// Written by a format version this build does not read (too old or newer).
    #[error(
        "unsupported format version {found} (this build reads {} to {supported})",
        crate::format::OLDEST_READABLE_VERSION
    )]
    Version {
        /// Version found.
        found: u32,
        /// Newest version supported.
        supported: u32,
    },
    /// The stored checksum does not match the bytes.
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// What the checksum covers.
        what: &'static str,
        /// Checksum stored in the object.
        stored: u32,
        /// Checksum computed over the bytes read.
        computed: u32,
    },
    /// A length or count field exceeds its bound.
    #[error("{what} = {value} exceeds the bound {max}")]
    Length {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The bound.
        max: u64,
    },
    /// A field holds an impossible value.
    #[error("invalid {what}")]
    Invalid {
        /// The field.
        what: &'static str,
    },
    /// Bytes left over after the last field.
    #[error("{extra} trailing bytes")]
    Trailing {
        /// Number of unexpected bytes.
        extra: u64,
    },
    /// The object's content disagrees with its name or with the index entry
    /// that referenced it.
    #[error("content does not match {what}")]
    Mismatch {
        /// What disagrees.
        what: &'static str,
    },
    /// A JSON object did not parse.
    #[error("malformed JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A reference to an object that does not exist.
    #[error("references missing object `{0}`")]
    Dangling(String),
    /// A reference to a record that is not in the referenced pack.
    #[error("references no record at offset {offset} (length {length}) of pack `{pack}`")]
    DanglingRecord {
        /// The pack.
        pack: String,
        /// Offset referenced.
        offset: u64,
        /// Length referenced.
        length: u64,
    },
}

/// What an operator should do about a failed object-store operation, from the operating
/// system's error where there is one (a local target, or a local file system under a
/// mount): a full target is not a connectivity problem.
fn io_advice(source: &object_store::Error) -> &'static str {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                    "the target's file system is full: free space there or shorten \
                     retention-secs; nothing is lost meanwhile (the journal keeps the data)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied: check the owner and mode of the target directory"
                }
                std::io::ErrorKind::ReadOnlyFilesystem => {
                    "the target's file system is read-only: remount it read-write"
                }
                _ => "check the target's file system and retry",
            };
        }
        cause = c.source();
    }
    match source {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket policy"
        }
        _ => "check connectivity and credentials, then retry",
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object store failed (network, permissions, disk).
    #[error("object store {op} of `{object}` failed: {source}; {}", io_advice(.source))]
    Io {
        /// Object name (or listing prefix).
        object: String,
        /// Operation.
        op: &'static str,
        /// Underlying error.
        #[source]
        source: object_store::Error,
    },
    /// An object that must exist does not.
    #[error(
        "object `{object}` does not exist; it may have been removed by retention GC (retry) or the store is incomplete (run verify)"
    )]
    NotFound {
        /// Object name.
        object: String,
    },
    /// A stored object is damaged or malformed.
    #[error(
        "object `{object}` is damaged: {problem}; run verify, restore the object from a replica or start a new epoch (full resync)"
    )]
    Corrupt {
        /// Object name.
        object: String,
        /// What is wrong.
        problem: Corruption,
    },
    /// The store URL is not understood.
    #[error("unsupported store URL `{url}`: {reason}; give file:///abs/path or s3://bucket/prefix{}",
        suggest_file_url(.url))]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// [`crate::Store::open_existing`]: nothing, or no ripcord store, is at the URL (a
    /// mistyped path or prefix); check the URL, nothing was created.
    #[error("no ripcord store at `{url}`: {reason}; check the --target URL")]
    NoStore {
        /// The URL.
        url: String,
        /// What is missing.
        reason: String,
    },
    /// The object store client could not be configured.
    #[error(
        "cannot configure object store for `{url}`: {source}; check AWS_* environment variables"
    )]
    Config {
        /// The URL.
        url: String,
        /// Underlying error.
        #[source]
        source: object_store::Error,
    },
    /// The local store directory could not be created.
    #[error("cannot create store directory {path:?}: {source}")]
    CreateDir {
        /// Directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The local store directory could not be opened, or its name not made durable
    /// (fsync of it or a parent failed).
    #[error(
        "cannot open store directory {path:?} durably (open and fsync it and its parents): {source}"
    )]
    OpenDir {
        /// Directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `escrow.json` already exists with different content.
    #[error(
        "`{object}` already exists with different content; escrow metadata is written once per store"
    )]
    EscrowConflict {
        /// Object name.
        object: String,
    },
    /// A batch or cut arrived before any `begin_epoch`.
    #[error("disk {disk}: no epoch begun; call begin_epoch before adding batches or cuts")]
    NoEpoch {
        /// Disk.
        disk: String,
    },
    /// A batch or cut belongs to a different epoch than the writer's.
    #[error(
        "disk {disk}: item of epoch {got} but the writer is at epoch {current}; call begin_epoch for the new epoch"
    )]
    WrongEpoch {
        /// Disk.
        disk: String,
        /// Writer's epoch.
        current: u64,
        /// Item's epoch.
        got: u64,
    },
    /// `begin_epoch` with an epoch older than the committed one.
    #[error(
        "disk {disk}: begin_epoch({got}) but epoch {current} is already committed; epochs must increase"
    )]
    EpochRegression {
        /// Disk.
        disk: String,
        /// Committed epoch.
        current: u64,
        /// Requested epoch.
        got: u64,
    },
    /// `begin_epoch` for the current epoch with different parameters.
    #[error("disk {disk}: epoch {epoch} is already stored with different parameters (`{object}`)")]
    EpochConflict {
        /// Disk.
        disk: String,
        /// Epoch.
        epoch: u64,
        /// Epoch object.
        object: String,
    },
    /// A batch's seq skips ahead: a batch is missing.
    #[error(
        "disk {disk} epoch {epoch}: expected batch seq {expected}, got {got}; replay the journal from seq {expected}"
    )]
    SeqGap {
        /// Disk.
        disk: String,
        /// Epoch.
        epoch: u64,
        /// Next seq the writer needs.
        expected: u64,
        /// Seq received.
        got: u64,
    },
    /// A batch is malformed (caller bug).
    #[error("invalid batch seq {seq}: {reason}")]
    InvalidBatch {
        /// Seq.
        seq: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The epoch of a point is not stored.
    #[error("disk {disk}: epoch {epoch} is not in the store (`{object}` missing)")]
    UnknownEpoch {
        /// Disk.
        disk: String,
        /// Epoch.
        epoch: u64,
        /// Expected object name.
        object: String,
    },
    /// A point asks for batches beyond what is durable.
    #[error("disk {disk} epoch {epoch}: point needs seq {seq} but only {durable} is committed")]
    NotDurable {
        /// Disk.
        disk: String,
        /// Epoch.
        epoch: u64,
        /// Needed seq.
        seq: u64,
        /// Committed seq.
        durable: u64,
    },
    /// A committed index lacks a batch in the range it claims to cover.
    #[error(
        "disk {disk} epoch {epoch}: batch seq {seq} needed by the plan has no index entry in `{object}`"
    )]
    MissingBatch {
        /// Disk.
        disk: String,
        /// Epoch.
        epoch: u64,
        /// Seq.
        seq: u64,
        /// Index object that should hold it.
        object: String,
    },
    /// An index object places a batch's bytes (or zeros) other than the batch's
    /// authenticated extent list says: someone who can write the store altered it, or
    /// it is damaged. Nothing of the point may be used.
    #[error(
        "`{object}` places batch {seq} of epoch {epoch} other than the batch's authenticated \
         extent list does, at sector {sector}: {problem}; the index was altered by someone who \
         can write the store, or is damaged: do not use this point, run verify"
    )]
    Placement {
        /// Index object (segment or checkpoint) that placed the batch.
        object: String,
        /// Epoch.
        epoch: u64,
        /// The batch.
        seq: u64,
        /// First sector where plan and authenticated extents disagree.
        sector: u64,
        /// How they disagree.
        problem: PlacementProblem,
    },
}

/// How a plan disagrees with a batch's authenticated extent list
/// ([`Error::Placement`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementProblem {
    /// The plan takes bytes (or zeros) from the batch at a sector, kind or plaintext
    /// offset the batch's extents do not have.
    #[error(
        "the plan takes it from where the batch did not write it (moved, re-kinded or shifted)"
    )]
    NotWritten,
    /// A sector the batch wrote shows an older batch's content.
    #[error("the batch's write is hidden behind an older batch's content")]
    HiddenByOlder,
    /// A sector the batch wrote is left unplaced (a hole reads as zeros).
    #[error("the batch's write is missing from the plan (the sector would read as zeros)")]
    Unplaced,
}

impl Error {
    pub(crate) fn corrupt(object: impl Into<String>, problem: Corruption) -> Error {
        Error::Corrupt {
            object: object.into(),
            problem,
        }
    }

    /// The object this error is about, if any.
    pub fn object(&self) -> Option<&str> {
        match self {
            Error::Io { object, .. }
            | Error::NotFound { object }
            | Error::Corrupt { object, .. }
            | Error::EscrowConflict { object }
            | Error::EpochConflict { object, .. }
            | Error::UnknownEpoch { object, .. }
            | Error::MissingBatch { object, .. }
            | Error::Placement { object, .. } => Some(object),
            _ => None,
        }
    }
}

/// For a plain absolute path given as a store URL, the `file://` URL meant.
fn suggest_file_url(url: &str) -> String {
    if url.starts_with('/') {
        format!(" (did you mean file://{url}?)")
    } else {
        String::new()
    }
}
