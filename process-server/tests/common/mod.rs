//! Fixture for the process server's in-process tests: a deployment in a temporary
//! directory (fast escrow KDF, 1 MiB journal segments, no free-space floor), one disk
//! whose journal is fed sealed frames exactly as an agent's stream would be, and a model of
//! the disk image those frames describe.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use ripcord_process_server::{
    config::PsConfig,
    deploy,
    disk::{DiskCore, SharedDisk, journal_config},
    registry::Registry,
    uploader::{UploadConfig, Uploader},
};
use ripcord_proto::{
    Batch, Cut, CutKind, DiskId, Extent, ExtentKind, FLAG_COMPRESSED, FLAG_SEALED, Message,
    ProtectDisk, aead,
};
use ripcord_seal::{DataKey, Flags, KdfParams, Sealer, escrow::EscrowParams};

pub const PASSPHRASE: &[u8] = b"a long test passphrase";
pub const MACHINE: &str = "machine-1";
pub const DISK: DiskId = DiskId([0x5a; 16]);
/// Disk size: 8 MiB.
pub const SIZE: u64 = 8 << 20;

/// A deployment with one disk being written.
pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub deployment: PathBuf,
    pub target: PathBuf,
    pub core: SharedDisk,
    /// The disk as the agent would see it after every write applied so far.
    pub image: Vec<u8>,
    pub epoch: u64,
    key: DataKey,
    /// `key` wrapped to the escrow key, once per key (an agent wraps its key once per
    /// process: the server tells a reconnection from a restart by these bytes).
    wrapped_key: Option<Vec<u8>>,
    sealer: Sealer,
    next_seq: u64,
    next_cut: u64,
    rng: u64,
}

impl Fixture {
    /// A new deployment with epoch 1 of [`DISK`] started.
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let deployment = tmp.path().join("ps");
        let target = deployment.join("target");
        std::fs::create_dir_all(&deployment).expect("deployment directory");
        let cfg = PsConfig {
            target: Some(format!("file://{}", target.display())),
            segment_mib: 1,
            min_free_mib: 0,
            min_free_percent: 0.0,
            metrics_listen: None,
            listen: "127.0.0.1:0".parse().expect("literal"),
            register_listen: "127.0.0.1:0".parse().expect("literal"),
            upload_interval_ms: 100,
            ..PsConfig::default()
        };
        std::fs::write(
            deployment.join("ps.toml"),
            toml::to_string(&cfg).expect("config"),
        )
        .expect("writing ps.toml");
        let kdf = KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        deploy::init(
            &deployment,
            &["localhost"],
            PASSPHRASE,
            EscrowParams::generate(kdf).expect("escrow parameters"),
            Duration::from_secs(3600),
        )
        .expect("deployment init");
        let core = DiskCore::open(&cache_dir(&deployment), DISK, journal_config(&cfg))
            .expect("opening the disk journal");
        let mut f = Fixture {
            _tmp: tmp,
            deployment,
            target,
            core: SharedDisk::new(core),
            image: vec![0; SIZE as usize],
            epoch: 0,
            key: DataKey::generate().expect("data key"),
            wrapped_key: None,
            sealer: Sealer::new(),
            next_seq: 1,
            next_cut: 1,
            rng: 0x9e37_79b9_7f4a_7c15,
        };
        f.new_epoch();
        f
    }

    pub fn target_url(&self) -> String {
        format!("file://{}", self.target.display())
    }

    /// Starts the next epoch (a full resync on a real agent: the image starts from zero).
    pub fn new_epoch(&mut self) {
        self.epoch += 1;
        self.next_seq = 1;
        self.next_cut = 1;
        self.image.fill(0);
        let pd = self.protect_disk();
        Registry::open(&self.deployment.join("disks.json"))
            .expect("registry")
            .claim(MACHINE, &pd, None)
            .expect("claiming the disk");
        let raw = encode(&Message::ProtectDisk(pd.clone()));
        self.core
            .lock_blocking()
            .protect(&pd, &raw, false)
            .expect("journaling the epoch start")
            .expect("epoch accepted");
    }

    /// The agent restarts and continues the epoch under a fresh data key (no resync: the
    /// image goes on from what was acknowledged). Returns the seq the new key starts at.
    pub fn restart_agent(&mut self) -> u64 {
        self.key = DataKey::generate().expect("data key");
        self.wrapped_key = None;
        let resumed = self.announce(true).expect("the epoch continues");
        assert_eq!(
            resumed, self.next_seq,
            "the server resumes right after what it holds"
        );
        resumed
    }

    /// Sends this agent's `ProtectDisk` for the current epoch again (a reconnection, or a
    /// restart with a new key), `continues` as after a `ContinueEpoch`; returns where the
    /// server resumes, or its refusal.
    pub fn announce(&mut self, continues: bool) -> Result<u64, ripcord_proto::ErrorMessage> {
        let pd = self.protect_disk();
        let raw = encode(&Message::ProtectDisk(pd.clone()));
        self.core
            .lock_blocking()
            .protect(&pd, &raw, continues)
            .expect("journaling the ProtectDisk")
            .map(|opened| opened.resume_from_seq())
    }

    /// A new data key, as a restarted agent has, without telling the server.
    pub fn new_key(&mut self) {
        self.key = DataKey::generate().expect("data key");
        self.wrapped_key = None;
    }

    fn protect_disk(&mut self) -> ProtectDisk {
        let wrapped_key = match &self.wrapped_key {
            Some(w) => w.clone(),
            None => {
                let dep = deploy::open(&self.deployment).expect("opening the deployment");
                let w = ripcord_seal::escrow::wrap_data_key(
                    &self.key,
                    &dep.escrow.public_key,
                    &aead::key_context(MACHINE, &DISK),
                )
                .expect("wrapping the data key");
                self.wrapped_key = Some(w.clone());
                w
            }
        };
        ProtectDisk {
            disk_id: DISK,
            size_bytes: SIZE,
            sector_size: 512,
            epoch: self.epoch,
            wrapped_key,
        }
    }

    fn random_bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.rng as u8
            })
            .collect()
    }

    /// Journals one batch of `kib` KiB of incompressible data at `sector` (acknowledged
    /// when this returns) and returns its seq.
    pub fn write(&mut self, sector: u64, kib: u32) -> u64 {
        let data = self.random_bytes(kib as usize * 1024);
        let extents = vec![Extent {
            sector,
            sectors: kib * 2,
            kind: ExtentKind::Data,
        }];
        self.image[(sector * 512) as usize..][..data.len()].copy_from_slice(&data);
        self.batch(extents, &data)
    }

    /// Journals one batch that zeroes `kib` KiB at `sector`; returns its seq.
    pub fn zero(&mut self, sector: u64, kib: u32) -> u64 {
        let extents = vec![Extent {
            sector,
            sectors: kib * 2,
            kind: ExtentKind::Zero,
        }];
        self.image[(sector * 512) as usize..][..kib as usize * 1024].fill(0);
        self.batch(extents, &[])
    }

    fn batch(&mut self, extents: Vec<Extent>, plain: &[u8]) -> u64 {
        let seq = self.next_seq;
        let b = self.batch_message(extents, plain);
        self.apply(b);
        seq
    }

    /// Encoded frames of `n` batches of `kib` KiB that are never journaled through the
    /// receiver (for tests that write the journal as a crash left it); their seqs are
    /// used up.
    pub fn unacknowledged_frames(&mut self, n: u64, kib: u32) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let data = self.random_bytes(kib as usize * 1024);
                let extents = vec![Extent {
                    sector: i * u64::from(kib) * 2,
                    sectors: kib * 2,
                    kind: ExtentKind::Data,
                }];
                encode(&self.batch_message(extents, &data))
            })
            .collect()
    }

    /// A sealed batch at the next seq (which it uses up).
    fn batch_message(&mut self, extents: Vec<Extent>, plain: &[u8]) -> Message {
        let seq = self.next_seq;
        let aad = aead::batch_aad(MACHINE, &DISK, self.epoch, seq, seq, &extents);
        let nonce = aead::nonce(self.epoch, seq).expect("nonce");
        let mut payload = Vec::new();
        let flags = self
            .sealer
            .seal_into(&self.key, &aad, nonce, plain, 1, &mut payload)
            .expect("sealing");
        let b = Batch {
            disk_id: DISK,
            epoch: self.epoch,
            first_seq: seq,
            last_seq: seq,
            extents,
            flags: FLAG_SEALED
                | if flags == Flags::Zstd {
                    FLAG_COMPRESSED
                } else {
                    0
                },
            payload,
        };
        self.next_seq += 1;
        Message::Batch(b)
    }

    /// Journals a crash-consistent cut at the last batch written; returns its id.
    pub fn cut(&mut self) -> u64 {
        let id = self.next_cut;
        let mut c = Cut {
            disk_id: DISK,
            epoch: self.epoch,
            seq: self.next_seq - 1,
            time_ns: 1_700_000_000_000_000_000 + id * 1_000_000_000,
            mono_ns: id,
            kind: CutKind::Crash,
            id,
            mac: [0; 32],
            group: None,
        };
        c.mac = ripcord_seal::point_mac(&self.key, &aead::cut_message(&c));
        self.apply(Message::Cut(c));
        self.next_cut += 1;
        id
    }

    fn apply(&mut self, msg: Message) {
        let raw = encode(&msg);
        let applied = self
            .core
            .lock_blocking()
            .apply(&[(msg, raw)])
            .expect("journaling a frame");
        assert!(
            applied.error.is_none(),
            "the receiver refused a frame: {:?}",
            applied.error
        );
        assert!(
            !applied.acks.is_empty(),
            "a journaled frame was not acknowledged"
        );
    }

    /// The server restarts: the disk's journal is closed and opened again (every uploader
    /// of it must be dropped first).
    pub fn restart_server(&mut self) {
        let cfg = deploy::open(&self.deployment)
            .expect("opening the deployment")
            .config;
        let old = std::mem::replace(
            &mut self.core,
            SharedDisk::new(
                DiskCore::open(
                    &self.deployment.join("restart-scratch"),
                    DiskId([0; 16]),
                    journal_config(&cfg),
                )
                .expect("a scratch journal"),
            ),
        );
        drop(
            old.into_core()
                .unwrap_or_else(|_| panic!("an uploader still holds the disk journal")),
        );
        self.core = SharedDisk::new(
            DiskCore::open(&cache_dir(&self.deployment), DISK, journal_config(&cfg))
                .expect("reopening the disk journal"),
        );
    }

    /// Key rotation records in the journal.
    pub fn rotations_in_journal(&self) -> usize {
        let core = self.core.lock_blocking();
        let journal = core.journal();
        journal
            .read_from(journal.first_seq())
            .expect("reading the journal")
            .filter(|r| {
                r.as_ref().expect("a journal record").kind
                    == ripcord_journal::RecordType::KeyRotation
            })
            .count()
    }

    /// Bytes of journal segments on the cache disk.
    pub fn cache_bytes(&self) -> u64 {
        self.core
            .lock_blocking()
            .journal()
            .segment_paths()
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum()
    }

    pub fn first_journal_seq(&self) -> u64 {
        self.core.lock_blocking().journal().first_seq()
    }
}

/// A deployment whose disk journal is closed (as after `ripcord-ps serve` stopped).
pub struct Stopped {
    _tmp: tempfile::TempDir,
    pub deployment: PathBuf,
}

impl Fixture {
    /// Closes the journal; every uploader of it must be dropped first.
    pub fn stop(self) -> Stopped {
        let core = self
            .core
            .into_core()
            .unwrap_or_else(|_| panic!("an uploader still holds the disk journal"));
        drop(core);
        Stopped {
            _tmp: self._tmp,
            deployment: self.deployment,
        }
    }
}

pub fn cache_dir(deployment: &Path) -> PathBuf {
    deployment.join("cache")
}

/// An uploader of the fixture's disk to `store`, configured by [`upload_config`].
pub async fn open_uploader(f: &Fixture, store: ripcord_store::Store) -> Uploader {
    Uploader::open(
        store,
        DISK,
        MACHINE.to_owned(),
        f.core.clone(),
        upload_config(),
    )
    .await
    .expect("opening the uploader")
}

/// Steps `u` until a step neither reads nor trims anything.
pub async fn drain(u: &mut Uploader) {
    for _ in 0..10_000 {
        let step = u.step().await.expect("uploader step");
        if step.records == 0 && step.trimmed_through.is_none() {
            return;
        }
    }
    panic!("the uploader never went idle");
}

/// Upload as soon as anything is pending; no retention during the test.
pub fn upload_config() -> UploadConfig {
    UploadConfig {
        interval: Duration::ZERO,
        bytes: 1,
        retention: Duration::from_secs(365 * 24 * 3600),
        gc_interval: Duration::from_secs(365 * 24 * 3600),
        point_age_warn: Duration::from_secs(900),
    }
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut raw = Vec::new();
    msg.encode_frame(&mut raw).expect("encoding a frame");
    raw
}
