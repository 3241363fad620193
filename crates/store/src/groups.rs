//! Consistency-group points: the instants at which every member disk of a group has a
//! committed recovery point, found from the catalogs of the store's disks.
//!
//! A group's coordinator schedules instants; every member machine's agent cuts each of
//! its disks at the instant (converted to its own clock) and stamps the cut with a
//! [`GroupStamp`](crate::GroupStamp): the group, the instant, how many disks the group
//! point must have (`members`), and `error_ns`, a bound on how far in real time this cut
//! may lie from the instant. The stamp is MACed with the cut and stored with it in the disk's catalog.
//! There is no group object in the store: a group point is derived from the catalogs.
//!
//! # Invariants of a [`GroupPoint`]
//!
//! * It holds exactly `members` recovery points, of `members` distinct disks, each
//!   stamped with the same group, instant and `members`. A bucket of stamps that does not
//!   (a member's cut not committed yet, or expired by retention, or the members
//!   disagreeing on the count) is **incomplete** and is not a group point.
//! * More distinct disks claiming an instant than its `members` is a **conflict** (two
//!   groups share an id, or a stamp was moved by someone who could forge one): the
//!   instant is skipped and a warning names it. Never a partial or mixed point.
//! * Each point is committed: a catalog entry exists only for a cut whose batches are all
//!   durable, so a group point exists only once every member's cut is committed.
//! * `bound_ns` is the point's clock-error bound, [`bound_ns`] of its members' errors:
//!   two members' cuts are at most `e_i + e_j` apart in real time, so the whole point
//!   spans at most the sum of the two largest errors.
//!
//! Nothing here is authenticated: the stamps come from catalog entries, which carry only
//! a CRC. A reader that holds the data keys checks every member point's MAC (which covers
//! its stamp, `ripcord_restore::check_point`) before using a group point.
//!
//! Cost: every catalog segment of every disk of the store is read (`O(segments)` objects
//! per disk, disks read concurrently).

use crate::error::Result;
use crate::store::{FETCH_CONCURRENCY, Store};
use crate::types::{DiskId, GroupId, RecoveryPoint};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet};

/// How many disks' catalogs are read at once (each read itself fetches up to
/// `FETCH_CONCURRENCY` segments concurrently).
const DISK_CONCURRENCY: usize = FETCH_CONCURRENCY / 4;

/// One point of a consistency group: a recovery point of each of its `members` disks,
/// all placed at `instant_ns` of the coordinator's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPoint {
    /// The group.
    pub group: GroupId,
    /// The instant, unix nanoseconds by the coordinator's clock.
    pub instant_ns: u64,
    /// How many disks the point has (the count every member's stamp names).
    pub members: u16,
    /// Clock-error bound: the member points lie at most this far apart in real time (ns;
    /// [`bound_ns`] of the members' `error_ns`).
    pub bound_ns: u64,
    /// Each member disk's point, sorted by disk id (`members` of them).
    pub disks: Vec<(DiskId, RecoveryPoint)>,
    /// Application-consistent: every member's point is (each member froze its file
    /// systems before the instant and cut while frozen).
    pub app: bool,
}

/// The clock-error bound of a group point whose members' cuts have the given errors:
/// the sum of the two largest (two cuts are at most `e_i + e_j` apart in real time); the
/// single error with one member; 0 with none. Saturates instead of overflowing.
pub fn bound_ns(errors: impl Iterator<Item = u64>) -> u64 {
    let (mut first, mut second) = (0u64, 0u64);
    for e in errors {
        if e > first {
            (first, second) = (e, first);
        } else if e > second {
            second = e;
        }
    }
    first.saturating_add(second)
}

/// Every disk of the store with its stamped recovery points (unstamped ones dropped),
/// read concurrently.
async fn stamped_points(store: &Store) -> Result<Vec<(DiskId, Vec<RecoveryPoint>)>> {
    let disks = store.list_disks().await?;
    futures::stream::iter(disks)
        .map(|disk| async move {
            let mut v = store.points(&disk).await?;
            v.retain(|p| p.group.is_some());
            Ok::<_, crate::Error>((disk, v))
        })
        .buffered(DISK_CONCURRENCY)
        .try_collect()
        .await
}

/// Every group some recovery point of the store is stamped with (reads every catalog).
pub async fn group_ids(store: &Store) -> Result<BTreeSet<GroupId>> {
    Ok(stamped_points(store)
        .await?
        .iter()
        .flat_map(|(_, v)| v.iter().filter_map(|p| p.group.map(|g| g.group)))
        .collect())
}

/// The complete points of `group`, by instant ascending (see the module docs: an
/// incomplete instant is skipped; a conflicting one is skipped with a warning).
///
/// Should one disk hold two points stamped with the same instant (an agent that
/// restarted and cut the instant again), the one with the smaller `error_ns` is used
/// (then the newer).
pub async fn group_points(store: &Store, group: GroupId) -> Result<Vec<GroupPoint>> {
    let mut by_instant: BTreeMap<u64, BTreeMap<DiskId, RecoveryPoint>> = BTreeMap::new();
    for (disk, points) in stamped_points(store).await? {
        for p in points {
            let Some(s) = p.group.filter(|s| s.group == group) else {
                continue;
            };
            let slot = by_instant.entry(s.instant_ns).or_default();
            let better = slot.get(&disk).is_none_or(|q| {
                let e = q.group.map_or(u64::MAX, |t| t.error_ns);
                (s.error_ns, std::cmp::Reverse((p.epoch, p.cut_id)))
                    < (e, std::cmp::Reverse((q.epoch, q.cut_id)))
            });
            if better {
                slot.insert(disk, p);
            }
        }
    }
    let mut out = Vec::new();
    for (instant_ns, disks) in by_instant {
        let claims: BTreeSet<u16> = disks
            .values()
            .filter_map(|p| p.group.map(|s| s.members))
            .collect();
        let (Some(&fewest), Some(&most)) = (claims.first(), claims.last()) else {
            continue;
        };
        if disks.len() > usize::from(most) {
            tracing::warn!(
                group = %group,
                instant_ns,
                disks = disks.len(),
                members = most,
                "more disks claim this group instant than it has members; \
                 not a group point (conflicting stamps)"
            );
            continue;
        }
        if fewest != most || disks.len() < usize::from(most) {
            tracing::debug!(group = %group, instant_ns, disks = disks.len(), ?claims,
                "incomplete group instant skipped");
            continue;
        }
        let bound = bound_ns(disks.values().filter_map(|p| p.group.map(|s| s.error_ns)));
        let app = disks.values().all(|p| p.kind == crate::types::CutKind::App);
        out.push(GroupPoint {
            group,
            instant_ns,
            members: most,
            bound_ns: bound,
            disks: disks.into_iter().collect(),
            app,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::bound_ns;

    #[test]
    fn the_bound_is_the_sum_of_the_two_largest_errors() {
        assert_eq!(bound_ns([].into_iter()), 0);
        assert_eq!(bound_ns([7].into_iter()), 7);
        assert_eq!(bound_ns([3, 5].into_iter()), 8);
        assert_eq!(bound_ns([1, 9, 4, 9, 2].into_iter()), 18);
        assert_eq!(bound_ns([10, 2, 30, 4].into_iter()), 40);
        assert_eq!(bound_ns([0, 0, 0].into_iter()), 0);
        assert_eq!(bound_ns([u64::MAX, 1].into_iter()), u64::MAX);
    }
}
