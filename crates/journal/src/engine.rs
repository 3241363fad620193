//! IO engines: how record bytes reach the file and how they are made durable.
//!
//! The journal does all data writes and all fsyncs (segment files and the
//! directory) through an [`Engine`], so a test can wrap a real engine to inject
//! failures (ENOSPC, failed fsync, short writes) without replacing production
//! types. Two production engines exist:
//!
//! * [`UringEngine`]: io_uring `WRITE`/`WRITEV` and `FSYNC` opcodes, probed at
//!   start-up.
//! * [`SyncEngine`]: plain `pwritev(2)` and `fdatasync(2)`/`fsync(2)`.
//!
//! [`select_engine`] picks one according to [`EngineChoice`].

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, Probe, opcode, types};

use crate::error::{JournalError, Result};

/// Which durability primitive to use in [`Engine::sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// `fdatasync`: data plus the metadata needed to read it back (size).
    Data,
    /// `fsync`: data and all metadata (used for new files and directories).
    All,
}

/// Identifies an engine implementation (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring engine.
    IoUring,
    /// pwrite/fdatasync engine.
    Sync,
    /// A caller-supplied engine (e.g. a fault-injection wrapper).
    Custom,
}

/// Engine selection policy for [`Journal::open`](crate::Journal::open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// Probe io_uring; use it if the ring can be created and the required
    /// opcodes are supported, otherwise log why and use [`SyncEngine`].
    #[default]
    Auto,
    /// Require io_uring; fail with [`JournalError::EngineUnavailable`] if unusable.
    IoUring,
    /// Always use the pwrite/fdatasync engine.
    Sync,
}

/// Positional write + sync primitive used by the journal.
///
/// Implementations must be plain pass-throughs: `write_at` may write fewer
/// bytes than requested (the journal loops), must not retry a failed sync,
/// and must report errors exactly as the OS did.
pub trait Engine: Send {
    /// Implementation identifier.
    fn kind(&self) -> EngineKind;

    /// Write the concatenation of `bufs` at `offset` of `fd`. Returns the
    /// number of bytes written, which may be less than the total (short
    /// write). `bufs` has at most [`MAX_IOVECS`] entries and is non-empty.
    fn write_at(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize>;

    /// Make previous writes to `fd` durable.
    fn sync(&mut self, fd: BorrowedFd<'_>, kind: SyncKind) -> io::Result<()>;
}

impl<E: Engine + ?Sized> Engine for Box<E> {
    fn kind(&self) -> EngineKind {
        (**self).kind()
    }
    fn write_at(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        (**self).write_at(fd, bufs, offset)
    }
    fn sync(&mut self, fd: BorrowedFd<'_>, kind: SyncKind) -> io::Result<()> {
        (**self).sync(fd, kind)
    }
}

/// Maximum number of buffers passed to one [`Engine::write_at`] call (IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

/// Largest byte count submitted in one write (io_uring lengths are u32 and
/// Linux caps a single write at 0x7ffff000 bytes anyway).
const MAX_WRITE_BYTES: usize = 0x7fff_f000;

/// The pwritev/fdatasync engine.
#[derive(Debug, Default)]
pub struct SyncEngine;

impl SyncEngine {
    /// Create the engine (no set-up needed).
    pub fn new() -> Self {
        SyncEngine
    }
}

impl Engine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn write_at(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let n = bufs.len().min(MAX_IOVECS);
        loop {
            // SAFETY: `IoSlice` is guaranteed ABI-compatible with `struct iovec`
            // on Unix; `bufs` is a live slice of at least `n` entries whose
            // buffers are borrowed for the duration of this call, and `fd` is a
            // valid borrowed descriptor.
            let r = unsafe {
                libc::pwritev(
                    fd.as_raw_fd(),
                    bufs.as_ptr().cast::<libc::iovec>(),
                    n as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn sync(&mut self, fd: BorrowedFd<'_>, kind: SyncKind) -> io::Result<()> {
        // SAFETY: `fd` is a valid borrowed descriptor for the call's duration.
        let r = unsafe {
            match kind {
                SyncKind::Data => libc::fdatasync(fd.as_raw_fd()),
                SyncKind::All => libc::fsync(fd.as_raw_fd()),
            }
        };
        // fsync is never retried, not even on EINTR (Linux does not return it
        // for regular files; if it ever did, state would be unknown).
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The io_uring engine: each write is one `WRITE` (single buffer) or `WRITEV`
/// SQE, each sync one `FSYNC` SQE (with `DATASYNC` for [`SyncKind::Data`]);
/// the call submits and waits for the completion.
pub struct UringEngine {
    ring: IoUring,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine").finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Create a ring with `entries` submission slots and probe that the
    /// `WRITE`, `WRITEV` and `FSYNC` opcodes are supported.
    pub fn new(entries: u32) -> Result<Self> {
        let ring = IoUring::new(entries.max(2)).map_err(|e| JournalError::EngineUnavailable {
            reason: format!("io_uring_setup failed: {e}"),
        })?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| {
            JournalError::EngineUnavailable {
                reason: format!("IORING_REGISTER_PROBE failed: {e}"),
            }
        })?;
        for (code, name) in [
            (opcode::Write::CODE, "IORING_OP_WRITE"),
            (opcode::Writev::CODE, "IORING_OP_WRITEV"),
            (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(JournalError::EngineUnavailable {
                    reason: format!("opcode {name} not supported by the kernel"),
                });
            }
        }
        Ok(UringEngine { ring })
    }

    /// Submit one SQE and wait for its completion; returns the raw result.
    ///
    /// # Safety
    /// Every buffer or pointer referenced by `entry` must stay valid until this
    /// function returns (it does not return before the completion arrives).
    unsafe fn submit_one(&mut self, entry: io_uring::squeue::Entry) -> io::Result<i32> {
        let entry = entry.user_data(0x5249_5043);
        // SAFETY: the caller guarantees the entry's buffers outlive this call,
        // and we wait for the completion before returning, so the kernel never
        // accesses them afterwards.
        unsafe {
            self.ring
                .submission()
                .push(&entry)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if let Some(cqe) = self.ring.completion().next() {
                return Ok(cqe.result());
            }
        }
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn write_at(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let fd = types::Fd(fd.as_raw_fd());
        let entry = if bufs.len() == 1 {
            let len = bufs[0].len().min(MAX_WRITE_BYTES) as u32;
            opcode::Write::new(fd, bufs[0].as_ptr(), len)
                .offset(offset)
                .build()
        } else {
            let n = bufs.len().min(MAX_IOVECS) as u32;
            opcode::Writev::new(fd, bufs.as_ptr().cast::<libc::iovec>(), n)
                .offset(offset)
                .build()
        };
        loop {
            // SAFETY: the SQE points at `bufs` (IoSlice is ABI-compatible with
            // iovec) and the buffers it borrows; both outlive this call and
            // `submit_one` waits for the completion before returning.
            let res = unsafe { self.submit_one(entry.clone())? };
            if res >= 0 {
                return Ok(res as usize);
            }
            if res != -libc::EINTR {
                return Err(io::Error::from_raw_os_error(-res));
            }
        }
    }

    fn sync(&mut self, fd: BorrowedFd<'_>, kind: SyncKind) -> io::Result<()> {
        let flags = match kind {
            SyncKind::Data => types::FsyncFlags::DATASYNC,
            SyncKind::All => types::FsyncFlags::empty(),
        };
        let entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(flags)
            .build();
        // SAFETY: the FSYNC SQE references no memory, only the descriptor,
        // which is borrowed for the duration of the call.
        let res = unsafe { self.submit_one(entry)? };
        if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(())
        }
    }
}

/// Build an engine according to `choice`. With [`EngineChoice::Auto`] a failed
/// io_uring probe is logged (with its reason) and the sync engine returned.
pub fn select_engine(choice: EngineChoice, uring_entries: u32) -> Result<Box<dyn Engine>> {
    match choice {
        EngineChoice::Sync => Ok(Box::new(SyncEngine::new())),
        EngineChoice::IoUring => Ok(Box::new(UringEngine::new(uring_entries)?)),
        EngineChoice::Auto => match UringEngine::new(uring_entries) {
            Ok(e) => Ok(Box::new(e)),
            Err(e) => {
                tracing::warn!(reason = %e, "io_uring unusable, falling back to pwrite/fdatasync engine");
                Ok(Box::new(SyncEngine::new()))
            }
        },
    }
}
