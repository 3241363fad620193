//! Loading and driving the capture programs: protect devices, attach the tracepoints,
//! consume change events, and fold back the overflow bitmap.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    sync::atomic::Ordering,
    time::Duration,
};

use agent_common::{
    ChangeEvent, DEFAULT_RING_BYTES, DiskRanges, INFLIGHT_SLOTS, INFLIGHT_WORDS_PER_SLOT,
    MAX_RANGES_PER_DISK, MAX_SLOTS, OVERFLOW_WORDS, OVERFLOW_WORDS_PER_SLOT, ProtectedRange,
    SlotStats, WRITE_GEN_ENTRIES, WRITE_GEN_REGION_SHIFT, control, write_gen_index,
};
use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, RingBuf},
    programs::{RawTracePoint, raw_trace_point::RawTracePointLinkId},
};

use crate::{
    btf,
    device::BlockDevice,
    event,
    extents::ExtentSet,
    mmap::{MmapWords, RingPositions, page_size},
};

mod inflight;

pub use inflight::Stalled;

/// How long a queued write may stay without a reported completion before it is treated
/// as unseen ([`Capture::stalled`]): it is reported once and its range is re-read; later
/// rounds keep reading it as in flight until its entry goes (see
/// [`Capture::inflight_ranges`]).
pub const LOST_AFTER: Duration = Duration::from_secs(3);

/// The BPF object built by build.rs.
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ripcord-agent-ebpf"));

/// Tuning of the capture path.
#[derive(Clone, Copy, Debug)]
pub struct CaptureConfig {
    /// Ring buffer size in bytes: a power of two and a multiple of the page size.
    pub ring_bytes: u32,
    /// Bytes waiting in the ring before the kernel wakes the agent; below it, the agent's
    /// poll timeout collects them.
    pub wakeup_bytes: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            ring_bytes: DEFAULT_RING_BYTES,
            wakeup_bytes: 64 * 1024,
        }
    }
}

impl CaptureConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let page = page_size();
        ensure!(
            self.ring_bytes.is_power_of_two() && self.ring_bytes as usize >= page,
            "ring size {} must be a power of two and at least the page size ({page})",
            self.ring_bytes
        );
        Ok(())
    }
}

/// What the overflow bitmap says must be resynchronised for one slot.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Overflow {
    /// Regions whose events were dropped (device-relative sectors).
    pub regions: ExtentSet,
    /// Resync the whole device: a dropped event was too wide for the bitmap, or a queued
    /// write could not be followed (see [`Capture::missed_completions`]).
    pub whole_device: bool,
    /// Writes that could not be followed since the last drain of this slot.
    pub missed: u64,
    /// Passthrough requests with data out completed on the slot's disk since the last
    /// drain (`whole_device` is set for them; see `agent_common::op::PASSTHROUGH_OUT`).
    pub passthrough: u64,
}

/// Write generations at one instant (see [`Capture::gen_snapshot`]).
pub struct GenSnapshot {
    words: Vec<u64>,
    wide: Vec<u64>,
    /// Skipped runs of the queue probe at the snapshot (see [`Capture::raced_since`]).
    queue_misses: u64,
}

/// The loaded and attached capture programs.
pub struct Capture {
    ebpf: Ebpf,
    /// The programs' aya-log records, forwarded to `tracing` whenever events are drained.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    links: Vec<(&'static str, RawTracePointLinkId)>,
    ring: RingBuf<MapData>,
    positions: RingPositions,
    stats: Array<MapData, SlotStats>,
    control: Array<MapData, u64>,
    /// The in-flight table (see `agent_common::InflightBio`), as words.
    inflight: MmapWords,
    overflow: MmapWords,
    write_gen: MmapWords,
    devices: Vec<BlockDevice>,
    overflow_all_seen: Vec<u64>,
    missed_seen: Vec<u64>,
    passthrough_seen: Vec<u64>,
    /// In-flight writes (bio address, queue time) already reported by [`Capture::stalled`].
    reported: std::collections::HashSet<(u64, u64)>,
}

/// Test-only fault injection: `RIPCORD_FAULT_SKIP_COMPLETIONS=N` makes the completion
/// probe ignore every N-th data completion, as the kernel sometimes does, so tests can
/// show that lost completions are detected and repaired.
pub const FAULT_SKIP_ENV: &str = "RIPCORD_FAULT_SKIP_COMPLETIONS";

fn fault_skip_every() -> anyhow::Result<Option<u64>> {
    match std::env::var(FAULT_SKIP_ENV) {
        Err(_) => Ok(None),
        Ok(v) => {
            let n: u64 = v
                .parse()
                .with_context(|| format!("{FAULT_SKIP_ENV}={v:?} is not a number"))?;
            Ok((n > 0).then_some(n))
        }
    }
}

/// Environment variable choosing which of the BPF programs' diagnostics are compiled in at
/// load time: `off`, `error`, `warn` (default), `info`, `debug` or `trace`.
pub const BPF_LOG_ENV: &str = "RIPCORD_BPF_LOG";

/// The aya-log level for [`BPF_LOG_ENV`] (statements above it are pruned by the verifier).
fn bpf_log_level() -> anyhow::Result<u8> {
    let v = std::env::var(BPF_LOG_ENV).unwrap_or_else(|_| "warn".to_owned());
    Ok(match v.to_ascii_lowercase().as_str() {
        "off" => 0,
        "error" => aya_log::Level::Error as u8,
        "warn" => aya_log::Level::Warn as u8,
        "info" => aya_log::Level::Info as u8,
        "debug" => aya_log::Level::Debug as u8,
        "trace" => aya_log::Level::Trace as u8,
        _ => anyhow::bail!("{BPF_LOG_ENV}={v:?}: expected off, error, warn, info, debug or trace"),
    })
}

/// The programs and the raw tracepoints they attach to, in attach order.
const PROGRAMS: [(&str, &str); 4] = [
    (COMPLETE_PROBE, "block_rq_complete"),
    (PASSTHROUGH_PROBE, "block_rq_complete"),
    (BIO_COMPLETE_PROBE, "block_bio_complete"),
    (QUEUE_PROBE, "block_bio_queue"),
];
const COMPLETE_PROBE: &str = "block_rq_complete";
const BIO_COMPLETE_PROBE: &str = "block_bio_complete";
const PASSTHROUGH_PROBE: &str = "block_rq_passthrough";
const QUEUE_PROBE: &str = "block_bio_queue";

impl Capture {
    /// Load the programs, protect `devices` (slot = index), and attach.
    pub fn start(devices: &[BlockDevice], config: CaptureConfig) -> anyhow::Result<Capture> {
        config.validate()?;
        ensure!(!devices.is_empty(), "no devices to protect");
        ensure!(
            devices.len() <= MAX_SLOTS as usize,
            "at most {MAX_SLOTS} devices per agent"
        );
        for (i, a) in devices.iter().enumerate() {
            for b in &devices[..i] {
                let overlap = a.disk == b.disk
                    && a.start < b.start + b.sectors
                    && b.start < a.start + a.sectors;
                ensure!(
                    !overlap,
                    "{} and {} overlap on disk {}: protect either the disk or its partitions",
                    a.path.display(),
                    b.path.display(),
                    a.disk
                );
            }
        }
        let layout = btf::block_layout(&btf::Btf::kernel()?)?;
        let log_level = bpf_log_level()?;
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &log_level, false);
        loader.override_global("LAYOUT", &layout, true);
        loader.override_global("WAKEUP_BYTES", &config.wakeup_bytes, true);
        loader.map_max_entries("EVENTS", config.ring_bytes);
        let mut ebpf = loader.load(BPF_OBJECT).context("loading the BPF object")?;

        // Protect before attaching, so the first event already passes the filter.
        {
            let mut protected: HashMap<_, u32, DiskRanges> =
                HashMap::try_from(ebpf.map_mut("PROTECTED").context("map PROTECTED")?)?;
            let mut by_disk: BTreeMap<u32, DiskRanges> = BTreeMap::new();
            for (slot, dev) in devices.iter().enumerate() {
                let entry = by_disk.entry(dev.disk.kernel()).or_default();
                let i = entry.count as usize;
                ensure!(
                    i < MAX_RANGES_PER_DISK,
                    "more than {MAX_RANGES_PER_DISK} protected partitions on disk {}",
                    dev.disk
                );
                entry.ranges[i] = ProtectedRange {
                    start: dev.start,
                    len: dev.sectors,
                    slot: slot as u32,
                    overflow_shift: dev.overflow_shift(),
                };
                entry.count += 1;
            }
            for (disk, ranges) in by_disk {
                protected
                    .insert(disk, ranges, 0)
                    .context("filling PROTECTED")?;
            }
        }

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("no diagnostics from the BPF programs: {e}");
                None
            }
        };
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS")?)?;
        let positions = RingPositions::new(ring.as_fd().as_raw_fd())?;
        let stats = Array::try_from(ebpf.take_map("STATS").context("map STATS")?)?;
        let mut control: Array<MapData, u64> =
            Array::try_from(ebpf.take_map("CONTROL").context("map CONTROL")?)?;
        if let Some(every) = fault_skip_every()? {
            tracing::warn!(
                every,
                "FAULT INJECTION: ignoring every {every}th data completion \
                 ({FAULT_SKIP_ENV}); for tests only"
            );
            control
                .set(control::FAULT_SKIP_EVERY, every, 0)
                .context("setting fault injection")?;
        }
        let inflight = MmapWords::new(
            array_data(&mut ebpf, "INFLIGHT")?,
            INFLIGHT_SLOTS * INFLIGHT_WORDS_PER_SLOT,
        )?;
        let overflow = MmapWords::new(array_data(&mut ebpf, "OVERFLOW")?, OVERFLOW_WORDS)?;
        let write_gen = MmapWords::new(array_data(&mut ebpf, "WRITE_GEN")?, WRITE_GEN_ENTRIES)?;

        let mut links = Vec::new();
        // Completion probes first, so no in-flight entry is made without them.
        for (name, tracepoint) in PROGRAMS {
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the BPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading program {name}"))?;
            let link = prog
                .attach(tracepoint)
                .with_context(|| format!("attaching {name} to raw tracepoint {tracepoint}"))?;
            links.push((name, link));
        }
        Ok(Capture {
            ebpf,
            logger,
            links,
            ring,
            positions,
            stats,
            control,
            inflight,
            overflow,
            write_gen,
            devices: devices.to_vec(),
            overflow_all_seen: vec![0; devices.len()],
            missed_seen: vec![0; devices.len()],
            passthrough_seen: vec![0; devices.len()],
            reported: std::collections::HashSet::new(),
        })
    }

    /// The protected devices, by slot.
    pub fn devices(&self) -> &[BlockDevice] {
        &self.devices
    }

    /// Wait until the ring signals readiness or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> std::io::Result<()> {
        let fd: BorrowedFd<'_> = self.ring.as_fd();
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Consume every event committed to the ring before this call, waiting for records
    /// other CPUs are still writing (the ring hands out records in reservation order, so
    /// one busy record hides the ones after it). Returns false if a record stayed busy
    /// for 100 ms (then the caller must not treat what it drained as complete).
    pub fn drain_events_through_now(
        &mut self,
        mut f: impl FnMut(ChangeEvent),
    ) -> Result<bool, event::DecodeError> {
        let target = RingPositions::load(self.positions.producer);
        self.drain_events(&mut f)?;
        let deadline = std::time::Instant::now() + Duration::from_millis(100);
        while RingPositions::load(self.positions.consumer) < target {
            if std::time::Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::yield_now();
            self.drain_events(&mut f)?;
        }
        Ok(true)
    }

    /// Consume every event waiting in the ring.
    pub fn drain_events(
        &mut self,
        mut f: impl FnMut(ChangeEvent),
    ) -> Result<usize, event::DecodeError> {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            let event = event::decode(&item)?;
            drop(item);
            if (event.slot as usize) < self.devices.len() {
                f(event);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Take (and clear) the overflow bitmap of `slot`.
    pub fn drain_overflow(&mut self, slot: usize) -> Overflow {
        let dev = &self.devices[slot];
        let shift = dev.overflow_shift();
        let mut regions = ExtentSet::new();
        let base = slot * OVERFLOW_WORDS_PER_SLOT as usize;
        for w in 0..OVERFLOW_WORDS_PER_SLOT as usize {
            let word = self.overflow.word(base + w);
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = (w as u64) * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = bit << shift;
                let len = (1u64 << shift).min(dev.sectors.saturating_sub(start));
                regions.insert(start, len);
            }
        }
        let stats = self.stats(slot);
        let all = stats.overflow_all;
        let passthrough = stats.passthrough_out - self.passthrough_seen[slot];
        self.passthrough_seen[slot] = stats.passthrough_out;
        let missed_total = self.missed_completions();
        let missed = missed_total - self.missed_seen[slot];
        let whole_device = all != self.overflow_all_seen[slot] || missed > 0;
        self.overflow_all_seen[slot] = all;
        self.missed_seen[slot] = missed_total;
        Overflow {
            regions,
            whole_device,
            missed,
            passthrough,
        }
    }

    /// Queued data bios the probes could not track since they were attached: runs of the
    /// queue probe the kernel skipped (it counts `recursion_misses`, e.g. when the probe
    /// would nest in itself on one CPU), runs that failed to read the kernel's bio, and
    /// bios that found the in-flight map full, and skipped or failed runs of the
    /// passthrough probe. Their completions would go unreported and their device is
    /// unknown, so the only safe response is to resynchronise every protected device. (Skipped *completion* runs need no such response: the bio's
    /// in-flight entry stays, and [`Capture::inflight`] shows it.)
    pub fn missed_completions(&self) -> u64 {
        self.missed_queues() + self.control_value(control::UNTRACKED) + self.missed_passthrough()
    }

    /// Runs of the completion probes the kernel skipped or that failed, and completed
    /// bios whose entries the probe left in flight (`control::LEFT_IN_FLIGHT`). Nothing
    /// to resync for them: those entries stay in the table and are read back, reported
    /// lost. Counted so that a lost report can be told from a probe that failed to free
    /// an entry it should have.
    pub fn completion_misses(&self) -> u64 {
        self.recursion_misses(COMPLETE_PROBE)
            + self.recursion_misses(BIO_COMPLETE_PROBE)
            + self.control_value(control::COMPLETE_ERRORS)
            + self.control_value(control::LEFT_IN_FLIGHT)
    }

    /// Skipped or failed runs of the passthrough probe: a passthrough write may have
    /// changed any protected disk.
    fn missed_passthrough(&self) -> u64 {
        self.recursion_misses(PASSTHROUGH_PROBE) + self.control_value(control::PASSTHROUGH_ERRORS)
    }

    /// Discard completions not reported because their bios were scattered (see
    /// `control::SCATTERED_DISCARDS`); their ranges are re-read as stalled writes.
    pub fn scattered_discards(&self) -> u64 {
        self.control_value(control::SCATTERED_DISCARDS)
    }

    /// Skipped or failed runs of the queue probe.
    fn missed_queues(&self) -> u64 {
        self.recursion_misses(QUEUE_PROBE) + self.control_value(control::QUEUE_ERRORS)
    }

    /// Lost-completion reports that found the ring full (see `control::LOST_DROPPED`).
    pub fn lost_reports_dropped(&self) -> u64 {
        self.control_value(control::LOST_DROPPED)
    }

    fn control_value(&self, index: u32) -> u64 {
        self.control.get(&index, 0).unwrap_or(0)
    }

    /// Skipped runs of program `name` (0 if it is not loaded or the kernel cannot say).
    fn recursion_misses(&self, name: &str) -> u64 {
        let Some(fd) = self.ebpf.program(name).and_then(|p| p.fd().ok()) else {
            return 0;
        };
        match prog_recursion_misses(fd.as_fd()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("reading the statistics of program {name}: {e}");
                0
            }
        }
    }

    /// Counters of `slot`.
    pub fn stats(&self, slot: usize) -> SlotStats {
        self.stats.get(&(slot as u32), 0).unwrap_or_default()
    }

    /// The write generation of the sectors `[sector, sector + len)` of `slot`: it changes
    /// whenever a write touching them is queued. Compare it before and after reading the
    /// range back; a change means a newer write raced the read.
    pub fn write_generation(&self, slot: usize, sector: u64, len: u64) -> u64 {
        let mut sum = self.stats(slot).wide_gen;
        if len == 0 {
            return sum;
        }
        let first = sector >> WRITE_GEN_REGION_SHIFT;
        let last = (sector + len - 1) >> WRITE_GEN_REGION_SHIFT;
        for region in first..=last {
            let i = write_gen_index(slot as u32, region) as usize;
            sum = sum.wrapping_add(self.write_gen.word(i).load(Ordering::Acquire));
        }
        sum
    }

    /// A copy of every write generation, taken before a readback round: a region whose
    /// generation differs after its read raced a write queued after the snapshot.
    /// (2^18 words: about 2 MiB, copied in well under a millisecond.)
    pub fn gen_snapshot(&self) -> GenSnapshot {
        let words = (0..self.write_gen.len)
            .map(|i| self.write_gen.word(i).load(Ordering::Acquire))
            .collect();
        let wide = (0..self.devices.len())
            .map(|slot| self.stats(slot).wide_gen)
            .collect();
        GenSnapshot {
            words,
            wide,
            queue_misses: self.missed_queues(),
        }
    }

    /// True if a write touching `[sector, sector + len)` of `slot` was queued since `snap`,
    /// as far as the per-region generations tell: no system call, only loads from the
    /// shared mapping. A round must also ask [`Capture::raced_anywhere_since`] once, after
    /// its last read: wide writes and skipped queue-probe runs race every region.
    pub fn regions_raced_since(
        &self,
        snap: &GenSnapshot,
        slot: usize,
        sector: u64,
        len: u64,
    ) -> bool {
        if len == 0 {
            return false;
        }
        let first = sector >> WRITE_GEN_REGION_SHIFT;
        let last = (sector + len - 1) >> WRITE_GEN_REGION_SHIFT;
        (first..=last).any(|region| {
            let i = write_gen_index(slot as u32, region) as usize;
            self.write_gen.word(i).load(Ordering::Acquire) != snap.words[i]
        })
    }

    /// True if, since `snap`, a write too wide for per-region generations was queued on
    /// any protected device, or the queue probe was skipped or failed (its write is
    /// unknown): then every read since `snap` counts as raced.
    pub fn raced_anywhere_since(&self, snap: &GenSnapshot) -> bool {
        self.missed_queues() != snap.queue_misses
            || (0..self.devices.len()).any(|slot| self.stats(slot).wide_gen != snap.wide[slot])
    }

    /// Detach the programs: no event is produced after this returns. Events already in
    /// the ring and the overflow bitmap can still be drained.
    pub fn detach(&mut self) -> anyhow::Result<()> {
        for (name, link) in self.links.drain(..) {
            let prog: &mut RawTracePoint = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            prog.detach(link)
                .with_context(|| format!("detaching {name}"))?;
        }
        Ok(())
    }
}

/// `recursion_misses` of a loaded program, from `BPF_OBJ_GET_INFO_BY_FD`.
fn prog_recursion_misses(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    // Offsets in `struct bpf_prog_info` (include/uapi/linux/bpf.h, stable ABI: fields are
    // only ever appended): `recursion_misses` is the u64 at byte 208 (Linux >= 5.12).
    const RECURSION_MISSES: usize = 208;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u64; 32];
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes to `info` and updates `info_len`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (attr.info_len as usize) < RECURSION_MISSES + 8 {
        return Ok(0); // too old a kernel to count them
    }
    Ok(info[RECURSION_MISSES / 8])
}

fn array_data(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<MapData> {
    match ebpf.take_map(name) {
        Some(Map::Array(data)) => Ok(data),
        Some(_) => bail!("map {name} is not an array"),
        None => bail!("map {name} missing from the BPF object"),
    }
}
