//! The replication side of the agent: everything between a captured change and a batch
//! acknowledged by the process server. It depends on the capture layer (`crate::capture`
//! and friends), never the reverse.
//!
//! - `pipeline`: readback rounds and crash-consistent cuts (the argument for why a cut is
//!   a crash state is its module doc); `read_log`: when a discard may be sent as zeroes;
//!   `readback`: O_DIRECT reads of the device.
//! - `batch`: zero detection, compression and sealing into batches; `acked_map`: what the
//!   server holds of each block, so a restarted agent continues its epoch and sends only
//!   what differs.
//! - `points`: forced and application-consistent points; `freeze`: FIFREEZE/FITHAW with a
//!   watchdog.
//! - `net`: the QUIC sender with its window and acknowledgements.
//! - `protect`: the `protect` command that wires them together; `config`, `state`
//!   (disk ids and epochs) and `metrics` serve it; `lock`: one agent per device and per
//!   state directory; `stop`: signals and bounded waits; `outcome`: how an epoch ends and
//!   what the agent says about it; `status`: the status file, progress lines and
//!   `ripcord-agent status`.

pub mod acked_map;
pub mod batch;
pub mod config;
pub mod freeze;
pub mod group;
pub mod lock;
pub mod metrics;
pub mod net;
pub mod outcome;
pub mod pipeline;
pub mod points;
pub mod policy;
pub mod protect;
pub mod read_log;
pub mod readback;
pub mod renew;
pub mod state;
pub mod status;
pub mod stop;
