//! A local-directory target keeps every committed object through a power cut: what a
//! flush reported committed is recoverable from the files and directory entries that were
//! fsynced (simulated by `testing::PowerCut`, which drops everything never synced).
mod common;
use common::*;
use ripcord_store::local::{DurableLocal, OsSync};
use ripcord_store::testing::PowerCut;
use ripcord_store::*;
use std::sync::Arc;

#[tokio::test]
async fn every_committed_point_survives_a_power_cut_of_a_local_target() {
    let dir = tempfile::tempdir().unwrap();
    // A root two directories deep that does not exist yet, as `Store::open` creates it.
    let root = dir.path().join("deployment/target");
    std::fs::create_dir_all(&root).unwrap();
    let power = Arc::new(PowerCut::default());
    let local = DurableLocal::new(&root, power.clone()).unwrap();
    let store = Store::new(Arc::new(local), "");
    let history = write_history(&store, 11, &[(1, 60), (2, 45)], 9, small_cfg()).await;

    let survived = power.surviving_store(&root).await;
    let committed = store.points(&DISK).await.unwrap();
    assert!(!committed.is_empty(), "the history committed no point");
    let after_cut = survived.points(&DISK).await.unwrap();
    assert_eq!(
        after_cut.len(),
        committed.len(),
        "recovery points lost by a power cut after they were committed"
    );
    for (c, model) in &history.points {
        let got = restore(&survived, &point_of(c)).await;
        assert_eq!(
            &got, model,
            "point {}-{} differs after a power cut",
            c.epoch, c.cut_id
        );
    }
    let report = survived.verify(Some(&DISK)).await.unwrap();
    assert!(report.is_ok(), "the surviving store is damaged: {report:?}");
}

#[tokio::test]
async fn a_local_target_opened_by_url_writes_through_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("new/target");
    let url = format!("file://{}", root.display());
    let store = Store::open(&url).await.unwrap();
    assert!(
        store
            .object_store()
            .to_string()
            .starts_with("DurableLocal("),
        "file:// opened {} instead of the durable wrapper",
        store.object_store()
    );
    // The real fsyncs (OsSync, what `open` uses) succeed on every put.
    let history = write_history(&store, 5, &[(1, 10)], 4, small_cfg()).await;
    let reopened = Store::new(
        Arc::new(DurableLocal::new(&root, Arc::new(OsSync)).unwrap()),
        "",
    );
    assert_eq!(
        reopened.points(&DISK).await.unwrap().len(),
        history.points.len()
    );
}
