//! A signed test store for the tests of the tools that restore from it (`ripcord`,
//! `ripcord-mt`): one disk written in-process into a temporary directory (`file://`),
//! with real escrow, data key, sealing and cut MACs, exactly as an agent and process
//! server would, the disk's image at each point, and ways to tamper with its metadata as
//! someone who can write the bucket would (CRCs recomputed). Behind the `testing` feature.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ripcord_proto::{FLAG_COMPRESSED, FLAG_SEALED, aead};
use ripcord_seal::{
    DataKey, Flags, KdfParams, Sealer,
    escrow::{EscrowFile, EscrowParams, EscrowSecret, wrap_data_key},
};
use ripcord_store::format::{self, RunTarget};
use ripcord_store::{
    CutInfo, CutKind, DiskId, EpochInfo, Extent, ExtentKind, KeyRotation, SealedBatch, Store,
    WriterConfig,
};

pub const PASSPHRASE: &str = "a long test passphrase";
pub const MACHINE: &str = "machine-1";
pub const DISK: DiskId = DiskId([0x3c; 16]);
pub const SECTORS: u64 = 4096;
pub const SIZE: u64 = SECTORS * 512;
pub const EPOCH: u64 = 1;
/// The first batch sealed with the second data key.
pub const ROTATED_AT: u64 = 5;

/// A store with one disk: batches 1..=4, checkpoint at 4, cut 1 at 4; then the agent
/// restarts and continues the epoch under a new data key (a key rotation at 5): batches
/// 5..=6, cut 2 at 6. `images[i]` is the disk at cut `i + 1`.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub images: Vec<Vec<u8>>,
}

pub fn d(sector: u64, sectors: u32) -> Extent {
    Extent {
        sector,
        sectors,
        kind: ExtentKind::Data,
    }
}

pub fn z(sector: u64, sectors: u32) -> Extent {
    Extent {
        sector,
        sectors,
        kind: ExtentKind::Zero,
    }
}

/// The batches of the fixture, in seq order from 1.
pub fn batches() -> Vec<Vec<Extent>> {
    vec![
        vec![d(0, 128), d(256, 8)],   // 1
        vec![d(512, 32)],             // 2
        vec![z(0, 16)],               // 3: zeroes part of 1
        vec![d(1024, 16)],            // 4
        vec![d(2000, 16), d(40, 8)],  // 5: overwrites part of 1
        vec![d(100, 8), d(3000, 24)], // 6: overwrites part of 1
    ]
}

impl Fixture {
    pub async fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let pass = tmp.path().join("pass");
        std::fs::write(&pass, PASSPHRASE).expect("passphrase file");
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600 the passphrase file");
        let f = Fixture {
            tmp,
            images: Vec::new(),
        };
        let store = f.store().await;
        let params = EscrowParams::generate(KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        })
        .expect("escrow parameters");
        let secret = EscrowSecret::derive(PASSPHRASE.as_bytes(), &params).expect("escrow key");
        let escrow = EscrowFile {
            public_key: secret.public_key(),
            params,
        };
        store
            .put_escrow(&serde_json::to_vec(&escrow).expect("escrow json"))
            .await
            .expect("storing escrow.json");
        let mut key = DataKey::generate().expect("data key");
        let wrapped_key =
            wrap_data_key(&key, &escrow.public_key, &aead::key_context(MACHINE, &DISK))
                .expect("wrapping the data key");
        let mut w = store
            .disk_writer(
                DISK,
                WriterConfig {
                    checkpoint_every_batches: 4,
                    ..WriterConfig::default()
                },
            )
            .await
            .expect("disk writer");
        w.begin_epoch(&EpochInfo {
            epoch: EPOCH,
            machine_id: MACHINE.into(),
            size_bytes: SIZE,
            sector_size: 512,
            wrapped_key,
            device: None,
        })
        .await
        .expect("beginning the epoch");
        let mut image = vec![0u8; SIZE as usize];
        let mut images = Vec::new();
        let mut sealer = Sealer::new();
        for (i, extents) in batches().into_iter().enumerate() {
            let seq = i as u64 + 1;
            if seq == ROTATED_AT {
                key = DataKey::generate().expect("data key");
                w.rotate_key(&KeyRotation {
                    epoch: EPOCH,
                    from_seq: seq,
                    wrapped_key: wrap_data_key(
                        &key,
                        &escrow.public_key,
                        &aead::key_context(MACHINE, &DISK),
                    )
                    .expect("wrapping the rotated data key"),
                })
                .await
                .expect("storing the key rotation");
            }
            let mut plain = Vec::new();
            for (j, e) in extents.iter().enumerate() {
                let at =
                    (e.sector * 512) as usize..((e.sector + u64::from(e.sectors)) * 512) as usize;
                match e.kind {
                    ExtentKind::Data => {
                        let bytes: Vec<u8> = (0..at.len())
                            .map(|k| {
                                (seq as u8).wrapping_mul(31) ^ (j as u8) ^ (k / 512) as u8 ^ 0x80
                            })
                            .collect();
                        image[at].copy_from_slice(&bytes);
                        plain.extend_from_slice(&bytes);
                    }
                    _ => image[at].fill(0),
                }
            }
            let aad = aead::batch_aad(MACHINE, &DISK, EPOCH, seq, seq, &extents);
            let nonce = aead::nonce(EPOCH, seq).expect("nonce");
            let mut sealed = Vec::new();
            let flags = sealer
                .seal_into(&key, &aad, nonce, &plain, 1, &mut sealed)
                .expect("sealing");
            w.add_batch(SealedBatch {
                epoch: EPOCH,
                seq,
                extents,
                flags: FLAG_SEALED
                    | if flags == Flags::Zstd {
                        FLAG_COMPRESSED
                    } else {
                        0
                    },
                sealed,
            })
            .await
            .expect("adding a batch");
            if seq == 4 || seq == 6 {
                let cut_id = seq / 2 - 1;
                w.add_cut(cut_info(&key, cut_id, seq))
                    .expect("adding a cut");
                w.flush().await.expect("flushing");
                images.push(image.clone());
            }
        }
        Fixture { images, ..f }
    }

    /// The passphrase file (mode 0600).
    pub fn pass(&self) -> PathBuf {
        self.tmp.path().join("pass")
    }

    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.root().display())
    }

    pub async fn store(&self) -> Store {
        Store::open(&self.url()).await.expect("opening the store")
    }

    /// The only object under `disks/<disk>/<dir>` whose name contains `part`.
    pub fn object(&self, dir: &str, part: &str) -> String {
        let rel = format!("{}/{dir}", format::disk_dir(&DISK));
        let found: Vec<String> = std::fs::read_dir(self.root().join(&rel))
            .expect("listing a store directory")
            .map(|e| {
                e.expect("directory entry")
                    .file_name()
                    .into_string()
                    .expect("utf-8")
            })
            .filter(|n| n.contains(part))
            .map(|n| format!("{rel}/{n}"))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one object in {rel} named *{part}*: {found:?}"
        );
        found.into_iter().next().expect("one")
    }

    pub fn read(&self, object: &str) -> Vec<u8> {
        std::fs::read(self.root().join(object)).expect("reading an object")
    }

    pub fn write(&self, object: &str, bytes: Vec<u8>) {
        std::fs::write(self.root().join(object), bytes).expect("rewriting an object");
    }

    /// Rewrite the index segment holding batch `seq` through `edit` (CRC recomputed).
    pub fn tamper_index(&self, seq: u64, edit: impl FnOnce(&mut Vec<Extent>)) -> String {
        let dir = format!("{}/index", format::disk_dir(&DISK));
        let name = std::fs::read_dir(self.root().join(&dir))
            .expect("listing the index")
            .map(|e| format!("{dir}/{}", e.expect("entry").file_name().to_string_lossy()))
            .find(|n| format::parse_index(n).is_some_and(|s| s.first <= seq && seq <= s.last))
            .expect("the segment holding the batch");
        let parsed = format::parse_index(&name).expect("segment name");
        let mut seg = format::decode_segment(&self.read(&name), &DISK, &parsed).expect("segment");
        let e = seg
            .entries
            .iter_mut()
            .find(|e| e.loc.seq == seq)
            .expect("the entry");
        edit(&mut e.extents);
        self.write(&name, format::encode_segment(&DISK, &seg));
        name
    }

    /// Rewrite the checkpoint through `edit` (CRC recomputed).
    pub fn tamper_checkpoint(&self, edit: impl FnOnce(&mut Vec<(u64, u64, RunTarget)>)) -> String {
        let name = self.object("checkpoints", ".ckpt");
        let parsed = format::parse_checkpoint(&name).expect("checkpoint name");
        let mut ck =
            format::decode_checkpoint(&self.read(&name), &DISK, &parsed).expect("checkpoint");
        edit(&mut ck.runs);
        self.write(&name, format::encode_checkpoint(&DISK, &ck));
        name
    }
}

/// A cut as the agent makes it: MACed with the disk's data key.
pub fn cut_info(key: &DataKey, cut_id: u64, seq: u64) -> CutInfo {
    let (time_ns, mono_ns, kind) = (1_700_000_000_000_000_000 + cut_id, cut_id, CutKind::Crash);
    let message = aead::cut_aad(&DISK, EPOCH, cut_id, seq, time_ns, mono_ns, kind, None);
    CutInfo {
        epoch: EPOCH,
        cut_id,
        seq,
        time_ns,
        mono_ns,
        kind,
        group: None,
        mac: ripcord_seal::point_mac(key, &message),
    }
}

pub fn assert_image(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).expect("reading the image");
    assert_eq!(got.len(), want.len(), "image size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "image differs from the disk first at byte {i} (sector {})",
            i / 512
        );
    }
}
