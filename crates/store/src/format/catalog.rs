//! The catalog of committed recovery points: segments (`.cat`, format 3), and the
//! one-point entries (`.cut`) of format 2 that readers still accept.
//!
//! ## Segments (`.cat`)
//!
//! Every cut one flush commits, or every cut of the segments a compaction merges, in
//! one object. Byte layout (little-endian, inside the metadata frame of
//! [`primitives`](super::primitives)):
//!
//! ```text
//! "RCCAT001" | version u32 (>= 3)
//! | disk[16] | epoch u64 | level u8 | n u32
//! | n × (cut_id u64 | seq u64 | time_ns u64 | mono_ns u64 | kind u8 | mac[32]
//!        | committed_ns u64)                         (CATALOG_ENTRY_LEN = 73 bytes)
//! | crc32c u32
//! ```
//!
//! The agent's fields (`cut_id` .. `mac`) are those of a `.cut` below, verbatim.
//! `committed_ns` is the writer's (server's) wall clock when the flush that committed
//! the cut began, unix nanoseconds: retention compares it, never the agent's `time_ns`.
//!
//! Invariants, checked by [`decode_catalog`]: the disk id is the reader's; the epoch
//! and level equal the name's; `1 <= n <= MAX_CATALOG_ENTRIES` and `n` entries fit in
//! the bytes that remain (checked before allocating); cut ids strictly increase, the
//! first and last equal the name's; every kind is known; nothing follows the entries.
//!
//! ## Legacy entries (`.cut`, format 2)
//!
//! ```text
//! "RCCUT001" | version u32
//! | disk[16] | epoch u64 | cut_id u64 | seq u64 | time_ns u64 | mono_ns u64 | kind u8
//! | mac[32]
//! | crc32c u32
//! ```
//!
//! `kind` is `0` for a crash-consistent cut ([`CutKind::Crash`]) and `1`
//! for an application-consistent one ([`CutKind::App`]). `mac` is the agent's
//! MAC over the cut ([`CutInfo::mac`]), stored verbatim: the CRC only catches
//! accidents, so someone who can write the bucket can rewrite every other
//! field and the CRC, but not the MAC. Readers that hold the disk's data key
//! check it before using the point (`ripcord failover`, `ripcord verify`).
//!
//! Invariants:
//!
//! * checked by [`decode_cut`]: the disk id is the reader's, `(epoch,
//!   cut_id)` equals the object's name, the kind is known, and nothing
//!   follows the fields;
//! * kept by the writer (of either format): an entry is written only once every
//!   batch of its epoch with `seq <=` the cut's `seq` is indexed, and cuts are
//!   committed in id order with non-decreasing seqs. An entry that exists is
//!   therefore a complete, resolvable point (until retention deletes it).
//!
//! This build writes no `.cut` ([`encode_cut`] stays for tests and tools); a reader
//! takes a `.cut` as a one-entry level-0 segment whose `committed_ns` is its `time_ns`
//! (format 2 recorded no server time).

use super::names::CatName;
use super::primitives::{Dec, Enc, frame, unframe};
use crate::error::Corruption;
use crate::types::{CutInfo, CutKind, DiskId, POINT_MAC_LEN};

const CUT_MAGIC: &[u8; 8] = b"RCCUT001";
const CAT_MAGIC: &[u8; 8] = b"RCCAT001";

/// Encoded size of one segment entry.
pub const CATALOG_ENTRY_LEN: u64 = 8 * 4 + 1 + POINT_MAC_LEN as u64 + 8;

/// Most entries one catalog segment may hold.
pub const MAX_CATALOG_ENTRIES: u64 = 1 << 24;

/// One committed recovery point in a catalog segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CatalogEntry {
    /// The agent's cut, verbatim (with its MAC).
    pub cut: CutInfo,
    /// The writer's wall clock at the flush that committed it (unix ns): the clock
    /// retention uses.
    pub committed_ns: u64,
}

fn put_cut(e: &mut Enc, c: &CutInfo) {
    e.u64(c.cut_id);
    e.u64(c.seq);
    e.u64(c.time_ns);
    e.u64(c.mono_ns);
    e.u8(match c.kind {
        CutKind::Crash => 0,
        CutKind::App => 1,
    });
    e.bytes(&c.mac);
}

fn get_cut(d: &mut Dec<'_>, epoch: u64) -> Result<CutInfo, Corruption> {
    Ok(CutInfo {
        epoch,
        cut_id: d.u64("cut id")?,
        seq: d.u64("seq")?,
        time_ns: d.u64("time")?,
        mono_ns: d.u64("mono time")?,
        kind: match d.u8("kind")? {
            0 => CutKind::Crash,
            1 => CutKind::App,
            _ => return Err(Corruption::Invalid { what: "cut kind" }),
        },
        mac: d
            .take(POINT_MAC_LEN as u64, "point MAC")?
            .try_into()
            .expect("took exactly the MAC length"),
    })
}

/// Encodes a catalog segment. `entries` must be non-empty, of `epoch`, sorted by
/// strictly increasing cut id (the writer and compaction guarantee it).
pub fn encode_catalog(disk: &DiskId, epoch: u64, level: u8, entries: &[CatalogEntry]) -> Vec<u8> {
    debug_assert!(!entries.is_empty());
    debug_assert!(
        entries
            .windows(2)
            .all(|w| w[0].cut.cut_id < w[1].cut.cut_id)
    );
    debug_assert!(entries.iter().all(|x| x.cut.epoch == epoch));
    let mut e = frame(CAT_MAGIC);
    e.0.reserve(entries.len() * CATALOG_ENTRY_LEN as usize + 48);
    e.bytes(&disk.0);
    e.u64(epoch);
    e.u8(level);
    e.u32(entries.len() as u32);
    for x in entries {
        put_cut(&mut e, &x.cut);
        e.u64(x.committed_ns);
    }
    e.crc();
    e.0
}

/// Decodes a catalog segment and checks it against its parsed name.
pub fn decode_catalog(
    buf: &[u8],
    disk: &DiskId,
    name: &CatName,
) -> Result<Vec<CatalogEntry>, Corruption> {
    let mut d = unframe(buf, CAT_MAGIC, "catalog segment")?;
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("unframe checked the length"));
    if version < 3 {
        return Err(Corruption::Invalid {
            what: "catalog segment version (segments exist from format 3)",
        });
    }
    if d.take(16, "disk id")? != disk.0 {
        return Err(Corruption::Mismatch { what: "disk id" });
    }
    let epoch = d.u64("epoch")?;
    let level = d.u8("level")?;
    if (epoch, level) != (name.epoch, name.level) {
        return Err(Corruption::Mismatch {
            what: "object name (epoch/level)",
        });
    }
    let n = d.count(
        "catalog entry count",
        CATALOG_ENTRY_LEN,
        MAX_CATALOG_ENTRIES,
    )?;
    if n == 0 {
        return Err(Corruption::Invalid {
            what: "catalog segment without entries",
        });
    }
    let mut v: Vec<CatalogEntry> = Vec::with_capacity(n);
    for _ in 0..n {
        let cut = get_cut(&mut d, epoch)?;
        let committed_ns = d.u64("commit time")?;
        if v.last().is_some_and(|p| p.cut.cut_id >= cut.cut_id) {
            return Err(Corruption::Invalid {
                what: "catalog entry order (cut ids must strictly increase)",
            });
        }
        v.push(CatalogEntry { cut, committed_ns });
    }
    d.finish()?;
    if (v[0].cut.cut_id, v[n - 1].cut.cut_id) != (name.first, name.last) {
        return Err(Corruption::Mismatch {
            what: "object name (first/last cut id)",
        });
    }
    Ok(v)
}

/// Encodes a format-2 catalog entry (a one-point `.cut`; this build never writes one).
pub fn encode_cut(disk: &DiskId, c: &CutInfo) -> Vec<u8> {
    let mut e = frame(CUT_MAGIC);
    e.bytes(&disk.0);
    e.u64(c.epoch);
    put_cut(&mut e, c);
    e.crc();
    e.0
}

/// Decodes a format-2 catalog entry (`.cut`) and checks it against its name.
pub fn decode_cut(buf: &[u8], disk: &DiskId, name: (u64, u64)) -> Result<CutInfo, Corruption> {
    let mut d = unframe(buf, CUT_MAGIC, "catalog entry")?;
    if d.take(16, "disk id")? != disk.0 {
        return Err(Corruption::Mismatch { what: "disk id" });
    }
    let epoch = d.u64("epoch")?;
    let c = get_cut(&mut d, epoch)?;
    d.finish()?;
    if (c.epoch, c.cut_id) != name {
        return Err(Corruption::Mismatch {
            what: "object name (epoch/cut id)",
        });
    }
    Ok(c)
}
