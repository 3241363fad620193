//! Decompression-bomb and lying-header tests. A counting global allocator
//! measures the peak heap growth during `open` (unsafe is confined to this
//! test binary; the library forbids it). zstd's own C allocations are not
//! seen by it; those are capped by the window-log limit (tested below).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ripcord_seal::{DataKey, Flags, SealError, Sealer, open, seal, seal_encoded};
use zstd::zstd_safe::{CCtx, CParameter};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only adding bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above (System) with this `layout`.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests in this binary measure global state: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak heap growth (bytes) while running `f`.
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst) - base)
}

const MIB: usize = 1 << 20;
const AAD: &[u8] = b"bomb";
const NONCE: [u8; 12] = [1; 12];

fn key() -> DataKey {
    DataKey::from_bytes([3; 32])
}

/// A zstd frame of `data` with no content size in its header.
fn frame_without_size(data: &[u8], window_log: Option<u32>) -> Vec<u8> {
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(1)).unwrap();
    cctx.set_parameter(CParameter::ContentSizeFlag(false))
        .unwrap();
    if let Some(w) = window_log {
        cctx.set_parameter(CParameter::WindowLog(w)).unwrap();
    }
    // Hide the size from zstd: stream it in without a pledged size.
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    let mut enc = zstd::stream::write::Encoder::with_context(&mut out, &mut cctx);
    std::io::Write::write_all(&mut enc, data).unwrap();
    enc.finish().unwrap();
    assert_eq!(zstd::zstd_safe::get_frame_content_size(&out).unwrap(), None);
    out
}

#[test]
fn bomb_with_declared_size_is_rejected_cheaply() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let zeros = vec![0u8; 100 * MIB];
    let sealed = seal(&key(), AAD, NONCE, &zeros, 1).unwrap();
    drop(zeros);
    assert_eq!(sealed.flags, Flags::Zstd);
    assert!(sealed.bytes.len() < MIB / 4, "{}", sealed.bytes.len());
    let (r, peak) = peak_growth(|| open(&key(), AAD, NONCE, sealed.flags, &sealed.bytes, MIB));
    assert_eq!(r, Err(SealError::TooLarge { limit: MIB }));
    assert!(peak < 2 * MIB, "peak heap growth {peak}");
}

#[test]
fn bomb_without_declared_size_is_bounded() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let zeros = vec![0u8; 100 * MIB];
    let frame = frame_without_size(&zeros, None);
    drop(zeros);
    let sealed = seal_encoded(&key(), AAD, NONCE, Flags::Zstd, frame).unwrap();
    let mut sealer = Sealer::new();
    let mut out = Vec::new();
    let (r, peak) = peak_growth(|| {
        sealer.open_into(
            &key(),
            AAD,
            NONCE,
            sealed.flags,
            &sealed.bytes,
            MIB,
            &mut out,
        )
    });
    assert_eq!(r, Err(SealError::TooLarge { limit: MIB }));
    assert!(out.is_empty());
    assert!(out.capacity() <= MIB, "output grew to {}", out.capacity());
    // The output grows by doubling up to the bound, so the transient peak is
    // the last two steps (512 KiB + 1 MiB) plus the decrypted compressed
    // body; 100 MiB would show up as ~100x this.
    assert!(
        peak < MIB + MIB / 2 + sealed.bytes.len() + 64 * 1024,
        "peak heap growth {peak}"
    );
}

#[test]
fn unsized_frame_within_bound_opens() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let data: Vec<u8> = (0..3 * MIB).map(|i| (i / 4096) as u8).collect();
    let sealed = seal_encoded(
        &key(),
        AAD,
        NONCE,
        Flags::Zstd,
        frame_without_size(&data, None),
    )
    .unwrap();
    // Exactly at the bound: succeeds (exercises the end-of-frame probe).
    assert_eq!(
        open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, data.len()).unwrap(),
        data
    );
    assert_eq!(
        open(
            &key(),
            AAD,
            NONCE,
            Flags::Zstd,
            &sealed.bytes,
            data.len() + 12345
        )
        .unwrap(),
        data
    );
    assert_eq!(
        open(
            &key(),
            AAD,
            NONCE,
            Flags::Zstd,
            &sealed.bytes,
            data.len() - 1
        ),
        Err(SealError::TooLarge {
            limit: data.len() - 1
        })
    );
}

#[test]
fn lying_header_concatenated_frames() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // First frame honestly declares 1000 bytes; a second frame smuggles 100 MiB.
    let mut body = zstd::bulk::compress(&[5u8; 1000], 1).unwrap();
    body.extend(zstd::bulk::compress(&vec![0u8; 100 * MIB], 1).unwrap());
    let sealed = seal_encoded(&key(), AAD, NONCE, Flags::Zstd, body).unwrap();
    let (r, peak) = peak_growth(|| open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, MIB));
    assert!(matches!(r, Err(SealError::Corrupt { .. })), "{r:?}");
    assert!(peak < 2 * MIB, "peak heap growth {peak}");
}

#[test]
fn lying_header_declared_size_too_small() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Honest frame for 4 MiB, then patch its Frame_Content_Size to claim 256.
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i / 512) as u8).collect();
    let mut frame = zstd::bulk::compress(&data, 1).unwrap();
    let fhd = frame[4];
    let single_segment = (fhd >> 5) & 1 == 1;
    let dict_id_len = [0, 1, 2, 4][usize::from(fhd & 3)];
    assert_eq!(fhd >> 6, 2, "expected a 4-byte content size field");
    let at = 5 + usize::from(!single_segment) + dict_id_len;
    assert_eq!(frame[at..at + 4], (4 * MIB as u32).to_le_bytes());
    frame[at..at + 4].copy_from_slice(&256u32.to_le_bytes());
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&frame).unwrap(),
        Some(256)
    );
    let sealed = seal_encoded(&key(), AAD, NONCE, Flags::Zstd, frame).unwrap();
    for bound in [MIB, 8 * MIB] {
        let (r, peak) = peak_growth(|| open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, bound));
        assert!(
            matches!(
                r,
                Err(SealError::Corrupt { .. } | SealError::TooLarge { .. })
            ),
            "{r:?}"
        );
        assert!(
            peak < bound + bound / 2 + sealed.bytes.len() + 64 * 1024,
            "peak heap growth {peak}"
        );
    }
}

#[test]
fn truncated_or_garbage_frame_is_corrupt() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let data = vec![9u8; 4 * MIB];
    let mut frame = frame_without_size(&data, None);
    frame.truncate(frame.len() - 3);
    let sealed = seal_encoded(&key(), AAD, NONCE, Flags::Zstd, frame).unwrap();
    let r = open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, 8 * MIB);
    assert!(matches!(r, Err(SealError::Corrupt { .. })), "{r:?}");
    let sealed = seal_encoded(&key(), AAD, NONCE, Flags::Zstd, vec![0xAA; 100]).unwrap();
    let r = open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, 8 * MIB);
    assert!(matches!(r, Err(SealError::Corrupt { .. })), "{r:?}");
    let sealed = seal_encoded(&key(), AAD, NONCE, Flags::Zstd, Vec::new()).unwrap();
    let r = open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, 8 * MIB);
    assert!(matches!(r, Err(SealError::Corrupt { .. })), "{r:?}");
}

#[test]
fn oversized_window_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Window log 27 (128 MiB decoder window) with no declared size; the
    // bound of 1 MiB caps the window log at 20, so zstd refuses the frame
    // instead of allocating a 128 MiB window.
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
    let frame = frame_without_size(&data, Some(27));
    let sealed = seal_encoded(&key(), AAD, NONCE, Flags::Zstd, frame).unwrap();
    let r = open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, MIB);
    assert!(
        matches!(
            r,
            Err(SealError::Corrupt { .. } | SealError::TooLarge { .. })
        ),
        "{r:?}"
    );
    // With a large enough bound the same frame opens.
    assert_eq!(
        open(&key(), AAD, NONCE, Flags::Zstd, &sealed.bytes, 128 * MIB).unwrap(),
        data
    );
}

#[test]
fn reused_buffer_with_spare_capacity_still_bounded() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let zeros = vec![0u8; 8 * MIB];
    let sealed = seal_encoded(
        &key(),
        AAD,
        NONCE,
        Flags::Zstd,
        frame_without_size(&zeros, None),
    )
    .unwrap();
    let mut out = Vec::with_capacity(16 * MIB);
    let r = Sealer::new().open_into(
        &key(),
        AAD,
        NONCE,
        Flags::Zstd,
        &sealed.bytes,
        MIB,
        &mut out,
    );
    assert_eq!(r, Err(SealError::TooLarge { limit: MIB }));
    assert!(out.is_empty());
}
