//! JSON state files that carry their own checksum, so that damage is found instead of
//! acted on.
//!
//! A state file records facts nothing else can rebuild (an agent's epochs and pinned
//! escrow key, what a master target's device holds). A flipped bit can turn one into
//! another valid value (an epoch one lower, another hex digit of a key), which JSON parsing
//! alone never notices. [`to_checked_json`] writes the value's JSON object with one more
//! member, `"crc32c"`: the CRC32C of the compact JSON of the object without it.
//! [`from_checked_json`] recomputes it over the parsed object, refuses a mismatch, and
//! only then deserializes.
//!
//! # Invariants
//! - The checksum covers every member's name and value: a flip anywhere but in the
//!   checksum member's own name is a mismatch or invalid JSON. A flip in that name leaves
//!   the file without a checksum (read as [`Checksum::Absent`]) *and* with an unknown
//!   member: callers refuse unknown members (`#[serde(deny_unknown_fields)]`), so that case
//!   fails too.
//! - A file without the member is accepted as [`Checksum::Absent`] (files written before
//!   the checksum existed); the caller decides whether that is allowed and says so.
//! - The compact form is serde_json's, of the object as parsed: members keep their order,
//!   so what `to_checked_json` summed is what `from_checked_json` sums.
//!
//! CRC32C, not a cryptographic hash: this finds accidental damage (bad sectors, torn or
//! stray writes, a hand edit). Whoever can write the file on purpose can also read the
//! machine's private key next to it.

use serde::{Serialize, de::DeserializeOwned};

/// Name of the checksum member.
pub const CHECKSUM_MEMBER: &str = "crc32c";

/// Whether a file read by [`from_checked_json`] had a checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// Present and equal to the contents'.
    Verified,
    /// No checksum member (a file written by an older version).
    Absent,
}

/// Why a checked JSON file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CheckedJsonError {
    #[error("not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("its {CHECKSUM_MEMBER} member is not a 32-bit number")]
    BadChecksum,
    #[error("its checksum {stored:#010x} does not match its contents ({actual:#010x})")]
    Mismatch { stored: u32, actual: u32 },
    #[error("not a valid state: {0}")]
    Invalid(#[source] serde_json::Error),
}

fn crc_of(object: &serde_json::Map<String, serde_json::Value>) -> u32 {
    let compact = serde_json::to_vec(object).expect("a JSON map serializes");
    crc32c::crc32c(&compact)
}

/// `value` as pretty JSON with its checksum member. `value` must serialize to a JSON
/// object without a member named [`CHECKSUM_MEMBER`].
pub fn to_checked_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let serde_json::Value::Object(mut object) = serde_json::to_value(value)? else {
        return Err(serde::ser::Error::custom(
            "a checked JSON file holds an object",
        ));
    };
    if object.contains_key(CHECKSUM_MEMBER) {
        return Err(serde::ser::Error::custom(format!(
            "the object already has a {CHECKSUM_MEMBER} member"
        )));
    }
    let crc = crc_of(&object);
    object.insert(CHECKSUM_MEMBER.to_owned(), crc.into());
    serde_json::to_vec_pretty(&object)
}

/// Parses what [`to_checked_json`] wrote: checksum verified (or absent) first, then the
/// value deserialized.
pub fn from_checked_json<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, Checksum), CheckedJsonError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(CheckedJsonError::Json)?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(CheckedJsonError::NotAnObject);
    };
    let checksum = match object.remove(CHECKSUM_MEMBER) {
        None => Checksum::Absent,
        Some(stored) => {
            let stored = stored
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or(CheckedJsonError::BadChecksum)?;
            let actual = crc_of(&object);
            if stored != actual {
                return Err(CheckedJsonError::Mismatch { stored, actual });
            }
            Checksum::Verified
        }
    };
    let value = serde_json::from_value(serde_json::Value::Object(object))
        .map_err(CheckedJsonError::Invalid)?;
    Ok((value, checksum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct State {
        epoch: u64,
        key: String,
        disks: std::collections::BTreeMap<String, u64>,
    }

    fn state() -> State {
        State {
            epoch: 41,
            key: "ab".repeat(32),
            disks: [("/dev/sdb".to_owned(), 3), ("/dev/vdc".to_owned(), 9)].into(),
        }
    }

    #[test]
    fn round_trip_and_absent_checksum() {
        let bytes = to_checked_json(&state()).unwrap();
        assert_eq!(
            from_checked_json::<State>(&bytes).unwrap(),
            (state(), Checksum::Verified)
        );
        let plain = serde_json::to_vec(&state()).unwrap();
        assert_eq!(
            from_checked_json::<State>(&plain).unwrap(),
            (state(), Checksum::Absent)
        );
    }

    /// Every single-bit flip and every truncation is refused, or reads the same value.
    #[test]
    fn every_flip_and_truncation_is_refused_or_harmless() {
        let good = to_checked_json(&state()).unwrap();
        let mut refused = 0;
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                match from_checked_json::<State>(&bad) {
                    Err(_) => refused += 1,
                    Ok((s, _)) => assert_eq!(s, state(), "bit {bit} of byte {i}"),
                }
            }
        }
        for len in 0..good.len() - 1 {
            assert!(
                from_checked_json::<State>(&good[..len]).is_err(),
                "truncated to {len} bytes"
            );
        }
        assert!(refused > good.len() * 7, "only {refused} flips refused");
    }

    #[test]
    fn refuses_values_it_cannot_check() {
        assert!(to_checked_json(&5u32).is_err());
        assert!(matches!(
            from_checked_json::<State>(b"[1]"),
            Err(CheckedJsonError::NotAnObject)
        ));
        let mut v: serde_json::Value =
            serde_json::from_slice(&to_checked_json(&state()).unwrap()).unwrap();
        v[CHECKSUM_MEMBER] = "x".into();
        assert!(matches!(
            from_checked_json::<State>(&serde_json::to_vec(&v).unwrap()),
            Err(CheckedJsonError::BadChecksum)
        ));
    }
}
