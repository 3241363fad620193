//! One step: bring the device from the point it holds to a later recovery point of the
//! same disk, writing only what changed between the two.
//!
//! A point resolves to runs, each naming the batch whose write put it there. Within an
//! epoch a sector's newest writer only moves forward, so the runs of the new point whose
//! batch is later than the applied point's seq are exactly the sectors that differ; the
//! other sectors already hold the new point's bytes. A point of another epoch (a full
//! resync) is applied whole: every run, and zeros where no run lies.
//!
//! Every batch is fetched once, authenticated and decrypted with the disk's data key, and
//! checked against the plan ([`ripcord_store::Placement::check`]) before any of its bytes
//! is written: a store that someone else can write never places a byte on the device.
//! Fetching, decryption and the data writes run in parallel (the runs of one plan are
//! disjoint), each writer through an IO engine of the journal's (io_uring, or pwrite when
//! io_uring is unusable); zero runs follow once every data write is done, with
//! `BLKZEROOUT` or a punched hole (safe only with no concurrent writer); the device is
//! synced once at the end, before the state file says the step is done.

use std::{
    collections::BTreeSet,
    fs::File,
    io::IoSlice,
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use anyhow::{Context as _, anyhow, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use ripcord_journal::{Engine, EngineChoice, SyncEngine, SyncKind, select_engine};
use ripcord_seal::KeyRing;
use ripcord_store::{DiskId, Plan, RecoveryPoint, Run, RunSource, Store};

use crate::state::{ApplyState, PointRef};

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The point the device is now exactly at.
    pub point: PointRef,
    /// Whether the whole disk was written (a new epoch, or nothing applied before).
    pub full: bool,
    /// Batches fetched from the store.
    pub batches: usize,
    /// Bytes written to the device (data and zeros).
    pub bytes: u64,
    pub secs: f64,
}

/// How a step ended short of its point.
#[derive(Debug)]
pub enum StepError {
    /// Stopped on request; the device is between points until a later step.
    Stopped,
    /// It failed; the device may be between points.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for StepError {
    fn from(e: anyhow::Error) -> StepError {
        StepError::Failed(e)
    }
}

/// A device (or image) and the engine that writes it.
pub struct Device {
    pub file: File,
    /// Bytes the device holds (`u64::MAX` for an image file, which grows to the disk).
    pub size: u64,
    /// A block device (else an image file).
    pub is_block: bool,
    pub engine: Box<dyn Engine>,
}

/// Brings `device` to `point`, persisting the state before and after (see
/// [`crate::state`]). `stop` is checked between batches.
#[allow(clippy::too_many_arguments)]
pub async fn step(
    store: &Store,
    disk: &DiskId,
    passphrase: &[u8],
    point: &RecoveryPoint,
    device: &mut Device,
    state: &mut ApplyState,
    state_path: &std::path::Path,
    stop: &AtomicBool,
) -> Result<StepReport, StepError> {
    let started = Instant::now();
    let (key, plan) = ripcord_restore::resolve_authentic(store, disk, point, passphrase).await?;
    if plan.size_bytes > device.size {
        return Err(StepError::Failed(anyhow!(
            "disk {disk} is {} bytes at point {}, {} holds only {}; give a device at least \
             as large",
            plan.size_bytes,
            point.id,
            state.device.display(),
            device.size
        )));
    }
    // The sectors to write: everything newer than the applied point of this epoch, or
    // everything if the device holds another epoch, or if an interrupted step was headed
    // somewhere this point does not reach (its writes may lie beyond this point's).
    let same_epoch = |p: &PointRef| p.epoch == point.epoch;
    let base = match (&state.applied, &state.moving_to) {
        (Some(a), None) if same_epoch(a) => Some(a.seq),
        (Some(a), Some(m)) if same_epoch(a) && same_epoch(m) && m.seq <= point.seq => Some(a.seq),
        _ => None,
    };
    let runs: Vec<Run> = plan
        .runs
        .iter()
        .filter(|r| base.is_none_or(|a| r.source.seq() > a))
        .copied()
        .collect();
    // Durably say the device is leaving the point it was at, before it does (resizing an
    // image to the point's disk size is already a change).
    state.moving_to = Some(PointRef::of(point));
    state.save(state_path)?;
    if !device.is_block {
        let len = device
            .file
            .metadata()
            .context("reading the image's size")?
            .len();
        if len != plan.size_bytes {
            device
                .file
                .set_len(plan.size_bytes)
                .with_context(|| format!("sizing {}", state.device.display()))?;
        }
    }

    let gaps = if base.is_none() {
        gaps(&plan)
    } else {
        Vec::new()
    };
    let total = runs.iter().map(|r| r.sectors * 512).sum::<u64>()
        + gaps.iter().map(|(s, e)| (e - s) * 512).sum::<u64>();
    let mut progress = Progress::new(&point.id, total);
    zero_gaps(device, &gaps, stop, &mut progress)?;
    let seqs: BTreeSet<u64> = runs.iter().map(|r| r.source.seq()).collect();
    let batches = seqs.len();
    write_batches(store, disk, &plan, &key, &seqs, device, stop, &mut progress).await?;
    let bytes = progress.done;
    device
        .engine
        .sync(device.file.as_fd(), SyncKind::Data)
        .with_context(|| format!("syncing {}", state.device.display()))?;
    state.applied = state.moving_to.take();
    state.bytes_written += bytes;
    state.last_error = None;
    state.save(state_path)?;
    Ok(StepReport {
        point: PointRef::of(point),
        full: base.is_none(),
        batches,
        bytes,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Fetches, authenticates and decrypts the batches `seqs` (in parallel), then writes the
/// runs each places, in the order batches arrive (the runs of one plan are disjoint).
#[allow(clippy::too_many_arguments)]
async fn write_batches(
    store: &Store,
    disk: &DiskId,
    plan: &Plan,
    key: &KeyRing,
    seqs: &BTreeSet<u64>,
    device: &mut Device,
    stop: &AtomicBool,
    progress: &mut Progress,
) -> Result<(), StepError> {
    let placement = Arc::new(plan.placement());
    let key = Arc::new(key.clone());
    let machine: Arc<str> = Arc::from(plan.epoch.machine_id.as_str());
    let locations = seqs
        .iter()
        .map(|s| {
            plan.locations
                .get(s)
                .cloned()
                .with_context(|| format!("the plan names batch {s} but has no location for it"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Batches are fetched, opened, checked and their data runs written in parallel (the
    // runs of one plan are disjoint), each writer with an IO engine of its own from a
    // pool. Zero runs wait until every data write is done: `BLKZEROOUT` and punched holes
    // are only safe with no concurrent buffered write to the same page.
    let parallel = std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .clamp(4, 16);
    let engines = Arc::new(std::sync::Mutex::new(vec![std::mem::replace(
        &mut device.engine,
        Box::new(SyncEngine::new()),
    )]));
    let file = Arc::new(
        device
            .file
            .try_clone()
            .context("cloning the device's descriptor")?,
    );
    // Writers hold `gate` (read) while they write; the step closes it (write) before it
    // returns, so no writer of a failed or stopped step is still writing when the next
    // step starts (a late write of an older batch could land over a newer one).
    let gate = Arc::new(std::sync::RwLock::new(false));
    let size = device.size;
    let mut opened = futures::stream::iter(locations.into_iter().map(Ok::<_, anyhow::Error>))
        .map_ok(|loc| {
            let (key, machine, disk, placement) =
                (key.clone(), machine.clone(), *disk, placement.clone());
            let (engines, file, gate) = (engines.clone(), file.clone(), gate.clone());
            async move {
                let b = store
                    .fetch_batch(&loc)
                    .await
                    .with_context(|| format!("fetching batch {} from {}", loc.seq, loc.pack))?;
                tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, Vec<Run>)> {
                    let plain = ripcord_restore::open_placed(
                        &key, &machine, &disk, &b, &loc.pack, &placement,
                    )?;
                    let closed = gate.read().expect("writer gate");
                    if *closed {
                        return Ok((0, Vec::new()));
                    }
                    let pooled = engines.lock().expect("engine pool").pop();
                    let mut engine = match pooled {
                        Some(e) => e,
                        None => select_engine(EngineChoice::Auto, 64)?,
                    };
                    let written =
                        write_data_runs(&mut *engine, &file, size, &placement, loc.seq, &plain);
                    engines.lock().expect("engine pool").push(engine);
                    drop(closed);
                    let zero_runs = placement
                        .runs_of(loc.seq)
                        .filter(|r| !matches!(r.source, RunSource::Data { .. }))
                        .copied()
                        .collect();
                    Ok((written?, zero_runs))
                })
                .await?
            }
        })
        .try_buffer_unordered(parallel);
    let mut zero_runs = Vec::new();
    let mut ended = Ok(());
    while let Some(item) = opened.next().await {
        let (written, zeros) = match item {
            Ok(x) => x,
            Err(e) => {
                ended = Err(StepError::Failed(e));
                break;
            }
        };
        progress.add(written);
        zero_runs.extend(zeros);
        if stop.load(Ordering::Relaxed) {
            ended = Err(StepError::Stopped);
            break;
        }
    }
    drop(opened);
    let closing = gate.clone();
    tokio::task::spawn_blocking(move || *closing.write().expect("writer gate") = true)
        .await
        .context("closing the writers")?;
    // Every writer has returned its engine now: keep one (an io_uring one if the device
    // had it) for the next step, whatever happened.
    if let Some(engine) = engines.lock().expect("engine pool").pop() {
        device.engine = engine;
    }
    ended?;
    for r in zero_runs {
        write_zeros(device, r.sector * 512, r.sectors * 512)?;
        progress.add(r.sectors * 512);
    }
    Ok(())
}

/// Writes the data runs `placement` gives batch `seq` from its plaintext; returns bytes.
fn write_data_runs(
    engine: &mut dyn Engine,
    file: &File,
    size: u64,
    placement: &ripcord_store::Placement,
    seq: u64,
    plain: &[u8],
) -> anyhow::Result<u64> {
    let mut written = 0;
    for r in placement.runs_of(seq) {
        let RunSource::Data { offset: at, .. } = r.source else {
            continue;
        };
        let (offset, len) = (r.sector * 512, r.sectors * 512);
        let end = at
            .checked_add(len)
            .filter(|&e| e <= plain.len() as u64)
            .with_context(|| format!("batch {seq} places a run beyond its plaintext"))?;
        write_all(
            engine,
            file,
            size,
            &plain[at as usize..end as usize],
            offset,
        )?;
        start_writeback(file, offset, len);
        written += len;
    }
    Ok(written)
}

/// Starts writing `len` bytes at `offset` back to the device now, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): otherwise a step's buffered writes sit in
/// the page cache (up to the dirty limit, gigabytes) and reach the device only at the
/// final sync, so writing and writeback never overlap. Only a hint: durability still comes
/// from the step's final sync, and an error here shows up there.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// The ranges (start, end sector) of the disk that no run of `plan` covers: a full
/// apply zeroes them (the device may hold anything there).
fn gaps(plan: &Plan) -> Vec<(u64, u64)> {
    let end = plan.size_bytes / 512;
    let mut at = 0u64;
    let mut gaps = Vec::new();
    for r in &plan.runs {
        if r.sector > at {
            gaps.push((at, r.sector.min(end)));
        }
        at = at.max(r.sector + r.sectors);
    }
    if at < end {
        gaps.push((at, end));
    }
    gaps.retain(|(s, e)| e > s);
    gaps
}

fn zero_gaps(
    device: &mut Device,
    gaps: &[(u64, u64)],
    stop: &AtomicBool,
    progress: &mut Progress,
) -> Result<(), StepError> {
    for &(s, e) in gaps {
        write_zeros(device, s * 512, (e - s) * 512)?;
        progress.add((e - s) * 512);
        if stop.load(Ordering::Relaxed) {
            return Err(StepError::Stopped);
        }
    }
    Ok(())
}

/// Bytes a step has written, logged every few seconds on long steps (a full copy of a
/// large disk), so an operator without a terminal sees it move.
struct Progress {
    point: String,
    total: u64,
    done: u64,
    started: Instant,
    logged: Instant,
}

impl Progress {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    fn new(point: &str, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            point: point.to_owned(),
            total,
            done: 0,
            started: now,
            logged: now,
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.logged.elapsed() >= Self::EVERY {
            self.logged = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            tracing::info!(
                "step to point {}: {:.0} of {:.0} MiB written ({:.0} %), {:.0} MB/s",
                self.point,
                self.done as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                100.0 * self.done as f64 / self.total.max(1) as f64,
                self.done as f64 / secs / 1e6
            );
        }
    }
}

fn write_zeros(device: &mut Device, offset: u64, len: u64) -> anyhow::Result<()> {
    ensure!(
        offset + len <= device.size,
        "a zero run ends at byte {} of a {}-byte device",
        offset + len,
        device.size
    );
    ripcord_restore::zero::zero_range(&device.file, device.is_block, offset, len)
}

fn write_all(
    engine: &mut dyn Engine,
    file: &File,
    size: u64,
    mut data: &[u8],
    mut offset: u64,
) -> anyhow::Result<()> {
    ensure!(
        offset + data.len() as u64 <= size,
        "a run ends at byte {} of a {size}-byte device",
        offset + data.len() as u64,
    );
    while !data.is_empty() {
        let n = engine
            .write_at(file.as_fd(), &[IoSlice::new(data)], offset)
            .with_context(|| format!("writing {} bytes at byte {offset}", data.len()))?;
        ensure!(n > 0, "the device accepted no bytes at byte {offset}");
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}
