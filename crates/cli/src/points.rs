//! `ripcord points list`: the retained recovery points of each disk, with the machine the
//! disk belongs to (from its newest epoch), as a table or JSON lines.

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
            "{:<34} {:<20} {:<14} {:<26} {:<5}",
            "disk", "machine", "point", "time (UTC)", "kind"
        );
    }
    for d in disks {
        let machine = machine_of(&store, &d).await?;
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
                        "disk": d.to_string(), "machine": machine, "id": p.id, "epoch": p.epoch,
                        "cut": p.cut_id, "seq": p.seq, "time": rfc3339(p.time_ns),
                        "time_ns": p.time_ns, "mono_ns": p.mono_ns, "kind": kind,
                    })
                );
            } else {
                println!(
                    "{:<34} {:<20} {:<14} {:<26} {:<5}",
                    d.to_string(),
                    machine,
                    p.id,
                    rfc3339(p.time_ns),
                    kind
                );
            }
        }
    }
    Ok(())
}

/// The machine `disk` belongs to, from its newest epoch ("?" if it has none yet).
async fn machine_of(store: &Store, disk: &DiskId) -> anyhow::Result<String> {
    let epochs = store
        .epochs(disk)
        .await
        .with_context(|| format!("reading the epochs of disk {disk}"))?;
    Ok(epochs
        .into_iter()
        .max_by_key(|e| e.epoch)
        .map_or_else(|| "?".to_owned(), |e| e.machine_id))
}
