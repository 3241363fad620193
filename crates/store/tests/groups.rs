//! Consistency-group points found from the catalogs of a local directory store: an
//! instant is a group point only once exactly `members` distinct disks hold a committed
//! cut stamped with it; a missing member or a surplus claimant leaves the instant out;
//! unstamped cuts and other groups' cuts are ignored.
mod common;
use common::*;
use ripcord_store::groups::{GroupPoint, group_ids, group_points};
use ripcord_store::*;
use std::collections::BTreeSet;

const G: GroupId = GroupId([0x61; 16]);
const OTHER: GroupId = GroupId([0x62; 16]);
const A: DiskId = DiskId([0xa0; 16]);
const B: DiskId = DiskId([0xb0; 16]);
const C: DiskId = DiskId([0xc0; 16]);
/// The group's interval: instant `i` is `i * MINUTE`.
const MINUTE: u64 = 60_000_000_000;

fn stamp(group: GroupId, instant: u64, members: u16, error_ns: u64) -> Option<GroupStamp> {
    Some(GroupStamp {
        group,
        instant_ns: instant * MINUTE,
        members,
        offset_ns: -250,
        error_ns,
    })
}

/// A local directory store (`file://`, as a process server writes one).
async fn local_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("file://{}", dir.path().join("store").display());
    (Store::open(&url).await.expect("opening the store"), dir)
}

/// Commits one cut per stamp on `disk` (epoch 1, after one batch each, one flush each),
/// continuing after whatever the disk already holds. Returns the cuts.
async fn commit_cuts(store: &Store, disk: DiskId, stamps: &[Option<GroupStamp>]) -> Vec<CutInfo> {
    let mut w = store.disk_writer(disk, small_cfg()).await.unwrap();
    w.begin_epoch(&epoch_info(1)).await.unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(disk.0[0].into());
    let mut out = Vec::new();
    for &group in stamps {
        let seq = w.next_seq();
        w.add_batch(gen_batch(&mut rng, 1, seq)).await.unwrap();
        let c = CutInfo {
            group,
            ..cut(1, w.last_cut_id() + 1, seq)
        };
        assert!(w.add_cut(c).unwrap());
        assert_eq!(w.flush().await.unwrap().cuts_committed, vec![c.cut_id]);
        out.push(c);
    }
    out
}

/// A group point in brief: (instant, members, bound, [(disk, cut id)]).
type Summary = (u64, u16, u64, Vec<(DiskId, u64)>);

fn summary(points: &[GroupPoint]) -> Vec<Summary> {
    points
        .iter()
        .map(|p| {
            assert_eq!(p.group, G);
            let disks = p.disks.iter().map(|(d, q)| (*d, q.cut_id)).collect();
            (p.instant_ns / MINUTE, p.members, p.bound_ns, disks)
        })
        .collect()
}

#[tokio::test]
async fn an_instant_is_a_group_point_only_when_every_member_disk_holds_it() {
    let (store, _dir) = local_store().await;
    // Disk B (written first: the order of disks must not matter) lacks instant 2; both
    // disks have unstamped cuts between the group's, and A one of another group.
    let b = commit_cuts(
        &store,
        B,
        &[stamp(G, 1, 2, 10), None, stamp(G, 3, 2, 1_000)],
    )
    .await;
    let a = commit_cuts(
        &store,
        A,
        &[
            None,
            stamp(G, 1, 2, 100),
            stamp(G, 2, 2, 200),
            stamp(OTHER, 2, 1, 5),
            stamp(G, 3, 2, 300),
        ],
    )
    .await;
    // A disk with only unstamped cuts.
    commit_cuts(&store, C, &[None, None]).await;

    let points = group_points(&store, G).await.unwrap();
    assert_eq!(
        summary(&points),
        vec![
            (1, 2, 110, vec![(A, a[1].cut_id), (B, b[0].cut_id)]),
            (3, 2, 1_300, vec![(A, a[4].cut_id), (B, b[2].cut_id)]),
        ],
        "instant 2 lacks disk B"
    );
    // The members' points are the stored ones, stamps and MACs included.
    let (disk, p) = &points[1].disks[1];
    assert_eq!((*disk, p.cut()), (B, b[2]));
    assert!(p.catalog_object.contains("/catalog/"));

    // A group of one disk: its point's bound is that disk's error.
    let other = group_points(&store, OTHER).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!((other[0].instant_ns, other[0].bound_ns), (2 * MINUTE, 5));
    let (disk, p) = &other[0].disks[0];
    assert_eq!((other[0].disks.len(), *disk, p.cut()), (1, A, a[3]));

    assert_eq!(group_ids(&store).await.unwrap(), BTreeSet::from([G, OTHER]));
    let (empty, _d) = local_store().await;
    assert!(group_points(&empty, G).await.unwrap().is_empty());
    assert!(group_ids(&empty).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_third_disk_claiming_a_two_disk_instant_makes_it_a_conflict() {
    let (store, _dir) = local_store().await;
    commit_cuts(&store, A, &[stamp(G, 1, 2, 100), stamp(G, 3, 2, 300)]).await;
    commit_cuts(&store, B, &[stamp(G, 1, 2, 10), stamp(G, 3, 2, 1_000)]).await;
    commit_cuts(&store, C, &[stamp(G, 1, 2, 1)]).await;
    let points = group_points(&store, G).await.unwrap();
    assert_eq!(
        summary(&points)
            .iter()
            .map(|(i, _, bound, _)| (*i, *bound))
            .collect::<Vec<_>>(),
        vec![(3, 1_300)],
        "instant 1 has three claimants for two members"
    );
}

#[tokio::test]
async fn a_point_appears_once_its_last_member_commits_and_disagreeing_counts_never_make_one() {
    let (store, _dir) = local_store().await;
    // Instant 1 of three disks; instant 2 where B names another member count.
    commit_cuts(&store, A, &[stamp(G, 1, 3, 7), stamp(G, 2, 2, 7)]).await;
    commit_cuts(&store, B, &[stamp(G, 1, 3, 9), stamp(G, 2, 3, 7)]).await;
    assert!(
        group_points(&store, G).await.unwrap().is_empty(),
        "instant 1 waits for disk C; instant 2's members disagree"
    );
    // C commits instant 1 twice (an agent that cut it again after a restart): the
    // member with the smaller error is used.
    let c = commit_cuts(&store, C, &[stamp(G, 1, 3, 50), stamp(G, 1, 3, 4)]).await;
    let points = group_points(&store, G).await.unwrap();
    assert_eq!(
        summary(&points),
        vec![(1, 3, 9 + 7, vec![(A, 1), (B, 1), (C, c[1].cut_id)])]
    );
}
