//! Error type of the journal.
//!
//! Every variant tells the caller what to do; see [`JournalError::action`].

use std::io;
use std::path::{Path, PathBuf};

/// Convenience alias used throughout the crate.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// What the caller should do about a [`JournalError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Back-pressure: nothing was lost and the journal is consistent. Stop
    /// acknowledging, wait for the uploader to trim (or space to free up) and
    /// retry the same append.
    RetryLater,
    /// The journal instance is unusable (poisoned). Drop it and reopen the
    /// directory, which runs recovery; records after the last durable position
    /// may be lost and must be re-requested from the agent.
    ReopenJournal,
    /// On-disk state is corrupt or inconsistent; automatic recovery refused.
    /// An operator must inspect the named file/offset (or choose a more lenient
    /// [`RecoveryMode`](crate::RecoveryMode)).
    NeedsOperator,
    /// The call itself was wrong (bad argument, bad configuration, trimmed
    /// sequence requested). Fix the caller.
    FixCaller,
}

/// The file-system operation that failed, for [`JournalError::Io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Creating a file or directory.
    Create,
    /// Opening a file or directory.
    Open,
    /// Reading a file or listing a directory.
    Read,
    /// Writing record or header bytes.
    Write,
    /// Renaming a temporary segment into place.
    Rename,
    /// Deleting a segment or temporary file.
    Remove,
    /// Truncating a file (torn-tail repair or write rollback).
    Truncate,
    /// Querying file-system statistics (statvfs).
    Statvfs,
    /// Taking the directory lock.
    Lock,
    /// Setting up the IO engine.
    Engine,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            IoOp::Create => "create",
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Rename => "rename",
            IoOp::Remove => "remove",
            IoOp::Truncate => "truncate",
            IoOp::Statvfs => "statvfs",
            IoOp::Lock => "lock",
            IoOp::Engine => "engine setup",
        };
        f.write_str(s)
    }
}

/// Why a record or segment failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorruptionKind {
    /// Segment header magic does not match.
    BadMagic,
    /// Segment header has an unsupported format version.
    UnsupportedVersion(u32),
    /// Segment header checksum mismatch.
    BadHeaderChecksum,
    /// Segment header is shorter than [`SEGMENT_HEADER_LEN`](crate::SEGMENT_HEADER_LEN).
    TruncatedHeader,
    /// Segment number in the header differs from the file name.
    SegmentNumberMismatch {
        /// Number from the file name.
        expected: u64,
        /// Number stored in the header.
        found: u64,
    },
    /// Record checksum mismatch (includes stale bytes from another segment).
    BadChecksum,
    /// Record header is malformed (unknown type, reserved bits set, or
    /// length above [`MAX_RECORD_PAYLOAD`](crate::MAX_RECORD_PAYLOAD)).
    BadRecordHeader,
    /// The file ends in the middle of a record.
    Truncated,
    /// A record with a valid checksum carries an unexpected sequence number.
    SequenceMismatch {
        /// Expected sequence number.
        expected: u64,
        /// Sequence number found.
        found: u64,
    },
    /// Invalid bytes at the end of the last segment while recovery mode is
    /// [`RecoveryMode::Strict`](crate::RecoveryMode::Strict).
    TornTailInStrictMode {
        /// Number of bytes after the last valid record.
        bytes: u64,
    },
    /// Invalid bytes followed later by a valid record: not a torn tail.
    ValidRecordAfterCorruption {
        /// Offset of the valid record found after the corruption.
        next_valid_offset: u64,
    },
}

impl std::fmt::Display for CorruptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CorruptionKind::BadMagic => write!(f, "bad segment magic"),
            CorruptionKind::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            CorruptionKind::BadHeaderChecksum => write!(f, "segment header checksum mismatch"),
            CorruptionKind::TruncatedHeader => write!(f, "segment header truncated"),
            CorruptionKind::SegmentNumberMismatch { expected, found } => {
                write!(
                    f,
                    "segment number {found} in header, {expected} in file name"
                )
            }
            CorruptionKind::BadChecksum => write!(f, "record checksum mismatch"),
            CorruptionKind::BadRecordHeader => write!(f, "malformed record header"),
            CorruptionKind::Truncated => write!(f, "record truncated by end of file"),
            CorruptionKind::SequenceMismatch { expected, found } => {
                write!(f, "record sequence {found}, expected {expected}")
            }
            CorruptionKind::TornTailInStrictMode { bytes } => {
                write!(f, "{bytes} invalid tail bytes (strict recovery mode)")
            }
            CorruptionKind::ValidRecordAfterCorruption { next_valid_offset } => write!(
                f,
                "invalid record followed by a valid record at offset {next_valid_offset} (mid-log corruption, not a torn tail)"
            ),
        }
    }
}

/// Errors returned by the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The device is full (ENOSPC/EDQUOT). Back-pressure: the failed append
    /// was rolled back, nothing previously written was lost, and the journal
    /// stays usable. Retry after space is freed.
    #[error("journal device full during {op} of {path}: back-pressure, retry later (nothing lost)")]
    NoSpace {
        /// Operation that hit the condition.
        op: IoOp,
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Free space is below the configured thresholds (see
    /// [`Journal::check_space`](crate::Journal::check_space)). Back-pressure.
    #[error(
        "journal device free space {free_bytes} bytes ({free_percent:.2}%) below threshold: back-pressure, retry later"
    )]
    LowSpace {
        /// Bytes available to unprivileged users.
        free_bytes: u64,
        /// Percentage of the file system available.
        free_percent: f64,
    },
    /// fsync/fdatasync failed. After a failed fsync the page-cache state is
    /// unknown (dirty pages may have been dropped), so the journal is
    /// poisoned and never retries. Reopen to recover from what is on disk.
    #[error(
        "fsync of {path} failed: journal poisoned, page cache state unknown; reopen to recover"
    )]
    SyncFailed {
        /// File or directory whose sync failed.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// An earlier fatal error poisoned this journal instance.
    #[error("journal poisoned by an earlier fatal error ({cause}); reopen to recover")]
    Poisoned {
        /// Short description of the original fatal error.
        cause: String,
    },
    /// Another I/O error. Fatal for this journal instance when it happened on
    /// the write path (the journal is poisoned).
    #[error("I/O error during {op} of {path}")]
    Io {
        /// Operation that failed.
        op: IoOp,
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A record or segment failed verification. Needs an operator.
    #[error("corrupt journal: {path} at byte offset {offset}: {kind}")]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the bad record or header within the file.
        offset: u64,
        /// What is wrong.
        kind: CorruptionKind,
    },
    /// Sequence numbers are not contiguous between two segments.
    #[error("sequence gap at {path}: segment starts at sequence {found}, expected {expected}")]
    SequenceGap {
        /// Segment whose first sequence is unexpected.
        path: PathBuf,
        /// Sequence number that should have come next.
        expected: u64,
        /// First sequence number recorded in the segment header.
        found: u64,
    },
    /// Segment numbers are not contiguous (a segment file is missing).
    #[error("missing segment before {path}: expected segment number {expected}, found {found}")]
    MissingSegment {
        /// Segment file found after the hole.
        path: PathBuf,
        /// Expected segment number.
        expected: u64,
        /// Segment number found.
        found: u64,
    },
    /// A payload exceeds [`MAX_RECORD_PAYLOAD`](crate::MAX_RECORD_PAYLOAD).
    #[error("record payload of {len} bytes exceeds maximum {max}")]
    RecordTooLarge {
        /// Payload length.
        len: usize,
        /// Maximum allowed.
        max: usize,
    },
    /// Requested sequence number has already been trimmed.
    #[error("sequence {requested} already trimmed; first available is {first_available}")]
    Trimmed {
        /// Requested sequence number.
        requested: u64,
        /// Oldest sequence number still in the journal.
        first_available: u64,
    },
    /// Requested sequence number is beyond the durable end of the journal.
    #[error(
        "sequence {requested} is beyond the durable end (next durable sequence {durable_next})"
    )]
    BeyondEnd {
        /// Requested sequence number.
        requested: u64,
        /// First sequence number not yet durable.
        durable_next: u64,
    },
    /// The io_uring engine was explicitly requested but is unusable.
    #[error("io_uring engine unavailable: {reason}")]
    EngineUnavailable {
        /// Why (setup failure or missing opcode).
        reason: String,
    },
    /// Invalid configuration value.
    #[error("invalid journal configuration: {0}")]
    InvalidConfig(&'static str),
    /// Another process (or journal instance) holds the directory lock.
    #[error("journal directory {path} is locked by another instance")]
    Locked {
        /// Journal directory.
        path: PathBuf,
    },
}

impl JournalError {
    /// What the caller should do about this error.
    pub fn action(&self) -> ErrorAction {
        match self {
            JournalError::NoSpace { .. } | JournalError::LowSpace { .. } => ErrorAction::RetryLater,
            JournalError::SyncFailed { .. }
            | JournalError::Poisoned { .. }
            | JournalError::Io { .. }
            | JournalError::Locked { .. } => ErrorAction::ReopenJournal,
            JournalError::Corrupt { .. }
            | JournalError::SequenceGap { .. }
            | JournalError::MissingSegment { .. } => ErrorAction::NeedsOperator,
            JournalError::RecordTooLarge { .. }
            | JournalError::Trimmed { .. }
            | JournalError::BeyondEnd { .. }
            | JournalError::EngineUnavailable { .. }
            | JournalError::InvalidConfig(_) => ErrorAction::FixCaller,
        }
    }

    /// True for back-pressure errors (`NoSpace`, `LowSpace`): nothing lost, retry later.
    pub fn is_back_pressure(&self) -> bool {
        self.action() == ErrorAction::RetryLater
    }

    /// True if the journal instance can no longer be used.
    pub fn is_fatal(&self) -> bool {
        self.action() == ErrorAction::ReopenJournal
    }
}

/// True if an io::Error means "out of space" (ENOSPC or EDQUOT).
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps an IO error on `path` during `op` to [`JournalError::NoSpace`] (ENOSPC/EDQUOT,
/// back-pressure) or [`JournalError::Io`] (anything else).
pub(crate) fn io_err(op: IoOp, path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| {
        if is_no_space(&source) {
            JournalError::NoSpace {
                op,
                path: path.to_path_buf(),
                source,
            }
        } else {
            JournalError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}
