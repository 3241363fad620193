//! The digest key and the two keyed hashes (block and region).
//!
//! Invariants:
//! - The key is two 192-byte XXH3 secrets (block, region) expanded by HKDF-SHA256 from
//!   the caller's secret, with a fixed salt and `info = LABEL || context`; the same
//!   (secret, context) always gives the same key, on every machine and version of this
//!   format. Changing the derivation is a format change (see [`crate::codec`]'s version).
//! - The secrets are wiped when the key drops, and never printed (`Debug` is redacted).
//! - [`Digest::ZERO`] is the digest of a zero block or region and of nothing else.

use ring::hkdf;
use xxhash_rust::xxh3::xxh3_128_with_secret;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::BLOCK_SIZE;

/// Size of each XXH3 secret (XXH3's own default size; the minimum is 136).
const SECRET_LEN: usize = 192;
/// HKDF salt: fixed, so the key depends only on the secret and the context.
const SALT: &[u8] = b"ripcord digest key salt v1";
/// HKDF info prefixes, one per secret; the caller's context follows.
const BLOCK_INFO: &[u8] = b"ripcord block digest v1\0";
const REGION_INFO: &[u8] = b"ripcord region digest v1\0";

/// A 128-bit digest, stored as the little-endian bytes of the XXH3-128 value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 16]);

impl Digest {
    /// The digest of a zero block or of a region of zero blocks.
    pub const ZERO: Digest = Digest([0; 16]);
    /// What a keyed hash that happens to be all zero is replaced with (so it cannot be
    /// mistaken for zeros). Its own probability of occurring is 2^-128.
    pub const REMAPPED_ZERO: Digest = Digest([0xff; 16]);

    /// Whether this is the digest of zeros.
    pub fn is_zero(&self) -> bool {
        *self == Digest::ZERO
    }

    fn from_hash(h: u128) -> Digest {
        if h == 0 {
            Digest::REMAPPED_ZERO
        } else {
            Digest(h.to_le_bytes())
        }
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Whether every byte of `data` is zero. Checks 64-byte chunks with an OR-fold the
/// compiler vectorises, stopping at the first non-zero chunk (random data stops at once).
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    let chunks_zero = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    chunks_zero && chunks.remainder().iter().all(|&b| b == 0)
}

/// The key of a digest map: two XXH3 secrets derived from a deployment secret.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DigestKey {
    block: Box<[u8; SECRET_LEN]>,
    region: Box<[u8; SECRET_LEN]>,
}

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(..)")
    }
}

/// The output length requested from HKDF.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, info: &[u8], context: &[u8]) -> Box<[u8; SECRET_LEN]> {
    let mut out = Box::new([0u8; SECRET_LEN]);
    let info = [info, context];
    prk.expand(&info, Len(SECRET_LEN))
        .and_then(|okm| okm.fill(&mut out[..]))
        // 192 bytes is far below HKDF-SHA256's limit of 255 * 32 bytes.
        .expect("HKDF-SHA256 expands 192 bytes");
    out
}

impl DigestKey {
    /// The key for `context` (e.g. a disk id) under `secret` (e.g. that disk's data key).
    /// Both sides of a delta sync must derive it from the same pair. `secret` should hold
    /// at least 128 bits of entropy; HKDF does not make a weak secret strong.
    pub fn derive(secret: &[u8], context: &[u8]) -> DigestKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
        DigestKey {
            block: expand(&prk, BLOCK_INFO, context),
            region: expand(&prk, REGION_INFO, context),
        }
    }

    /// The digest of one block. `data` is at most [`BLOCK_SIZE`] bytes; a shorter block
    /// (a device's last) is hashed as if padded with zeros to [`BLOCK_SIZE`].
    ///
    /// # Panics
    /// If `data` is longer than [`BLOCK_SIZE`].
    pub fn block(&self, data: &[u8]) -> Digest {
        assert!(
            data.len() <= BLOCK_SIZE,
            "a block is at most {BLOCK_SIZE} bytes"
        );
        if is_zero(data) {
            return Digest::ZERO;
        }
        if data.len() == BLOCK_SIZE {
            return Digest::from_hash(xxh3_128_with_secret(data, &self.block[..]));
        }
        let mut padded = [0u8; BLOCK_SIZE];
        padded[..data.len()].copy_from_slice(data);
        Digest::from_hash(xxh3_128_with_secret(&padded, &self.block[..]))
    }

    /// The digest of a region from its block digests, in order.
    pub fn region(&self, blocks: &[Digest]) -> Digest {
        if blocks.iter().all(Digest::is_zero) {
            return Digest::ZERO;
        }
        // A region of up to 64 Ki digests; hashed from one contiguous buffer (XXH3's
        // one-shot path is faster than its streaming one). `Digest` is `[u8; 16]`
        // without padding, so this is a plain copy.
        let bytes: Vec<u8> = blocks.iter().flat_map(|d| d.0).collect();
        Digest::from_hash(xxh3_128_with_secret(&bytes, &self.region[..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_get_the_reserved_digest_without_hashing() {
        let key = DigestKey::derive(b"secret", b"disk");
        assert_eq!(key.block(&[0; BLOCK_SIZE]), Digest::ZERO);
        assert_eq!(key.block(&[0; 100]), Digest::ZERO);
        assert_eq!(key.region(&[Digest::ZERO; 256]), Digest::ZERO);
        assert_ne!(key.block(&[1; BLOCK_SIZE]), Digest::ZERO);
    }

    #[test]
    fn a_short_block_is_hashed_as_zero_padded() {
        let key = DigestKey::derive(b"secret", b"disk");
        let mut full = [0u8; BLOCK_SIZE];
        full[..3].copy_from_slice(b"abc");
        assert_eq!(key.block(b"abc"), key.block(&full));
    }

    #[test]
    fn a_different_secret_or_context_gives_different_digests() {
        let data = [7u8; BLOCK_SIZE];
        let a = DigestKey::derive(b"secret", b"disk-1");
        let b = DigestKey::derive(b"secret", b"disk-2");
        let c = DigestKey::derive(b"other secret", b"disk-1");
        let a2 = DigestKey::derive(b"secret", b"disk-1");
        assert_eq!(a.block(&data), a2.block(&data));
        assert_ne!(a.block(&data), b.block(&data));
        assert_ne!(a.block(&data), c.block(&data));
        let blocks = [a.block(&data); 4];
        assert_ne!(a.region(&blocks), b.region(&blocks));
    }

    #[test]
    fn block_and_region_secrets_differ() {
        let key = DigestKey::derive(b"secret", b"disk");
        assert_ne!(key.block, key.region);
        // 256 digests are 4 KiB, like a block: the two hashes still differ.
        let digests = [Digest([0x5a; 16]); 256];
        let bytes: Vec<u8> = digests.iter().flat_map(|d| d.0).collect();
        assert_ne!(key.region(&digests), key.block(&bytes));
    }

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        for len in [0, 1, 63, 64, 65, 4095, 4096] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            for i in 0..len {
                v[i] = 1;
                assert!(!is_zero(&v), "len {len}, byte {i}");
                v[i] = 0;
            }
        }
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let key = DigestKey::derive(b"secret", b"disk");
        assert_eq!(format!("{key:?}"), "DigestKey(..)");
    }
}
