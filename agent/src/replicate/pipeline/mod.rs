//! The replication pipeline's producer side: readback rounds, zero detection, batching
//! (see `batch.rs`), and crash-consistent cuts.
//!
//! # A round at instant T
//! 0. Drain what completed so far, then write back the device's own dirty page cache over
//!    what the round will read (the dirty set, the next initial-sync chunk): an O_DIRECT
//!    read starts those writes itself and would race them. They complete before T, so
//!    step 1 drains them. (Draining early changes nothing else: those changes completed
//!    before T as well.)
//! 1. Snapshot every write generation (bumped when a write is *queued*), then drain every
//!    change event committed before T into the dirty set (see readback.rs and decision
//!    0003 for why the snapshot comes first).
//! 2. Walk the in-flight map, then drain again: a write still in the map may have
//!    completed before T without the completion probe running (decision 0005), and one
//!    replaced in the map since was reported `LOST` before the walk ended. Both kinds of
//!    range are read in this round.
//! 3. **Read phase**: read every range of the round (the dirty set up to `round_sectors`,
//!    the in-flight ranges, nothing else) into memory, back to back. A piece whose
//!    generations moved since T raced a write queued after T: it goes back into the
//!    dirty set and the round is not clean. Nothing but reads happens in this phase, so
//!    the window in which a write can race a read is as short as the reads themselves.
//! 4. **Send phase**: zero extents, the pieces read, and initial-sync data (streamed) are
//!    batched, sealed and handed to the network side; then, if the round is clean, the
//!    dirty set was taken whole and every event up to T was drained, a cut.
//!
//! # Why a clean round's cut is a crash state at T
//! Every write completed before T is in the cut: its completion event was drained at T
//! (its range is read after T), or its completion was never seen and its in-flight entry
//! still existed during the walk (its range is read after T), or its entry was replaced
//! by a newer bio and the `LOST` report, committed before the replacement, was drained
//! after the walk (its range is read after T). A range read after T with no write queued
//! to it since T holds its content at T, up to writes in flight at T, which a crash state
//! may or may not hold. Ranges not read in the round were last read in an earlier round
//! and no write to them completed since (it would have dirtied them before T).
//! So cuts never wait for in-flight writes, and a lost completion costs a re-read, never
//! a recovery point.
//!
//! # Zero extents and the order of the stream
//! A discard (or write-zeroes) is sent as a zero extent rather than read, which keeps
//! `fstrim` cheap, but a zero extent is only right where nothing already sent was read
//! after the discard completed (see `read_log.rs` for how reads overtake events: overflow
//! regions, `LOST` reports, in-flight ranges, and events deferred past a round). So:
//! - a zeroing change is sent as zeroes only where no recent read of its range ended after
//!   it completed; where a read made entirely after it was sent, nothing more is needed,
//!   and where a read spanned its completion, the range is read again;
//! - it never removes a range from the dirty set: that range may carry a write whose event
//!   came out of order (an overflow region, a `LOST` report) and must still be read;
//! - a zero extent whose regions saw a write queued after the round's instant makes the
//!   round not clean (the discard itself may have been queued after T).

mod round;

use std::time::{Duration, Instant};

use agent_common::op;
use ripcord_proto::{Batch, ExtentKind};

use super::{
    batch::BatchBuilder,
    read_log::{AfterZeroing, ReadLog},
    readback::{AlignedBuf, DeviceReader},
};
use crate::{
    capture::{Capture, GenSnapshot, LOST_AFTER},
    clock::{now_mono_ns, now_wall_ns},
    device::BlockDevice,
    extents::ExtentSet,
};

/// What the producer hands to the network side, per disk, in stream order.
#[derive(Debug)]
pub enum Outgoing {
    /// A sealed batch, with the completion time (CLOCK_MONOTONIC ns) of the oldest change
    /// it carries, for lag measurement (`None` for initial-sync data).
    Batch(Batch, Option<u64>),
    /// A crash-consistent point after batch `seq` (0: before any batch), at instant
    /// `mono_ns`, sent right after the last batch of its round.
    Cut {
        time_ns: u64,
        mono_ns: u64,
        seq: u64,
        /// Application-consistent (taken with the file systems frozen and hooks run).
        app: bool,
        /// A member of a group point: the stamp its MAC covers (see `group.rs`).
        group: Option<ripcord_proto::GroupStamp>,
    },
}

/// Dirty ranges closer than this (sectors) are read as one piece: fewer system calls, and
/// the gap lies in the same 16 KiB generation region as its neighbours anyway.
const MERGE_GAP_SECTORS: u64 = 32;

/// Most `sync_file_range` calls a disk's page-cache write-back makes per round; more
/// dirty ranges than this are written back with one call over their span.
const WRITE_BACK_MAX_CALLS: usize = 64;

/// Which cut a round may place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutRequest {
    /// A crash-consistent cut if the round is clean, at most one per cut interval.
    Interval,
    /// A crash-consistent cut if the round is clean, whatever the interval and even if
    /// nothing changed: the caller froze the file systems to get one (a forced point).
    Forced,
    /// An application-consistent cut if the round is clean (file systems frozen, hooks
    /// run), whatever the interval and even if nothing changed.
    App,
    /// A group cut: the round takes its instant at the target's local time (after the
    /// page-cache write-back, so nothing slow lies between the wait and the instant),
    /// and a clean round's cut carries the stamp if the cut's total clock error stays
    /// within the target's limit (else it is an ordinary crash-consistent cut). An
    /// application-consistent target (`app`, decision 0028) is cut only under a freeze
    /// (`RoundConfig::frozen_until`), once the instant has passed by the offset's error
    /// too: the coordinator's instant then lies, in real time, inside the freeze, so the
    /// cut is the state at the instant and no lateness enters its error.
    Group(super::group::GroupTarget),
}

/// Tuning of rounds.
#[derive(Clone, Copy, Debug)]
pub struct RoundConfig {
    /// Most dirty sectors read per round (in-flight ranges come on top).
    pub round_sectors: u64,
    pub sync_chunk_sectors: u64,
    pub cut_interval: Duration,
    pub cut: CutRequest,
    /// For a round under a freeze: until when the file systems are certainly frozen
    /// (`Frozen::held_until`). An application-consistent cut (`App`, or a `Group` target
    /// with `app`) is placed only if its snapshot is taken before it, so a cut can never
    /// be labelled application-consistent after the watchdog thawed.
    pub frozen_until: Option<std::time::Instant>,
}

/// Counters of one disk's producer.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskCounters {
    pub bytes_read: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub batches: u64,
    /// Cuts sent (every kind).
    pub cuts: u64,
    pub raced_reads: u64,
    /// Application-consistent cuts sent.
    pub app_cuts: u64,
    /// Crash-consistent cuts taken while the agent held the file systems frozen because
    /// no clean round came within half the point-gap bound.
    pub forced_cuts: u64,
    /// Cuts stamped as members of a group point.
    pub group_cuts: u64,
    /// Group instants this disk has no stamped cut for: the round at the instant was not
    /// clean, or the cut's clock error passed the group's limit.
    pub group_misses: u64,
    /// Queued writes whose completion was never reported (their ranges were re-read).
    pub lost_completions: u64,
    /// Reads that failed every attempt (their ranges stayed dirty).
    pub read_errors: u64,
    /// Passthrough requests with data out seen on the disk (each re-read it whole).
    pub passthrough_writes: u64,
    pub rounds: u64,
    pub clean_rounds: u64,
    /// Time spent, summed over rounds: draining events and walking the in-flight map
    /// (step 1-2), reading (step 3), and sealing and handing batches to the network side
    /// (step 4, which blocks while the network side is full), in microseconds.
    pub drain_us: u64,
    pub read_us: u64,
    pub send_us: u64,
    /// Part of `send_us` spent waiting for the network side to take a batch.
    pub blocked_us: u64,
    /// Change events the kernel could not queue (their regions were resynchronised).
    pub dropped: u64,
    /// Bytes a continued epoch's sync read but did not send: the server holds them
    /// already (the acknowledged-digest map vouches for them).
    pub delta_skipped_bytes: u64,
    /// Queued writes capture could not follow (the queue probe skipped or failed, or the
    /// in-flight map was full); each resynchronised the whole device.
    pub missed: u64,
}

/// One protected disk on the producer side.
pub struct DiskProducer {
    pub dev: BlockDevice,
    reader: DeviceReader,
    pub dirty: ExtentSet,
    /// Ranges discarded or zeroed since they were last sent: sent as zero extents, not read.
    pub zeroed: ExtentSet,
    /// Initial sync position (sectors); `None` when done.
    pub sync_cursor: Option<u64>,
    /// Sectors the initial sync has read and handed on so far, updated after every piece
    /// (`sync_cursor` moves a whole chunk per round): the status writer reads it while a
    /// round runs.
    pub sync_progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub builder: BatchBuilder,
    /// Oldest completion time among changes drained but not yet sent.
    oldest_change: Option<u64>,
    /// Data sent since the last cut.
    uncut: bool,
    last_cut: Option<Instant>,
    /// When the initial sync's reads ended.
    synced_at: Option<Instant>,
    /// Since when changes have waited for a point: set when a round ends with changes
    /// that no point holds yet, cleared when none are left (so an idle disk has no gap).
    gap_since: Option<Instant>,
    /// Longest time changes waited for a point.
    pub largest_gap: Duration,
    /// The read phase's buffer (allocated on first use).
    round_buf: Option<AlignedBuf>,
    /// Pieces read in the current round's read phase: (sector, sectors, buffer offset).
    pieces: Vec<(u64, u64, usize)>,
    /// Ranges read in recent rounds, and when (decides where a discard may be zeroes).
    read_log: ReadLog,
    /// The current round's read phase found a race or left work undone.
    round_clean: bool,
    round_complete: bool,
    pub counters: DiskCounters,
    /// Whether a discard on this device reads as zeroes (sent as zeroes without a read);
    /// otherwise its range is read back. See `AgentConfig::discards_read_zero`.
    pub discards_read_zero: bool,
    /// Set when this process continues the epoch: its sync sends only the blocks this
    /// map does not vouch the server holds.
    pub delta: Option<crate::replicate::acked_map::SharedAckedMap>,
}

impl DiskProducer {
    pub fn new(dev: BlockDevice, builder: BatchBuilder) -> anyhow::Result<DiskProducer> {
        Ok(DiskProducer {
            reader: DeviceReader::open(&dev)?,
            dev,
            dirty: ExtentSet::new(),
            zeroed: ExtentSet::new(),
            sync_cursor: Some(0),
            sync_progress: std::sync::Arc::default(),
            builder,
            oldest_change: None,
            uncut: false,
            last_cut: None,
            synced_at: None,
            gap_since: None,
            largest_gap: Duration::ZERO,
            round_buf: None,
            pieces: Vec::new(),
            read_log: ReadLog::new(),
            round_clean: true,
            round_complete: true,
            counters: DiskCounters::default(),
            discards_read_zero: false,
            delta: None,
        })
    }

    pub fn syncing(&self) -> bool {
        self.sync_cursor.is_some()
    }

    /// How long the oldest change no recovery point holds has waited for one (zero when
    /// the newest point holds everything; `None` while syncing): the data a disaster now
    /// would lose goes back this far.
    pub fn point_gap(&self) -> Option<Duration> {
        self.synced_at?;
        Some(self.gap_since.map_or(Duration::ZERO, |t| t.elapsed()))
    }

    /// Age of the newest recovery point (from the end of the initial sync until the
    /// first; `None` while syncing).
    pub fn point_age(&self) -> Option<Duration> {
        self.last_cut.or(self.synced_at).map(|t| t.elapsed())
    }

    /// The last round read every change drained before its instant (the dirty set fit in
    /// `round-mib`). Rounds that keep leaving work behind mean churn outruns readback.
    pub fn took_all_changes(&self) -> bool {
        self.round_complete
    }

    /// Changes are waiting to be read or sent.
    pub fn has_pending_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.zeroed.is_empty() || self.uncut
    }

    /// Fold one completed change in: data to read back, or a range known to read as zero
    /// (where no recent read of it ended after the change completed; see the module doc).
    /// Events of one device arrive in completion order, so a later op wins.
    fn note(&mut self, e: &agent_common::ChangeEvent) {
        if e.op & op::CHANGES_DATA == 0 {
            return;
        }
        if e.op & op::LOST != 0 {
            self.counters.lost_completions += 1;
        }
        let (s, l) = (e.sector, u64::from(e.sectors));
        // Write-zeroes always reads as zeroes; a discard only where the device says so; a
        // secure erase leaves what the device likes.
        let mut read_back = op::WRITE | op::ERROR | op::LOST | op::SECURE_ERASE;
        if !self.discards_read_zero {
            read_back |= op::DISCARD;
        }
        if e.op & (op::WRITE_ZEROES | op::DISCARD) != 0 && e.op & read_back == 0 {
            for (ps, pl, after) in self.read_log.classify(s, l, e.time_ns) {
                match after {
                    AfterZeroing::NotRead => self.zeroed.insert(ps, pl),
                    AfterZeroing::ReadAfter => self.zeroed.remove(ps, pl),
                    AfterZeroing::ReadDuring => {
                        self.zeroed.remove(ps, pl);
                        self.dirty.insert(ps, pl);
                    }
                }
            }
        } else {
            // Writes, failed requests (their range may hold anything), lost completions
            // (their op may have been a discard), and discards that need not read as
            // zeroes: read back.
            self.zeroed.remove(s, l);
            self.dirty.insert(s, l);
        }
        self.oldest_change = Some(self.oldest_change.map_or(e.time_ns, |o| o.min(e.time_ns)));
    }

    /// Writes back the device's dirty page cache over the ranges this round will read
    /// (the dirty set and the next initial-sync chunk) before the round's instant, so the
    /// O_DIRECT reads do not start those writes themselves and race them (see
    /// [`DeviceReader::write_back`]). Past [`WRITE_BACK_MAX_CALLS`] ranges, one call spans
    /// them all. Only an optimisation: a failure is logged and the round goes on (a read
    /// that flushes is caught as raced, as before).
    fn write_back_page_cache(&mut self, cfg: &RoundConfig) {
        let mut ranges: Vec<(u64, u64)> = self.dirty.iter().collect();
        if let Some(cursor) = self.sync_cursor {
            ranges.push((cursor, cfg.sync_chunk_sectors));
        }
        if ranges.len() > WRITE_BACK_MAX_CALLS {
            let start = ranges.iter().map(|r| r.0).min().unwrap_or(0);
            let end = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
            ranges = vec![(start, end - start)];
        }
        for (s, l) in ranges {
            if let Err(e) = self.reader.write_back(s, l) {
                tracing::debug!(
                    device = %self.dev.path.display(),
                    sector = s,
                    sectors = l,
                    "writing back the device's page cache: {e}"
                );
                return;
            }
        }
    }

    /// Sectors copied by the initial sync so far.
    pub fn synced_sectors(&self) -> u64 {
        self.sync_cursor.unwrap_or(self.dev.sectors)
    }

    /// A read that failed every attempt: the range stays dirty (read again next round),
    /// the round is neither clean nor complete (no cut may claim the range), and the
    /// error is reported; replication of everything else goes on.
    fn read_failed(&mut self, sector: u64, sectors: u64, e: &anyhow::Error) {
        self.counters.read_errors += 1;
        self.round_clean = false;
        self.round_complete = false;
        self.dirty.insert(sector, sectors);
        tracing::error!(
            device = %self.dev.path.display(),
            sector,
            sectors,
            "read failed after {} attempts; the range stays dirty and no point is taken \
             until it reads: {e:#}",
            super::readback::READ_ATTEMPTS
        );
    }

    /// Read phase of one disk: read `work` (sorted, possibly overlapping) into the round
    /// buffer, checking each piece against the generations of `snap` right after its
    /// read. What does not fit in the buffer goes back into the dirty set.
    fn read_phase(
        &mut self,
        capture: &mut Capture,
        snap: &GenSnapshot,
        slot: usize,
        work: &[(u64, u64)],
        buf_bytes: usize,
        later: &mut Vec<agent_common::ChangeEvent>,
    ) -> anyhow::Result<()> {
        self.pieces.clear();
        let buf = self
            .round_buf
            .get_or_insert_with(|| AlignedBuf::new(buf_bytes))
            .as_mut_slice();
        let mut used = 0usize;
        let mut failed = Vec::new();
        for &(s, l) in work {
            for (ps, pl) in self.reader.pieces(s, l) {
                let bytes = (pl * 512) as usize;
                if used + bytes > buf.len() {
                    self.dirty.insert(ps, pl);
                    self.round_complete = false;
                    continue;
                }
                let started = now_mono_ns();
                if let Err(e) = self.reader.read_into(ps, &mut buf[used..used + bytes]) {
                    failed.push((ps, pl, e));
                    continue;
                }
                self.read_log.record(ps, pl, started, now_mono_ns());
                self.counters.bytes_read += bytes as u64;
                if capture.regions_raced_since(snap, slot, ps, pl) {
                    self.round_clean = false;
                    self.counters.raced_reads += 1;
                    self.dirty.insert(ps, pl);
                }
                self.pieces.push((ps, pl, used));
                used += bytes;
                if self.pieces.len().is_multiple_of(64) {
                    // Keep the ring from filling during a long phase; these completed
                    // after T and belong to the next round.
                    capture.drain_events(|e| later.push(e))?;
                }
            }
        }
        for (ps, pl, e) in failed {
            self.read_failed(ps, pl, &e);
        }
        Ok(())
    }
}

pub use round::round;
