//! Canonical AES-256-GCM inputs for sealing a [`Batch`](crate::wire::Batch)
//! payload: the additional authenticated data (AAD) and the nonce.
//!
//! This crate does not encrypt; it defines the exact bytes the agent passes to
//! AES-256-GCM and the process server / recovery side passes to open it, so
//! that a payload cannot be replayed under another machine, disk, epoch or
//! sequence range.
//!
//! # AAD layout
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 16   | domain tag [`AAD_DOMAIN`] `"ripcord/batch/v1"` |
//! | 16     | 8    | machine_id byte length, u64 LE          |
//! | 24     | n    | machine_id, UTF-8 bytes                 |
//! | 24+n   | 16   | disk_id                                 |
//! | 40+n   | 8    | epoch, u64 LE                           |
//! | 48+n   | 8    | first_seq, u64 LE                       |
//! | 56+n   | 8    | last_seq, u64 LE                        |
//!
//! The length prefix makes the encoding injective (no two different inputs give
//! the same bytes).
//!
//! # Nonce layout (96 bits)
//!
//! | offset | size | field                            |
//! |-------:|-----:|----------------------------------|
//! | 0      | 4    | epoch, u32 LE (epoch must be `<= u32::MAX`) |
//! | 4      | 8    | first_seq, u64 LE                |
//!
//! # Uniqueness rules (the caller's obligations)
//!
//! AES-GCM breaks catastrophically if one key seals two different plaintexts
//! under one nonce. The nonce is a deterministic function of
//! `(epoch, first_seq)`, so:
//!
//! 1. **One key per disk stream.** Use a distinct key per `(machine, disk)`
//!    (e.g. HKDF of a machine master key with the disk id as `info`); the same
//!    `(epoch, first_seq)` occurs on every disk.
//! 2. **Never re-seal a sequence with different contents.** Batches in one
//!    epoch cover disjoint sequence ranges, so `first_seq` is unique per epoch.
//!    Retransmitting the *same sealed bytes* is fine. If the agent loses its
//!    unacknowledged batches (crash) and cannot reproduce them byte-for-byte,
//!    it must start a new epoch (full resync) rather than reuse sequences.
//! 3. **Epochs stay below 2^32** per key ([`nonce`] refuses larger ones);
//!    rotate the key before that.

use crate::wire::DiskId;
use thiserror::Error;

/// Domain separation tag at the start of every AAD.
pub const AAD_DOMAIN: &[u8; 16] = b"ripcord/batch/v1";
/// AES-GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;

/// The nonce cannot be built without risking reuse.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum NonceError {
    /// The epoch does not fit the nonce's 32-bit epoch field.
    #[error(
        "epoch {epoch} exceeds the nonce's 32-bit epoch field (max {max}); rotate the disk key and restart epochs"
    )]
    EpochTooLarge {
        /// The epoch given.
        epoch: u64,
        /// Largest usable epoch.
        max: u64,
    },
}

/// Canonical AAD binding a sealed batch payload to its machine, disk, epoch and
/// sequence range (layout in the module docs).
pub fn aad(
    machine_id: &str,
    disk_id: &DiskId,
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 8 + machine_id.len() + 16 + 24);
    out.extend_from_slice(AAD_DOMAIN);
    out.extend_from_slice(&(machine_id.len() as u64).to_le_bytes());
    out.extend_from_slice(machine_id.as_bytes());
    out.extend_from_slice(&disk_id.0);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(&last_seq.to_le_bytes());
    out
}

/// The context a disk's escrow-wrapped data key is bound to: a wrapped key copied to
/// another machine or disk does not open.
pub fn key_context(machine_id: &str, disk_id: &DiskId) -> Vec<u8> {
    let mut out = b"ripcord/disk-key/v1".to_vec();
    out.extend_from_slice(&(machine_id.len() as u64).to_le_bytes());
    out.extend_from_slice(machine_id.as_bytes());
    out.extend_from_slice(&disk_id.0);
    out
}

/// The AAD of a sealed batch: [`aad`] followed by the batch's extent list (sector u64,
/// sectors u32, kind u8 each, little-endian), so a tampered extent list fails the
/// authentication of the payload it describes.
pub fn batch_aad(
    machine_id: &str,
    disk_id: &DiskId,
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
    extents: &[crate::wire::Extent],
) -> Vec<u8> {
    let mut out = aad(machine_id, disk_id, epoch, first_seq, last_seq);
    out.reserve(extents.len() * crate::wire::EXTENT_LEN + 8);
    out.extend_from_slice(&(extents.len() as u64).to_le_bytes());
    for e in extents {
        out.extend_from_slice(&e.sector.to_le_bytes());
        out.extend_from_slice(&e.sectors.to_le_bytes());
        out.push(e.kind as u8);
    }
    out
}

/// Domain separation tag at the start of every cut message ([`cut_aad`]).
pub const CUT_DOMAIN: &[u8; 16] = b"ripcord/cut/v1\0\0";

/// The canonical bytes a [`Cut`](crate::wire::Cut)'s MAC covers: [`CUT_DOMAIN`], then
/// disk_id (16), epoch, cut id, seq, time_ns, mono_ns (u64 LE each), kind (u8). Every
/// field is fixed-size, so the encoding is injective. The agent MACs these bytes with a
/// key derived from the disk's data key (`ripcord_seal::point_mac`); failover checks them
/// with the key unwrapped from the passphrase, so a recovery point cannot be moved to
/// another sequence, time or kind by anyone without the data key. The machine is bound
/// through the key itself (one data key per machine, disk and epoch, wrapped under
/// [`key_context`]).
///
/// A group cut's stamp ([`GroupStamp::to_bytes`](crate::wire::GroupStamp::to_bytes),
/// fixed-size) follows the kind; a cut without one ends there, so its bytes are those
/// every earlier build MACed, and the two forms differ in length: still injective.
#[allow(clippy::too_many_arguments)]
pub fn cut_aad(
    disk_id: &DiskId,
    epoch: u64,
    cut_id: u64,
    seq: u64,
    time_ns: u64,
    mono_ns: u64,
    kind: crate::wire::CutKind,
    group: Option<&crate::wire::GroupStamp>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 16 + 5 * 8 + 1 + crate::wire::GROUP_STAMP_LEN);
    out.extend_from_slice(CUT_DOMAIN);
    out.extend_from_slice(&disk_id.0);
    for v in [epoch, cut_id, seq, time_ns, mono_ns] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(kind as u8);
    if let Some(g) = group {
        out.extend_from_slice(&g.to_bytes());
    }
    out
}

/// The canonical bytes [`cut_aad`] of a wire [`Cut`](crate::wire::Cut).
pub fn cut_message(c: &crate::wire::Cut) -> Vec<u8> {
    cut_aad(
        &c.disk_id,
        c.epoch,
        c.id,
        c.seq,
        c.time_ns,
        c.mono_ns,
        c.kind,
        c.group.as_ref(),
    )
}

/// Deterministic 96-bit nonce for the batch starting at `first_seq` in
/// `epoch` (layout and uniqueness rules in the module docs).
pub fn nonce(epoch: u64, first_seq: u64) -> Result<[u8; NONCE_LEN], NonceError> {
    let e = u32::try_from(epoch).map_err(|_| NonceError::EpochTooLarge {
        epoch,
        max: u32::MAX.into(),
    })?;
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&e.to_le_bytes());
    n[4..].copy_from_slice(&first_seq.to_le_bytes());
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_layout_is_exact() {
        let d = DiskId([7; 16]);
        let a = aad("m1", &d, 3, 10, 12);
        let mut want = b"ripcord/batch/v1".to_vec();
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(b"m1");
        want.extend_from_slice(&[7; 16]);
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(&10u64.to_le_bytes());
        want.extend_from_slice(&12u64.to_le_bytes());
        assert_eq!(a, want);
    }

    #[test]
    fn aad_is_injective_across_field_boundaries() {
        // Moving a byte between machine_id and the following fields must change the AAD.
        let d = DiskId([0; 16]);
        assert_ne!(aad("a", &d, 1, 1, 1), aad("a\0", &d, 1, 1, 1));
        assert_ne!(aad("m", &d, 1, 1, 2), aad("m", &d, 1, 2, 2));
        assert_ne!(aad("m", &d, 1, 1, 2), aad("m", &DiskId([1; 16]), 1, 1, 2));
    }

    #[test]
    fn cut_aad_layout_is_exact_and_covers_every_field() {
        let d = DiskId([7; 16]);
        let a = cut_aad(&d, 1, 2, 3, 4, 5, crate::wire::CutKind::App, None);
        let mut want = b"ripcord/cut/v1\0\0".to_vec();
        want.extend_from_slice(&[7; 16]);
        for v in [1u64, 2, 3, 4, 5] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.push(1);
        assert_eq!(a, want);
        let crash = crate::wire::CutKind::Crash;
        let base = cut_aad(&d, 1, 2, 3, 4, 5, crash, None);
        for other in [
            cut_aad(&DiskId([8; 16]), 1, 2, 3, 4, 5, crash, None),
            cut_aad(&d, 9, 2, 3, 4, 5, crash, None),
            cut_aad(&d, 1, 9, 3, 4, 5, crash, None),
            cut_aad(&d, 1, 2, 9, 4, 5, crash, None),
            cut_aad(&d, 1, 2, 3, 9, 5, crash, None),
            cut_aad(&d, 1, 2, 3, 4, 9, crash, None),
        ] {
            assert_ne!(base, other);
        }
        // A stamp changes the bytes, and every field of the stamp counts.
        let stamp = crate::wire::GroupStamp {
            group: crate::wire::GroupId([1; 16]),
            instant_ns: 2,
            members: 3,
            offset_ns: -4,
            error_ns: 5,
        };
        let stamped = cut_aad(&d, 1, 2, 3, 4, 5, crash, Some(&stamp));
        assert_eq!(&stamped[..base.len()], &base[..]);
        assert_eq!(&stamped[base.len()..], &stamp.to_bytes()[..]);
        let moved = crate::wire::GroupStamp {
            instant_ns: 3,
            ..stamp
        };
        assert_ne!(stamped, cut_aad(&d, 1, 2, 3, 4, 5, crash, Some(&moved)));
    }

    #[test]
    fn nonce_is_unique_per_epoch_and_seq() {
        let mut seen = std::collections::HashSet::new();
        for epoch in [0u64, 1, 2, u32::MAX as u64] {
            for seq in [0u64, 1, 2, u32::MAX as u64 + 1, u64::MAX] {
                assert!(seen.insert(nonce(epoch, seq).unwrap()), "{epoch} {seq}");
            }
        }
        assert_eq!(nonce(1, 2).unwrap(), [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn nonce_refuses_wide_epoch() {
        assert_eq!(
            nonce(u32::MAX as u64 + 1, 1),
            Err(NonceError::EpochTooLarge {
                epoch: u32::MAX as u64 + 1,
                max: u32::MAX as u64
            })
        );
    }
}
