//! Data keys and passphrase key escrow.
//!
//! A [`DataKey`] is the 256-bit AES-GCM key that seals payloads. It is
//! escrowed as a [`WrappedKey`]: the data key encrypted with AES-256-GCM
//! under a key-encryption key (KEK) derived from the deployment passphrase
//! with Argon2id. The envelope is self-describing (salt and KDF parameters
//! are stored in it), so failover needs only the envelope and the passphrase.
//!
//! # Envelope encoding (version 1, little-endian)
//!
//! | offset   | size | field                                              |
//! |----------|------|----------------------------------------------------|
//! | 0        | 4    | magic `b"RCWK"`                                    |
//! | 4        | 2    | format version, `u16` = 1                          |
//! | 6        | 1    | KDF id: 1 = Argon2id (v0x13)                       |
//! | 7        | 1    | AEAD id: 1 = AES-256-GCM                           |
//! | 8        | 4    | Argon2 memory, KiB, `u32`                          |
//! | 12       | 4    | Argon2 iterations, `u32`                           |
//! | 16       | 4    | Argon2 parallelism (lanes), `u32`                  |
//! | 20       | 16   | salt (random)                                      |
//! | 36       | 12   | AES-GCM nonce (random)                             |
//! | 48       | 1    | key id length `L` (at most [`MAX_KEY_ID_LEN`])     |
//! | 49       | L    | key id, UTF-8                                      |
//! | 49+L     | 48   | wrapped key: 32 bytes ciphertext + 16 bytes tag    |
//! | 97+L     | 4    | CRC-32 (IEEE) of bytes `0..97+L`, `u32`            |
//!
//! The AES-GCM associated data is [`WRAP_PURPOSE`] followed by bytes
//! `0..49+L` of the envelope, so the KDF parameters, salt, nonce and key id
//! are all authenticated: changing any of them makes unwrapping fail.
//!
//! The CRC only tells accidental damage (a bit-rotted file) apart from a
//! wrong passphrase. Someone who edits the envelope on purpose can fix the
//! CRC; that is reported as [`KeyError::WrongPassphrase`], because the two
//! are cryptographically indistinguishable.

use std::fmt;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use argon2::{Algorithm, Argon2, Params, Version};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crc32::crc32;

/// Length of a data key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of the Argon2id salt stored in an envelope.
pub const SALT_LEN: usize = 16;
/// Longest key id accepted in an envelope, in bytes.
pub const MAX_KEY_ID_LEN: usize = 128;
/// Purpose string prefixed to the envelope's AES-GCM associated data.
pub const WRAP_PURPOSE: &[u8] = b"ripcord-seal/data-key-wrap/v1\0";

/// Upper bound on [`KdfParams::memory_kib`] (2 GiB). Also enforced when
/// decoding, so a forged envelope cannot make `unwrap_key` allocate more.
pub const MAX_MEMORY_KIB: u32 = 2 * 1024 * 1024;
/// Upper bound on [`KdfParams::iterations`].
pub const MAX_ITERATIONS: u32 = 64;
/// Upper bound on [`KdfParams::parallelism`].
pub const MAX_PARALLELISM: u32 = 64;

const MAGIC: [u8; 4] = *b"RCWK";
const FORMAT_VERSION: u16 = 1;
const KDF_ARGON2ID: u8 = 1;
const AEAD_AES256GCM: u8 = 1;
const NONCE_LEN: usize = 12;
const WRAPPED_LEN: usize = KEY_LEN + 16;
const CRC_LEN: usize = 4;
/// Bytes before the key id.
const FIXED_HEADER_LEN: usize = 49;
/// Shortest possible envelope (empty key id).
const MIN_ENVELOPE_LEN: usize = FIXED_HEADER_LEN + WRAPPED_LEN + CRC_LEN;

/// Errors from key generation, wrapping, unwrapping and envelope decoding.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The envelope is intact but the passphrase does not open it (or the
    /// envelope was deliberately altered and its checksum recomputed).
    #[error(
        "wrong passphrase for this key envelope (key id {key_id:?}); check the deployment passphrase"
    )]
    WrongPassphrase {
        /// Key id recorded in the envelope, to help pick the right passphrase.
        key_id: String,
    },
    /// An escrow-wrapped key does not open with this escrow secret: wrong deployment
    /// passphrase, a key wrapped for another disk, or a damaged copy.
    #[error(
        "the wrapped data key does not open with this deployment's escrow key: wrong \
         passphrase, a key of another disk or deployment, or a damaged copy"
    )]
    EscrowMismatch,
    /// The passphrase does not derive the escrow public key an escrow file records: a
    /// wrong passphrase, or a damaged escrow file (its salt, parameters or key changed).
    #[error(
        "this passphrase does not give the escrow key the escrow file records: wrong \
         passphrase, or a damaged escrow file"
    )]
    EscrowPassphrase,
    /// A key rotation does not come after the rotations before it (a damaged or
    /// reordered list of an epoch's keys).
    #[error("a key rotation at sequence {from_seq} does not follow the one at {last}")]
    RotationOrder {
        /// The rotation's first sequence.
        from_seq: u64,
        /// The first sequence of the newest key before it.
        last: u64,
    },
    /// The envelope's checksum does not match: the file is damaged.
    #[error("key envelope is damaged (checksum mismatch); restore it from another escrow copy")]
    Damaged,
    /// The input ends before the envelope does.
    #[error("key envelope truncated: need {needed} bytes, got {got}; the copy is incomplete")]
    Truncated {
        /// Bytes the envelope needs.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// There are bytes after the end of the envelope.
    #[error("{extra} unexpected bytes after the key envelope; pass exactly one envelope")]
    TrailingBytes {
        /// Number of extra bytes.
        extra: usize,
    },
    /// The input does not start with the envelope magic.
    #[error("not a ripcord key envelope (bad magic); check the file path")]
    BadMagic,
    /// The envelope was written by a newer, incompatible format version.
    #[error("unsupported key envelope version {0}; upgrade ripcord-seal")]
    UnsupportedVersion(u16),
    /// The envelope names a KDF or AEAD this version does not implement.
    #[error(
        "unsupported algorithms in key envelope (kdf id {kdf}, aead id {aead}); upgrade ripcord-seal"
    )]
    UnsupportedAlgorithm {
        /// KDF id byte.
        kdf: u8,
        /// AEAD id byte.
        aead: u8,
    },
    /// The key id is longer than [`MAX_KEY_ID_LEN`].
    #[error("key id is {len} bytes, the maximum is {max}; use a shorter key id")]
    KeyIdTooLong {
        /// Actual length.
        len: usize,
        /// Maximum length.
        max: usize,
    },
    /// The key id in the envelope is not valid UTF-8.
    #[error("key id in envelope is not valid UTF-8; the envelope is malformed")]
    KeyIdNotUtf8,
    /// KDF parameters outside the supported range (see [`KdfParams::validate`]).
    #[error(
        "Argon2id parameters out of range (memory {memory_kib} KiB, {iterations} iterations, \
         parallelism {parallelism}); use 8*parallelism <= memory <= {MAX_MEMORY_KIB} KiB, \
         1..={MAX_ITERATIONS} iterations, 1..={MAX_PARALLELISM} lanes"
    )]
    InvalidKdfParams {
        /// Memory in KiB.
        memory_kib: u32,
        /// Iterations.
        iterations: u32,
        /// Parallelism.
        parallelism: u32,
    },
    /// Argon2id could not allocate its working memory.
    #[error(
        "not enough memory for Argon2id ({memory_kib} KiB); run on a host with more free memory"
    )]
    KdfOutOfMemory {
        /// Memory the KDF needed, in KiB.
        memory_kib: u32,
    },
    /// Any other Argon2 failure (should not happen with validated parameters).
    #[error("Argon2id key derivation failed: {0}")]
    Kdf(argon2::Error),
    /// The operating system's random number generator failed.
    #[error("OS random number generator failed: {0}; check the system entropy source and retry")]
    Rng(getrandom::Error),
}

/// A 256-bit payload data key.
///
/// Zeroized on drop; `Debug` prints no key material.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    /// Generates a fresh random key from the OS RNG.
    pub fn generate() -> Result<Self, KeyError> {
        let mut key = DataKey([0; KEY_LEN]);
        getrandom::fill(&mut key.0).map_err(KeyError::Rng)?;
        Ok(key)
    }

    /// Wraps existing key material (e.g. from a hardware key store).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        DataKey(bytes)
    }

    /// Returns the raw key material. Avoid copying it anywhere that is not
    /// zeroized.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// Argon2id cost parameters, stored in every [`WrappedKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KdfParams {
    /// Memory cost in KiB (at least `8 * parallelism`, at most [`MAX_MEMORY_KIB`]).
    pub memory_kib: u32,
    /// Number of passes (1..=[`MAX_ITERATIONS`]).
    pub iterations: u32,
    /// Lanes (1..=[`MAX_PARALLELISM`]). This crate computes lanes on one
    /// thread, so this changes the memory access pattern, not wall time.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 4 lanes (RFC 9106's second recommended option).
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 4,
        }
    }
}

impl KdfParams {
    /// Checks the parameters against this crate's supported range.
    pub fn validate(&self) -> Result<(), KeyError> {
        let ok = (1..=MAX_PARALLELISM).contains(&self.parallelism)
            && (1..=MAX_ITERATIONS).contains(&self.iterations)
            && self.memory_kib >= 8 * self.parallelism
            && self.memory_kib <= MAX_MEMORY_KIB;
        if ok {
            Ok(())
        } else {
            Err(KeyError::InvalidKdfParams {
                memory_kib: self.memory_kib,
                iterations: self.iterations,
                parallelism: self.parallelism,
            })
        }
    }

    pub(crate) fn derive_kek(
        &self,
        passphrase: &[u8],
        salt: &[u8; SALT_LEN],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
        self.validate()?;
        let invalid = || KeyError::InvalidKdfParams {
            memory_kib: self.memory_kib,
            iterations: self.iterations,
            parallelism: self.parallelism,
        };
        let params = Params::new(
            self.memory_kib,
            self.iterations,
            self.parallelism,
            Some(KEY_LEN),
        )
        .map_err(|_| invalid())?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut kek = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(passphrase, salt, kek.as_mut())
            .map_err(|e| match e {
                argon2::Error::OutOfMemory => KeyError::KdfOutOfMemory {
                    memory_kib: self.memory_kib,
                },
                other => KeyError::Kdf(other),
            })?;
        Ok(kek)
    }
}

/// A data key encrypted under a passphrase (see the module docs for the
/// binary encoding). Contains no secret material in the clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
    key_id: String,
    wrapped: [u8; WRAPPED_LEN],
}

impl WrappedKey {
    /// Key id recorded (and authenticated) in the envelope.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Argon2id parameters recorded in the envelope.
    pub fn kdf_params(&self) -> KdfParams {
        self.params
    }

    /// Header bytes `0..49+L`: everything the AEAD authenticates.
    fn header(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(FIXED_HEADER_LEN + self.key_id.len() + WRAPPED_LEN + CRC_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.push(KDF_ARGON2ID);
        out.push(AEAD_AES256GCM);
        out.extend_from_slice(&self.params.memory_kib.to_le_bytes());
        out.extend_from_slice(&self.params.iterations.to_le_bytes());
        out.extend_from_slice(&self.params.parallelism.to_le_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.nonce);
        // Length is checked at construction (<= MAX_KEY_ID_LEN < 256).
        out.push(self.key_id.len() as u8);
        out.extend_from_slice(self.key_id.as_bytes());
        out
    }

    fn aad(header: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(WRAP_PURPOSE.len() + header.len());
        aad.extend_from_slice(WRAP_PURPOSE);
        aad.extend_from_slice(header);
        aad
    }

    /// Encodes the envelope (version 1).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        out.extend_from_slice(&self.wrapped);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes an envelope, checking every length, the checksum and the
    /// parameter ranges. Never panics on any input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < 6 {
            return Err(KeyError::Truncated {
                needed: MIN_ENVELOPE_LEN,
                got: bytes.len(),
            });
        }
        if bytes[0..4] != MAGIC {
            return Err(KeyError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != FORMAT_VERSION {
            return Err(KeyError::UnsupportedVersion(version));
        }
        if bytes.len() < MIN_ENVELOPE_LEN {
            return Err(KeyError::Truncated {
                needed: MIN_ENVELOPE_LEN,
                got: bytes.len(),
            });
        }
        let id_len = usize::from(bytes[48]);
        if id_len > MAX_KEY_ID_LEN {
            return Err(KeyError::KeyIdTooLong {
                len: id_len,
                max: MAX_KEY_ID_LEN,
            });
        }
        let total = MIN_ENVELOPE_LEN + id_len;
        if bytes.len() < total {
            return Err(KeyError::Truncated {
                needed: total,
                got: bytes.len(),
            });
        }
        if bytes.len() > total {
            return Err(KeyError::TrailingBytes {
                extra: bytes.len() - total,
            });
        }
        let (body, crc) = bytes.split_at(total - CRC_LEN);
        if crc32(body).to_le_bytes() != crc {
            return Err(KeyError::Damaged);
        }
        let (kdf, aead) = (bytes[6], bytes[7]);
        if kdf != KDF_ARGON2ID || aead != AEAD_AES256GCM {
            return Err(KeyError::UnsupportedAlgorithm { kdf, aead });
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let params = KdfParams {
            memory_kib: u32_at(8),
            iterations: u32_at(12),
            parallelism: u32_at(16),
        };
        params.validate()?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[20..36]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[36..48]);
        let id_end = FIXED_HEADER_LEN + id_len;
        let key_id = std::str::from_utf8(&bytes[FIXED_HEADER_LEN..id_end])
            .map_err(|_| KeyError::KeyIdNotUtf8)?
            .to_owned();
        let mut wrapped = [0u8; WRAPPED_LEN];
        wrapped.copy_from_slice(&bytes[id_end..id_end + WRAPPED_LEN]);
        Ok(WrappedKey {
            params,
            salt,
            nonce,
            key_id,
            wrapped,
        })
    }
}

/// Encrypts `key` under a KEK derived from `passphrase` with Argon2id.
///
/// `key_id` (at most [`MAX_KEY_ID_LEN`] bytes, e.g. `"deploy-7/epoch-3"`)
/// is stored in the clear and authenticated. Salt and nonce are fresh random
/// values. Takes as long as one Argon2id run with `params`.
pub fn wrap_key(
    key: &DataKey,
    key_id: &str,
    passphrase: &[u8],
    params: &KdfParams,
) -> Result<WrappedKey, KeyError> {
    if key_id.len() > MAX_KEY_ID_LEN {
        return Err(KeyError::KeyIdTooLong {
            len: key_id.len(),
            max: MAX_KEY_ID_LEN,
        });
    }
    params.validate()?;
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut salt).map_err(KeyError::Rng)?;
    getrandom::fill(&mut nonce).map_err(KeyError::Rng)?;
    let kek = params.derive_kek(passphrase, &salt)?;
    let mut envelope = WrappedKey {
        params: *params,
        salt,
        nonce,
        key_id: key_id.to_owned(),
        wrapped: [0; WRAPPED_LEN],
    };
    let aad = WrappedKey::aad(&envelope.header());
    let cipher = Aes256Gcm::new((&*kek).into());
    let mut buf = Zeroizing::new(*key.expose_bytes());
    let tag: Tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), &aad, buf.as_mut_slice().into())
        .expect("AES-GCM encryption of 32 bytes cannot exceed its length limits");
    envelope.wrapped[..KEY_LEN].copy_from_slice(buf.as_ref());
    envelope.wrapped[KEY_LEN..].copy_from_slice(&tag);
    Ok(envelope)
}

/// Recovers the data key from `wrapped` with `passphrase`.
///
/// Returns [`KeyError::WrongPassphrase`] if authentication fails. Takes as
/// long as one Argon2id run with the envelope's parameters (bounded by
/// [`MAX_MEMORY_KIB`] and [`MAX_ITERATIONS`]).
pub fn unwrap_key(wrapped: &WrappedKey, passphrase: &[u8]) -> Result<DataKey, KeyError> {
    let kek = wrapped.params.derive_kek(passphrase, &wrapped.salt)?;
    let aad = WrappedKey::aad(&wrapped.header());
    let cipher = Aes256Gcm::new((&*kek).into());
    let mut key = DataKey([0; KEY_LEN]);
    key.0.copy_from_slice(&wrapped.wrapped[..KEY_LEN]);
    let tag = Tag::try_from(&wrapped.wrapped[KEY_LEN..]).expect("tag slice is 16 bytes");
    cipher
        .decrypt_inout_detached(
            &Nonce::from(wrapped.nonce),
            &aad,
            key.0.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| KeyError::WrongPassphrase {
            key_id: wrapped.key_id.clone(),
        })?;
    Ok(key)
}

/// The data keys of one epoch, each for the batches from its first sequence on: the
/// epoch's own key from sequence 1, then one per key rotation (an agent that restarted
/// and continued the epoch under a fresh key).
///
/// Invariant: non-empty, first sequences strictly increasing from 1.
#[derive(Clone)]
pub struct KeyRing {
    generations: Vec<(u64, DataKey)>,
}

impl KeyRing {
    /// A ring of the epoch's own key (every batch from sequence 1).
    pub fn new(epoch_key: DataKey) -> KeyRing {
        KeyRing {
            generations: vec![(1, epoch_key)],
        }
    }

    /// Adds the key of a rotation at `from_seq`; refused unless it comes after every
    /// rotation added before.
    pub fn rotate(&mut self, from_seq: u64, key: DataKey) -> Result<(), KeyError> {
        let last = self.generations.last().map_or(0, |g| g.0);
        if from_seq <= last {
            return Err(KeyError::RotationOrder { from_seq, last });
        }
        self.generations.push((from_seq, key));
        Ok(())
    }

    /// The key batch `seq` is sealed with.
    pub fn for_seq(&self, seq: u64) -> &DataKey {
        let at = self.generations.partition_point(|g| g.0 <= seq);
        &self.generations[at.saturating_sub(1)].1
    }

    /// Every key, newest first (a recovery point's MAC is made with the key of the agent
    /// process that cut it, which its position alone does not tell).
    pub fn newest_first(&self) -> impl Iterator<Item = &DataKey> {
        self.generations.iter().rev().map(|g| &g.1)
    }

    /// How many keys (1 + rotations).
    pub fn len(&self) -> usize {
        self.generations.len()
    }

    /// Never empty (see the invariant); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from: Vec<u64> = self.generations.iter().map(|g| g.0).collect();
        f.debug_struct("KeyRing").field("from_seqs", &from).finish()
    }
}

#[cfg(test)]
mod ring_tests {
    use super::*;

    #[test]
    fn each_sequence_gets_the_key_of_its_generation() {
        let k = |b: u8| DataKey::from_bytes([b; KEY_LEN]);
        let mut ring = KeyRing::new(k(1));
        ring.rotate(10, k(2)).unwrap();
        ring.rotate(25, k(3)).unwrap();
        for (seq, want) in [(1, 1), (9, 1), (10, 2), (24, 2), (25, 3), (u64::MAX, 3)] {
            assert_eq!(ring.for_seq(seq).expose_bytes()[0], want, "seq {seq}");
        }
        assert!(ring.rotate(25, k(4)).is_err());
        assert!(ring.rotate(1, k(4)).is_err());
        let order: Vec<u8> = ring.newest_first().map(|k| k.expose_bytes()[0]).collect();
        assert_eq!(order, [3, 2, 1]);
    }
}
