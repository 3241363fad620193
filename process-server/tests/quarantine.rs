//! One damaged disk journal quarantines that disk only: the server starts and keeps
//! uploading every other disk.
mod common;

use std::time::{Duration, Instant};

use common::*;
use ripcord_process_server::{deploy, registry::Registry, server};
use ripcord_proto::{DiskId, ProtectDisk};
use ripcord_store::{Store, WriterConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_quarantines_its_disk_not_the_server() {
    let mut f = Fixture::new();
    for i in 0..12u64 {
        f.write(i * 512, 128);
    }
    f.cut();
    let stopped = f.stop();
    let dep_dir = stopped.deployment.clone();

    // A second disk whose journal is damaged mid-log (a flipped byte in a sealed segment).
    let damaged = DiskId([0xd0; 16]);
    let good_dir = cache_dir(&dep_dir).join(DISK.to_string());
    let bad_dir = cache_dir(&dep_dir).join(damaged.to_string());
    std::fs::create_dir_all(&bad_dir).unwrap();
    let mut segments: Vec<_> = std::fs::read_dir(&good_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    assert!(
        segments.len() >= 2,
        "the test needs a sealed segment: {segments:?}"
    );
    for p in &segments {
        std::fs::copy(p, bad_dir.join(p.file_name().unwrap())).unwrap();
    }
    let first = bad_dir.join(segments[0].file_name().unwrap());
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[4096] ^= 0xff;
    std::fs::write(&first, bytes).unwrap();
    Registry::open(&dep_dir.join("disks.json"))
        .unwrap()
        .claim(
            "machine-2",
            &ProtectDisk {
                disk_id: damaged,
                size_bytes: SIZE,
                sector_size: 512,
                epoch: 1,
                wrapped_key: vec![1; 8],
            },
        )
        .unwrap();

    // Serve until the healthy disk's journal is in the store.
    let dep = deploy::open(&dep_dir).unwrap();
    let url = dep.config.target.clone().unwrap();
    let uploaded = async move {
        let store = Store::open(&url).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let w = store.disk_writer(DISK, WriterConfig::default()).await;
            if w.is_ok_and(|w| w.durable_seq() == 12) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the healthy disk was not uploaded within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    server::serve(dep, uploaded)
        .await
        .unwrap_or_else(|e| panic!("the server did not start beside a damaged journal: {e:#}"));
}
