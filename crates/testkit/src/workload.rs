//! A seeded block workload against a raw device that records exactly which sectors it
//! changed: O_DIRECT writes (512 B to 1 MiB at random offsets), buffered writes + fsync,
//! BLKDISCARD, BLKZEROOUT, and io_uring writes at a given queue depth.

use std::{
    alloc::Layout,
    fs::{File, OpenOptions},
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileExt as _, OpenOptionsExt as _},
    },
    path::Path,
};

use anyhow::{Context as _, bail, ensure};
use io_uring::{IoUring, opcode, types};
use rand::{Rng as _, RngExt as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

const SECTOR: u64 = 512;
const PAGE: u64 = 4096;
// BLKDISCARD = _IO(0x12, 119) and BLKZEROOUT = _IO(0x12, 127) (include/uapi/linux/fs.h)
// read a `u64[2]` (offset, length) through their argument although their request codes
// declare none: "bad" ioctls in nix's terms.
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
const _: () = assert!(nix::request_code_none!(0x12, 119) == 0x1277);
const _: () = assert!(nix::request_code_none!(0x12, 127) == 0x127f);

/// The signature `ioctl_write_ptr_bad!` gives BLKDISCARD and BLKZEROOUT.
type RangeIoctl = unsafe fn(libc::c_int, *const [u64; 2]) -> nix::Result<libc::c_int>;

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), PAGE as usize).expect("layout");
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {len} bytes failed");
        AlignedBuf { ptr, layout }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Counts of what a workload did, and every sector range it changed.
#[derive(Debug, Default, Clone)]
pub struct WorkloadReport {
    /// (sector, sectors) of every change, in submission order (ranges may overlap).
    pub changed: Vec<(u64, u64)>,
    pub direct_writes: u64,
    pub buffered_writes: u64,
    pub discards: u64,
    pub zeroouts: u64,
    pub uring_writes: u64,
    pub bytes: u64,
}

/// A seeded workload on one block device (or a window of it).
pub struct Workload {
    rng: ChaCha8Rng,
    direct: File,
    buffered: File,
    /// Device size in bytes.
    size: u64,
    pub report: WorkloadReport,
}

impl Workload {
    pub fn new(dev: &Path, seed: u64) -> anyhow::Result<Workload> {
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .with_context(|| format!("opening {} with O_DIRECT", dev.display()))?;
        let buffered = OpenOptions::new().read(true).write(true).open(dev)?;
        let size = ripcord_oracle::device_bytes(&direct)?;
        Ok(Workload {
            rng: ChaCha8Rng::seed_from_u64(seed),
            direct,
            buffered,
            size,
            report: WorkloadReport::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Random `(offset, len)` with both multiples of `align`, `len` in `[min, max]`.
    fn extent(&mut self, align: u64, min: u64, max: u64) -> (u64, u64) {
        let len = self.rng.random_range(min / align..=max / align) * align;
        let off = self.rng.random_range(0..=(self.size - len) / align) * align;
        (off, len)
    }

    fn record(&mut self, off: u64, len: u64) {
        self.report.changed.push((off / SECTOR, len / SECTOR));
        self.report.bytes += len;
    }

    fn random_buf(&mut self, len: u64) -> AlignedBuf {
        let mut buf = AlignedBuf::new(len as usize);
        self.rng.fill_bytes(buf.as_mut_slice());
        buf
    }

    /// O_DIRECT writes of 512 B to 1 MiB at random 512-aligned offsets.
    pub fn direct_writes(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let (off, len) = self.extent(SECTOR, SECTOR, 1 << 20);
            let buf = self.random_buf(len);
            self.direct
                .write_all_at(&buf.as_slice()[..len as usize], off)
                .with_context(|| format!("O_DIRECT write of {len} at {off}"))?;
            self.record(off, len);
            self.report.direct_writes += 1;
        }
        Ok(())
    }

    /// 4 KiB writes at random offsets, back to back: a burst for overflow tests.
    pub fn burst(&mut self, n: usize) -> anyhow::Result<()> {
        let buf = self.random_buf(PAGE);
        for _ in 0..n {
            let (off, len) = self.extent(PAGE, PAGE, PAGE);
            self.direct.write_all_at(buf.as_slice(), off)?;
            self.record(off, len);
            self.report.direct_writes += 1;
        }
        Ok(())
    }

    /// Page-aligned buffered writes, then fsync. (Page-aligned, because writeback writes
    /// whole pages: a smaller buffered write legitimately changes more sectors.)
    pub fn buffered_writes(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let (off, len) = self.extent(PAGE, PAGE, 256 << 10);
            let buf = self.random_buf(len);
            self.buffered.write_all_at(buf.as_slice(), off)?;
            self.record(off, len);
            self.report.buffered_writes += 1;
        }
        self.buffered.sync_all().context("fsync of buffered writes")
    }

    fn range_ioctl(&mut self, ioctl: RangeIoctl, name: &str, n: usize) -> anyhow::Result<u64> {
        let mut done = 0;
        for _ in 0..n {
            let (off, len) = self.extent(PAGE, PAGE, 1 << 20);
            let range: [u64; 2] = [off, len];
            // SAFETY: the ioctl reads two u64 from a valid pointer.
            if let Err(errno) = unsafe { ioctl(self.direct.as_raw_fd(), &range) } {
                bail!("{name} of {len} at {off}: {}", std::io::Error::from(errno));
            }
            self.record(off, len);
            done += 1;
        }
        Ok(done)
    }

    /// BLKDISCARD of page-aligned ranges up to 1 MiB.
    pub fn discards(&mut self, n: usize) -> anyhow::Result<()> {
        self.report.discards += self.range_ioctl(blkdiscard, "BLKDISCARD", n)?;
        Ok(())
    }

    /// BLKZEROOUT of page-aligned ranges up to 1 MiB.
    pub fn zeroouts(&mut self, n: usize) -> anyhow::Result<()> {
        self.report.zeroouts += self.range_ioctl(blkzeroout, "BLKZEROOUT", n)?;
        Ok(())
    }

    /// `batches` rounds of `depth` O_DIRECT writes (4 KiB to 128 KiB) submitted at once
    /// through io_uring.
    pub fn uring_writes(&mut self, batches: usize, depth: usize) -> anyhow::Result<()> {
        let mut ring = IoUring::new(depth.next_power_of_two() as u32).context("io_uring setup")?;
        for _ in 0..batches {
            let mut bufs = Vec::with_capacity(depth);
            for i in 0..depth {
                let (off, len) = self.extent(PAGE, PAGE, 128 << 10);
                let buf = self.random_buf(len);
                let sqe = opcode::Write::new(
                    types::Fd(self.direct.as_raw_fd()),
                    buf.as_slice().as_ptr(),
                    len as u32,
                )
                .offset(off)
                .build()
                .user_data(i as u64);
                // SAFETY: the buffer lives in `bufs` until every completion is reaped.
                unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow::anyhow!("SQ full"))?;
                bufs.push((buf, off, len));
            }
            ring.submit_and_wait(depth).context("io_uring submit")?;
            let mut seen = 0;
            while seen < depth {
                let cqes: Vec<_> = ring.completion().collect();
                if cqes.is_empty() {
                    ring.submit_and_wait(1)?;
                    continue;
                }
                for cqe in cqes {
                    let (_, off, len) = &bufs[cqe.user_data() as usize];
                    ensure!(
                        cqe.result() == *len as i32,
                        "io_uring write of {len} at {off} returned {}",
                        cqe.result()
                    );
                    seen += 1;
                }
            }
            for (_, off, len) in &bufs {
                self.record(*off, *len);
            }
            self.report.uring_writes += depth as u64;
        }
        Ok(())
    }

    /// A mix of everything, `rounds` times.
    pub fn mixed(&mut self, rounds: usize) -> anyhow::Result<()> {
        for _ in 0..rounds {
            self.direct_writes(20)?;
            self.buffered_writes(5)?;
            self.discards(3)?;
            self.zeroouts(3)?;
            self.uring_writes(2, 16)?;
        }
        Ok(())
    }
}

/// A file workload under `root`: `files` files of random size up to `max_size` bytes, each
/// written and fsynced; every third file deletes its predecessor, every seventh is renamed.
/// Returns the bytes written.
pub fn file_workload(root: &Path, seed: u64, files: usize, max_size: usize) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = root.join("d");
    std::fs::create_dir_all(&dir)?;
    let mut bytes = 0;
    for i in 0..files {
        let len = rng.random_range(1..max_size.max(2));
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let p = dir.join(format!("f{i}"));
        let mut f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        f.write_all(&data)?;
        f.sync_all()?;
        bytes += len as u64;
        if i > 0 && i % 3 == 0 && (i - 1) % 7 != 0 {
            std::fs::remove_file(dir.join(format!("f{}", i - 1)))?;
        }
        if i % 7 == 0 {
            std::fs::rename(&p, dir.join(format!("r{i}")))?;
        }
    }
    Ok(bytes)
}
