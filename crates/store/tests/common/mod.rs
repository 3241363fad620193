//! Shared test helpers: seeded batch generator, in-memory reference model,
//! plan materialisation and store backends.
#![allow(dead_code)]

use object_store::ObjectStore;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use ripcord_store::*;
use std::sync::Arc;

pub const DISK: DiskId = DiskId([7; 16]);
pub const SECTORS: u64 = 4096; // 2 MiB disk keeps the model small
pub const T0: u64 = 1_700_000_000_000_000_000;

pub fn epoch_info(epoch: u64) -> EpochInfo {
    EpochInfo {
        epoch,
        machine_id: "vm-1".into(),
        size_bytes: SECTORS * 512,
        sector_size: 512,
        wrapped_key: vec![epoch as u8; 48],
        device: Some("/dev/vdb".into()),
    }
}

/// Backends: in-memory and LocalFileSystem in a tempdir.
pub fn backends() -> Vec<(
    &'static str,
    Arc<dyn ObjectStore>,
    Option<tempfile::TempDir>,
)> {
    let dir = tempfile::tempdir().unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    vec![
        (
            "memory",
            Arc::new(object_store::memory::InMemory::new()),
            None,
        ),
        ("localfs", Arc::new(fs), Some(dir)),
    ]
}

/// Disk image + per-sector tag (0 unwritten, 1 zero, 2 discard, 3 data).
#[derive(Clone, PartialEq, Eq)]
pub struct Model {
    pub bytes: Vec<u8>,
    pub tags: Vec<u8>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model(crc={:08x}, tags={:08x})",
            crc32c::crc32c(&self.bytes),
            crc32c::crc32c(&self.tags)
        )
    }
}

impl Default for Model {
    fn default() -> Self {
        Model {
            bytes: vec![0; (SECTORS * 512) as usize],
            tags: vec![0; SECTORS as usize],
        }
    }
}

impl Model {
    pub fn apply(&mut self, b: &SealedBatch) {
        let mut off = 0usize;
        for x in &b.extents {
            let s = x.sector as usize;
            let n = x.sectors as usize;
            match x.kind {
                ExtentKind::Data => {
                    self.bytes[s * 512..(s + n) * 512]
                        .copy_from_slice(&b.sealed[off..off + n * 512]);
                    self.tags[s..s + n].fill(3);
                    off += n * 512;
                }
                ExtentKind::Zero => {
                    self.bytes[s * 512..(s + n) * 512].fill(0);
                    self.tags[s..s + n].fill(1);
                }
                ExtentKind::Discard => {
                    self.bytes[s * 512..(s + n) * 512].fill(0);
                    self.tags[s..s + n].fill(2);
                }
            }
        }
    }
}

/// Random batch; the fake "sealed" payload is the plaintext itself.
pub fn gen_batch(rng: &mut StdRng, epoch: u64, seq: u64) -> SealedBatch {
    let n = rng.random_range(1..6);
    let mut extents = Vec::new();
    let mut sealed = Vec::new();
    for _ in 0..n {
        let sectors = rng.random_range(1..48u32);
        let sector = rng.random_range(0..SECTORS - u64::from(sectors));
        let kind = match rng.random_range(0..10) {
            0 => ExtentKind::Zero,
            1 => ExtentKind::Discard,
            _ => ExtentKind::Data,
        };
        if kind == ExtentKind::Data {
            let fill: u8 = rng.random();
            for i in 0..sectors as usize * 512 {
                sealed.push(fill.wrapping_add((i / 512) as u8) ^ (seq as u8));
            }
        }
        extents.push(Extent {
            sector,
            sectors,
            kind,
        });
    }
    SealedBatch {
        epoch,
        seq,
        extents,
        flags: rng.random_range(0..4),
        sealed,
    }
}

pub fn cut(epoch: u64, cut_id: u64, seq: u64) -> CutInfo {
    CutInfo {
        epoch,
        cut_id,
        seq,
        time_ns: T0 + epoch * 1_000_000_000_000 + seq * 1_000_000_000,
        mono_ns: seq,
        kind: if cut_id.is_multiple_of(3) {
            CutKind::App
        } else {
            CutKind::Crash
        },
        group: None,
        // The store carries the agent's MAC verbatim and never checks it.
        mac: [cut_id as u8; 32],
    }
}

/// The process server's clock when it flushes after batch `seq` of `epoch`: half a
/// second after the agent's time of a cut at `seq` (see [`cut`]).
pub fn server_clock(epoch: u64, seq: u64) -> u64 {
    T0 + epoch * 1_000_000_000_000 + seq * 1_000_000_000 + 500_000_000
}

/// What was written: every committed cut with its expected image.
#[derive(Default)]
pub struct History {
    pub points: Vec<(CutInfo, Model)>,
    pub batches: Vec<SealedBatch>,
}

/// Writes `epochs` = [(epoch, n_batches)] with cuts every ~`cut_every`
/// batches, flushing at random, and records the model at every cut.
pub async fn write_history(
    store: &Store,
    seed: u64,
    epochs: &[(u64, u64)],
    cut_every: u64,
    cfg: WriterConfig,
) -> History {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = store.disk_writer(DISK, cfg).await.unwrap();
    let mut h = History::default();
    for &(e, n) in epochs {
        w.begin_epoch(&epoch_info(e)).await.unwrap();
        let mut model = Model::default();
        let mut cut_id = 0;
        for seq in 1..=n {
            let b = gen_batch(&mut rng, e, seq);
            model.apply(&b);
            h.batches.push(b.clone());
            assert!(w.add_batch(b).await.unwrap());
            if rng.random_range(0..cut_every) == 0 || seq == n {
                cut_id += 1;
                let c = cut(e, cut_id, seq);
                assert!(w.add_cut(c).unwrap());
                h.points.push((c, model.clone()));
            }
            if rng.random_range(0..7) == 0 {
                w.flush_at(server_clock(e, seq)).await.unwrap();
            }
        }
        let c = w.flush_at(server_clock(e, n)).await.unwrap();
        assert_eq!(c.durable_seq, n);
    }
    h
}

/// Materialises a point by resolving it and fetching its batches.
pub async fn restore(store: &Store, p: &RecoveryPoint) -> Model {
    let plan = store.resolve(&DISK, p).await.unwrap();
    materialise(store, &plan).await
}

pub async fn materialise(store: &Store, plan: &Plan) -> Model {
    let mut m = Model::default();
    let locs = plan.batches();
    // Sorted by pack then offset.
    assert!(
        locs.windows(2)
            .all(|w| (&w[0].pack, w[0].offset) < (&w[1].pack, w[1].offset))
    );
    let batches = store.fetch_batches(&locs).await.unwrap();
    let by_seq: std::collections::HashMap<u64, &SealedBatch> =
        batches.iter().map(|b| (b.seq, b)).collect();
    // Every plan of every test (checkpoints, GC rewrites, crashes) agrees with the extent
    // lists of the records it reads: the check failover makes after authenticating them.
    let placement = plan.placement();
    for b in &batches {
        placement
            .check(b.seq, &b.extents)
            .unwrap_or_else(|e| panic!("an honest plan fails its placement check: {e}"));
    }
    for r in &plan.runs {
        let (s, n) = (r.sector as usize, r.sectors as usize);
        match r.source {
            RunSource::Zero { .. } => m.tags[s..s + n].fill(1),
            RunSource::Discard { .. } => m.tags[s..s + n].fill(2),
            RunSource::Data { seq, offset } => {
                let b = by_seq[&seq];
                let o = offset as usize;
                m.bytes[s * 512..(s + n) * 512].copy_from_slice(&b.sealed[o..o + n * 512]);
                m.tags[s..s + n].fill(3);
            }
        }
    }
    m
}

/// The point of a cut, to resolve it (no commit time or catalog object: compare points
/// with what was written through [`RecoveryPoint::cut`]).
pub fn point_of(c: &CutInfo) -> RecoveryPoint {
    RecoveryPoint::from_cut(c)
}

pub fn small_cfg() -> WriterConfig {
    WriterConfig {
        pack_target_bytes: 256 << 10,
        checkpoint_every_batches: 40,
    }
}

/// Names of objects under a store-relative directory.
pub async fn names(os: &Arc<dyn ObjectStore>, dir: &str) -> Vec<(String, u64)> {
    use futures::TryStreamExt;
    let mut v: Vec<_> = os
        .list(Some(&object_store::path::Path::from(dir)))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v
}

pub fn disk_dir() -> String {
    format!("disks/{DISK}")
}
