//! Checkpoints (`.ckpt`): the extent map of an epoch as of a seq, so
//! resolution reads one checkpoint plus the index segments after it instead
//! of the whole history.
//!
//! Byte layout (little-endian, inside the metadata frame of
//! [`primitives`](super::primitives)):
//!
//! ```text
//! "RCCKPT01" | version u32
//! | disk[16] | epoch u64 | seq u64 | generation u32
//! | pack name table: n_packs u32 | n_packs × (len u16, name)
//! | n_locations u32 | n_locations × (seq u64 | pack u32 | offset u64 | length u64 | checksum u32)
//! | n_runs u32 | n_runs × (start u64 | sectors u64 | kind u8 | seq u64 | offset u64)
//! | crc32c u32
//! ```
//!
//! A run is a sector range and its [`RunTarget`]: kind `0` Data (batch
//! `seq`, byte `offset` into its plaintext), `1` Zero, `2` Discard (both from
//! a Zero/Discard extent of batch `seq`; `offset` is 0). Every run names its
//! batch, so a reader can check it against that batch's authenticated extent
//! list before placing anything ([`crate::Plan::check_placement`]); a
//! checkpoint's runs are otherwise only CRC-protected hints. A location is
//! where batch `seq` of this epoch is stored (`pack` is a position in the
//! pack name table).
//!
//! Invariants, checked by [`decode_checkpoint`]:
//!
//! * the disk id is the reader's, and `(epoch, seq, generation)` equals the
//!   object's name;
//! * no location and no run is of a batch outside `1..=seq` of the checkpoint
//!   (a location's or run's seq 0 or after the checkpoint is refused); every
//!   pack reference is within the table;
//! * runs are non-empty, sorted by start sector, non-overlapping, and do
//!   not overflow `u64`;
//! * at most `1 << 24` pack names, `1 << 26` locations and `1 << 28` runs.
//!
//! Not checked here: that every run's batch has a location (the writer
//! and GC keep exactly the locations their runs refer to; resolution
//! refuses a point whose runs name a batch with no location,
//! [`crate::Error::MissingBatch`]).

use super::names::CkptName;
use super::primitives::{decode_names, frame, pack_ref, pack_table, unframe};
use crate::error::Corruption;
use crate::types::{BatchLocation, DiskId};

const CKPT_MAGIC: &[u8; 8] = b"RCCKPT01";

/// What a checkpoint run points at: zeros, a discard, or bytes of a batch,
/// each from an extent of batch `seq`.
///
/// The stored form of a run's source; [`crate::RunSource`] is the same
/// thing as handed to integrators in a [`crate::Plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunTarget {
    /// Zeros (a Zero extent of batch `seq`).
    Zero {
        /// Seq.
        seq: u64,
    },
    /// Discarded (a Discard extent of batch `seq`).
    Discard {
        /// Seq.
        seq: u64,
    },
    /// Batch `seq` at plaintext `offset`.
    Data {
        /// Seq.
        seq: u64,
        /// Offset in the batch plaintext.
        offset: u64,
    },
}

impl RunTarget {
    /// The batch the run comes from.
    pub fn seq(&self) -> u64 {
        match *self {
            RunTarget::Zero { seq } | RunTarget::Discard { seq } | RunTarget::Data { seq, .. } => {
                seq
            }
        }
    }
}

impl From<RunTarget> for crate::RunSource {
    fn from(t: RunTarget) -> crate::RunSource {
        match t {
            RunTarget::Zero { seq } => crate::RunSource::Zero { seq },
            RunTarget::Discard { seq } => crate::RunSource::Discard { seq },
            RunTarget::Data { seq, offset } => crate::RunSource::Data { seq, offset },
        }
    }
}

impl From<crate::RunSource> for RunTarget {
    fn from(s: crate::RunSource) -> RunTarget {
        match s {
            crate::RunSource::Zero { seq } => RunTarget::Zero { seq },
            crate::RunSource::Discard { seq } => RunTarget::Discard { seq },
            crate::RunSource::Data { seq, offset } => RunTarget::Data { seq, offset },
        }
    }
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
    pub runs: Vec<(u64, u64, RunTarget)>,
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
            RunTarget::Zero { seq } => {
                e.u8(1);
                e.u64(*seq);
                e.u64(0);
            }
            RunTarget::Discard { seq } => {
                e.u8(2);
                e.u64(*seq);
                e.u64(0);
            }
            RunTarget::Data { seq, offset } => {
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
        if s == 0 || s > seq {
            return Err(Corruption::Invalid {
                what: "location seq (0 or after checkpoint)",
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
            0 => RunTarget::Data {
                seq: s,
                offset: off,
            },
            1 => RunTarget::Zero { seq: s },
            2 => RunTarget::Discard { seq: s },
            _ => return Err(Corruption::Invalid { what: "run kind" }),
        };
        if s == 0 || s > seq {
            return Err(Corruption::Invalid {
                what: "run seq (0 or after checkpoint)",
            });
        }
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
