//! The catalog of committed recovery points: segments (`.cat`, formats 3 and 4), and the
//! one-point entries (`.cut`) of format 2 that readers still accept.
//!
//! ## Segments (`.cat`)
//!
//! Every cut one flush commits, or every cut of the segments a compaction merges, in
//! one object. Byte layout (little-endian, inside the metadata frame of
//! [`primitives`](super::primitives)):
//!
//! ```text
//! "RCCAT001" | version u32 (3 or 4; this build writes 4)
//! | disk[16] | epoch u64 | level u8 | n u32
//! | n × entry
//! | crc32c u32
//!
//! entry = cut_id u64 | seq u64 | time_ns u64 | mono_ns u64 | kind u8 | mac[32]
//!         | committed_ns u64                          (73 bytes: all of a version-3 entry)
//!         | has_group u8                              (version 4 only: 0 or 1)
//!         | stamp[42]                                 (version 4, only when has_group = 1)
//!
//! stamp = group[16] | instant_ns u64 | members u16 | offset_ns i64 | error_ns u64
//! ```
//!
//! So a version-4 entry is [`CATALOG_ENTRY_MIN_LEN`] (74) bytes without a stamp and
//! [`CATALOG_ENTRY_MAX_LEN`] (116) with one; a version-3 entry is
//! [`CATALOG_V3_ENTRY_LEN`] (73) bytes and reads as a cut without a stamp.
//!
//! The agent's fields (`cut_id` .. `mac`) are those of a `.cut` below, verbatim; the
//! stamp ([`CutInfo::group`], encoded by [`GroupStamp::to_bytes`]) is the agent's too,
//! and its MAC covers it. `committed_ns` is the writer's (server's) wall clock when the
//! flush that committed the cut began, unix nanoseconds: retention compares it, never the
//! agent's `time_ns`. Compaction and retention rewrites copy entries verbatim, stamps
//! included.
//!
//! Invariants, checked by [`decode_catalog`]: the version is 3 or 4; the disk id is the
//! reader's; the epoch and level equal the name's; `1 <= n <= MAX_CATALOG_ENTRIES` and
//! `n` entries of the version's smallest size fit in the bytes that remain (checked
//! before allocating); cut ids strictly increase, the first and last equal the name's;
//! every kind is known; every `has_group` is 0 or 1 and every stamp decodes (its
//! `members` in `1..=MAX_GROUP_MEMBERS`); nothing follows the entries.
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
//! A `.cut` has no group stamp (groups came after format 2).
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
//! This build writes no `.cut` ([`encode_cut`] stays for tests and tools) and no
//! version-3 segment ([`encode_catalog_v3`], likewise); a reader takes a `.cut` as a
//! one-entry level-0 segment whose `committed_ns` is its `time_ns` (format 2 recorded no
//! server time).

use super::names::CatName;
use super::primitives::{Dec, Enc, frame, frame_as, unframe};
use crate::error::Corruption;
use crate::types::{CutInfo, CutKind, DiskId, GROUP_STAMP_LEN, GroupStamp, POINT_MAC_LEN};

const CUT_MAGIC: &[u8; 8] = b"RCCUT001";
const CAT_MAGIC: &[u8; 8] = b"RCCAT001";

/// Encoded size of one version-3 segment entry (the agent's fields and `committed_ns`).
pub const CATALOG_V3_ENTRY_LEN: u64 = 8 * 4 + 1 + POINT_MAC_LEN as u64 + 8;

/// Smallest encoded size of one version-4 segment entry (no group stamp).
pub const CATALOG_ENTRY_MIN_LEN: u64 = CATALOG_V3_ENTRY_LEN + 1;

/// Largest encoded size of one version-4 segment entry (with a group stamp).
pub const CATALOG_ENTRY_MAX_LEN: u64 = CATALOG_ENTRY_MIN_LEN + GROUP_STAMP_LEN as u64;

/// The segment version that added the group stamp (and the one this build writes).
const STAMPED_VERSION: u32 = 4;
// A newer format must say how its segments read (add an arm to `decode_catalog`).
const _: () = assert!(STAMPED_VERSION == super::FORMAT_VERSION);

/// The version segments first appeared in (entries without a stamp flag).
const V3: u32 = 3;

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
        group: None,
        mac: d
            .take(POINT_MAC_LEN as u64, "point MAC")?
            .try_into()
            .expect("took exactly the MAC length"),
    })
}

fn put_stamp(e: &mut Enc, g: Option<&GroupStamp>) {
    match g {
        None => e.u8(0),
        Some(g) => {
            e.u8(1);
            e.bytes(&g.to_bytes());
        }
    }
}

fn get_stamp(d: &mut Dec<'_>) -> Result<Option<GroupStamp>, Corruption> {
    match d.u8("group stamp flag")? {
        0 => Ok(None),
        1 => {
            let b = d.take(GROUP_STAMP_LEN as u64, "group stamp")?;
            let b: &[u8; GROUP_STAMP_LEN] = b.try_into().expect("took exactly a stamp");
            GroupStamp::from_bytes(b)
                .map(Some)
                .ok_or(Corruption::Invalid {
                    what: "group stamp (member count is 0 or above MAX_GROUP_MEMBERS)",
                })
        }
        _ => Err(Corruption::Invalid {
            what: "group stamp flag (must be 0 or 1)",
        }),
    }
}

fn entry_len(x: &CatalogEntry) -> usize {
    (match x.cut.group {
        None => CATALOG_ENTRY_MIN_LEN,
        Some(_) => CATALOG_ENTRY_MAX_LEN,
    }) as usize
}

fn debug_check(entries: &[CatalogEntry], epoch: u64) {
    debug_assert!(!entries.is_empty());
    debug_assert!(
        entries
            .windows(2)
            .all(|w| w[0].cut.cut_id < w[1].cut.cut_id)
    );
    debug_assert!(entries.iter().all(|x| x.cut.epoch == epoch));
}

/// Encodes a catalog segment (the current version, 4). `entries` must be non-empty, of
/// `epoch`, sorted by strictly increasing cut id (the writer and compaction guarantee it).
pub fn encode_catalog(disk: &DiskId, epoch: u64, level: u8, entries: &[CatalogEntry]) -> Vec<u8> {
    debug_check(entries, epoch);
    let mut e = frame(CAT_MAGIC);
    e.0.reserve(entries.iter().map(entry_len).sum::<usize>() + 48);
    put_header(&mut e, disk, epoch, level, entries.len());
    for x in entries {
        put_cut(&mut e, &x.cut);
        e.u64(x.committed_ns);
        put_stamp(&mut e, x.cut.group.as_ref());
    }
    e.crc();
    e.0
}

/// Encodes a version-3 segment, as builds before group stamps wrote them (this build
/// never writes one): for tests and fuzz seeds that check such stores still read.
/// Entries carrying a stamp cannot be encoded in version 3 (their stamp would be lost).
pub fn encode_catalog_v3(
    disk: &DiskId,
    epoch: u64,
    level: u8,
    entries: &[CatalogEntry],
) -> Vec<u8> {
    debug_check(entries, epoch);
    assert!(
        entries.iter().all(|x| x.cut.group.is_none()),
        "a version-3 catalog segment has no room for a group stamp"
    );
    let mut e = frame_as(CAT_MAGIC, V3);
    put_header(&mut e, disk, epoch, level, entries.len());
    for x in entries {
        put_cut(&mut e, &x.cut);
        e.u64(x.committed_ns);
    }
    e.crc();
    e.0
}

fn put_header(e: &mut Enc, disk: &DiskId, epoch: u64, level: u8, n: usize) {
    e.bytes(&disk.0);
    e.u64(epoch);
    e.u8(level);
    e.u32(n as u32);
}

/// Decodes a catalog segment (version 3 or 4) and checks it against its parsed name.
pub fn decode_catalog(
    buf: &[u8],
    disk: &DiskId,
    name: &CatName,
) -> Result<Vec<CatalogEntry>, Corruption> {
    let mut d = unframe(buf, CAT_MAGIC, "catalog segment")?;
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("unframe checked the length"));
    let (stamped, min_len) = match version {
        V3 => (false, CATALOG_V3_ENTRY_LEN),
        STAMPED_VERSION => (true, CATALOG_ENTRY_MIN_LEN),
        _ => {
            return Err(Corruption::Invalid {
                what: "catalog segment version (segments exist from format 3)",
            });
        }
    };
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
    let n = d.count("catalog entry count", min_len, MAX_CATALOG_ENTRIES)?;
    if n == 0 {
        return Err(Corruption::Invalid {
            what: "catalog segment without entries",
        });
    }
    let mut v: Vec<CatalogEntry> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cut = get_cut(&mut d, epoch)?;
        let committed_ns = d.u64("commit time")?;
        if stamped {
            cut.group = get_stamp(&mut d)?;
        }
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
/// A `.cut` has no group stamp: `c.group` is not encoded.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{catalog_name, parse_catalog};
    use crate::types::{GroupId, MAX_GROUP_MEMBERS};

    const DISK: DiskId = DiskId([9; 16]);

    fn stamp(instant_ns: u64) -> GroupStamp {
        GroupStamp {
            group: GroupId([4; 16]),
            instant_ns,
            members: 3,
            offset_ns: -1_500,
            error_ns: 2_000_000,
        }
    }

    /// Entries 1..=3 of epoch 2; the second carries a stamp.
    fn entries() -> Vec<CatalogEntry> {
        (1..=3)
            .map(|id| CatalogEntry {
                cut: CutInfo {
                    epoch: 2,
                    cut_id: id,
                    seq: 10 * id,
                    time_ns: 1_000 + id,
                    mono_ns: 7 + id,
                    kind: CutKind::Crash,
                    group: (id == 2).then(|| stamp(60_000_000_000)),
                    mac: [id as u8; POINT_MAC_LEN],
                },
                committed_ns: 5_000 + id,
            })
            .collect()
    }

    fn name() -> CatName {
        parse_catalog(&catalog_name(&DISK, 2, 1, 3, 0)).expect("a catalog name")
    }

    fn recrc(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len() - 4;
        let c = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// The error `decode_catalog` refuses `b` with, for [`name`].
    fn refused(b: &[u8]) -> Corruption {
        decode_catalog(b, &DISK, &name()).expect_err("a hostile segment is refused")
    }

    /// An `Invalid` error, as `refused`'s result prints.
    fn invalid(what: &'static str) -> String {
        format!("{:?}", Corruption::Invalid { what })
    }

    /// Offset of the first entry: magic 8, version 4, disk 16, epoch 8, level 1, n 4.
    const ENTRIES_AT: usize = 41;

    #[test]
    fn a_version_4_segment_round_trips_with_and_without_stamps() {
        let v = entries();
        let b = encode_catalog(&DISK, 2, 0, &v);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 4);
        let want = ENTRIES_AT as u64 + 2 * CATALOG_ENTRY_MIN_LEN + CATALOG_ENTRY_MAX_LEN + 4;
        assert_eq!(b.len() as u64, want, "two plain entries and a stamped one");
        // The first entry ends with a 0 flag; the second's flag is 1, then its stamp.
        let flag = ENTRIES_AT + CATALOG_V3_ENTRY_LEN as usize;
        assert_eq!(b[flag], 0);
        let second = ENTRIES_AT + CATALOG_ENTRY_MIN_LEN as usize;
        let flag = second + CATALOG_V3_ENTRY_LEN as usize;
        assert_eq!(b[flag], 1);
        assert_eq!(
            b[flag + 1..flag + 1 + GROUP_STAMP_LEN],
            stamp(60_000_000_000).to_bytes()
        );
        assert_eq!(decode_catalog(&b, &DISK, &name()).expect("decodes"), v);
    }

    #[test]
    fn a_version_3_segment_still_reads_as_cuts_without_stamps() {
        let mut v = entries();
        v[1].cut.group = None;
        let b = encode_catalog_v3(&DISK, 2, 0, &v);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 3);
        assert_eq!(
            b.len() as u64,
            ENTRIES_AT as u64 + 3 * CATALOG_V3_ENTRY_LEN + 4
        );
        assert_eq!(decode_catalog(&b, &DISK, &name()).expect("decodes"), v);
    }

    #[test]
    fn hostile_stamps_flags_counts_and_tails_are_refused() {
        let good = encode_catalog(&DISK, 2, 0, &entries());
        let first_flag = ENTRIES_AT + CATALOG_V3_ENTRY_LEN as usize;
        let second_flag =
            ENTRIES_AT + CATALOG_ENTRY_MIN_LEN as usize + CATALOG_V3_ENTRY_LEN as usize;
        let members_at = second_flag + 1 + 24;

        let mut flag = good.clone();
        flag[first_flag] = 2;
        assert_eq!(
            format!("{:?}", refused(&recrc(flag))),
            invalid("group stamp flag (must be 0 or 1)")
        );
        for members in [0, MAX_GROUP_MEMBERS + 1] {
            let mut b = good.clone();
            b[members_at..members_at + 2].copy_from_slice(&members.to_le_bytes());
            assert_eq!(
                format!("{:?}", refused(&recrc(b))),
                invalid("group stamp (member count is 0 or above MAX_GROUP_MEMBERS)"),
                "members {members}"
            );
        }
        // A flag of 1 on the last entry with its stamp cut off.
        let mut last = entries();
        last[2].cut.group = Some(stamp(1));
        let b = encode_catalog(&DISK, 2, 0, &last);
        let cut = b[..b.len() - 4 - 10].to_vec();
        let e = refused(&recrc([cut, vec![0; 4]].concat()));
        assert!(
            matches!(
                e,
                Corruption::Truncated {
                    what: "group stamp",
                    ..
                }
            ),
            "{e:?}"
        );
        // One byte after the last entry.
        let mut tail = good[..good.len() - 4].to_vec();
        tail.extend_from_slice(&[0, 0, 0, 0, 0]);
        assert!(matches!(
            refused(&recrc(tail)),
            Corruption::Trailing { extra: 1 }
        ));
    }

    #[test]
    fn the_count_is_bounded_by_the_smallest_entry_of_the_version_before_allocating() {
        // 3 entries' bytes at the v3 size: enough for 3 version-3 entries, not for 3
        // version-4 ones (each at least one byte longer).
        let mut v = entries();
        v[1].cut.group = None;
        let v3 = encode_catalog_v3(&DISK, 2, 0, &v);
        let mut as_v4 = v3.clone();
        as_v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        let e = refused(&recrc(as_v4));
        assert!(
            matches!(
                e,
                Corruption::Length {
                    what: "catalog entry count",
                    value: 3,
                    max: 2,
                }
            ),
            "{e:?}"
        );
        // A count far beyond the bytes is refused by the same check.
        let mut huge = encode_catalog(&DISK, 2, 0, &entries());
        huge[ENTRIES_AT - 4..ENTRIES_AT].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(matches!(
            refused(&recrc(huge)),
            Corruption::Length {
                value: 1_000_000,
                ..
            }
        ));
        // Segments begin at format 3.
        let mut v2 = v3;
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            format!("{:?}", refused(&recrc(v2))),
            invalid("catalog segment version (segments exist from format 3)")
        );
    }

    #[test]
    fn a_legacy_cut_carries_no_stamp() {
        let mut c = entries()[1].cut;
        let b = encode_cut(&DISK, &c);
        c.group = None;
        assert_eq!(decode_cut(&b, &DISK, (2, 2)).expect("decodes"), c);
    }
}
