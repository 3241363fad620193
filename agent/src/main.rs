//! `ripcord-agent`: the agent that runs on every protected host.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};
use ripcord_agent::{
    capture::CaptureConfig,
    replicate::{
        config::{AgentConfig, DEFAULT_CONFIG, DEFAULT_STATE_DIR},
        protect,
        state::{AgentState, ensure_state_dir},
        status,
    },
    watch,
};

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
    /// Register this machine with a process server, or renew its certificate.
    ///
    /// Checks the server against the pinned CA hash, presents the bootstrap token, and
    /// gets a client certificate. The private key is made here and never leaves the machine.
    /// The deployment's escrow key is pinned: data keys are never wrapped to another.
    /// An already registered machine presents its current certificate instead of a token
    /// (a token cannot take over an existing machine id).
    ///
    /// Example: ripcord-agent register --server ps.example:9442 --token abcdef.0123456789abcdef
    ///          --ca-hash sha256:...
    Register {
        /// The process server's registration endpoint, HOST:PORT (port 9442 by default).
        #[arg(long)]
        server: String,
        /// Bootstrap token printed by `ripcord-ps init` or `ripcord-ps token` (single use).
        /// Not needed to renew: the machine's current certificate in --state-dir proves it.
        #[arg(long)]
        token: Option<String>,
        /// Read the bootstrap token from this file (`-`: standard input) instead: a token on
        /// a command line is visible to every user of the host (`ps`, /proc).
        #[arg(long, conflicts_with = "token", value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The deployment CA's hash printed by `ripcord-ps init` (sha256:<hex>).
        #[arg(long)]
        ca_hash: String,
        /// This machine's id (letters, digits, . _ -). Default: the host name.
        #[arg(long)]
        machine_id: Option<String>,
        /// Replication endpoint to use afterwards (e.g. this server's address behind NAT).
        /// Default: the same host, at the port the server reports. A machine the
        /// configuration role places on another process server uses that server instead.
        #[arg(long)]
        data_server: Option<String>,
        /// Where the identity and state live (created with mode 0700).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Replicate block devices to the process server until interrupted.
    ///
    /// Starts a new epoch per device with a full initial sync (zero regions are skipped;
    /// progress bar on a terminal) while tracking changes, then streams every change
    /// read back from the device, compressed and sealed, with crash-consistent cuts.
    /// SIGINT/SIGTERM flush what is pending and wait until the server has it durably, for
    /// at most the drain timeout; a second signal stops at once (exit status 1, naming what
    /// was not acknowledged). One agent per device and per state directory: a second one
    /// is refused (locks in /run/ripcord/lock and the state directory). The status is
    /// written to <state-dir>/status.json (see `ripcord-agent status`). Settings come from
    /// the config file; flags override it.
    Protect {
        /// Devices (whole disks or partitions); default: `devices` in the config file.
        #[arg(value_name = "DEVICE")]
        devices: Vec<PathBuf>,
        /// Config file (TOML; every key optional, see the README).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Process server data endpoint HOST:PORT (default: saved by `register`).
        #[arg(long)]
        server: Option<String>,
        /// Where the identity, disk ids, epochs and status live (default: `state-dir` in
        /// the config file, else /var/lib/ripcord/agent).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// zstd level (-7..=19).
        #[arg(long)]
        zstd_level: Option<i32>,
        /// After SIGINT/SIGTERM, wait at most this long for the server's acknowledgements
        /// (1..=3600; default: `drain-timeout-secs` in the config file, else 30).
        #[arg(long, value_name = "SECS")]
        drain_timeout_secs: Option<u64>,
        /// Create this file once tracking is active (for scripts and tests).
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
        /// Also write progress and counters (JSON) here twice a second and at exit (they
        /// always go to <state-dir>/status.json).
        #[arg(long, value_name = "PATH")]
        stats_file: Option<PathBuf>,
    },
    /// Show what the agent using a state directory is doing: per protected disk its
    /// device, disk id, epoch, initial-sync progress or streaming, last acknowledged
    /// sequence and cut, and lag.
    ///
    /// Reads <state-dir>/status.json, which a running `protect` rewrites twice a second.
    /// When no agent runs (its lock is not held) it says so and labels what it shows as the
    /// last known state; the exit status is then 3.
    Status {
        /// The agent's state directory.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print JSON: {"running": bool, "state_dir": .., "status": {..} while an agent
        /// runs, else "last_known": {..}}.
        #[arg(long)]
        json: bool,
    },
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIPCORD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Register {
            server,
            token,
            token_file,
            ca_hash,
            machine_id,
            data_server,
            state_dir,
        } => register(
            &server,
            match token_file {
                Some(file) => Some(
                    ripcord_transport::Token::read_file(&file)
                        .with_context(|| format!("reading the token from {}", file.display()))?,
                ),
                None => token,
            }
            .as_deref(),
            &ca_hash,
            machine_id,
            data_server,
            &state_dir,
        ),
        Command::Protect {
            devices,
            config,
            server,
            state_dir,
            zstd_level,
            drain_timeout_secs,
            ready_file,
            stats_file,
        } => {
            let explicit = config.as_path() != std::path::Path::new(DEFAULT_CONFIG);
            let mut cfg = AgentConfig::load(&config, explicit)?;
            if server.is_some() {
                cfg.server = server;
            }
            if let Some(d) = state_dir {
                cfg.state_dir = d;
            }
            if let Some(l) = zstd_level {
                cfg.zstd_level = l;
            }
            if let Some(d) = drain_timeout_secs {
                cfg.drain_timeout_secs = d;
            }
            cfg.validate()?;
            protect::run(protect::ProtectOptions {
                config: cfg,
                devices,
                ready_file,
                stats_file,
            })
        }
        Command::Status { state_dir, json } => {
            if !status::show(&state_dir, json)? {
                std::process::exit(3);
            }
            Ok(())
        }
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

/// The bootstrap token in `file` (`-`: standard input), trimmed.
fn register(
    server: &str,
    token: Option<&str>,
    ca_hash: &str,
    machine_id: Option<String>,
    data_server: Option<String>,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs as _;
    let (host, _) = server
        .rsplit_once(':')
        .with_context(|| format!("--server {server:?} is not HOST:PORT"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))?;
    let machine = machine_id.unwrap_or_else(hostname);
    let machine = ripcord_transport::MachineId::new(&machine)
        .with_context(|| format!("invalid machine id {machine:?}"))?;
    let token = token
        .map(|t| ripcord_transport::Token::parse(t).context("invalid --token"))
        .transpose()?;
    // The current identity proves this machine to the server (renewal, re-registration);
    // an expired or foreign one would only fail the handshake.
    let current = ripcord_transport::Identity::load(state_dir)
        .ok()
        .filter(|id| id.machine_id() == &machine && !id.expired());
    if token.is_none() && current.is_none() {
        anyhow::bail!(
            "no valid certificate for {machine} in {}: give --token (from `ripcord-ps token`)",
            state_dir.display()
        );
    }
    ensure_state_dir(state_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let credentials = ripcord_transport::Credentials {
        token: token.as_ref(),
        current: current.as_ref(),
    };
    let registered = rt
        .block_on(ripcord_transport::register(
            addr,
            &host,
            ca_hash,
            &machine,
            credentials,
            state_dir,
        ))
        .context("registration failed")?;
    let mut state = AgentState::load(state_dir)?;
    let port = match registered.data_port {
        0 => 9443,
        p => p,
    };
    // A machine the configuration role placed on another process server replicates
    // there (its certificate names that server); else to this one, at --data-server if
    // given (e.g. behind NAT).
    let (data, data_name) = match registered.data_server {
        Some(placed) => {
            let name = placed
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .with_context(|| {
                    format!("the configuration role placed us on {placed:?}, not HOST:PORT")
                })?;
            (placed, name)
        }
        None => (
            data_server.unwrap_or_else(|| {
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            }),
            host,
        ),
    };
    state.server = Some(data);
    state.server_name = Some(data_name);
    state.register_server = Some(server.to_owned());
    state.escrow_key = Some(hex::encode(registered.escrow_key));
    state.save(state_dir)?;
    println!(
        "registered as {:?}; identity in {}; replication server {}",
        registered.identity.machine_id().as_str(),
        state_dir.display(),
        state.server.as_deref().unwrap_or_default()
    );
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// `--help` a new user can act on: every option of every subcommand says what it does.
    #[test]
    fn every_option_has_help() {
        let mut missing = Vec::new();
        for sub in Cli::command().get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
            for arg in sub.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }
}
