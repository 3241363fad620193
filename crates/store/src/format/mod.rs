//! Object names and the binary/JSON encodings of every stored object.
//!
//! All integers are little-endian. Every metadata object is framed as
//! `magic (8) | version u32 | body | crc32c u32` where the CRC covers all
//! preceding bytes. Decoders bound every count/length against the bytes that
//! remain before allocating, and report [`Corruption`] values that callers
//! wrap with the object name.
//!
//! Invariants shared by every object kind:
//!
//! * objects are immutable once written: an encoder's output is the whole
//!   object, and nothing is ever patched in place;
//! * every encoding carries [`FORMAT_VERSION`] and decoders refuse a version
//!   outside [`OLDEST_READABLE_VERSION`]`..=`[`FORMAT_VERSION`] ([`Corruption::Version`]);
//! * every object is checksummed with CRC32C (metadata objects as a whole,
//!   packs per record and per directory, epochs over their `info`);
//! * where an object's name encodes fields (epoch, seqs, generation), its
//!   body repeats them and readers check the two agree, so a renamed or
//!   misplaced object is reported as corrupt rather than silently used: the
//!   index, checkpoint, catalog and epoch decoders take the parsed name, and
//!   a pack's epoch is checked against its name by [`crate::Store::verify`];
//! * every object but the GC marker and the epoch carries the disk id, and
//!   decoders refuse an object of another disk.
//!
//! One file per object kind, each stating its byte layout:
//!
//! | module | object |
//! |---|---|
//! | `names` | object names: building and parsing them |
//! | `primitives` | shared little-endian/CRC helpers: framing, extents, names, pack name tables |
//! | `pack` | `.pack`: header, batch records, footer directory |
//! | `index` | `.idx`: index segments |
//! | `checkpoint` | `.ckpt`: extent map of an epoch as of a seq |
//! | `catalog` | `.cat`: catalog segments of committed recovery points, with their group stamps (and the legacy one-point `.cut`) |
//! | `gc_marker` | `.doomed`: packs pending deletion |
//! | `epoch` | `.json`: epoch descriptions |
//! | `key` | `.json`: key rotations of an epoch |

use crate::error::{Corruption, Error, Result};

mod catalog;
mod checked_json;
mod checkpoint;
mod epoch;
mod gc_marker;
mod index;
mod key;
mod names;
mod pack;
mod primitives;

pub use catalog::{
    CATALOG_ENTRY_MAX_LEN, CATALOG_ENTRY_MIN_LEN, CATALOG_V3_ENTRY_LEN, CatalogEntry,
    MAX_CATALOG_ENTRIES, decode_catalog, decode_cut, encode_catalog, encode_catalog_v3, encode_cut,
};
pub use checkpoint::{Checkpoint, RunTarget, decode_checkpoint, encode_checkpoint};
pub use epoch::{decode_epoch, encode_epoch};
pub use gc_marker::{decode_pending_delete, encode_pending_delete};
pub use index::{IndexEntry, Segment, decode_segment, encode_segment};
pub use key::{decode_key_rotation, encode_key_rotation};
pub use names::{
    CatName, CkptName, SegName, catalog_name, checkpoint_name, cut_name, disk_dir, epoch_name,
    index_name, key_rotation_name, pack_name, parse_catalog, parse_checkpoint, parse_cut,
    parse_epoch, parse_index, parse_key_rotation, parse_pack, parse_pending_delete,
    pending_delete_name,
};
pub use pack::{
    DirEntry, MAX_EXTENTS, MAX_SEALED, PACK_HEADER_LEN, ParsedPack, REC_FIXED_LEN, Record,
    decode_record, encode_record, pack_footer, pack_header, parse_pack_bytes,
};
pub use primitives::MAX_NAME;

/// Format version written by this build (all object kinds).
///
/// History: 1 = first format; 2 = catalog entries carry the agent's point MAC and
/// checkpoint zero/discard runs name their batch (issue 12, decision 0012). Version-1
/// objects cannot be authenticated, so they are refused ([`Corruption::Version`]);
/// 3 = the catalog is kept in segments (`.cat`, many points per object, with the
/// server's commit time) that the writer compacts (decision 0014). Every other object
/// kind is laid out as in version 2, and version-2 objects (including one-point `.cut`
/// catalog entries) are still read; every object is written as version 3 so that an
/// older build refuses the store loudly instead of missing its `.cat` points;
/// 4 = every catalog segment entry ends with a flag and, when set, the cut's
/// consistency-group stamp (issue 16). Every other object kind is laid out as in
/// version 2; version-3 segments (no flags) and every version-2/3 object are still read,
/// and every object is written as version 4, for the same reason as in version 3.
pub const FORMAT_VERSION: u32 = 4;

/// Oldest format version this build reads ([`FORMAT_VERSION`] is the newest).
pub const OLDEST_READABLE_VERSION: u32 = 2;

/// Refuses a version outside `OLDEST_READABLE_VERSION..=FORMAT_VERSION`.
pub(crate) fn check_version(found: u32) -> Result<(), Corruption> {
    if (OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&found) {
        Ok(())
    } else {
        Err(Corruption::Version {
            found,
            supported: FORMAT_VERSION,
        })
    }
}

/// Wraps a [`Corruption`] with the object name.
pub(crate) fn named<T>(r: Result<T, Corruption>, object: &str) -> Result<T> {
    r.map_err(|p| Error::corrupt(object, p))
}
