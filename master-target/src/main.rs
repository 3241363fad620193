//! `ripcord-mt`: the master target. See the library's documentation for its guarantees.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ripcord_master_target::{
    follow::{FollowArgs, follow},
    metrics::Metrics,
    state::ApplyState,
    status,
};
use ripcord_store::DiskId;

/// ripcord-mt: keep a block device at a protected disk's newest recovery point.
///
/// The master target is the receiving end of failback: after a failover, the recovered
/// machine's agent replicates back (reprotect) and ripcord-mt applies each new recovery
/// point of that disk from the target store to the original device, writing only what
/// changed since the point the device holds. The state directory records, durably, which
/// point the device is exactly at (or that a step between two points is under way), so a
/// restart after a stop, a kill or a power cut resumes without a full copy.
#[derive(Parser)]
#[command(name = "ripcord-mt", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the disk's newest recovery point to the device, and keep doing so as new
    /// points arrive (until SIGINT/SIGTERM; a second signal stops at once).
    Follow {
        #[command(flatten)]
        apply: ApplyArgs,
        /// How often to look for a new point, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
        /// Apply the newest point once, then exit (0 when the device is exactly at it).
        #[arg(long)]
        once: bool,
        /// Forget the recorded position: the next step copies the whole disk.
        #[arg(long)]
        reset: bool,
        /// Prometheus metrics (`GET /metrics`) on this address; "" turns them off.
        #[arg(long, default_value = "127.0.0.1:9446")]
        metrics_listen: String,
    },
    /// Planned failover back: apply one point of the disk (default: the newest) to the
    /// device, then stop. Run it once the application on the recovered machine is stopped
    /// and its agent has stopped (the agent's stop waits until every write is in a
    /// recovery point), so the newest point is the final one. Exit 0 only when the device
    /// is exactly at that point.
    Failback {
        #[command(flatten)]
        apply: ApplyArgs,
        /// `latest`, or a point id `<epoch>-<cut>` (`ripcord points list` shows them).
        #[arg(long, default_value = "latest")]
        point: String,
    },
    /// What each followed disk's device holds: exactly at a point, or between two.
    /// Exit status 3 when nothing is followed.
    Status {
        /// The state directory `follow` uses.
        #[arg(long, default_value = "/var/lib/ripcord/mt")]
        state_dir: PathBuf,
        /// JSON lines (the state files) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// What `follow` and `failback` both need: which disk's points go to which device.
#[derive(clap::Args)]
struct ApplyArgs {
    /// Target store URL: file:///path or s3://bucket/prefix (S3 credentials from
    /// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
    #[arg(long)]
    target: String,
    /// The disk whose points are applied: the recovered machine's disk (32 hex digits;
    /// `ripcord points list`).
    #[arg(long)]
    disk: String,
    /// The block device (or image file) to write: the original machine's disk. A device
    /// that is mounted, held, protected by an agent or open elsewhere is refused.
    #[arg(long)]
    device: PathBuf,
    /// Where the applied position of each disk is kept (created 0700).
    #[arg(long, default_value = "/var/lib/ripcord/mt")]
    state_dir: PathBuf,
    /// File holding the deployment passphrase (mode 0600); else RIPCORD_PASSPHRASE or a
    /// prompt on a terminal.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Write the device even if the safety checks refuse it (mounted, held, protected by
    /// an agent), or an existing image no state file knows.
    #[arg(long)]
    force: bool,
}

impl ApplyArgs {
    /// The follow loop's arguments for these, with the rest at their defaults (one pass
    /// to the newest point, no metrics).
    fn follow_args(self) -> anyhow::Result<FollowArgs> {
        Ok(FollowArgs {
            disk: parse_disk(&self.disk)?,
            passphrase: ripcord_seal::read_passphrase(self.passphrase_file.as_deref())?.to_vec(),
            target: self.target,
            device: self.device,
            state_dir: self.state_dir,
            poll: Duration::from_secs(1),
            once: true,
            point: None,
            force: self.force,
            reset: false,
            report: None,
        })
    }
}

fn main() -> std::process::ExitCode {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIPCORD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", ripcord_types::report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Status { state_dir, json } => Ok(if status::print(&state_dir, json)? {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::from(3)
        }),
        Command::Failback { apply, point } => {
            let point = match point.as_str() {
                "latest" => None,
                id => Some(parse_point_id(id)?),
            };
            let (device, disk) = (apply.device.clone(), apply.disk.clone());
            let state = run_follow(FollowArgs {
                point,
                ..apply.follow_args()?
            })?;
            let at = state
                .consistent()
                .context("the device is not at a recovery point; run failback again")?;
            println!(
                "failback done: {} is exactly at point {} of disk {disk} ({}, taken {}).",
                device.display(),
                at.id,
                if at.app_consistent {
                    "app-consistent"
                } else {
                    "crash-consistent"
                },
                rfc3339(at.time_ns)
            );
            println!(
                "Start the original machine from it, then protect it again: \
                 ripcord-agent protect {}",
                device.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Follow {
            apply,
            poll_ms,
            once,
            reset,
            metrics_listen,
        } => {
            let report = if metrics_listen.is_empty() {
                None
            } else {
                let addr = metrics_listen.parse().with_context(|| {
                    format!(
                        "--metrics-listen {metrics_listen:?} is not an IP address and port such \
                         as 127.0.0.1:9446 (\"\" turns metrics off)"
                    )
                })?;
                let metrics = Arc::new(Metrics::new());
                let report = metrics.report.clone();
                ripcord_metrics_http::serve(addr, move || metrics.render())?;
                Some(report)
            };
            run_follow(FollowArgs {
                poll: Duration::from_millis(poll_ms.max(10)),
                once,
                reset,
                report,
                ..apply.follow_args()?
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn run_follow(args: FollowArgs) -> anyhow::Result<ApplyState> {
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        tokio::spawn(watch_signals(stop.clone()));
        follow(args, &stop).await
    })
}

fn parse_disk(disk: &str) -> anyhow::Result<DiskId> {
    DiskId::from_hex(disk.trim()).with_context(|| format!("disk id {disk:?} is not 32 hex digits"))
}

fn parse_point_id(id: &str) -> anyhow::Result<(u64, u64)> {
    id.split_once('-')
        .and_then(|(e, c)| Some((e.parse().ok()?, c.parse().ok()?)))
        .with_context(|| {
            format!("--point {id:?} is not `latest` or a point id <epoch>-<cut> such as 3-17")
        })
}

/// Unix ns as RFC 3339 (UTC, seconds).
fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// The first SIGINT/SIGTERM asks the loop to stop after the current batch; a second one
/// exits at once (the state file is durable at every moment, so nothing is lost).
async fn watch_signals(stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot watch SIGINT/SIGTERM; stop ripcord-mt with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if stop.swap(true, Ordering::Relaxed) {
            eprintln!("second signal: exiting now; the next run finishes the step");
            std::process::exit(130);
        }
        tracing::info!("stopping after the current batch (a second signal stops at once)");
    }
}
