//! Shared little-endian/CRC helpers: the encoder and decoder every binary
//! object is built with, the metadata frame, and the encodings of the
//! fields several objects share.
//!
//! All integers are little-endian. Shared field encodings:
//!
//! * **frame** (every metadata object: `.idx`, `.ckpt`, `.cut`, `.doomed`):
//!   `magic[8] | version u32 | body | crc32c u32`, the CRC over everything
//!   before it. [`unframe`] checks length, magic, CRC, then version, in that
//!   order, and hands back a decoder over the body alone.
//! * **extent** (13 bytes): `sector u64 | sectors u32 | kind u8` with kind
//!   `0` Data, `1` Zero, `2` Discard; `sector + sectors` must not overflow.
//! * **name**: `len u16 | UTF-8 bytes`, at most [`MAX_NAME`] bytes.
//! * **pack name table** (index segments and checkpoints): `n u32 | n × name`;
//!   entries refer to a pack by its `u32` position in the table, each pack
//!   listed once in order of first reference.
//!
//! Decoder invariants: a read past the end is [`Corruption::Truncated`],
//! never a panic; a count is checked against both its maximum and the bytes
//! remaining (`count × smallest item`) before anything is allocated; bytes
//! left after the body are [`Corruption::Trailing`].

use std::collections::HashMap;

use super::{FORMAT_VERSION, check_version};
use crate::error::Corruption;
use crate::types::{BatchLocation, Extent, ExtentKind};

/// Longest object name stored inside an index object.
pub const MAX_NAME: u64 = 1024;

/// Encoded size of one extent.
pub(super) const EXTENT_LEN: u64 = 13;

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
    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
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

/// Starts a metadata object: magic and version.
pub(super) fn frame(magic: &[u8; 8]) -> Enc {
    frame_as(magic, FORMAT_VERSION)
}

/// Starts a metadata object of an older `version` (encoders kept for tests and tools).
pub(super) fn frame_as(magic: &[u8; 8], version: u32) -> Enc {
    let mut e = Enc::default();
    e.bytes(magic);
    e.u32(version);
    e
}

/// Checks magic, CRC and version; returns a decoder over the body.
pub(super) fn unframe<'a>(
    buf: &'a [u8],
    magic: &[u8; 8],
    what: &'static str,
) -> Result<Dec<'a>, Corruption> {
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
    check_version(u32::from_le_bytes(buf[8..12].try_into().unwrap()))?;
    Ok(Dec::new(&body[12..]))
}

/// Builds the pack name table of `locs`: the distinct pack names in order
/// of first reference, and each name's position in that list.
pub(super) fn pack_table<'a>(
    locs: impl Iterator<Item = &'a BatchLocation>,
) -> (Vec<&'a str>, HashMap<&'a str, u32>) {
    let mut names = Vec::new();
    let mut map = HashMap::new();
    for l in locs {
        map.entry(l.pack.as_str()).or_insert_with(|| {
            names.push(l.pack.as_str());
            (names.len() - 1) as u32
        });
    }
    (names, map)
}

/// Reads a pack name table.
pub(super) fn decode_names(d: &mut Dec<'_>) -> Result<Vec<String>, Corruption> {
    let n = d.count("pack name count", 2, 1 << 24)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(d.name()?);
    }
    Ok(v)
}

/// Resolves a pack reference against a decoded pack name table.
pub(super) fn pack_ref(names: &[String], i: u32) -> Result<String, Corruption> {
    names.get(i as usize).cloned().ok_or(Corruption::Invalid {
        what: "pack reference",
    })
}
