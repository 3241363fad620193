//! What the process server holds of each block, as far as this agent can vouch for it
//! after a crash: the **acknowledged-digest map** of a disk's epoch (decision 0025, from
//! decision 0019 item 3). A restarted agent reads its device, compares each 4 KiB block
//! with the map, and sends only the blocks that differ or are unknown: the epoch
//! continues instead of a full resync.
//!
//! # File
//! `<state-dir>/acked/<disk>.map`, mode 0600: a 4 KiB header (magic `RIPCAMAP`, version,
//! block size, disk id, epoch, device size, a check value of the digest key, CRC32C),
//! then 16 bytes per block, sparse. An entry is all zero bytes for **unknown** (a new map
//! is all unknown), or the block's keyed digest (`ripcord_digest`), with the digest of a
//! zero block stored as `ff..ff` (the digest crate's remapped zero: 2^-128 apart).
//! The digest key comes from `<state-dir>/acked/digest.key` (32 random bytes, 0600).
//!
//! # Invariant: every entry is unknown, or the digest of what the server holds
//! - **Intent first.** Before a batch is sent ([`AckedMap::intent`], then
//!   [`AckedMap::sync`] before the batch leaves the producer), every block it touches is
//!   written unknown and that is made durable. So whatever reached the server, a crash
//!   never leaves an entry claiming older content for a block a later batch changed.
//! - **Digests after the acknowledgement.** When the server acknowledges a batch as
//!   durable ([`AckedMap::acked_through`]), the digests of the whole blocks it carried
//!   become due, but only for blocks no later batch has touched since (those stay unknown
//!   until their own acknowledgement; a later intent cancels a due digest). Due digests
//!   are written at most once a [`CHECKPOINT_EVERY`] ([`AckedMap::checkpoint`], and at a
//!   clean stop). These writes need no fsync: a lost one leaves the block unknown, which
//!   only sends it again.
//! - Blocks a batch covers only partly (writes smaller than 4 KiB) stay unknown, and so
//!   do zeroed and discarded ranges: sending them again costs a zero extent, no data, and
//!   a discard of a whole large disk then costs no memory per block.
//!
//! # Writing the map does not feed itself
//! The map usually lives on a protected disk (the root file system), so its own writes
//! are captured and replicated, and replicating them records intents. Two rules keep that
//! from becoming a loop of tiny rounds: an intent writes (and syncs) only entries that are
//! not already unknown, and digests are written at most once a checkpoint interval. A
//! block the agent keeps rewriting (the map's own pages among them) stays unknown between
//! checkpoints, at the cost of sending it again after a crash.
//!
//! A map whose header does not match the disk, epoch, size or key is not used: the agent
//! then starts a new epoch with a full sync, as it did before maps existed.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{File, OpenOptions},
    os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use ripcord_digest::key::{Digest, DigestKey};
use ripcord_proto::{DiskId, Extent, ExtentKind};

/// Bytes per block the map describes.
pub const BLOCK: u64 = 4096;
/// Acknowledged digests are written at most this often (see the module doc).
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const SECTORS_PER_BLOCK: u64 = BLOCK / 512;
const ENTRY: u64 = 16;
const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"RIPCAMAP";
const VERSION: u32 = 1;
const UNKNOWN: [u8; 16] = [0; 16];
const ZERO_BLOCK: [u8; 16] = [0xff; 16];
/// Bytes of the header covered by its CRC.
const HEADER_FIELDS: usize = 8 + 4 + 4 + 16 + 8 + 8 + 16;

/// What one batch touched (see [`AckedMap::intent`]).
#[derive(Default)]
struct Touched {
    /// First and last block of each extent.
    ranges: Vec<(u64, u64)>,
    /// Whole blocks and their entries.
    whole: Vec<(u64, [u8; 16])>,
}

/// The map's entry for a block digest.
fn encode(d: Digest) -> [u8; 16] {
    if d.is_zero() { ZERO_BLOCK } else { d.0 }
}

/// A map shared by a disk's producer (intents) and network side (acknowledgements).
pub type SharedAckedMap = std::sync::Arc<std::sync::Mutex<AckedMap>>;

/// A disk epoch's acknowledged-digest map (see the module doc).
pub struct AckedMap {
    path: PathBuf,
    file: File,
    key: DigestKey,
    blocks: u64,
    /// The newest batch that touched each block still waiting for its acknowledgement.
    last_sent: HashMap<u64, u64>,
    /// Per unacknowledged batch: the block ranges it touched, and the whole blocks it
    /// carried with their entries.
    pending: BTreeMap<u64, Touched>,
    /// Acknowledged entries not written yet (see [`AckedMap::checkpoint`]).
    due: BTreeMap<u64, [u8; 16]>,
    last_checkpoint: std::time::Instant,
    /// Unknown entries written since the last sync.
    dirty: bool,
}

impl std::fmt::Debug for AckedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckedMap")
            .field("path", &self.path)
            .field("blocks", &self.blocks)
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// The directory of the maps in a state directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("acked")
}

fn map_path(state_dir: &Path, disk: &DiskId) -> PathBuf {
    dir(state_dir).join(format!("{disk}.map"))
}

/// The digest key of the maps in `state_dir` (created on first use).
fn digest_key(state_dir: &Path) -> anyhow::Result<DigestKey> {
    let d = dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .with_context(|| format!("creating {}", d.display()))?;
    let path = d.join("digest.key");
    let secret = match std::fs::read(&path) {
        Ok(s) if s.len() == 32 => s,
        Ok(s) => bail!(
            "{} holds {} bytes, not 32: damaged (remove it and the maps next to it; the \
             next start then makes a full sync)",
            path.display(),
            s.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // 32 bytes from the OS RNG (a data key's generator).
            let s = ripcord_seal::DataKey::generate()?.expose_bytes().to_vec();
            ripcord_crashsafe::write_atomic(&path, &s, 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            s
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(DigestKey::derive(
        &secret,
        b"ripcord agent acknowledged-digest map",
    ))
}

fn header(disk: &DiskId, epoch: u64, size: u64, key: &DigestKey) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    h.extend_from_slice(&disk.0);
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&key.block(&[0x5a; BLOCK as usize]).0);
    debug_assert_eq!(h.len(), HEADER_FIELDS);
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

impl AckedMap {
    /// A new, all-unknown map for `epoch` of `disk` (`size` bytes), replacing any other.
    pub fn create(state_dir: &Path, disk: &DiskId, epoch: u64, size: u64) -> anyhow::Result<Self> {
        let key = digest_key(state_dir)?;
        let path = map_path(state_dir, disk);
        let tmp = path.with_extension("map.new");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let blocks = size.div_ceil(BLOCK);
        file.write_all_at(&header(disk, epoch, size, &key), 0)
            .and_then(|()| file.set_len(HEADER + blocks * ENTRY))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .and_then(|()| ripcord_crashsafe::sync_dir(&dir(state_dir)))
            .with_context(|| format!("installing {}", path.display()))?;
        Ok(AckedMap::new(path, file, key, blocks))
    }

    fn new(path: PathBuf, file: File, key: DigestKey, blocks: u64) -> AckedMap {
        AckedMap {
            path,
            file,
            key,
            blocks,
            last_sent: HashMap::new(),
            pending: BTreeMap::new(),
            due: BTreeMap::new(),
            last_checkpoint: std::time::Instant::now(),
            dirty: false,
        }
    }

    /// The map of `epoch` of `disk` (`size` bytes), if one exists and its header matches
    /// all of them and the key; `Ok(None)` otherwise (why is logged).
    pub fn open(
        state_dir: &Path,
        disk: &DiskId,
        epoch: u64,
        size: u64,
    ) -> anyhow::Result<Option<Self>> {
        let path = map_path(state_dir, disk);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let key = digest_key(state_dir)?;
        let want = header(disk, epoch, size, &key);
        let mut got = vec![0u8; want.len()];
        let blocks = size.div_ceil(BLOCK);
        let len = file.metadata()?.len();
        if file.read_exact_at(&mut got, 0).is_err() || got != want || len != HEADER + blocks * ENTRY
        {
            tracing::info!(
                map = %path.display(),
                "the acknowledged-digest map is of another epoch, size or key, or damaged: \
                 not used"
            );
            return Ok(None);
        }
        Ok(Some(AckedMap::new(path, file, key, blocks)))
    }

    /// The map's digest key.
    pub fn key(&self) -> &DigestKey {
        &self.key
    }

    /// Records that batch `seq` (its `extents`, the `plain` bytes of its data extents in
    /// order) is about to be sent: its blocks become unknown, and their digests wait for
    /// the acknowledgement. [`AckedMap::sync`] must follow before the batch is sent.
    pub fn intent(&mut self, seq: u64, extents: &[Extent], plain: &[u8]) -> anyhow::Result<()> {
        let mut touched = Touched::default();
        let mut at = 0usize;
        for e in extents {
            let (start, end) = (e.sector, e.sector + u64::from(e.sectors));
            let (first, last) = (start / SECTORS_PER_BLOCK, (end - 1) / SECTORS_PER_BLOCK);
            self.mark_unknown(first, last)?;
            // Due digests of these blocks are stale now.
            let stale: Vec<u64> = self.due.range(first..=last).map(|(&b, _)| b).collect();
            for b in stale {
                self.due.remove(&b);
            }
            if e.kind != ExtentKind::Data {
                // Zeroed or discarded: stays unknown (any range size, no memory per block);
                // no earlier batch may record a digest for these blocks either.
                self.last_sent.retain(|&b, _| b < first || b > last);
                continue;
            }
            let len = (u64::from(e.sectors) * 512) as usize;
            let data = plain
                .get(at..at + len)
                .context("a batch's data is shorter than its extents")?;
            at += len;
            touched.ranges.push((first, last));
            for b in first..=last {
                self.last_sent.insert(b, seq);
                let (bs, be) = (b * SECTORS_PER_BLOCK, (b + 1) * SECTORS_PER_BLOCK);
                if bs < start || be > end {
                    continue; // partly covered: stays unknown
                }
                let off = ((bs - start) * 512) as usize;
                let entry = encode(self.key.block(&data[off..off + BLOCK as usize]));
                touched.whole.push((b, entry));
            }
        }
        self.pending.insert(seq, touched);
        Ok(())
    }

    /// Writes blocks `first..=last` unknown, a chunk at a time, skipping chunks that are
    /// unknown already (so an intent over unknown blocks writes, and syncs, nothing).
    fn mark_unknown(&mut self, first: u64, last: u64) -> anyhow::Result<()> {
        const CHUNK: u64 = 64 << 10; // entries (1 MiB)
        let mut b = first;
        let mut buf = Vec::new();
        while b <= last {
            let n = (last - b + 1).min(CHUNK);
            buf.resize((n * ENTRY) as usize, 0);
            self.file
                .read_exact_at(&mut buf, HEADER + b * ENTRY)
                .with_context(|| format!("reading {}", self.path.display()))?;
            if buf.iter().any(|&x| x != 0) {
                buf.fill(0);
                self.write_entries(b, &buf)?;
                self.dirty = true;
            }
            b += n;
        }
        Ok(())
    }

    /// Makes the unknown entries written by [`AckedMap::intent`] durable (nothing to do
    /// when none were written since).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        if self.dirty {
            self.file
                .sync_data()
                .with_context(|| format!("syncing {}", self.path.display()))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// The server holds every batch through `seq` durably: their blocks' digests become
    /// due, except where a later batch touched the block since; due digests are written
    /// if the last checkpoint is older than [`CHECKPOINT_EVERY`].
    pub fn acked_through(&mut self, seq: u64) -> anyhow::Result<()> {
        let done: Vec<u64> = self.pending.range(..=seq).map(|(&s, _)| s).collect();
        for s in done {
            let touched = self.pending.remove(&s).unwrap_or_default();
            for (b, entry) in touched.whole {
                if self.last_sent.get(&b) == Some(&s) {
                    self.due.insert(b, entry);
                }
            }
            for (first, last) in touched.ranges {
                for b in first..=last {
                    if self.last_sent.get(&b) == Some(&s) {
                        self.last_sent.remove(&b);
                    }
                }
            }
        }
        self.checkpoint_if_due()
    }

    /// [`AckedMap::checkpoint`] if the last one is older than [`CHECKPOINT_EVERY`].
    pub fn checkpoint_if_due(&mut self) -> anyhow::Result<()> {
        if self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// At a clean stop: every due digest written and made durable, so the next start
    /// sends only what changes until then.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.checkpoint()?;
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        self.dirty = false;
        Ok(())
    }

    /// Writes every due digest (runs of consecutive blocks in one write each).
    pub fn checkpoint(&mut self) -> anyhow::Result<()> {
        let due = std::mem::take(&mut self.due);
        let mut run: Vec<[u8; 16]> = Vec::new();
        let mut run_start = 0;
        for (b, entry) in due {
            if !run.is_empty() && b != run_start + run.len() as u64 {
                self.write_run(run_start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = b;
            }
            run.push(entry);
        }
        if !run.is_empty() {
            self.write_run(run_start, &run)?;
        }
        self.last_checkpoint = std::time::Instant::now();
        Ok(())
    }

    /// Whether block `block` holds `data` as far as the server is known to hold it (an
    /// unknown block never does).
    pub fn matches(&self, block: u64, data: &[u8]) -> anyhow::Result<bool> {
        let mut entry = [0u8; 16];
        self.file
            .read_exact_at(&mut entry, HEADER + block * ENTRY)
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(entry != UNKNOWN && entry == encode(self.key.block(data)))
    }

    /// Blocks the map describes.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn write_run(&self, first: u64, entries: &[[u8; 16]]) -> anyhow::Result<()> {
        let bytes: Vec<u8> = entries.iter().flatten().copied().collect();
        self.write_entries(first, &bytes)
    }

    /// Writes encoded entries (16 bytes each) from block `first` on.
    fn write_entries(&self, first: u64, bytes: &[u8]) -> anyhow::Result<()> {
        let n = bytes.len() as u64 / ENTRY;
        ensure!(
            first + n <= self.blocks,
            "block {} is beyond the map's {} blocks",
            first + n - 1,
            self.blocks
        );
        self.file
            .write_all_at(bytes, HEADER + first * ENTRY)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: DiskId = DiskId([7; 16]);
    const SIZE: u64 = 64 * BLOCK;

    fn data(sector: u64, sectors: u32) -> Extent {
        Extent {
            sector,
            sectors,
            kind: ExtentKind::Data,
        }
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK as usize]
    }

    #[test]
    fn digests_appear_only_after_the_acknowledgement_of_the_newest_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = AckedMap::create(dir.path(), &DISK, 3, SIZE).unwrap();
        assert!(!m.matches(0, &block(1)).unwrap(), "a new map is unknown");
        // Batch 1 writes blocks 0..2 with 1s; batch 2 block 1 with 2s, and half of block 5.
        let mut plain = block(1);
        plain.extend(block(1));
        m.intent(1, &[data(0, 16)], &plain).unwrap();
        let mut plain2 = block(2);
        plain2.extend(vec![9u8; 2048]);
        m.intent(2, &[data(8, 8), data(40, 4)], &plain2).unwrap();
        m.sync().unwrap();
        m.acked_through(1).unwrap();
        m.checkpoint().unwrap();
        assert!(m.matches(0, &block(1)).unwrap());
        assert!(
            !m.matches(1, &block(1)).unwrap(),
            "block 1 was sent again by batch 2: unknown until that is acknowledged"
        );
        m.acked_through(2).unwrap();
        m.checkpoint().unwrap();
        assert!(m.matches(1, &block(2)).unwrap());
        assert!(!m.matches(1, &block(1)).unwrap());
        assert!(
            !m.matches(5, &[9u8; 4096]).unwrap(),
            "a partial block stays unknown"
        );
        // A zero extent records zero blocks.
        m.intent(
            3,
            &[Extent {
                sector: 16,
                sectors: 8,
                kind: ExtentKind::Zero,
            }],
            &[],
        )
        .unwrap();
        m.acked_through(3).unwrap();
        m.checkpoint().unwrap();
        assert!(
            !m.matches(2, &block(0)).unwrap() && !m.matches(2, &block(1)).unwrap(),
            "a zeroed block stays unknown"
        );
        // A data batch sent before a zeroing is acknowledged after it: no digest.
        m.intent(4, &[data(24, 8)], &block(4)).unwrap();
        m.intent(
            5,
            &[Extent {
                sector: 24,
                sectors: 8,
                kind: ExtentKind::Discard,
            }],
            &[],
        )
        .unwrap();
        m.acked_through(5).unwrap();
        m.checkpoint().unwrap();
        assert!(!m.matches(3, &block(4)).unwrap());
    }

    #[test]
    fn an_intent_over_unknown_blocks_writes_nothing_and_a_later_intent_cancels_a_due_digest() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = AckedMap::create(dir.path(), &DISK, 3, SIZE).unwrap();
        m.intent(1, &[data(0, 16)], &[block(1), block(1)].concat())
            .unwrap();
        assert!(!m.dirty, "the blocks were unknown already: nothing to sync");
        m.acked_through(1).unwrap();
        // Block 1 is sent again before the checkpoint: its digest must not be written.
        m.intent(2, &[data(8, 8)], &block(2)).unwrap();
        m.checkpoint().unwrap();
        assert!(m.matches(0, &block(1)).unwrap());
        assert!(!m.matches(1, &block(1)).unwrap() && !m.matches(1, &block(2)).unwrap());
        m.intent(3, &[data(0, 8)], &block(3)).unwrap();
        assert!(m.dirty, "a known entry becomes unknown: it must be synced");
    }

    #[test]
    fn a_crash_after_an_intent_leaves_the_block_unknown_and_a_map_of_another_epoch_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = AckedMap::create(dir.path(), &DISK, 3, SIZE).unwrap();
        m.intent(1, &[data(0, 8)], &block(1)).unwrap();
        m.sync().unwrap();
        m.acked_through(1).unwrap();
        m.checkpoint().unwrap();
        // Batch 2 rewrites block 0 (B), is sent, and the agent dies before its ack: the
        // device may hold 1s again by the restart, while the server holds B.
        m.intent(2, &[data(0, 8)], &block(2)).unwrap();
        m.sync().unwrap();
        drop(m);
        let m = AckedMap::open(dir.path(), &DISK, 3, SIZE).unwrap().unwrap();
        assert!(
            !m.matches(0, &block(1)).unwrap(),
            "the old digest survived the intent"
        );
        assert!(!m.matches(0, &block(2)).unwrap());
        assert!(
            AckedMap::open(dir.path(), &DISK, 4, SIZE)
                .unwrap()
                .is_none()
        );
        assert!(
            AckedMap::open(dir.path(), &DISK, 3, SIZE * 2)
                .unwrap()
                .is_none()
        );
        assert!(
            AckedMap::open(dir.path(), &DiskId([8; 16]), 3, SIZE)
                .unwrap()
                .is_none()
        );
        // Another digest key: the map no longer vouches for anything.
        std::fs::write(dir.path().join("acked/digest.key"), [1u8; 32]).unwrap();
        assert!(
            AckedMap::open(dir.path(), &DISK, 3, SIZE)
                .unwrap()
                .is_none()
        );
    }
}
