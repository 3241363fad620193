//! GC step 4 (grace-period deletion of unreferenced packs, see [`crate::gc`]) and the
//! packs GC rewrites write.

use super::{GcConfig, GcReport, ns};
use crate::error::Result;
use crate::format::{self, DirEntry};
use crate::store::{Listed, Store};
use crate::types::{BatchLocation, DiskId};
use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

impl Store {
    pub(super) async fn sweep_packs(
        &self,
        disk: &DiskId,
        packs: &[Listed],
        referenced: &HashSet<String>,
        cfg: &GcConfig,
        now: SystemTime,
        rep: &mut GcReport,
    ) -> Result<()> {
        let gdir = format!("{}/gc", format::disk_dir(disk));
        let markers = self.list(&gdir).await?;
        let mut first_seen: HashMap<String, u64> = HashMap::new();
        for m in &markers {
            if format::parse_pending_delete(&m.name).is_none() {
                continue;
            }
            let b = self.get(&m.name).await?;
            for (p, t) in format::named(format::decode_pending_delete(&b), &m.name)? {
                let v = first_seen.entry(p).or_insert(t);
                *v = (*v).min(t);
            }
        }
        let now_ns = ns(now);
        let cutoff = now_ns.saturating_sub(cfg.grace.as_nanos() as u64);
        let mut pending: Vec<(String, u64)> = Vec::new();
        for p in packs.iter().filter(|p| !referenced.contains(&p.name)) {
            let seen = first_seen.get(&p.name).copied().unwrap_or(now_ns);
            if seen <= cutoff && p.modified_ns <= cutoff {
                self.delete(&p.name).await?;
                rep.packs_deleted += 1;
                rep.bytes_deleted += p.size;
                tracing::debug!(pack = %p.name, "unreferenced pack deleted after grace");
            } else {
                pending.push((p.name.clone(), seen));
            }
        }
        rep.packs_awaiting_grace = pending.len();
        if !pending.is_empty() {
            self.put(
                &format::pending_delete_name(disk, now_ns),
                format::encode_pending_delete(&pending),
            )
            .await?;
        }
        for m in &markers {
            self.delete(&m.name).await?;
        }
        Ok(())
    }
}

/// A pack being assembled by a GC rewrite.
#[derive(Default)]
pub(super) struct NewPack {
    name: String,
    pub(super) buf: Vec<u8>,
    dir: Vec<DirEntry>,
}

impl NewPack {
    pub(super) fn push(
        &mut self,
        disk: &DiskId,
        epoch: u64,
        old: &BatchLocation,
        rec: &[u8],
    ) -> BatchLocation {
        if self.buf.is_empty() {
            self.name = format::pack_name(disk, epoch, old.seq);
            self.buf = format::pack_header(disk, epoch);
        }
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(rec);
        self.dir.push(DirEntry {
            seq: old.seq,
            offset,
            length: old.length,
            crc: old.checksum,
        });
        BatchLocation {
            pack: self.name.clone(),
            offset,
            ..old.clone()
        }
    }

    pub(super) async fn upload(&mut self, store: &Store, rep: &mut GcReport) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(&format::pack_footer(&self.dir));
        self.dir.clear();
        store.put(&self.name, buf).await?;
        rep.packs_written += 1;
        Ok(())
    }
}
