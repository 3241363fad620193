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
            None,
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

/// A power cut in the middle of a group commit: the later pages of the group persisted,
/// an earlier one did not. The disk opens (never quarantined), keeping every acknowledged
/// batch and dropping only the group's records from the tear on.
#[test]
fn a_torn_group_commit_is_truncated_and_never_quarantines_the_disk() {
    use ripcord_journal::{Journal, RecordType};
    use std::os::unix::fs::FileExt as _;
    let mut f = Fixture::new();
    for i in 0..4u64 {
        f.write(i * 64, 32);
    }
    let unacknowledged = f.unacknowledged_frames(4, 16);
    let stopped = f.stop();
    let cfg = ripcord_process_server::config::PsConfig::load(&stopped.deployment.join("ps.toml"))
        .unwrap();
    let cache = cache_dir(&stopped.deployment);
    let dir = cache.join(DISK.to_string());
    // The group reaches the journal but its fdatasync never completes.
    let mut ends = Vec::new();
    let segment = {
        let mut j =
            Journal::open(&dir, ripcord_process_server::disk::journal_config(&cfg)).unwrap();
        let mut start = j.written().offset;
        for frame in &unacknowledged {
            let a = j.append(RecordType::Batch, frame).unwrap();
            ends.push((start, a.written.offset));
            start = a.written.offset;
        }
        j.segment_paths().last().unwrap().clone()
    };
    // The second record of the group lost a page; the two after it persisted.
    let (start, end) = ends[1];
    let page = start.next_multiple_of(4096);
    assert!(
        page + 4096 <= end,
        "the torn page must lie inside the record"
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.write_all_at(&[0u8; 4096], page).unwrap();
    drop(file);

    let core = ripcord_process_server::disk::DiskCore::open(
        &cache,
        DISK,
        ripcord_process_server::disk::journal_config(&cfg),
    )
    .unwrap_or_else(|e| panic!("the disk was quarantined for a torn group commit: {e:#}"));
    // Batches 1..=4 were acknowledged; 5 is intact (kept); 6..=8 are gone.
    assert_eq!(core.durable_state().durable_seq, 5);
    let report = core.journal().recovery_report();
    assert_eq!(report.dropped_after_tear, 2, "{report:?}");
}
