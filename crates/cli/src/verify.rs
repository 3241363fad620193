//! `ripcord verify`: the store's own check ([`Store::verify`]) and, with the passphrase,
//! the authentication of every point, batch and placement; printed as text or JSON.

use std::path::Path;

use anyhow::{Context as _, bail};
use ripcord_store::{Store, VerifyReport};

use crate::{error_text, known_disk, open_store};

pub async fn verify(
    target: &str,
    disk: Option<&str>,
    passphrase_file: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_store(target).await?;
    let disk = match disk {
        Some(d) => Some(known_disk(&store, target, d).await?),
        None => None,
    };
    // Read the passphrase first: a refused file fails before the long check.
    let pass = passphrase_file
        .map(|pf| ripcord_seal::read_passphrase(Some(pf)))
        .transpose()?;
    let report = store
        .verify(disk.as_ref())
        .await
        .with_context(|| format!("verifying {target}"))?;
    let mut damaged: Vec<String> = report
        .damaged
        .iter()
        .map(|d| {
            let e = d.error.to_string();
            if e.contains(&d.object) {
                e
            } else {
                format!("{}: {e}", d.object)
            }
        })
        .collect();
    if let Some(pass) = &pass {
        damaged.extend(authenticate_all(&store, disk.as_ref(), pass).await?);
    }
    damaged.sort();
    damaged.dedup();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "target": target,
                "ok": damaged.is_empty(),
                "authenticated": pass.is_some(),
                "disks": report.disks,
                "objects_checked": report.objects_checked,
                "batches_checked": report.batches_checked,
                "points_checked": report.points_checked,
                "bytes_read": report.bytes_read,
                "unreferenced_packs": report.unreferenced_packs,
                "damaged": damaged,
            })
        );
    } else {
        for d in &damaged {
            println!("DAMAGED: {d}");
        }
        if damaged.is_empty() {
            println!("verify: OK: {}", summary(&report, pass.is_some()));
        }
    }
    if !damaged.is_empty() {
        bail!("{} damaged object(s) in {target}", damaged.len());
    }
    Ok(())
}

/// The counts of a clean report, for people.
fn summary(r: &VerifyReport, authenticated: bool) -> String {
    let mut s = format!(
        "{} disk(s), {} object(s), {} batch(es) and {} recovery point(s) checked ({} MiB read)",
        r.disks,
        r.objects_checked,
        r.batches_checked,
        r.points_checked,
        r.bytes_read >> 20
    );
    s.push_str(if authenticated {
        "; every point, batch and placement authenticated"
    } else {
        "; checksums and structure only (give --passphrase-file to authenticate)"
    });
    if !r.unreferenced_packs.is_empty() {
        s.push_str(&format!(
            "; {} pack(s) not yet indexed (uploads in flight or awaiting GC)",
            r.unreferenced_packs.len()
        ));
    }
    s
}

/// Authenticate every retained point (its MAC), every batch it reads, and the placement
/// of each batch, with the epoch's data key; returns the damaged or altered objects, each
/// with what is wrong (also logged).
pub async fn authenticate_all(
    store: &Store,
    disk: Option<&ripcord_store::DiskId>,
    pass: &[u8],
) -> anyhow::Result<Vec<String>> {
    let disks = match disk {
        Some(d) => vec![*d],
        None => store.list_disks().await?,
    };
    let mut damaged = Vec::new();
    for d in disks {
        for p in store.points(&d).await? {
            let catalog = p.catalog_object.to_string();
            let (key, plan) = match ripcord_restore::resolve_authentic(store, &d, &p, pass).await {
                Ok(kp) => kp,
                Err(e) => {
                    let object = e
                        .downcast_ref::<ripcord_store::Error>()
                        .and_then(|s| s.object())
                        .unwrap_or(catalog.as_str())
                        .to_string();
                    damaged.push(format!("{object}: {}", error_text(&e)));
                    continue;
                }
            };
            let placement = plan.placement();
            let mut sealer = ripcord_seal::Sealer::new();
            let mut out = Vec::new();
            for loc in plan.batches() {
                let checked = match store.fetch_batch(&loc).await {
                    Ok(b) => ripcord_restore::open_batch(
                        &mut sealer,
                        &key,
                        &plan.epoch.machine_id,
                        &d,
                        &b,
                        &loc.pack,
                        &mut out,
                    )
                    .map(|()| b),
                    Err(e) => Err(e.into()),
                };
                match checked {
                    Ok(b) => {
                        if let Err(e) = placement.check(loc.seq, &b.extents) {
                            let object = e.object().unwrap_or(catalog.as_str()).to_string();
                            damaged.push(format!("{object}: {e}"));
                        }
                    }
                    Err(e) => damaged.push(format!(
                        "{} (batch {} of epoch {}): {}",
                        loc.pack,
                        loc.seq,
                        loc.epoch,
                        error_text(&e)
                    )),
                }
            }
        }
    }
    Ok(damaged)
}
