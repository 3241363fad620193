//! Index segments (`.idx`): where every batch of a seq range is and what it
//! covers, so a point resolves without reading any pack.
//!
//! Byte layout (little-endian, inside the metadata frame of
//! [`primitives`](super::primitives)):
//!
//! ```text
//! "RCINDEX1" | version u32
//! | disk[16] | epoch u64 | first u64 | last u64 | generation u32
//! | pack name table: n_packs u32 | n_packs × (len u16, name)
//! | n_entries u32 | n_entries × (seq u64 | pack u32 | offset u64 | length u64
//!                                | checksum u32 | flags u32
//!                                | n_extents u32 | n_extents × extent (13))
//! | crc32c u32
//! ```
//!
//! `pack` is a position in the segment's pack name table; `offset`,
//! `length` and `checksum` locate and check the batch record in that pack.
//!
//! Invariants, checked by [`decode_segment`]:
//!
//! * the disk id is the reader's, and `(epoch, first, last, generation)`
//!   equals the object's name;
//! * entries are sorted by strictly increasing seq, all within
//!   `first..=last`; every pack reference is within the table;
//! * the writer indexes every batch of `first..=last` (generation 0); a GC
//!   rewrite (generation + 1) may drop entries no retained point needs, so
//!   later generations can have gaps;
//! * at most `1 << 24` pack names, `1 << 26` entries, and [`MAX_EXTENTS`]
//!   extents per entry.
//!
//! A segment is written only after every pack it references is stored.

use super::names::SegName;
use super::pack::MAX_EXTENTS;
use super::primitives::{EXTENT_LEN, decode_names, frame, pack_ref, pack_table, unframe};
use crate::error::Corruption;
use crate::types::{BatchLocation, DiskId, Extent};

const INDEX_MAGIC: &[u8; 8] = b"RCINDEX1";

/// One batch in an index segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Where the batch is (includes epoch and seq).
    pub loc: BatchLocation,
    /// Batch flags.
    pub flags: u32,
    /// Batch extents.
    pub extents: Vec<Extent>,
}

/// A decoded index segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Epoch.
    pub epoch: u64,
    /// First seq covered.
    pub first: u64,
    /// Last seq covered.
    pub last: u64,
    /// Generation.
    pub generation: u32,
    /// Entries sorted by seq (GC may drop entries no point needs).
    pub entries: Vec<IndexEntry>,
}

/// Encodes an index segment.
pub fn encode_segment(disk: &DiskId, s: &Segment) -> Vec<u8> {
    let mut e = frame(INDEX_MAGIC);
    e.bytes(&disk.0);
    e.u64(s.epoch);
    e.u64(s.first);
    e.u64(s.last);
    e.u32(s.generation);
    let (names, map) = pack_table(s.entries.iter().map(|x| &x.loc));
    e.u32(names.len() as u32);
    for n in &names {
        e.name(n);
    }
    e.u32(s.entries.len() as u32);
    for x in &s.entries {
        e.u64(x.loc.seq);
        e.u32(map[x.loc.pack.as_str()]);
        e.u64(x.loc.offset);
        e.u64(x.loc.length);
        e.u32(x.loc.checksum);
        e.u32(x.flags);
        e.u32(x.extents.len() as u32);
        for ext in &x.extents {
            e.extent(ext);
        }
    }
    e.crc();
    e.0
}

/// Decodes an index segment and checks it against its parsed name.
pub fn decode_segment(buf: &[u8], disk: &DiskId, name: &SegName) -> Result<Segment, Corruption> {
    let mut d = unframe(buf, INDEX_MAGIC, "index segment")?;
    if d.take(16, "disk id")? != disk.0 {
        return Err(Corruption::Mismatch { what: "disk id" });
    }
    let epoch = d.u64("epoch")?;
    let first = d.u64("first seq")?;
    let last = d.u64("last seq")?;
    let generation = d.u32("generation")?;
    if (epoch, first, last, generation) != (name.epoch, name.first, name.last, name.generation) {
        return Err(Corruption::Mismatch {
            what: "object name (epoch/seq range/generation)",
        });
    }
    let names = decode_names(&mut d)?;
    // An entry is at least 40 bytes: seq, pack, offset, length, checksum, flags, extent
    // count (8 + 4 + 8 + 8 + 4 + 4 + 4), with no extents.
    let n = d.count("entry count", 40, 1 << 26)?;
    let mut entries = Vec::with_capacity(n);
    let mut prev = first.wrapping_sub(1);
    for _ in 0..n {
        let seq = d.u64("entry seq")?;
        let pack = pack_ref(&names, d.u32("entry pack")?)?;
        let offset = d.u64("entry offset")?;
        let length = d.u64("entry length")?;
        let checksum = d.u32("entry checksum")?;
        let flags = d.u32("entry flags")?;
        let ne = d.count("entry extent count", EXTENT_LEN, MAX_EXTENTS)?;
        let mut extents = Vec::with_capacity(ne);
        for _ in 0..ne {
            extents.push(d.extent()?);
        }
        if seq < first || seq > last || (seq <= prev && !entries.is_empty()) {
            return Err(Corruption::Invalid {
                what: "entry seq (outside range or unsorted)",
            });
        }
        prev = seq;
        entries.push(IndexEntry {
            loc: BatchLocation {
                pack,
                offset,
                length,
                epoch,
                seq,
                checksum,
            },
            flags,
            extents,
        });
    }
    d.finish()?;
    Ok(Segment {
        epoch,
        first,
        last,
        generation,
        entries,
    })
}
