//! The two-pass compare (bdsync's idea): compare region digests, then block digests of
//! the regions that differ only.
//!
//! Invariants:
//! - Both maps must have the same device size and region size; otherwise the compare is
//!   refused ([`DigestError::LayoutMismatch`]) rather than guessed.
//! - Regions whose digests are equal are never refined: in particular regions that are
//!   zero on both sides (both `ZERO`) cost nothing beyond their region digest.
//! - A mismatching run whose other side is all zeros needs no block digests from that
//!   side: every non-zero block of this side differs ([`differing_blocks_from_zero`]).
//! - Results are sorted, non-overlapping and coalesced `(first_block, count)` ranges, and
//!   equal what comparing every block digest would give (tested against brute force).

use crate::{Digest, DigestError, DigestMap};

/// A run of consecutive mismatching regions, as a block range, with whether each side is
/// all zeros over it (then that side need not send block digests for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub first_block: u64,
    pub count: u64,
    /// Every region of the run is zero here.
    pub ours_zero: bool,
    /// Every region of the run is zero on the other side.
    pub theirs_zero: bool,
}

fn same(what: &'static str, ours: u64, theirs: u64) -> Result<(), DigestError> {
    if ours == theirs {
        Ok(())
    } else {
        Err(DigestError::LayoutMismatch { what, ours, theirs })
    }
}

/// The coarse pass: runs of regions whose digests differ. Adjacent mismatching regions
/// are merged into one run when their zero flags agree.
pub fn mismatched_regions(
    ours: &DigestMap,
    theirs: &DigestMap,
) -> Result<Vec<Mismatch>, DigestError> {
    same("device size", ours.size(), theirs.size())?;
    same(
        "region size",
        u64::from(ours.region_blocks()),
        u64::from(theirs.region_blocks()),
    )?;
    let mut out: Vec<Mismatch> = Vec::new();
    for (r, (a, b)) in ours.regions().iter().zip(theirs.regions()).enumerate() {
        if a == b {
            continue;
        }
        let (first_block, count) = ours.region_span(r as u64);
        let (ours_zero, theirs_zero) = (a.is_zero(), b.is_zero());
        match out.last_mut() {
            Some(m)
                if m.first_block + m.count == first_block
                    && m.ours_zero == ours_zero
                    && m.theirs_zero == theirs_zero =>
            {
                m.count += count
            }
            _ => out.push(Mismatch {
                first_block,
                count,
                ours_zero,
                theirs_zero,
            }),
        }
    }
    Ok(out)
}

/// Appends `(first, count)` to sorted ranges, merging it with the last one if adjacent.
pub fn push_range(ranges: &mut Vec<(u64, u64)>, first: u64, count: u64) {
    if count == 0 {
        return;
    }
    match ranges.last_mut() {
        Some((f, c)) if *f + *c == first => *c += count,
        _ => ranges.push((first, count)),
    }
}

/// The fine pass over one block range: both sides' block digests of blocks
/// `first_block..first_block + len`, appended to `out` as coalesced differing ranges
/// (so calling it for each [`Mismatch`] in order builds the whole answer).
pub fn differing_blocks(
    out: &mut Vec<(u64, u64)>,
    first_block: u64,
    ours: &[Digest],
    theirs: &[Digest],
) -> Result<(), DigestError> {
    same("block digest count", ours.len() as u64, theirs.len() as u64)?;
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if a != b {
            push_range(out, first_block + i as u64, 1);
        }
    }
    Ok(())
}

/// The fine pass against a side that is all zeros over the range: the non-zero blocks of
/// `digests` (blocks `first_block..`), appended to `out` as coalesced ranges.
pub fn differing_blocks_from_zero(out: &mut Vec<(u64, u64)>, first_block: u64, digests: &[Digest]) {
    for (i, d) in digests.iter().enumerate() {
        if !d.is_zero() {
            push_range(out, first_block + i as u64, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng as _, RngExt as _, SeedableRng as _};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::{BLOCK_SIZE, Detail, DigestKey};

    fn map_of(key: &DigestKey, data: &[u8], region_blocks: u32) -> DigestMap {
        let blocks = data.chunks(BLOCK_SIZE).map(|b| key.block(b)).collect();
        DigestMap::from_blocks(key, data.len() as u64, region_blocks, blocks).expect("map")
    }

    /// The whole two-pass compare, as the two sides would run it.
    fn two_pass(ours: &DigestMap, theirs: &DigestMap) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for m in mismatched_regions(ours, theirs).expect("coarse") {
            let range = m.first_block as usize..(m.first_block + m.count) as usize;
            let a = &ours.blocks().expect("blocks")[range.clone()];
            let b = &theirs.blocks().expect("blocks")[range];
            if m.theirs_zero {
                differing_blocks_from_zero(&mut out, m.first_block, a);
            } else if m.ours_zero {
                differing_blocks_from_zero(&mut out, m.first_block, b);
            } else {
                differing_blocks(&mut out, m.first_block, a, b).expect("fine");
            }
        }
        out
    }

    /// Block ranges whose bytes differ, compared byte for byte.
    fn brute_force(a: &[u8], b: &[u8]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (i, (x, y)) in a.chunks(BLOCK_SIZE).zip(b.chunks(BLOCK_SIZE)).enumerate() {
            if x != y {
                push_range(&mut out, i as u64, 1);
            }
        }
        out
    }

    #[test]
    fn equal_devices_compare_equal() {
        let key = DigestKey::derive(b"secret", b"disk");
        let mut data = vec![0u8; 3 << 20];
        ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut data[..1 << 20]);
        let (a, b) = (map_of(&key, &data, 256), map_of(&key, &data, 256));
        assert!(mismatched_regions(&a, &b).expect("coarse").is_empty());
        assert!(two_pass(&a, &b).is_empty());
    }

    #[test]
    fn one_changed_byte_finds_exactly_its_block() {
        let key = DigestKey::derive(b"secret", b"disk");
        let mut data = vec![0u8; 4 << 20];
        ChaCha8Rng::seed_from_u64(2).fill_bytes(&mut data);
        let a = map_of(&key, &data, 256);
        data[777 * BLOCK_SIZE + 123] ^= 0x01;
        let b = map_of(&key, &data, 256);
        let coarse = mismatched_regions(&a, &b).expect("coarse");
        assert_eq!(
            coarse,
            [Mismatch {
                first_block: 768,
                count: 256,
                ours_zero: false,
                theirs_zero: false
            }]
        );
        assert_eq!(two_pass(&a, &b), [(777, 1)]);
    }

    #[test]
    fn against_an_empty_disk_only_non_zero_blocks_differ() {
        let key = DigestKey::derive(b"secret", b"disk");
        let mut data = vec![0u8; 4 << 20];
        data[5 * BLOCK_SIZE..7 * BLOCK_SIZE].fill(3);
        data[800 * BLOCK_SIZE] = 1;
        let ours = map_of(&key, &data, 256);
        let empty = DigestMap::zeros(data.len() as u64, 256, Detail::Blocks).expect("zeros");
        let coarse = mismatched_regions(&ours, &empty).expect("coarse");
        let runs: Vec<_> = coarse.iter().map(|m| (m.first_block, m.count)).collect();
        assert_eq!(runs, [(0, 256), (768, 256)]);
        assert!(coarse.iter().all(|m| m.theirs_zero && !m.ours_zero));
        assert_eq!(two_pass(&ours, &empty), [(5, 2), (800, 1)]);
        assert_eq!(two_pass(&empty, &ours), [(5, 2), (800, 1)]);
        // Zero on both sides: nothing to refine.
        let empty2 = DigestMap::zeros(data.len() as u64, 256, Detail::Regions).expect("zeros");
        assert!(
            mismatched_regions(&empty, &empty2)
                .expect("coarse")
                .is_empty()
        );
    }

    #[test]
    fn different_layouts_are_refused() {
        let a = DigestMap::zeros(1 << 20, 256, Detail::Regions).expect("zeros");
        let b = DigestMap::zeros(2 << 20, 256, Detail::Regions).expect("zeros");
        let c = DigestMap::zeros(1 << 20, 128, Detail::Regions).expect("zeros");
        assert!(matches!(
            mismatched_regions(&a, &b),
            Err(DigestError::LayoutMismatch {
                what: "device size",
                ..
            })
        ));
        assert!(matches!(
            mismatched_regions(&a, &c),
            Err(DigestError::LayoutMismatch {
                what: "region size",
                ..
            })
        ));
    }

    #[test]
    fn two_pass_equals_brute_force_on_random_changes() {
        for seed in 0..40u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let key = DigestKey::derive(&seed.to_le_bytes(), b"disk");
            let region_blocks = [1, 3, 16, 256][rng.random_range(0..4usize)];
            let len = rng.random_range(1..600 * BLOCK_SIZE);
            let mut a = vec![0u8; len];
            // Random data with zero stretches.
            for chunk in a.chunks_mut(BLOCK_SIZE * 7) {
                if rng.random_bool(0.6) {
                    rng.fill_bytes(chunk);
                }
            }
            let mut b = a.clone();
            for _ in 0..rng.random_range(0..30) {
                let at = rng.random_range(0..len);
                let n = rng.random_range(1..3 * BLOCK_SIZE).min(len - at);
                match rng.random_range(0..3) {
                    0 => b[at] ^= 1 << rng.random_range(0..8),
                    1 => b[at..at + n].fill(0),
                    _ => rng.fill_bytes(&mut b[at..at + n]),
                }
            }
            let (ma, mb) = (
                map_of(&key, &a, region_blocks),
                map_of(&key, &b, region_blocks),
            );
            assert_eq!(
                two_pass(&ma, &mb),
                brute_force(&a, &b),
                "seed {seed} (len {len}, region {region_blocks})"
            );
        }
    }
}
