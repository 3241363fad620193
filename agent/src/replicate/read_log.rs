//! What the readback has recently read and sent, and when: so that a zeroing change noted
//! late never overwrites, in the stream, data that was read after it.
//!
//! # The hazard
//! A discard's (or write-zeroes') completion says "this range now reads as zero", and the
//! pipeline sends that as a zero extent instead of reading the range. That is right only
//! if nothing the stream already carries for the range was read after the discard
//! completed. Reads are not always ordered after the events that precede them:
//! overflow-bitmap regions (their events never reached the ring), `LOST` reports and
//! stalled writes are read as soon as they are known, and a round reads the ranges of the
//! writes in flight at its instant; meanwhile an event that completed earlier can still
//! wait in the ring, or be deferred to the next round because it completed after the
//! round's instant. Sent afterwards as zeroes, such a discard would replace the data of a
//! write that followed it on the device. The oracle test found exactly this under ring
//! overflow: writes made while the agent was stopped overflowed and were read from the
//! bitmap, and the discard before them, still in the ring, was sent after them as zeroes.
//!
//! # The rule
//! The log keeps, per sector, the newest read of it (start and end time), for reads that
//! ended less than [`KEEP_FOR`] ago. Every read in the log has been sent, or will be sent
//! before anything noted after it (reads are sent in the round that made them; changes
//! are noted at a round's start, or after its send phase). For a zeroing change that
//! completed at `t`, [`ReadLog::classify`] splits its range:
//! - [`AfterZeroing::NotRead`]: no kept read ended after `t`: send zeroes;
//! - [`AfterZeroing::ReadAfter`]: the newest read started after `t`: the stream already
//!   holds what the device held after the change (zeroes, and any newer write), so no
//!   zeroes must follow it;
//! - [`AfterZeroing::ReadDuring`]: the newest read began before `t` and ended after it:
//!   read the range again.
//!
//! A change completed at `t` is committed to the ring within microseconds of `t` (the
//! probe takes the time, then reserves and commits), and every round drains the ring up
//! to its producer position, so a change is noted at the latest by the first round that
//! starts after it was committed. Reads are kept [`KEEP_FOR`] after they end, orders of
//! magnitude longer than that delay; memory is bounded by what the readback reads in that
//! time, one entry per contiguous read.

use std::{collections::BTreeMap, time::Duration};

/// How long a read is remembered after it ended.
pub const KEEP_FOR: Duration = Duration::from_millis(250);

/// One read: `[.., end)` sectors, read between `start_ns` and `end_ns` (CLOCK_MONOTONIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Read {
    end: u64,
    start_ns: u64,
    end_ns: u64,
}

/// How a range relates to a zeroing change that completed at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterZeroing {
    /// Nothing kept was read after the change: send zeroes.
    NotRead,
    /// Read entirely after the change, and sent: nothing to do.
    ReadAfter,
    /// The newest read overlapped the change's completion: read again.
    ReadDuring,
}

/// Recent reads of one disk (see the module doc).
#[derive(Debug, Default)]
pub struct ReadLog {
    /// Start sector -> newest read of `[start, end)`; non-overlapping.
    reads: BTreeMap<u64, Read>,
}

impl ReadLog {
    pub fn new() -> ReadLog {
        ReadLog::default()
    }

    /// Forget reads that ended more than [`KEEP_FOR`] before `now_ns`.
    pub fn forget_old(&mut self, now_ns: u64) {
        let keep_ns = KEEP_FOR.as_nanos() as u64;
        self.reads
            .retain(|_, r| r.end_ns.saturating_add(keep_ns) >= now_ns);
    }

    /// `[sector, sector + sectors)` was read between `start_ns` and `end_ns`; it replaces
    /// whatever older reads of those sectors the log held.
    pub fn record(&mut self, sector: u64, sectors: u64, start_ns: u64, end_ns: u64) {
        let end = sector.saturating_add(sectors);
        if sectors == 0 {
            return;
        }
        let mut tail = None;
        while let Some((&s, &old)) = self.reads.range(..end).next_back() {
            if old.end <= sector {
                break;
            }
            self.reads.remove(&s);
            if old.end > end {
                tail = Some((end, old));
            }
            if s < sector {
                self.reads.insert(s, Read { end: sector, ..old });
                break;
            }
        }
        if let Some((k, v)) = tail {
            self.reads.insert(k, v);
        }
        self.reads.insert(
            sector,
            Read {
                end,
                start_ns,
                end_ns,
            },
        );
    }

    /// Split `[sector, sector + sectors)` by how its newest reads relate to a zeroing
    /// change completed at `t_ns`: `(start, len, verdict)` in order, covering the range.
    pub fn classify(&self, sector: u64, sectors: u64, t_ns: u64) -> Vec<(u64, u64, AfterZeroing)> {
        let end = sector.saturating_add(sectors);
        let mut out: Vec<(u64, u64, AfterZeroing)> = Vec::new();
        let mut push = |s: u64, e: u64, v: AfterZeroing| {
            if s >= e {
                return;
            }
            match out.last_mut() {
                Some(last) if last.2 == v && last.0 + last.1 == s => last.1 += e - s,
                _ => out.push((s, e - s, v)),
            }
        };
        let first = match self.reads.range(..sector).next_back() {
            Some((&s, r)) if r.end > sector => s,
            _ => sector,
        };
        let mut at = sector;
        for (&s, r) in self.reads.range(first..end) {
            let (lo, hi) = (s.max(sector), r.end.min(end));
            push(at, lo, AfterZeroing::NotRead);
            let verdict = if r.end_ns <= t_ns {
                AfterZeroing::NotRead
            } else if r.start_ns > t_ns {
                AfterZeroing::ReadAfter
            } else {
                AfterZeroing::ReadDuring
            };
            push(lo, hi, verdict);
            at = hi;
        }
        push(at, end, AfterZeroing::NotRead);
        out
    }

    /// Number of reads held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.reads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::AfterZeroing::{NotRead, ReadAfter, ReadDuring};
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_zeroing_change_is_split_by_the_newest_read_of_each_part() {
        let mut log = ReadLog::new();
        log.record(0, 8, 10 * MS, 11 * MS); // before the change
        log.record(16, 8, 19 * MS, 21 * MS); // across it
        log.record(32, 8, 25 * MS, 26 * MS); // after it
        assert_eq!(
            log.classify(0, 48, 20 * MS),
            vec![
                (0, 16, NotRead),
                (16, 8, ReadDuring),
                (24, 8, NotRead),
                (32, 8, ReadAfter),
                (40, 8, NotRead),
            ]
        );
        // A partial overlap is clipped to the range asked about.
        assert_eq!(
            log.classify(20, 14, 20 * MS),
            vec![(20, 4, ReadDuring), (24, 8, NotRead), (32, 2, ReadAfter)]
        );
    }

    #[test]
    fn a_newer_read_replaces_the_older_one_where_they_overlap() {
        let mut log = ReadLog::new();
        log.record(0, 32, 10 * MS, 30 * MS);
        log.record(8, 8, 40 * MS, 41 * MS);
        assert_eq!(
            log.classify(0, 32, 20 * MS),
            vec![(0, 8, ReadDuring), (8, 8, ReadAfter), (16, 16, ReadDuring)]
        );
        assert_eq!(log.len(), 3);
    }

    #[test]
    fn reads_are_forgotten_keep_for_after_they_end() {
        let mut log = ReadLog::new();
        log.record(0, 8, 0, MS);
        log.record(100, 8, 150 * MS, 200 * MS);
        log.forget_old(MS + KEEP_FOR.as_nanos() as u64 + 1);
        assert_eq!(log.classify(0, 8, 0), vec![(0, 8, NotRead)]);
        assert_eq!(log.classify(100, 8, 100 * MS), vec![(100, 8, ReadAfter)]);
        assert_eq!(log.len(), 1);
    }
}
