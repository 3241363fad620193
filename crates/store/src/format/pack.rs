//! Packs (`.pack`): the sealed batches themselves, many per object.
//!
//! Byte layout (little-endian):
//!
//! ```text
//! header   "RCPACK01" | version u32 | disk[16] | epoch u64              (PACK_HEADER_LEN = 36)
//! record   "RCB1" | epoch u64 | seq u64 | flags u32 | n_extents u32 | sealed_len u64
//!          | n_extents × extent (13) | sealed bytes | crc32c u32         (CRC over the record)
//!          ... records back to back ...
//! footer   n × (seq u64, offset u64, length u64, crc u32)               (directory, 28 each)
//!          | n u32 | crc32c u32 | "RCPKEND1"                            (trailer, 16)
//! ```
//!
//! The footer CRC covers the directory entries and `n`. A record's fixed
//! part is [`REC_FIXED_LEN`] bytes; extents are encoded as in
//! [`primitives`](super::primitives).
//!
//! Invariants, checked by [`parse_pack_bytes`]:
//!
//! * the header carries this format version and the pack's disk id;
//! * the directory lists every record in file order: the first starts right
//!   after the header, each starts where the previous one ended, and the
//!   last ends where the directory begins (no gaps, no stray bytes);
//! * each directory entry agrees with its record (length, CRC, seq), and
//!   every record's epoch is the header's;
//! * a record holds at most [`MAX_EXTENTS`] extents and [`MAX_SEALED`]
//!   sealed bytes (the writer refuses larger batches before encoding).
//!
//! The pack's name carries its epoch and first seq (see
//! [`names`](super::names)); the header does not repeat the seq. Resolution
//! and GC fetch single records by the range an index entry gives
//! ([`decode_record`]); only verification reads whole packs
//! ([`parse_pack_bytes`]).

use super::primitives::{Dec, EXTENT_LEN, Enc, frame};
use crate::error::Corruption;
use crate::types::{DiskId, Extent};

/// Largest sealed payload accepted in a batch record (1 GiB).
pub const MAX_SEALED: u64 = 1 << 30;
/// Most extents accepted in one batch.
pub const MAX_EXTENTS: u64 = 1 << 20;

const PACK_MAGIC: &[u8; 8] = b"RCPACK01";
const PACK_END_MAGIC: &[u8; 8] = b"RCPKEND1";
const REC_MAGIC: &[u8; 4] = b"RCB1";

/// Size of the pack header.
pub const PACK_HEADER_LEN: u64 = 8 + 4 + 16 + 8;
/// Size of the fixed part of a batch record header.
pub const REC_FIXED_LEN: u64 = 4 + 8 + 8 + 4 + 4 + 8;
const DIR_ENTRY_LEN: u64 = 28;
const PACK_TRAILER_LEN: u64 = 16;

/// Encodes the pack header.
pub fn pack_header(disk: &DiskId, epoch: u64) -> Vec<u8> {
    let mut e = frame(PACK_MAGIC);
    e.bytes(&disk.0);
    e.u64(epoch);
    e.0
}

/// Encodes one batch record; returns (bytes, crc32c).
pub fn encode_record(
    epoch: u64,
    seq: u64,
    flags: u32,
    extents: &[Extent],
    sealed: &[u8],
) -> (Vec<u8>, u32) {
    let mut e = Enc(Vec::with_capacity(
        (REC_FIXED_LEN + EXTENT_LEN * extents.len() as u64 + sealed.len() as u64 + 4) as usize,
    ));
    e.bytes(REC_MAGIC);
    e.u64(epoch);
    e.u64(seq);
    e.u32(flags);
    e.u32(extents.len() as u32);
    e.u64(sealed.len() as u64);
    for x in extents {
        e.extent(x);
    }
    e.bytes(sealed);
    let crc = crc32c::crc32c(&e.0);
    e.u32(crc);
    (e.0, crc)
}

/// A decoded batch record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Epoch.
    pub epoch: u64,
    /// Seq.
    pub seq: u64,
    /// Flags.
    pub flags: u32,
    /// Extents.
    pub extents: Vec<Extent>,
    /// Sealed payload.
    pub sealed: Vec<u8>,
    /// Record CRC32C.
    pub crc: u32,
    /// Encoded length.
    pub len: u64,
}

/// Decodes a record at the start of `buf` (which may extend past it).
pub fn decode_record(buf: &[u8]) -> Result<Record, Corruption> {
    let mut d = Dec::new(buf);
    if d.take(4, "record magic")? != REC_MAGIC {
        return Err(Corruption::BadMagic {
            what: "batch record",
        });
    }
    let epoch = d.u64("record epoch")?;
    let seq = d.u64("record seq")?;
    let flags = d.u32("record flags")?;
    let n = u64::from(d.u32("record extent count")?);
    let sealed_len = d.u64("record sealed length")?;
    if n > MAX_EXTENTS || n * EXTENT_LEN > d.remaining() {
        return Err(Corruption::Length {
            what: "record extent count",
            value: n,
            max: MAX_EXTENTS.min(d.remaining() / EXTENT_LEN),
        });
    }
    if sealed_len > MAX_SEALED {
        return Err(Corruption::Length {
            what: "record sealed length",
            value: sealed_len,
            max: MAX_SEALED,
        });
    }
    let mut extents = Vec::with_capacity(n as usize);
    for _ in 0..n {
        extents.push(d.extent()?);
    }
    let sealed = d.take(sealed_len, "sealed payload")?.to_vec();
    let body_len = d.pos();
    let stored = d.u32("record checksum")?;
    let computed = crc32c::crc32c(&buf[..body_len]);
    if stored != computed {
        return Err(Corruption::Checksum {
            what: "batch record",
            stored,
            computed,
        });
    }
    Ok(Record {
        epoch,
        seq,
        flags,
        extents,
        sealed,
        crc: stored,
        len: d.pos() as u64,
    })
}

/// One entry of a pack's footer directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry {
    /// Seq of the batch.
    pub seq: u64,
    /// Offset of its record.
    pub offset: u64,
    /// Length of its record.
    pub length: u64,
    /// Record CRC32C.
    pub crc: u32,
}

/// Encodes a pack footer (directory + trailer).
pub fn pack_footer(dir: &[DirEntry]) -> Vec<u8> {
    let mut e = Enc::default();
    for d in dir {
        e.u64(d.seq);
        e.u64(d.offset);
        e.u64(d.length);
        e.u32(d.crc);
    }
    e.u32(dir.len() as u32);
    let crc = crc32c::crc32c(&e.0);
    e.u32(crc);
    e.bytes(PACK_END_MAGIC);
    e.0
}

/// A fully parsed pack.
#[derive(Debug)]
pub struct ParsedPack {
    /// Epoch in the header.
    pub epoch: u64,
    /// Records with their directory entries.
    pub records: Vec<(DirEntry, Record)>,
}

/// Parses and checks a whole pack: header, every record's checksum, the
/// footer and its agreement with the records.
pub fn parse_pack_bytes(buf: &[u8], disk: &DiskId) -> Result<ParsedPack, Corruption> {
    let len = buf.len() as u64;
    if len < PACK_HEADER_LEN + PACK_TRAILER_LEN {
        return Err(Corruption::Truncated {
            what: "pack header/trailer",
            needed: PACK_HEADER_LEN + PACK_TRAILER_LEN,
            offset: 0,
            len,
        });
    }
    if &buf[..8] != PACK_MAGIC {
        return Err(Corruption::BadMagic { what: "pack" });
    }
    let mut h = Dec::new(&buf[8..PACK_HEADER_LEN as usize]);
    super::check_version(h.u32("pack version")?)?;
    if h.take(16, "pack disk id")? != disk.0 {
        return Err(Corruption::Mismatch {
            what: "disk id in pack header",
        });
    }
    let epoch = h.u64("pack epoch")?;
    // Trailer.
    let t = &buf[buf.len() - PACK_TRAILER_LEN as usize..];
    if &t[8..] != PACK_END_MAGIC {
        return Err(Corruption::BadMagic {
            what: "pack trailer",
        });
    }
    let n = u64::from(u32::from_le_bytes(t[..4].try_into().unwrap()));
    let stored = u32::from_le_bytes(t[4..8].try_into().unwrap());
    let dir_len = n.saturating_mul(DIR_ENTRY_LEN);
    if dir_len > len - PACK_HEADER_LEN - PACK_TRAILER_LEN {
        return Err(Corruption::Length {
            what: "pack directory entries",
            value: n,
            max: (len - PACK_HEADER_LEN - PACK_TRAILER_LEN) / DIR_ENTRY_LEN,
        });
    }
    let dir_start = (len - PACK_TRAILER_LEN - dir_len) as usize;
    let computed = crc32c::crc32c(&buf[dir_start..buf.len() - 12]);
    if stored != computed {
        return Err(Corruption::Checksum {
            what: "pack directory",
            stored,
            computed,
        });
    }
    let mut d = Dec::new(&buf[dir_start..dir_start + dir_len as usize]);
    let mut records = Vec::with_capacity(n as usize);
    let mut pos = PACK_HEADER_LEN;
    for _ in 0..n {
        let de = DirEntry {
            seq: d.u64("dir seq")?,
            offset: d.u64("dir offset")?,
            length: d.u64("dir length")?,
            crc: d.u32("dir crc")?,
        };
        if de.offset != pos || de.length > dir_start as u64 - pos {
            return Err(Corruption::Mismatch {
                what: "pack directory offsets",
            });
        }
        let rec = decode_record(&buf[pos as usize..(pos + de.length) as usize])?;
        if rec.len != de.length || rec.crc != de.crc || rec.seq != de.seq || rec.epoch != epoch {
            return Err(Corruption::Mismatch {
                what: "pack directory entry",
            });
        }
        pos += de.length;
        records.push((de, rec));
    }
    if pos != dir_start as u64 {
        return Err(Corruption::Mismatch {
            what: "pack directory coverage",
        });
    }
    Ok(ParsedPack { epoch, records })
}
