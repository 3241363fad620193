//! Epoch descriptions (`.json`): what an epoch is a full resync of, and the
//! wrapped key its batches are sealed with.
//!
//! Encoding: pretty-printed JSON in the store's checked framing
//! (`super::checked_json`):
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
//!   "crc32c": u32,
//!   "device": string (optional)
//! }
//! ```
//!
//! `device` (added after format 3, without a version change) is the device path the
//! machine said it protects the disk as: the agent's unauthenticated claim, shown to
//! people only. It stands outside `info` and its checksum so that builds from before it
//! (which ignore unknown keys) still read these objects, and objects without it still
//! decode (`None`). A value that is not 1..=255 bytes without control characters is
//! read as `None`: a name for people never makes an epoch unreadable.
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

use super::checked_json::{self, Kind, hex, unhex};
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

/// Outside `info` and its CRC (see the module doc).
#[derive(Serialize, Deserialize)]
struct EpochExtra {
    /// The agent's name for the disk's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
}

const EPOCH: Kind = Kind {
    max_len: 1 << 20,
    size: "epoch object size",
    checksum: "epoch info",
};

/// Longest device name kept (the wire's bound).
const MAX_DEVICE_LEN: usize = 255;

fn printable(device: String) -> Option<String> {
    let ok = !device.is_empty()
        && device.len() <= MAX_DEVICE_LEN
        && !device.chars().any(char::is_control);
    ok.then_some(device)
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
    checked_json::encode(
        body,
        EpochExtra {
            device: info.device.clone().and_then(printable),
        },
    )
}

/// Decodes an epoch description.
pub fn decode_epoch(buf: &[u8], epoch: u64) -> Result<EpochInfo, Corruption> {
    let (info, extra): (EpochBody, EpochExtra) = checked_json::decode(buf, &EPOCH)?;
    if info.epoch != epoch {
        return Err(Corruption::Mismatch {
            what: "object name (epoch)",
        });
    }
    Ok(EpochInfo {
        epoch: info.epoch,
        machine_id: info.machine_id,
        size_bytes: info.size_bytes,
        sector_size: info.sector_size,
        wrapped_key: unhex(&info.wrapped_key_hex).ok_or(Corruption::Invalid {
            what: "wrapped_key_hex",
        })?,
        device: extra.device.and_then(printable),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(device: Option<&str>) -> EpochInfo {
        EpochInfo {
            epoch: 4,
            machine_id: "host1".into(),
            size_bytes: 1 << 30,
            sector_size: 512,
            wrapped_key: vec![9; 4],
            device: device.map(str::to_owned),
        }
    }

    #[test]
    fn device_round_trips_and_old_objects_still_decode() {
        let named = info(Some("/dev/sdb"));
        assert_eq!(decode_epoch(&encode_epoch(&named), 4).unwrap(), named);
        // An object written before device names: the same bytes as this build writes
        // for an unnamed epoch, with no `device` key at all.
        let unnamed = encode_epoch(&info(None));
        let text = String::from_utf8(unnamed.clone()).unwrap();
        assert!(!text.contains("device"), "{text}");
        assert_eq!(decode_epoch(&unnamed, 4).unwrap(), info(None));
        // A build from before names reads the named object: `info` and its checksum
        // are what they were.
        let doc: serde_json::Value = serde_json::from_slice(&encode_epoch(&named)).unwrap();
        let old: serde_json::Value = serde_json::from_slice(&unnamed).unwrap();
        assert_eq!(
            (&doc["info"], &doc["crc32c"]),
            (&old["info"], &old["crc32c"])
        );
    }

    #[test]
    fn unprintable_device_names_are_dropped_not_fatal() {
        for bad in ["", "a\nb", "\u{1b}[2J"] {
            let mut doc: serde_json::Value =
                serde_json::from_slice(&encode_epoch(&info(None))).unwrap();
            doc["device"] = bad.into();
            let bytes = serde_json::to_vec(&doc).unwrap();
            assert_eq!(decode_epoch(&bytes, 4).unwrap().device, None, "{bad:?}");
        }
        assert_eq!(
            encode_epoch(&info(Some(&"x".repeat(256)))),
            encode_epoch(&info(None))
        );
    }
}
