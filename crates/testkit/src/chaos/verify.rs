//! The invariants a chaos run checks once it has quiesced (see the module doc of
//! [`super`]): acknowledged batches are durable, every point is a crash state, the final
//! point is the device, and the master target's device is too.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::ensure;

use super::inject::MasterTargetRig;
use crate::{
    master_target::{MasterTarget, mt_status},
    replication::{oracle_check_point, points, wait_for},
};

/// The replicated disk, and where its points are.
pub(super) struct Source {
    pub(super) target: String,
    pub(super) passphrase: PathBuf,
    pub(super) disk_id: String,
    pub(super) device: PathBuf,
    /// The oracle workload's log: what every point is checked against.
    pub(super) oracle_log: PathBuf,
}

/// Each (epoch, seq) acknowledged before a fault (`schedule[i]` for `acked_at[i]`) is
/// durable in the store.
pub(super) fn acknowledged_batches_are_durable(
    source: &Source,
    acked_at: &[(u64, u64)],
    schedule: &[String],
) -> anyhow::Result<()> {
    let durable = durable_seqs(&source.target, &source.disk_id)?;
    for (i, &(epoch, seq)) in acked_at.iter().enumerate() {
        let have = durable.get(&epoch).copied();
        ensure!(
            have.is_some_and(|d| d >= seq),
            "fault {i} ({}): batch {seq} of epoch {epoch} was acknowledged, but the store holds \
             that epoch durable only through {have:?}",
            schedule[i],
        );
    }
    Ok(())
}

/// What [`points_are_crash_states`] saw.
pub(super) struct PointsChecked {
    pub(super) total: usize,
    pub(super) checked: usize,
    pub(super) epochs: usize,
}

/// Every point (or an even sample of `sample` of them; 0: all) passes the oracle's
/// write-order checker, and the point `final_id` equals the device. `image` is scratch
/// space for failovers.
pub(super) fn points_are_crash_states(
    source: &Source,
    sample: usize,
    final_id: &str,
    image: &std::path::Path,
) -> anyhow::Result<PointsChecked> {
    let (target, disk, pass) = (&source.target, &source.disk_id, &source.passphrase);
    let all = points(target, disk, pass)?;
    let step = if sample == 0 || all.len() <= sample {
        1
    } else {
        all.len().div_ceil(sample)
    };
    let mut checked = 0;
    for p in all.iter().step_by(step) {
        oracle_check_point(target, disk, p, image, pass, &source.oracle_log)
            .map_err(anyhow::Error::msg)?;
        checked += 1;
    }
    let (ok, _, err) = crate::replication::failover(target, disk, final_id, image, pass)?;
    ensure!(ok, "failover to the final point {final_id} failed: {err}");
    let diff = crate::sys::diff_sectors(image, &source.device)?;
    ensure!(
        diff.is_empty(),
        "the final point {final_id} differs from the device in {} sectors, first {:?}",
        crate::ranges::total(&diff),
        &diff[..diff.len().min(5)],
    );
    let _ = std::fs::remove_file(image);
    let epochs = all
        .iter()
        .filter_map(|p| p["epoch"].as_u64())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    Ok(PointsChecked {
        total: all.len(),
        checked,
        epochs,
    })
}

/// The master target `mt` (state in `rig.state`) reaches the point `final_id` and stops
/// cleanly, and its device then equals the source device.
pub(super) fn master_target_reaches(
    source: &Source,
    mt: MasterTarget,
    rig: &MasterTargetRig,
    final_id: &str,
) -> anyhow::Result<()> {
    wait_for(
        "the master target to reach the final point",
        Duration::from_secs(180),
        || {
            let (_, states) = mt_status(&rig.state);
            Ok(states
                .first()
                .is_some_and(|s| s["moving_to"].is_null() && s["applied"]["id"] == final_id))
        },
    )?;
    let log = mt.log();
    ensure!(mt.stop(), "the master target did not stop cleanly:\n{log}");
    let diff = crate::sys::diff_sectors(&rig.device, &source.device)?;
    ensure!(
        diff.is_empty(),
        "the master target's device, at the final point {final_id}, differs from the source \
         device in {} sectors, first {:?}",
        crate::ranges::total(&diff),
        &diff[..diff.len().min(5)],
    );
    Ok(())
}

/// Highest seq of each epoch of `disk` whose batches are all committed in the store.
fn durable_seqs(target: &str, disk: &str) -> anyhow::Result<BTreeMap<u64, u64>> {
    let disk: ripcord_store::DiskId = disk.parse()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let store = ripcord_store::Store::open_existing(target).await?;
            let mut out = BTreeMap::new();
            for info in store.epochs(&disk).await? {
                out.insert(info.epoch, store.durable_seq(&disk, info.epoch).await?);
            }
            Ok(out)
        })
}
