//! Written history resolves to exactly the reference model, on both backends.
mod common;
use common::*;
use rand::{RngExt, SeedableRng};
use ripcord_store::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_points_match_model() {
    for (name, os, _dir) in backends() {
        let store = Store::new(os, "pfx/a");
        let h = write_history(&store, 42, &[(1, 300), (2, 250), (3, 120)], 9, small_cfg()).await;
        // Catalog has every cut, sorted by time, with stable ids.
        let pts = store.points(&DISK).await.unwrap();
        assert_eq!(pts.len(), h.points.len(), "{name}");
        assert!(pts.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
        for (c, _) in &h.points {
            assert!(pts.iter().any(|p| p.cut() == *c), "{name}: missing {c:?}");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut picks: Vec<usize> = (0..25)
            .map(|_| rng.random_range(0..h.points.len()))
            .collect();
        picks.extend([0, h.points.len() - 1]);
        for i in picks {
            let (c, model) = &h.points[i];
            let got = restore(&store, &point_of(c)).await;
            assert!(
                got == *model,
                "{name}: point {}-{} (seq {}) differs",
                c.epoch,
                c.cut_id,
                c.seq
            );
        }
        // A point must only read its own epoch: epoch 2's points reference no epoch-1 pack.
        let p2 = pts.iter().find(|p| p.epoch == 2).unwrap();
        let plan = store.resolve(&DISK, p2).await.unwrap();
        assert!(
            plan.batches()
                .iter()
                .all(|l| l.epoch == 2 && l.pack.contains("/packs/00000000000000000002-"))
        );
        assert_eq!(plan.epoch, epoch_info(2));
        assert_eq!(plan.size_bytes, SECTORS * 512);
        // Metadata listings.
        assert_eq!(store.list_disks().await.unwrap(), vec![DISK]);
        let eps: Vec<u64> = store
            .epochs(&DISK)
            .await
            .unwrap()
            .iter()
            .map(|e| e.epoch)
            .collect();
        assert_eq!(eps, vec![1, 2, 3]);
        assert!(store.verify(None).await.unwrap().is_ok(), "{name}");
    }
}

#[tokio::test]
async fn escrow_written_once() {
    let store = Store::open("memory://").await.unwrap();
    assert!(matches!(
        store.get_escrow().await,
        Err(Error::NotFound { .. })
    ));
    store.put_escrow(b"{\"k\":1}").await.unwrap();
    store.put_escrow(b"{\"k\":1}").await.unwrap();
    assert!(matches!(
        store.put_escrow(b"{\"k\":2}").await,
        Err(Error::EscrowConflict { .. })
    ));
    assert_eq!(store.get_escrow().await.unwrap(), b"{\"k\":1}");
}

#[tokio::test]
async fn open_urls() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nested/store");
    let s = Store::open(&format!("file://{}", p.display()))
        .await
        .unwrap();
    s.put_escrow(b"x").await.unwrap();
    assert!(p.join("escrow.json").exists());
    assert!(matches!(
        Store::open("file://relative").await,
        Err(Error::BadUrl { .. })
    ));
    assert!(matches!(
        Store::open("gs://b").await,
        Err(Error::BadUrl { .. })
    ));
    assert!(
        Store::open("s3://bucket/prefix").await.is_ok() || std::env::var("AWS_REGION").is_err()
    );
}

#[tokio::test]
async fn writer_rejects_gaps_and_foreign_epochs() {
    let store = Store::open("memory://").await.unwrap();
    let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    assert!(matches!(
        w.add_batch(gen_batch(&mut rng, 1, 1)).await,
        Err(Error::NoEpoch { .. })
    ));
    w.begin_epoch(&epoch_info(1)).await.unwrap();
    assert!(w.add_batch(gen_batch(&mut rng, 1, 1)).await.unwrap());
    assert!(
        !w.add_batch(gen_batch(&mut rng, 1, 1)).await.unwrap(),
        "duplicate ignored"
    );
    assert!(matches!(
        w.add_batch(gen_batch(&mut rng, 1, 3)).await,
        Err(Error::SeqGap {
            expected: 2,
            got: 3,
            ..
        })
    ));
    assert!(matches!(
        w.add_batch(gen_batch(&mut rng, 2, 2)).await,
        Err(Error::WrongEpoch { .. })
    ));
    let mut other = epoch_info(1);
    other.size_bytes += 1;
    assert!(matches!(
        w.begin_epoch(&other).await,
        Err(Error::EpochConflict { .. })
    ));
    w.begin_epoch(&epoch_info(2)).await.unwrap();
    assert!(matches!(
        w.begin_epoch(&epoch_info(1)).await,
        Err(Error::EpochRegression { .. })
    ));
    // A cut waits until its batches are durable.
    assert!(w.add_cut(cut(2, 1, 2)).unwrap());
    w.add_batch(gen_batch(&mut rng, 2, 1)).await.unwrap();
    assert_eq!(w.flush().await.unwrap().cuts_committed, Vec::<u64>::new());
    assert!(store.points(&DISK).await.unwrap().is_empty());
    w.add_batch(gen_batch(&mut rng, 2, 2)).await.unwrap();
    let c = w.flush().await.unwrap();
    assert_eq!((c.epoch, c.durable_seq, c.cuts_committed), (2, 2, vec![1]));
    assert_eq!(store.points(&DISK).await.unwrap().len(), 1);
}
