//! `ripcord-agent`: the agent that runs on every protected host.
use std::{path::PathBuf, time::Duration};

use anyhow::ensure;
use clap::{Parser, Subcommand};
use ripcord_agent::{capture::CaptureConfig, watch};

/// ripcord's agent: records every completed write to protected block devices with eBPF
/// probes on the kernel's block-layer tracepoints.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture changes on block devices and report them until interrupted (Ctrl-C).
    ///
    /// Attaches probes to block:block_rq_complete and block:block_bio_queue, keeps a
    /// coalesced set of changed extents per device, and prints a live summary to stderr
    /// (events/s, dirty bytes, drops). A partition may be given: its sectors are reported
    /// relative to the partition. Needs root.
    ///
    /// Example: ripcord-agent watch --json /dev/loop0 > changes.jsonl
    Watch {
        /// Block devices to protect (whole disks or partitions), e.g. /dev/loop0.
        #[arg(required = true, value_name = "DEVICE")]
        devices: Vec<PathBuf>,
        /// Write one JSON line per change to stdout:
        /// {"dev":"7:0","sector":N,"sectors":N,"op":"write|discard|write-zeroes|flush","seq":N,"time_ns":N}.
        /// Regions whose events were dropped (ring buffer full) come as "op":"overflow";
        /// at exit, one {"op":"stats","dev":..,"events":N,"dropped":N,"overflow_all":N}
        /// line per device.
        #[arg(long)]
        json: bool,
        /// Size of the kernel-to-agent ring buffer in bytes (a power of two, at least a
        /// page). Each change takes 48 bytes.
        #[arg(long, default_value_t = agent_common::DEFAULT_RING_BYTES, value_name = "BYTES")]
        ring_bytes: u32,
        /// Bytes that may wait in the ring before the kernel wakes the agent (wakeups are
        /// batched; the agent also polls every 20 ms).
        #[arg(long, default_value_t = 64 * 1024, value_name = "BYTES")]
        wakeup_bytes: u64,
        /// Seconds between summary lines on stderr; 0 turns the summary off.
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        interval: f64,
        /// Create this file once the probes are attached (for scripts and tests).
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
        /// At exit, write per-device counters (events, dropped, dirty bytes) as JSON here.
        #[arg(long, value_name = "PATH")]
        stats_file: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIPCORD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Watch {
            devices,
            json,
            ring_bytes,
            wakeup_bytes,
            interval,
            ready_file,
            stats_file,
        } => {
            ensure!(
                interval >= 0.0 && interval.is_finite(),
                "--interval must be >= 0"
            );
            watch::run(&watch::WatchOptions {
                devices,
                json,
                capture: CaptureConfig {
                    ring_bytes,
                    wakeup_bytes,
                },
                summary: (interval > 0.0).then(|| Duration::from_secs_f64(interval)),
                ready_file,
                stats_file,
            })
        }
    }
}
