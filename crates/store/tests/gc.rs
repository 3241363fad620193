//! Retention: expired points disappear, their data is freed, retained points
//! still restore the same bytes, also with a concurrent writer.
mod common;
use common::*;
use rand::{RngExt, SeedableRng};
use ripcord_store::*;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

async fn pack_bytes(os: &Arc<dyn object_store::ObjectStore>, epoch: u64) -> (usize, u64) {
    let v = names(os, &format!("{}/packs", disk_dir())).await;
    let pre = format!("/{epoch:020}-");
    let v: Vec<_> = v.into_iter().filter(|(n, _)| n.contains(&pre)).collect();
    (v.len(), v.iter().map(|(_, s)| s).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_frees_data_and_keeps_points() {
    for (name, os, _dir) in backends() {
        let store = Store::new(os.clone(), "");
        let h = write_history(&store, 11, &[(1, 150), (2, 400)], 8, small_cfg()).await;
        // Retention compares the writer's commit times (server_clock), not the agent's.
        let before = store.points(&DISK).await.unwrap();
        let committed = |c: &CutInfo| {
            before
                .iter()
                .find(|p| p.cut() == *c)
                .expect("every cut is listed")
                .committed_ns
        };
        let e2: Vec<_> = h.points.iter().filter(|(c, _)| c.epoch == 2).collect();
        let cutoff = committed(&e2[e2.len() / 2].0);
        let (n_before, b_before) = pack_bytes(&os, 2).await;

        let now = SystemTime::now();
        let cfg = GcConfig::default();
        let r1 = store
            .apply_retention_with(&DISK, cutoff, &cfg, now)
            .await
            .unwrap();
        let expected_expired = h
            .points
            .iter()
            .filter(|(c, _)| committed(c) < cutoff)
            .count();
        assert_eq!(r1.points_expired.len(), expected_expired, "{name}");
        assert_eq!(r1.epochs_deleted, vec![1], "{name}");
        assert!(
            r1.packs_rewritten + r1.index_rewritten > 0,
            "{name}: {r1:?}"
        );
        // Every retained point restores identically between the two runs.
        let retained: Vec<_> = h
            .points
            .iter()
            .filter(|(c, _)| committed(c) >= cutoff)
            .collect();
        let pts = store.points(&DISK).await.unwrap();
        assert_eq!(pts.len(), retained.len(), "{name}");
        for (c, m) in &retained {
            assert!(
                restore(&store, &point_of(c)).await == *m,
                "{name}: {c:?} after run 1"
            );
        }
        let r2 = store
            .apply_retention_with(&DISK, cutoff, &cfg, now + Duration::from_secs(7200))
            .await
            .unwrap();
        assert!(r2.packs_deleted > 0, "{name}: {r2:?}");
        let (n_after, b_after) = pack_bytes(&os, 2).await;
        assert!(b_after < b_before, "{name}: bytes {b_before} -> {b_after}");
        assert!(n_after <= n_before + r1.packs_written, "{name}");
        for (c, m) in &retained {
            assert!(
                restore(&store, &point_of(c)).await == *m,
                "{name}: {c:?} after run 2"
            );
        }
        assert_eq!(
            pack_bytes(&os, 1).await,
            (0, 0),
            "{name}: epoch 1 deleted whole"
        );
        assert_eq!(store.epochs(&DISK).await.unwrap().len(), 1);
        let v = store.verify(Some(&DISK)).await.unwrap();
        assert!(
            v.is_ok() && v.unreferenced_packs.is_empty(),
            "{name}: {:?}",
            v.damaged
        );

        // Expire everything: the newest point is always kept and resolves.
        store
            .apply_retention_with(&DISK, u64::MAX, &cfg, now + Duration::from_secs(7300))
            .await
            .unwrap();
        store
            .apply_retention_with(&DISK, u64::MAX, &cfg, now + Duration::from_secs(20000))
            .await
            .unwrap();
        let pts = store.points(&DISK).await.unwrap();
        assert_eq!(pts.len(), 1);
        let (c, m) = h.points.last().unwrap();
        assert_eq!(pts[0].cut(), *c);
        assert!(restore(&store, &pts[0]).await == *m, "{name}: newest point");
        let (_, b_min) = pack_bytes(&os, 2).await;
        assert!(b_min <= b_after, "{name}");
        assert!(store.verify(Some(&DISK)).await.unwrap().is_ok());

        // The writer resumes after GC and continues the epoch.
        let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        assert_eq!((w.durable_seq(), w.last_cut_id()), (400, c.cut_id));
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let mut model = m.clone();
        for seq in 401..=430 {
            let b = gen_batch(&mut rng, 2, seq);
            model.apply(&b);
            w.add_batch(b).await.unwrap();
        }
        w.add_cut(cut(2, c.cut_id + 1, 430)).unwrap();
        w.flush().await.unwrap();
        let p = store.points(&DISK).await.unwrap().pop().unwrap();
        assert!(restore(&store, &p).await == model, "{name}: point after GC");
    }
}

/// A writer keeps writing while GC runs repeatedly with an advancing clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_concurrent_with_writer() {
    for (name, os, _dir) in backends() {
        let store = Store::new(os.clone(), "");
        let cfg = WriterConfig {
            pack_target_bytes: 128 << 10,
            checkpoint_every_batches: 25,
        };
        let h = write_history(&store, 5, &[(1, 100)], 6, cfg.clone()).await;
        let models = Arc::new(tokio::sync::Mutex::new(h.points.clone()));
        let mut model = h.points.last().unwrap().1.clone();

        let wstore = store.clone();
        let wmodels = models.clone();
        let writer = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(77);
            let mut w = wstore.disk_writer(DISK, cfg).await.unwrap();
            let mut cut_id = w.last_cut_id();
            for seq in 101..=400 {
                let b = gen_batch(&mut rng, 1, seq);
                model.apply(&b);
                w.add_batch(b).await.unwrap();
                if rng.random_range(0..5) == 0 {
                    cut_id += 1;
                    let c = cut(1, cut_id, seq);
                    w.add_cut(c).unwrap();
                    wmodels.lock().await.push((c, model.clone()));
                }
                if rng.random_range(0..4) == 0 {
                    // A racing reader may see NotFound for an index object
                    // GC just replaced; the flush is simply retried.
                    while let Err(e) = w.flush().await {
                        assert!(matches!(e, Error::NotFound { .. }), "{e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            while w.flush().await.is_err() {}
        });
        let mut round = 0u64;
        let mut deleted = 0;
        // Real clock with a short grace: the writer commits each pack within
        // milliseconds, far inside the grace period, as the protocol requires.
        let gcfg = GcConfig {
            grace: Duration::from_millis(300),
            ..GcConfig::default()
        };
        while !writer.is_finished() {
            round += 1;
            // Keep roughly the newest half of the points; advance the clock
            // by more than the grace period each round.
            let pts = store.points(&DISK).await.unwrap();
            let mut times: Vec<u64> = pts.iter().map(|p| p.committed_ns).collect();
            times.sort_unstable();
            let cutoff = times.get(times.len() / 2).copied().unwrap_or(0);
            match store
                .apply_retention_with(&DISK, cutoff, &gcfg, SystemTime::now())
                .await
            {
                Ok(r) => deleted += r.packs_deleted,
                Err(Error::NotFound { .. }) => {}
                Err(e) => panic!("{name}: gc failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        writer.await.unwrap();
        assert!(
            round > 5 && deleted > 0,
            "{name}: {round} GC rounds deleted {deleted} packs"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        for _ in 0..2 {
            store
                .apply_retention_with(&DISK, 0, &gcfg, SystemTime::now())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let v = store.verify(Some(&DISK)).await.unwrap();
        assert!(v.is_ok(), "{name}: {:?}", v.damaged);
        let models = models.lock().await;
        let pts = store.points(&DISK).await.unwrap();
        assert!(!pts.is_empty());
        for p in &pts {
            let (_, m) = models
                .iter()
                .find(|(c, _)| *c == p.cut())
                .expect("point was written");
            assert!(
                restore(&store, p).await == *m,
                "{name}: point {} after concurrent GC",
                p.id
            );
        }
        // The newest point is the writer's last cut.
        assert_eq!(pts.last().unwrap().cut(), models.last().unwrap().0);
    }
}
