//! Payload sealing and key management for ripcord.
//!
//! The agent seals each batch of changed disk blocks with [`seal()`] (zstd,
//! then AES-256-GCM with a caller-supplied unique nonce and an AAD binding
//! machine, disk, epoch and sequence range). Process server and target store
//! only ever hold sealed bytes. At failover the operator's tool recovers the
//! [`DataKey`] from its escrow envelope ([`WrappedKey`], Argon2id over the
//! deployment passphrase) with [`unwrap_key`] and opens batches with
//! [`open()`], which authenticates first and decompresses under a hard bound.
//! Recovery points are authenticated with [`point_mac`] under a key derived from the same
//! data key, and checked with [`check_point_mac`].
//!
//! ```
//! use ripcord_seal::{DataKey, KdfParams, Flags, open, seal, unwrap_key, wrap_key, WrappedKey};
//!
//! let key = DataKey::generate()?;
//! let aad = b"machine=m1 disk=sda epoch=3 seq=100..164";
//! let nonce = [0u8; 12]; // derived from (epoch, sequence) in ripcord
//! let batch = vec![0u8; 64 * 1024];
//! let sealed = seal(&key, aad, nonce, &batch, 1)?;
//! assert_eq!(sealed.flags, Flags::Zstd);
//! assert_eq!(open(&key, aad, nonce, sealed.flags, &sealed.bytes, batch.len())?, batch);
//!
//! // Escrow (small parameters for the example; use KdfParams::default()).
//! let params = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
//! let envelope = wrap_key(&key, "deploy-1/epoch-3", b"correct horse", &params)?.to_bytes();
//! let recovered = unwrap_key(&WrappedKey::from_bytes(&envelope)?, b"correct horse")?;
//! assert_eq!(recovered.expose_bytes(), key.expose_bytes());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod crc32;
pub mod escrow;
pub mod keys;
pub mod passphrase;
pub mod point_mac;
pub mod seal;

pub use keys::{DataKey, KdfParams, KeyError, KeyRing, WrappedKey, unwrap_key, wrap_key};
pub use passphrase::{PassphraseError, read_passphrase};
pub use point_mac::{POINT_MAC_LEN, PointMacMismatch, check_point_mac, point_mac};
pub use seal::{Flags, SealError, Sealed, Sealer, open, seal, seal_encoded};
