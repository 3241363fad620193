//! `ripcord-oracle`: proves that a replica image is a real crash state of a source disk.
//!
//! * [`workload`] writes self-describing ("stamped") 4 KiB blocks to a device through
//!   io_uring with `O_DIRECT`, and records in a [`log`] when every write, flush and discard
//!   was submitted and completed (CLOCK_MONOTONIC nanoseconds, taken in user space so that
//!   they bracket the kernel's own times).
//! * [`check`](check::check) takes an image of the device, that log and an instant `T`
//!   and classifies every block; it passes only if every block holds content the device
//!   could have held at `T`.
//! * [`selftest`] exercises both end to end (real loop device + synthetic images with
//!   injected faults).
//!
//! The block format is documented in [`block`], the log format in [`log`].

#![warn(missing_docs)]

pub mod block;
pub mod check;
pub mod error;
pub mod log;
pub mod region;
pub mod rng;
pub mod selftest;
pub mod sim;
pub mod workload;

pub use check::{
    BadBlock, CheckOptions, Class, Holds, Initial, Report, check, check_file, check_with,
};
pub use error::{Error, LogError};
pub use log::{Log, LogHeader, LogWriter, Op, OpKind};
pub use region::Region;

/// Size in bytes of an open block device or regular file: a block device's is where
/// seeking to its end lands (no `BLKGETSIZE64` ioctl), after which the offset is back at 0;
/// anything else reports its length from `stat`.
///
/// The one home of this primitive: the CLI's failover and `testkit` use it too.
pub fn device_bytes(f: &std::fs::File) -> std::io::Result<u64> {
    use std::io::{Seek as _, SeekFrom};
    use std::os::unix::fs::FileTypeExt as _;
    let md = f.metadata()?;
    if !md.file_type().is_block_device() {
        return Ok(md.len());
    }
    let mut handle = f;
    let size = handle.seek(SeekFrom::End(0))?;
    handle.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// Reads CLOCK_MONOTONIC in nanoseconds: the time base of logs and of `T`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
