//! `ripcord points list`: the retained recovery points of each disk, with the machine the
//! disk belongs to and the device that machine said it protects it as (both from its
//! newest epoch; the device is the agent's claim, for people), as a table or JSON lines.

use anyhow::Context as _;
use ripcord_store::{CutKind, DiskId, Store};

use crate::{known_disk, open_store, rfc3339};

pub async fn list(target: &str, disk: Option<&str>, json: bool) -> anyhow::Result<()> {
    let store = open_store(target).await?;
    let disks = match disk {
        Some(d) => vec![known_disk(&store, target, d).await?],
        None => store
            .list_disks()
            .await
            .with_context(|| format!("listing the disks of {target}"))?,
    };
    if !json {
        println!(
            "{:<34} {:<20} {:<16} {:<14} {:<26} {:<5}",
            "disk", "machine", "device", "point", "time (UTC)", "kind"
        );
    }
    for d in disks {
        let (machine, device) = owner_of(&store, &d).await?;
        let points = store
            .points(&d)
            .await
            .with_context(|| format!("listing the points of disk {d}"))?;
        for p in points {
            let kind = if p.kind == CutKind::App {
                "app"
            } else {
                "crash"
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "disk": d.to_string(), "machine": machine, "device": device,
                        "id": p.id, "epoch": p.epoch,
                        "cut": p.cut_id, "seq": p.seq, "time": rfc3339(p.time_ns),
                        "time_ns": p.time_ns, "mono_ns": p.mono_ns, "kind": kind,
                    })
                );
            } else {
                println!(
                    "{:<34} {:<20} {:<16} {:<14} {:<26} {:<5}",
                    d.to_string(),
                    machine,
                    device.as_deref().unwrap_or("?"),
                    p.id,
                    rfc3339(p.time_ns),
                    kind
                );
            }
        }
    }
    Ok(())
}

/// The machine `disk` belongs to ("?" if it has no epoch yet) and its device (if the
/// agent named it), from its newest epoch.
async fn owner_of(store: &Store, disk: &DiskId) -> anyhow::Result<(String, Option<String>)> {
    let epochs = store
        .epochs(disk)
        .await
        .with_context(|| format!("reading the epochs of disk {disk}"))?;
    Ok(epochs
        .into_iter()
        .max_by_key(|e| e.epoch)
        .map_or_else(|| ("?".to_owned(), None), |e| (e.machine_id, e.device)))
}
