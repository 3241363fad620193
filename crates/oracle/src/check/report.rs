//! What the checker reports: the [`Class`] of a block, what it [`Holds`], what the rule
//! [`Allowed`], and the [`Report`] with per-class counts and the first bad blocks.
//!
//! Invariants: [`Report::counts`] is indexed like [`Class::ALL`]; `illegal` is the sum of
//! the per-class `illegal` counts; `bad` holds at most `max_report` blocks, in block order.
//! The `Display` text is the CLI's output and is read by people, not parsed.

use std::fmt;

use super::Initial;
use crate::block::{SECTORS, Stamp};
use crate::log::Op;
use crate::region::Region;

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
    pub(super) fn index(self) -> usize {
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
