//! Sealed batches: changed extents of one disk, compressed with zstd (stored when
//! incompressible) and sealed with AES-256-GCM under the epoch's data key. The additional
//! data binds machine, disk, epoch, sequence and the extent list, so a batch cannot be
//! replayed into another disk or position, nor its extents edited.

use anyhow::Context as _;
use ripcord_proto::{
    Batch, DiskId, Extent, ExtentKind, FLAG_COMPRESSED, FLAG_SEALED, MAX_EXTENTS_PER_BATCH, aead,
};
use ripcord_seal::{DataKey, Flags, Sealer};

use super::acked_map::SharedAckedMap;

/// Zero detection granularity, in sectors (64 KiB).
const ZERO_GRAIN: u64 = 128;

/// Builds sealed batches from device data.
pub struct BatchBuilder {
    machine: String,
    disk: DiskId,
    epoch: u64,
    key: DataKey,
    level: i32,
    max_plain: usize,
    next_seq: u64,
    extents: Vec<Extent>,
    plain: Vec<u8>,
    sealer: Sealer,
    /// Told every batch before it leaves (see `acked_map`).
    acked: Option<SharedAckedMap>,
}

impl BatchBuilder {
    pub fn new(
        machine: &str,
        disk: DiskId,
        epoch: u64,
        key: DataKey,
        level: i32,
        max_plain: usize,
    ) -> Self {
        BatchBuilder {
            machine: machine.to_owned(),
            disk,
            epoch,
            key,
            level,
            max_plain,
            next_seq: 1,
            extents: Vec::new(),
            plain: Vec::with_capacity(max_plain),
            sealer: Sealer::new(),
            acked: None,
        }
    }

    /// Records every batch's blocks in `map` before the batch is sealed (its intent; see
    /// `acked_map`); [`BatchBuilder::sync_intents`] makes them durable.
    pub fn with_acked_map(mut self, map: SharedAckedMap) -> Self {
        self.acked = Some(map);
        self
    }

    /// The acknowledged-digest map batches are recorded in, if any.
    pub fn acked_map(&self) -> Option<&SharedAckedMap> {
        self.acked.as_ref()
    }

    /// Where a continued epoch goes on: the first sequence this process seals (nothing
    /// may have been sealed yet).
    pub fn continue_at(&mut self, seq: u64) {
        debug_assert!(self.next_seq == 1 && self.extents.is_empty());
        self.next_seq = seq;
    }

    /// Makes the intents of the batches sealed so far durable: call before any of them
    /// is handed to the network side.
    pub fn sync_intents(&self) -> anyhow::Result<()> {
        match &self.acked {
            Some(m) => m.lock().expect("acked map lock").sync(),
            None => Ok(()),
        }
    }

    /// Sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn push_extent(&mut self, sector: u64, sectors: u64, kind: ExtentKind) {
        if let Some(last) = self.extents.last_mut()
            && last.kind == kind
            && last.sector + u64::from(last.sectors) == sector
            && u64::from(last.sectors) + sectors <= u64::from(u32::MAX)
        {
            last.sectors += sectors as u32;
            return;
        }
        self.extents.push(Extent {
            sector,
            sectors: sectors as u32,
            kind,
        });
    }

    fn full(&self) -> bool {
        self.plain.len() >= self.max_plain || self.extents.len() >= MAX_EXTENTS_PER_BATCH - 2
    }

    /// Add device data read at `sector` (512-byte units); all-zero 64 KiB grains become
    /// zero extents (nothing sent). Returns batches that filled up.
    pub fn add(&mut self, sector: u64, data: &[u8]) -> anyhow::Result<Vec<Batch>> {
        let mut out = Vec::new();
        let sectors = data.len() as u64 / 512;
        let mut s = 0;
        while s < sectors {
            // Grains align to absolute sector numbers so merges line up.
            let grain_end = ((sector + s) / ZERO_GRAIN + 1) * ZERO_GRAIN - sector;
            let e = grain_end.min(sectors);
            let bytes = &data[(s * 512) as usize..(e * 512) as usize];
            if is_zero(bytes) {
                self.push_extent(sector + s, e - s, ExtentKind::Zero);
            } else {
                self.push_extent(sector + s, e - s, ExtentKind::Data);
                self.plain.extend_from_slice(bytes);
            }
            s = e;
            if self.full() {
                out.extend(self.flush()?);
            }
        }
        Ok(out)
    }

    /// Add a range that reads as zeroes without reading it (a completed discard or
    /// write-zeroes). Returns batches that filled up.
    pub fn add_zero(
        &mut self,
        sector: u64,
        sectors: u64,
        kind: ExtentKind,
    ) -> anyhow::Result<Vec<Batch>> {
        let mut out = Vec::new();
        let mut s = 0;
        while s < sectors {
            let n = (sectors - s).min(u64::from(u32::MAX) / 2);
            self.push_extent(sector + s, n, kind);
            s += n;
            if self.full() {
                out.extend(self.flush()?);
            }
        }
        Ok(out)
    }

    /// Seal whatever is pending into a batch.
    pub fn flush(&mut self) -> anyhow::Result<Option<Batch>> {
        if self.extents.is_empty() {
            return Ok(None);
        }
        let seq = self.next_seq;
        let extents = std::mem::take(&mut self.extents);
        if let Some(m) = &self.acked {
            m.lock()
                .expect("acked map lock")
                .intent(seq, &extents, &self.plain)?;
        }
        let aad = aead::batch_aad(&self.machine, &self.disk, self.epoch, seq, seq, &extents);
        let nonce = aead::nonce(self.epoch, seq)?;
        let mut payload = Vec::with_capacity(self.plain.len() / 2 + 64);
        let flags = self
            .sealer
            .seal_into(
                &self.key,
                &aad,
                nonce,
                &self.plain,
                self.level,
                &mut payload,
            )
            .context("sealing a batch")?;
        self.plain.clear();
        self.next_seq += 1;
        Ok(Some(Batch {
            disk_id: self.disk,
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
        }))
    }
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    words
        .into_iter()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_seal::Sealer;

    fn builder(max: usize) -> BatchBuilder {
        BatchBuilder::new(
            "m1",
            DiskId([1; 16]),
            3,
            DataKey::from_bytes([9; 32]),
            1,
            max,
        )
    }

    fn open(b: &Batch) -> Vec<u8> {
        let aad = aead::batch_aad(
            "m1",
            &b.disk_id,
            b.epoch,
            b.first_seq,
            b.last_seq,
            &b.extents,
        );
        let nonce = aead::nonce(b.epoch, b.first_seq).unwrap();
        let flags = if b.flags & FLAG_COMPRESSED != 0 {
            Flags::Zstd
        } else {
            Flags::Stored
        };
        let mut out = Vec::new();
        Sealer::new()
            .open_into(
                &DataKey::from_bytes([9; 32]),
                &aad,
                nonce,
                flags,
                &b.payload,
                64 << 20,
                &mut out,
            )
            .unwrap();
        out
    }

    #[test]
    fn zero_grains_become_zero_extents_and_data_round_trips() {
        let mut b = builder(1 << 20);
        let mut data = vec![0u8; 256 * 512]; // two grains at sector 128: zero, then data
        data[128 * 512 + 7] = 1;
        assert!(b.add(128, &data).unwrap().is_empty());
        let batch = b.flush().unwrap().unwrap();
        assert_eq!(
            batch.extents,
            vec![
                Extent {
                    sector: 128,
                    sectors: 128,
                    kind: ExtentKind::Zero
                },
                Extent {
                    sector: 256,
                    sectors: 128,
                    kind: ExtentKind::Data
                },
            ]
        );
        assert_eq!(open(&batch), data[128 * 512..]);
        assert_eq!((batch.first_seq, b.next_seq()), (1, 2));
        assert!(b.flush().unwrap().is_none());
    }

    #[test]
    fn batches_fill_up_and_extents_merge() {
        let mut b = builder(64 << 10);
        let data: Vec<u8> = (0..(512 * 512)).map(|i| (i % 251) as u8 + 1).collect();
        let full = b.add(0, &data).unwrap();
        assert_eq!(full.len(), 4, "256 KiB of data in 64 KiB batches");
        for (i, batch) in full.iter().enumerate() {
            assert_eq!(batch.first_seq, i as u64 + 1);
            assert_eq!(batch.extents.len(), 1, "adjacent grains merge");
            assert_eq!(open(batch), data[i * 65536..(i + 1) * 65536]);
        }
        // Tampering with the extent list breaks authentication.
        let mut bad = full[0].clone();
        bad.extents[0].sector += 1;
        let aad = aead::batch_aad("m1", &bad.disk_id, bad.epoch, 1, 1, &bad.extents);
        let flags = if bad.flags & FLAG_COMPRESSED != 0 {
            Flags::Zstd
        } else {
            Flags::Stored
        };
        let mut out = Vec::new();
        assert!(
            Sealer::new()
                .open_into(
                    &DataKey::from_bytes([9; 32]),
                    &aad,
                    aead::nonce(3, 1).unwrap(),
                    flags,
                    &bad.payload,
                    1 << 20,
                    &mut out
                )
                .is_err()
        );
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0; 1001];
        v[1000] = 1;
        assert!(!is_zero(&v));
        v[1000] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
