//! `ripcord failover` and `ripcord test-failover`: check the output first (see
//! [`ripcord_restore::output_guard`]), then materialise the point (see [`crate::failover`]).

use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command as Process,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use ripcord_restore::output_guard::{self, AGENT_LOCK_DIR, Destination};
use ripcord_store::CutKind;

use crate::{
    FailoverArgs, Format, TestArgs,
    failover::{Materialized, Output, PointSpec, find_point, materialize},
    is_tty, known_disk, open_store, rfc3339,
};

pub async fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    failover_to(
        &a.target,
        &a.disk,
        &a.point,
        &a.output,
        a.format,
        a.force,
        a.passphrase_file.as_deref(),
    )
    .await
}

pub async fn test_failover(a: TestArgs) -> anyhow::Result<()> {
    let target = a.target.context("--target is required")?;
    let disk = a.disk.context("--disk is required")?;
    // Check the point before making anything.
    a.point.parse::<PointSpec>()?;
    if !a.scratch.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&a.scratch)
            .with_context(|| format!("creating {}", a.scratch.display()))?;
    }
    let ext = match a.format {
        Format::Raw => "img",
        Format::Qcow2 => "qcow2",
    };
    let base = format!("{disk}-{}", a.point.replace([':', '/'], "_"));
    let out = (1..)
        .map(|n| match n {
            1 => a.scratch.join(format!("{base}.{ext}")),
            n => a.scratch.join(format!("{base}-{n}.{ext}")),
        })
        .find(|p| !p.exists() && !output_guard::partial(p).exists())
        .expect("an unused name");
    failover_to(
        &target,
        &disk,
        &a.point,
        &out,
        a.format,
        false,
        a.passphrase_file.as_deref(),
    )
    .await?;
    println!(
        "test image: {} (remove with `ripcord test-failover cleanup`)",
        out.display()
    );
    Ok(())
}

pub fn cleanup(scratch: &Path) -> anyhow::Result<()> {
    let mut n = 0;
    if scratch.exists() {
        for e in
            std::fs::read_dir(scratch).with_context(|| format!("listing {}", scratch.display()))?
        {
            let p = e?.path();
            if p.extension()
                .is_some_and(|x| x == "img" || x == "qcow2" || x == "partial")
            {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                n += 1;
            }
        }
    }
    println!(
        "removed {n} test-failover image(s) from {}",
        scratch.display()
    );
    Ok(())
}

async fn failover_to(
    target: &str,
    disk: &str,
    point: &str,
    output: &Path,
    format: Format,
    force: bool,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<()> {
    let spec: PointSpec = point.parse()?;
    // Before any work: what the output is and whether it may be overwritten.
    output_guard::check_output(output, force, Path::new(AGENT_LOCK_DIR), Duration::ZERO)?;
    let store = open_store(target).await?;
    let disk = known_disk(&store, target, disk).await?;
    let pass = ripcord_seal::read_passphrase(passphrase_file)?;
    let m = write_point(&store, &disk, &spec, output, format, force, &pass, is_tty()).await?;
    println!("{}", describe(&disk, output, &m));
    Ok(())
}

/// What a failover did, in one line.
pub fn describe(disk: &ripcord_store::DiskId, output: &Path, m: &Materialized) -> String {
    format!(
        "failed over disk {} to point {} ({}, {}) into {}: {} MiB of data from {} batches in {:.1} s",
        disk,
        m.point.id,
        rfc3339(m.point.time_ns),
        if m.point.kind == CutKind::App {
            "app-consistent"
        } else {
            "crash-consistent"
        },
        output.display(),
        m.data_bytes >> 20,
        m.batches,
        m.secs
    )
}

/// Writes disk `disk` at the point `spec` names into `output` (checked by the output
/// guard first), in `format`.
#[allow(
    clippy::too_many_arguments,
    reason = "one call per option of `failover`"
)]
pub async fn write_point(
    store: &ripcord_store::Store,
    disk: &ripcord_store::DiskId,
    spec: &PointSpec,
    output: &Path,
    format: Format,
    force: bool,
    pass: &[u8],
    progress: bool,
) -> anyhow::Result<Materialized> {
    let dest =
        output_guard::check_output(output, force, Path::new(AGENT_LOCK_DIR), Duration::ZERO)?;
    let point = find_point(store, disk, spec)
        .await
        .with_context(|| format!("finding the recovery point of disk {disk}"))?;
    let m = match format {
        Format::Raw => {
            materialize(store, disk, &point, pass, Output::Checked(dest), progress).await?
        }
        Format::Qcow2 => {
            let Destination::Image { path, replace } = dest else {
                bail!(
                    "{} is a block device: write it with --format raw",
                    output.display()
                );
            };
            let raw = suffixed(&path, ".raw.partial");
            let m = materialize(
                store,
                disk,
                &point,
                pass,
                Output::Temporary(raw.clone()),
                progress,
            )
            .await?;
            let converted = convert_qcow2(&raw, &path, replace);
            let _ = std::fs::remove_file(&raw);
            converted?;
            m
        }
    };
    Ok(m)
}

/// Converts the raw image `raw` to qcow2 at `path` (written under `<path>.partial`, mode
/// 0600, then moved into place; `replace`: an existing `path` may be replaced).
fn convert_qcow2(raw: &Path, path: &Path, replace: bool) -> anyhow::Result<()> {
    let tmp = output_guard::partial(path);
    // Reserve the name, private, so qemu-img writes into a file nobody else can read.
    drop(output_guard::create_private(&tmp, replace)?);
    let result = (|| {
        let status = Process::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(&tmp)
            .status()
            .context("running qemu-img (install qemu-utils)")?;
        ensure!(status.success(), "qemu-img convert failed ({status})");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        ripcord_crashsafe::sync_file(&tmp)?;
        output_guard::publish(&tmp, path, replace)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
