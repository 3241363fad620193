//! The live journal: append, group commit, roll-over, trim and reads of an
//! open [`Journal`].
//!
//! Opening a directory and rebuilding this state from the segment files is
//! recovery, in `recovery.rs`: it hands over a [`Recovered`] and
//! [`Journal::from_recovered`] starts the live path from it. The one piece
//! both use is [`create_segment`]: recovery for the first segment of a new
//! journal, roll-over for every later one.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::engine::{Engine, EngineChoice, EngineKind, MAX_IOVECS, SyncKind};
use crate::error::{IoOp, JournalError, Result, io_err, is_no_space};
use crate::format::{
    MAX_RECORD_PAYLOAD, MAX_UNSYNCED_BEFORE, RECORD_HEADER_LEN, RecordHeader, RecordType,
    SEGMENT_HEADER_LEN, SegmentHeader, record_size, segment_file_name, temp_file_name,
};
use crate::reader::{JournalReader, ReaderSegment};
use crate::recovery::{RecoveryMode, RecoveryReport};
use crate::space::{SpaceStatus, SpaceThresholds, space_status};

/// Default segment roll-over size (64 MiB).
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// Smallest accepted `segment_size`.
pub const MIN_SEGMENT_SIZE: u64 = 4096;

/// Journal configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JournalConfig {
    /// Roll over to a new segment once the next batch would push the current
    /// segment past this size. A batch is never split across segments, so a
    /// segment may exceed this by at most one batch. Default 64 MiB.
    pub segment_size: u64,
    /// IO engine selection. Default [`EngineChoice::Auto`].
    pub engine: EngineChoice,
    /// io_uring submission queue size. Default 64.
    pub uring_entries: u32,
    /// Recovery policy for the last segment's tail.
    pub recovery: RecoveryMode,
    /// Free-space thresholds for [`Journal::space_status`] / [`Journal::check_space`].
    pub space: SpaceThresholds,
    /// Reserve `segment_size` bytes for each new segment with
    /// `fallocate(FALLOC_FL_KEEP_SIZE)` (the file size stays the logical size,
    /// so no zero tail is ever exposed). Default false.
    pub preallocate: bool,
    /// Files the journal's owner keeps in the journal directory next to the segments
    /// (its own state, and their temporary names while replaced atomically:
    /// `.<name>.tmp.*`): recovery leaves them alone and does not report them as unknown.
    /// Default none.
    pub companion_files: &'static [&'static str],
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            segment_size: DEFAULT_SEGMENT_SIZE,
            engine: EngineChoice::Auto,
            uring_entries: 64,
            recovery: RecoveryMode::TolerateTornTail,
            space: SpaceThresholds::default(),
            preallocate: false,
            companion_files: &[],
        }
    }
}

/// A position in the journal: the end of some record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Segment number.
    pub segment: u64,
    /// Byte offset within the segment file (end of the last record).
    pub offset: u64,
    /// Sequence number the next record will get; all records with smaller
    /// sequence numbers are before this position.
    pub next_seq: u64,
}

/// Result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number of the first appended record.
    pub first_seq: u64,
    /// Number of records appended.
    pub count: u64,
    /// Written (not yet durable) position after the last appended record.
    pub written: Position,
}

impl Appended {
    /// Sequence number of the last appended record (`None` if `count == 0`).
    pub fn last_seq(&self) -> Option<u64> {
        (self.count > 0).then(|| self.first_seq + self.count - 1)
    }
}

/// Counters since open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// Bytes of records (headers + payloads) written.
    pub bytes_written: u64,
    /// Records appended.
    pub records_appended: u64,
    /// Successful data syncs of the active segment (group commits + seals).
    pub syncs: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Segments deleted by trim.
    pub segments_trimmed: u64,
    /// Segment files currently in the journal.
    pub live_segments: usize,
    /// Engine in use.
    pub engine: EngineKind,
}

/// In-memory description of one segment.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    pub number: u64,
    pub first_seq: u64,
    /// One past the last record's sequence (== first_seq when empty).
    pub next_seq: u64,
    /// Logical length (end of last valid record).
    pub len: u64,
    pub path: PathBuf,
}

/// A durable, segmented, append-only record journal for one protected disk.
///
/// Not internally synchronised: wrap it in a mutex to share it. Group commit
/// is done by appending many records ([`Journal::append_many`] or repeated
/// [`Journal::append`]) and then calling [`Journal::sync`] once; only
/// acknowledge records whose sequence is below [`Journal::durable`]`().next_seq`.
/// Dropping the journal does not sync.
pub struct Journal {
    dir: PathBuf,
    dir_file: File,
    _lock: File,
    cfg: JournalConfig,
    engine: Box<dyn Engine>,
    sealed: VecDeque<SegmentMeta>,
    active: SegmentMeta,
    active_file: File,
    written: Position,
    durable: Position,
    poisoned: Option<String>,
    metrics: Metrics,
    report: RecoveryReport,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("written", &self.written)
            .field("durable", &self.durable)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// What recovery hands over to start the live journal: the open directory
/// and its lock, the engine, and the segments as found on disk. Everything
/// in them is durable; `active` is the last segment, where appends go.
pub(crate) struct Recovered {
    pub dir: PathBuf,
    pub dir_file: File,
    pub lock: File,
    pub cfg: JournalConfig,
    pub engine: Box<dyn Engine>,
    pub sealed: VecDeque<SegmentMeta>,
    pub active: SegmentMeta,
    pub active_file: File,
    pub metrics: Metrics,
    pub report: RecoveryReport,
}

/// Write all of `bufs` at `offset`, looping over short writes.
fn write_all_at(
    engine: &mut dyn Engine,
    file: &File,
    bufs: &mut [IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    let mut bufs = bufs;
    while !bufs.is_empty() {
        let n = bufs.len().min(MAX_IOVECS);
        let requested: usize = bufs[..n].iter().map(|b| b.len()).sum();
        let written = engine.write_at(file.as_fd(), &bufs[..n], offset)?;
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "engine wrote zero bytes",
            ));
        }
        let written = written.min(requested);
        IoSlice::advance_slices(&mut bufs, written);
        offset += written as u64;
    }
    Ok(())
}

impl Journal {
    /// Starts the live journal where recovery left it: written and durable
    /// positions both at the end of the active segment.
    pub(crate) fn from_recovered(r: Recovered) -> Journal {
        let pos = Position {
            segment: r.active.number,
            offset: r.active.len,
            next_seq: r.active.next_seq,
        };
        Journal {
            dir: r.dir,
            dir_file: r.dir_file,
            _lock: r.lock,
            cfg: r.cfg,
            engine: r.engine,
            sealed: r.sealed,
            active: r.active,
            active_file: r.active_file,
            written: pos,
            durable: pos,
            poisoned: None,
            metrics: r.metrics,
            report: r.report,
        }
    }

    fn check_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(JournalError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, err: JournalError) -> JournalError {
        tracing::error!(error = %err, "journal poisoned");
        self.poisoned = Some(err.to_string());
        err
    }

    /// Append one record. Returns its sequence number and the new written
    /// position. Not durable until [`Journal::sync`].
    ///
    /// On [`JournalError::NoSpace`] the record is rolled back (not written),
    /// the journal stays consistent and the append can be retried.
    pub fn append(&mut self, kind: RecordType, payload: &[u8]) -> Result<Appended> {
        self.append_many(&[(kind, payload)])
    }

    /// Append a batch of records with a single vectored write (group commit:
    /// follow with one [`Journal::sync`]). The batch is all-or-nothing: on any
    /// error none of it is considered written. A batch is never split across
    /// segments.
    pub fn append_many(&mut self, records: &[(RecordType, &[u8])]) -> Result<Appended> {
        self.check_poisoned()?;
        let first_seq = self.written.next_seq;
        if records.is_empty() {
            return Ok(Appended {
                first_seq,
                count: 0,
                written: self.written,
            });
        }
        let mut total = 0u64;
        for (_, p) in records {
            if p.len() > MAX_RECORD_PAYLOAD {
                return Err(JournalError::RecordTooLarge {
                    len: p.len(),
                    max: MAX_RECORD_PAYLOAD,
                });
            }
            total += record_size(p.len());
        }
        if self.active.len > SEGMENT_HEADER_LEN as u64
            && self.active.len + total > self.cfg.segment_size
        {
            self.roll_over()?;
        }
        // Each record says how many before it were not yet durable (see `format`); that
        // count must fit its 24 bits.
        if first_seq + records.len() as u64 - self.durable.next_seq > MAX_UNSYNCED_BEFORE {
            self.sync()?;
        }
        let segment = self.active.number;
        let durable_next = self.durable.next_seq;
        let headers: Vec<[u8; RECORD_HEADER_LEN]> = records
            .iter()
            .enumerate()
            .map(|(i, (k, p))| {
                let seq = first_seq + i as u64;
                // Saturating understates it: recovery then refuses rather than drops.
                let unsynced = (seq - durable_next).min(MAX_UNSYNCED_BEFORE);
                RecordHeader::encode(segment, *k, seq, unsynced, p)
            })
            .collect();
        let mut slices = Vec::with_capacity(records.len() * 2);
        for (h, (_, p)) in headers.iter().zip(records) {
            slices.push(IoSlice::new(h));
            if !p.is_empty() {
                slices.push(IoSlice::new(p));
            }
        }
        let start = self.active.len;
        if let Err(e) = write_all_at(&mut *self.engine, &self.active_file, &mut slices, start) {
            return Err(self.rollback_write(start, e));
        }
        let count = records.len() as u64;
        self.active.len += total;
        self.active.next_seq += count;
        self.written = Position {
            segment,
            offset: self.active.len,
            next_seq: self.active.next_seq,
        };
        self.metrics.bytes_written += total;
        self.metrics.records_appended += count;
        Ok(Appended {
            first_seq,
            count,
            written: self.written,
        })
    }

    /// Undo a failed (possibly partial) write: cut the file back to `start`
    /// so no partial record bytes remain. ENOSPC/EDQUOT become back-pressure;
    /// anything else (or a failed truncate) poisons the journal.
    fn rollback_write(&mut self, start: u64, e: io::Error) -> JournalError {
        let path = self.active.path.clone();
        if let Err(te) = self.active_file.set_len(start) {
            return self.poison(JournalError::Io {
                op: IoOp::Truncate,
                path,
                source: te,
            });
        }
        if is_no_space(&e) {
            tracing::warn!(path = %path.display(), "journal device full; append rolled back");
            JournalError::NoSpace {
                op: IoOp::Write,
                path,
                source: e,
            }
        } else {
            self.poison(JournalError::Io {
                op: IoOp::Write,
                path,
                source: e,
            })
        }
    }

    /// Append a batch and make it durable with one fdatasync. Returns the
    /// durable position.
    pub fn append_sync(&mut self, records: &[(RecordType, &[u8])]) -> Result<Position> {
        self.append_many(records)?;
        self.sync()
    }

    /// Make everything written so far durable (fdatasync of the active
    /// segment; sealed segments were synced when sealed) and advance the
    /// durable position. A no-op if nothing new was written.
    ///
    /// A failed fdatasync poisons the journal ([`JournalError::SyncFailed`]):
    /// it is never retried, because the kernel may have dropped the dirty
    /// pages and a retry could falsely succeed.
    pub fn sync(&mut self) -> Result<Position> {
        self.check_poisoned()?;
        if self.durable == self.written {
            return Ok(self.durable);
        }
        let target = self.written;
        match self.engine.sync(self.active_file.as_fd(), SyncKind::Data) {
            Ok(()) => {
                self.durable = target;
                self.metrics.syncs += 1;
                Ok(target)
            }
            Err(source) => {
                let path = self.active.path.clone();
                Err(self.poison(JournalError::SyncFailed { path, source }))
            }
        }
    }

    /// Seal the active segment (sync) and start a new one.
    fn roll_over(&mut self) -> Result<()> {
        self.sync()?;
        let number = self.active.number + 1;
        let prealloc = self.cfg.preallocate.then_some(self.cfg.segment_size);
        let (meta, file) = match create_segment(
            &self.dir,
            &self.dir_file,
            &mut *self.engine,
            number,
            self.active.next_seq,
            prealloc,
        ) {
            Ok(x) => x,
            Err(e @ JournalError::SyncFailed { .. }) => return Err(self.poison(e)),
            Err(e) => return Err(e),
        };
        let old = std::mem::replace(&mut self.active, meta);
        self.active_file = file;
        self.sealed.push_back(old);
        let pos = Position {
            segment: number,
            offset: self.active.len,
            next_seq: self.active.next_seq,
        };
        self.written = pos;
        self.durable = pos;
        self.metrics.segments_created += 1;
        self.metrics.live_segments = self.sealed.len() + 1;
        tracing::debug!(segment = number, "rolled over to new segment");
        Ok(())
    }

    /// Delete every sealed segment whose records all have sequence `<= seq`
    /// (call after those records were uploaded). The active segment is never
    /// deleted. Segments are removed oldest first with a directory fsync after
    /// each, so a crash leaves a contiguous suffix. Returns the number of
    /// segments deleted.
    pub fn trim_through(&mut self, seq: u64) -> Result<usize> {
        self.check_poisoned()?;
        let mut removed = 0;
        while let Some(front) = self.sealed.front() {
            if front.next_seq > seq.saturating_add(1) {
                break;
            }
            let path = front.path.clone();
            fs::remove_file(&path).map_err(io_err(IoOp::Remove, &path))?;
            self.sealed.pop_front();
            removed += 1;
            self.metrics.segments_trimmed += 1;
            self.metrics.live_segments = self.sealed.len() + 1;
            if let Err(source) = self.engine.sync(self.dir_file.as_fd(), SyncKind::All) {
                let path = self.dir.clone();
                return Err(self.poison(JournalError::SyncFailed { path, source }));
            }
            tracing::debug!(path = %path.display(), "trimmed segment");
        }
        Ok(removed)
    }

    /// Read durable records starting at sequence `from` (inclusive), verifying
    /// checksums while reading. The reader works on a snapshot of the durable
    /// range taken now and holds its own file handles, so it may be used while
    /// the journal keeps appending or trimming.
    pub fn read_from(&self, from: u64) -> Result<JournalReader> {
        let first = self.first_seq();
        if from < first {
            return Err(JournalError::Trimmed {
                requested: from,
                first_available: first,
            });
        }
        let end = self.durable.next_seq;
        if from > end {
            return Err(JournalError::BeyondEnd {
                requested: from,
                durable_next: end,
            });
        }
        let mut segs = VecDeque::new();
        for meta in self.sealed.iter().chain(std::iter::once(&self.active)) {
            let seg_end = meta.next_seq.min(end);
            if seg_end <= from || meta.first_seq >= end {
                continue;
            }
            let file = File::open(&meta.path).map_err(io_err(IoOp::Open, &meta.path))?;
            segs.push_back(ReaderSegment {
                number: meta.number,
                first_seq: meta.first_seq,
                end_seq: seg_end,
                path: meta.path.clone(),
                file,
            });
        }
        Ok(JournalReader::new(segs, from, end))
    }

    /// Free space of the journal's file system against the configured thresholds.
    pub fn space_status(&self) -> Result<SpaceStatus> {
        space_status(&self.dir, &self.cfg.space)
    }

    /// Like [`Journal::space_status`] but returns [`JournalError::LowSpace`]
    /// (back-pressure) when below a threshold.
    pub fn check_space(&self) -> Result<SpaceStatus> {
        let s = self.space_status()?;
        if s.below_threshold {
            return Err(JournalError::LowSpace {
                free_bytes: s.free_bytes,
                free_percent: s.free_percent,
            });
        }
        Ok(s)
    }

    /// Position after the last appended record (handed to the OS, maybe not durable).
    pub fn written(&self) -> Position {
        self.written
    }

    /// Position up to which everything is durable (fdatasync'd). Never ahead
    /// of [`Journal::written`]. Acknowledge only records below `durable().next_seq`.
    pub fn durable(&self) -> Position {
        self.durable
    }

    /// Oldest sequence number still in the journal.
    pub fn first_seq(&self) -> u64 {
        self.sealed.front().unwrap_or(&self.active).first_seq
    }

    /// Sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.written.next_seq
    }

    /// Counters since open.
    pub fn metrics(&self) -> Metrics {
        self.metrics
    }

    /// Engine in use.
    pub fn engine_kind(&self) -> EngineKind {
        self.metrics.engine
    }

    /// What recovery did at open.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Configuration in use.
    pub fn config(&self) -> &JournalConfig {
        &self.cfg
    }

    /// True if an earlier fatal error poisoned this instance.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Paths of the live segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.sealed
            .iter()
            .chain(std::iter::once(&self.active))
            .map(|m| m.path.clone())
            .collect()
    }
}

/// Crash-safe segment creation: write the header to `NNN.seg.tmp`, fsync it,
/// rename it to `NNN.seg`, fsync the directory. A crash leaves either no
/// segment or a complete one (plus maybe a temp file, removed at open).
pub(crate) fn create_segment(
    dir: &Path,
    dir_file: &File,
    engine: &mut dyn Engine,
    number: u64,
    first_seq: u64,
    preallocate: Option<u64>,
) -> Result<(SegmentMeta, File)> {
    let tmp = dir.join(temp_file_name(number));
    let path = dir.join(segment_file_name(number));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)
        .map_err(io_err(IoOp::Create, &tmp))?;
    let cleanup = |e: JournalError| {
        let _ = fs::remove_file(&tmp);
        e
    };
    let header = SegmentHeader { number, first_seq }.encode();
    write_all_at(engine, &file, &mut [IoSlice::new(&header)], 0)
        .map_err(io_err(IoOp::Write, &tmp))
        .map_err(cleanup)?;
    if let Some(size) = preallocate {
        let keep_size = nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if let Err(errno) = nix::fcntl::fallocate(&file, keep_size, 0, size as i64) {
            let e = io::Error::from(errno);
            if is_no_space(&e) {
                return Err(cleanup(io_err(IoOp::Create, &tmp)(e)));
            }
            tracing::debug!(error = %e, "fallocate unsupported; continuing without preallocation");
        }
    }
    engine
        .sync(file.as_fd(), SyncKind::All)
        .map_err(|source| JournalError::SyncFailed {
            path: tmp.clone(),
            source,
        })
        .map_err(cleanup)?;
    fs::rename(&tmp, &path)
        .map_err(io_err(IoOp::Rename, &tmp))
        .map_err(cleanup)?;
    engine
        .sync(dir_file.as_fd(), SyncKind::All)
        .map_err(|source| JournalError::SyncFailed {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok((
        SegmentMeta {
            number,
            first_seq,
            next_seq: first_seq,
            len: SEGMENT_HEADER_LEN as u64,
            path,
        },
        file,
    ))
}
