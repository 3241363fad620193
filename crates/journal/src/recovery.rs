//! Recovery: opening a journal directory and rebuilding the in-memory state
//! of a [`Journal`] from the segment files on disk.
//!
//! [`Journal::open`] / [`Journal::open_with_engine`] validate the
//! configuration, take the directory lock, remove leftover temporary
//! segment files, then scan every segment in order: its header (magic,
//! version, checksum, segment number, first sequence continuing the previous
//! segment), then every record (header, checksum mixed with the segment
//! number, sequence). Invalid bytes at the end of the last segment are
//! handled per [`RecoveryMode`]; invalid bytes anywhere else, a missing
//! segment or a sequence gap refuse the open. What was recovered is
//! synced before it is called durable, and the result is handed to the live
//! journal ([`Recovered`] -> [`Journal::from_recovered`]).
//!
//! This runs once per open and nothing here is on the append path: the live
//! journal (append, group commit, roll-over, trim, reads) is in `journal.rs`,
//! as raft-engine keeps rebuilding from files (`pipe_builder.rs`) apart from
//! the live log (`pipe.rs`).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::engine::{Engine, SyncKind, select_engine};
use crate::error::{CorruptionKind, IoOp, JournalError, Result, io_err};
use crate::format::{
    HeaderError, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader, TEMP_SUFFIX,
    find_valid_record, parse_segment_file_name, record_size, segment_file_name,
};
use crate::journal::{
    Journal, JournalConfig, MIN_SEGMENT_SIZE, Metrics, Recovered, SegmentMeta, create_segment,
};

/// Name of the lock file inside the journal directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// How recovery treats invalid bytes at the end of the last segment.
///
/// Invalid bytes anywhere else (a non-last segment, a bad segment header, a
/// sequence gap) are always refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open if the last segment has any invalid tail bytes.
    Strict,
    /// Truncate a torn tail: invalid bytes at the end of the last segment,
    /// with any valid records after them that belong to the same unfinished
    /// group commit (their headers show the invalid record was not durable when
    /// they were appended: later pages persisted first at a power cut). A valid
    /// record showing the invalid one was durable means acknowledged data was
    /// damaged: opening is refused.
    #[default]
    TolerateTornTail,
    /// Operator override: truncate the last segment at the first invalid
    /// record even if valid records follow that show it was durable (discards
    /// acknowledged records). Use only after inspecting a refused open.
    TruncateCorruptTail,
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
    /// Valid records dropped with a torn tail because they followed a torn region of
    /// the same unfinished group commit (never durable, never acknowledged).
    pub dropped_after_tear: u64,
    /// Leftover temporary segment files deleted.
    pub removed_temp_files: Vec<PathBuf>,
    /// Files that are neither segments, the lock, nor the owner's companion files
    /// ([`crate::JournalConfig::companion_files`]): left alone, and logged.
    pub unknown_files: Vec<PathBuf>,
}

/// Whether `name` is one of the owner's `companions`, or the temporary name one has while
/// it is replaced atomically (`.<companion>.tmp.*`).
fn is_companion(name: &str, companions: &[&str]) -> bool {
    companions.iter().any(|c| {
        name == *c
            || name
                .strip_prefix('.')
                .and_then(|n| n.strip_prefix(*c))
                .is_some_and(|rest| rest.starts_with(".tmp."))
    })
}

fn corrupt(path: &Path, offset: u64, kind: CorruptionKind) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        kind,
    }
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
        let lock = lock_dir(&dir)?;

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
            } else if name != LOCK_FILE_NAME && !is_companion(name, cfg.companion_files) {
                tracing::warn!(
                    path = %entry.path().display(),
                    "ignoring a file that is neither a journal segment nor the journal owner's"
                );
                report.unknown_files.push(entry.path());
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
        tracing::info!(
            dir = %dir.display(),
            engine = ?metrics.engine,
            segments = report.segments,
            records = report.records,
            next_seq = report.next_seq,
            truncated_bytes = report.truncated_bytes,
            "journal opened"
        );
        Ok(Journal::from_recovered(Recovered {
            dir,
            dir_file,
            lock,
            cfg,
            engine,
            sealed,
            active,
            active_file,
            metrics,
            report,
        }))
    }
}

/// Takes the journal directory's exclusive lock (`flock` on [`LOCK_FILE_NAME`]),
/// held for the journal's lifetime; a second opener gets [`JournalError::Locked`].
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

/// Every complete, checksum-valid record in `buf` (file offset `base`), in order.
fn valid_records(segment: u64, buf: &[u8], base: u64) -> Vec<(u64, RecordHeader)> {
    let mut found = Vec::new();
    let mut from = 0usize;
    while let Some(off) = find_valid_record(segment, &buf[from..], base + from as u64) {
        let at = (off - base) as usize;
        let Some(h) = RecordHeader::decode(&buf[at..at + RECORD_HEADER_LEN]) else {
            break;
        };
        found.push((off, h));
        from = at + record_size(h.len as usize) as usize;
    }
    found
}

/// Whether `gap` (file offset `base`) holds a whole 512-byte-aligned sector of zeros: a
/// region the file system never wrote. That is what a power cut leaves where later pages
/// of a write persisted and earlier ones did not (segment space reads as zeros until
/// written); a flipped or garbled byte in written data does not look like that (record
/// payloads are sealed, so never a whole zero sector).
fn has_unwritten_sector(gap: &[u8], base: u64) -> bool {
    let first = (base.next_multiple_of(512) - base) as usize;
    gap.get(first..)
        .is_some_and(|g| g.chunks_exact(512).any(|s| s.iter().all(|&b| b == 0)))
}

/// Whether `later`, a valid record found after the invalid (torn, see
/// [`has_unwritten_sector`]) record that would have had sequence `torn_seq`, is consistent
/// with the invalid record never having been durable: `later` was appended
/// while every record from `seq - unsynced_before` on was not yet durable, and the torn
/// one is among them. Then the torn record, and `later` with it, belong to a group commit
/// whose fdatasync never completed: none was acknowledged, and dropping them loses
/// nothing. If `later` says the torn record was durable, the damage is to acknowledged
/// data: refused (the disk is quarantined, nothing is silently dropped).
fn torn_group_commit(torn_seq: u64, later: &RecordHeader) -> bool {
    later.seq > torn_seq && later.seq - u64::from(later.unsynced_before) <= torn_seq
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
            let later = valid_records(number, &rest, pos + 1);
            // The bytes from the bad record to the first valid one after it.
            let gap_end = later.first().map_or(file_len, |&(off, _)| off);
            let gap = &rest[..(gap_end - pos - 1) as usize];
            let torn = has_unwritten_sector(gap, pos + 1);
            if let Some(&(off, _)) = later.iter().find(|(_, h)| {
                !torn || !torn_group_commit(next_seq, h) || mode == RecoveryMode::Strict
            }) {
                return Err(corrupt(
                    &path,
                    pos,
                    CorruptionKind::ValidRecordAfterCorruption {
                        next_valid_offset: off,
                    },
                ));
            }
            if !later.is_empty() {
                tracing::warn!(
                    path = %path.display(),
                    offset = pos,
                    records = later.len(),
                    "dropping {} records written after a torn region of the last group \
                     commit: a power cut persisted later pages before earlier ones, and none \
                     of them was ever durable (so none was acknowledged)",
                    later.len()
                );
                report.dropped_after_tear += later.len() as u64;
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
