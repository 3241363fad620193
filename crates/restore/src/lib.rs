//! Restoring from the target store, shared by `ripcord` (failover, verify) and the master
//! target (`ripcord-mt`, which keeps a device at a disk's newest recovery point):
//! - [`authentic`]: reading a recovery point so that nothing unauthenticated is placed;
//! - [`output_guard`]: what a restore may overwrite (mounted, held or protected devices
//!   and existing images are refused unless forced);
//! - [`zero`]: zeroing a range of the output without writing zero bytes.

pub mod authentic;
pub mod output_guard;
#[cfg(feature = "testing")]
pub mod testing;
pub mod zero;

pub use authentic::{check_point, data_keys, open_batch, open_placed, resolve_authentic};
