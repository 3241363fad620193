//! # ripcord-journal
//!
//! Durable, segmented, append-only journal used by the ripcord process server
//! to persist sealed batches of changed disk blocks on its cache disk before
//! acknowledging them to the agent. One journal per protected disk. An
//! uploader later reads records ([`Journal::read_from`]), ships them to the
//! target store and trims the journal ([`Journal::trim_through`]).
//!
//! * On-disk format: see [`format`](mod@format) (segments named by a segment
//!   counter, CRC32C mixed with the segment number, little-endian).
//! * Durability: [`Journal::append`]/[`Journal::append_many`] write;
//!   [`Journal::sync`] fdatasyncs and advances [`Journal::durable`]. Acknowledge
//!   only durable records. A failed fsync poisons the journal.
//! * Recovery on open: torn tails of the last segment are truncated and reported
//!   ([`RecoveryReport`]); any other corruption is refused with the file and
//!   offset ([`JournalError::Corrupt`]).
//! * IO engines: io_uring or pwrite/fdatasync ([`EngineChoice`]); any
//!   [`Engine`] can be wrapped for fault injection.
//! * Back-pressure: [`Journal::space_status`] / [`Journal::check_space`], and
//!   ENOSPC on append returns [`JournalError::NoSpace`] with nothing lost.
//!
//! ```no_run
//! use ripcord_journal::{Journal, JournalConfig, RecordType};
//! let mut j = Journal::open("/var/cache/ripcord/disk0", JournalConfig::default())?;
//! j.append(RecordType::Batch, b"blocks...")?;
//! let durable = j.sync()?; // acknowledge records with seq < durable.next_seq
//! for rec in j.read_from(j.first_seq())? {
//!     let rec = rec?;
//!     // upload rec.payload ...
//!     j.trim_through(rec.seq)?;
//! }
//! # Ok::<(), ripcord_journal::JournalError>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod engine;
mod error;
pub mod format;
mod journal;
mod reader;
mod recovery;
mod space;

pub use engine::{
    Engine, EngineChoice, EngineKind, MAX_IOVECS, SyncEngine, SyncKind, UringEngine, select_engine,
};
pub use error::{CorruptionKind, ErrorAction, IoOp, JournalError, Result};
pub use format::{
    MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN, RecordType, SEGMENT_HEADER_LEN, record_size,
};
pub use journal::{
    Appended, DEFAULT_SEGMENT_SIZE, Journal, JournalConfig, MIN_SEGMENT_SIZE, Metrics, Position,
};
pub use reader::{JournalReader, Record};
pub use recovery::{LOCK_FILE_NAME, RecoveryMode, RecoveryReport};
pub use space::{SpaceStatus, SpaceThresholds, space_status};
