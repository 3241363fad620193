//! Authenticated placement (issue 12 item 5), end to end through the `ripcord` binary.
//!
//! The attacker here is **someone who can write the bucket** (the target store's
//! credentials leaked, or a compromised process server, which writes the store): they
//! cannot forge sealed batches or cut MACs (no passphrase, no data key), but they can
//! rewrite any metadata object and recompute its CRC. Each test tampers one object the
//! way such an attacker would (moving authentic blocks to other sectors, zeroing a range,
//! hiding a later write, moving a recovery point) and checks that `ripcord verify` and
//! `ripcord failover` both refuse and name the tampered object; an untampered store
//! still restores byte-exact.
//!
//! The store is written in-process into a temporary directory (`file://`), with real
//! escrow, data key, sealing and cut MACs, exactly as an agent and process server would.

mod common;

use common::{DISK, EPOCH, Fixture, RunRipcord as _, assert_image, output_text};
use ripcord_store::format::{self, RunTarget};

#[tokio::test(flavor = "multi_thread")]
async fn an_untampered_store_verifies_and_restores_every_point_byte_exact() {
    let f = Fixture::new().await;
    let v = f.verify();
    assert!(v.status.success(), "verify:\n{}", output_text(&v));
    for (i, want) in f.images.iter().enumerate() {
        let (o, img) = f.failover(&format!("{EPOCH}-{}", i + 1));
        assert!(o.status.success(), "failover:\n{}", output_text(&o));
        assert_image(&img, want);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_an_index_entry_to_another_sector_is_refused_naming_the_segment() {
    let f = Fixture::new().await;
    // Batch 6's second extent (authentic bytes) moved from sector 3000 to 3500.
    let seg = f.tamper_index(6, |x| x[1].sector = 3500);
    f.assert_refused("latest", &seg);
}

#[tokio::test(flavor = "multi_thread")]
async fn hiding_a_later_write_by_dropping_its_extent_from_the_index_is_refused() {
    let f = Fixture::new().await;
    // Batch 5 overwrote sectors 40..48 of batch 1; without that extent in the index the
    // image would show batch 1's (authentic, older) bytes there.
    let seg = f.tamper_index(5, |x| {
        x.pop();
    });
    f.assert_refused("latest", &seg);
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_a_checkpoint_run_is_refused_naming_the_checkpoint() {
    let f = Fixture::new().await;
    // Batch 2's run (authentic bytes at 512..544) moved to 600..632.
    let ck = f.tamper_checkpoint(|runs| {
        let r = runs.iter_mut().find(|r| r.0 == 512).expect("batch 2's run");
        r.0 = 600;
    });
    f.assert_refused("latest", &ck);
}

#[tokio::test(flavor = "multi_thread")]
async fn zeroing_a_range_through_the_checkpoint_is_refused_naming_the_checkpoint() {
    let f = Fixture::new().await;
    // Batch 4's data at 1024..1040 replaced by zeros, attributed to batch 3 (which
    // really zeroed something, elsewhere).
    let ck = f.tamper_checkpoint(|runs| {
        let r = runs
            .iter_mut()
            .find(|r| r.0 == 1024)
            .expect("batch 4's run");
        r.2 = RunTarget::Zero { seq: 3 };
    });
    f.assert_refused("1-1", &ck);
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_a_recovery_point_to_another_sequence_is_refused_naming_the_catalog_entry() {
    let f = Fixture::new().await;
    // Cut 2 was committed by a flush of its own: the segment holding cuts 2..=2.
    let name = f.object("catalog", &format!("-{0:020}-{0:020}-00-", 2));
    let parsed = format::parse_catalog(&name).expect("catalog segment name");
    let mut entries =
        format::decode_catalog(&f.read(&name), &DISK, &parsed).expect("catalog segment");
    entries[0].cut.seq = 5;
    f.write(&name, format::encode_catalog(&DISK, EPOCH, 0, &entries));
    f.assert_refused("latest", &name);
}
