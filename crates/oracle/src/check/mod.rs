//! The checker: is an image the device's state at an instant `T`?
//!
//! ## The rule
//! For block `b` let the writes and discards touching `b` be ordered by seq. An op
//! *completed before T* if `complete_ns < T`; it is *in flight at T* if
//! `submit_ns < T <= complete_ns`, or it never completed, or it failed (and no later op to
//! `b` completed successfully before `T`). The block must hold the last op to it that
//! completed successfully before `T` (or, if there is none, "nothing written yet": zero with
//! `--initial zero`, anything that is not a stamp of this run with `--initial any`), or any
//! op in flight at `T`. A discard's content is all zeroes. Each block is judged on its own,
//! so a multi-block write in flight at `T` may be partially present.
//!
//! ## Classes
//! `valid` (a legal write), `zero`, `corrupt` (stamp of this run whose bytes do not verify),
//! `torn` (every 512-byte sector is a known version of this block or zero, but not all the
//! same one), `misdirected` (valid stamp of this run for another lba), `foreign` (stamp of
//! another run, a stamp that no logged write of this block produced, or non-zero bytes
//! without a stamp), `stale` (a write of this block that was superseded before `T`),
//! `future` (a write submitted at or after `T`). `zero` and `foreign` may be legal or not;
//! `valid` is always legal, the rest never.
//!
//! ## Files
//! This file holds the options and the driver that streams an image through the rule;
//! the rule for one block and the classifier are in `check/rule.rs`, the classes and the
//! report in `check/report.rs`.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::block::BLOCK_SIZE;
use crate::error::Error;
use crate::log::{Log, Op};
use crate::region::Region;

mod report;
mod rule;

pub use report::{Allowed, BadBlock, Class, ClassCount, Holds, Piece, Report};
pub use rule::Verdict;
use rule::{BlockIndex, Rule, classify};

/// What the region held before the workload started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Initial {
    /// All zeroes (a fresh sparse file or a discarded device).
    #[default]
    Zero,
    /// Unknown: any content that is not a stamp of this run is legal where nothing was
    /// written yet.
    Any,
}

impl fmt::Display for Initial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Initial::Zero => "zero",
            Initial::Any => "any",
        })
    }
}

impl std::str::FromStr for Initial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zero" => Ok(Initial::Zero),
            "any" => Ok(Initial::Any),
            _ => Err(format!("initial must be zero or any, not {s:?}")),
        }
    }
}

/// Checker options.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Initial content of the region.
    pub initial: Initial,
    /// Blocks to check (default: the log's region).
    pub region: Option<Region>,
    /// How many bad blocks to describe in the report.
    pub max_report: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            initial: Initial::Zero,
            region: None,
            max_report: 20,
        }
    }
}

fn context(log: &Log, list: &[u32], t: u64, holds: &Holds) -> Vec<Op> {
    let boundary = list
        .iter()
        .rposition(|&i| log.ops[i as usize].submit_ns < t)
        .unwrap_or(0);
    let lo = boundary.saturating_sub(3);
    let hi = (boundary + 3).min(list.len());
    let mut v: Vec<Op> = list[lo..hi].iter().map(|&i| log.ops[i as usize]).collect();
    if let Holds::Stamp(s) = holds
        && let Some(i) = log.op_index(s.seq)
        && !v.iter().any(|o| o.seq == s.seq)
    {
        v.push(log.ops[i]);
        v.sort_by_key(|o| o.seq);
    }
    v
}

/// Checks `image` (a copy of the device: block `b` at byte `b * 4096`) against `log` at
/// `t_ns`, with default options (region from the log, initial zero, 20 reported blocks).
pub fn check<R: Read + Seek>(image: &mut R, log: &Log, t_ns: u64) -> Result<Report, Error> {
    check_with(image, log, t_ns, &CheckOptions::default())
}

/// Checks the image file at `path`; see [`check_with`].
pub fn check_file(
    path: impl AsRef<Path>,
    log: &Log,
    t_ns: u64,
    opts: &CheckOptions,
) -> Result<Report, Error> {
    let path = path.as_ref();
    let mut f =
        File::open(path).map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
    check_with(&mut f, log, t_ns, opts)
}

/// Checks `image` against `log` at `t_ns`. Streams the image in 8 MiB chunks; memory is
/// proportional to the region length plus the number of (op, block) pairs in the log.
pub fn check_with<R: Read + Seek>(
    image: &mut R,
    log: &Log,
    t_ns: u64,
    opts: &CheckOptions,
) -> Result<Report, Error> {
    if !log.ended_cleanly() && t_ns > log.last_event_ns {
        return Err(Error::TimeBeyondLog {
            t_ns,
            last_ns: log.last_event_ns,
        });
    }
    if log.ops.len() > u32::MAX as usize {
        return Err(Error::Usage("log has more than 2^32 ops".into()));
    }
    let region = opts.region.unwrap_or(log.header.region);
    if region.len == 0
        || region
            .start
            .checked_add(region.len)
            .is_none_or(|e| e > u64::MAX / BLOCK_SIZE as u64)
    {
        return Err(Error::Usage(format!("bad region {region}")));
    }
    let mut notes = Vec::new();
    if !region.within(&log.header.region) {
        notes.push(format!(
            "region {region} extends beyond the workload's region {}",
            log.header.region
        ));
    }
    if log.torn_tail_bytes > 0 {
        notes.push(format!(
            "log tail lost ({} bytes of a torn record dropped); valid for T <= {}",
            log.torn_tail_bytes, log.last_event_ns
        ));
    } else if !log.ended_cleanly() {
        notes.push(format!(
            "log has no End record (workload crashed?); valid for T <= {}",
            log.last_event_ns
        ));
    }
    if t_ns <= log.header.start_ns {
        notes.push("T is before the workload started".into());
    }
    let index = BlockIndex::build(log, region);
    let base = region.start * BLOCK_SIZE as u64;
    image
        .seek(SeekFrom::Start(base))
        .map_err(|e| Error::io("seeking image", e))?;
    let mut report = Report {
        t_ns,
        region,
        initial: opts.initial,
        counts: [ClassCount::default(); 8],
        illegal: 0,
        bad: Vec::new(),
        notes,
    };
    const CHUNK_BLOCKS: u64 = 2048;
    let mut buf = vec![0u8; CHUNK_BLOCKS as usize * BLOCK_SIZE];
    let mut block = region.start;
    while block < region.end() {
        let n = CHUNK_BLOCKS.min(region.end() - block) as usize;
        let chunk = &mut buf[..n * BLOCK_SIZE];
        let mut got = 0;
        while got < chunk.len() {
            match image.read(&mut chunk[got..]) {
                Ok(0) => {
                    return Err(Error::ImageTooShort {
                        needed: region.end() * BLOCK_SIZE as u64,
                        got: (block - region.start) * BLOCK_SIZE as u64 + base + got as u64,
                    });
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading image", e)),
            }
        }
        for (k, bytes) in chunk.chunks_exact(BLOCK_SIZE).enumerate() {
            let b = block + k as u64;
            let list = index.get(b);
            let rule = Rule::new(log, list, t_ns);
            let verdict = classify(bytes, b, &rule, opts.initial);
            let c = &mut report.counts[verdict.class.index()];
            c.total += 1;
            if !verdict.legal {
                c.illegal += 1;
                report.illegal += 1;
                if report.bad.len() < opts.max_report {
                    report.bad.push(BadBlock {
                        block: b,
                        class: verdict.class,
                        allowed: rule.allowed(),
                        context: context(log, list, t_ns, &verdict.holds),
                        holds: verdict.holds,
                    });
                }
            }
        }
        block += n as u64;
    }
    Ok(report)
}

/// Classifies a single block (for tests and tools): `bytes` is the block's content.
pub fn classify_block(bytes: &[u8], block: u64, log: &Log, t_ns: u64, initial: Initial) -> Verdict {
    let index = BlockIndex::build(
        log,
        Region {
            start: block,
            len: 1,
        },
    );
    let rule = Rule::new(log, index.get(block), t_ns);
    classify(bytes, block, &rule, initial)
}
