//! ripcord's master target (`ripcord-mt`, not built yet): the on-premises end of
//! failback.
//!
//! After a failover, the recovered machine runs elsewhere. Reprotecting it installs an
//! agent there that replicates back, through a process server, to the master target,
//! which applies that reverse stream to the machine's original disk. Failback then runs in
//! three stages: a delta resync (both sides hash regions and only differing blocks are
//! sent), a planned failover back to the original disk at a recovery point, and forward
//! protection re-enabled, again as a delta (`../shared/DESIGN.md`, section 2.9).
//!
//! What this crate must guarantee once built:
//! - it writes only the disks it was assigned, and only batches sealed by the key of the
//!   machine that owns them (authenticated before anything is applied);
//! - batches are applied in sequence order, durably, and a recovery point on the original
//!   disk is reported only after every batch before it is on that disk;
//! - an interrupted failback resumes from the last applied sequence, never from scratch.
//!
//! Nothing here works yet: the failback issue fills this crate.
