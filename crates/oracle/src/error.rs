//! Library error types.

use std::path::PathBuf;

/// Errors while decoding a workload log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading the log failed.
    #[error("reading log: {0}")]
    Io(#[from] std::io::Error),
    /// The file is shorter than the header or the header magic is wrong.
    #[error("not a ripcord-oracle log (bad magic or too short)")]
    NotALog,
    /// The header version is not supported.
    #[error("unsupported log version {0}")]
    Version(u32),
    /// The header checksum or a header field is invalid.
    #[error("bad log header: {0}")]
    Header(String),
    /// A record in the middle of the log is damaged (a damaged *last* record is a torn tail
    /// and is tolerated).
    #[error("corrupt log record at byte offset {offset}: {reason}")]
    Corrupt {
        /// Byte offset of the record.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// Records are well-formed but contradict each other.
    #[error("inconsistent log at byte offset {offset}: {reason}")]
    Inconsistent {
        /// Byte offset of the record.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
}

/// Errors of the workload, the checker and the self-test.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (includes the path where relevant).
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The log could not be decoded.
    #[error("log {path}: {source}")]
    Log {
        /// The log's path (empty if read from a stream).
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: LogError,
    },
    /// An argument is invalid.
    #[error("invalid argument: {0}")]
    Usage(String),
    /// The image is shorter than the region being checked.
    #[error("image too short: region needs {needed} bytes, image ends at {got}")]
    ImageTooShort {
        /// Bytes needed (end of region).
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// `T` lies after the last event of a log that did not end cleanly: ops submitted after
    /// the log was cut are unknown, so no verdict is possible.
    #[error(
        "T={t_ns} is after the last logged event ({last_ns}) of a log that did not end cleanly; \
         ops after that are unknown"
    )]
    TimeBeyondLog {
        /// The requested instant.
        t_ns: u64,
        /// The last timestamp in the log.
        last_ns: u64,
    },
    /// A self-test expectation failed.
    #[error("self-test failed: {0}")]
    SelfTest(String),
}

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
