//! A workload with cross-machine causality, and its checker (issue 16): a record is
//! written on disk A and completes; `gap` later a record on disk B refers to it. A group
//! point must never show B's reference without A's record.
//!
//! # Layout
//! Both disks hold [`SLOTS`] 4 KiB blocks from offset 0. Record `n` of A goes to A's
//! block `n % SLOTS`; B's record referring to it goes to B's block `n % SLOTS`. Every
//! 512-byte sector of a block starts with [`MAGIC`], the side (`b'A'`/`b'B'`) and `n`, so
//! a block torn by a write in flight at the cut (its sectors from two records) is seen as
//! such.
//!
//! # The check
//! A's records are written one after the other, each after the previous completed. So if
//! B's block holds a whole reference to `n`, A's block `n % SLOTS` must hold, in every
//! sector, a record `>= n` (record `n` or one written after it). A torn B block is a write
//! in flight at the cut: it refers to nothing.

use std::{
    fs::File,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// Blocks per disk the workload cycles through.
pub const SLOTS: u64 = 256;
const BLOCK: usize = 4096;
const SECTOR: usize = 512;
/// Starts every sector of a record.
pub const MAGIC: &[u8; 8] = b"RCCAUSAL";

/// A block of `side` carrying record `n`.
fn record(side: u8, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for s in b.chunks_mut(SECTOR) {
        s[..8].copy_from_slice(MAGIC);
        s[8] = side;
        s[9..17].copy_from_slice(&n.to_le_bytes());
        s[17..].fill((n as u8) ^ side);
    }
    b
}

/// The record numbers in each sector of a block of `side`, `None` for a sector that holds
/// no record of that side.
fn sectors_of(block: &[u8], side: u8) -> Vec<Option<u64>> {
    block
        .chunks(SECTOR)
        .map(|s| {
            (s[..8] == MAGIC[..] && s[8] == side)
                .then(|| u64::from_le_bytes(s[9..17].try_into().expect("8 bytes")))
        })
        .collect()
}

/// An aligned buffer for O_DIRECT.
fn aligned(data: &[u8]) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; data.len() + BLOCK];
    let off = v.as_ptr().align_offset(BLOCK);
    v[off..off + data.len()].copy_from_slice(data);
    (v, off)
}

/// The running workload: stop it with [`CausalWriter::stop`].
pub struct CausalWriter {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl CausalWriter {
    /// Starts writing record after record: A's (O_DIRECT, so the write has completed when
    /// `pwrite` returns), then after `gap` B's reference to it.
    pub fn start(a: &Path, b: &Path, gap: Duration) -> std::io::Result<CausalWriter> {
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(p)
        };
        let (fa, fb) = (open(a)?, open(b)?);
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let at = (n % SLOTS) * BLOCK as u64;
                    let (buf, off) = aligned(&record(b'A', n));
                    fa.write_all_at(&buf[off..off + BLOCK], at)?;
                    std::thread::sleep(gap);
                    let (buf, off) = aligned(&record(b'B', n));
                    fb.write_all_at(&buf[off..off + BLOCK], at)?;
                    written.store(n, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        Ok(CausalWriter {
            stop,
            written,
            thread: Some(thread),
        })
    }

    /// Pairs written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stops the writer; returns the pairs written, or its I/O error.
    pub fn stop(mut self) -> std::io::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the causal writer panicked")?;
        }
        Ok(self.written())
    }
}

impl Drop for CausalWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one point showed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Whole references found on B.
    pub references: u64,
    /// The newest of them (0: none).
    pub newest: u64,
    /// Torn blocks on B (writes in flight at the cut).
    pub torn: u64,
}

/// Checks the images of A and B at one group point. `Err` names every reference on B
/// whose record on A is missing.
pub fn check(a: &Path, b: &Path) -> Result<Checked, String> {
    let read = |p: &Path| -> Result<Vec<u8>, String> {
        let f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut buf = vec![0u8; SLOTS as usize * BLOCK];
        f.read_exact_at(&mut buf, 0)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(buf)
    };
    let (ia, ib) = (read(a)?, read(b)?);
    let mut out = Checked::default();
    let mut broken = Vec::new();
    for slot in 0..SLOTS as usize {
        let refs = sectors_of(&ib[slot * BLOCK..(slot + 1) * BLOCK], b'B');
        let Some(Some(n)) = refs.first().copied() else {
            if refs.iter().any(Option::is_some) {
                out.torn += 1;
            }
            continue;
        };
        if refs.iter().any(|r| *r != Some(n)) {
            out.torn += 1;
            continue;
        }
        out.references += 1;
        out.newest = out.newest.max(n);
        let held = sectors_of(&ia[slot * BLOCK..(slot + 1) * BLOCK], b'A');
        if !held.iter().all(|s| s.is_some_and(|m| m >= n)) {
            broken.push(format!(
                "B refers to record {n}, A's block {slot} holds {held:?}"
            ));
        }
    }
    if broken.is_empty() {
        Ok(out)
    } else {
        Err(broken.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, name: &str, records: &[(u64, Vec<u8>)]) -> std::path::PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(SLOTS * BLOCK as u64).unwrap();
        for (slot, data) in records {
            f.write_all_at(data, slot * BLOCK as u64).unwrap();
        }
        p
    }

    #[test]
    fn the_checker_finds_a_reference_without_its_record_and_ignores_torn_blocks() {
        let dir = std::env::temp_dir().join(format!("causal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Consistent: A holds 5 (and 261, which overwrote slot 5 later), B refers to 5.
        let a = image(&dir, "a", &[(5, record(b'A', 5)), (6, record(b'A', 6))]);
        let b = image(&dir, "b", &[(5, record(b'B', 5))]);
        let ok = check(&a, &b).unwrap();
        assert_eq!((ok.references, ok.newest), (1, 5));
        // B refers to 6 and 7; A lacks 7.
        let b = image(&dir, "b2", &[(6, record(b'B', 6)), (7, record(b'B', 7))]);
        let err = check(&a, &b).unwrap_err();
        assert!(
            err.contains("record 7") && !err.contains("record 6"),
            "{err}"
        );
        // A torn B block (half 8, half 264) refers to nothing.
        let mut torn = record(b'B', 8);
        torn[2048..].copy_from_slice(&record(b'B', 8 + SLOTS)[2048..]);
        let b = image(&dir, "b3", &[(8, torn)]);
        assert_eq!(check(&a, &b).unwrap().torn, 1);
        // A torn A block whose sectors are older than the reference: broken.
        let mut old = record(b'A', 9);
        old[..2048].copy_from_slice(&record(b'A', 9 - 1)[..2048]);
        let a = image(&dir, "a2", &[(9, old)]);
        let b = image(&dir, "b4", &[(9, record(b'B', 9))]);
        assert!(check(&a, &b).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
