//! ripcord's agent: block-change capture with eBPF on protected devices.
//!
//! The library holds the logic (decoding, extent sets, device resolution, capture) so it
//! is unit-testable; `main.rs` is the command line.

pub mod batch;
pub mod btf;
pub mod capture;
pub mod config;
pub mod device;
pub mod event;
pub mod extents;
pub mod freeze;
pub mod metrics;
mod mmap;
pub mod net;
pub mod pipeline;
pub mod points;
pub mod preflight;
pub mod protect;
pub mod read_log;
pub mod readback;
pub mod state;
pub mod watch;
