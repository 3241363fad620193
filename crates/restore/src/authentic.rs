//! Reading a recovery point so that nothing unauthenticated is placed: unwrap the disk's
//! data keys with the deployment passphrase (the epoch's own, and one per key rotation:
//! an agent that restarted continues its epoch under a fresh key), check the point's MAC
//! (the agent's, over cut id, seq, time, kind and consistency-group stamp), resolve the
//! point to batch locations, and authenticate and decrypt each batch before its runs are
//! checked against its authenticated extent list ([`ripcord_store::Placement::check`]).
//!
//! Trust: the store's metadata (catalog, index, checkpoints) carries only CRCs, so
//! someone who can write the bucket can rewrite it. Nothing is placed on the strength of
//! that metadata alone (decision 0012): a point whose MAC fails is refused naming its
//! catalog object, and a plan that disagrees with a batch's authenticated extents is
//! refused naming the index object that placed the batch.

use anyhow::{Context as _, ensure};
use ripcord_proto::{FLAG_COMPRESSED, aead};
use ripcord_seal::{
    Flags, KeyRing, Sealer,
    escrow::{EscrowFile, unwrap_data_key},
};
use ripcord_store::{DiskId, EpochInfo, Plan, RecoveryPoint, SealedBatch, Store};

/// The disk's data keys for `epoch` (its own and its rotations'), from the passphrase and
/// the store's escrow file.
pub async fn data_keys(
    store: &Store,
    disk: &DiskId,
    epoch: &EpochInfo,
    passphrase: &[u8],
) -> anyhow::Result<KeyRing> {
    let escrow: EscrowFile = serde_json::from_slice(
        &store
            .get_escrow()
            .await
            .context("reading escrow.json from the target store")?,
    )
    .context("parsing the store's escrow.json (damaged?)")?;
    let secret = escrow
        .unlock(passphrase)
        .context("unlocking the deployment's escrow key (the store's escrow.json)")?;
    let ctx = aead::key_context(&epoch.machine_id, disk);
    let own = unwrap_data_key(&epoch.wrapped_key, &secret, &ctx).with_context(|| {
        format!(
            "unwrapping the data key of epoch {} (`{}`)",
            epoch.epoch,
            ripcord_store::format::epoch_name(disk, epoch.epoch)
        )
    })?;
    let mut ring = KeyRing::new(own);
    for r in store
        .key_rotations(disk, epoch.epoch)
        .await
        .with_context(|| format!("reading the key rotations of epoch {}", epoch.epoch))?
    {
        let object = ripcord_store::format::key_rotation_name(disk, r.epoch, r.from_seq);
        let key = unwrap_data_key(&r.wrapped_key, &secret, &ctx)
            .with_context(|| format!("unwrapping the rotated data key `{object}`"))?;
        ring.rotate(r.from_seq, key)
            .with_context(|| format!("key rotation `{object}`"))?;
    }
    Ok(ring)
}

/// Checks the agent's MAC over `point` with one of the epoch's data keys (the agent
/// process that cut it held one of them): a point whose cut id, seq, time, kind or group
/// stamp was changed in the store (a stamp added, removed, or moved to another group or
/// instant; or that no agent of the epoch made) is refused, naming its catalog object.
pub fn check_point(keys: &KeyRing, disk: &DiskId, point: &RecoveryPoint) -> anyhow::Result<()> {
    let message = aead::cut_aad(
        disk,
        point.epoch,
        point.cut_id,
        point.seq,
        point.time_ns,
        point.mono_ns,
        point.kind,
        point.group.as_ref(),
    );
    let authentic = keys
        .newest_first()
        .any(|key| ripcord_seal::check_point_mac(key, &message, &point.mac).is_ok());
    ensure!(authentic, {
        format!(
            "recovery point {} (`{}`) is not authentic: its fields were changed in the store \
             by someone who can write it, or it is damaged; refusing to use it",
            point.id, point.catalog_object
        )
    });
    Ok(())
}

/// Resolves an authenticated point: the epoch's data keys, the point's MAC checked with
/// them, then the plan. Nothing of the plan is trusted yet (see
/// [`ripcord_store::Placement::check`]).
pub async fn resolve_authentic(
    store: &Store,
    disk: &DiskId,
    point: &RecoveryPoint,
    passphrase: &[u8],
) -> anyhow::Result<(KeyRing, Plan)> {
    let epoch = store
        .epoch_info(disk, point.epoch)
        .await
        .with_context(|| format!("reading epoch {} of point {}", point.epoch, point.id))?;
    let keys = data_keys(store, disk, &epoch, passphrase).await?;
    check_point(&keys, disk, point)?;
    let plan = store
        .resolve(disk, point)
        .await
        .with_context(|| format!("resolving point {}", point.id))?;
    Ok((keys, plan))
}

/// Authenticate and decrypt one batch with the key of its sequence; `object` names it in
/// errors.
pub fn open_batch(
    sealer: &mut Sealer,
    keys: &KeyRing,
    machine: &str,
    disk: &DiskId,
    b: &SealedBatch,
    object: &str,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let extents = &b.extents;
    let data: u64 = b
        .extents
        .iter()
        .filter(|e| e.kind == ripcord_store::ExtentKind::Data)
        .map(|e| u64::from(e.sectors) * 512)
        .sum();
    let aad = aead::batch_aad(machine, disk, b.epoch, b.seq, b.seq, extents);
    let nonce = aead::nonce(b.epoch, b.seq)?;
    let flags = if b.flags & FLAG_COMPRESSED != 0 {
        Flags::Zstd
    } else {
        Flags::Stored
    };
    sealer
        .open_into(
            keys.for_seq(b.seq),
            &aad,
            nonce,
            flags,
            &b.sealed,
            data as usize,
            out,
        )
        .with_context(|| {
            format!(
                "batch {} of epoch {} in {object} failed authentication: damaged or tampered",
                b.seq, b.epoch
            )
        })?;
    ensure!(
        out.len() as u64 == data,
        "batch {} in {object}: {} plaintext bytes for {data}",
        b.seq,
        out.len()
    );
    Ok(())
}

/// Authenticates and decrypts batch `b` ([`open_batch`]) and checks that `placement`
/// puts its runs exactly where its authenticated extent list says; returns the plaintext.
/// Nothing of a batch may be placed before this returns `Ok`.
pub fn open_placed(
    keys: &KeyRing,
    machine: &str,
    disk: &DiskId,
    b: &SealedBatch,
    object: &str,
    placement: &ripcord_store::Placement,
) -> anyhow::Result<Vec<u8>> {
    let mut plain = Vec::new();
    open_batch(
        &mut Sealer::new(),
        keys,
        machine,
        disk,
        b,
        object,
        &mut plain,
    )?;
    // The extents just authenticated are the only placement trusted.
    placement.check(b.seq, &b.extents)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_seal::DataKey;
    use ripcord_store::format::{self, CatalogEntry};
    use ripcord_store::{CutInfo, CutKind, GroupId, GroupStamp};

    const DISK: DiskId = DiskId([0x5e; 16]);

    /// A group cut as the agent makes it: stamped, and MACed with the data key.
    fn stamped_cut(key: &DataKey) -> CutInfo {
        let group = Some(GroupStamp {
            group: GroupId([3; 16]),
            instant_ns: 1_800_000_000_000_000_000,
            members: 2,
            offset_ns: -40_000,
            error_ns: 3_000_000,
        });
        let (epoch, cut_id, seq, time_ns, mono_ns, kind) =
            (1, 4, 90, 1_800_000_000_001_000_000, 77, CutKind::Crash);
        let m = aead::cut_aad(
            &DISK,
            epoch,
            cut_id,
            seq,
            time_ns,
            mono_ns,
            kind,
            group.as_ref(),
        );
        CutInfo {
            epoch,
            cut_id,
            seq,
            time_ns,
            mono_ns,
            kind,
            group,
            mac: ripcord_seal::point_mac(key, &m),
        }
    }

    /// The point as the catalog lists it, once someone who can write the bucket has
    /// rewritten its segment through `edit` (CRC recomputed by the encoder).
    fn stored(cut: CutInfo, edit: impl FnOnce(&mut CutInfo)) -> RecoveryPoint {
        let name = format::catalog_name(&DISK, 1, 4, 4, 0);
        let parsed = format::parse_catalog(&name).expect("a catalog name");
        let entry = CatalogEntry {
            cut,
            committed_ns: 5,
        };
        let mut v = format::decode_catalog(
            &format::encode_catalog(&DISK, 1, 0, &[entry]),
            &DISK,
            &parsed,
        )
        .expect("the segment decodes");
        edit(&mut v[0].cut);
        let v = format::decode_catalog(&format::encode_catalog(&DISK, 1, 0, &v), &DISK, &parsed)
            .expect("the rewritten segment decodes");
        let mut p = RecoveryPoint::from_cut(&v[0].cut);
        p.catalog_object = name.as_str().into();
        p
    }

    #[test]
    fn a_group_stamp_changed_in_the_store_makes_the_point_not_authentic() {
        let key = DataKey::generate().expect("a data key");
        let keys = KeyRing::new(DataKey::from_bytes(*key.expose_bytes()));
        let cut = stamped_cut(&key);
        check_point(&keys, &DISK, &stored(cut, |_| {})).expect("the agent's point is authentic");

        type Edit = fn(&mut CutInfo);
        let edits: [(&str, Edit); 4] = [
            ("instant moved", |c| {
                c.group.as_mut().expect("stamped").instant_ns ^= 1;
            }),
            ("group changed", |c| {
                c.group.as_mut().expect("stamped").group.0[0] ^= 1;
            }),
            ("members changed", |c| {
                c.group.as_mut().expect("stamped").members = 1;
            }),
            ("stamp removed", |c| c.group = None),
        ];
        for (what, edit) in edits {
            let p = stored(cut, edit);
            let e = check_point(&keys, &DISK, &p).expect_err(what).to_string();
            assert!(e.contains("not authentic"), "{what}: {e}");
            assert!(e.contains(p.catalog_object.as_ref()), "{what}: {e}");
        }
        // And a stamp added to a cut the agent made without one.
        let plain = CutInfo {
            group: None,
            mac: {
                let m = aead::cut_aad(&DISK, 1, 4, 90, 1, 2, CutKind::App, None);
                ripcord_seal::point_mac(&key, &m)
            },
            time_ns: 1,
            mono_ns: 2,
            kind: CutKind::App,
            ..cut
        };
        check_point(&keys, &DISK, &stored(plain, |_| {})).expect("an unstamped point");
        let e = check_point(&keys, &DISK, &stored(plain, |c| c.group = cut.group));
        assert!(e.is_err(), "a stamp added in the store is refused");
    }
}
