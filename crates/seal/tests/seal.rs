//! Round trip, compression decision and tampering tests for payload sealing.

use proptest::prelude::*;
use ripcord_seal::{DataKey, Flags, SealError, Sealer, open, seal};

const NONCE: [u8; 12] = [7; 12];
const AAD: &[u8] = b"machine=m1 disk=sda epoch=3 seq=100..164";

fn key(byte: u8) -> DataKey {
    DataKey::from_bytes([byte; 32])
}

/// Incompressible bytes (xorshift64*), deterministic per seed.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..4096),
        (any::<u64>(), 0usize..70_000).prop_map(|(seed, len)| random_bytes(seed, len)),
        (any::<u8>(), 0usize..70_000).prop_map(|(b, len)| vec![b; len]),
        // Half random, half text, like a batch of mixed blocks.
        (any::<u64>(), 1usize..8).prop_map(|(seed, blocks)| {
            let mut v = Vec::new();
            for i in 0..blocks {
                if i % 2 == 0 {
                    v.extend(random_bytes(seed + i as u64, 4096));
                } else {
                    v.extend(b"ripcord log line 0123456789 ".iter().cycle().take(4096));
                }
            }
            v
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn round_trip(data in data_strategy(), level in -5i32..=9, nonce in any::<[u8; 12]>(),
                  aad in proptest::collection::vec(any::<u8>(), 0..64)) {
        let k = key(1);
        let sealed = seal(&k, &aad, nonce, &data, level).unwrap();
        // Body never grows by more than the tag.
        prop_assert!(sealed.bytes.len() <= data.len() + 16);
        let opened = open(&k, &aad, nonce, sealed.flags, &sealed.bytes, data.len()).unwrap();
        prop_assert_eq!(&opened, &data);
        // One byte less of bound than the plaintext must fail.
        if !data.is_empty() {
            let err = open(&k, &aad, nonce, sealed.flags, &sealed.bytes, data.len() - 1).unwrap_err();
            prop_assert_eq!(err, SealError::TooLarge { limit: data.len() - 1 });
        }
    }

    #[test]
    fn random_data_is_stored(seed in any::<u64>(), len in 0usize..200_000, level in -5i32..=5) {
        let data = random_bytes(seed, len);
        let sealed = seal(&key(2), AAD, NONCE, &data, level).unwrap();
        prop_assert_eq!(sealed.flags, Flags::Stored);
        prop_assert_eq!(sealed.bytes.len(), len + 16);
    }

    #[test]
    fn zeros_are_compressed(len in 64usize..300_000, level in -5i32..=5) {
        let data = vec![0u8; len];
        let sealed = seal(&key(3), AAD, NONCE, &data, level).unwrap();
        prop_assert_eq!(sealed.flags, Flags::Zstd);
        prop_assert!(sealed.bytes.len() < len / 8 + 64);
    }

    #[test]
    fn any_bit_flip_is_tampered(data in data_strategy(), bit in any::<proptest::sample::Index>()) {
        let k = key(4);
        let sealed = seal(&k, AAD, NONCE, &data, 1).unwrap();
        let mut bytes = sealed.bytes.clone();
        let i = bit.index(bytes.len() * 8);
        bytes[i / 8] ^= 1 << (i % 8);
        prop_assert_eq!(open(&k, AAD, NONCE, sealed.flags, &bytes, usize::MAX), Err(SealError::Tampered));
    }
}

/// A payload with both paths available: compressible.
fn sample() -> (DataKey, Vec<u8>, ripcord_seal::Sealed) {
    let k = key(9);
    let data: Vec<u8> = b"block ".iter().cycle().take(10_000).copied().collect();
    let sealed = seal(&k, AAD, NONCE, &data, 1).unwrap();
    assert_eq!(sealed.flags, Flags::Zstd);
    (k, data, sealed)
}

#[test]
fn every_bit_of_small_payloads_is_authenticated() {
    for data in [random_bytes(5, 100), vec![0u8; 200]] {
        let k = key(5);
        let sealed = seal(&k, AAD, NONCE, &data, 1).unwrap();
        for i in 0..sealed.bytes.len() * 8 {
            let mut bytes = sealed.bytes.clone();
            bytes[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                open(&k, AAD, NONCE, sealed.flags, &bytes, 1 << 20),
                Err(SealError::Tampered),
                "bit {i}"
            );
        }
    }
}

#[test]
fn wrong_aad_nonce_key_flags_are_tampered() {
    let (k, data, s) = sample();
    let max = data.len();
    assert_eq!(open(&k, AAD, NONCE, s.flags, &s.bytes, max).unwrap(), data);
    for i in 0..AAD.len() * 8 {
        let mut aad = AAD.to_vec();
        aad[i / 8] ^= 1 << (i % 8);
        assert_eq!(
            open(&k, &aad, NONCE, s.flags, &s.bytes, max),
            Err(SealError::Tampered)
        );
    }
    assert_eq!(
        open(&k, &AAD[1..], NONCE, s.flags, &s.bytes, max),
        Err(SealError::Tampered)
    );
    for i in 0..96 {
        let mut nonce = NONCE;
        nonce[i / 8] ^= 1 << (i % 8);
        assert_eq!(
            open(&k, AAD, nonce, s.flags, &s.bytes, max),
            Err(SealError::Tampered)
        );
    }
    assert_eq!(
        open(&key(10), AAD, NONCE, s.flags, &s.bytes, max),
        Err(SealError::Tampered)
    );
    // Flags are part of the AAD: claiming "stored" for a zstd body fails.
    assert_eq!(
        open(&k, AAD, NONCE, Flags::Stored, &s.bytes, max),
        Err(SealError::Tampered)
    );
}

#[test]
fn truncated_or_extended_is_tampered() {
    let (k, _, s) = sample();
    for len in [0, 1, 15, 16, s.bytes.len() - 1] {
        assert_eq!(
            open(&k, AAD, NONCE, s.flags, &s.bytes[..len], usize::MAX),
            Err(SealError::Tampered)
        );
    }
    let mut longer = s.bytes.clone();
    longer.push(0);
    assert_eq!(
        open(&k, AAD, NONCE, s.flags, &longer, usize::MAX),
        Err(SealError::Tampered)
    );
}

#[test]
fn failed_open_leaves_output_empty() {
    let (k, data, s) = sample();
    let mut sealer = Sealer::new();
    let mut out = b"stale plaintext".to_vec();
    let mut bytes = s.bytes.clone();
    bytes[3] ^= 0x80;
    let err = sealer
        .open_into(&k, AAD, NONCE, s.flags, &bytes, usize::MAX, &mut out)
        .unwrap_err();
    assert_eq!(err, SealError::Tampered);
    assert!(out.is_empty());
    // Stored path too.
    let r = random_bytes(1, 5000);
    let s2 = seal(&k, AAD, NONCE, &r, 1).unwrap();
    assert_eq!(s2.flags, Flags::Stored);
    let mut b2 = s2.bytes.clone();
    b2[10] ^= 1;
    out.extend_from_slice(b"stale");
    assert_eq!(
        sealer.open_into(&k, AAD, NONCE, s2.flags, &b2, usize::MAX, &mut out),
        Err(SealError::Tampered)
    );
    assert!(out.is_empty());
    // And the sealer still works afterwards.
    sealer
        .open_into(&k, AAD, NONCE, s.flags, &s.bytes, data.len(), &mut out)
        .unwrap();
    assert_eq!(out, data);
}

#[test]
fn sealer_reuse_matches_one_shot() {
    let k = key(11);
    let mut sealer = Sealer::new();
    let (mut sealed, mut opened) = (Vec::new(), Vec::new());
    for (i, data) in [
        vec![0u8; 100_000],
        random_bytes(3, 70_000),
        Vec::new(),
        vec![1u8; 10],
    ]
    .iter()
    .enumerate()
    {
        let nonce = [i as u8; 12];
        let flags = sealer
            .seal_into(&k, AAD, nonce, data, 1, &mut sealed)
            .unwrap();
        let one_shot = seal(&k, AAD, nonce, data, 1).unwrap();
        assert_eq!((flags, &sealed), (one_shot.flags, &one_shot.bytes));
        sealer
            .open_into(&k, AAD, nonce, flags, &sealed, data.len(), &mut opened)
            .unwrap();
        assert_eq!(&opened, data);
    }
}

#[test]
fn stored_bound_and_levels() {
    let k = key(12);
    let r = random_bytes(8, 1000);
    let s = seal(&k, AAD, NONCE, &r, 1).unwrap();
    assert_eq!(
        open(&k, AAD, NONCE, s.flags, &s.bytes, 999),
        Err(SealError::TooLarge { limit: 999 })
    );
    assert!(matches!(
        seal(&k, AAD, NONCE, &r, 1000),
        Err(SealError::InvalidLevel { level: 1000, .. })
    ));
    assert!(matches!(
        seal(&k, AAD, NONCE, &r, i32::MIN),
        Err(SealError::InvalidLevel { .. })
    ));
    // Negative ("fast") levels and level 0 (zstd default) are accepted.
    for level in [-7, -1, 0, 3] {
        let z = vec![0u8; 4096];
        let s = seal(&k, AAD, NONCE, &z, level).unwrap();
        assert_eq!(s.flags, Flags::Zstd);
        assert_eq!(open(&k, AAD, NONCE, s.flags, &s.bytes, 4096).unwrap(), z);
    }
}

#[test]
fn barely_compressible_is_stored() {
    // ~1.5% compressible: below the 1/32 margin, so stored.
    let mut data = random_bytes(77, 64 * 1024);
    for b in data.iter_mut().take(1000) {
        *b = 0;
    }
    let s = seal(&key(13), AAD, NONCE, &data, 1).unwrap();
    assert_eq!(s.flags, Flags::Stored);
    // ~25% zeros: compressed.
    let mut data = random_bytes(78, 64 * 1024);
    for b in data.iter_mut().take(16 * 1024) {
        *b = 0;
    }
    let s = seal(&key(13), AAD, NONCE, &data, 1).unwrap();
    assert_eq!(s.flags, Flags::Zstd);
}

#[test]
fn debug_redacts_key() {
    let k = DataKey::from_bytes([0xAB; 32]);
    let dbg = format!("{k:?}");
    assert!(!dbg.to_lowercase().contains("ab"), "{dbg}");
    assert!(dbg.contains("redacted"));
}
