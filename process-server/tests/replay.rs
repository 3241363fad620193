//! `ripcord-ps replay` rebuilds the right image once the uploader has trimmed the journal
//! past the epoch's start: the store supplies what was trimmed, the journal the rest.
mod common;

use common::*;
use ripcord_journal::RecordType;
use ripcord_process_server::replay::{Until, replay};
use ripcord_store::Store;

fn replayed(stopped: &Stopped, until: Until) -> Vec<u8> {
    let out = stopped.deployment.join("replayed.img");
    let report = replay(&stopped.deployment, DISK, &out, PASSPHRASE, until)
        .unwrap_or_else(|e| panic!("replay {until:?} failed: {e:#}"));
    assert_eq!((report.epoch, report.size_bytes), (1, SIZE));
    std::fs::read(&out).unwrap()
}

/// Uploads everything the journal holds and trims it.
fn upload_all(rt: &tokio::runtime::Runtime, f: &Fixture) {
    rt.block_on(async {
        let store = Store::open(&f.target_url()).await.unwrap();
        drain(&mut open_uploader(f, store).await).await;
    });
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: the image differs first at byte {at} (sector {})",
            at / 512
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: image size");
}

#[test]
fn a_journal_trimmed_past_its_epoch_start_replays_to_the_right_image() {
    let mut f = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Epoch 1: data, a zeroed range, and cuts; all uploaded and mostly trimmed.
    for i in 0..24u64 {
        f.write((i * 1543 * 8) % (SIZE / 512 - 256), 128);
        if i % 4 == 3 {
            f.cut();
        }
    }
    f.zero(64, 256);
    let early_cut = f.cut();
    let image_at_early_cut = f.image.clone();
    f.write(4096, 64);
    f.cut();
    upload_all(&rt, &f);
    {
        let core = f.core.lock_blocking();
        let journal = core.journal();
        let first = journal
            .read_from(journal.first_seq())
            .unwrap()
            .next()
            .expect("the journal keeps its active segment")
            .unwrap();
        assert_ne!(
            first.kind,
            RecordType::EpochStart,
            "the test needs the epoch start trimmed from the journal"
        );
    }
    // Written after the upload: only the journal has these.
    f.write(100, 96);
    f.zero(2048, 32);
    f.write(8000, 128);
    f.cut();
    let image_at_last_cut = f.image.clone();
    f.write(300, 16); // after the last cut
    let image_at_end = f.image.clone();
    let stopped = f.stop();

    assert_same(
        &replayed(&stopped, Until::End),
        &image_at_end,
        "replay to the end",
    );
    assert_same(
        &replayed(&stopped, Until::Cut(early_cut)),
        &image_at_early_cut,
        "replay to a cut the journal no longer holds",
    );
    assert_same(
        &replayed(&stopped, Until::LastCut),
        &image_at_last_cut,
        "replay to the last cut (in the journal only)",
    );
}

#[test]
fn a_journal_never_trimmed_replays_without_the_store() {
    let mut f = Fixture::new();
    for i in 0..6u64 {
        f.write(i * 700, 64);
    }
    f.zero(0, 8);
    let cut = f.cut();
    let image_at_cut = f.image.clone();
    f.write(9000, 32);
    let image_at_end = f.image.clone();
    let stopped = f.stop();
    // Nothing was uploaded: no target store exists, and none is needed.
    assert!(!stopped.deployment.join("target").exists());
    assert_same(
        &replayed(&stopped, Until::End),
        &image_at_end,
        "replay to the end",
    );
    assert_same(
        &replayed(&stopped, Until::Cut(cut)),
        &image_at_cut,
        "replay to the cut",
    );
}

/// An agent that restarts continues its epoch under a fresh data key: the server journals
/// a key rotation (once: a reconnection with the same key is no rotation, also after the
/// server restarted with the rotation trimmed), the uploader stores it, and replay opens
/// each batch with its generation's key, from the journal and from the store.
#[test]
fn an_epoch_continued_under_rotated_keys_replays_from_the_journal_and_the_store() {
    let mut f = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for i in 0..10u64 {
        f.write((i * 1543 * 8) % (SIZE / 512 - 256), 128);
    }
    let first_cut = f.cut();
    let image_at_first_cut = f.image.clone();
    assert_eq!(f.restart_agent(), 11);
    assert_eq!(f.rotations_in_journal(), 1);
    assert_eq!(
        f.announce(false),
        Ok(11),
        "a reconnection with the same key"
    );
    assert_eq!(f.rotations_in_journal(), 1, "a reconnection is no rotation");
    // Enough to fill journal segments past the rotation, so the upload trims it.
    for i in 0..24u64 {
        f.write((i * 2003 * 8) % (SIZE / 512 - 256), 128);
    }
    f.zero(64, 64);
    f.cut();
    upload_all(&rt, &f);
    assert_eq!(f.rotations_in_journal(), 0, "the rotation was trimmed");
    let rotations = rt.block_on(async {
        let store = Store::open(&f.target_url()).await.unwrap();
        store.key_rotations(&DISK, 1).await.unwrap()
    });
    assert_eq!(
        rotations.iter().map(|r| r.from_seq).collect::<Vec<_>>(),
        [11]
    );
    // The server restarts with the rotation trimmed: the key it knew survives, and the
    // agent reconnecting with it is no rotation.
    f.restart_server();
    let next = f.announce(true).unwrap();
    assert_eq!(f.rotations_in_journal(), 0, "a spurious rotation at {next}");
    // A second restart of the agent.
    let second = f.restart_agent();
    assert_eq!(f.rotations_in_journal(), 1);
    f.write(512, 64);
    f.cut();
    let image_at_last_cut = f.image.clone();
    f.write(9000, 32);
    let image_at_end = f.image.clone();
    let stopped = f.stop();
    assert_same(&replayed(&stopped, Until::End), &image_at_end, "to the end");
    assert_same(
        &replayed(&stopped, Until::LastCut),
        &image_at_last_cut,
        &format!("to the last cut (the third key, from batch {second})"),
    );
    assert_same(
        &replayed(&stopped, Until::Cut(first_cut)),
        &image_at_first_cut,
        "to the first cut (from the store, the first key)",
    );
}
