//! ripcord's agent: block-change capture with eBPF on protected devices, and the
//! replication that reads, seals and ships the changes.
//!
//! Two layers, and imports only go down:
//! - **capture** (`capture`, `btf`, `event`, `device`, `extents`, `mmap`, `preflight`,
//!   `watch`, `clock`): loads the BPF programs, follows every write to the protected
//!   devices, and hands out change events, in-flight ranges and write generations. It
//!   knows nothing of replication.
//! - **replicate** (`replicate::*`): readback rounds, cuts and recovery points, sealing,
//!   the QUIC sender, the `protect` command, its configuration, state and metrics. It
//!   uses capture.
//!
//! The library holds the logic so it is unit-testable; `main.rs` is the command line.

pub mod btf;
pub mod capture;
pub mod clock;
pub mod device;
pub mod event;
pub mod extents;
mod mmap;
pub mod preflight;
pub mod replicate;
pub mod watch;
