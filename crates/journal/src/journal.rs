//! The journal: open/recovery, append, group commit, trim.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::engine::{Engine, EngineChoice, EngineKind, MAX_IOVECS, SyncKind, select_engine};
use crate::error::{CorruptionKind, IoOp, JournalError, Result, is_no_space};
use crate::format::{
    HeaderError, MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN, RecordHeader, RecordType,
    SEGMENT_HEADER_LEN, SegmentHeader, TEMP_SUFFIX, find_valid_record, parse_segment_file_name,
    record_size, segment_file_name, temp_file_name,
};
use crate::reader::{JournalReader, ReaderSegment};
use crate::space::{SpaceStatus, SpaceThresholds, space_status};

/// Name of the lock file inside the journal directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Default segment roll-over size (64 MiB).
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// Smallest accepted `segment_size`.
pub const MIN_SEGMENT_SIZE: u64 = 4096;

/// How recovery treats invalid bytes at the end of the last segment.
///
/// Invalid bytes anywhere else (a non-last segment, a bad segment header, a
/// sequence gap) are always refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open if the last segment has any invalid tail bytes.
    Strict,
    /// Truncate a torn tail: invalid bytes at the end of the last segment that
    /// are followed by no valid record. If a valid record follows the first
    /// invalid one, that is mid-log corruption and opening is refused.
    #[default]
    TolerateTornTail,
    /// Operator override: truncate the last segment at the first invalid
    /// record even if valid records follow (discards them). Use only after
    /// inspecting a refused open; unsynced writes can legitimately reach disk
    /// out of order after a power loss, which `TolerateTornTail` refuses.
    TruncateCorruptTail,
}

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

/// What recovery found and did when the journal was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// True if the directory held no segment and a fresh journal was created.
    pub created: bool,
    /// Number of segments scanned.
    pub segments: usize,
    /// Number of valid records found.
    pub records: u64,
    /// First sequence number in the journal.
    pub first_seq: u64,
    /// Sequence number the next append will get.
    pub next_seq: u64,
    /// Bytes removed from the end of the last segment (torn tail).
    pub truncated_bytes: u64,
    /// File and offset at which the tail was truncated, if any.
    pub truncated_at: Option<(PathBuf, u64)>,
    /// Leftover temporary segment files deleted.
    pub removed_temp_files: Vec<PathBuf>,
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

fn io_err(op: IoOp, path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
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

fn corrupt(path: &Path, offset: u64, kind: CorruptionKind) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        kind,
    }
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
    /// Open (or create) the journal in `dir`, selecting the IO engine per
    /// `cfg.engine`, and run recovery (see [`RecoveryMode`]).
    pub fn open(dir: impl AsRef<Path>, cfg: JournalConfig) -> Result<Journal> {
        let engine = select_engine(cfg.engine, cfg.uring_entries)?;
        Self::open_with_engine(dir, cfg, engine)
    }

    /// Open with a caller-supplied engine (e.g. a fault-injecting wrapper
    /// around [`SyncEngine`](crate::SyncEngine) or [`UringEngine`](crate::UringEngine)).
    /// `cfg.engine` is ignored.
    pub fn open_with_engine(
        dir: impl AsRef<Path>,
        cfg: JournalConfig,
        mut engine: Box<dyn Engine>,
    ) -> Result<Journal> {
        if cfg.segment_size < MIN_SEGMENT_SIZE {
            return Err(JournalError::InvalidConfig("segment_size below 4096 bytes"));
        }
        if !(0.0..=100.0).contains(&cfg.space.min_free_percent) {
            return Err(JournalError::InvalidConfig(
                "space.min_free_percent outside 0..=100",
            ));
        }
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(IoOp::Create, &dir))?;
        let dir_file = File::open(&dir).map_err(io_err(IoOp::Open, &dir))?;
        let lock = Self::lock_dir(&dir)?;

        let mut report = RecoveryReport::default();
        let mut numbers = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(IoOp::Read, &dir))? {
            let entry = entry.map_err(io_err(IoOp::Read, &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TEMP_SUFFIX) {
                let p = entry.path();
                tracing::warn!(path = %p.display(), "removing leftover temporary segment file");
                fs::remove_file(&p).map_err(io_err(IoOp::Remove, &p))?;
                report.removed_temp_files.push(p);
            } else if let Some(n) = parse_segment_file_name(name) {
                numbers.push(n);
            } else if name != LOCK_FILE_NAME {
                tracing::warn!(file = name, "ignoring unknown file in journal directory");
            }
        }
        numbers.sort_unstable();
        if !report.removed_temp_files.is_empty() {
            engine
                .sync(dir_file.as_fd(), SyncKind::All)
                .map_err(|source| JournalError::SyncFailed {
                    path: dir.clone(),
                    source,
                })?;
        }

        let mut metrics = Metrics {
            bytes_written: 0,
            records_appended: 0,
            syncs: 0,
            segments_created: 0,
            segments_trimmed: 0,
            live_segments: 0,
            engine: engine.kind(),
        };

        let mut sealed = VecDeque::new();
        let (active, active_file) = if numbers.is_empty() {
            report.created = true;
            metrics.segments_created += 1;
            create_segment(&dir, &dir_file, &mut *engine, 1, 1, None)?
        } else {
            let mut expected_seq = None;
            let mut last = None;
            for (i, &number) in numbers.iter().enumerate() {
                let path = dir.join(segment_file_name(number));
                if i > 0 && number != numbers[i - 1] + 1 {
                    return Err(JournalError::MissingSegment {
                        path,
                        expected: numbers[i - 1] + 1,
                        found: number,
                    });
                }
                let is_last = i + 1 == numbers.len();
                let (meta, file) = scan_segment(
                    path,
                    number,
                    expected_seq,
                    is_last,
                    cfg.recovery,
                    &mut *engine,
                    &mut report,
                )?;
                report.records += meta.next_seq - meta.first_seq;
                expected_seq = Some(meta.next_seq);
                if is_last {
                    last = Some((meta, file));
                } else {
                    sealed.push_back(meta);
                }
            }
            let (meta, file) = last.expect("at least one segment");
            // Anything recovered may still be only in the page cache (after a
            // process crash): make it durable before calling it durable.
            engine
                .sync(file.as_fd(), SyncKind::Data)
                .map_err(|source| JournalError::SyncFailed {
                    path: meta.path.clone(),
                    source,
                })?;
            (meta, file)
        };
        report.segments = sealed.len() + 1;
        report.first_seq = sealed.front().unwrap_or(&active).first_seq;
        report.next_seq = active.next_seq;
        metrics.live_segments = sealed.len() + 1;
        let pos = Position {
            segment: active.number,
            offset: active.len,
            next_seq: active.next_seq,
        };
        tracing::info!(
            dir = %dir.display(),
            engine = ?metrics.engine,
            segments = report.segments,
            records = report.records,
            next_seq = report.next_seq,
            truncated_bytes = report.truncated_bytes,
            "journal opened"
        );
        Ok(Journal {
            dir,
            dir_file,
            _lock: lock,
            cfg,
            engine,
            sealed,
            active,
            active_file,
            written: pos,
            durable: pos,
            poisoned: None,
            metrics,
            report,
        })
    }

    fn lock_dir(dir: &Path) -> Result<File> {
        let path = dir.join(LOCK_FILE_NAME);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(IoOp::Lock, &path))?;
        // An exclusive flock(2), held as long as `f` is open.
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(IoOp::Lock, &path)(e)),
        }
        Ok(f)
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
        let segment = self.active.number;
        let headers: Vec<[u8; RECORD_HEADER_LEN]> = records
            .iter()
            .enumerate()
            .map(|(i, (k, p))| RecordHeader::encode(segment, *k, first_seq + i as u64, p))
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
fn create_segment(
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

/// Verify one segment. For the last segment apply the recovery mode to an
/// invalid tail; anywhere else any invalid byte is an error.
fn scan_segment(
    path: PathBuf,
    number: u64,
    expected_first_seq: Option<u64>,
    is_last: bool,
    mode: RecoveryMode,
    engine: &mut dyn Engine,
    report: &mut RecoveryReport,
) -> Result<(SegmentMeta, File)> {
    let file = OpenOptions::new()
        .read(true)
        .write(is_last)
        .open(&path)
        .map_err(io_err(IoOp::Open, &path))?;
    let file_len = file.metadata().map_err(io_err(IoOp::Read, &path))?.len();
    let mut hb = [0u8; SEGMENT_HEADER_LEN];
    if file_len < SEGMENT_HEADER_LEN as u64 {
        return Err(corrupt(&path, 0, CorruptionKind::TruncatedHeader));
    }
    file.read_exact_at(&mut hb, 0)
        .map_err(io_err(IoOp::Read, &path))?;
    let header = SegmentHeader::decode(&hb).map_err(|e| {
        let kind = match e {
            HeaderError::BadMagic => CorruptionKind::BadMagic,
            HeaderError::Version(v) => CorruptionKind::UnsupportedVersion(v),
            HeaderError::Checksum => CorruptionKind::BadHeaderChecksum,
        };
        corrupt(&path, 0, kind)
    })?;
    if header.number != number {
        return Err(corrupt(
            &path,
            0,
            CorruptionKind::SegmentNumberMismatch {
                expected: number,
                found: header.number,
            },
        ));
    }
    if let Some(expected) = expected_first_seq
        && header.first_seq != expected
    {
        return Err(JournalError::SequenceGap {
            path,
            expected,
            found: header.first_seq,
        });
    }

    let mut reader = BufReader::with_capacity(1 << 20, &file);
    reader
        .seek(SeekFrom::Start(SEGMENT_HEADER_LEN as u64))
        .map_err(io_err(IoOp::Read, &path))?;
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut next_seq = header.first_seq;
    let mut payload = Vec::new();
    let mut rh = [0u8; RECORD_HEADER_LEN];
    let bad: Option<CorruptionKind> = loop {
        if pos == file_len {
            break None;
        }
        if file_len - pos < RECORD_HEADER_LEN as u64 {
            break Some(CorruptionKind::Truncated);
        }
        reader
            .read_exact(&mut rh)
            .map_err(io_err(IoOp::Read, &path))?;
        let Some(h) = RecordHeader::decode(&rh) else {
            break Some(CorruptionKind::BadRecordHeader);
        };
        let rec_end = pos + record_size(h.len as usize);
        if rec_end > file_len {
            break Some(CorruptionKind::Truncated);
        }
        payload.resize(h.len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(io_err(IoOp::Read, &path))?;
        if !h.verify(number, &rh, &payload) {
            break Some(CorruptionKind::BadChecksum);
        }
        if h.seq != next_seq {
            // A checksum-valid record with the wrong sequence is never a torn write.
            if !(is_last && mode == RecoveryMode::TruncateCorruptTail) {
                return Err(corrupt(
                    &path,
                    pos,
                    CorruptionKind::SequenceMismatch {
                        expected: next_seq,
                        found: h.seq,
                    },
                ));
            }
            break Some(CorruptionKind::SequenceMismatch {
                expected: next_seq,
                found: h.seq,
            });
        }
        next_seq += 1;
        pos = rec_end;
    };
    drop(reader);

    if let Some(kind) = bad {
        if !is_last {
            return Err(corrupt(&path, pos, kind));
        }
        let tail_len = file_len - pos;
        if mode != RecoveryMode::TruncateCorruptTail {
            // Is anything valid after the first bad byte? Then it is not a torn tail.
            let rest_len = usize::try_from(tail_len - 1).map_err(|_| {
                corrupt(
                    &path,
                    pos,
                    CorruptionKind::TornTailInStrictMode { bytes: tail_len },
                )
            })?;
            let mut rest = vec![0u8; rest_len];
            file.read_exact_at(&mut rest, pos + 1)
                .map_err(io_err(IoOp::Read, &path))?;
            if let Some(off) = find_valid_record(number, &rest, pos + 1) {
                return Err(corrupt(
                    &path,
                    pos,
                    CorruptionKind::ValidRecordAfterCorruption {
                        next_valid_offset: off,
                    },
                ));
            }
            if mode == RecoveryMode::Strict {
                return Err(corrupt(
                    &path,
                    pos,
                    CorruptionKind::TornTailInStrictMode { bytes: tail_len },
                ));
            }
        }
        tracing::warn!(
            path = %path.display(),
            offset = pos,
            bytes = tail_len,
            reason = %kind,
            "truncating torn tail of last journal segment"
        );
        file.set_len(pos).map_err(io_err(IoOp::Truncate, &path))?;
        engine
            .sync(file.as_fd(), SyncKind::All)
            .map_err(|source| JournalError::SyncFailed {
                path: path.clone(),
                source,
            })?;
        report.truncated_bytes += tail_len;
        report.truncated_at = Some((path.clone(), pos));
    }
    Ok((
        SegmentMeta {
            number,
            first_seq: header.first_seq,
            next_seq,
            len: pos,
            path,
        },
        file,
    ))
}
