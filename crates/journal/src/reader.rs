//! Verified sequential reading (replay and upload).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{CorruptionKind, IoOp, JournalError, Result};
use crate::format::{
    RECORD_HEADER_LEN, RecordHeader, RecordType, SEGMENT_HEADER_LEN, SegmentHeader, record_size,
};

/// A record read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// Record type.
    pub kind: RecordType,
    /// Payload bytes (checksum verified).
    pub payload: Vec<u8>,
}

pub(crate) struct ReaderSegment {
    pub number: u64,
    pub first_seq: u64,
    /// One past the last sequence to read from this segment.
    pub end_seq: u64,
    pub path: PathBuf,
    pub file: File,
}

/// Iterator over durable records from a starting sequence, created by
/// [`Journal::read_from`](crate::Journal::read_from). Yields
/// `Err(JournalError::Corrupt { .. })` (and then stops) if a record fails
/// verification. Records before the start sequence in the first segment are
/// skipped by header only (their payloads are not read).
pub struct JournalReader {
    segs: VecDeque<ReaderSegment>,
    next_seq: u64,
    start_seq: u64,
    end_seq: u64,
    offset: u64,
    failed: bool,
}

impl std::fmt::Debug for JournalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalReader")
            .field("next_seq", &self.next_seq)
            .field("end_seq", &self.end_seq)
            .finish_non_exhaustive()
    }
}

fn corrupt(path: &Path, offset: u64, kind: CorruptionKind) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        kind,
    }
}

impl JournalReader {
    pub(crate) fn new(segs: VecDeque<ReaderSegment>, start_seq: u64, end_seq: u64) -> Self {
        let next_seq = segs.front().map_or(start_seq, |s| s.first_seq);
        JournalReader {
            segs,
            next_seq,
            start_seq,
            end_seq,
            offset: 0,
            failed: false,
        }
    }

    /// One past the last sequence number this reader will return.
    pub fn end_seq(&self) -> u64 {
        self.end_seq
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            if self.next_seq >= self.end_seq {
                return Ok(None);
            }
            let Some(seg) = self.segs.front() else {
                return Ok(None);
            };
            if self.next_seq >= seg.end_seq {
                self.segs.pop_front();
                self.offset = 0;
                continue;
            }
            let read_err = |source| JournalError::Io {
                op: IoOp::Read,
                path: seg.path.clone(),
                source,
            };
            if self.offset == 0 {
                let mut hb = [0u8; SEGMENT_HEADER_LEN];
                seg.file.read_exact_at(&mut hb, 0).map_err(read_err)?;
                match SegmentHeader::decode(&hb) {
                    Ok(h) if h.number == seg.number && h.first_seq == seg.first_seq => {}
                    _ => return Err(corrupt(&seg.path, 0, CorruptionKind::BadHeaderChecksum)),
                }
                self.offset = SEGMENT_HEADER_LEN as u64;
                self.next_seq = seg.first_seq;
            }
            let at = self.offset;
            let mut rh = [0u8; RECORD_HEADER_LEN];
            if let Err(e) = seg.file.read_exact_at(&mut rh, at) {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    return Err(corrupt(&seg.path, at, CorruptionKind::Truncated));
                }
                return Err(read_err(e));
            }
            let Some(h) = RecordHeader::decode(&rh) else {
                return Err(corrupt(&seg.path, at, CorruptionKind::BadRecordHeader));
            };
            if h.seq != self.next_seq {
                return Err(corrupt(
                    &seg.path,
                    at,
                    CorruptionKind::SequenceMismatch {
                        expected: self.next_seq,
                        found: h.seq,
                    },
                ));
            }
            self.offset = at + record_size(h.len as usize);
            self.next_seq += 1;
            if h.seq < self.start_seq {
                continue;
            }
            let mut payload = vec![0u8; h.len as usize];
            if let Err(e) = seg
                .file
                .read_exact_at(&mut payload, at + RECORD_HEADER_LEN as u64)
            {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    return Err(corrupt(&seg.path, at, CorruptionKind::Truncated));
                }
                return Err(read_err(e));
            }
            if !h.verify(seg.number, &rh, &payload) {
                return Err(corrupt(&seg.path, at, CorruptionKind::BadChecksum));
            }
            return Ok(Some(Record {
                seq: h.seq,
                kind: h.kind,
                payload,
            }));
        }
    }
}

impl Iterator for JournalReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_record() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
