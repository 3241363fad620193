//! The uploader against a local target store: what it trims from the journal is durable
//! in the store (power-cut simulation), and trimming goes on after the uploader restarts,
//! whether at a server restart or after a store error.
mod common;

use std::sync::Arc;

use common::*;
use ripcord_store::{
    Store, WriterConfig,
    local::DurableLocal,
    testing::{Faults, FaultyStore, PowerCut},
};

/// Writes `batches` batches of 128 KiB (1 MiB journal segments hold 7) at spread sectors,
/// with a cut after every third.
fn write_some(f: &mut Fixture, batches: u64) {
    for i in 0..batches {
        f.write((i * 997 * 8) % (SIZE / 512 - 256), 128);
        if i % 3 == 2 {
            f.cut();
        }
    }
}

#[tokio::test]
async fn batches_trimmed_from_the_journal_survive_a_power_cut_of_the_target() {
    let mut f = Fixture::new();
    std::fs::create_dir_all(&f.target).unwrap();
    let power = Arc::new(PowerCut::default());
    let store = Store::new(
        Arc::new(DurableLocal::new(&f.target, power.clone()).unwrap()),
        "",
    );
    write_some(&mut f, 40);
    let last_cut = f.cut();
    let mut u = open_uploader(&f, store).await;
    drain(&mut u).await;
    assert!(
        f.first_journal_seq() > 1,
        "the uploader trimmed nothing; the test needs a trimmed journal"
    );

    // Power cut now: only what was fsynced is left of the target.
    let survived = power.surviving_store(&f.target).await;
    let w = survived
        .disk_writer(DISK, WriterConfig::default())
        .await
        .expect("reading the surviving store");
    assert_eq!(
        (w.epoch(), w.durable_seq(), w.last_cut_id()),
        (Some(1), 40, last_cut),
        "acknowledged batches or cuts the journal no longer holds were lost by a power cut"
    );
    let points = survived.points(&DISK).await.unwrap();
    assert_eq!(points.len() as u64, last_cut, "recovery points lost");
    let report = survived.verify(Some(&DISK)).await.unwrap();
    assert!(report.is_ok(), "the surviving store is damaged: {report:?}");
}

#[tokio::test]
async fn an_uploader_restarted_over_committed_cuts_keeps_trimming() {
    let mut f = Fixture::new();
    let store = Store::open(&f.target_url()).await.unwrap();
    write_some(&mut f, 20);
    let mut u = open_uploader(&f, store.clone()).await;
    drain(&mut u).await;
    drop(u); // a restart: the server's or the retry loop's
    let first_at_restart = f.first_journal_seq();
    // The journal still holds committed cuts (trimming drops whole segments only).
    assert!(first_at_restart > 1, "the first run trimmed nothing");

    let mut u = open_uploader(&f, store.clone()).await;
    drain(&mut u).await;
    write_some(&mut f, 40);
    let before = f.cache_bytes();
    drain(&mut u).await;
    let after = f.cache_bytes();
    assert!(
        f.first_journal_seq() > first_at_restart,
        "no segment trimmed after the restart (first record still {first_at_restart})"
    );
    assert!(
        after * 2 < before,
        "the cache did not shrink after the restart: {before} -> {after} bytes"
    );
    let w = store
        .disk_writer(DISK, WriterConfig::default())
        .await
        .unwrap();
    assert_eq!(w.durable_seq(), 60, "batches missing from the store");
}

#[tokio::test]
async fn a_store_error_after_a_new_epoch_began_does_not_stop_trimming() {
    let mut f = Fixture::new();
    let inner = Store::open(&f.target_url()).await.unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::clone(inner.object_store())));
    let store = Store::new(faulty.clone(), "");
    write_some(&mut f, 10);
    let mut u = open_uploader(&f, store.clone()).await;
    drain(&mut u).await;

    // Epoch 2 begins in the store, then its first index put fails: the journal still
    // holds the end of epoch 1 when the uploader is restarted.
    f.new_epoch();
    write_some(&mut f, 3);
    faulty.set(Faults {
        fail_puts_containing: Some("/index/".into()),
        ..Faults::default()
    });
    let err = loop {
        match u.step().await {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        format!("{err:#}").contains("injected put failure"),
        "unexpected error: {err:#}"
    );
    drop(u);
    faulty.set(Faults::default());

    let mut u = open_uploader(&f, store.clone()).await;
    let first_at_restart = f.first_journal_seq();
    drain(&mut u).await;
    write_some(&mut f, 40);
    let before = f.cache_bytes();
    drain(&mut u).await;
    assert!(
        f.first_journal_seq() > first_at_restart,
        "no segment trimmed after the restart (first record still {first_at_restart})"
    );
    assert!(
        f.cache_bytes() * 2 < before,
        "the cache did not shrink after the restart"
    );
    let w = store
        .disk_writer(DISK, WriterConfig::default())
        .await
        .unwrap();
    assert_eq!((w.epoch(), w.durable_seq()), (Some(2), 43));
}
