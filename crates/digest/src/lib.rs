//! Keyed block digests of a device, for delta sync (issue 14): both sides hash their
//! device, compare coarse region digests, refine the regions that differ with block
//! digests, and send only the blocks that differ.
//!
//! # Layout
//! - A **block** is [`BLOCK_SIZE`] (4 KiB) bytes at a multiple of 4 KiB. A device whose
//!   size is not a multiple of 4 KiB has a short last block, hashed as if padded with zero
//!   bytes to 4 KiB: a short block of zeros is therefore a zero block, and two devices that
//!   differ only past their end compare equal (both sides must agree on the size).
//! - A **region** is `region_blocks` consecutive blocks ([`DEFAULT_REGION_BLOCKS`] = 256,
//!   1 MiB; at most [`MAX_REGION_BLOCKS`]); the last region may have fewer blocks.
//!
//! # Digests
//! - The block digest is the XXH3-128 of the 4 KiB block with a 192-byte secret derived
//!   by HKDF-SHA256 from a deployment secret and a context label ([`DigestKey`]).
//! - A block of zeros has the reserved digest [`Digest::ZERO`] (16 zero bytes), found by
//!   an all-zero check without hashing. A keyed digest that happens to be all zero is
//!   remapped to [`Digest::REMAPPED_ZERO`], so `ZERO` means "zeros" and nothing else.
//! - The region digest is the XXH3-128 of the concatenated block digests with a second,
//!   independent secret (so a region digest is never comparable to a block digest), with
//!   the same rule: a region of zero blocks has digest `ZERO`, recognisable without a key.
//!
//! # What a digest reveals (threat model)
//! XXH3 is a fast non-cryptographic hash, not a MAC or a PRF; the secret only makes its
//! output depend on a value an observer does not have. Concretely:
//! - **Without the key**, an observer of digests cannot compute the digest of a guessed
//!   block, so cannot confirm a guess ("is this the block of `/etc/shadow` I expect?") by
//!   hashing it, as it could with an unkeyed or public-seed hash. That is the purpose of the
//!   key. It is not a proof: XXH3 has had no cryptanalysis as a keyed function, and an
//!   observer holding many known (block, digest) pairs under one key (an OS image's known
//!   files) might learn enough about the secret to forge or confirm digests. Digests should
//!   therefore still travel inside ripcord's encrypted channel; the key only limits what a
//!   leaked digest map gives away, it does not make maps safe to publish.
//! - **Always visible**, key or not: which blocks and regions are zero (by design: zero
//!   regions are skipped), and which blocks are equal to each other under the same key
//!   (digests are not bound to the block's position), i.e. the device's allocation and
//!   duplication pattern.
//! - **With the key**, digests are just hashes: anyone holding the key can confirm guesses.
//!   The key is derived from a disk's data key, so whoever has it can read the data anyway.
//! - **Collisions**: with 128 bits, an accidental collision between two different blocks
//!   has probability about 2^-128 per pair (2^-90 or less for every block pair ever compared
//!   in practice), negligible beside disk error rates. XXH3 is not collision-resistant
//!   against someone who knows the key and chooses the data: a writer holding the key could
//!   craft two blocks with equal digests so that a difference is missed. Delta sync trusts
//!   both endpoints; it is not a defence against them.
//!
//! # Modules
//! [`key`] (the secret and the hash), [`map`] (a device's digests, read at disk speed),
//! [`read`] (sequential device reads), [`compare`] (the two-pass compare), [`codec`] (the bounded wire encoding).

pub mod codec;
pub mod compare;
mod error;
pub mod key;
pub mod map;
pub mod read;

pub use codec::{DecodeError, DigestSlice, SliceKind};
pub use compare::{Mismatch, differing_blocks, differing_blocks_from_zero, mismatched_regions};
pub use error::DigestError;
pub use key::{Digest, DigestKey, is_zero};
pub use map::{Detail, DigestMap};

/// Bytes per block.
pub const BLOCK_SIZE: usize = 4096;
/// Blocks per region unless the caller says otherwise (1 MiB regions).
pub const DEFAULT_REGION_BLOCKS: u32 = 256;
/// The largest region the maps and the decoder accept (256 MiB).
pub const MAX_REGION_BLOCKS: u32 = 65536;

/// Number of blocks of a device of `size` bytes (a short last block counts).
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}

/// Number of regions of `blocks` blocks with `region_blocks` per region.
pub fn region_count(blocks: u64, region_blocks: u32) -> u64 {
    blocks.div_ceil(u64::from(region_blocks.max(1)))
}
