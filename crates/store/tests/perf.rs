//! Performance numbers (ignored by default; run with
//! `cargo test --release --test perf -- --ignored --nocapture`).
mod common;
use common::*;
use rand::SeedableRng;
use ripcord_store::*;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn perf_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    // Pack write throughput: 256 KiB sealed payloads.
    let mut w = store
        .disk_writer(DiskId([1; 16]), WriterConfig::default())
        .await
        .unwrap();
    w.begin_epoch(&epoch_info(1)).await.unwrap();
    let payload = vec![0xA5u8; 256 << 10];
    let n = 1024u64;
    let t = Instant::now();
    for seq in 1..=n {
        let b = SealedBatch {
            epoch: 1,
            seq,
            extents: vec![Extent {
                sector: (seq * 512) % 1_000_000,
                sectors: 512,
                kind: ExtentKind::Data,
            }],
            flags: 0,
            sealed: payload.clone(),
        };
        w.add_batch(b).await.unwrap();
    }
    w.flush().await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "pack write (local FS): {:.0} MiB/s ({} MiB in {secs:.2}s)",
        (n * 256) as f64 / 1024.0 / secs,
        n / 4
    );

    // Resolve over 100k small batches (index + checkpoints only).
    let disk = DISK;
    let mut w = store
        .disk_writer(
            disk,
            WriterConfig {
                pack_target_bytes: 48 << 20,
                checkpoint_every_batches: 10_000,
            },
        )
        .await
        .unwrap();
    w.begin_epoch(&EpochInfo {
        size_bytes: 64 << 30,
        ..epoch_info(1)
    })
    .await
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let t = Instant::now();
    for seq in 1..=100_000u64 {
        use rand::RngExt;
        let sector = rng.random_range(0..(64u64 << 21));
        let b = SealedBatch {
            epoch: 1,
            seq,
            extents: vec![Extent {
                sector,
                sectors: 8,
                kind: ExtentKind::Data,
            }],
            flags: 0,
            sealed: vec![1; 64],
        };
        w.add_batch(b).await.unwrap();
        if seq.is_multiple_of(1000) {
            w.add_cut(cut(1, seq / 1000, seq)).unwrap();
            w.flush().await.unwrap();
        }
    }
    println!(
        "wrote 100k batches (100 flushes, 10 checkpoints) in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let pts = store.points(&disk).await.unwrap();
    let t = Instant::now();
    let plan = store.resolve(&disk, pts.last().unwrap()).await.unwrap();
    println!(
        "resolve latest of 100k batches: {:.1} ms ({} runs, {} batches)",
        t.elapsed().as_secs_f64() * 1e3,
        plan.runs.len(),
        plan.locations.len()
    );
    let t = Instant::now();
    let plan = store.resolve(&disk, &pts[pts.len() - 2]).await.unwrap();
    println!(
        "resolve second-latest: {:.1} ms ({} runs)",
        t.elapsed().as_secs_f64() * 1e3,
        plan.runs.len()
    );
    let t = Instant::now();
    let r = store
        .apply_retention(&disk, pts[50].committed_ns)
        .await
        .unwrap();
    println!(
        "retention GC over 100k batches: {:.1} ms ({r:?})",
        t.elapsed().as_secs_f64() * 1e3
    );
}
