//! The oracle workload: stamped O_DIRECT writes through io_uring, flushes and discards,
//! every op logged with user-space submit/complete times that bracket the kernel's.
//!
//! Invariants the checker relies on:
//! * no two ops (writes or discards) are ever in flight on the same block, so the ops to a
//!   block are totally ordered by seq and their `[submit, complete]` intervals are disjoint;
//! * log records are appended in the order their timestamps were taken, so a lost log tail
//!   only hides ops submitted after the last surviving timestamp.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

use crate::block::{BLOCK_SIZE, Stamp, fill_block};
use crate::error::Error;
use crate::log::{LogHeader, LogWriter, OpKind};
use crate::region::Region;
use crate::rng::{Rng, random_u64};
use crate::{device_bytes, monotonic_ns};

const BLKDISCARD: libc::c_ulong = 0x1277;
/// Largest discard, in blocks.
pub const MAX_DISCARD_BLOCKS: u64 = 256;

/// Workload parameters.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Block device (or file on a filesystem supporting O_DIRECT) to write.
    pub device: PathBuf,
    /// Log file (must not be on the device).
    pub log: PathBuf,
    /// Run time.
    pub seconds: f64,
    /// Queue depth (ops in flight).
    pub qd: u32,
    /// PRNG seed for offsets and sizes (default: random).
    pub seed: Option<u64>,
    /// Max blocks per write, 1..=16.
    pub blocks_per_write: u32,
    /// Issue a flush every this many writes (0: never).
    pub flush_every: u64,
    /// Percent of ops that are discards.
    pub discard_percent: u8,
    /// Blocks to use (default: the whole device).
    pub region: Option<Region>,
    /// Pace submissions to at most this many ops per second (default: as fast as the
    /// queue depth allows).
    pub iops: Option<u32>,
    /// A hot set: the first `hot_blocks` blocks of the region (0: none) ...
    pub hot_blocks: u64,
    /// ... take this percent of the writes (as a database's hot pages do).
    pub hot_percent: u8,
}

impl WorkloadConfig {
    /// Defaults for `device` and `log`: qd 16, 8 blocks per write, flush every 64 writes,
    /// 2 % discards, 10 seconds.
    pub fn new(device: impl Into<PathBuf>, log: impl Into<PathBuf>) -> Self {
        WorkloadConfig {
            device: device.into(),
            log: log.into(),
            seconds: 10.0,
            qd: 16,
            seed: None,
            iops: None,
            blocks_per_write: 8,
            flush_every: 64,
            discard_percent: 2,
            region: None,
            hot_blocks: 0,
            hot_percent: 0,
        }
    }
}

/// What the workload did.
#[derive(Debug, Clone, Default)]
pub struct WorkloadSummary {
    /// Run id stamped into blocks.
    pub run_id: u64,
    /// Region used.
    pub region: Option<Region>,
    /// Writes completed.
    pub writes: u64,
    /// Blocks written.
    pub blocks: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discards done.
    pub discards: u64,
    /// Blocks discarded.
    pub discarded_blocks: u64,
    /// Ops that failed or were short.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// CLOCK_MONOTONIC ns of the End record.
    pub end_ns: u64,
}

impl std::fmt::Display for WorkloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mb = self.blocks as f64 * BLOCK_SIZE as f64 / 1e6;
        write!(
            f,
            "run {:#018x}: {} writes ({} blocks, {:.1} MB/s), {} flushes, {} discards ({} blocks), {} errors in {:.2}s; end T={}",
            self.run_id,
            self.writes,
            self.blocks,
            mb / secs,
            self.flushes,
            self.discards,
            self.discarded_blocks,
            self.errors,
            secs,
            self.end_ns
        )
    }
}

static SIGINT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    SIGINT.store(true, Ordering::SeqCst);
}

/// Installs a SIGINT handler and returns the flag it sets.
pub fn sigint_flag() -> &'static AtomicBool {
    // SAFETY: `sa` is fully initialised (zeroed, then handler and mask set); the handler
    // only stores to an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
    &SIGINT
}

/// A zeroed, 4096-aligned heap buffer for O_DIRECT.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, BLOCK_SIZE).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn discard(f: &File, is_blk: bool, first: u64, count: u64) -> i32 {
    let (off, len) = (first * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64);
    let rc = if is_blk {
        let range = [off, len];
        // SAFETY: BLKDISCARD reads a [u64; 2] (offset, length) through the pointer, which
        // points to a live array.
        unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD, range.as_ptr()) }
    } else {
        use nix::fcntl::{FallocateFlags, fallocate};
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(f, punch, off as i64, len as i64) {
            Ok(()) => 0,
            Err(errno) => -(errno as i32),
        }
    };
    if rc == 0 {
        0
    } else {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }
}

#[derive(Clone, Copy)]
struct InFlight {
    kind: OpKind,
    seq: u64,
    first: u64,
    count: u64,
}

struct Slot {
    buf: AlignedBuf,
    op: Option<InFlight>,
}

/// Runs the workload until `cfg.seconds` elapse or `stop` becomes true.
pub fn run(cfg: &WorkloadConfig, stop: &AtomicBool) -> Result<WorkloadSummary, Error> {
    if !(1..=16).contains(&cfg.blocks_per_write) {
        return Err(Error::Usage("--blocks-per-write must be 1..=16".into()));
    }
    if !(1..=1024).contains(&cfg.qd) {
        return Err(Error::Usage("--qd must be 1..=1024".into()));
    }
    if cfg.discard_percent > 100 {
        return Err(Error::Usage("--discard-percent must be 0..=100".into()));
    }
    if cfg.hot_percent > 100 {
        return Err(Error::Usage("--hot-percent must be 0..=100".into()));
    }
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&cfg.device)
        .map_err(|e| Error::io(format!("opening {} with O_DIRECT", cfg.device.display()), e))?;
    let is_blk = dev
        .metadata()
        .map_err(|e| Error::io("stat device", e))?
        .file_type()
        .is_block_device();
    let dev_blocks = device_bytes(&dev).map_err(|e| Error::io("finding the device's size", e))?
        / BLOCK_SIZE as u64;
    let region = cfg.region.unwrap_or(Region {
        start: 0,
        len: dev_blocks,
    });
    if region.len == 0 || region.end() > dev_blocks {
        return Err(Error::Usage(format!(
            "region {region} does not fit the device ({dev_blocks} blocks)"
        )));
    }
    let run_id = random_u64();
    let mut rng = Rng::new(cfg.seed.unwrap_or(run_id));
    let start_ns = monotonic_ns();
    let header = LogHeader {
        run_id,
        region,
        start_ns,
    };
    let logf = File::create(&cfg.log)
        .map_err(|e| Error::io(format!("creating log {}", cfg.log.display()), e))?;
    let mut log = LogWriter::new(BufWriter::with_capacity(256 << 10, logf), &header)
        .map_err(|e| Error::io("writing log header", e))?;
    let qd = cfg.qd as usize;
    let max_blocks = (cfg.blocks_per_write as u64).min(region.len);
    let hot_len = cfg.hot_blocks.min(region.len);
    // Declared before the ring so that, on an early error return, the ring (and with it
    // every request still in flight) is torn down before the buffers are freed.
    let mut slots: Vec<Slot> = (0..qd)
        .map(|_| Slot {
            buf: AlignedBuf::new(max_blocks as usize * BLOCK_SIZE),
            op: None,
        })
        .collect();
    let mut ring =
        IoUring::new(cfg.qd.next_power_of_two()).map_err(|e| Error::io("io_uring_setup", e))?;
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut pending: Vec<usize> = Vec::new(); // pushed to the SQ, not yet submitted
    let mut inflight = 0usize;
    let mut seq = 0u64;
    let mut writes_since_flush = 0u64;
    let mut sum = WorkloadSummary {
        run_id,
        region: Some(region),
        ..Default::default()
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(cfg.seconds.max(0.0));
    let mut last_log_flush = Instant::now();
    let fd = types::Fd(dev.as_raw_fd());
    let logio = |e| Error::io("writing log", e);

    let overlaps = |slots: &[Slot], first: u64, count: u64| {
        slots.iter().filter_map(|s| s.op).any(|o| {
            o.kind != OpKind::Flush && first < o.first + o.count && o.first < first + count
        })
    };

    let paced_from = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed) || Instant::now() >= deadline;
        if !stopping {
            while let Some(&slot) = free.last() {
                if let Some(iops) = cfg.iops.filter(|&i| i > 0) {
                    let allowed = (paced_from.elapsed().as_secs_f64() * f64::from(iops)) as u64;
                    if seq >= allowed {
                        if free.len() < slots.len() {
                            break; // reap completions; submit more later
                        }
                        std::thread::sleep(std::time::Duration::from_micros(
                            1_000_000 / u64::from(iops),
                        ));
                        continue;
                    }
                }
                let flush = cfg.flush_every > 0 && writes_since_flush >= cfg.flush_every;
                let kind = if flush {
                    OpKind::Flush
                } else if rng.percent(cfg.discard_percent) {
                    OpKind::Discard
                } else {
                    OpKind::Write
                };
                let hot = kind == OpKind::Write && hot_len > 0 && rng.percent(cfg.hot_percent);
                let span = if hot { hot_len } else { region.len };
                let count = match kind {
                    OpKind::Flush => 0,
                    OpKind::Write => rng.range(1, max_blocks.min(span)),
                    OpKind::Discard => rng.range(1, MAX_DISCARD_BLOCKS.min(region.len)),
                };
                let mut first = None;
                if kind == OpKind::Flush {
                    first = Some(0);
                } else {
                    for _ in 0..8 {
                        let f = region.start + rng.below(span - count + 1);
                        if !overlaps(&slots, f, count) {
                            first = Some(f);
                            break;
                        }
                    }
                }
                let Some(first) = first else { break };
                seq += 1;
                if kind == OpKind::Discard {
                    // Synchronous ioctl. Hand earlier ops to the kernel first so that the
                    // log stays in seq order and in time order.
                    submit_pending(&mut ring, &mut log, &slots, &mut pending)?;
                    let t0 = monotonic_ns();
                    log.submit(OpKind::Discard, seq, first, count as u32, t0)
                        .map_err(logio)?;
                    let res = discard(&dev, is_blk, first, count);
                    let t1 = monotonic_ns();
                    log.complete(seq, t1, res).map_err(logio)?;
                    if res == 0 {
                        sum.discards += 1;
                        sum.discarded_blocks += count;
                    } else {
                        sum.errors += 1;
                    }
                    continue;
                }
                free.pop();
                let s = &mut slots[slot];
                s.op = Some(InFlight {
                    kind,
                    seq,
                    first,
                    count,
                });
                let sqe = if kind == OpKind::Write {
                    writes_since_flush += 1;
                    let buf = s.buf.as_mut_slice();
                    for k in 0..count {
                        let stamp = Stamp {
                            run_id,
                            lba: first + k,
                            seq,
                            index: k as u32,
                        };
                        fill_block(
                            &mut buf[k as usize * BLOCK_SIZE..(k as usize + 1) * BLOCK_SIZE],
                            &stamp,
                        );
                    }
                    opcode::Write::new(fd, buf.as_ptr(), (count as usize * BLOCK_SIZE) as u32)
                        .offset(first * BLOCK_SIZE as u64)
                        .build()
                } else {
                    writes_since_flush = 0;
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                };
                // SAFETY: the buffer belongs to `slots[slot]`, which is neither reused nor
                // dropped until this op's completion is reaped (slots outlive the ring's
                // use: we drain all completions before returning); the fd stays open.
                unsafe { ring.submission().push(&sqe.user_data(slot as u64)) }
                    .map_err(|_| Error::Usage("submission queue full".into()))?;
                pending.push(slot);
                inflight += 1;
            }
            submit_pending(&mut ring, &mut log, &slots, &mut pending)?;
        }
        if inflight == 0 {
            if stopping {
                break;
            }
            continue;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(Error::io("io_uring_enter", e)),
        }
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let t = monotonic_ns();
        for (ud, res) in cqes {
            let slot = ud as usize;
            let op = slots[slot].op.take().expect("completion for an idle slot");
            log.complete(op.seq, t, res).map_err(logio)?;
            match op.kind {
                OpKind::Write if res as i64 == (op.count * BLOCK_SIZE as u64) as i64 => {
                    sum.writes += 1;
                    sum.blocks += op.count;
                }
                OpKind::Flush if res == 0 => sum.flushes += 1,
                _ => sum.errors += 1,
            }
            free.push(slot);
            inflight -= 1;
        }
        if last_log_flush.elapsed() >= Duration::from_millis(100) {
            log.flush().map_err(logio)?;
            last_log_flush = Instant::now();
        }
    }
    sum.end_ns = monotonic_ns();
    log.end(sum.end_ns, seq).map_err(logio)?;
    let w = log.into_inner();
    let f = w
        .into_inner()
        .map_err(|e| Error::io("flushing log", e.into_error()))?;
    f.sync_data().map_err(|e| Error::io("syncing log", e))?;
    sum.elapsed = started.elapsed();
    Ok(sum)
}

/// Logs Submit records for the pushed-but-unsubmitted ops (timestamp read now, before the
/// kernel sees them) and hands them to the kernel.
fn submit_pending(
    ring: &mut IoUring,
    log: &mut LogWriter<BufWriter<File>>,
    slots: &[Slot],
    pending: &mut Vec<usize>,
) -> Result<(), Error> {
    if pending.is_empty() {
        return Ok(());
    }
    let t = monotonic_ns();
    for &slot in pending.iter() {
        let op = slots[slot].op.expect("pending slot has an op");
        log.submit(op.kind, op.seq, op.first, op.count as u32, t)
            .map_err(|e| Error::io("writing log", e))?;
    }
    pending.clear();
    loop {
        match ring.submit() {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(Error::io("io_uring_enter", e)),
        }
    }
}
