//! Throughput of the sealing pipeline's parts on 1 MiB buffers.
//!
//! Input "half" is half-compressible at 64 KiB granularity: even blocks
//! random, odd blocks repeated log-like text. Run:
//! `cargo bench --bench seal`.

use std::hint::black_box;
use std::time::Duration;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce as RingNonce, UnboundKey};
use ripcord_seal::{DataKey, Flags, Sealer};
use zstd::zstd_safe::{CCtx, CParameter, DCtx};

const MIB: usize = 1 << 20;
const BLOCK: usize = 64 * 1024;
const AAD: &[u8] = b"machine=m1 disk=sda epoch=3 seq=100..164";
const NONCE: [u8; 12] = [7; 12];
const KEY: [u8; 32] = [0x42; 32];

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

fn half_compressible() -> Vec<u8> {
    let mut v = Vec::with_capacity(MIB);
    for i in 0..MIB / BLOCK {
        if i % 2 == 0 {
            v.extend(random_bytes(i as u64 + 1, BLOCK));
        } else {
            let mut n = 0u64;
            while v.len() < (i + 1) * BLOCK {
                n += 1;
                v.extend(
                    format!(
                        "2026-05-01T12:00:{:02} INFO ripcord: replicated extent {n} ok\n",
                        n % 60
                    )
                    .bytes(),
                );
            }
            v.truncate((i + 1) * BLOCK);
        }
    }
    v
}

fn benches(c: &mut Criterion) {
    let half = half_compressible();
    let random = random_bytes(99, MIB);
    let mut g = c.benchmark_group("1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));

    // (a) zstd level 1 compress / decompress of the half-compressible input.
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(1)).unwrap();
    let mut zout = Vec::with_capacity(zstd::zstd_safe::compress_bound(MIB));
    let clen = cctx.compress2(&mut zout, &half).unwrap();
    eprintln!(
        "zstd-1 half-compressible: {MIB} -> {clen} bytes ({:.1}%)",
        100.0 * clen as f64 / MIB as f64
    );
    g.bench_function("zstd1_compress_half", |b| {
        b.iter(|| cctx.compress2(&mut zout, black_box(&half)).unwrap())
    });
    let compressed = zout.clone();
    let mut dctx = DCtx::create();
    let mut dout = Vec::with_capacity(MIB);
    g.bench_function("zstd1_decompress_half", |b| {
        b.iter(|| dctx.decompress(&mut dout, black_box(&compressed)).unwrap())
    });

    // (b) aes-gcm crate, in place (plaintext throughput).
    let cipher = Aes256Gcm::new(&KEY.into());
    let mut buf = random.clone();
    g.bench_function("aes_gcm_crate_seal", |b| {
        b.iter(|| {
            cipher
                .encrypt_inout_detached(&Nonce::from(NONCE), AAD, buf.as_mut_slice().into())
                .unwrap()
        })
    });
    let mut ct = random.clone();
    let tag: Tag = cipher
        .encrypt_inout_detached(&Nonce::from(NONCE), AAD, ct.as_mut_slice().into())
        .unwrap();
    g.bench_function("aes_gcm_crate_open", |b| {
        b.iter(|| {
            buf.copy_from_slice(&ct);
            cipher
                .decrypt_inout_detached(&Nonce::from(NONCE), AAD, buf.as_mut_slice().into(), &tag)
                .unwrap()
        })
    });

    // (c) ring AES-256-GCM, in place.
    let rkey = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).unwrap());
    g.bench_function("ring_seal", |b| {
        b.iter(|| {
            rkey.seal_in_place_separate_tag(
                RingNonce::assume_unique_for_key(NONCE),
                Aad::from(AAD),
                &mut buf,
            )
            .unwrap()
        })
    });
    let mut rct = random.clone();
    let rtag = rkey
        .seal_in_place_separate_tag(
            RingNonce::assume_unique_for_key(NONCE),
            Aad::from(AAD),
            &mut rct,
        )
        .unwrap();
    rct.extend_from_slice(rtag.as_ref());
    let mut rbuf = rct.clone();
    g.bench_function("ring_open", |b| {
        b.iter(|| {
            rbuf.copy_from_slice(&rct);
            rkey.open_in_place(
                RingNonce::assume_unique_for_key(NONCE),
                Aad::from(AAD),
                &mut rbuf,
            )
            .unwrap()
            .len()
        })
    });
    // Copy cost included in the *_open numbers above, for reference.
    g.bench_function("memcpy_1mib", |b| {
        b.iter(|| buf.copy_from_slice(black_box(&ct)))
    });

    // (d) The crate's pipeline: seal (compress + encrypt) and open
    // (verify + decrypt + bounded decompress), reusing buffers.
    let key = DataKey::from_bytes(KEY);
    let mut sealer = Sealer::new();
    let mut sealed = Vec::new();
    let mut opened = Vec::new();
    let flags = sealer
        .seal_into(&key, AAD, NONCE, &half, 1, &mut sealed)
        .unwrap();
    assert_eq!(flags, Flags::Zstd);
    eprintln!("sealed half-compressible: {} bytes", sealed.len());
    g.bench_function("pipeline_seal_half", |b| {
        b.iter(|| {
            sealer
                .seal_into(&key, AAD, NONCE, black_box(&half), 1, &mut sealed)
                .unwrap()
        })
    });
    let sealed_half = sealed.clone();
    g.bench_function("pipeline_open_half", |b| {
        b.iter(|| {
            sealer
                .open_into(
                    &key,
                    AAD,
                    NONCE,
                    Flags::Zstd,
                    black_box(&sealed_half),
                    MIB,
                    &mut opened,
                )
                .unwrap()
        })
    });
    let rflags = sealer
        .seal_into(&key, AAD, NONCE, &random, 1, &mut sealed)
        .unwrap();
    assert_eq!(rflags, Flags::Stored);
    g.bench_function("pipeline_seal_random", |b| {
        b.iter(|| {
            sealer
                .seal_into(&key, AAD, NONCE, black_box(&random), 1, &mut sealed)
                .unwrap()
        })
    });
    let sealed_random = sealed.clone();
    g.bench_function("pipeline_open_random", |b| {
        b.iter(|| {
            sealer
                .open_into(
                    &key,
                    AAD,
                    NONCE,
                    Flags::Stored,
                    black_box(&sealed_random),
                    MIB,
                    &mut opened,
                )
                .unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = seal;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(seal);
