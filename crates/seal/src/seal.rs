//! Payload sealing: zstd compression (when it pays) + AES-256-GCM.
//!
//! A sealed payload is `body_ciphertext || tag[16]`, plus a one-byte
//! [`Flags`] value the caller stores next to it. The body is either the
//! plaintext ([`Flags::Stored`]) or one zstd frame of it ([`Flags::Zstd`]).
//!
//! The AES-GCM associated data is `[FORMAT_VERSION, flags] || caller_aad`,
//! so the flags byte is authenticated too: flipping it is [`SealError::Tampered`].
//!
//! Opening authenticates before anything else touches the body, then
//! decompresses with a hard output bound (`max_plaintext_len`): the output
//! buffer grows in steps and never past the bound, and the zstd window is
//! capped to the bound's size class, so a decompression bomb or a frame
//! header that lies about its size yields an error, not a big allocation.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use thiserror::Error;
use zstd::zstd_safe::{
    self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective,
};

use crate::keys::DataKey;

/// AES-GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length in bytes (appended to every sealed body).
pub const TAG_LEN: usize = 16;
/// Default zstd level: fast. Negative levels are faster still.
pub const DEFAULT_LEVEL: i32 = 1;
/// Compression is kept only if it saves at least `len >> MIN_SAVING_SHIFT`
/// bytes (1/32); otherwise the payload is stored, so incompressible data
/// costs no decompression on the read side.
pub const MIN_SAVING_SHIFT: u32 = 5;
/// Version byte mixed into the associated data.
const FORMAT_VERSION: u8 = 1;
/// First growth step of the decompression output buffer when the frame
/// does not declare its size.
const GROW_STEP: usize = 64 * 1024;

/// Errors from sealing and opening payloads.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// Authentication failed: wrong key, wrong AAD or nonce, wrong flags,
    /// or modified/truncated bytes. Nothing was decrypted; discard the payload.
    #[error(
        "payload failed authentication (wrong key/AAD/nonce/flags, or modified bytes); discard it"
    )]
    Tampered,
    /// The plaintext would exceed the caller's `max_plaintext_len`.
    #[error("payload plaintext exceeds the bound of {limit} bytes; reject it (or check the bound)")]
    TooLarge {
        /// The bound that was exceeded.
        limit: usize,
    },
    /// The payload authenticated but its zstd body is invalid: the sealer
    /// produced a bad payload. Re-request the batch from its source.
    #[error("authenticated payload failed to decompress ({reason}); re-request it from the source")]
    Corrupt {
        /// zstd's error name, or what was wrong with the frame.
        reason: &'static str,
    },
    /// The flags byte is not one this version understands.
    #[error("unknown payload flags {0:#04x}; written by a newer ripcord-seal? upgrade")]
    UnknownFlags(u8),
    /// The zstd level is outside zstd's supported range.
    #[error("zstd level {level} out of range {min}..={max}")]
    InvalidLevel {
        /// Requested level.
        level: i32,
        /// Lowest level supported.
        min: i32,
        /// Highest level supported.
        max: i32,
    },
    /// The input is longer than AES-GCM allows in one message (~64 GiB).
    #[error("input of {len} bytes exceeds the AES-GCM message limit; split the batch")]
    InputTooLarge {
        /// Input length.
        len: usize,
    },
    /// zstd failed while compressing (in practice: out of memory).
    #[error("zstd compression failed ({reason}); likely out of memory, retry with a smaller batch")]
    Compress {
        /// zstd's error name.
        reason: &'static str,
    },
}

/// How the sealed body is encoded. Store it next to the sealed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Flags {
    /// Body is the plaintext itself.
    Stored = 0,
    /// Body is a single zstd frame of the plaintext.
    Zstd = 1,
}

impl Flags {
    /// Wire value.
    pub fn to_byte(self) -> u8 {
        self as u8
    }

    /// Parses a wire value.
    pub fn from_byte(byte: u8) -> Result<Self, SealError> {
        match byte {
            0 => Ok(Flags::Stored),
            1 => Ok(Flags::Zstd),
            other => Err(SealError::UnknownFlags(other)),
        }
    }
}

/// A sealed payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// Body encoding; authenticated, must be passed back to [`open`].
    pub flags: Flags,
    /// Ciphertext followed by the 16-byte tag.
    pub bytes: Vec<u8>,
}

/// Reusable sealing state: zstd contexts and scratch buffers.
///
/// Use one per worker thread on the hot path; [`seal`] and [`open`] create
/// a temporary one per call.
pub struct Sealer {
    cctx: CCtx<'static>,
    dctx: DCtx<'static>,
    /// Decrypted-but-compressed body on the open path.
    scratch: Vec<u8>,
    /// `[version, flags] || caller aad`.
    aad: Vec<u8>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("scratch_capacity", &self.scratch.capacity())
            .finish_non_exhaustive()
    }
}

impl Default for Sealer {
    fn default() -> Self {
        Self::new()
    }
}

impl Sealer {
    /// Creates the zstd contexts. Panics only if memory allocation fails.
    pub fn new() -> Self {
        Sealer {
            cctx: CCtx::create(),
            dctx: DCtx::create(),
            scratch: Vec::new(),
            aad: Vec::new(),
        }
    }

    /// Seals `plaintext` into `out` (cleared first; its allocation is reused)
    /// and returns the flags to store with it.
    ///
    /// Compresses with zstd at `level` (see [`DEFAULT_LEVEL`]; 0 means zstd's
    /// default, negative levels are faster); if that saves less than 1/32
    /// of the input the plaintext is stored instead. The caller must never
    /// reuse `nonce` with the same key.
    pub fn seal_into(
        &mut self,
        key: &DataKey,
        aad: &[u8],
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
        level: i32,
        out: &mut Vec<u8>,
    ) -> Result<Flags, SealError> {
        let (min, max) = (zstd_safe::min_c_level(), zstd_safe::max_c_level());
        if !(min..=max).contains(&level) {
            return Err(SealError::InvalidLevel { level, min, max });
        }
        out.clear();
        let flags = if plaintext.is_empty() {
            Flags::Stored
        } else {
            out.reserve(zstd_safe::compress_bound(plaintext.len()) + TAG_LEN);
            self.cctx
                .set_parameter(CParameter::CompressionLevel(level))
                .and_then(|_| self.cctx.set_parameter(CParameter::ChecksumFlag(false)))
                .and_then(|_| self.cctx.set_parameter(CParameter::ContentSizeFlag(true)))
                .map_err(|code| SealError::Compress {
                    reason: zstd_safe::get_error_name(code),
                })?;
            let clen = self
                .cctx
                .compress2(out, plaintext)
                .map_err(|code| SealError::Compress {
                    reason: zstd_safe::get_error_name(code),
                })?;
            let threshold = plaintext.len() - (plaintext.len() >> MIN_SAVING_SHIFT);
            if clen < threshold {
                Flags::Zstd
            } else {
                out.clear();
                out.extend_from_slice(plaintext);
                Flags::Stored
            }
        };
        encrypt_in_place(key, nonce, flags, aad, &mut self.aad, out)?;
        Ok(flags)
    }

    /// Authenticates and decrypts `sealed`, then (for [`Flags::Zstd`])
    /// decompresses it into `out` (cleared first; its allocation is reused).
    ///
    /// `max_plaintext_len` is a hard bound: a plaintext longer than it is
    /// [`SealError::TooLarge`], and this call never grows `out` (or its
    /// internal buffers, beyond the sealed size) past it. On any error `out`
    /// is left empty. A stored payload whose length alone exceeds the bound
    /// is rejected before decryption, which reveals nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn open_into(
        &mut self,
        key: &DataKey,
        aad: &[u8],
        nonce: [u8; NONCE_LEN],
        flags: Flags,
        sealed: &[u8],
        max_plaintext_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        out.clear();
        let Some(body_len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(SealError::Tampered);
        };
        let ciphertext = &sealed[..body_len];
        build_aad(&mut self.aad, flags, aad);
        let cipher = ring_key(key);
        // ring authenticates before it decrypts, over `ciphertext || tag` in place.
        let open = |buf: &mut Vec<u8>, aad: &[u8]| -> Result<(), SealError> {
            let n = Nonce::assume_unique_for_key(nonce);
            match cipher.open_in_place(n, Aad::from(aad), buf.as_mut_slice()) {
                Ok(_) => {
                    buf.truncate(body_len);
                    Ok(())
                }
                Err(_) => {
                    buf.clear();
                    Err(SealError::Tampered)
                }
            }
        };
        match flags {
            Flags::Stored => {
                if body_len > max_plaintext_len {
                    return Err(SealError::TooLarge {
                        limit: max_plaintext_len,
                    });
                }
                out.extend_from_slice(sealed);
                open(out, &self.aad)
            }
            Flags::Zstd => {
                let _ = ciphertext;
                self.scratch.clear();
                self.scratch.extend_from_slice(sealed);
                let mut scratch = std::mem::take(&mut self.scratch);
                let opened = open(&mut scratch, &self.aad);
                self.scratch = scratch;
                opened?;
                let result =
                    decompress_bounded(&mut self.dctx, &self.scratch, max_plaintext_len, out);
                self.scratch.clear();
                if result.is_err() {
                    out.clear();
                }
                result
            }
        }
    }
}

/// The AES-256-GCM key for payloads. ring, not aes-gcm, on the hot path: one fused pass
/// (2.8x faster sealing here; see README.md).
fn ring_key(key: &DataKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose_bytes()).expect("32-byte key"))
}

/// Writes the full associated data, `[FORMAT_VERSION, flags] || aad`, into `buf`.
fn build_aad(buf: &mut Vec<u8>, flags: Flags, aad: &[u8]) {
    buf.clear();
    buf.extend_from_slice(&[FORMAT_VERSION, flags.to_byte()]);
    buf.extend_from_slice(aad);
}

/// Encrypts `buf` in place and appends the tag.
fn encrypt_in_place(
    key: &DataKey,
    nonce: [u8; NONCE_LEN],
    flags: Flags,
    aad: &[u8],
    aad_buf: &mut Vec<u8>,
    buf: &mut Vec<u8>,
) -> Result<(), SealError> {
    build_aad(aad_buf, flags, aad);
    let tag = ring_key(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad_buf[..]),
            buf.as_mut_slice(),
        )
        .map_err(|_| SealError::InputTooLarge { len: buf.len() })?;
    buf.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Smallest zstd window log that covers `max` bytes, clamped to zstd's
/// accepted range for `ZSTD_d_windowLogMax` (10..=31).
fn window_log_for(max: usize) -> u32 {
    let bits = usize::BITS - max.saturating_sub(1).leading_zeros();
    bits.clamp(10, 31)
}

fn corrupt(code: usize) -> SealError {
    SealError::Corrupt {
        reason: zstd_safe::get_error_name(code),
    }
}

/// Decompresses exactly one zstd frame from `src` into `out`, never letting
/// `out` grow past `max` bytes of length or capacity.
fn decompress_bounded(
    dctx: &mut DCtx<'static>,
    src: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(), SealError> {
    let too_large = SealError::TooLarge { limit: max };
    // Cheap early rejection when the frame declares its size. The header
    // may lie; the loop below enforces the bound regardless.
    let declared = match zstd_safe::get_frame_content_size(src) {
        Ok(Some(n)) if n > max as u64 => return Err(too_large),
        Ok(Some(n)) => Some(n as usize),
        Ok(None) => None,
        Err(_) => {
            return Err(SealError::Corrupt {
                reason: "not a zstd frame",
            });
        }
    };
    dctx.reset(ResetDirective::SessionAndParameters)
        .map_err(corrupt)?;
    // Caps the decoder's window allocation at the bound's size class
    // (our compressor never uses a window wider than the input).
    dctx.set_parameter(DParameter::WindowLogMax(window_log_for(max)))
        .map_err(corrupt)?;

    let first = declared
        .unwrap_or(GROW_STEP.max(src.len().saturating_mul(2)))
        .min(max);
    if out.capacity() < first {
        out.reserve_exact(first);
    }
    let mut input = InBuffer::around(src);
    loop {
        if out.len() >= max {
            return probe_end(dctx, &mut input, src.len(), max);
        }
        if out.len() == out.capacity() {
            // Double, but never past the bound.
            let target = out.capacity().saturating_mul(2).clamp(GROW_STEP, max);
            out.reserve_exact(target - out.len());
        }
        let (in_before, out_before) = (input.pos(), out.len());
        let hint = {
            let pos = out.len();
            let mut output = OutBuffer::around_pos(out, pos);
            dctx.decompress_stream(&mut output, &mut input)
                .map_err(corrupt)?
        };
        if out.len() > max {
            // Only possible when the caller passed a buffer with spare capacity.
            return Err(too_large);
        }
        if hint == 0 {
            return if input.pos() == src.len() {
                Ok(())
            } else {
                Err(SealError::Corrupt {
                    reason: "trailing data after zstd frame",
                })
            };
        }
        let no_progress = input.pos() == in_before && out.len() == out_before;
        if no_progress && out.len() < out.capacity() {
            return Err(SealError::Corrupt {
                reason: "truncated zstd frame",
            });
        }
    }
}

/// `out` is at the bound: the frame must end without producing one more byte.
fn probe_end(
    dctx: &mut DCtx<'static>,
    input: &mut InBuffer<'_>,
    src_len: usize,
    max: usize,
) -> Result<(), SealError> {
    let mut byte = [0u8; 1];
    loop {
        let in_before = input.pos();
        let mut output = OutBuffer::around(&mut byte[..]);
        let hint = dctx
            .decompress_stream(&mut output, input)
            .map_err(corrupt)?;
        if output.pos() > 0 {
            return Err(SealError::TooLarge { limit: max });
        }
        if hint == 0 {
            return if input.pos() == src_len {
                Ok(())
            } else {
                Err(SealError::Corrupt {
                    reason: "trailing data after zstd frame",
                })
            };
        }
        if input.pos() == in_before {
            return Err(SealError::Corrupt {
                reason: "truncated zstd frame",
            });
        }
    }
}

/// Seals `plaintext`: compress with zstd at `level` if it saves at least
/// 1/32, then AES-256-GCM with `nonce` and `aad`.
///
/// The caller guarantees `nonce` is never reused with `key` (ripcord derives
/// it from epoch and sequence). Allocates fresh zstd contexts; use
/// [`Sealer::seal_into`] on the hot path.
pub fn seal(
    key: &DataKey,
    aad: &[u8],
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    level: i32,
) -> Result<Sealed, SealError> {
    let mut bytes = Vec::new();
    let flags = Sealer::new().seal_into(key, aad, nonce, plaintext, level, &mut bytes)?;
    Ok(Sealed { flags, bytes })
}

/// Seals a body that is already in `flags`' encoding (for example a zstd
/// frame produced by a streaming compressor elsewhere). [`open`] enforces the
/// plaintext bound on such bodies exactly as on [`seal`]'s.
pub fn seal_encoded(
    key: &DataKey,
    aad: &[u8],
    nonce: [u8; NONCE_LEN],
    flags: Flags,
    body: Vec<u8>,
) -> Result<Sealed, SealError> {
    let mut bytes = body;
    encrypt_in_place(key, nonce, flags, aad, &mut Vec::new(), &mut bytes)?;
    Ok(Sealed { flags, bytes })
}

/// Authenticates, decrypts and (if needed) decompresses a sealed payload.
///
/// Returns [`SealError::Tampered`] on any authentication failure and
/// [`SealError::TooLarge`] if the plaintext would exceed
/// `max_plaintext_len` (e.g. the batch's extent total). Allocates fresh zstd
/// contexts; use [`Sealer::open_into`] on the hot path.
pub fn open(
    key: &DataKey,
    aad: &[u8],
    nonce: [u8; NONCE_LEN],
    flags: Flags,
    sealed: &[u8],
    max_plaintext_len: usize,
) -> Result<Vec<u8>, SealError> {
    let mut out = Vec::new();
    Sealer::new().open_into(key, aad, nonce, flags, sealed, max_plaintext_len, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_log() {
        assert_eq!(window_log_for(0), 10);
        assert_eq!(window_log_for(1024), 10);
        assert_eq!(window_log_for(1 << 20), 20);
        assert_eq!(window_log_for((1 << 20) + 1), 21);
        assert_eq!(window_log_for(usize::MAX), 31);
    }

    #[test]
    fn flags_bytes() {
        assert_eq!(Flags::from_byte(0), Ok(Flags::Stored));
        assert_eq!(Flags::from_byte(1), Ok(Flags::Zstd));
        assert_eq!(Flags::from_byte(2), Err(SealError::UnknownFlags(2)));
        assert_eq!(Flags::Zstd.to_byte(), 1);
    }
}
