//! Bench (ignored by default): a disk with 1,000,000 recovery points in a local store.
//!
//! `cargo test -p ripcord-store --release --test catalog_scale -- --ignored --nocapture`
//!
//! The points are written by the real writer (5,000 flushes of 200 cuts, one batch
//! each, compaction running after every flush as in production) through an un-fsynced
//! local file system, so the layout is exactly the writer's; then a fresh `file://` store
//! times listing every point, the latest-point lookup (what `failover --point latest`
//! reads from the catalog), resolving that point and a lookup by id.
mod common;
use common::*;
use ripcord_store::*;
use std::sync::Arc;
use std::time::Instant;

const FLUSHES: u64 = 5_000;
const CUTS_PER_FLUSH: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "bench: writes 1,000,000 points; run with --release -- --ignored --nocapture"]
async fn one_million_points_list_and_latest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("local fs");
    let store = Store::new(Arc::new(fs), "");
    let mut w = store
        .disk_writer(DISK, WriterConfig::default())
        .await
        .expect("writer");
    w.begin_epoch(&epoch_info(1)).await.expect("epoch");
    let t = Instant::now();
    let mut cut_id = 0;
    for seq in 1..=FLUSHES {
        w.add_batch(SealedBatch {
            epoch: 1,
            seq,
            extents: vec![Extent {
                sector: seq % SECTORS,
                sectors: 1,
                kind: ExtentKind::Data,
            }],
            flags: 0,
            sealed: vec![seq as u8; 512],
        })
        .await
        .expect("batch");
        for _ in 0..CUTS_PER_FLUSH {
            cut_id += 1;
            w.add_cut(cut(1, cut_id, seq)).expect("cut");
        }
        w.flush_at(server_clock(1, seq)).await.expect("flush");
    }
    let total = FLUSHES * CUTS_PER_FLUSH;
    let segments = names(store.object_store(), &format!("{}/catalog", disk_dir())).await;
    println!(
        "wrote {total} points in {FLUSHES} flushes in {:.1} s: {} catalog objects, {} MiB",
        t.elapsed().as_secs_f64(),
        segments.len(),
        segments.iter().map(|(_, s)| s).sum::<u64>() >> 20
    );
    assert!(segments.len() < 4 * CATALOG_FANOUT, "{segments:?}");

    let url = format!("file://{}", dir.path().display());
    let store = Store::open(&url).await.expect("open file:// store");
    let t = Instant::now();
    let pts = store.points(&DISK).await.expect("points");
    let list_s = t.elapsed().as_secs_f64();
    assert_eq!(pts.len() as u64, total);
    println!("points: {} points listed in {:.3} s", pts.len(), list_s);

    let t = Instant::now();
    let latest = store
        .latest_point(&DISK)
        .await
        .expect("latest")
        .expect("a point");
    let latest_s = t.elapsed().as_secs_f64();
    assert_eq!(latest.cut_id, total);
    println!("latest point: {} in {:.1} ms", latest.id, latest_s * 1e3);
    let t = Instant::now();
    let plan = store.resolve(&DISK, &latest).await.expect("resolve");
    let resolve_s = t.elapsed().as_secs_f64();
    println!(
        "resolve latest: {:.1} ms ({} batches)",
        resolve_s * 1e3,
        plan.locations.len()
    );
    let t = Instant::now();
    let mid = store
        .point_by_id(&DISK, 1, total / 2 + 1)
        .await
        .expect("by id")
        .expect("a point");
    println!(
        "point by id {}: {:.1} ms",
        mid.id,
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(list_s < 2.0, "points list took {list_s:.3} s");
    assert!(
        latest_s + resolve_s < 2.0,
        "latest + resolve took {:.3} s",
        latest_s + resolve_s
    );
}
