//! Shared test helpers: engine parametrisation, fault injection, file parsing.
#![allow(dead_code)]

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ripcord_journal::{
    Engine, EngineChoice, EngineKind, Journal, JournalConfig, RECORD_HEADER_LEN, Record,
    RecordType, SEGMENT_HEADER_LEN, SyncKind, select_engine,
};

/// Engines every test runs against. io_uring is mandatory unless
/// `RIPCORD_JOURNAL_SKIP_URING=1` (for kernels/sandboxes without it).
pub fn engines() -> Vec<EngineChoice> {
    if std::env::var_os("RIPCORD_JOURNAL_SKIP_URING").is_some() {
        eprintln!("RIPCORD_JOURNAL_SKIP_URING set: testing only the sync engine");
        vec![EngineChoice::Sync]
    } else {
        vec![EngineChoice::Sync, EngineChoice::IoUring]
    }
}

pub fn cfg(engine: EngineChoice, segment_size: u64) -> JournalConfig {
    JournalConfig {
        segment_size,
        engine,
        ..JournalConfig::default()
    }
}

pub fn kind_of(n: u8) -> RecordType {
    match n % 3 {
        0 => RecordType::Batch,
        1 => RecordType::Cut,
        _ => RecordType::EpochStart,
    }
}

/// Deterministic payload for record `i` of length `len`.
pub fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn read_all(j: &Journal) -> Vec<Record> {
    j.read_from(j.first_seq())
        .expect("read_from")
        .collect::<Result<Vec<_>, _>>()
        .expect("read records")
}

/// Segment files in `dir`, sorted.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// (offset, total record length) of each record in a segment file, parsed
/// from headers only (no checksum verification).
pub fn record_extents(path: &Path) -> Vec<(u64, u64)> {
    let data = std::fs::read(path).unwrap();
    let mut off = SEGMENT_HEADER_LEN;
    let mut v = Vec::new();
    while off + RECORD_HEADER_LEN <= data.len() {
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        let total = RECORD_HEADER_LEN + len;
        if off + total > data.len() {
            break;
        }
        v.push((off as u64, total as u64));
        off += total;
    }
    v
}

/// Fault-injection knobs shared between a test and its [`FaultyEngine`].
#[derive(Debug, Default)]
pub struct Faults {
    /// Bytes that may still be written before writes fail with ENOSPC. A write
    /// crossing the budget is cut short (partial bytes really land in the file),
    /// the next call fails.
    pub space_budget: Option<u64>,
    /// Fail every write with this errno.
    pub write_errno: Option<i32>,
    /// Cap each write to this many bytes (short writes).
    pub short_write_max: Option<usize>,
    /// Fail every sync with EIO.
    pub fail_sync: bool,
    /// Counters.
    pub writes: u64,
    pub syncs: u64,
}

pub type FaultCtl = Arc<Mutex<Faults>>;

/// Wraps a real engine and injects faults according to a shared [`Faults`].
pub struct FaultyEngine {
    inner: Box<dyn Engine>,
    ctl: FaultCtl,
}

impl FaultyEngine {
    pub fn wrap(choice: EngineChoice) -> (Box<dyn Engine>, FaultCtl) {
        let ctl = FaultCtl::default();
        let inner = select_engine(choice, 8).expect("engine");
        (
            Box::new(FaultyEngine {
                inner,
                ctl: ctl.clone(),
            }),
            ctl,
        )
    }
}

fn truncate_slices<'a>(bufs: &'a [IoSlice<'_>], max: usize) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    let mut left = max;
    for b in bufs {
        if left == 0 {
            break;
        }
        let n = b.len().min(left);
        let s: &'a [u8] = &b[..n];
        out.push(IoSlice::new(s));
        left -= n;
    }
    out
}

impl Engine for FaultyEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Custom
    }

    fn write_at(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let mut f = self.ctl.lock().unwrap();
        f.writes += 1;
        if let Some(errno) = f.write_errno {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut allowed = total;
        if let Some(max) = f.short_write_max {
            allowed = allowed.min(max);
        }
        if let Some(budget) = f.space_budget {
            if budget == 0 {
                return Err(io::Error::from_raw_os_error(libc_enospc()));
            }
            allowed = allowed.min(budget as usize);
        }
        let n = if allowed == total {
            self.inner.write_at(fd, bufs, offset)?
        } else {
            let cut = truncate_slices(bufs, allowed);
            self.inner.write_at(fd, &cut, offset)?
        };
        if let Some(b) = f.space_budget.as_mut() {
            *b -= n as u64;
        }
        Ok(n)
    }

    fn sync(&mut self, fd: BorrowedFd<'_>, kind: SyncKind) -> io::Result<()> {
        let mut f = self.ctl.lock().unwrap();
        if f.fail_sync {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        f.syncs += 1;
        self.inner.sync(fd, kind)
    }
}

pub fn libc_enospc() -> i32 {
    28
}
