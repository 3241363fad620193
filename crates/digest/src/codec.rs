//! The wire encoding of digests: a [`DigestSlice`] (a run of block or region digests of
//! one device) per frame, and a whole [`DigestMap`] as a sequence of frames.
//!
//! The byte layout below is the specification (all integers little-endian):
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 4    | magic `RCDG`                                                 |
//! | 4      | 2    | format version, [`VERSION`] (1)                              |
//! | 6      | 1    | kind: 1 = block digests, 2 = region digests                  |
//! | 7      | 1    | reserved, 0                                                  |
//! | 8      | 4    | block size, 4096                                             |
//! | 12     | 4    | blocks per region, `1..=MAX_REGION_BLOCKS`                   |
//! | 16     | 8    | device size in bytes                                         |
//! | 24     | 8    | first: index of the first block (or region) in the frame     |
//! | 32     | 4    | count of digests, at most [`MAX_FRAME_DIGESTS`]              |
//! | 36     | 16n  | the digests, 16 bytes each                                   |
//! | 36+16n | 4    | CRC32C of every byte before it                               |
//!
//! Version 1 also fixes the key derivation and hashes of [`crate::key`]: a peer that
//! hashes differently must send another version.
//!
//! Invariants: every decoder checks sizes before it allocates or reads: a count above the
//! caller's maximum or [`MAX_FRAME_DIGESTS`], or above what the bytes present can hold, is
//! refused with an error naming the field; a frame's digests must lie inside the device it
//! describes. Decoding never panics on any input (proptest below).

use crate::{
    BLOCK_SIZE, Digest, DigestError, DigestMap, MAX_REGION_BLOCKS, block_count, region_count,
};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"RCDG";
/// Format version this crate writes and reads.
pub const VERSION: u16 = 1;
/// Bytes before the digests.
pub const HEADER_LEN: usize = 36;
/// Bytes after the digests (the CRC).
pub const TRAILER_LEN: usize = 4;
/// The most digests one frame may hold (64 MiB of digests; a frame of blocks covers
/// 16 GiB of device). [`DigestMap::encode`] splits longer runs into several frames.
pub const MAX_FRAME_DIGESTS: u32 = 1 << 22;

/// What the digests of a slice are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceKind {
    Blocks = 1,
    Regions = 2,
}

/// A run of digests of one device: blocks (or regions) `first..first + digests.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestSlice {
    pub kind: SliceKind,
    pub region_blocks: u32,
    pub device_size: u64,
    pub first: u64,
    pub digests: Vec<Digest>,
}

/// Why bytes were refused. All of them mean the peer sent something this version cannot
/// use: drop the connection and report it; retrying the same bytes cannot succeed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("digest frame truncated: {needed} bytes needed, {have} present")]
    Truncated { needed: u64, have: usize },
    #[error("not a digest frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("digest format version {0} is not supported (this side reads {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown digest kind {0}")]
    BadKind(u8),
    #[error("reserved byte is {0}, not 0")]
    Reserved(u8),
    #[error("block size {0} is not {BLOCK_SIZE}")]
    BlockSize(u32),
    #[error("region size of {0} blocks is outside 1..={MAX_REGION_BLOCKS}")]
    RegionBlocks(u32),
    #[error("digest count {count} exceeds the maximum of {max}")]
    CountTooLarge { count: u64, max: u64 },
    #[error("digests {first}..{end} lie outside the device's {total} {kind:?}")]
    OutOfRange {
        kind: SliceKind,
        first: u64,
        end: u64,
        total: u64,
    },
    #[error("digest frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("digest map frames disagree or are out of order: {0}")]
    Inconsistent(&'static str),
    #[error("digest map is incomplete: {kind:?} has {have} of {expected} digests")]
    Incomplete {
        kind: SliceKind,
        have: u64,
        expected: u64,
    },
}

impl DigestSlice {
    /// The number of blocks or regions of the device, per this slice's kind.
    fn total(&self) -> u64 {
        let blocks = block_count(self.device_size);
        match self.kind {
            SliceKind::Blocks => blocks,
            SliceKind::Regions => region_count(blocks, self.region_blocks),
        }
    }

    /// Appends this slice's frame to `out`.
    ///
    /// # Panics
    /// If it holds more than [`MAX_FRAME_DIGESTS`] digests (split it first).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let count = u32::try_from(self.digests.len())
            .ok()
            .filter(|&c| c <= MAX_FRAME_DIGESTS)
            .expect("a frame holds at most MAX_FRAME_DIGESTS digests");
        let start = out.len();
        out.reserve(HEADER_LEN + 16 * self.digests.len() + TRAILER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&self.region_blocks.to_le_bytes());
        out.extend_from_slice(&self.device_size.to_le_bytes());
        out.extend_from_slice(&self.first.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        for d in &self.digests {
            out.extend_from_slice(&d.0);
        }
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// This slice's frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes the frame at the start of `bytes`, holding at most `max_digests` digests;
    /// returns it and the bytes it took (frames may follow).
    pub fn decode(bytes: &[u8], max_digests: u32) -> Result<(DigestSlice, usize), DecodeError> {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(DecodeError::Truncated {
                needed: HEADER_LEN as u64,
                have: bytes.len(),
            })?;
        let u32_at = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        let magic = [header[0], header[1], header[2], header[3]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = match header[6] {
            1 => SliceKind::Blocks,
            2 => SliceKind::Regions,
            k => return Err(DecodeError::BadKind(k)),
        };
        if header[7] != 0 {
            return Err(DecodeError::Reserved(header[7]));
        }
        if u32_at(8) != BLOCK_SIZE as u32 {
            return Err(DecodeError::BlockSize(u32_at(8)));
        }
        let region_blocks = u32_at(12);
        if region_blocks == 0 || region_blocks > MAX_REGION_BLOCKS {
            return Err(DecodeError::RegionBlocks(region_blocks));
        }
        let (device_size, first, count) = (u64_at(16), u64_at(24), u32_at(32));
        let max = max_digests.min(MAX_FRAME_DIGESTS);
        if count > max {
            return Err(DecodeError::CountTooLarge {
                count: count.into(),
                max: max.into(),
            });
        }
        let body = HEADER_LEN + 16 * count as usize;
        let len = body + TRAILER_LEN;
        if bytes.len() < len {
            return Err(DecodeError::Truncated {
                needed: len as u64,
                have: bytes.len(),
            });
        }
        let stored = u32::from_le_bytes([
            bytes[body],
            bytes[body + 1],
            bytes[body + 2],
            bytes[body + 3],
        ]);
        let computed = crc32c::crc32c(&bytes[..body]);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        let slice = DigestSlice {
            kind,
            region_blocks,
            device_size,
            first,
            digests: bytes[HEADER_LEN..body]
                .chunks_exact(16)
                .map(|d| Digest(d.try_into().expect("16-byte chunks")))
                .collect(),
        };
        let end = first.saturating_add(count.into());
        let total = slice.total();
        if end > total {
            return Err(DecodeError::OutOfRange {
                kind,
                first,
                end,
                total,
            });
        }
        Ok((slice, len))
    }
}

impl DigestMap {
    /// Blocks `first..first + count` as a slice (for the fine pass), if this map keeps
    /// block digests and the range is inside the device.
    pub fn block_slice(&self, first: u64, count: u64) -> Result<DigestSlice, DigestError> {
        let blocks = self.blocks().unwrap_or_default();
        let end = first.saturating_add(count);
        if end > blocks.len() as u64 {
            return Err(DigestError::OutOfRange {
                first,
                end,
                blocks: blocks.len() as u64,
            });
        }
        Ok(DigestSlice {
            kind: SliceKind::Blocks,
            region_blocks: self.region_blocks(),
            device_size: self.size(),
            first,
            digests: blocks[first as usize..end as usize].to_vec(),
        })
    }

    /// The whole map as frames: region digests, then block digests if kept, each split
    /// into frames of at most [`MAX_FRAME_DIGESTS`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut frames = |kind, digests: &[Digest]| {
            // At least one frame, even empty, so a map of a 0-byte device says so.
            let chunks = digests.chunks(MAX_FRAME_DIGESTS as usize);
            let chunks = chunks.chain(digests.is_empty().then_some(digests));
            for (i, chunk) in chunks.enumerate() {
                DigestSlice {
                    kind,
                    region_blocks: self.region_blocks(),
                    device_size: self.size(),
                    first: (i * MAX_FRAME_DIGESTS as usize) as u64,
                    digests: chunk.to_vec(),
                }
                .encode_into(&mut out);
            }
        };
        frames(SliceKind::Regions, self.regions());
        if let Some(blocks) = self.blocks() {
            frames(SliceKind::Blocks, blocks);
        }
        out
    }

    /// Decodes [`DigestMap::encode`]'s output, refusing maps of more than `max_digests`
    /// digests in all (regions and blocks). Region digests are taken as sent: without
    /// block digests they cannot be checked, with them they are checked only by the CRC.
    pub fn decode(bytes: &[u8], max_digests: u64) -> Result<DigestMap, DecodeError> {
        let mut regions: Vec<Digest> = Vec::new();
        let mut blocks: Vec<Digest> = Vec::new();
        let mut layout = None;
        let mut saw_blocks = false;
        let mut at = 0;
        while at < bytes.len() {
            let budget = max_digests.saturating_sub((regions.len() + blocks.len()) as u64);
            let (slice, used) =
                DigestSlice::decode(&bytes[at..], u32::try_from(budget).unwrap_or(u32::MAX))?;
            at += used;
            if *layout.get_or_insert((slice.device_size, slice.region_blocks))
                != (slice.device_size, slice.region_blocks)
            {
                return Err(DecodeError::Inconsistent(
                    "device or region size changes between frames",
                ));
            }
            let into = match slice.kind {
                SliceKind::Regions if blocks.is_empty() => &mut regions,
                SliceKind::Regions => {
                    return Err(DecodeError::Inconsistent(
                        "region digests after block digests",
                    ));
                }
                SliceKind::Blocks => {
                    saw_blocks = true;
                    &mut blocks
                }
            };
            if slice.first != into.len() as u64 {
                return Err(DecodeError::Inconsistent(
                    "frames are not contiguous from the first digest",
                ));
            }
            into.extend_from_slice(&slice.digests);
        }
        let (size, region_blocks) = layout.ok_or(DecodeError::Truncated {
            needed: HEADER_LEN as u64,
            have: 0,
        })?;
        let blocks_total = block_count(size);
        let regions_total = region_count(blocks_total, region_blocks);
        let complete = |kind, have: usize, expected: u64| {
            if have as u64 == expected {
                Ok(())
            } else {
                Err(DecodeError::Incomplete {
                    kind,
                    have: have as u64,
                    expected,
                })
            }
        };
        complete(SliceKind::Regions, regions.len(), regions_total)?;
        let mut map = DigestMap::from_regions(size, region_blocks, regions)
            .map_err(|_| DecodeError::Inconsistent("region count"))?;
        if saw_blocks {
            complete(SliceKind::Blocks, blocks.len(), blocks_total)?;
            map.attach_blocks(blocks);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{Detail, DigestKey};

    fn sample_map(size: u64, region_blocks: u32) -> DigestMap {
        let key = DigestKey::derive(b"secret", b"disk");
        let blocks = (0..block_count(size))
            .map(|i| {
                if i % 5 == 0 {
                    Digest::ZERO
                } else {
                    key.block(&i.to_le_bytes())
                }
            })
            .collect();
        DigestMap::from_blocks(&key, size, region_blocks, blocks).expect("map")
    }

    #[test]
    fn a_slice_round_trips() {
        let map = sample_map(10 * BLOCK_SIZE as u64 + 5, 4);
        let slice = map.block_slice(3, 8).expect("slice");
        let bytes = slice.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 8 * 16 + TRAILER_LEN);
        assert_eq!(DigestSlice::decode(&bytes, 8), Ok((slice, bytes.len())));
    }

    #[test]
    fn a_map_round_trips_with_and_without_blocks() {
        for size in [0, 1, 4096, 3 << 20, (3 << 20) + 7] {
            let map = sample_map(size, 256);
            assert_eq!(
                DigestMap::decode(&map.encode(), u64::MAX),
                Ok(map.clone()),
                "size {size}"
            );
            let coarse =
                DigestMap::from_regions(size, 256, map.regions().to_vec()).expect("coarse");
            assert_eq!(
                DigestMap::decode(&coarse.encode(), u64::MAX),
                Ok(coarse),
                "size {size}"
            );
        }
        let zeros = DigestMap::zeros(1 << 30, 256, Detail::Regions).expect("zeros");
        assert_eq!(DigestMap::decode(&zeros.encode(), 1024), Ok(zeros));
    }

    #[test]
    fn counts_are_bounded_before_reading() {
        let map = sample_map(64 * BLOCK_SIZE as u64, 16);
        let bytes = map.block_slice(0, 64).expect("slice").encode();
        assert_eq!(
            DigestSlice::decode(&bytes, 10),
            Err(DecodeError::CountTooLarge { count: 64, max: 10 })
        );
        assert_eq!(
            DigestMap::decode(&map.encode(), 60),
            Err(DecodeError::CountTooLarge { count: 64, max: 56 })
        );
        // A header claiming 2^22 digests over 100 bytes: refused as truncated, no allocation.
        let mut lying = bytes[..HEADER_LEN].to_vec();
        lying[32..36].copy_from_slice(&MAX_FRAME_DIGESTS.to_le_bytes());
        lying.resize(100, 0);
        assert!(matches!(
            DigestSlice::decode(&lying, u32::MAX),
            Err(DecodeError::Truncated { have: 100, .. })
        ));
        lying[32..36].copy_from_slice(&(MAX_FRAME_DIGESTS + 1).to_le_bytes());
        assert!(matches!(
            DigestSlice::decode(&lying, u32::MAX),
            Err(DecodeError::CountTooLarge { .. })
        ));
    }

    #[test]
    fn corruption_and_foreign_frames_are_refused() {
        let map = sample_map(8 * BLOCK_SIZE as u64, 4);
        let good = map.block_slice(0, 8).expect("slice").encode();
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 5] ^= 1;
        assert!(matches!(
            DigestSlice::decode(&flipped, 100),
            Err(DecodeError::Checksum { .. })
        ));
        let mut version = good.clone();
        version[4] = 2;
        assert_eq!(
            DigestSlice::decode(&version, 100),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(
            DigestSlice::decode(&magic, 100),
            Err(DecodeError::BadMagic(_))
        ));
        // Digests past the device's end (a valid CRC over a lying header).
        let outside = DigestSlice {
            first: 5,
            ..map.block_slice(0, 8).expect("slice")
        }
        .encode();
        assert!(matches!(
            DigestSlice::decode(&outside, 100),
            Err(DecodeError::OutOfRange {
                end: 13,
                total: 8,
                ..
            })
        ));
        // A map missing its last region frame's digests.
        let part = DigestSlice {
            kind: SliceKind::Regions,
            region_blocks: 4,
            device_size: map.size(),
            first: 0,
            digests: vec![Digest::ZERO],
        };
        assert!(matches!(
            DigestMap::decode(&part.encode(), 100),
            Err(DecodeError::Incomplete {
                have: 1,
                expected: 2,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = DigestSlice::decode(&bytes, 1000);
            let _ = DigestMap::decode(&bytes, 1000);
        }

        #[test]
        fn decoding_mutated_frames_never_panics(
            size in 0u64..(40 * BLOCK_SIZE as u64),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            cut in any::<usize>(),
        ) {
            let mut bytes = sample_map(size, 4).encode();
            for (at, x) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= x;
                }
            }
            let cut = cut % (bytes.len() + 1);
            let _ = DigestMap::decode(&bytes[..cut], 1000);
            let _ = DigestMap::decode(&bytes, 1000);
        }
    }
}
