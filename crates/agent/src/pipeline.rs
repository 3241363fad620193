//! The replication pipeline's producer side: readback rounds (see `readback.rs`), zero
//! detection, batching, compression and sealing.

use std::time::Instant;

use agent_common::op;
use anyhow::Context as _;
use ripcord_proto::{
    Batch, DiskId, Extent, ExtentKind, FLAG_COMPRESSED, FLAG_SEALED, MAX_EXTENTS_PER_BATCH, aead,
};
use ripcord_seal::{DataKey, Flags, Sealer};

use crate::{capture::Capture, device::BlockDevice, extents::ExtentSet, readback::DeviceReader};

/// Zero detection granularity, in sectors (64 KiB).
const ZERO_GRAIN: u64 = 128;

/// What the producer hands to the network side, per disk, in stream order.
#[derive(Debug)]
pub enum Outgoing {
    /// A sealed batch, with the completion time (CLOCK_MONOTONIC ns) of the oldest change
    /// it carries, for lag measurement (`None` for initial-sync data).
    Batch(Batch, Option<u64>),
    /// A crash-consistent point after batch `seq` (0: before any batch), at instant
    /// `mono_ns`. Sent once every write in flight at that instant has been seen to
    /// complete, so it may follow later batches in the stream.
    Cut {
        time_ns: u64,
        mono_ns: u64,
        seq: u64,
        /// Application-consistent (taken with the file systems frozen).
        app: bool,
    },
}

/// How long a queued write may stay without a reported completion before the agent
/// treats its completion as unseen: it re-reads the range and drops the cuts that waited
/// for it.
pub const LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// A cut taken but not sent yet: it waits for the writes that were in flight at its
/// instant (by in-flight id) to be reported complete.
#[derive(Debug)]
struct Withheld {
    time_ns: u64,
    mono_ns: u64,
    seq: u64,
    app: bool,
    waiting: Vec<u64>,
}

/// Builds sealed batches from device data.
pub struct BatchBuilder {
    machine: String,
    disk: DiskId,
    epoch: u64,
    key: DataKey,
    level: i32,
    max_plain: usize,
    next_seq: u64,
    extents: Vec<Extent>,
    plain: Vec<u8>,
    sealer: Sealer,
}

impl BatchBuilder {
    pub fn new(
        machine: &str,
        disk: DiskId,
        epoch: u64,
        key: DataKey,
        level: i32,
        max_plain: usize,
    ) -> Self {
        BatchBuilder {
            machine: machine.to_owned(),
            disk,
            epoch,
            key,
            level,
            max_plain,
            next_seq: 1,
            extents: Vec::new(),
            plain: Vec::with_capacity(max_plain),
            sealer: Sealer::new(),
        }
    }

    /// Sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn push_extent(&mut self, sector: u64, sectors: u64, kind: ExtentKind) {
        if let Some(last) = self.extents.last_mut()
            && last.kind == kind
            && last.sector + u64::from(last.sectors) == sector
            && u64::from(last.sectors) + sectors <= u64::from(u32::MAX)
        {
            last.sectors += sectors as u32;
            return;
        }
        self.extents.push(Extent {
            sector,
            sectors: sectors as u32,
            kind,
        });
    }

    fn full(&self) -> bool {
        self.plain.len() >= self.max_plain || self.extents.len() >= MAX_EXTENTS_PER_BATCH - 2
    }

    /// Add device data read at `sector` (512-byte units); all-zero 64 KiB grains become
    /// zero extents (nothing sent). Returns batches that filled up.
    pub fn add(&mut self, sector: u64, data: &[u8]) -> anyhow::Result<Vec<Batch>> {
        let mut out = Vec::new();
        let sectors = data.len() as u64 / 512;
        let mut s = 0;
        while s < sectors {
            // Grains align to absolute sector numbers so merges line up.
            let grain_end = ((sector + s) / ZERO_GRAIN + 1) * ZERO_GRAIN - sector;
            let e = grain_end.min(sectors);
            let bytes = &data[(s * 512) as usize..(e * 512) as usize];
            if is_zero(bytes) {
                self.push_extent(sector + s, e - s, ExtentKind::Zero);
            } else {
                self.push_extent(sector + s, e - s, ExtentKind::Data);
                self.plain.extend_from_slice(bytes);
            }
            s = e;
            if self.full() {
                out.extend(self.flush()?);
            }
        }
        Ok(out)
    }

    /// Add a range that reads as zeroes without reading it (a completed discard or
    /// write-zeroes). Returns batches that filled up.
    pub fn add_zero(
        &mut self,
        sector: u64,
        sectors: u64,
        kind: ExtentKind,
    ) -> anyhow::Result<Vec<Batch>> {
        let mut out = Vec::new();
        let mut s = 0;
        while s < sectors {
            let n = (sectors - s).min(u64::from(u32::MAX) / 2);
            self.push_extent(sector + s, n, kind);
            s += n;
            if self.full() {
                out.extend(self.flush()?);
            }
        }
        Ok(out)
    }

    /// Seal whatever is pending into a batch.
    pub fn flush(&mut self) -> anyhow::Result<Option<Batch>> {
        if self.extents.is_empty() {
            return Ok(None);
        }
        let seq = self.next_seq;
        let extents = std::mem::take(&mut self.extents);
        let aad = aead::batch_aad(&self.machine, &self.disk, self.epoch, seq, seq, &extents);
        let nonce = aead::nonce(self.epoch, seq)?;
        let mut payload = Vec::with_capacity(self.plain.len() / 2 + 64);
        let flags = self
            .sealer
            .seal_into(
                &self.key,
                &aad,
                nonce,
                &self.plain,
                self.level,
                &mut payload,
            )
            .context("sealing a batch")?;
        self.plain.clear();
        self.next_seq += 1;
        Ok(Some(Batch {
            disk_id: self.disk,
            epoch: self.epoch,
            first_seq: seq,
            last_seq: seq,
            extents,
            flags: FLAG_SEALED
                | if flags == Flags::Zstd {
                    FLAG_COMPRESSED
                } else {
                    0
                },
            payload,
        }))
    }
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    words
        .into_iter()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && tail.iter().all(|&x| x == 0)
}

/// Counters of one disk's producer.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskCounters {
    pub bytes_read: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub batches: u64,
    pub cuts: u64,
    pub raced_reads: u64,
    /// Application-consistent cuts sent.
    pub app_cuts: u64,
    /// Application-consistent cuts taken (sent, withheld or dropped).
    pub app_cuts_taken: u64,
    /// Cuts dropped because a write in flight at their instant was never seen to
    /// complete.
    pub cuts_dropped: u64,
    /// Queued writes whose completion was never reported (their ranges were re-read).
    pub lost_completions: u64,
    pub rounds: u64,
    pub clean_rounds: u64,
    /// Change events the kernel could not queue (their regions were resynchronised).
    pub dropped: u64,
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
    pub builder: BatchBuilder,
    /// Oldest completion time among changes drained but not yet sent.
    oldest_change: Option<u64>,
    /// Data sent since the last cut.
    uncut: bool,
    last_cut: Option<Instant>,
    /// Cuts waiting for in-flight writes, oldest first.
    withheld: std::collections::VecDeque<Withheld>,
    /// Earliest queue time of a write reported lost since the last settle.
    lost_since: Option<u64>,
    /// Last seen count of lost-completion reports that found the ring full.
    lost_reports_dropped: u64,
    pub counters: DiskCounters,
}

impl DiskProducer {
    pub fn new(dev: BlockDevice, builder: BatchBuilder) -> anyhow::Result<DiskProducer> {
        Ok(DiskProducer {
            reader: DeviceReader::open(&dev)?,
            dev,
            dirty: ExtentSet::new(),
            zeroed: ExtentSet::new(),
            sync_cursor: Some(0),
            builder,
            oldest_change: None,
            uncut: false,
            last_cut: None,
            withheld: std::collections::VecDeque::new(),
            lost_since: None,
            lost_reports_dropped: 0,
            counters: DiskCounters::default(),
        })
    }

    pub fn syncing(&self) -> bool {
        self.sync_cursor.is_some()
    }

    /// Cuts taken and not sent yet (waiting for in-flight writes).
    pub fn withheld_cuts(&self) -> usize {
        self.withheld.len()
    }

    /// Send the withheld cuts whose writes have all been reported complete, in order;
    /// drop those a lost completion makes invalid.
    fn settle(
        &mut self,
        slot: usize,
        inflight: &std::collections::HashSet<u64>,
        lost_ids: &std::collections::HashSet<u64>,
        send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let lost_since = self.lost_since.take();
        let before = self.withheld.len();
        // A write queued at q whose completion was never seen may have completed before
        // any instant after q: every cut waiting at or after q is suspect.
        self.withheld.retain(|w| {
            lost_since.is_none_or(|q| w.mono_ns < q)
                && !w.waiting.iter().any(|id| lost_ids.contains(id))
        });
        let dropped = (before - self.withheld.len()) as u64;
        if dropped > 0 {
            self.counters.cuts_dropped += dropped;
            self.uncut = true;
        }
        while let Some(w) = self.withheld.front() {
            if w.waiting.iter().any(|id| inflight.contains(id)) {
                break;
            }
            let w = self.withheld.pop_front().expect("front exists");
            send(
                slot,
                Outgoing::Cut {
                    time_ns: w.time_ns,
                    mono_ns: w.mono_ns,
                    seq: w.seq,
                    app: w.app,
                },
            )?;
            self.counters.cuts += 1;
            if w.app {
                self.counters.app_cuts += 1;
            }
        }
        Ok(())
    }

    /// Fold one completed change in: data to read back, or a range known to read as zero.
    /// Events of one device arrive in completion order, so a later op wins.
    fn note(&mut self, e: &agent_common::ChangeEvent) {
        if e.op & op::CHANGES_DATA == 0 {
            return;
        }
        if e.op & op::LOST != 0 {
            // `time_ns` of a lost-completion report is the write's queue time.
            self.counters.lost_completions += 1;
            self.lost_since = Some(self.lost_since.map_or(e.time_ns, |q| q.min(e.time_ns)));
        }
        let (s, l) = (e.sector, u64::from(e.sectors));
        let zeroing = op::DISCARD | op::SECURE_ERASE | op::WRITE_ZEROES;
        if e.op & zeroing != 0 && e.op & (op::WRITE | op::ERROR) == 0 {
            self.dirty.remove(s, l);
            self.zeroed.insert(s, l);
        } else {
            // Writes, and failed requests (their range may hold anything): read back.
            self.zeroed.remove(s, l);
            self.dirty.insert(s, l);
        }
        self.oldest_change = Some(self.oldest_change.map_or(e.time_ns, |o| o.min(e.time_ns)));
    }

    /// Sectors copied by the initial sync so far.
    pub fn synced_sectors(&self) -> u64 {
        self.sync_cursor.unwrap_or(self.dev.sectors)
    }
}

/// Tuning of rounds.
#[derive(Clone, Copy, Debug)]
pub struct RoundConfig {
    pub round_sectors: u64,
    pub sync_chunk_sectors: u64,
    pub cut_interval: std::time::Duration,
    /// Take an application-consistent cut in this round if it is clean (the caller has
    /// frozen the file systems), whatever the interval and even if nothing changed.
    pub app_cut: bool,
}

/// Monotonic and wall clocks in ns.
pub fn now_mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn now_wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Run one round over all disks; `send(slot, item)` hands work to the network side
/// (blocking when it is full). Returns whether any data was read.
pub fn round(
    capture: &mut Capture,
    disks: &mut [DiskProducer],
    cfg: &RoundConfig,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    // 1. Generations first (see readback.rs), 2. then everything completed so far.
    let snap = capture.gen_snapshot();
    let t_mono = now_mono_ns();
    let t_wall = now_wall_ns();
    let drained_all = capture.drain_events_through_now(|e| {
        if let Some(d) = disks.get_mut(e.slot as usize) {
            d.note(&e);
        }
    })?;
    // Writes queued and not yet reported complete at this instant: a cut taken now waits
    // for them (one whose completion the kernel never shows would otherwise be missing
    // from the cut without anyone knowing).
    let inflight_at_t: Vec<u64> = capture.inflight_ids().into_iter().collect();
    let mut worked = false;
    // Changes that complete while this round reads belong to the next round; they are
    // taken off the ring as the round goes, so a long round does not overflow it.
    let mut later: Vec<agent_common::ChangeEvent> = Vec::new();
    let mut pieces_since_drain = 0u32;
    for (slot, d) in disks.iter_mut().enumerate() {
        let overflow = capture.drain_overflow(slot);
        d.counters.dropped = capture.stats(slot).dropped;
        for (s, l) in overflow.regions.iter() {
            d.dirty.insert(s, l);
        }
        if overflow.missed > 0 {
            d.counters.missed += overflow.missed;
            tracing::warn!(
                device = %d.dev.path.display(),
                missed = overflow.missed,
                "writes capture could not follow (the queue probe was skipped or failed, or \
                 the in-flight map was full): resynchronising the whole device"
            );
        }
        if overflow.whole_device {
            d.dirty.insert(0, d.dev.sectors);
        }
        let mut work = d.dirty.take_up_to(cfg.round_sectors);
        let complete = d.dirty.is_empty();
        if let Some(cursor) = d.sync_cursor {
            let end = (cursor + cfg.sync_chunk_sectors).min(d.dev.sectors);
            work.push((cursor, end - cursor));
            d.sync_cursor = (end < d.dev.sectors).then_some(end);
        }
        let oldest = d.oldest_change.take();
        d.counters.rounds += 1;
        for (s, l) in d.zeroed.take().iter() {
            for b in d.builder.add_zero(s, l, ExtentKind::Zero)? {
                d.counters.batches += 1;
                count_batch(&mut d.counters, &b);
                send(slot, Outgoing::Batch(b, oldest))?;
            }
            worked = true;
            d.uncut = true;
        }
        let mut clean = true;
        for (s, l) in work {
            for (ps, pl) in d.reader.pieces(s, l) {
                let data = d.reader.read(ps, pl)?;
                d.counters.bytes_read += data.len() as u64;
                if capture.raced_since(&snap, slot, ps, pl) {
                    clean = false;
                    d.counters.raced_reads += 1;
                    d.dirty.insert(ps, pl);
                }
                for b in d.builder.add(ps, data)? {
                    d.counters.batches += 1;
                    count_batch(&mut d.counters, &b);
                    send(slot, Outgoing::Batch(b, oldest))?;
                }
                worked = true;
                d.uncut = true;
                pieces_since_drain += 1;
                if pieces_since_drain >= 8 {
                    pieces_since_drain = 0;
                    capture.drain_events(|e| later.push(e))?;
                }
            }
        }
        if let Some(b) = d.builder.flush()? {
            d.counters.batches += 1;
            count_batch(&mut d.counters, &b);
            send(slot, Outgoing::Batch(b, oldest))?;
        }
        if clean && complete {
            d.counters.clean_rounds += 1;
        }
        let due = cfg.app_cut || d.last_cut.is_none_or(|t| t.elapsed() >= cfg.cut_interval);
        let wanted = d.uncut || cfg.app_cut;
        if clean && complete && drained_all && !d.syncing() && wanted && due {
            d.withheld.push_back(Withheld {
                time_ns: t_wall,
                mono_ns: t_mono,
                seq: d.builder.next_seq() - 1,
                app: cfg.app_cut,
                waiting: inflight_at_t.clone(),
            });
            if cfg.app_cut {
                d.counters.app_cuts_taken += 1;
            }
            d.uncut = false;
            d.last_cut = Some(Instant::now());
        }
    }
    for e in &later {
        if let Some(d) = disks.get_mut(e.slot as usize) {
            d.note(e);
        }
    }
    // Which writes are still unreported now; then every event committed before that, so
    // a write reported lost (its entry replaced by a new bio at the same address; the
    // report is committed before the replacement) is known before a cut waiting for it is
    // released.
    // One map walk serves both the release check and the stall check below.
    let inflight = capture.inflight();
    let inflight_now = capture.unreported_ids(&inflight);
    capture.drain_events_through_now(|e| {
        if let Some(d) = disks.get_mut(e.slot as usize) {
            d.note(&e);
        }
    })?;
    let lost_reports_dropped = capture.lost_reports_dropped();
    // Writes that stayed in flight too long were completed without the completion probe
    // running (or are stuck): read them back, and drop the cuts that waited for them.
    let mut lost_ids = std::collections::HashSet::new();
    for lost in capture.stalled_in(&inflight, LOST_AFTER) {
        lost_ids.insert(lost.id);
        for (slot, sector, sectors) in lost.ranges {
            if let Some(d) = disks.get_mut(slot) {
                tracing::warn!(
                    device = %d.dev.path.display(),
                    sector,
                    sectors,
                    "a queued write's completion was never reported: reading the range back"
                );
                d.counters.lost_completions += 1;
                d.zeroed.remove(sector, sectors);
                d.dirty.insert(sector, sectors);
            }
        }
    }
    for (slot, d) in disks.iter_mut().enumerate() {
        if lost_reports_dropped != d.lost_reports_dropped {
            // A lost-completion report did not fit in the ring: its queue time is
            // unknown, so no withheld cut can be trusted.
            d.lost_reports_dropped = lost_reports_dropped;
            d.lost_since = Some(0);
        }
        d.settle(slot, &inflight_now, &lost_ids, send)?;
    }
    Ok(worked)
}

fn count_batch(c: &mut DiskCounters, b: &Batch) {
    for e in &b.extents {
        let bytes = u64::from(e.sectors) * 512;
        match e.kind {
            ExtentKind::Data => c.data_bytes += bytes,
            _ => c.zero_bytes += bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_seal::Sealer;

    fn builder(max: usize) -> BatchBuilder {
        BatchBuilder::new(
            "m1",
            DiskId([1; 16]),
            3,
            DataKey::from_bytes([9; 32]),
            1,
            max,
        )
    }

    fn open(b: &Batch) -> Vec<u8> {
        let aad = aead::batch_aad(
            "m1",
            &b.disk_id,
            b.epoch,
            b.first_seq,
            b.last_seq,
            &b.extents,
        );
        let nonce = aead::nonce(b.epoch, b.first_seq).unwrap();
        let flags = if b.flags & FLAG_COMPRESSED != 0 {
            Flags::Zstd
        } else {
            Flags::Stored
        };
        let mut out = Vec::new();
        Sealer::new()
            .open_into(
                &DataKey::from_bytes([9; 32]),
                &aad,
                nonce,
                flags,
                &b.payload,
                64 << 20,
                &mut out,
            )
            .unwrap();
        out
    }

    #[test]
    fn zero_grains_become_zero_extents_and_data_round_trips() {
        let mut b = builder(1 << 20);
        let mut data = vec![0u8; 256 * 512]; // two grains at sector 128: zero, then data
        data[128 * 512 + 7] = 1;
        assert!(b.add(128, &data).unwrap().is_empty());
        let batch = b.flush().unwrap().unwrap();
        assert_eq!(
            batch.extents,
            vec![
                Extent {
                    sector: 128,
                    sectors: 128,
                    kind: ExtentKind::Zero
                },
                Extent {
                    sector: 256,
                    sectors: 128,
                    kind: ExtentKind::Data
                },
            ]
        );
        assert_eq!(open(&batch), data[128 * 512..]);
        assert_eq!((batch.first_seq, b.next_seq()), (1, 2));
        assert!(b.flush().unwrap().is_none());
    }

    #[test]
    fn batches_fill_up_and_extents_merge() {
        let mut b = builder(64 << 10);
        let data: Vec<u8> = (0..(512 * 512)).map(|i| (i % 251) as u8 + 1).collect();
        let full = b.add(0, &data).unwrap();
        assert_eq!(full.len(), 4, "256 KiB of data in 64 KiB batches");
        for (i, batch) in full.iter().enumerate() {
            assert_eq!(batch.first_seq, i as u64 + 1);
            assert_eq!(batch.extents.len(), 1, "adjacent grains merge");
            assert_eq!(open(batch), data[i * 65536..(i + 1) * 65536]);
        }
        // Tampering with the extent list breaks authentication.
        let mut bad = full[0].clone();
        bad.extents[0].sector += 1;
        let aad = aead::batch_aad("m1", &bad.disk_id, bad.epoch, 1, 1, &bad.extents);
        let flags = if bad.flags & FLAG_COMPRESSED != 0 {
            Flags::Zstd
        } else {
            Flags::Stored
        };
        let mut out = Vec::new();
        assert!(
            Sealer::new()
                .open_into(
                    &DataKey::from_bytes([9; 32]),
                    &aad,
                    aead::nonce(3, 1).unwrap(),
                    flags,
                    &bad.payload,
                    1 << 20,
                    &mut out
                )
                .is_err()
        );
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0; 1001];
        v[1000] = 1;
        assert!(!is_zero(&v));
        v[1000] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
