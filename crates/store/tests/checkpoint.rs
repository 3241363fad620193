//! Resolution cost is bounded by the checkpoint interval, not history.
mod common;
use common::*;
use rand::SeedableRng;
use ripcord_store::testing::CountingStore;
use ripcord_store::*;
use std::sync::Arc;

async fn write_flushing(store: &Store, n: u64, every: u64, model: &mut Model) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut w = store
        .disk_writer(
            DISK,
            WriterConfig {
                pack_target_bytes: 1 << 20,
                checkpoint_every_batches: every,
            },
        )
        .await
        .unwrap();
    w.begin_epoch(&epoch_info(1)).await.unwrap();
    for seq in 1..=n {
        let b = gen_batch(&mut rng, 1, seq);
        model.apply(&b);
        w.add_batch(b).await.unwrap();
        if seq.is_multiple_of(10) {
            w.add_cut(cut(1, seq / 10, seq)).unwrap();
            w.flush().await.unwrap(); // one index segment per 10 batches
        }
    }
}

#[tokio::test]
async fn late_point_reads_checkpoint_plus_few_segments() {
    for (every, bounded) in [(50u64, true), (u64::MAX, false)] {
        let counting = Arc::new(CountingStore::new(Arc::new(
            object_store::memory::InMemory::new(),
        )));
        let store = Store::new(counting.clone(), "");
        let mut model = Model::default();
        write_flushing(&store, 1000, every, &mut model).await;
        let pts = store.points(&DISK).await.unwrap();
        assert_eq!(pts.len(), 100);
        let last = pts.last().unwrap().clone();
        counting.counts.reset();
        let plan = store.resolve(&DISK, &last).await.unwrap();
        let (gets, puts, lists, _) = counting.counts.snapshot();
        assert_eq!(puts, 0);
        if bounded {
            // epoch object + checkpoint + at most every/10 segments
            assert!(gets <= 2 + 50 / 10, "resolve did {gets} GETs");
            assert!(lists <= 2, "resolve did {lists} LISTs");
        } else {
            assert!(
                gets >= 100,
                "without checkpoints every segment is read ({gets})"
            );
        }
        assert!(materialise(&store, &plan).await == model);
        // A middle point uses an older checkpoint and still matches.
        let mid = &pts[45];
        counting.counts.reset();
        let plan = store.resolve(&DISK, mid).await.unwrap();
        if bounded {
            assert!(counting.counts.snapshot().0 <= 7);
        }
        assert_eq!(plan.epoch.epoch, 1);
    }
}
