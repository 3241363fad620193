//! Plain input/output types. The ids and extents are ripcord's shared ones
//! (`ripcord-types`), the same the wire protocol carries.

use std::collections::BTreeMap;
use std::sync::Arc;

pub use ripcord_types::{
    CutKind, DiskId, Extent, ExtentKind, GROUP_STAMP_LEN, GroupId, GroupStamp, MAX_GROUP_MEMBERS,
    SECTOR_BYTES,
};

/// One sealed batch exactly as received from the agent. The store never sees
/// plaintext: `sealed` is opaque. Once unsealed, the plaintext is the
/// concatenation of the [`ExtentKind::Data`] extents' bytes in extent order
/// (Zero and Discard extents carry none); [`RunSource::Data::offset`] indexes
/// into that plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedBatch {
    /// Epoch (full-resync generation) of the batch.
    pub epoch: u64,
    /// Sequence number within the epoch (starts at 1, contiguous).
    pub seq: u64,
    /// Changed ranges, in order (later extents win where they overlap).
    pub extents: Vec<Extent>,
    /// Opaque batch flags, stored verbatim.
    pub flags: u32,
    /// Sealed (compressed + encrypted) payload, stored verbatim.
    pub sealed: Vec<u8>,
}

/// A consistency cut reported by the agent: the disk state after applying
/// every batch of `epoch` with `seq <= self.seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CutInfo {
    /// Epoch of the cut.
    pub epoch: u64,
    /// Agent-assigned cut id (increasing within an epoch).
    pub cut_id: u64,
    /// All batches with `seq <= self.seq` are included.
    pub seq: u64,
    /// Wall-clock time of the cut, unix nanoseconds.
    pub time_ns: u64,
    /// Monotonic time of the cut on the agent, nanoseconds.
    pub mono_ns: u64,
    /// Crash- or application-consistent.
    pub kind: CutKind,
    /// Set when the cut is its disk's member of a consistency group's point: the group,
    /// the coordinator's instant, how many disks the group point must have, and the
    /// clock-error bound (see [`GroupStamp`] and [`crate::groups`]). `None` for a cut the
    /// agent placed on its own schedule. Covered by the MAC like the fields above.
    pub group: Option<GroupStamp>,
    /// The agent's MAC over the fields above, under a key derived from the disk's data
    /// key (`ripcord_seal::point_mac` over `ripcord_proto::aead::cut_aad`). Opaque to the
    /// store, which cannot forge it; failover checks it before using the point.
    pub mac: [u8; POINT_MAC_LEN],
}

/// Length of [`CutInfo::mac`].
pub const POINT_MAC_LEN: usize = 32;

/// Description of one epoch (a full resync) of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochInfo {
    /// The epoch number (increasing per disk).
    pub epoch: u64,
    /// Machine the disk belongs to.
    pub machine_id: String,
    /// Disk size in bytes.
    pub size_bytes: u64,
    /// Logical sector size of the source disk.
    pub sector_size: u32,
    /// Data key sealed to the deployment escrow key; opaque to the store.
    pub wrapped_key: Vec<u8>,
    /// The device path the machine said it protects the disk as (e.g. `/dev/sdb`), when
    /// the epoch began: the agent's unauthenticated claim, shown to people only (never
    /// used to place or restore data). `None` in epochs written before names were kept.
    pub device: Option<String>,
}

/// A newer data key for an epoch's batches from `from_seq` on (an agent restarted and
/// continued the epoch; see `format::key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRotation {
    /// The epoch whose key rotates.
    pub epoch: u64,
    /// The first batch sealed with this key.
    pub from_seq: u64,
    /// The data key sealed to the deployment escrow key; opaque to the store.
    pub wrapped_key: Vec<u8>,
}

/// A committed recovery point (a cut whose batches are all durable).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecoveryPoint {
    /// Stable id: `"<epoch>-<cut_id>"`.
    pub id: String,
    /// Epoch of the point.
    pub epoch: u64,
    /// Cut id.
    pub cut_id: u64,
    /// Covers all batches of `epoch` with `seq <= self.seq`.
    pub seq: u64,
    /// Wall-clock time, unix nanoseconds.
    pub time_ns: u64,
    /// Agent monotonic time, nanoseconds.
    pub mono_ns: u64,
    /// Crash- or application-consistent.
    pub kind: CutKind,
    /// The cut's consistency-group stamp ([`CutInfo::group`]), if it is a member of a
    /// group point.
    pub group: Option<GroupStamp>,
    /// The agent's MAC over the point ([`CutInfo::mac`]): check it with the disk's data
    /// key before trusting any field above.
    pub mac: [u8; POINT_MAC_LEN],
    /// When the store's writer committed the point (its wall clock, unix ns): the time
    /// retention compares. Not covered by the MAC (the agent never sees it).
    pub committed_ns: u64,
    /// The catalog object the point was read from (for error messages; a compaction
    /// may move it to another object later).
    pub catalog_object: Arc<str>,
}

impl RecoveryPoint {
    /// The agent's cut this point is, every field the MAC covers plus the MAC.
    pub fn cut(&self) -> CutInfo {
        CutInfo {
            epoch: self.epoch,
            cut_id: self.cut_id,
            seq: self.seq,
            time_ns: self.time_ns,
            mono_ns: self.mono_ns,
            kind: self.kind,
            group: self.group,
            mac: self.mac,
        }
    }

    /// A point made from a cut (commit time 0, no catalog object): to resolve a cut
    /// known from elsewhere, e.g. the journal.
    pub fn from_cut(c: &CutInfo) -> RecoveryPoint {
        RecoveryPoint {
            id: format!("{}-{}", c.epoch, c.cut_id),
            epoch: c.epoch,
            cut_id: c.cut_id,
            seq: c.seq,
            time_ns: c.time_ns,
            mono_ns: c.mono_ns,
            kind: c.kind,
            group: c.group,
            mac: c.mac,
            committed_ns: 0,
            catalog_object: Arc::from(""),
        }
    }
}

/// Where one sealed batch lives: a byte range of a pack object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchLocation {
    /// Pack object name, relative to the store root.
    pub pack: String,
    /// Offset of the batch record inside the pack.
    pub offset: u64,
    /// Length of the batch record (header + sealed bytes + checksum).
    pub length: u64,
    /// Epoch of the batch.
    pub epoch: u64,
    /// Sequence number of the batch.
    pub seq: u64,
    /// CRC32C of the record (also stored inside the record).
    pub checksum: u32,
}

/// Where the bytes of a [`Run`] come from. Every source names the batch whose extent
/// put it there, so a reader can check it against that batch's authenticated extent
/// list ([`Plan::check_placement`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunSource {
    /// The range reads as zeros (a Zero extent of batch `seq`).
    Zero {
        /// Sequence number of the batch (key into [`Plan::locations`]).
        seq: u64,
    },
    /// The range was discarded (a Discard extent of batch `seq`; reads as zeros on a
    /// fresh target; may be trimmed).
    Discard {
        /// Sequence number of the batch (key into [`Plan::locations`]).
        seq: u64,
    },
    /// The range is in batch `seq` (see [`Plan::locations`]) at byte `offset`
    /// of its plaintext (the concatenated Data extents).
    Data {
        /// Sequence number of the batch (key into [`Plan::locations`]).
        seq: u64,
        /// Byte offset inside the batch plaintext.
        offset: u64,
    },
}

impl RunSource {
    /// The batch the run comes from.
    pub fn seq(&self) -> u64 {
        match *self {
            RunSource::Zero { seq } | RunSource::Discard { seq } | RunSource::Data { seq, .. } => {
                seq
            }
        }
    }
}

/// A sector range of the recovered disk and its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Run {
    /// First sector (512-byte units).
    pub sector: u64,
    /// Length in sectors.
    pub sectors: u64,
    /// Where the bytes come from.
    pub source: RunSource,
}

/// A resolved recovery point: which bytes to copy from where.
///
/// The runs are derived from index segments and checkpoints, which only carry CRCs:
/// someone who can write the bucket can change them. They are hints until checked:
/// before placing any byte of batch `seq`, a reader authenticates the batch (its
/// extent list is part of its AEAD additional data) and calls
/// [`Plan::check_placement`] with that authenticated list.
///
/// Ranges not covered by any run were never written in this epoch (a full
/// resync writes every sector, so they only appear for points taken before the
/// initial sync finished); treat them as zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The epoch's description (incl. wrapped data key).
    pub epoch: EpochInfo,
    /// Disk size in bytes.
    pub size_bytes: u64,
    /// Non-overlapping runs sorted by sector.
    pub runs: Vec<Run>,
    /// Location of every batch referenced by a run (of any kind), by seq.
    pub locations: BTreeMap<u64, BatchLocation>,
    /// The index object (segment or checkpoint) whose metadata placed each batch of
    /// [`Plan::locations`], by seq: the object a placement mismatch names.
    pub placed_by: BTreeMap<u64, String>,
}

impl Plan {
    /// Distinct batches needed, ordered by pack name then offset, so a pack
    /// can be read sequentially (or with coalesced range requests).
    pub fn batches(&self) -> Vec<BatchLocation> {
        let mut v: Vec<BatchLocation> = self.locations.values().cloned().collect();
        v.sort_by(|a, b| (&a.pack, a.offset).cmp(&(&b.pack, b.offset)));
        v
    }

    /// Runs whose bytes come from batch `seq`, in sector order.
    pub fn runs_for(&self, seq: u64) -> impl Iterator<Item = &Run> {
        self.runs
            .iter()
            .filter(move |r| matches!(r.source, RunSource::Data { seq: s, .. } if s == seq))
    }

    /// Runs of every kind that batch `seq` placed, in sector order.
    pub fn runs_placed_by(&self, seq: u64) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.source.seq() == seq)
    }

    /// Total bytes that must be copied out of batches.
    pub fn data_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| matches!(r.source, RunSource::Data { .. }))
            .map(|r| r.sectors * SECTOR_BYTES)
            .sum()
    }
}

/// What a [`crate::DiskWriter::flush`] made durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Current epoch (0 if no epoch was begun).
    pub epoch: u64,
    /// Every batch of `epoch` with `seq <= durable_seq` is committed (0 = none).
    /// The journal may be trimmed up to here.
    pub durable_seq: u64,
    /// Cut ids of `epoch` committed to the catalog by this call (including
    /// any committed by an earlier call that then failed).
    pub cuts_committed: Vec<u64>,
    /// Nothing remains to do for any cut of `epoch` with an id up to here: each is in
    /// the catalog (committed now, by an earlier call, or by an earlier writer of this
    /// disk, which a reopened writer discovers) or was refused as a duplicate of one that
    /// is. Cuts above it are pending. The journal may be trimmed through such cuts, and
    /// this holds across writer restarts, unlike `cuts_committed` (0 = none).
    pub cuts_through: u64,
}
