//! ripcord's master target (`ripcord-mt`): keeps a block device (or an image) at a disk's
//! newest recovery point, applying each new point as a delta from the one before.
//!
//! In failback, the recovered machine's agent replicates its disk back through a process
//! server into the target store (reprotect), and the master target applies that reverse
//! stream to the machine's original disk; a planned failover back leaves the original
//! disk exactly at the final point (`../shared/DESIGN.md`, section 2.9). It reads the
//! store the process server writes, not a stream of its own: decision 0015 says why.
//!
//! What this crate guarantees:
//! - it places only bytes of batches sealed by the key of the machine that owns the disk,
//!   authenticated before they are written, at the places their authenticated extent
//!   lists say; points whose MAC fails are refused ([`ripcord_restore::authentic`]);
//! - the device is exactly at a recovery point whenever the state file says so, and a
//!   step between two points says so before it writes ([`state`]);
//! - an interrupted step (a stop, kill -9, a power cut) resumes from the last point
//!   applied, rewriting only what changed since it, never from scratch ([`apply`]).
//!
//! Modules: [`state`] (the durable applied position), [`apply`] (one step),
//! [`follow`] (the loop that keeps up with the newest point), [`status`], [`metrics`].

pub mod apply;
pub mod follow;
pub mod metrics;
pub mod state;
pub mod status;
