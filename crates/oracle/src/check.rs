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

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::block::{
    BLOCK_SIZE, Content, SECTORS, Stamp, inspect, is_zero, sector_equals, sector_probe,
};
use crate::error::Error;
use crate::log::{Log, Op, OpKind};
use crate::region::Region;
use crate::sim::version_of;

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

/// Classification of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A write the rule allows.
    Valid,
    /// All zeroes.
    Zero,
    /// Stamp of this run present but the bytes do not verify.
    Corrupt,
    /// Sectors from different versions (or zero).
    Torn,
    /// Valid stamp of this run for a different block.
    Misdirected,
    /// Another run's stamp, a stamp no logged write produced, or unstamped non-zero data.
    Foreign,
    /// A write of this block older than allowed.
    Stale,
    /// A write of this block submitted at or after `T`.
    Future,
}

impl Class {
    /// All classes, in report order.
    pub const ALL: [Class; 8] = [
        Class::Valid,
        Class::Zero,
        Class::Corrupt,
        Class::Torn,
        Class::Misdirected,
        Class::Foreign,
        Class::Stale,
        Class::Future,
    ];
    fn index(self) -> usize {
        Class::ALL.iter().position(|&c| c == self).expect("listed")
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Valid => "valid",
            Class::Zero => "zero",
            Class::Corrupt => "corrupt",
            Class::Torn => "torn",
            Class::Misdirected => "misdirected",
            Class::Foreign => "foreign",
            Class::Stale => "stale",
            Class::Future => "future",
        })
    }
}

/// Where one 512-byte sector of a damaged block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Zero bytes.
    Zero,
    /// The version written by the write with this seq.
    Seq(u64),
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holds {
    /// Zeroes.
    Zero,
    /// A stamp whose CRC verifies.
    Stamp(Stamp),
    /// A block that does not verify: its header (if the magic is present) and, per sector,
    /// the version it matches (`None`: matches nothing known).
    Sectors {
        /// Parsed (unverified) header.
        header: Option<Stamp>,
        /// Source of each sector.
        sectors: [Option<Piece>; SECTORS],
    },
}

/// An element of the allowed set of a block at `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Nothing written yet (the initial content).
    Initial,
    /// The last op that completed before `T`.
    LastCompleted(u64),
    /// An op in flight at `T`.
    InFlight(u64),
}

/// A block that failed the rule, with the evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBlock {
    /// Block number.
    pub block: u64,
    /// Its class.
    pub class: Class,
    /// What it holds.
    pub holds: Holds,
    /// What the rule allowed at `T`.
    pub allowed: Vec<Allowed>,
    /// Ops to this block around `T` (and the op it holds, if known).
    pub context: Vec<Op>,
}

/// Per-class counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassCount {
    /// Blocks of this class.
    pub total: u64,
    /// Of which illegal.
    pub illegal: u64,
}

/// The checker's verdict.
#[derive(Debug, Clone)]
pub struct Report {
    /// The instant checked.
    pub t_ns: u64,
    /// Blocks checked.
    pub region: Region,
    /// Initial-content assumption.
    pub initial: Initial,
    /// Counts per class, indexed like [`Class::ALL`].
    pub counts: [ClassCount; 8],
    /// Number of illegal blocks.
    pub illegal: u64,
    /// The first `max_report` illegal blocks.
    pub bad: Vec<BadBlock>,
    /// Remarks (log tail lost, `T` outside the run, ...).
    pub notes: Vec<String>,
}

impl Report {
    /// True if every block is legal.
    pub fn passed(&self) -> bool {
        self.illegal == 0
    }
    /// Counts of one class.
    pub fn count(&self, c: Class) -> ClassCount {
        self.counts[c.index()]
    }
    /// The reported bad block `block`, if it is among the first `max_report`.
    pub fn bad_block(&self, block: u64) -> Option<&BadBlock> {
        self.bad.iter().find(|b| b.block == block)
    }
}

fn rel(t: u64, at: u64) -> String {
    if at >= t {
        format!("T+{}ns", at - t)
    } else {
        format!("T-{}ns", t - at)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        writeln!(
            f,
            "{verdict}: T={} region={} initial={}: {} of {} blocks illegal",
            self.t_ns, self.region, self.initial, self.illegal, self.region.len
        )?;
        let parts: Vec<String> = Class::ALL
            .iter()
            .zip(&self.counts)
            .filter(|(_, c)| c.total > 0)
            .map(|(cl, c)| {
                if c.illegal > 0 {
                    format!("{cl} {} ({} illegal)", c.total, c.illegal)
                } else {
                    format!("{cl} {}", c.total)
                }
            })
            .collect();
        writeln!(f, "  classes: {}", parts.join(", "))?;
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        for b in &self.bad {
            writeln!(f, "block {}: {}", b.block, b.class)?;
            let holds = match &b.holds {
                Holds::Zero => "zeroes".to_string(),
                Holds::Stamp(s) => {
                    format!(
                        "run {:#x} lba {} seq {} index {}",
                        s.run_id, s.lba, s.seq, s.index
                    )
                }
                Holds::Sectors { header, sectors } => {
                    let h = match header {
                        Some(s) => format!(
                            "header run {:#x} lba {} seq {} (unverified)",
                            s.run_id, s.lba, s.seq
                        ),
                        None => "no stamp header".into(),
                    };
                    let secs: Vec<String> = sectors
                        .iter()
                        .map(|p| match p {
                            Some(Piece::Zero) => "0".into(),
                            Some(Piece::Seq(s)) => format!("seq {s}"),
                            None => "?".into(),
                        })
                        .collect();
                    format!("{h}; sectors [{}]", secs.join(", "))
                }
            };
            writeln!(f, "  holds: {holds}")?;
            let allowed: Vec<String> = b
                .allowed
                .iter()
                .map(|a| match a {
                    Allowed::Initial => format!("nothing written yet (initial {})", self.initial),
                    Allowed::LastCompleted(s) => format!("seq {s} (last completed before T)"),
                    Allowed::InFlight(s) => format!("seq {s} (in flight at T)"),
                })
                .collect();
            writeln!(f, "  allowed at T: {}", allowed.join(" | "))?;
            writeln!(f, "  ops to block {} around T:", b.block)?;
            for op in &b.context {
                let c = match op.complete_ns {
                    Some(c) => format!("{c} ({})", rel(self.t_ns, c)),
                    None => "never".into(),
                };
                writeln!(
                    f,
                    "    seq {:>10} {:<7} blocks {}+{} submit {} ({}) complete {} result {}",
                    op.seq,
                    op.kind.to_string(),
                    op.first_block,
                    op.block_count,
                    op.submit_ns,
                    rel(self.t_ns, op.submit_ns),
                    c,
                    op.result.map_or("-".into(), |r| r.to_string()),
                )?;
            }
        }
        if self.illegal as usize > self.bad.len() {
            writeln!(
                f,
                "... and {} more illegal blocks",
                self.illegal as usize - self.bad.len()
            )?;
        }
        Ok(())
    }
}

/// Per-block lists of write/discard op indices (sorted by seq), in CSR form.
struct BlockIndex {
    start: u64,
    offsets: Vec<usize>,
    ops: Vec<u32>,
}

impl BlockIndex {
    fn build(log: &Log, region: Region) -> BlockIndex {
        let clip = |op: &Op| -> Option<(u64, u64)> {
            if op.kind == OpKind::Flush {
                return None;
            }
            let a = op.first_block.max(region.start);
            let e = (op.first_block + op.block_count as u64).min(region.end());
            (a < e).then(|| (a - region.start, e - region.start))
        };
        let mut offsets = vec![0usize; region.len as usize + 1];
        for op in &log.ops {
            if let Some((a, e)) = clip(op) {
                for b in a..e {
                    offsets[b as usize + 1] += 1;
                }
            }
        }
        for i in 1..offsets.len() {
            offsets[i] += offsets[i - 1];
        }
        let mut fill = offsets.clone();
        let mut ops = vec![0u32; offsets[region.len as usize]];
        for (i, op) in log.ops.iter().enumerate() {
            if let Some((a, e)) = clip(op) {
                for b in a..e {
                    ops[fill[b as usize]] = i as u32;
                    fill[b as usize] += 1;
                }
            }
        }
        BlockIndex {
            start: region.start,
            offsets,
            ops,
        }
    }
    fn get(&self, block: u64) -> &[u32] {
        let i = (block - self.start) as usize;
        &self.ops[self.offsets[i]..self.offsets[i + 1]]
    }
}

/// The rule for one block at `T`.
struct Rule<'a> {
    log: &'a Log,
    list: &'a [u32],
    t: u64,
    last_ok: Option<u32>,
}

impl<'a> Rule<'a> {
    fn new(log: &'a Log, list: &'a [u32], t: u64) -> Self {
        let last_ok = list
            .iter()
            .rev()
            .find(|&&i| {
                let op = &log.ops[i as usize];
                op.ok() && op.complete_ns.is_some_and(|c| c < t)
            })
            .copied();
        Rule {
            log,
            list,
            t,
            last_ok,
        }
    }
    fn in_flight(&self, i: u32) -> bool {
        let op = &self.log.ops[i as usize];
        let last_seq = self.last_ok.map(|j| self.log.ops[j as usize].seq);
        op.submit_ns < self.t
            && match op.complete_ns {
                None => true,
                Some(c) if c >= self.t => true,
                Some(_) => !op.ok() && last_seq.is_none_or(|s| op.seq > s),
            }
    }
    fn allows(&self, i: u32) -> bool {
        self.last_ok == Some(i) || self.in_flight(i)
    }
    fn nothing_yet(&self) -> bool {
        self.last_ok.is_none()
    }
    fn allows_zero(&self) -> bool {
        self.nothing_yet()
            || self
                .list
                .iter()
                .any(|&i| self.log.ops[i as usize].kind == OpKind::Discard && self.allows(i))
    }
    fn allowed(&self) -> Vec<Allowed> {
        let mut v = Vec::new();
        match self.last_ok {
            None => v.push(Allowed::Initial),
            Some(i) => v.push(Allowed::LastCompleted(self.log.ops[i as usize].seq)),
        }
        v.extend(
            self.list
                .iter()
                .filter(|&&i| Some(i) != self.last_ok && self.in_flight(i))
                .map(|&i| Allowed::InFlight(self.log.ops[i as usize].seq)),
        );
        v
    }
}

/// Verdict for one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Class.
    pub class: Class,
    /// Whether the rule allows it.
    pub legal: bool,
    /// What the block holds.
    pub holds: Holds,
}

fn classify(bytes: &[u8], block: u64, rule: &Rule<'_>, initial: Initial) -> Verdict {
    let log = rule.log;
    let run = log.header.run_id;
    let others_ok = rule.nothing_yet() && initial == Initial::Any;
    let v = |class, legal, holds| Verdict {
        class,
        legal,
        holds,
    };
    match inspect(bytes) {
        Content::Zero => v(Class::Zero, rule.allows_zero(), Holds::Zero),
        Content::Stamped(s) => {
            let holds = Holds::Stamp(s);
            if s.run_id != run {
                return v(Class::Foreign, others_ok, holds);
            }
            if s.lba != block {
                return v(Class::Misdirected, false, holds);
            }
            let Some(i) = log.op_index(s.seq) else {
                // Beyond every logged seq: submitted after the log was cut, i.e. after
                // last_event_ns >= T.
                let beyond = log.ops.last().is_none_or(|o| s.seq > o.seq);
                return v(
                    if beyond {
                        Class::Future
                    } else {
                        Class::Foreign
                    },
                    false,
                    holds,
                );
            };
            let op = &log.ops[i];
            if op.kind != OpKind::Write
                || !op.touches(block)
                || s.index as u64 != block - op.first_block
            {
                return v(Class::Foreign, false, holds);
            }
            if rule.allows(i as u32) {
                v(Class::Valid, true, holds)
            } else if op.submit_ns >= rule.t {
                v(Class::Future, false, holds)
            } else {
                v(Class::Stale, false, holds)
            }
        }
        content @ (Content::BadCrc(_) | Content::Unstamped) => {
            let header = match content {
                Content::BadCrc(s) => Some(s),
                _ => None,
            };
            let sectors = explain_sectors(bytes, block, rule);
            let holds = Holds::Sectors { header, sectors };
            let mut sources: Vec<Piece> = sectors.iter().flatten().copied().collect();
            sources.dedup();
            let any_ours = sectors.iter().any(|p| matches!(p, Some(Piece::Seq(_))));
            if sectors.iter().all(Option::is_some) && sources.len() >= 2 {
                v(Class::Torn, false, holds)
            } else if any_ours || header.is_some_and(|h| h.run_id == run) {
                v(Class::Corrupt, false, holds)
            } else {
                v(Class::Foreign, others_ok, holds)
            }
        }
    }
}

/// For each sector, which known version of `block` (or zero) it equals.
fn explain_sectors(bytes: &[u8], block: u64, rule: &Rule<'_>) -> [Option<Piece>; SECTORS] {
    let log = rule.log;
    let mut out = [None; SECTORS];
    let mut cache: Vec<(usize, Vec<u8>)> = Vec::new();
    for (s, slot) in out.iter_mut().enumerate() {
        if is_zero(&bytes[s * 512..(s + 1) * 512]) {
            *slot = Some(Piece::Zero);
            continue;
        }
        for &i in rule.list {
            let op = &log.ops[i as usize];
            if op.kind != OpKind::Write {
                continue;
            }
            let stamp = Stamp {
                run_id: log.header.run_id,
                lba: block,
                seq: op.seq,
                index: (block - op.first_block) as u32,
            };
            if !sector_probe(bytes, s, &stamp) {
                continue;
            }
            let pos = match cache.iter().position(|(j, _)| *j == i as usize) {
                Some(p) => p,
                None => {
                    cache.push((i as usize, version_of(log, op, block)));
                    cache.len() - 1
                }
            };
            if sector_equals(bytes, &cache[pos].1, s) {
                *slot = Some(Piece::Seq(op.seq));
                break;
            }
        }
    }
    out
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
