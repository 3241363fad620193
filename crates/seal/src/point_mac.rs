//! Recovery-point authentication: the agent MACs each consistency cut with a key derived
//! from the disk's data key, so whoever can unwrap the data key (the deployment
//! passphrase) can check a recovery point, and nobody without it (the process server, the
//! bucket) can forge or alter one.
//!
//! # Construction
//!
//! `mac_key = HKDF-SHA256(ikm = data key, salt = `[`POINT_MAC_SALT`]`, info = "")` as an
//! HMAC-SHA256 key; `mac = HMAC-SHA256(mac_key, message)`, all 32 bytes. `message` is the
//! canonical encoding of the cut's fields (`ripcord_proto::aead::cut_aad`: domain tag,
//! disk, epoch, cut id, seq, wall time, monotonic time, kind), so every field a recovery
//! point is selected or resolved by is covered.
//!
//! Invariants:
//! * the MAC key is separated from the AES-GCM use of the same data key by HKDF with its
//!   own salt, and HMAC needs no nonce, so MACing cuts can never collide with the batch
//!   nonces ([`crate::seal`]);
//! * [`check_point_mac`] compares in constant time.

use ring::{hkdf, hmac};
use thiserror::Error;

use crate::keys::DataKey;

/// HKDF salt that separates the point-MAC key from every other use of a data key.
pub const POINT_MAC_SALT: &[u8] = b"ripcord-seal/point-mac/v1";
/// Length of a point MAC in bytes.
pub const POINT_MAC_LEN: usize = 32;

/// A recovery point's MAC does not match its fields under the disk's data key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error(
    "recovery-point MAC mismatch: the point's fields were altered, or it was not made by \
     the agent holding this disk's data key"
)]
pub struct PointMacMismatch;

fn mac_key(key: &DataKey) -> hmac::Key {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, POINT_MAC_SALT).extract(key.expose_bytes());
    prk.expand(&[], hmac::HMAC_SHA256)
        .expect("HMAC-SHA256 key length is valid for HKDF")
        .into()
}

/// The MAC of `message` (a cut's canonical encoding) under `key`'s point-MAC key.
pub fn point_mac(key: &DataKey, message: &[u8]) -> [u8; POINT_MAC_LEN] {
    let tag = hmac::sign(&mac_key(key), message);
    let mut out = [0u8; POINT_MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks `mac` against `message` under `key` (constant time).
pub fn check_point_mac(
    key: &DataKey,
    message: &[u8],
    mac: &[u8; POINT_MAC_LEN],
) -> Result<(), PointMacMismatch> {
    hmac::verify(&mac_key(key), message, mac).map_err(|_| PointMacMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_checks_only_with_its_key_and_message() {
        let k = DataKey::from_bytes([7; 32]);
        let mac = point_mac(&k, b"cut 1");
        assert_eq!(check_point_mac(&k, b"cut 1", &mac), Ok(()));
        assert_eq!(check_point_mac(&k, b"cut 2", &mac), Err(PointMacMismatch));
        let other = DataKey::from_bytes([8; 32]);
        assert_eq!(
            check_point_mac(&other, b"cut 1", &mac),
            Err(PointMacMismatch)
        );
        let mut bad = mac;
        bad[31] ^= 1;
        assert_eq!(check_point_mac(&k, b"cut 1", &bad), Err(PointMacMismatch));
    }

    #[test]
    fn the_mac_key_is_not_the_data_key() {
        // HMAC keyed directly with the data key would give this; the derived key must not.
        let k = DataKey::from_bytes([7; 32]);
        let direct = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]), b"m");
        assert_ne!(point_mac(&k, b"m").as_slice(), direct.as_ref());
    }
}
