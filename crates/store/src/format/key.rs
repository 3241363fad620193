//! Key rotations (`.json`): a newer data key for an epoch, from a sequence on.
//!
//! An agent that restarts continues its epoch (no full resync) under a fresh data key:
//! a new process can never reuse the old one, since the batches it lost in a crash were
//! sealed under nonces it would issue again (decision 0025). Batches of the epoch with
//! `seq >= from_seq` (up to the next rotation) are sealed with this object's key; those
//! before the first rotation with the epoch description's.
//!
//! Encoding: pretty-printed JSON in the store's checked framing
//! (`super::checked_json`), like the epoch description.
//!
//! ```text
//! {
//!   "format_version": 3,
//!   "info": { "epoch": u64, "from_seq": u64, "wrapped_key_hex": lowercase hex },
//!   "crc32c": u32
//! }
//! ```
//!
//! Invariants, checked by [`decode_key_rotation`]:
//!
//! * the object is at most 64 KiB (checked before parsing);
//! * `format_version` is one this build reads, the CRC matches, `info.epoch` and
//!   `info.from_seq` equal the object's name, `from_seq >= 1`, and `wrapped_key_hex` is
//!   valid, non-empty hex.
//!
//! The writer stores a rotation before any pack holding a batch sealed with its key, and
//! GC deletes it with its epoch. Like the epoch description, it carries only a CRC: the
//! wrapped key is no more trusted than the epoch's (see `ripcord_restore::authentic`).

use super::checked_json::{self, Kind, NoExtra, hex, unhex};
use crate::error::Corruption;
use crate::types::KeyRotation;
use serde::{Deserialize, Serialize};

/// Largest key rotation object read.
const MAX_LEN: usize = 64 << 10;

const KEY_ROTATION: Kind = Kind {
    max_len: MAX_LEN,
    size: "key rotation object size",
    checksum: "key rotation",
};

#[derive(Serialize, Deserialize)]
struct KeyBody {
    epoch: u64,
    from_seq: u64,
    wrapped_key_hex: String,
}

/// Encodes a key rotation as JSON.
pub fn encode_key_rotation(k: &KeyRotation) -> Vec<u8> {
    let body = KeyBody {
        epoch: k.epoch,
        from_seq: k.from_seq,
        wrapped_key_hex: hex(&k.wrapped_key),
    };
    checked_json::encode(body, NoExtra {})
}

/// Decodes a key rotation named `(epoch, from_seq)`.
pub fn decode_key_rotation(
    buf: &[u8],
    epoch: u64,
    from_seq: u64,
) -> Result<KeyRotation, Corruption> {
    let (info, NoExtra {}): (KeyBody, NoExtra) = checked_json::decode(buf, &KEY_ROTATION)?;
    if (info.epoch, info.from_seq) != (epoch, from_seq) || from_seq == 0 {
        return Err(Corruption::Mismatch {
            what: "object name (epoch, from_seq)",
        });
    }
    let wrapped_key = unhex(&info.wrapped_key_hex)
        .filter(|k| !k.is_empty())
        .ok_or(Corruption::Invalid {
            what: "wrapped_key_hex",
        })?;
    Ok(KeyRotation {
        epoch,
        from_seq,
        wrapped_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation() -> KeyRotation {
        KeyRotation {
            epoch: 3,
            from_seq: 118,
            wrapped_key: vec![7; 80],
        }
    }

    #[test]
    fn round_trips_and_refuses_what_does_not_match_its_name() {
        let bytes = encode_key_rotation(&rotation());
        assert_eq!(decode_key_rotation(&bytes, 3, 118).unwrap(), rotation());
        for (e, s) in [(4, 118), (3, 117)] {
            assert!(matches!(
                decode_key_rotation(&bytes, e, s),
                Err(Corruption::Mismatch { .. })
            ));
        }
        let mut flipped = bytes.clone();
        let at = flipped.iter().position(|&b| b == b'7').unwrap();
        flipped[at] = b'8';
        assert!(matches!(
            decode_key_rotation(&flipped, 3, 118),
            Err(Corruption::Checksum { .. })
        ));
        assert!(matches!(
            decode_key_rotation(&vec![b' '; MAX_LEN + 1], 3, 118),
            Err(Corruption::Length { .. })
        ));
        let empty = encode_key_rotation(&KeyRotation {
            wrapped_key: Vec::new(),
            ..rotation()
        });
        assert!(matches!(
            decode_key_rotation(&empty, 3, 118),
            Err(Corruption::Invalid { .. })
        ));
    }
}
