//! Catalog entries (`.cut`): one committed recovery point each.
//!
//! Byte layout (little-endian, inside the metadata frame of
//! [`primitives`](super::primitives)):
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
//! * kept by the writer: an entry is written only once every batch of its
//!   epoch with `seq <=` the cut's `seq` is indexed, and cuts are committed
//!   in id order with non-decreasing seqs. An entry that exists is therefore
//!   a complete, resolvable point (until retention deletes it).

use super::primitives::{frame, unframe};
use crate::error::Corruption;
use crate::types::{CutInfo, CutKind, DiskId, POINT_MAC_LEN};

const CUT_MAGIC: &[u8; 8] = b"RCCUT001";

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
    e.bytes(&c.mac);
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
        mac: d
            .take(POINT_MAC_LEN as u64, "point MAC")?
            .try_into()
            .expect("took exactly the MAC length"),
    };
    d.finish()?;
    if (c.epoch, c.cut_id) != name {
        return Err(Corruption::Mismatch {
            what: "object name (epoch/cut id)",
        });
    }
    Ok(c)
}
