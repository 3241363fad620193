//! Epoch descriptions (`.json`): what an epoch is a full resync of, and the
//! wrapped key its batches are sealed with.
//!
//! Encoding: pretty-printed JSON, the only object of the format that is not
//! binary.
//!
//! ```text
//! {
//!   "format_version": 1,
//!   "info": {
//!     "epoch": u64,
//!     "machine_id": string,
//!     "size_bytes": u64,
//!     "sector_size": u32,
//!     "wrapped_key_hex": lowercase hex string
//!   },
//!   "crc32c": u32
//! }
//! ```
//!
//! `crc32c` is the CRC32C of the compact JSON encoding of `info` (fields in
//! the order above), not of the bytes as stored, so the object stays
//! checkable whatever whitespace it is stored with.
//!
//! Invariants, checked by [`decode_epoch`]:
//!
//! * the object is at most 1 MiB (checked before parsing);
//! * `format_version` is one this build reads, the CRC matches, `info.epoch` equals
//!   the object's name, and `wrapped_key_hex` is valid hex.
//!
//! The writer stores an epoch's description before any pack of that epoch,
//! and GC deletes it last when it drops a whole epoch. The JSON keys are
//! on-store strings and do not change.

use super::FORMAT_VERSION;
use crate::error::Corruption;
use crate::types::EpochInfo;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct EpochBody {
    epoch: u64,
    machine_id: String,
    size_bytes: u64,
    sector_size: u32,
    wrapped_key_hex: String,
}

#[derive(Serialize, Deserialize)]
struct EpochDoc {
    format_version: u32,
    info: EpochBody,
    /// CRC32C of the compact JSON encoding of `info`.
    crc32c: u32,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// Encodes an epoch description as JSON.
pub fn encode_epoch(info: &EpochInfo) -> Vec<u8> {
    let body = EpochBody {
        epoch: info.epoch,
        machine_id: info.machine_id.clone(),
        size_bytes: info.size_bytes,
        sector_size: info.sector_size,
        wrapped_key_hex: hex(&info.wrapped_key),
    };
    let crc = crc32c::crc32c(&serde_json::to_vec(&body).expect("serialize"));
    let doc = EpochDoc {
        format_version: FORMAT_VERSION,
        info: body,
        crc32c: crc,
    };
    serde_json::to_vec_pretty(&doc).expect("serialize")
}

/// Decodes an epoch description.
pub fn decode_epoch(buf: &[u8], epoch: u64) -> Result<EpochInfo, Corruption> {
    if buf.len() > 1 << 20 {
        return Err(Corruption::Length {
            what: "epoch object size",
            value: buf.len() as u64,
            max: 1 << 20,
        });
    }
    let doc: EpochDoc = serde_json::from_slice(buf).map_err(Corruption::Json)?;
    super::check_version(doc.format_version)?;
    let computed = crc32c::crc32c(&serde_json::to_vec(&doc.info).expect("serialize"));
    if computed != doc.crc32c {
        return Err(Corruption::Checksum {
            what: "epoch info",
            stored: doc.crc32c,
            computed,
        });
    }
    if doc.info.epoch != epoch {
        return Err(Corruption::Mismatch {
            what: "object name (epoch)",
        });
    }
    Ok(EpochInfo {
        epoch: doc.info.epoch,
        machine_id: doc.info.machine_id,
        size_bytes: doc.info.size_bytes,
        sector_size: doc.info.sector_size,
        wrapped_key: unhex(&doc.info.wrapped_key_hex).ok_or(Corruption::Invalid {
            what: "wrapped_key_hex",
        })?,
    })
}
