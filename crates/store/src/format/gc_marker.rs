//! GC markers (`.doomed`): packs pending deletion, with when each was first
//! found unreferenced.
//!
//! Byte layout (little-endian, inside the metadata frame of
//! [`primitives`](super::primitives)):
//!
//! ```text
//! "RCDOOM01" | version u32
//! | n u32 | n × (pack name: len u16, UTF-8 | first_seen_ns u64)
//! | crc32c u32
//! ```
//!
//! `first_seen_ns` is unix time in nanoseconds. A marker carries no disk id:
//! it lives under its disk's `gc/` prefix and names packs by their full
//! object name.
//!
//! Invariants:
//!
//! * checked by [`decode_pending_delete`]: at most `1 << 24` entries, each
//!   name at most [`MAX_NAME`](super::MAX_NAME) bytes of UTF-8, nothing
//!   after the entries;
//! * kept by GC (see [`crate::gc`]): each run reads every marker, writes one
//!   new marker with the packs still pending (keeping the earliest time each
//!   was seen), then deletes the markers it read; a pack is deleted only once
//!   it has been unreferenced for the grace period and is itself older than
//!   it.
//!
//! The magic `RCDOOM01` and the `.doomed` suffix are on-store strings and do
//! not change.

use super::primitives::{frame, unframe};
use crate::error::Corruption;

const PENDING_DELETE_MAGIC: &[u8; 8] = b"RCDOOM01";

/// Encodes a GC marker: packs found unreferenced and when first seen (unix ns).
pub fn encode_pending_delete(entries: &[(String, u64)]) -> Vec<u8> {
    let mut e = frame(PENDING_DELETE_MAGIC);
    e.u32(entries.len() as u32);
    for (n, t) in entries {
        e.name(n);
        e.u64(*t);
    }
    e.crc();
    e.0
}

/// Decodes a GC marker.
pub fn decode_pending_delete(buf: &[u8]) -> Result<Vec<(String, u64)>, Corruption> {
    let mut d = unframe(buf, PENDING_DELETE_MAGIC, "GC marker")?;
    let n = d.count("marker entry count", 10, 1 << 24)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let name = d.name()?;
        v.push((name, d.u64("first seen")?));
    }
    d.finish()?;
    Ok(v)
}
