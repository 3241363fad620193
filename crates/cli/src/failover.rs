//! Materialising a recovery point from the target store: unwrap the disk's data key with
//! the deployment passphrase, check the point's MAC (the agent's, over cut id, seq, time
//! and kind), resolve the point to batch locations, fetch each needed batch once
//! (checksummed), authenticate and decrypt it, check that the plan places it exactly as
//! its authenticated extent list says, and only then copy its ranges (and zero its zero
//! ranges) into a sparse image or a block device.
//!
//! Trust: the store's metadata (catalog, index, checkpoints) carries only CRCs, so
//! someone who can write the bucket can rewrite it. Nothing is placed on the strength of
//! that metadata alone (decision 0012): a point whose MAC fails is refused naming its
//! catalog object, and a plan that disagrees with a batch's authenticated extents is
//! refused naming the index object that placed the batch.

use std::{
    fs::File,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use ripcord_restore::{
    open_placed,
    output_guard::{self, Destination},
    resolve_authentic,
};
use ripcord_seal::KeyRing;
use ripcord_store::{CutKind, DiskId, Plan, RecoveryPoint, RunSource, Store};

/// Which recovery point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointSpec {
    Latest,
    LatestApp,
    /// The disk's point in the newest complete point of its consistency group.
    LatestGroup,
    /// The same among the group's application-consistent points (decision 0028).
    LatestGroupApp,
    /// The newest point at or before this wall-clock time (unix ns).
    At(u64),
    /// A point id, `<epoch>-<cut>`.
    Id(String),
}

/// The accepted forms of `--point`, for help and errors.
pub const POINT_FORMS: &str = "latest, latest-app, latest-group (the newest point of the \
                               disk's consistency group), latest-group-app (its newest \
                               application-consistent one), an RFC 3339 time such as \
                               2024-05-01T12:00:00Z (the newest point at or before it), or a \
                               point id <epoch>-<cut> such as 3-17 (`ripcord points list` \
                               shows them)";

impl std::str::FromStr for PointSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<PointSpec> {
        let bad = || anyhow::anyhow!("--point {s:?} is not a recovery point; give {POINT_FORMS}");
        Ok(match s {
            "latest" => PointSpec::Latest,
            "latest-app" => PointSpec::LatestApp,
            "latest-group" => PointSpec::LatestGroup,
            "latest-group-app" => PointSpec::LatestGroupApp,
            s if s.contains('T') && s.contains(':') => {
                let t = humantime::parse_rfc3339_weak(s).map_err(|_| bad())?;
                let ns = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| bad())?
                    .as_nanos();
                PointSpec::At(u64::try_from(ns).map_err(|_| bad())?)
            }
            id => {
                let (epoch, cut) = id.split_once('-').ok_or_else(bad)?;
                let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
                if !number(epoch) || !number(cut) {
                    return Err(bad());
                }
                PointSpec::Id(id.to_owned())
            }
        })
    }
}

impl std::fmt::Display for PointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSpec::Latest => f.write_str("latest"),
            PointSpec::LatestApp => f.write_str("latest-app (the newest app-consistent point)"),
            PointSpec::LatestGroup => {
                f.write_str("latest-group (in the newest point of its consistency group)")
            }
            PointSpec::LatestGroupApp => f.write_str(
                "latest-group-app (in the newest application-consistent point of its \
                 consistency group)",
            ),
            PointSpec::At(ns) => write!(f, "at or before {}", crate::rfc3339(*ns)),
            PointSpec::Id(id) => write!(f, "with id {id}"),
        }
    }
}

/// Pick the point `spec` names among `points` (sorted by time) of `disk`.
pub fn select(
    points: &[RecoveryPoint],
    spec: &PointSpec,
    disk: &DiskId,
) -> anyhow::Result<RecoveryPoint> {
    let found = match spec {
        PointSpec::Latest => points.iter().max_by_key(|p| (p.time_ns, p.epoch, p.cut_id)),
        PointSpec::LatestApp => points
            .iter()
            .filter(|p| p.kind == CutKind::App)
            .max_by_key(|p| (p.time_ns, p.epoch, p.cut_id)),
        PointSpec::At(t) => points
            .iter()
            .filter(|p| p.time_ns <= *t)
            .max_by_key(|p| (p.time_ns, p.epoch, p.cut_id)),
        PointSpec::Id(id) => points.iter().find(|p| &p.id == id),
        // A group point is a property of several disks' catalogs: see `find_point`.
        PointSpec::LatestGroup | PointSpec::LatestGroupApp => None,
    };
    found.cloned().with_context(|| {
        format!(
            "disk {disk} has no recovery point {spec} (it has {} point{}); \
             `ripcord points list` lists them",
            points.len(),
            if points.len() == 1 { "" } else { "s" }
        )
    })
}

/// Finds the point `spec` names, reading no more of the catalog than it must: `latest`,
/// `latest-app` and an id read only the segments that can hold them (the newest point is
/// the agent's last cut, the highest cut id of the newest epoch); a time lists every point.
pub async fn find_point(
    store: &Store,
    disk: &DiskId,
    spec: &PointSpec,
) -> anyhow::Result<RecoveryPoint> {
    let found = match spec {
        PointSpec::Latest => store.latest_point(disk).await?,
        PointSpec::LatestApp => {
            store
                .latest_point_where(disk, |p| p.kind == CutKind::App)
                .await?
        }
        PointSpec::Id(id) => match id.split_once('-').map(|(e, c)| (e.parse(), c.parse())) {
            Some((Ok(epoch), Ok(cut_id))) => store.point_by_id(disk, epoch, cut_id).await?,
            _ => None,
        },
        PointSpec::At(_) => return select(&store.points(disk).await?, spec, disk),
        PointSpec::LatestGroup | PointSpec::LatestGroupApp => {
            let app_only = *spec == PointSpec::LatestGroupApp;
            let chosen = crate::group_points::latest_group_points(store, app_only).await?;
            let id = chosen.get(disk).with_context(|| {
                format!(
                    "disk {disk} is in no complete {}group point (`ripcord group points` \
                     lists a group's points)",
                    if app_only {
                        "application-consistent "
                    } else {
                        ""
                    }
                )
            })?;
            return Box::pin(find_point(store, disk, &PointSpec::Id(id.clone()))).await;
        }
    };
    found.with_context(|| {
        format!("disk {disk} has no recovery point {spec}; `ripcord points list` lists them")
    })
}

/// Parse a disk id (32 hex digits).
pub fn parse_disk(s: &str) -> anyhow::Result<DiskId> {
    DiskId::from_hex(s.trim()).with_context(|| format!("disk id {s:?} is not 32 hex digits"))
}

/// Where the image goes: a checked block device, or a file written under a temporary
/// name (mode 0600) and published at the end (see [`crate::output_guard`]).
pub struct Target {
    file: File,
    is_block: bool,
    /// Temporary path, final path (none: keep the temporary one) and whether the final
    /// one may be replaced (files only).
    rename: Option<(PathBuf, Option<PathBuf>, bool)>,
}

impl Target {
    pub fn create(dest: Destination, size: u64) -> anyhow::Result<Target> {
        let (path, replace) = match dest {
            Destination::Device { path, file } => {
                let dev_size =
                    ripcord_oracle::device_bytes(&file).context("finding the device's size")?;
                ensure!(
                    dev_size >= size,
                    "{} holds {dev_size} bytes, the disk needs {size}",
                    path.display()
                );
                return Ok(Target {
                    file,
                    is_block: true,
                    rename: None,
                });
            }
            Destination::Image { path, replace } => (path, replace),
        };
        let tmp = output_guard::partial(&path);
        let file = output_guard::create_private(&tmp, replace)?;
        file.set_len(size)?;
        Ok(Target {
            file,
            is_block: false,
            rename: Some((tmp, Some(path), replace)),
        })
    }

    /// A temporary image at `path` itself (an intermediate the caller converts and
    /// removes), removed on failure.
    pub fn temporary(path: &Path, size: u64) -> anyhow::Result<Target> {
        let file = output_guard::create_private(path, true)?;
        file.set_len(size)?;
        Ok(Target {
            file,
            is_block: false,
            rename: Some((path.to_owned(), None, false)),
        })
    }

    fn finish(self) -> anyhow::Result<()> {
        self.file.sync_all()?;
        if let Some((tmp, Some(path), replace)) = &self.rename
            && let Err(e) = output_guard::publish(tmp, path, *replace)
        {
            let _ = std::fs::remove_file(tmp);
            return Err(e);
        }
        Ok(())
    }

    /// On failure, remove the partial image: damaged data never becomes an image.
    fn abandon(self) {
        if let Some((tmp, _, _)) = &self.rename {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Where [`materialize`] writes.
pub enum Output {
    /// The checked `--output`.
    Checked(Destination),
    /// An intermediate file (qcow2 conversion).
    Temporary(PathBuf),
}

/// What a materialisation did.
#[derive(Debug)]
pub struct Materialized {
    pub point: RecoveryPoint,
    pub data_bytes: u64,
    pub batches: usize,
    pub secs: f64,
}

/// Write the image of `point` to `output`.
pub async fn materialize(
    store: &Store,
    disk: &DiskId,
    point: &RecoveryPoint,
    passphrase: &[u8],
    output: Output,
    progress: bool,
) -> anyhow::Result<Materialized> {
    let started = Instant::now();
    let (key, plan) = resolve_authentic(store, disk, point, passphrase).await?;
    let target = match output {
        Output::Checked(dest) => Target::create(dest, plan.size_bytes)?,
        Output::Temporary(path) => Target::temporary(&path, plan.size_bytes)?,
    };
    let bar = ProgressBar::new(plan.data_bytes()).with_style(
        ProgressStyle::with_template(
            "failover {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template"),
    );
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let result = copy_plan(store, disk, &plan, &key, &target, &bar).await;
    bar.finish_and_clear();
    match result {
        Ok(batches) => {
            target.finish()?;
            Ok(Materialized {
                point: point.clone(),
                data_bytes: plan.data_bytes(),
                batches,
                secs: started.elapsed().as_secs_f64(),
            })
        }
        Err(e) => {
            target.abandon();
            Err(e)
        }
    }
}

async fn copy_plan(
    store: &Store,
    disk: &DiskId,
    plan: &Plan,
    key: &KeyRing,
    target: &Target,
    bar: &ProgressBar,
) -> anyhow::Result<usize> {
    use futures::TryStreamExt as _;
    let batches = plan.batches();
    let placement = std::sync::Arc::new(plan.placement());
    let key = std::sync::Arc::new(key.clone());
    let file = std::sync::Arc::new(target.file.try_clone()?);
    let is_block = target.is_block;
    let machine = std::sync::Arc::new(plan.epoch.machine_id.clone());
    // Runs are disjoint, so batches can be fetched, opened and written in any order: keep
    // a few in flight so fetching, decryption and writing overlap on all cores. Each run's
    // write-back starts as soon as it is written, so the device writes the image while
    // the store is still being read (see `start_write_back`).
    let parallel = std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .clamp(4, 16);
    futures::stream::iter(batches.iter().cloned().map(Ok::<_, anyhow::Error>))
        .map_ok(|loc| {
            let (key, file, machine, disk) = (key.clone(), file.clone(), machine.clone(), *disk);
            let placement = placement.clone();
            async move {
                let b = store
                    .fetch_batch(&loc)
                    .await
                    .with_context(|| format!("fetching batch {} from {}", loc.seq, loc.pack))?;
                let written = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                    let plain = open_placed(&key, &machine, &disk, &b, &loc.pack, &placement)?;
                    let mut written = 0;
                    for r in placement.runs_of(loc.seq) {
                        let len = r.sectors * 512;
                        let RunSource::Data { offset, .. } = r.source else {
                            zero_at(&file, is_block, r.sector * 512, len)?;
                            if is_block {
                                start_write_back(&file, r.sector * 512, len)?;
                            }
                            continue;
                        };
                        let end = offset + len;
                        ensure!(
                            end <= plain.len() as u64,
                            "run beyond batch {} plaintext in {}",
                            loc.seq,
                            loc.pack
                        );
                        write_sparse(
                            &file,
                            is_block,
                            &plain[offset as usize..end as usize],
                            r.sector * 512,
                        )?;
                        start_write_back(&file, r.sector * 512, len)?;
                        written += len;
                    }
                    Ok(written)
                })
                .await??;
                Ok::<u64, anyhow::Error>(written)
            }
        })
        .try_buffer_unordered(parallel)
        .try_for_each(|written| {
            bar.inc(written);
            futures::future::ready(Ok(()))
        })
        .await?;
    Ok(batches.len())
}

/// Zero `len` bytes at `offset` of a block device (a fresh image file is already a hole).
/// Bytes, not `BLKZEROOUT`: batches are written from several threads at once (see
/// [`ripcord_restore::zero`]).
fn zero_at(file: &File, is_block: bool, offset: u64, len: u64) -> anyhow::Result<()> {
    if !is_block {
        return Ok(());
    }
    ripcord_restore::zero::write_zeros(file, offset, len)
}

/// Write `data` at `offset`, leaving all-zero 64 KiB pieces as holes in files (a fresh
/// image file is sparse and zeroed).
fn write_sparse(file: &File, is_block: bool, data: &[u8], offset: u64) -> anyhow::Result<()> {
    for (i, chunk) in data.chunks(64 << 10).enumerate() {
        if !is_block && chunk.iter().all(|&b| b == 0) {
            continue;
        }
        file.write_all_at(chunk, offset + (i as u64) * (64 << 10))?;
    }
    Ok(())
}

/// Starts the write-back of a range just written. A restore writes far more than it reads
/// (a batch decompresses to several times its stored size) through the page cache, and
/// makes it durable with one `fsync` at the end; left to itself the kernel starts writing
/// back only past `dirty_background_ratio` (gigabytes on a large host), so the device would
/// read the store while idle for writes, then write everything while nothing is read.
/// Durability still comes from the final `fsync`.
fn start_write_back(file: &File, offset: u64, len: u64) -> anyhow::Result<()> {
    ripcord_crashsafe::write_back_range(file, offset, len, ripcord_crashsafe::WriteBack::Start)
        .with_context(|| format!("starting the write-back of {len} bytes at byte {offset}"))
}
