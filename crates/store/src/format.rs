//! Object names and the binary/JSON encodings of every stored object.
//!
//! All integers are little-endian. Every metadata object is framed as
//! `magic (8) | version u32 | body | crc32c u32` where the CRC covers all
//! preceding bytes. Decoders bound every count/length against the bytes that
//! remain before allocating, and report [`Corruption`] values that callers
//! wrap with the object name.

use crate::error::{Corruption, Error, Result};
use crate::types::{BatchLocation, CutInfo, CutKind, DiskId, EpochInfo, Extent, ExtentKind};
use serde::{Deserialize, Serialize};

/// Format version written by this build (all object kinds).
pub const FORMAT_VERSION: u32 = 1;

/// Largest sealed payload accepted in a batch record (1 GiB).
pub const MAX_SEALED: u64 = 1 << 30;
/// Most extents accepted in one batch.
pub const MAX_EXTENTS: u64 = 1 << 20;
/// Longest object name stored inside an index object.
pub const MAX_NAME: u64 = 1024;

const PACK_MAGIC: &[u8; 8] = b"RCPACK01";
const PACK_END_MAGIC: &[u8; 8] = b"RCPKEND1";
const REC_MAGIC: &[u8; 4] = b"RCB1";
const INDEX_MAGIC: &[u8; 8] = b"RCINDEX1";
const CKPT_MAGIC: &[u8; 8] = b"RCCKPT01";
const CUT_MAGIC: &[u8; 8] = b"RCCUT001";
const DOOM_MAGIC: &[u8; 8] = b"RCDOOM01";

/// Size of the pack header.
pub const PACK_HEADER_LEN: u64 = 8 + 4 + 16 + 8;
/// Size of the fixed part of a batch record header.
pub const REC_FIXED_LEN: u64 = 4 + 8 + 8 + 4 + 4 + 8;
const EXTENT_LEN: u64 = 13;
const DIR_ENTRY_LEN: u64 = 28;
const PACK_TRAILER_LEN: u64 = 16;

// ---------------------------------------------------------------- names

/// `disks/<disk>`
pub fn disk_dir(disk: &DiskId) -> String {
    format!("disks/{}", disk.to_hex())
}
/// Name of the epoch description object.
pub fn epoch_name(disk: &DiskId, epoch: u64) -> String {
    format!("{}/epochs/{epoch:020}.json", disk_dir(disk))
}
/// Name of a new pack (random suffix: never collides, sorts by epoch/seq).
pub fn pack_name(disk: &DiskId, epoch: u64, first_seq: u64) -> String {
    format!(
        "{}/packs/{epoch:020}-{first_seq:020}-{:016x}.pack",
        disk_dir(disk),
        rand::random::<u64>()
    )
}
/// Name of an index segment covering `first..=last` of `epoch`, generation `gen`.
pub fn index_name(disk: &DiskId, epoch: u64, first: u64, last: u64, generation: u32) -> String {
    format!(
        "{}/index/{epoch:020}-{last:020}-{first:020}-{generation:08}.idx",
        disk_dir(disk)
    )
}
/// Name of a checkpoint of `epoch` as of `seq`, generation `gen`.
pub fn checkpoint_name(disk: &DiskId, epoch: u64, seq: u64, generation: u32) -> String {
    format!(
        "{}/checkpoints/{epoch:020}-{seq:020}-{generation:08}.ckpt",
        disk_dir(disk)
    )
}
/// Name of a catalog entry.
pub fn cut_name(disk: &DiskId, epoch: u64, cut_id: u64) -> String {
    format!("{}/catalog/{epoch:020}-{cut_id:020}.cut", disk_dir(disk))
}
/// Name of a GC pending-delete marker.
pub fn doom_name(disk: &DiskId, now_ns: u64) -> String {
    format!(
        "{}/gc/{now_ns:020}-{:016x}.doomed",
        disk_dir(disk),
        rand::random::<u64>()
    )
}

fn file_stem<'a>(name: &'a str, ext: &str) -> Option<&'a str> {
    name.rsplit('/').next()?.strip_suffix(ext)
}

fn nums(stem: &str) -> Option<Vec<u64>> {
    stem.split('-').map(|p| p.parse::<u64>().ok()).collect()
}

/// Parsed pack name: (epoch, first_seq).
pub fn parse_pack(name: &str) -> Option<(u64, u64)> {
    let stem = file_stem(name, ".pack")?;
    let mut it = stem.split('-');
    let e = it.next()?.parse().ok()?;
    let s = it.next()?.parse().ok()?;
    Some((e, s))
}
/// Parsed index segment name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegName {
    /// Full name.
    pub name: String,
    /// Epoch.
    pub epoch: u64,
    /// First seq covered.
    pub first: u64,
    /// Last seq covered.
    pub last: u64,
    /// Generation (bumped by GC rewrites).
    pub generation: u32,
}
/// Parses an index segment name.
pub fn parse_index(name: &str) -> Option<SegName> {
    let n = nums(file_stem(name, ".idx")?)?;
    if n.len() != 4 || n[2] > n[1] || n[2] == 0 {
        return None;
    }
    Some(SegName {
        name: name.to_string(),
        epoch: n[0],
        last: n[1],
        first: n[2],
        generation: u32::try_from(n[3]).ok()?,
    })
}
/// Parsed checkpoint name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CkptName {
    /// Full name.
    pub name: String,
    /// Epoch.
    pub epoch: u64,
    /// As-of seq.
    pub seq: u64,
    /// Generation.
    pub generation: u32,
}
/// Parses a checkpoint name.
pub fn parse_checkpoint(name: &str) -> Option<CkptName> {
    let n = nums(file_stem(name, ".ckpt")?)?;
    if n.len() != 3 {
        return None;
    }
    Some(CkptName {
        name: name.to_string(),
        epoch: n[0],
        seq: n[1],
        generation: u32::try_from(n[2]).ok()?,
    })
}
/// Parses a catalog entry name: (epoch, cut_id).
pub fn parse_cut(name: &str) -> Option<(u64, u64)> {
    let n = nums(file_stem(name, ".cut")?)?;
    (n.len() == 2).then(|| (n[0], n[1]))
}
/// Parses an epoch object name.
pub fn parse_epoch(name: &str) -> Option<u64> {
    file_stem(name, ".json")?.parse().ok()
}
/// Parses a GC marker name: its creation time.
pub fn parse_doom(name: &str) -> Option<u64> {
    file_stem(name, ".doomed")?.split('-').next()?.parse().ok()
}

// ---------------------------------------------------------------- primitives

#[derive(Default)]
pub(crate) struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub fn name(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
    }
    pub fn extent(&mut self, e: &Extent) {
        self.u64(e.sector);
        self.u32(e.sectors);
        self.u8(match e.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => 1,
            ExtentKind::Discard => 2,
        });
    }
    pub fn crc(&mut self) {
        let c = crc32c::crc32c(&self.0);
        self.u32(c);
    }
}

pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    pub fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    pub fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], Corruption> {
        if n > self.remaining() {
            return Err(Corruption::Truncated {
                what,
                needed: n,
                offset: self.pos as u64,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, Corruption> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, Corruption> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, Corruption> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, Corruption> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// Reads a count and checks that `count * min_item` bytes remain.
    pub fn count(
        &mut self,
        what: &'static str,
        min_item: u64,
        max: u64,
    ) -> Result<usize, Corruption> {
        let n = u64::from(self.u32(what)?);
        if n > max || n.saturating_mul(min_item) > self.remaining() {
            return Err(Corruption::Length {
                what,
                value: n,
                max: max.min(self.remaining() / min_item.max(1)),
            });
        }
        Ok(n as usize)
    }
    pub fn name(&mut self) -> Result<String, Corruption> {
        let n = u64::from(self.u16("name length")?);
        if n > MAX_NAME {
            return Err(Corruption::Length {
                what: "name length",
                value: n,
                max: MAX_NAME,
            });
        }
        let b = self.take(n, "name")?;
        String::from_utf8(b.to_vec()).map_err(|_| Corruption::Invalid {
            what: "name (not UTF-8)",
        })
    }
    pub fn extent(&mut self) -> Result<Extent, Corruption> {
        let sector = self.u64("extent sector")?;
        let sectors = self.u32("extent sectors")?;
        let kind = match self.u8("extent kind")? {
            0 => ExtentKind::Data,
            1 => ExtentKind::Zero,
            2 => ExtentKind::Discard,
            _ => {
                return Err(Corruption::Invalid {
                    what: "extent kind",
                });
            }
        };
        if sector.checked_add(u64::from(sectors)).is_none() {
            return Err(Corruption::Invalid {
                what: "extent range (overflows)",
            });
        }
        Ok(Extent {
            sector,
            sectors,
            kind,
        })
    }
    pub fn finish(&self) -> Result<(), Corruption> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(Corruption::Trailing { extra }),
        }
    }
}

fn frame(magic: &[u8; 8]) -> Enc {
    let mut e = Enc::default();
    e.bytes(magic);
    e.u32(FORMAT_VERSION);
    e
}

/// Checks magic, CRC and version; returns a decoder over the body.
fn unframe<'a>(buf: &'a [u8], magic: &[u8; 8], what: &'static str) -> Result<Dec<'a>, Corruption> {
    if (buf.len() as u64) < 16 {
        return Err(Corruption::Truncated {
            what,
            needed: 16,
            offset: 0,
            len: buf.len() as u64,
        });
    }
    if &buf[..8] != magic {
        return Err(Corruption::BadMagic { what });
    }
    let (body, tail) = buf.split_at(buf.len() - 4);
    let stored = u32::from_le_bytes(tail.try_into().unwrap());
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(Corruption::Checksum {
            what,
            stored,
            computed,
        });
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(Corruption::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(Dec::new(&body[12..]))
}

// ---------------------------------------------------------------- packs

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
    let body_len = d.pos;
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
        len: d.pos as u64,
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
    let version = h.u32("pack version")?;
    if version != FORMAT_VERSION {
        return Err(Corruption::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
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

// ---------------------------------------------------------------- index

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

fn pack_table<'a>(
    locs: impl Iterator<Item = &'a BatchLocation>,
) -> (Vec<&'a str>, std::collections::HashMap<&'a str, u32>) {
    let mut names = Vec::new();
    let mut map = std::collections::HashMap::new();
    for l in locs {
        map.entry(l.pack.as_str()).or_insert_with(|| {
            names.push(l.pack.as_str());
            (names.len() - 1) as u32
        });
    }
    (names, map)
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

fn decode_names(d: &mut Dec<'_>) -> Result<Vec<String>, Corruption> {
    let n = d.count("pack name count", 2, 1 << 24)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(d.name()?);
    }
    Ok(v)
}

fn pack_ref(names: &[String], i: u32) -> Result<String, Corruption> {
    names.get(i as usize).cloned().ok_or(Corruption::Invalid {
        what: "pack reference",
    })
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
    let n = d.count("entry count", 44, 1 << 26)?;
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

// ---------------------------------------------------------------- checkpoints

/// Source of a checkpoint run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CkTarget {
    /// Zeros.
    Zero,
    /// Discarded.
    Discard,
    /// Batch `seq` at plaintext `offset`.
    Data {
        /// Seq.
        seq: u64,
        /// Offset in the batch plaintext.
        offset: u64,
    },
}

/// A decoded checkpoint: the extent map of an epoch as of `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Epoch.
    pub epoch: u64,
    /// As-of seq.
    pub seq: u64,
    /// Generation.
    pub generation: u32,
    /// Locations of the batches referenced by runs.
    pub locations: Vec<BatchLocation>,
    /// Runs: (start sector, sectors, target), sorted and non-overlapping.
    pub runs: Vec<(u64, u64, CkTarget)>,
}

/// Encodes a checkpoint.
pub fn encode_checkpoint(disk: &DiskId, c: &Checkpoint) -> Vec<u8> {
    let mut e = frame(CKPT_MAGIC);
    e.bytes(&disk.0);
    e.u64(c.epoch);
    e.u64(c.seq);
    e.u32(c.generation);
    let (names, map) = pack_table(c.locations.iter());
    e.u32(names.len() as u32);
    for n in &names {
        e.name(n);
    }
    e.u32(c.locations.len() as u32);
    for l in &c.locations {
        e.u64(l.seq);
        e.u32(map[l.pack.as_str()]);
        e.u64(l.offset);
        e.u64(l.length);
        e.u32(l.checksum);
    }
    e.u32(c.runs.len() as u32);
    for (start, len, t) in &c.runs {
        e.u64(*start);
        e.u64(*len);
        match t {
            CkTarget::Zero => {
                e.u8(1);
                e.u64(0);
                e.u64(0);
            }
            CkTarget::Discard => {
                e.u8(2);
                e.u64(0);
                e.u64(0);
            }
            CkTarget::Data { seq, offset } => {
                e.u8(0);
                e.u64(*seq);
                e.u64(*offset);
            }
        }
    }
    e.crc();
    e.0
}

/// Decodes a checkpoint and checks it against its parsed name.
pub fn decode_checkpoint(
    buf: &[u8],
    disk: &DiskId,
    name: &CkptName,
) -> Result<Checkpoint, Corruption> {
    let mut d = unframe(buf, CKPT_MAGIC, "checkpoint")?;
    if d.take(16, "disk id")? != disk.0 {
        return Err(Corruption::Mismatch { what: "disk id" });
    }
    let epoch = d.u64("epoch")?;
    let seq = d.u64("seq")?;
    let generation = d.u32("generation")?;
    if (epoch, seq, generation) != (name.epoch, name.seq, name.generation) {
        return Err(Corruption::Mismatch {
            what: "object name (epoch/seq/generation)",
        });
    }
    let names = decode_names(&mut d)?;
    let n = d.count("location count", 32, 1 << 26)?;
    let mut locations = Vec::with_capacity(n);
    for _ in 0..n {
        let s = d.u64("location seq")?;
        let pack = pack_ref(&names, d.u32("location pack")?)?;
        if s > seq {
            return Err(Corruption::Invalid {
                what: "location seq (after checkpoint)",
            });
        }
        locations.push(BatchLocation {
            seq: s,
            pack,
            offset: d.u64("location offset")?,
            length: d.u64("location length")?,
            checksum: d.u32("location checksum")?,
            epoch,
        });
    }
    let n = d.count("run count", 33, 1 << 28)?;
    let mut runs = Vec::with_capacity(n);
    let mut end = 0u64;
    for _ in 0..n {
        let start = d.u64("run start")?;
        let len = d.u64("run length")?;
        let kind = d.u8("run kind")?;
        let s = d.u64("run seq")?;
        let off = d.u64("run offset")?;
        let t = match kind {
            0 => CkTarget::Data {
                seq: s,
                offset: off,
            },
            1 => CkTarget::Zero,
            2 => CkTarget::Discard,
            _ => return Err(Corruption::Invalid { what: "run kind" }),
        };
        if len == 0 || start < end || start.checked_add(len).is_none() {
            return Err(Corruption::Invalid {
                what: "run range (empty, overlapping or unsorted)",
            });
        }
        end = start + len;
        runs.push((start, len, t));
    }
    d.finish()?;
    Ok(Checkpoint {
        epoch,
        seq,
        generation,
        locations,
        runs,
    })
}

// ---------------------------------------------------------------- catalog

/// Encodes a catalog entry.
pub fn encode_cut(disk: &DiskId, c: &CutInfo) -> Vec<u8> {
    let mut e = frame(CUT_MAGIC);
    e.bytes(&disk.0);
    e.u64(c.epoch);
    e.u64(c.cut_id);
    e.u64(c.seq);
    e.u64(c.time_ns);
    e.u64(c.mono_ns);
    e.u8(match c.kind {
        CutKind::Crash => 0,
        CutKind::App => 1,
    });
    e.crc();
    e.0
}

/// Decodes a catalog entry and checks it against its name.
pub fn decode_cut(buf: &[u8], disk: &DiskId, name: (u64, u64)) -> Result<CutInfo, Corruption> {
    let mut d = unframe(buf, CUT_MAGIC, "catalog entry")?;
    if d.take(16, "disk id")? != disk.0 {
        return Err(Corruption::Mismatch { what: "disk id" });
    }
    let c = CutInfo {
        epoch: d.u64("epoch")?,
        cut_id: d.u64("cut id")?,
        seq: d.u64("seq")?,
        time_ns: d.u64("time")?,
        mono_ns: d.u64("mono time")?,
        kind: match d.u8("kind")? {
            0 => CutKind::Crash,
            1 => CutKind::App,
            _ => return Err(Corruption::Invalid { what: "cut kind" }),
        },
    };
    d.finish()?;
    if (c.epoch, c.cut_id) != name {
        return Err(Corruption::Mismatch {
            what: "object name (epoch/cut id)",
        });
    }
    Ok(c)
}

// ---------------------------------------------------------------- GC markers

/// Encodes a GC marker: packs found unreferenced and when first seen (unix ns).
pub fn encode_doom(entries: &[(String, u64)]) -> Vec<u8> {
    let mut e = frame(DOOM_MAGIC);
    e.u32(entries.len() as u32);
    for (n, t) in entries {
        e.name(n);
        e.u64(*t);
    }
    e.crc();
    e.0
}

/// Decodes a GC marker.
pub fn decode_doom(buf: &[u8]) -> Result<Vec<(String, u64)>, Corruption> {
    let mut d = unframe(buf, DOOM_MAGIC, "GC marker")?;
    let n = d.count("marker entry count", 10, 1 << 24)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let name = d.name()?;
        v.push((name, d.u64("first seen")?));
    }
    d.finish()?;
    Ok(v)
}

// ---------------------------------------------------------------- epochs (JSON)

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
    if doc.format_version != FORMAT_VERSION {
        return Err(Corruption::Version {
            found: doc.format_version,
            supported: FORMAT_VERSION,
        });
    }
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

/// Wraps a [`Corruption`] with the object name.
pub(crate) fn named<T>(r: Result<T, Corruption>, object: &str) -> Result<T> {
    r.map_err(|p| Error::corrupt(object, p))
}
