//! # ripcord-store: the target-store format of ripcord
//!
//! Agents stream sealed (compressed + AES-256-GCM) batches of changed blocks;
//! the uploader ships them here with a [`DiskWriter`]; `ripcord failover`
//! lists [`RecoveryPoint`]s, [`Store::resolve`]s one to a [`Plan`] and
//! fetches the batches it names with [`Store::fetch_batch`]. The store never
//! sees plaintext or keys: sealed payloads are stored verbatim.
//!
//! Works on any [`object_store::ObjectStore`]: a local directory (made durable by
//! [`local::DurableLocal`]: a put returns only once fsynced), S3-compatible storage or
//! memory. Every object is immutable once written (no
//! read-modify-write, no rename), objects are few and large where it matters
//! (packs), and readers only touch index metadata to resolve a point.
//!
//! ## On-store layout
//!
//! Names are relative to the store root (`<disk>` = 32 hex digits, numbers
//! zero-padded to 20 digits so names sort numerically).
//!
//! | object | content | written by | deleted by |
//! |---|---|---|---|
//! | `escrow.json` | deployment escrow metadata, opaque ([`Store::put_escrow`]) | integrator, once | never |
//! | `disks/<disk>/epochs/<E>.json` | [`EpochInfo`] as JSON + CRC32C of its `info` | writer, before any pack of `E` | GC (whole epoch, last) |
//! | `disks/<disk>/packs/<E>-<first_seq>-<rand64hex>.pack` | header, batch records back to back, footer directory (binary, below) | writer; GC rewrites | GC after grace |
//! | `disks/<disk>/index/<E>-<last>-<first>-<gen:08>.idx` | index segment: every batch of `first..=last` with pack name, offset, length, CRC, flags, extents | writer (gen 0) after its packs; GC (gen+1) | GC |
//! | `disks/<disk>/checkpoints/<E>-<seq>-<gen:08>.ckpt` | extent map of `E` as of `seq`: sector runs -> (batch, plaintext offset) or zero/discard (of a batch), batch locations | writer every N batches; GC (gen+1) | GC |
//! | `disks/<disk>/catalog/<E>-<first>-<last>-<level:02>-<rand64hex>.cat` | catalog segment: committed recovery points `first..=last` of `E` ([`CutInfo`] with the agent's MAC and group stamp, and the server's commit time) | writer (one per flush, level 0; compaction merges 16 of a level into one of the next) | compaction (after its merge is stored); GC (retention rewrites) |
//! | `disks/<disk>/catalog/<E>-<cut_id>.cut` | one recovery point, format 2 (read, never written) | writers before format 3 | compaction, GC |
//! | `disks/<disk>/catalog/retention-<K>-<E>-<C>.ret` | empty: points committed before `K` and older than `(E, C)` are expired | GC | GC (when superseded) |
//! | `disks/<disk>/gc/<time_ns>-<rand>.doomed` | packs found unreferenced and when first seen | GC | GC |
//!
//! ### Binary encodings (little-endian)
//!
//! * **Metadata objects** (`.idx`, `.ckpt`, `.cat`, `.cut`, `.doomed`):
//!   `magic[8] | version u32 | body | crc32c u32` (CRC over everything before
//!   it). Decoders bound every count by the bytes remaining before
//!   allocating, check the body against the object name, and return
//!   [`Error::Corrupt`] naming the object.
//! * **Pack**: `"RCPACK01" | version u32 | disk[16] | epoch u64`, then records
//!   `"RCB1" | epoch u64 | seq u64 | flags u32 | n_extents u32 | sealed_len u64
//!   | n × (sector u64, sectors u32, kind u8) | sealed bytes | crc32c u32`
//!   (CRC over the record), then the directory `n × (seq u64, offset u64,
//!   length u64, crc u32) | n u32 | crc32c u32 | "RCPKEND1"`.
//!
//! A batch's plaintext (after unsealing) is the concatenation of its
//! [`ExtentKind::Data`] extents' bytes in extent order; Zero and Discard
//! extents carry no bytes.
//!
//! ## Resolution
//!
//! A point `(E, S)` = for every sector, its latest location among the batches
//! of epoch `E` with `seq <= S` (epochs are full resyncs, self-sufficient).
//! [`Store::resolve`] lists checkpoints and the segments after the newest
//! checkpoint `C <= S` (listing starts after `C`), reads that checkpoint and
//! those segments, and applies the entries in `(C, S]`: cost is bounded by
//! the checkpoint interval, not by history.
//!
//! ## Trust
//!
//! Only sealed batches are authenticated (their extent list is part of their AEAD
//! additional data); every metadata object carries just a CRC, which someone who can write
//! the bucket can recompute. So a [`Plan`] is a hint: readers that hold the data key check
//! it batch by batch against the authenticated extent lists ([`Placement::check`]), and
//! check a point's MAC ([`CutInfo::mac`]) before using it. The store itself holds no key and
//! checks neither (decision 0012).
//!
//! ## Writing, retention, verification
//!
//! See [`writer`] for the commit protocol and crash behaviour, [`catalog`] for the
//! catalog's segments, their compaction and its crash-safety invariants, [`groups`] for
//! consistency-group points derived from the catalogs of several disks, [`gc`] for the
//! retention/GC protocol and its safety against a concurrent writer, and
//! [`Store::verify`] for the offline check.

#![warn(missing_docs)]

pub mod catalog;
mod error;
pub mod format;
pub mod gc;
pub mod groups;
pub mod local;
mod placement;
mod resolve;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod types;
mod verify;
pub mod writer;

pub use catalog::CATALOG_FANOUT;
pub use error::{Corruption, Error, PlacementProblem, Result};
pub use gc::{GcConfig, GcReport};
pub use groups::GroupPoint;
pub use placement::Placement;
pub use store::{ESCROW_OBJECT, Store};
pub use types::{
    BatchLocation, Committed, CutInfo, CutKind, DiskId, EpochInfo, Extent, ExtentKind,
    GROUP_STAMP_LEN, GroupId, GroupStamp, KeyRotation, MAX_GROUP_MEMBERS, POINT_MAC_LEN, Plan,
    RecoveryPoint, Run, RunSource, SECTOR_BYTES, SealedBatch,
};
pub use verify::{Damage, VerifyReport};
pub use writer::{DiskWriter, WriterConfig};
