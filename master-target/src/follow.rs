//! `ripcord-mt follow`: keep a device at a disk's newest recovery point.
//!
//! The loop polls the target store's catalog for the disk's newest point and, when it is
//! later than the one the device holds, takes one [`crate::apply::step`] to it. A failed
//! step is logged once per distinct cause and retried after a back-off; the state file
//! says meanwhile whether the device is at a point or between two. A stop request ends
//! the loop between batches; the device then stays between points until the next run
//! finishes the step (resuming never needs a full copy, see [`crate::state`]).

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use ripcord_crashsafe::FileLock;
use ripcord_journal::{EngineChoice, select_engine};
use ripcord_restore::output_guard::{self, AGENT_LOCK_DIR, Destination};
use ripcord_store::{DiskId, Store};

use crate::{
    apply::{self, Device, StepError},
    metrics::Report,
    state::{self, ApplyState},
};

/// What `follow` needs.
pub struct FollowArgs {
    pub target: String,
    pub disk: DiskId,
    pub device: PathBuf,
    pub state_dir: PathBuf,
    pub passphrase: Vec<u8>,
    pub poll: Duration,
    /// Apply the newest point once and return.
    pub once: bool,
    /// Apply this point (epoch, cut id) once and return, instead of the newest.
    pub point: Option<(u64, u64)>,
    /// Write a device the output guard refuses (mounted, held, protected) or an image
    /// this state does not know.
    pub force: bool,
    /// Forget the state file's position (the next step is a full copy).
    pub reset: bool,
    /// Where the metrics read the loop's state (none: no metrics).
    pub report: Option<Arc<Mutex<Report>>>,
}

/// The longest wait between retries of a failing step.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a device held exclusively (and for no other reason) is waited for at start:
/// after a `kill -9` the predecessor's io_uring writes keep its claim for a moment.
const PREDECESSOR_GRACE: Duration = Duration::from_secs(30);

/// Returns the final state (for `--once` and failback: what the device holds).
pub async fn follow(a: FollowArgs, stop: &AtomicBool) -> anyhow::Result<ApplyState> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let _lock = lock_disk(&a.state_dir, &a.disk)?;
    let state_path = ApplyState::path(&a.state_dir, &a.disk);
    let old = if a.reset {
        None
    } else {
        ApplyState::load(&state_path)?
    };
    let (mut device, identity) = open_device(&a.device, old.as_ref(), a.force)?;
    let mut state = match old {
        Some(s) if s.identity == identity => s,
        Some(s) => bail!(
            "{} records disk {} applied to {} ({}), but {} is {identity}; give that device, \
             or --reset to start over with a full copy",
            state_path.display(),
            s.disk,
            s.device.display(),
            s.identity,
            a.device.display()
        ),
        None => ApplyState::new(&a.disk, &a.device, identity),
    };
    state.device = a.device.clone();
    state.save(&state_path)?;
    describe_start(&state, &a.disk);
    let publish = |state: &ApplyState, step: Option<bool>| {
        if let Some(r) = &a.report {
            let mut r = r.lock().expect("report lock");
            r.state = Some(state.clone());
            match step {
                Some(true) => r.steps += 1,
                Some(false) => r.errors += 1,
                None => {}
            }
        }
    };
    publish(&state, None);

    let store = Store::open_existing(&a.target).await?;
    let mut backoff = a.poll;
    let mut last_error = String::new();
    let mut told_empty = false;
    while !stop.load(Ordering::Relaxed) {
        let wanted = match a.point {
            None => store.latest_point(&a.disk).await,
            Some((epoch, cut)) => match store.point_by_id(&a.disk, epoch, cut).await {
                Ok(None) => bail!(
                    "disk {} has no recovery point {epoch}-{cut}; `ripcord points list` lists them",
                    a.disk
                ),
                other => other,
            },
        };
        let result = match wanted {
            Err(e) => Err(anyhow::Error::new(e)
                .context(format!("reading the newest point of disk {}", a.disk))),
            Ok(None) => {
                if a.once {
                    bail!(
                        "disk {} has no recovery point in {} yet; nothing to apply",
                        a.disk,
                        a.target
                    );
                }
                if !told_empty {
                    tracing::info!(disk = %a.disk, "no recovery point yet; waiting for one");
                    told_empty = true;
                }
                Ok(())
            }
            Ok(Some(p)) if state.consistent().is_some_and(|at| !at.is_before(&p)) => {
                if state
                    .consistent()
                    .is_some_and(|at| at.id != p.id && a.point.is_some())
                {
                    bail!(
                        "{} is at point {}, later than {}: a step never goes back; give a \
                         later point, or --reset to copy the whole disk at {}",
                        a.device.display(),
                        state.applied.as_ref().map_or("", |x| x.id.as_str()),
                        p.id,
                        p.id
                    );
                }
                if a.once {
                    break;
                }
                Ok(())
            }
            Ok(Some(p)) => {
                let r = apply::step(
                    &store,
                    &a.disk,
                    &a.passphrase,
                    &p,
                    &mut device,
                    &mut state,
                    &state_path,
                    stop,
                )
                .await;
                match r {
                    Ok(r) => {
                        publish(&state, Some(true));
                        let lag = state::now_ns().saturating_sub(r.point.time_ns) as f64 / 1e9;
                        tracing::info!(
                            disk = %a.disk,
                            "at point {} ({}){}: {} batches, {:.1} MiB written in {:.2} s; \
                             {lag:.1} s behind the source",
                            r.point.id,
                            if r.point.app_consistent { "app-consistent" } else { "crash-consistent" },
                            if r.full { ", full copy" } else { "" },
                            r.batches,
                            r.bytes as f64 / (1 << 20) as f64,
                            r.secs,
                        );
                        if !last_error.is_empty() {
                            tracing::info!(disk = %a.disk, "applying works again");
                            last_error.clear();
                        }
                        backoff = a.poll;
                        if a.once {
                            break;
                        }
                        Ok(())
                    }
                    Err(StepError::Stopped) => break,
                    Err(StepError::Failed(e)) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            let text = ripcord_types::report(e.as_ref());
            state.last_error = Some(text.clone());
            publish(&state, Some(false));
            if a.once {
                save_error(&mut state, &state_path);
                return Err(e);
            }
            if text != last_error {
                tracing::error!(disk = %a.disk, "{text}; retrying (the device stays {})", where_is(&state));
                save_error(&mut state, &state_path);
                last_error = text;
            }
            sleep_unless_stopped(backoff, stop).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        sleep_unless_stopped(a.poll, stop).await;
    }
    tracing::info!(disk = %a.disk, "stopped; the device is {}", where_is(&state));
    Ok(state)
}

/// Where the device is, in words.
pub fn where_is(state: &ApplyState) -> String {
    match (&state.applied, &state.moving_to) {
        (_, Some(m)) => format!(
            "between points {} and {}: not consistent until ripcord-mt finishes the step",
            state.applied.as_ref().map_or("(none)", |a| a.id.as_str()),
            m.id
        ),
        (Some(a), None) => format!("exactly at point {}", a.id),
        (None, None) => "as it was: nothing applied yet".to_owned(),
    }
}

fn describe_start(state: &ApplyState, disk: &DiskId) {
    tracing::info!(
        %disk,
        device = %state.device.display(),
        "following; the device is {}",
        where_is(state)
    );
}

/// Saves the state with its `last_error` (for `status`); a failure to save is only logged,
/// the step's error being the one that matters.
fn save_error(state: &mut ApplyState, path: &Path) {
    if let Err(e) = state.save(path) {
        tracing::warn!("recording the error in {}: {e:#}", path.display());
    }
}

async fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let deadline = tokio::time::Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50).min(d)).await;
    }
}

/// One `ripcord-mt` per disk: a second one would interleave steps.
fn lock_disk(dir: &Path, disk: &DiskId) -> anyhow::Result<FileLock> {
    let path = dir.join(format!("{disk}.lock"));
    match ripcord_crashsafe::try_lock_exclusive(&path)
        .with_context(|| format!("locking {}", path.display()))?
    {
        Some(lock) => {
            let _ = lock.write_owner(&std::process::id().to_string());
            Ok(lock)
        }
        None => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another ripcord-mt (pid {}) is applying disk {disk} with state in {}",
                pid.trim(),
                dir.display()
            )
        }
    }
}

/// Opens the device or image the points go to. A block device passes the output guard
/// (not mounted, held, protected by an agent, or open exclusively elsewhere, and kept open
/// with `O_EXCL` so nobody mounts it meanwhile) unless `force`. An image file is created
/// (0600) if missing; an existing one is written only if the state file knows it (or
/// `force`).
fn open_device(
    path: &Path,
    known: Option<&ApplyState>,
    force: bool,
) -> anyhow::Result<(Device, String)> {
    let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let file = if is_block {
        match output_guard::check_output(path, force, Path::new(AGENT_LOCK_DIR), PREDECESSOR_GRACE)?
        {
            Destination::Device { file, .. } => file,
            Destination::Image { .. } => bail!("{} is not a block device", path.display()),
        }
    } else if path.exists() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let id = state::identity(&file, 0)?;
        if !force && known.is_none_or(|s| s.identity != id) {
            bail!(
                "{} exists and no state file says ripcord-mt wrote it; give a new path, or \
                 --force to overwrite it",
                path.display()
            );
        }
        file
    } else {
        output_guard::create_private(path, false)?
    };
    let size = if is_block {
        device_size(&file)?
    } else {
        u64::MAX
    };
    let identity = state::identity(&file, if is_block { size } else { 0 })?;
    let engine = select_engine(EngineChoice::Auto, 64)?;
    Ok((
        Device {
            file,
            size,
            is_block,
            engine,
        },
        identity,
    ))
}

fn device_size(file: &File) -> anyhow::Result<u64> {
    use std::io::{Seek as _, SeekFrom};
    let mut f = file;
    let size = f
        .seek(SeekFrom::End(0))
        .context("finding the device's size")?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}
