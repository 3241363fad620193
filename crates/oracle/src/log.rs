//! The workload log: what was submitted when, and when it completed.
//!
//! Binary, little-endian, length-checked. A 64-byte header:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8 | magic `RCORLOG\0` |
//! | 8  | 4 | version (1) |
//! | 12 | 4 | block size (4096) |
//! | 16 | 8 | run id |
//! | 24 | 8 | region start (blocks) |
//! | 32 | 8 | region length (blocks) |
//! | 40 | 8 | workload start time (CLOCK_MONOTONIC ns) |
//! | 48 | 12 | reserved, zero |
//! | 60 | 4 | CRC32C of bytes 0..60 |
//!
//! followed by records `type u8, len u8, payload[len], crc32c u32` (CRC over type, len and
//! payload). Each op produces two records, appended in the order the events happened:
//!
//! * `1` Submit (len 32): kind u8 (1 write, 2 flush, 3 discard), 3 zero bytes, block count
//!   u32, seq u64, first block u64, submit_ns u64. Written just before the op is handed to
//!   the kernel; `submit_ns` is read before that.
//! * `2` Complete (len 20): seq u64, complete_ns u64, result i32 (bytes written, or 0 for
//!   flush/discard, or `-errno`). `complete_ns` is read after the completion was reaped.
//! * `3` End (len 16): end_ns u64, number of ops u64. Written once all ops completed.
//!
//! Seqs of Submit records strictly increase and all timestamps are non-decreasing in file
//! order (a single thread takes them in that order).
//!
//! ## Lost tail
//! The workload writes the log through a buffer flushed every 100 ms, so a crash loses a
//! suffix of the event stream, possibly leaving a partial record. The decoder drops an
//! incomplete final record (or a final record whose CRC fails) and reports it in
//! [`Log::torn_tail_bytes`]; damage anywhere else is an error.
//!
//! What that means for checking: because the log is a *prefix* of the events in time order,
//! every lost Submit record belongs to an op submitted at or after [`Log::last_event_ns`].
//! Treating such ops as never submitted is therefore exact for any `T <= last_event_ns`
//! (they would be "future" at `T` anyway, and a block holding one is classified `future`
//! because its seq is beyond every logged seq). For `T > last_event_ns` of a log without an
//! End record nothing can be said, and the checker refuses ([`crate::Error::TimeBeyondLog`]).
//! An op whose Submit survived but whose Complete was lost is treated as never completed,
//! i.e. in flight forever after submission: that allows old *or* new content, which is what
//! the device could hold.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use crate::error::{Error, LogError};
use crate::region::Region;

/// Log file magic.
pub const LOG_MAGIC: [u8; 8] = *b"RCORLOG\0";
/// Current log version.
pub const LOG_VERSION: u32 = 1;
/// Header size in bytes.
pub const LOG_HEADER_LEN: usize = 64;
/// Largest write (in blocks) the decoder accepts.
pub const MAX_WRITE_BLOCKS: u32 = 1024;
/// Largest region (in blocks) the decoder accepts (4 PiB).
pub const MAX_REGION_BLOCKS: u64 = 1 << 40;

const REC_SUBMIT: u8 = 1;
const REC_COMPLETE: u8 = 2;
const REC_END: u8 = 3;
const SUBMIT_LEN: u8 = 32;
const COMPLETE_LEN: u8 = 20;
const END_LEN: u8 = 16;

/// Kind of an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// A write of stamped blocks.
    Write,
    /// fdatasync of the device.
    Flush,
    /// BLKDISCARD of a range (reads back as zeroes).
    Discard,
}

impl OpKind {
    fn code(self) -> u8 {
        match self {
            OpKind::Write => 1,
            OpKind::Flush => 2,
            OpKind::Discard => 3,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => OpKind::Write,
            2 => OpKind::Flush,
            3 => OpKind::Discard,
            _ => return None,
        })
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
        })
    }
}

/// Decoded log header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    /// Run id stamped into every block.
    pub run_id: u64,
    /// The region the workload used.
    pub region: Region,
    /// CLOCK_MONOTONIC ns when the workload started.
    pub start_ns: u64,
}

/// One op, assembled from its Submit and (if present) Complete records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Kind.
    pub kind: OpKind,
    /// Global sequence number (assigned at submission, increasing).
    pub seq: u64,
    /// First block (0 for flushes).
    pub first_block: u64,
    /// Number of blocks (0 for flushes).
    pub block_count: u32,
    /// CLOCK_MONOTONIC ns read before submission.
    pub submit_ns: u64,
    /// CLOCK_MONOTONIC ns read after the completion was reaped; `None` if never logged.
    pub complete_ns: Option<u64>,
    /// Kernel result; `None` if never logged.
    pub result: Option<i32>,
}

impl Op {
    /// Whether the op completed and fully succeeded.
    pub fn ok(&self) -> bool {
        match (self.kind, self.result) {
            (OpKind::Write, Some(r)) => r as i64 == self.block_count as i64 * 4096,
            (_, Some(r)) => r == 0,
            (_, None) => false,
        }
    }
    /// Whether the op covers `block`.
    pub fn touches(&self, block: u64) -> bool {
        block >= self.first_block && block < self.first_block + self.block_count as u64
    }
}

/// A decoded log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Header.
    pub header: LogHeader,
    /// All ops, sorted by seq.
    pub ops: Vec<Op>,
    /// Time of the End record, if the workload ended cleanly.
    pub end_ns: Option<u64>,
    /// Latest timestamp in the log (start time if there are no records).
    pub last_event_ns: u64,
    /// Bytes of a damaged final record that were dropped (0 if none).
    pub torn_tail_bytes: u64,
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Log {
    /// Decodes a log from a stream. Sizes are bounded, garbage is rejected with an error, a
    /// torn final record is dropped (see the module docs for why that is safe).
    pub fn read(mut r: impl Read) -> Result<Log, LogError> {
        let mut h = [0u8; LOG_HEADER_LEN];
        if read_full(&mut r, &mut h)? < LOG_HEADER_LEN || h[0..8] != LOG_MAGIC {
            return Err(LogError::NotALog);
        }
        let version = u32_at(&h, 8);
        if version != LOG_VERSION {
            return Err(LogError::Version(version));
        }
        if crc32c::crc32c(&h[..60]) != u32_at(&h, 60) {
            return Err(LogError::Header("header CRC mismatch".into()));
        }
        let bs = u32_at(&h, 12);
        if bs != 4096 {
            return Err(LogError::Header(format!("block size {bs}, expected 4096")));
        }
        let region = Region {
            start: u64_at(&h, 24),
            len: u64_at(&h, 32),
        };
        if region.len == 0
            || region.len > MAX_REGION_BLOCKS
            || region
                .start
                .checked_add(region.len)
                .is_none_or(|e| e > MAX_REGION_BLOCKS * 4)
        {
            return Err(LogError::Header(format!("implausible region {region}")));
        }
        let header = LogHeader {
            run_id: u64_at(&h, 16),
            region,
            start_ns: u64_at(&h, 40),
        };
        let mut log = Log {
            header,
            ops: Vec::new(),
            end_ns: None,
            last_event_ns: header.start_ns,
            torn_tail_bytes: 0,
        };
        let mut offset = LOG_HEADER_LEN as u64;
        let mut rec = [0u8; 2 + 255 + 4];
        let mut completed = 0u64;
        loop {
            let n = read_full(&mut r, &mut rec[..2])?;
            if n == 0 {
                break;
            }
            let corrupt = |reason: String| LogError::Corrupt { offset, reason };
            let bad = |reason: String| LogError::Inconsistent { offset, reason };
            if n < 2 {
                log.torn_tail_bytes = n as u64;
                break;
            }
            let (ty, len) = (rec[0], rec[1]);
            let want = match ty {
                REC_SUBMIT => SUBMIT_LEN,
                REC_COMPLETE => COMPLETE_LEN,
                REC_END => END_LEN,
                _ => return Err(corrupt(format!("unknown record type {ty}"))),
            };
            if len != want {
                return Err(corrupt(format!(
                    "record type {ty} has length {len}, expected {want}"
                )));
            }
            let total = 2 + len as usize + 4;
            let got = read_full(&mut r, &mut rec[2..total])?;
            if got < total - 2 {
                log.torn_tail_bytes = (2 + got) as u64;
                break;
            }
            if crc32c::crc32c(&rec[..total - 4]) != u32_at(&rec, total - 4) {
                let mut probe = [0u8; 1];
                if read_full(&mut r, &mut probe)? == 0 {
                    log.torn_tail_bytes = total as u64;
                    break;
                }
                return Err(corrupt("record CRC mismatch".into()));
            }
            if log.end_ns.is_some() {
                return Err(bad("record after End".into()));
            }
            let p = &rec[2..2 + len as usize];
            let ts = match ty {
                REC_SUBMIT => {
                    let kind = OpKind::from_code(p[0])
                        .ok_or_else(|| corrupt(format!("unknown op kind {}", p[0])))?;
                    let op = Op {
                        kind,
                        block_count: u32_at(p, 4),
                        seq: u64_at(p, 8),
                        first_block: u64_at(p, 16),
                        submit_ns: u64_at(p, 24),
                        complete_ns: None,
                        result: None,
                    };
                    if let Some(prev) = log.ops.last()
                        && op.seq <= prev.seq
                    {
                        return Err(bad(format!("seq {} not after seq {}", op.seq, prev.seq)));
                    }
                    let range = Region {
                        start: op.first_block,
                        len: op.block_count as u64,
                    };
                    match kind {
                        OpKind::Flush if op.block_count != 0 || op.first_block != 0 => {
                            return Err(bad(format!("flush seq {} has a block range", op.seq)));
                        }
                        OpKind::Flush => {}
                        _ if op.block_count == 0
                            || (kind == OpKind::Write && op.block_count > MAX_WRITE_BLOCKS)
                            || op.first_block.checked_add(op.block_count as u64).is_none()
                            || !range.within(&region) =>
                        {
                            return Err(bad(format!(
                                "{kind} seq {} range {range} outside region {region} or too large",
                                op.seq
                            )));
                        }
                        _ => {}
                    }
                    log.ops.push(op);
                    op.submit_ns
                }
                REC_COMPLETE => {
                    let seq = u64_at(p, 0);
                    let t = u64_at(p, 8);
                    let res = u32_at(p, 16) as i32;
                    let i = log
                        .ops
                        .binary_search_by_key(&seq, |o| o.seq)
                        .map_err(|_| bad(format!("completion of unknown seq {seq}")))?;
                    let op = &mut log.ops[i];
                    if op.complete_ns.is_some() {
                        return Err(bad(format!("seq {seq} completed twice")));
                    }
                    if t < op.submit_ns {
                        return Err(bad(format!("seq {seq} completes before it was submitted")));
                    }
                    op.complete_ns = Some(t);
                    op.result = Some(res);
                    completed += 1;
                    t
                }
                _ => {
                    let t = u64_at(p, 0);
                    let n = u64_at(p, 8);
                    if n != log.ops.len() as u64 || completed != n {
                        return Err(bad(format!(
                            "End says {n} ops; log has {} submitted, {completed} completed",
                            log.ops.len()
                        )));
                    }
                    log.end_ns = Some(t);
                    t
                }
            };
            if ts < log.last_event_ns {
                return Err(bad(format!(
                    "timestamp {ts} goes backwards (after {})",
                    log.last_event_ns
                )));
            }
            log.last_event_ns = ts;
            offset += total as u64;
        }
        Ok(log)
    }

    /// Decodes a log from a byte slice.
    pub fn from_bytes(b: &[u8]) -> Result<Log, LogError> {
        Log::read(b)
    }

    /// Opens and decodes the log at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Log, Error> {
        let path = path.as_ref();
        let f = File::open(path)
            .map_err(|e| Error::io(format!("opening log {}", path.display()), e))?;
        Log::read(BufReader::with_capacity(1 << 20, f)).map_err(|source| Error::Log {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Index into [`Log::ops`] of the op with `seq`.
    pub fn op_index(&self, seq: u64) -> Option<usize> {
        self.ops.binary_search_by_key(&seq, |o| o.seq).ok()
    }

    /// Whether the workload wrote its End record.
    pub fn ended_cleanly(&self) -> bool {
        self.end_ns.is_some()
    }
}

/// Encodes a log. Callers must append events in time order (the decoder enforces it).
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    w: W,
}

impl<W: Write> LogWriter<W> {
    /// Writes the header.
    pub fn new(mut w: W, header: &LogHeader) -> std::io::Result<Self> {
        let mut h = [0u8; LOG_HEADER_LEN];
        h[0..8].copy_from_slice(&LOG_MAGIC);
        h[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&4096u32.to_le_bytes());
        h[16..24].copy_from_slice(&header.run_id.to_le_bytes());
        h[24..32].copy_from_slice(&header.region.start.to_le_bytes());
        h[32..40].copy_from_slice(&header.region.len.to_le_bytes());
        h[40..48].copy_from_slice(&header.start_ns.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        w.write_all(&h)?;
        Ok(LogWriter { w })
    }

    fn record(&mut self, ty: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut r = [0u8; 2 + 255 + 4];
        r[0] = ty;
        r[1] = payload.len() as u8;
        r[2..2 + payload.len()].copy_from_slice(payload);
        let n = 2 + payload.len();
        let crc = crc32c::crc32c(&r[..n]);
        r[n..n + 4].copy_from_slice(&crc.to_le_bytes());
        self.w.write_all(&r[..n + 4])
    }

    /// Appends a Submit record.
    pub fn submit(
        &mut self,
        kind: OpKind,
        seq: u64,
        first_block: u64,
        block_count: u32,
        submit_ns: u64,
    ) -> std::io::Result<()> {
        let mut p = [0u8; SUBMIT_LEN as usize];
        p[0] = kind.code();
        p[4..8].copy_from_slice(&block_count.to_le_bytes());
        p[8..16].copy_from_slice(&seq.to_le_bytes());
        p[16..24].copy_from_slice(&first_block.to_le_bytes());
        p[24..32].copy_from_slice(&submit_ns.to_le_bytes());
        self.record(REC_SUBMIT, &p)
    }

    /// Appends a Complete record.
    pub fn complete(&mut self, seq: u64, complete_ns: u64, result: i32) -> std::io::Result<()> {
        let mut p = [0u8; COMPLETE_LEN as usize];
        p[0..8].copy_from_slice(&seq.to_le_bytes());
        p[8..16].copy_from_slice(&complete_ns.to_le_bytes());
        p[16..20].copy_from_slice(&result.to_le_bytes());
        self.record(REC_COMPLETE, &p)
    }

    /// Appends the End record.
    pub fn end(&mut self, end_ns: u64, ops: u64) -> std::io::Result<()> {
        let mut p = [0u8; END_LEN as usize];
        p[0..8].copy_from_slice(&end_ns.to_le_bytes());
        p[8..16].copy_from_slice(&ops.to_le_bytes());
        self.record(REC_END, &p)
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }

    /// Returns the underlying writer.
    pub fn into_inner(self) -> W {
        self.w
    }
}
