//! Object names: building them and parsing them back.
//!
//! Names are relative to the store root. `<disk>` is the disk id as 32 hex
//! digits; every number is zero-padded (20 digits, generations 8) so that a
//! lexicographic listing sorts numerically:
//!
//! | object | name |
//! |---|---|
//! | epoch | `disks/<disk>/epochs/<E>.json` |
//! | key rotation | `disks/<disk>/keys/<E>-<from_seq>.json` |
//! | pack | `disks/<disk>/packs/<E>-<first_seq>-<rand64hex>.pack` |
//! | index segment | `disks/<disk>/index/<E>-<last>-<first>-<gen:08>.idx` |
//! | checkpoint | `disks/<disk>/checkpoints/<E>-<seq>-<gen:08>.ckpt` |
//! | catalog segment | `disks/<disk>/catalog/<E>-<first_cut>-<last_cut>-<level:02>-<rand64hex>.cat` |
//! | catalog entry (format 2, read only) | `disks/<disk>/catalog/<E>-<cut_id>.cut` |
//! | GC marker | `disks/<disk>/gc/<time_ns>-<rand64hex>.doomed` |
//!
//! Invariants:
//!
//! * pack, catalog segment and GC marker names end in a random suffix, so two
//!   writers (or a writer and GC) never produce the same name and no object is
//!   ever overwritten;
//! * a catalog segment's name carries the epoch and the first and last cut id it
//!   holds, so a listing alone tells which segments can hold a given point and
//!   sorts them by epoch then range; a parsed one has `first <= last`. A legacy
//!   `.cut` parses as a level-0 segment with `first == last`;
//! * index segments are named `last` before `first`, so a listing that
//!   starts after `<E>-<C>` yields exactly the segments of `E` holding some
//!   seq above `C` (resolution lists only those after its checkpoint `C`);
//!   a parsed segment name has `1 <= first <= last`;
//! * a GC rewrite of an index segment or checkpoint keeps its numbers and
//!   bumps the generation; when two generations coexist (a crash between
//!   writing the new one and deleting the old), readers use the highest;
//! * the parsers look only at the last path component and return `None` for
//!   a name they cannot parse (callers skip such objects).
//!
//! The `.doomed` suffix is part of the on-store format and does not change.

use crate::types::DiskId;

/// `disks/<disk>`
pub fn disk_dir(disk: &DiskId) -> String {
    format!("disks/{disk}")
}
/// Name of the epoch description object.
pub fn epoch_name(disk: &DiskId, epoch: u64) -> String {
    format!("{}/epochs/{epoch:020}.json", disk_dir(disk))
}
/// Name of the key rotation of `epoch` from `from_seq` on.
pub fn key_rotation_name(disk: &DiskId, epoch: u64, from_seq: u64) -> String {
    format!("{}/keys/{epoch:020}-{from_seq:020}.json", disk_dir(disk))
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
/// Name of a new catalog segment of `epoch` holding cuts `first..=last`, at
/// compaction `level` (random suffix: never collides).
pub fn catalog_name(disk: &DiskId, epoch: u64, first: u64, last: u64, level: u8) -> String {
    format!(
        "{}/catalog/{epoch:020}-{first:020}-{last:020}-{level:02}-{:016x}.cat",
        disk_dir(disk),
        rand::random::<u64>()
    )
}
/// Name of a GC pending-delete marker.
pub fn pending_delete_name(disk: &DiskId, now_ns: u64) -> String {
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
/// Parsed key rotation name: (epoch, from_seq).
pub fn parse_key_rotation(name: &str) -> Option<(u64, u64)> {
    match nums(file_stem(name, ".json")?)?[..] {
        [epoch, from_seq] => Some((epoch, from_seq)),
        _ => None,
    }
}
/// Parses a GC pending-delete marker name: its creation time.
pub fn parse_pending_delete(name: &str) -> Option<u64> {
    file_stem(name, ".doomed")?.split('-').next()?.parse().ok()
}
/// Parsed catalog object name: a segment (`.cat`) or a legacy one-point `.cut`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatName {
    /// Full name.
    pub name: String,
    /// Epoch of every cut in the object.
    pub epoch: u64,
    /// Lowest cut id held.
    pub first: u64,
    /// Highest cut id held.
    pub last: u64,
    /// Compaction level (0 = written by a flush; a legacy `.cut` is level 0).
    pub level: u8,
    /// A format-2 `.cut` object (one point, committed time = the agent's time).
    pub legacy: bool,
}
/// Parses a catalog object name (`.cat` segment or legacy `.cut`).
pub fn parse_catalog(name: &str) -> Option<CatName> {
    if let Some((epoch, cut)) = parse_cut(name) {
        return Some(CatName {
            name: name.to_string(),
            epoch,
            first: cut,
            last: cut,
            level: 0,
            legacy: true,
        });
    }
    let stem = file_stem(name, ".cat")?;
    let mut it = stem.split('-');
    let mut num = || it.next()?.parse::<u64>().ok();
    let (epoch, first, last, level) = (num()?, num()?, num()?, num()?);
    let suffix = it.next()?;
    if it.next().is_some()
        || first > last
        || suffix.len() != 16
        || !suffix.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    Some(CatName {
        name: name.to_string(),
        epoch,
        first,
        last,
        level: u8::try_from(level).ok()?,
        legacy: false,
    })
}
