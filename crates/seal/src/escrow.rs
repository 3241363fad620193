//! Key escrow to the deployment passphrase, without the passphrase on any server.
//!
//! The deployment passphrase is stretched with Argon2id into an X25519 secret; only its
//! public key is stored (process server, target store). An agent generates each disk's
//! data key locally and seals it to that public key (ephemeral X25519, HKDF-SHA256,
//! AES-256-GCM). So the process server and the store hold only wrapped keys, and failover
//! needs nothing but the store and the passphrase.
//!
//! Wrapped key layout (81 bytes):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0 | version (1) |
//! | 1..33 | ephemeral X25519 public key |
//! | 33..65 | data key, encrypted with AES-256-GCM (nonce 0: the key is used once) |
//! | 65..81 | tag |
//!
//! The AEAD key is HKDF-SHA256(ikm = shared secret, salt = ephemeral pub ‖ escrow pub,
//! info = [`ESCROW_INFO`] ‖ context). `context` (e.g. machine and disk id) is also the
//! associated data, so a wrapped key cannot be moved to another disk.

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey},
    hkdf,
};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::keys::{DataKey, KEY_LEN, KdfParams, KeyError, SALT_LEN};

/// HKDF info prefix.
pub const ESCROW_INFO: &[u8] = b"ripcord-seal/escrow/v1";
/// Length of a wrapped key.
pub const WRAPPED_LEN: usize = 1 + 32 + KEY_LEN + 16;
const VERSION: u8 = 1;

/// Salt and Argon2id costs of a deployment's escrow key; stored beside the public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowParams {
    /// Argon2id salt.
    pub salt: [u8; SALT_LEN],
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl EscrowParams {
    /// Fresh random salt with the given costs.
    pub fn generate(kdf: KdfParams) -> Result<EscrowParams, KeyError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(KeyError::Rng)?;
        Ok(EscrowParams {
            salt,
            memory_kib: kdf.memory_kib,
            iterations: kdf.iterations,
            parallelism: kdf.parallelism,
        })
    }

    fn kdf(&self) -> KdfParams {
        KdfParams {
            memory_kib: self.memory_kib,
            iterations: self.iterations,
            parallelism: self.parallelism,
        }
    }
}

/// `escrow.json`: what agents need to wrap data keys, and what the passphrase needs to
/// unwrap them (kept by the process server and copied into the target store, so failover
/// needs only the store and the passphrase). Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowFile {
    /// X25519 public key.
    pub public_key: [u8; 32],
    /// Salt and Argon2id costs.
    pub params: EscrowParams,
}

impl EscrowFile {
    /// Derive the escrow secret from the passphrase and check it matches the public key,
    /// so a wrong passphrase is named as such.
    pub fn unlock(&self, passphrase: &[u8]) -> Result<EscrowSecret, KeyError> {
        let secret = EscrowSecret::derive(passphrase, &self.params)?;
        if secret.public_key() != self.public_key {
            return Err(KeyError::EscrowPassphrase);
        }
        Ok(secret)
    }
}

/// The deployment's escrow secret (derived from the passphrase; never stored).
pub struct EscrowSecret(StaticSecret);

impl EscrowSecret {
    /// Stretch `passphrase` with Argon2id into the escrow secret.
    pub fn derive(passphrase: &[u8], params: &EscrowParams) -> Result<EscrowSecret, KeyError> {
        let bytes = params.kdf().derive_kek(passphrase, &params.salt)?;
        Ok(EscrowSecret(StaticSecret::from(*bytes)))
    }

    /// The public key agents wrap data keys to.
    pub fn public_key(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
}

fn aead_key(shared: &[u8; 32], eph: &[u8; 32], escrow: &[u8; 32], context: &[u8]) -> LessSafeKey {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(escrow);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
    let info = [ESCROW_INFO, context];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .expect("AES-256 key length is valid for HKDF");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Seal `key` to the escrow public key; `context` binds it (e.g. machine and disk id).
pub fn wrap_data_key(
    key: &DataKey,
    escrow_pub: &[u8; 32],
    context: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let mut eph_bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(eph_bytes.as_mut()).map_err(KeyError::Rng)?;
    let eph = StaticSecret::from(*eph_bytes);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*escrow_pub));
    if !shared.was_contributory() {
        return Err(KeyError::EscrowMismatch);
    }
    let aead = aead_key(shared.as_bytes(), &eph_pub, escrow_pub, context);
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(VERSION);
    out.extend_from_slice(&eph_pub);
    let mut body = Zeroizing::new(*key.expose_bytes());
    let tag = aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(context),
            body.as_mut(),
        )
        .map_err(|_| KeyError::EscrowMismatch)?;
    out.extend_from_slice(body.as_ref());
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Open a key sealed with [`wrap_data_key`].
pub fn unwrap_data_key(
    wrapped: &[u8],
    secret: &EscrowSecret,
    context: &[u8],
) -> Result<DataKey, KeyError> {
    if wrapped.len() < WRAPPED_LEN {
        return Err(KeyError::Truncated {
            needed: WRAPPED_LEN,
            got: wrapped.len(),
        });
    }
    if wrapped.len() > WRAPPED_LEN {
        return Err(KeyError::TrailingBytes {
            extra: wrapped.len() - WRAPPED_LEN,
        });
    }
    if wrapped[0] != VERSION {
        return Err(KeyError::UnsupportedVersion(wrapped[0].into()));
    }
    let eph_pub: [u8; 32] = wrapped[1..33].try_into().expect("32 bytes");
    let shared = secret.0.diffie_hellman(&PublicKey::from(eph_pub));
    let aead = aead_key(shared.as_bytes(), &eph_pub, &secret.public_key(), context);
    let mut body = Zeroizing::new([0u8; KEY_LEN + 16]);
    body.copy_from_slice(&wrapped[33..]);
    let plain = aead
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(context),
            body.as_mut(),
        )
        .map_err(|_| KeyError::EscrowMismatch)?;
    let key: [u8; KEY_LEN] = plain.try_into().map_err(|_| KeyError::EscrowMismatch)?;
    Ok(DataKey::from_bytes(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> EscrowParams {
        EscrowParams::generate(KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[test]
    fn unlock_names_a_wrong_passphrase_or_a_damaged_escrow_file() {
        let params = fast();
        let secret = EscrowSecret::derive(b"correct horse", &params).unwrap();
        let file = EscrowFile {
            public_key: secret.public_key(),
            params,
        };
        assert!(file.unlock(b"correct horse").is_ok());
        assert!(matches!(
            file.unlock(b"battery staple"),
            Err(KeyError::EscrowPassphrase)
        ));
        let mut damaged = file.clone();
        damaged.public_key[7] ^= 1;
        let err = damaged.unlock(b"correct horse").err().expect("refused");
        assert!(matches!(err, KeyError::EscrowPassphrase));
        assert!(err.to_string().contains("damaged escrow file"), "{err}");
    }

    #[test]
    fn wraps_to_the_passphrase_and_binds_the_context() {
        let params = fast();
        let secret = EscrowSecret::derive(b"correct horse", &params).unwrap();
        let key = DataKey::generate().unwrap();
        let w = wrap_data_key(&key, &secret.public_key(), b"m1/disk-a").unwrap();
        assert_eq!(w.len(), WRAPPED_LEN);
        let back = unwrap_data_key(&w, &secret, b"m1/disk-a").unwrap();
        assert_eq!(back.expose_bytes(), key.expose_bytes());
        // Same passphrase and salt: same secret (failover re-derives it).
        let again = EscrowSecret::derive(b"correct horse", &params).unwrap();
        assert!(unwrap_data_key(&w, &again, b"m1/disk-a").is_ok());
        // Wrong passphrase, wrong context, flipped bits: refused.
        let wrong = EscrowSecret::derive(b"battery staple", &params).unwrap();
        assert!(matches!(
            unwrap_data_key(&w, &wrong, b"m1/disk-a"),
            Err(KeyError::EscrowMismatch)
        ));
        assert!(matches!(
            unwrap_data_key(&w, &secret, b"m1/disk-b"),
            Err(KeyError::EscrowMismatch)
        ));
        for i in 1..w.len() {
            let mut bad = w.clone();
            bad[i] ^= 0x40;
            assert!(
                unwrap_data_key(&bad, &secret, b"m1/disk-a").is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(matches!(
            unwrap_data_key(&w[..40], &secret, b""),
            Err(KeyError::Truncated { .. })
        ));
    }
}
