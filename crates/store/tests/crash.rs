//! Writer crashes and failed flushes leave a consistent store; retries and
//! restarts resume without duplicates or gaps.
mod common;
use common::*;
use rand::SeedableRng;
use ripcord_store::testing::{Faults, FaultyStore};
use ripcord_store::*;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[tokio::test]
async fn crash_between_pack_upload_and_index_commit() {
    for (name, os, _dir) in backends() {
        let faulty = Arc::new(FaultyStore::new(os.clone()));
        let store = Store::new(faulty.clone(), "");
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut model = Model::default();
        let mut all = Vec::new();
        let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        w.begin_epoch(&epoch_info(1)).await.unwrap();
        for seq in 1..=20 {
            let b = gen_batch(&mut rng, 1, seq);
            all.push(b.clone());
            w.add_batch(b).await.unwrap();
        }
        w.add_cut(cut(1, 1, 20)).unwrap();
        assert_eq!(w.flush().await.unwrap().durable_seq, 20);
        // Batches 21..=35 reach a pack, but the index put "crashes".
        for seq in 21..=35 {
            let b = gen_batch(&mut rng, 1, seq);
            all.push(b.clone());
            w.add_batch(b).await.unwrap();
        }
        w.add_cut(cut(1, 2, 35)).unwrap();
        faulty.set(Faults {
            fail_puts_containing: Some("/index/".into()),
            ..Faults::default()
        });
        assert!(matches!(w.flush().await, Err(Error::Io { .. })), "{name}");
        drop(w); // crash: in-memory state lost
        faulty.set(Faults::default());
        let orphan_packs = store.verify(Some(&DISK)).await.unwrap().unreferenced_packs;
        let k = orphan_packs.len();
        assert!(k >= 1, "{name}: uploaded-but-unindexed packs");

        // Restart: discovers durable seq 20 and cut 1; the journal replays from 1.
        let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        assert_eq!(
            (w.epoch(), w.durable_seq(), w.next_seq(), w.last_cut_id()),
            (Some(1), 20, 21, 1)
        );
        w.begin_epoch(&epoch_info(1)).await.unwrap(); // idempotent
        for b in &all {
            w.add_batch(b.clone()).await.unwrap(); // 1..=20 ignored as duplicates
        }
        assert!(
            !w.add_cut(cut(1, 1, 20)).unwrap(),
            "committed cut is a duplicate"
        );
        assert!(w.add_cut(cut(1, 2, 35)).unwrap());
        let c = w.flush().await.unwrap();
        assert_eq!(
            (c.durable_seq, c.cuts_committed.clone()),
            (35, vec![2]),
            "{name}"
        );
        for b in &all {
            model.apply(b);
        }
        let pts = store.points(&DISK).await.unwrap();
        assert_eq!(pts.len(), 2);
        assert!(restore(&store, &pts[1]).await == model, "{name}");
        // Index covers 1..=35 exactly once each.
        let plan = store.resolve(&DISK, &pts[1]).await.unwrap();
        assert!(plan.locations.keys().all(|s| (1..=35).contains(s)));

        // The orphan is only deleted after the grace period.
        let now = SystemTime::now();
        let cfg = GcConfig::default();
        let r = store
            .apply_retention_with(&DISK, 0, &cfg, now)
            .await
            .unwrap();
        assert_eq!((r.packs_deleted, r.packs_awaiting_grace), (0, k), "{name}");
        let r = store
            .apply_retention_with(&DISK, 0, &cfg, now + Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(r.packs_deleted, 0, "{name}: still inside grace");
        let r = store
            .apply_retention_with(&DISK, 0, &cfg, now + Duration::from_secs(7200))
            .await
            .unwrap();
        assert_eq!(r.packs_deleted, k, "{name}: orphans deleted after grace");
        let v = store.verify(Some(&DISK)).await.unwrap();
        assert!(
            v.is_ok() && v.unreferenced_packs.is_empty(),
            "{name}: {v:?}"
        );
        assert!(restore(&store, &pts[1]).await == model, "{name}");
    }
}

/// Fail the Nth put of a flush, for every N; the store stays consistent,
/// a retry succeeds, and the final content equals the model. Also with
/// lost acknowledgements (the put happened but reported failure).
#[tokio::test]
async fn failed_flush_is_consistent_and_retry_succeeds() {
    for lose_ack in [false, true] {
        for n in 1..=8 {
            let faulty = Arc::new(FaultyStore::new(Arc::new(
                object_store::memory::InMemory::new(),
            )));
            let store = Store::new(faulty.clone(), "");
            let mut rng = rand::rngs::StdRng::seed_from_u64(n);
            let mut model = Model::default();
            let cfg = WriterConfig {
                pack_target_bytes: 64 << 10,
                checkpoint_every_batches: 10,
            };
            let mut w = store.disk_writer(DISK, cfg).await.unwrap();
            w.begin_epoch(&epoch_info(1)).await.unwrap();
            for seq in 1..=12 {
                let b = gen_batch(&mut rng, 1, seq);
                model.apply(&b);
                w.add_batch(b).await.unwrap();
            }
            w.add_cut(cut(1, 1, 6)).unwrap();
            w.add_cut(cut(1, 2, 12)).unwrap();
            faulty.set(Faults {
                fail_nth_put: Some(n),
                lose_ack,
                ..Faults::default()
            });
            let first = w.flush().await;
            // Whatever happened, the store is consistent.
            let v = store.verify(Some(&DISK)).await.unwrap();
            assert!(v.is_ok(), "n={n} lose_ack={lose_ack}: {:?}", v.damaged);
            for p in store.points(&DISK).await.unwrap() {
                store.resolve(&DISK, &p).await.unwrap();
            }
            let c = match first {
                Ok(c) => c,
                Err(e) => {
                    assert!(matches!(e, Error::Io { .. }), "{e}");
                    w.flush().await.unwrap()
                }
            };
            assert_eq!(c.durable_seq, 12);
            let pts = store.points(&DISK).await.unwrap();
            assert_eq!(pts.len(), 2, "n={n}");
            assert!(
                restore(&store, &pts[1]).await == model,
                "n={n} lose_ack={lose_ack}"
            );
            assert!(store.verify(Some(&DISK)).await.unwrap().is_ok());
        }
    }
}
