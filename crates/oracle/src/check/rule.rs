//! The rule for one block at `T` (see [the module docs](super)) and the classifier that
//! judges a block's bytes against it.
//!
//! Invariants: [`BlockIndex`] lists, per block of the region, the indices of the writes and
//! discards touching it in log (= seq) order, flushes excluded; [`Rule`] allows exactly the
//! last op that completed successfully before `T` (or "nothing written yet") and the ops in
//! flight at `T`; [`classify`] looks only at the block's own bytes and its own ops.

use super::{Allowed, Class, Holds, Initial, Piece};
use crate::block::{Content, SECTORS, Stamp, inspect, is_zero, sector_equals, sector_probe};
use crate::log::{Log, Op, OpKind};
use crate::region::Region;
use crate::sim::version_of;

/// Per-block lists of write/discard op indices (sorted by seq), in CSR form.
pub(super) struct BlockIndex {
    start: u64,
    offsets: Vec<usize>,
    ops: Vec<u32>,
}

impl BlockIndex {
    pub(super) fn build(log: &Log, region: Region) -> BlockIndex {
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
    pub(super) fn get(&self, block: u64) -> &[u32] {
        let i = (block - self.start) as usize;
        &self.ops[self.offsets[i]..self.offsets[i + 1]]
    }
}

/// The rule for one block at `T`.
pub(super) struct Rule<'a> {
    log: &'a Log,
    list: &'a [u32],
    t: u64,
    last_ok: Option<u32>,
}

impl<'a> Rule<'a> {
    pub(super) fn new(log: &'a Log, list: &'a [u32], t: u64) -> Self {
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
    pub(super) fn allowed(&self) -> Vec<Allowed> {
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

pub(super) fn classify(bytes: &[u8], block: u64, rule: &Rule<'_>, initial: Initial) -> Verdict {
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
