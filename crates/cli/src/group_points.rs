//! `ripcord group points`, and `--point latest-group` / `latest-group-app`: the points a
//! consistency group's disks share, read from the target store alone (decisions 0027 and
//! 0028).
//!
//! A group point is an instant of the coordinator's clock for which every member disk
//! holds a stamped recovery point in the store ([`ripcord_store::groups`]). The listing
//! reads the catalogs, whose metadata only a CRC protects; the stamp is covered by each
//! agent's point MAC, which failover checks before it writes a byte, so a stamp moved in
//! the bucket is refused there.

use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use ripcord_store::{DiskId, GroupId, GroupPoint, Store, groups};

/// Which group, and where its points are.
#[derive(Args)]
pub struct PointsArgs {
    /// The target store (a directory, file:// or s3:// URL).
    #[arg(long)]
    pub target: String,
    /// The group's name, looked up in the configuration role's database (`--deployment`).
    #[arg(long, conflicts_with = "id")]
    pub name: Option<String>,
    /// The group's id (32 hex digits, as `ripcord group list` shows it): no database
    /// needed, for a recovery site that has only the store.
    #[arg(long)]
    pub id: Option<String>,
    /// The config role's deployment directory (holding control.db), for `--name`.
    #[arg(long, default_value = "/var/lib/ripcord/ps")]
    pub deployment: PathBuf,
    /// One JSON object per point (oldest first) instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn group_id(args: &PointsArgs) -> anyhow::Result<GroupId> {
    match (&args.id, &args.name) {
        (Some(id), _) => id
            .parse()
            .map_err(|_| anyhow::anyhow!("--id {id:?} is not 32 hex digits")),
        (None, Some(name)) => {
            let path = args.deployment.join("control.db");
            let db = ripcord_control::ControlDb::open_read_only(&path)
                .with_context(|| format!("opening {} to look up group {name:?}", path.display()))?;
            let group = db
                .groups()?
                .into_iter()
                .find(|g| &g.name == name)
                .with_context(|| {
                    format!("no group is named {name:?} (`ripcord group list` lists them)")
                })?;
            Ok(group.id)
        }
        (None, None) => bail!("name the group: --name (with --deployment) or --id"),
    }
}

/// `ripcord group points`.
pub async fn list(args: PointsArgs) -> anyhow::Result<()> {
    let group = group_id(&args)?;
    let store = Store::open_existing(&args.target).await?;
    let points = groups::group_points(&store, group).await?;
    if args.json {
        for p in &points {
            println!("{}", to_json(p));
        }
        return Ok(());
    }
    if points.is_empty() {
        println!("group {group} has no complete point in {}", args.target);
        return Ok(());
    }
    println!(
        "{:<32} {:<5} {:>10} {:>7}  points",
        "instant", "kind", "bound", "disks"
    );
    for p in &points {
        let ids: Vec<String> = p
            .disks
            .iter()
            .map(|(d, rp)| format!("{d}:{}", rp.id))
            .collect();
        println!(
            "{:<32} {:<5} {:>8}µs {:>7}  {}",
            crate::rfc3339(p.instant_ns),
            if p.app { "app" } else { "crash" },
            p.bound_ns / 1000,
            p.disks.len(),
            ids.join(" ")
        );
    }
    Ok(())
}

fn to_json(p: &GroupPoint) -> serde_json::Value {
    serde_json::json!({
        "group": p.group.to_string(),
        "instant_ns": p.instant_ns,
        "instant": crate::rfc3339(p.instant_ns),
        "bound_ns": p.bound_ns,
        "members": p.members,
        "app": p.app,
        "disks": p.disks.iter().map(|(d, rp)| {
            let stamp = rp.group.expect("a group point's members are stamped");
            serde_json::json!({
                "disk": d.to_string(),
                "point": rp.id,
                "epoch": rp.epoch,
                "cut_id": rp.cut_id,
                "time_ns": rp.time_ns,
                "offset_ns": stamp.offset_ns,
                "error_ns": stamp.error_ns,
            })
        }).collect::<Vec<_>>(),
    })
}

/// For `--point latest-group` (`app_only`: `latest-group-app`): every disk of the store
/// that is a member of some group's newest complete point (application-consistent one),
/// with that point's id for the disk. Computed once for all the disks of a run, so the
/// disks of one group are failed over to one instant even while new points are
/// committed. A disk whose groups have points in several groups (it moved) gets the
/// newest instant.
pub async fn latest_group_points(
    store: &Store,
    app_only: bool,
) -> anyhow::Result<HashMap<DiskId, String>> {
    let mut out: HashMap<DiskId, (u64, String)> = HashMap::new();
    for group in groups::group_ids(store).await? {
        let points = groups::group_points(store, group).await?;
        let Some(newest) = points.into_iter().rev().find(|p| p.app || !app_only) else {
            continue;
        };
        for (disk, rp) in newest.disks {
            if out.get(&disk).is_none_or(|(t, _)| *t < newest.instant_ns) {
                out.insert(disk, (newest.instant_ns, rp.id));
            }
        }
    }
    Ok(out.into_iter().map(|(d, (_, id))| (d, id)).collect())
}
