//! Key generation, escrow round trip, error classification and envelope
//! decoding bounds.

use proptest::prelude::*;
use ripcord_seal::keys::{MAX_KEY_ID_LEN, MAX_MEMORY_KIB};
use ripcord_seal::{DataKey, KdfParams, KeyError, WrappedKey, unwrap_key, wrap_key};

/// Small parameters so tests are fast.
const FAST: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    parallelism: 1,
};
const PASS: &[u8] = b"correct horse battery staple";

fn envelope() -> (DataKey, Vec<u8>) {
    let key = DataKey::generate().unwrap();
    let bytes = wrap_key(&key, "deploy-1/epoch-3", PASS, &FAST)
        .unwrap()
        .to_bytes();
    (key, bytes)
}

/// Recomputes the trailing CRC after a deliberate edit.
fn fix_crc(bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let mut crc = !0u32;
    for &b in &bytes[..n] {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    bytes[n..].copy_from_slice(&(!crc).to_le_bytes());
}

#[test]
fn generate_is_random() {
    let a = DataKey::generate().unwrap();
    let b = DataKey::generate().unwrap();
    assert_ne!(a.expose_bytes(), b.expose_bytes());
    assert_ne!(a.expose_bytes(), &[0u8; 32]);
}

#[test]
fn round_trip_and_metadata() {
    let (key, bytes) = envelope();
    assert_eq!(bytes.len(), 101 + "deploy-1/epoch-3".len());
    let w = WrappedKey::from_bytes(&bytes).unwrap();
    assert_eq!(w.key_id(), "deploy-1/epoch-3");
    assert_eq!(w.kdf_params(), FAST);
    assert_eq!(w.to_bytes(), bytes);
    assert_eq!(
        unwrap_key(&w, PASS).unwrap().expose_bytes(),
        key.expose_bytes()
    );
    // The key itself never appears in the envelope.
    assert!(!bytes.windows(32).any(|win| win == key.expose_bytes()));
}

#[test]
fn default_params_round_trip() {
    let p = KdfParams::default();
    assert_eq!(
        (p.memory_kib, p.iterations, p.parallelism),
        (64 * 1024, 3, 4)
    );
    let key = DataKey::generate().unwrap();
    let w = wrap_key(&key, "", PASS, &p).unwrap();
    let w = WrappedKey::from_bytes(&w.to_bytes()).unwrap();
    assert_eq!(
        unwrap_key(&w, PASS).unwrap().expose_bytes(),
        key.expose_bytes()
    );
}

#[test]
fn same_key_wraps_differently() {
    let key = DataKey::generate().unwrap();
    let a = wrap_key(&key, "k", PASS, &FAST).unwrap().to_bytes();
    let b = wrap_key(&key, "k", PASS, &FAST).unwrap().to_bytes();
    assert_ne!(a, b, "salt and nonce must be fresh");
}

#[test]
fn wrong_passphrase() {
    let (_, bytes) = envelope();
    let w = WrappedKey::from_bytes(&bytes).unwrap();
    for wrong in [
        &b"correct horse battery stapl"[..],
        b"",
        b"Correct horse battery staple",
    ] {
        match unwrap_key(&w, wrong) {
            Err(KeyError::WrongPassphrase { key_id }) => assert_eq!(key_id, "deploy-1/epoch-3"),
            other => panic!("expected WrongPassphrase, got {other:?}"),
        }
    }
}

#[test]
fn damaged_envelope_is_damaged_not_wrong_passphrase() {
    let (_, bytes) = envelope();
    // Every single-bit flip after the magic+version is caught as damage
    // (or, in the length byte, as a length error): never as a wrong passphrase.
    for i in 48..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        match WrappedKey::from_bytes(&b) {
            Err(
                KeyError::Damaged
                | KeyError::Truncated { .. }
                | KeyError::TrailingBytes { .. }
                | KeyError::KeyIdTooLong { .. },
            ) => {}
            other => panic!("bit {i}: {other:?}"),
        }
    }
    let mut b = bytes.clone();
    b[60] ^= 0x10; // inside the key id / wrapped key
    assert!(matches!(WrappedKey::from_bytes(&b), Err(KeyError::Damaged)));
}

#[test]
fn authenticated_fields() {
    // Deliberate edits with a recomputed CRC decode fine but fail to unwrap:
    // params, salt, nonce, key id and ciphertext are all bound.
    let (_, bytes) = envelope();
    for at in [8, 12, 20, 36, 49, 49 + 16, bytes.len() - 5] {
        let mut b = bytes.clone();
        b[at] ^= 2;
        fix_crc(&mut b);
        let w = WrappedKey::from_bytes(&b).unwrap();
        assert!(
            matches!(unwrap_key(&w, PASS), Err(KeyError::WrongPassphrase { .. })),
            "offset {at}"
        );
    }
}

#[test]
fn decoding_bounds() {
    let (_, bytes) = envelope();
    for len in 0..bytes.len() {
        let r = WrappedKey::from_bytes(&bytes[..len]);
        assert!(
            matches!(r, Err(KeyError::Truncated { .. })),
            "len {len}: {r:?}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        WrappedKey::from_bytes(&longer),
        Err(KeyError::TrailingBytes { extra: 1 })
    ));

    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(
        WrappedKey::from_bytes(&b),
        Err(KeyError::BadMagic)
    ));
    let mut b = bytes.clone();
    b[4] = 2;
    assert!(matches!(
        WrappedKey::from_bytes(&b),
        Err(KeyError::UnsupportedVersion(2))
    ));
    let mut b = bytes.clone();
    b[6] = 9;
    fix_crc(&mut b);
    assert!(matches!(
        WrappedKey::from_bytes(&b),
        Err(KeyError::UnsupportedAlgorithm { kdf: 9, aead: 1 })
    ));

    // Oversize key id length field.
    let mut b = bytes.clone();
    b[48] = 200;
    assert!(matches!(
        WrappedKey::from_bytes(&b),
        Err(KeyError::KeyIdTooLong { len: 200, .. })
    ));

    // Out-of-range KDF params (a forged envelope must not make us allocate 4 GiB).
    for (at, value) in [
        (8, u32::MAX),
        (8, 0),
        (12, 0),
        (12, 1000),
        (16, 0),
        (16, 1000),
    ] {
        let mut b = bytes.clone();
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        fix_crc(&mut b);
        assert!(
            matches!(
                WrappedKey::from_bytes(&b),
                Err(KeyError::InvalidKdfParams { .. })
            ),
            "{at}={value}"
        );
    }

    // Non-UTF-8 key id.
    let mut b = bytes.clone();
    b[49] = 0xFF;
    fix_crc(&mut b);
    assert!(matches!(
        WrappedKey::from_bytes(&b),
        Err(KeyError::KeyIdNotUtf8)
    ));
}

#[test]
fn wrap_rejects_bad_inputs() {
    let key = DataKey::generate().unwrap();
    let long_id = "x".repeat(MAX_KEY_ID_LEN + 1);
    assert!(matches!(
        wrap_key(&key, &long_id, PASS, &FAST),
        Err(KeyError::KeyIdTooLong { .. })
    ));
    assert!(wrap_key(&key, &long_id[1..], PASS, &FAST).is_ok());
    for p in [
        KdfParams {
            memory_kib: 7,
            iterations: 1,
            parallelism: 1,
        },
        KdfParams {
            memory_kib: 64,
            iterations: 0,
            parallelism: 1,
        },
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 0,
        },
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 9,
        },
        KdfParams {
            memory_kib: MAX_MEMORY_KIB + 1,
            iterations: 1,
            parallelism: 1,
        },
    ] {
        assert!(
            matches!(
                wrap_key(&key, "k", PASS, &p),
                Err(KeyError::InvalidKdfParams { .. })
            ),
            "{p:?}"
        );
    }
}

#[test]
fn debug_output_has_no_secrets() {
    let key = DataKey::from_bytes([0x5A; 32]);
    assert_eq!(format!("{key:?}"), "DataKey(<redacted>)");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = WrappedKey::from_bytes(&bytes);
    }

    #[test]
    fn decoding_mutated_envelopes_never_panics(
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<proptest::sample::Index>(),
        fix in any::<bool>(),
    ) {
        // Mostly-valid inputs reach the deeper checks.
        let mut b = ENVELOPE.with(|e| e.clone());
        for (i, v) in edits {
            let i = i.index(b.len());
            b[i] = v;
        }
        b[..4].copy_from_slice(b"RCWK");
        b[4..6].copy_from_slice(&1u16.to_le_bytes());
        if fix { fix_crc(&mut b); }
        let n = cut.index(b.len() + 1);
        let _ = WrappedKey::from_bytes(&b[..n]);
        if let Ok(w) = WrappedKey::from_bytes(&b) {
            prop_assert_eq!(WrappedKey::from_bytes(&w.to_bytes()).unwrap(), w);
        }
    }
}

thread_local! {
    static ENVELOPE: Vec<u8> = envelope().1;
}
