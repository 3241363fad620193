//! The stamped block format.
//!
//! Every 4 KiB block the workload writes is self-describing. All integers little-endian:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 8    | magic, the ASCII bytes `RIPCORAC` |
//! | 8      | 8    | run id (random per workload run) |
//! | 16     | 8    | lba: the block's own 4 KiB block number on the device |
//! | 24     | 8    | seq of the write op that wrote it (global, increasing) |
//! | 32     | 4    | index of this block within its write (0-based) |
//! | 36     | 4056 | filler: 507 u64 words, word `i` = `mix64(key + (i+1)*0x9E3779B97F4A7C15)`, `key = filler_key(run, lba, seq)` |
//! | 4092   | 4    | CRC32C of bytes 0..4092 |
//!
//! The filler is a counter-mode function of (run, lba, seq), so any single word of any
//! version of a block can be recomputed in O(1); the checker uses that to recognise which
//! version each 512-byte sector of a torn block came from.

use crate::rng::mix64;

/// Block size in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Block magic.
pub const MAGIC: [u8; 8] = *b"RIPCORAC";
/// Bytes of stamp header before the filler.
pub const HEADER_LEN: usize = 36;
/// Offset of the CRC32C field.
pub const CRC_OFFSET: usize = BLOCK_SIZE - 4;
/// Sector size used for torn-block analysis.
pub const SECTOR: usize = 512;
/// Sectors per block.
pub const SECTORS: usize = BLOCK_SIZE / SECTOR;
const FILLER_WORDS: usize = (CRC_OFFSET - HEADER_LEN) / 8;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The identity of one written block version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// Workload run id.
    pub run_id: u64,
    /// Block number the block was written to.
    pub lba: u64,
    /// Seq of the write op.
    pub seq: u64,
    /// Index of the block within its write.
    pub index: u32,
}

fn filler_key(run: u64, lba: u64, seq: u64) -> u64 {
    mix64(run ^ mix64(lba ^ mix64(seq ^ 0x5249_5043_4f52_4421)))
}

fn filler_word(key: u64, i: usize) -> u64 {
    mix64(key.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)))
}

/// Fills `buf` (exactly one block) with the stamped content of `stamp`.
pub fn fill_block(buf: &mut [u8], stamp: &Stamp) {
    assert_eq!(buf.len(), BLOCK_SIZE);
    buf[0..8].copy_from_slice(&MAGIC);
    buf[8..16].copy_from_slice(&stamp.run_id.to_le_bytes());
    buf[16..24].copy_from_slice(&stamp.lba.to_le_bytes());
    buf[24..32].copy_from_slice(&stamp.seq.to_le_bytes());
    buf[32..36].copy_from_slice(&stamp.index.to_le_bytes());
    let key = filler_key(stamp.run_id, stamp.lba, stamp.seq);
    for (i, w) in buf[HEADER_LEN..CRC_OFFSET].chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&filler_word(key, i).to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf[..CRC_OFFSET]);
    buf[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// Returns the stamped content of `stamp` as a new block.
pub fn make_block(stamp: &Stamp) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK_SIZE];
    fill_block(&mut v, stamp);
    v
}

/// What a block's bytes look like, before consulting the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zero bytes.
    Zero,
    /// Magic present and CRC correct.
    Stamped(Stamp),
    /// Magic present but the CRC does not match.
    BadCrc(Stamp),
    /// Non-zero and no magic.
    Unstamped,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Parses the stamp header without verifying anything.
pub fn parse_stamp(block: &[u8]) -> Option<Stamp> {
    (block[0..8] == MAGIC).then(|| Stamp {
        run_id: u64_at(block, 8),
        lba: u64_at(block, 16),
        seq: u64_at(block, 24),
        index: u32::from_le_bytes(block[32..36].try_into().expect("4 bytes")),
    })
}

/// Classifies raw block bytes (one block).
pub fn inspect(block: &[u8]) -> Content {
    debug_assert_eq!(block.len(), BLOCK_SIZE);
    match parse_stamp(block) {
        Some(s) => {
            let want = u32::from_le_bytes(block[CRC_OFFSET..].try_into().expect("4 bytes"));
            if crc32c::crc32c(&block[..CRC_OFFSET]) == want {
                Content::Stamped(s)
            } else {
                Content::BadCrc(s)
            }
        }
        None if is_zero(block) => Content::Zero,
        None => Content::Unstamped,
    }
}

/// Whether every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (chunks, rest) = b.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|&x| x == 0)
}

/// Cheap probe: could sector `s` of `block` be sector `s` of the version `stamp`?
/// Compares one filler word (or the header for sector 0); false positives are resolved by
/// [`sector_equals`].
pub fn sector_probe(block: &[u8], s: usize, stamp: &Stamp) -> bool {
    if s == 0 {
        return parse_stamp(block) == Some(*stamp);
    }
    let start = s * SECTOR;
    // First filler word lying fully inside the sector.
    let i = (start - HEADER_LEN).div_ceil(8);
    debug_assert!(i < FILLER_WORDS && HEADER_LEN + 8 * i + 8 <= start + SECTOR);
    let off = HEADER_LEN + 8 * i;
    u64_at(block, off) == filler_word(filler_key(stamp.run_id, stamp.lba, stamp.seq), i)
}

/// Exact comparison of sector `s` of `block` with sector `s` of `version` (a full block).
pub fn sector_equals(block: &[u8], version: &[u8], s: usize) -> bool {
    block[s * SECTOR..(s + 1) * SECTOR] == version[s * SECTOR..(s + 1) * SECTOR]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_crc() {
        let st = Stamp {
            run_id: 7,
            lba: 42,
            seq: 9,
            index: 3,
        };
        let mut b = make_block(&st);
        assert_eq!(inspect(&b), Content::Stamped(st));
        for s in 0..SECTORS {
            assert!(sector_probe(&b, s, &st));
        }
        let other = Stamp { seq: 10, ..st };
        for s in 0..SECTORS {
            assert!(!sector_probe(&b, s, &other));
        }
        b[100] ^= 1;
        assert_eq!(inspect(&b), Content::BadCrc(st));
        assert_eq!(inspect(&[0u8; BLOCK_SIZE]), Content::Zero);
        let mut g = [0u8; BLOCK_SIZE];
        g[4095] = 1;
        assert_eq!(inspect(&g), Content::Unstamped);
    }

    #[test]
    fn layout_is_little_endian() {
        let st = Stamp {
            run_id: 0x0102030405060708,
            lba: 1,
            seq: 2,
            index: 5,
        };
        let b = make_block(&st);
        assert_eq!(&b[0..8], b"RIPCORAC");
        assert_eq!(b[8], 0x08);
        assert_eq!(b[16], 1);
        assert_eq!(b[24], 2);
        assert_eq!(b[32], 5);
        let crc = u32::from_le_bytes(b[4092..].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&b[..4092]));
    }
}
