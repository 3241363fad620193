//! The framing of the store's JSON objects (epoch descriptions, key rotations):
//!
//! ```text
//! { "format_version": u32, "info": { ... }, "crc32c": u32, ...fields outside the CRC }
//! ```
//!
//! `crc32c` is the CRC32C of the compact JSON encoding of `info` (its fields in
//! declaration order), not of the bytes as stored, so an object stays checkable whatever
//! whitespace it is stored with. Fields after `crc32c` (the epoch's `device`) are not
//! covered: they are for people only.
//!
//! Invariants, checked by [`decode`] in this order: the object is at most its kind's
//! bound (before parsing), it parses, its `format_version` is one this build reads, and
//! the CRC matches. What `info` must say (its name, its fields) is the caller's to check.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::FORMAT_VERSION;
use crate::error::Corruption;

/// One kind of checked JSON object: its size bound and the names errors give it.
pub(super) struct Kind {
    /// Largest object read.
    pub max_len: usize,
    /// Names the size in a [`Corruption::Length`].
    pub size: &'static str,
    /// Names `info` in a [`Corruption::Checksum`].
    pub checksum: &'static str,
}

/// Fields outside the CRC: none.
#[derive(Default, Serialize, Deserialize)]
pub(super) struct NoExtra {}

#[derive(Serialize, Deserialize)]
struct Doc<T, X> {
    format_version: u32,
    info: T,
    crc32c: u32,
    #[serde(flatten)]
    extra: X,
}

fn crc(info: &impl Serialize) -> u32 {
    crc32c::crc32c(&serde_json::to_vec(info).expect("serialize"))
}

/// Pretty-printed JSON of `info` with its CRC, then `extra`'s fields.
pub(super) fn encode<T: Serialize, X: Serialize>(info: T, extra: X) -> Vec<u8> {
    let doc = Doc {
        format_version: FORMAT_VERSION,
        crc32c: crc(&info),
        info,
        extra,
    };
    serde_json::to_vec_pretty(&doc).expect("serialize")
}

/// `info` and the extra fields of an object of `kind`, checked as the module doc says.
pub(super) fn decode<T, X>(buf: &[u8], kind: &Kind) -> Result<(T, X), Corruption>
where
    T: Serialize + DeserializeOwned,
    X: DeserializeOwned,
{
    if buf.len() > kind.max_len {
        return Err(Corruption::Length {
            what: kind.size,
            value: buf.len() as u64,
            max: kind.max_len as u64,
        });
    }
    let doc: Doc<T, X> = serde_json::from_slice(buf).map_err(Corruption::Json)?;
    super::check_version(doc.format_version)?;
    let computed = crc(&doc.info);
    if computed != doc.crc32c {
        return Err(Corruption::Checksum {
            what: kind.checksum,
            stored: doc.crc32c,
            computed,
        });
    }
    Ok((doc.info, doc.extra))
}

/// Lowercase hex of `b`.
pub(super) fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

/// The bytes of hex text (either case); `None` if it is not hex.
pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s).ok()
}
