//! `ripcord-ps`: the process server.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ripcord_process_server::{deploy, replay, server};
use ripcord_seal::read_passphrase;
use ripcord_seal::{KdfParams, escrow::EscrowParams};

/// ripcord's process server: receives replication streams from agents (QUIC, mutual TLS),
/// journals them durably on the cache disk, and acknowledges only what is durable.
///
/// Start with `ripcord-ps init --dir /var/lib/ripcord/ps --name <this host's name or IP>`,
/// then `ripcord-ps serve --dir /var/lib/ripcord/ps`, and register agents with the token
/// and CA hash that `init` prints.
#[derive(Parser)]
#[command(name = "ripcord-ps", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Who a bootstrap token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TokenFor {
    Agent,
    ProcessServer,
}

#[derive(Subcommand)]
enum Command {
    /// Create a deployment: CA, server certificate, key escrow, first bootstrap token.
    Init {
        /// Deployment directory (created).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
        /// Names (DNS or IP) agents use to reach this server; repeat for several.
        #[arg(long = "name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        names: Vec<String>,
        /// File whose first line is the deployment passphrase (mode 0600; else
        /// RIPCORD_PASSPHRASE, else a prompt). Failover needs it; it is never stored.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Hours the first bootstrap token stays valid.
        #[arg(long, default_value_t = 24)]
        token_ttl_hours: u64,
        /// Argon2id memory for the escrow key, MiB (8..=2048).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=2048))]
        kdf_memory_mib: u32,
    },
    /// Run the server (endpoints and cache from <dir>/ps.toml).
    Serve {
        /// Deployment directory made by `init`.
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
    },
    /// Create another bootstrap token (works while the server runs).
    ///
    /// An agent's token registers new machines only: it can never take over a machine id
    /// that is already registered. `--for process-server` makes a join token instead (one
    /// new process server, `ripcord-ps join`), which registers no machine.
    Token {
        /// Deployment directory made by `init`.
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
        /// Host name or IP agents use to reach this server, for the printed register
        /// command. Default: the first name the server certificate was made for.
        #[arg(long)]
        name: Option<String>,
        /// Hours the token stays valid.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=24 * 365))]
        ttl_hours: u64,
        /// Registrations allowed with it (1..=10000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        uses: u32,
        /// Who the token is for: `agent` (registers machines) or `process-server` (one
        /// server joins with `ripcord-ps join`; config role only). Neither kind works as
        /// the other.
        #[arg(long = "for", value_enum, default_value_t = TokenFor::Agent)]
        token_for: TokenFor,
    },
    /// Join a deployment as another process server (scale-out): generates this server's
    /// key, gets its certificate from the configuration role with a process-server token
    /// (`ripcord-ps token --for process-server` there), and writes <dir> for `serve`.
    ///
    /// A process server is never newer than the configuration role (refused); an id that
    /// is registered already is refused (remove it first: `ripcord ps remove`).
    Join {
        /// Deployment directory to create for this server.
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
        /// The configuration role's registration endpoint, host:port (as its `init`
        /// printed it).
        #[arg(long = "config-role")]
        config_role: String,
        /// The deployment CA's hash (sha256:...), as `ripcord-ps token` printed it.
        #[arg(long)]
        ca_hash: String,
        /// The process-server token.
        #[arg(long, required_unless_present = "token_file")]
        token: Option<String>,
        /// Read the token from this file (`-`: standard input) instead: a token on a
        /// command line is visible to every user of the host (`ps`, /proc).
        #[arg(long, conflicts_with = "token", value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// This server's id. Default: the host name.
        #[arg(long)]
        server_id: Option<String>,
        /// Names (DNS or IP) agents use to reach this server; repeat for several.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Replication endpoint to bind (IP:port). Default 0.0.0.0:9443.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Prometheus endpoint to bind (IP:port), or "" for none. Default 127.0.0.1:9444.
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Directory for the journals (the cache disk). Default <dir>/cache.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// List or remove registered machines (works while the server runs).
    Machines {
        #[command(subcommand)]
        command: MachinesCommand,
    },
    /// Rebuild a disk image from the journal, and from the target store for what was
    /// already uploaded and trimmed (the server must be stopped).
    Replay {
        /// Deployment directory made by `init`.
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
        /// Disk id (32 hex digits, as `ripcord-agent` prints it).
        #[arg(long)]
        disk: String,
        /// Image file (created, sparse) or block device to write.
        #[arg(long)]
        output: PathBuf,
        /// File whose first line is the deployment passphrase (mode 0600; else
        /// RIPCORD_PASSPHRASE).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Stop at the last consistency cut instead of the end of the journal.
        #[arg(long, conflicts_with = "cut")]
        last_cut: bool,
        /// Stop at this cut id (of the last epoch).
        #[arg(long)]
        cut: Option<u64>,
    },
    /// This server's health (green, orange or red) and each signal behind it, as the
    /// running server last sampled it. Exit status as monitoring plugins use it: 0 green,
    /// 1 orange, 2 red, 3 unknown (the server is not running or has not sampled yet).
    Health {
        /// Deployment directory made by `init`.
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MachinesCommand {
    /// Registered machines: id, registration time, certificate expiry, token used.
    List {
        /// Deployment directory made by `init`.
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a machine: its certificate is refused at once, on open connections too
    /// (within a second), and it can register again only with a new bootstrap token. Its
    /// disks and their recovery points stay.
    Remove {
        /// Deployment directory made by `init`.
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        dir: PathBuf,
        /// The machine id.
        machine: String,
    },
}

fn main() -> std::process::ExitCode {
    // Everything this server creates (deployment, cache, local target store) is for root
    // (or the deployment's owner) only: files 0600, directories 0700.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIPCORD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let command = match Cli::parse().command {
        Command::Health { dir, json } => {
            return health(&dir, json).unwrap_or_else(|e| {
                eprintln!("error: {}", ripcord_types::report(e.as_ref()));
                std::process::ExitCode::from(3)
            });
        }
        other => other,
    };
    match run(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ripcord_types::report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `ripcord-ps health`: prints the report `serve` writes; the exit status is the level.
fn health(dir: &std::path::Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    use ripcord_process_server::health::{self, Level};
    let Some(report) = health::read_report(dir)? else {
        println!(
            "health: unknown: no report in {} (is `ripcord-ps serve` running?)",
            dir.display()
        );
        return Ok(std::process::ExitCode::from(3));
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let age_ms = now_ms.saturating_sub(report.updated_unix_ms);
    let stale = age_ms > 3 * report.sample_ms + 5000;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        if stale {
            println!(
                "health: unknown: the last report is {} s old (is `ripcord-ps serve` \
                 running?); it said {}",
                age_ms / 1000,
                report.level
            );
        } else {
            println!(
                "health: {} (sampled {:.1} s ago)",
                report.level,
                age_ms as f64 / 1e3
            );
        }
        for s in &report.signals {
            println!("  {:<7} {:<7} {}", s.signal, s.level.to_string(), s.detail);
        }
    }
    Ok(std::process::ExitCode::from(match report.level {
        _ if stale => 3,
        Level::Green => 0,
        Level::Orange => 1,
        Level::Red => 2,
    }))
}

/// Resolves at the first SIGINT or SIGTERM; a second one ends the process at once
/// (everything acknowledged is already durable in the journals).
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!(
            "second signal: stopping at once; everything acknowledged is durable in the \
             journal, the rest is sent again by the agents"
        );
        std::process::exit(130);
    });
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            dir,
            names,
            passphrase_file,
            token_ttl_hours,
            kdf_memory_mib,
        } => {
            let pass = read_passphrase(passphrase_file.as_deref())?;
            let kdf = KdfParams {
                memory_kib: kdf_memory_mib * 1024,
                ..KdfParams::default()
            };
            let params = EscrowParams::generate(kdf)?;
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let out = deploy::init(
                &dir,
                &names,
                &pass,
                params,
                Duration::from_secs(token_ttl_hours * 3600),
            )?;
            println!("deployment created in {}", dir.display());
            println!("token:   {}", out.token);
            println!("ca-hash: {}", out.ca_hash);
            println!(
                "register an agent with:\n  ripcord-agent register --server {}:{} --token {} --ca-hash {}",
                names.first().copied().unwrap_or("HOST"),
                deploy::open(&dir)?.config.register_listen.port(),
                out.token,
                out.ca_hash
            );
            Ok(())
        }
        Command::Serve { dir } => {
            let dep = deploy::open(&dir)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(server::serve(dep, stop_signal()));
            // A journal write still blocked on a full cache disk does not hold the exit:
            // nothing it holds was acknowledged.
            rt.shutdown_timeout(Duration::from_secs(2));
            result
        }
        Command::Token {
            dir,
            name,
            ttl_hours,
            uses,
            token_for,
        } => {
            let ttl = Duration::from_secs(ttl_hours * 3600);
            let token = match token_for {
                TokenFor::Agent => deploy::new_token(&dir, ttl, uses)?,
                TokenFor::ProcessServer => deploy::new_server_token(&dir, ttl)?,
            };
            let dep = deploy::open(&dir)?;
            let host = name
                .or_else(|| dep.identity.names().into_iter().next())
                .unwrap_or_else(|| "HOST".to_owned());
            let port = dep.config.register_listen.port();
            let ca_hash = ripcord_transport::ca_hash(dep.identity.ca_cert());
            println!("token:   {token}");
            println!("ca-hash: {ca_hash}");
            match token_for {
                TokenFor::Agent => println!(
                    "valid {ttl_hours} h for {uses} registration(s); register an agent with:\n  \
                     ripcord-agent register --server {host}:{port} --token {token} --ca-hash \
                     {ca_hash}"
                ),
                TokenFor::ProcessServer => println!(
                    "valid {ttl_hours} h for one process server; on it, run:\n  \
                     ripcord-ps join --config-role {host}:{port} --token {token} --ca-hash \
                     {ca_hash} --name <its host name or IP>"
                ),
            }
            Ok(())
        }
        Command::Join {
            dir,
            config_role,
            ca_hash,
            token,
            token_file,
            server_id,
            names,
            listen,
            metrics_listen,
            cache_dir,
        } => {
            let token = match token_file {
                Some(file) => ripcord_transport::Token::read_file(&file)
                    .with_context(|| format!("reading the token from {}", file.display()))?,
                None => token.expect("clap: --token or --token-file"),
            };
            let metrics_listen = match metrics_listen.as_deref() {
                None => None,
                Some("") => Some(None),
                Some(addr) => Some(Some(addr.parse().with_context(|| {
                    format!("--metrics-listen {addr:?} is not IP:port or \"\"")
                })?)),
            };
            let opts = ripcord_process_server::join::JoinOptions {
                dir,
                config_role,
                ca_hash,
                token: token.parse().context("the process-server token")?,
                server_id: server_id.unwrap_or_else(ripcord_process_server::config::hostname),
                names,
                listen,
                metrics_listen,
                cache_dir,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let dir = rt.block_on(ripcord_process_server::join::join(opts))?;
            println!(
                "joined the deployment; start this server with:\n  ripcord-ps serve --dir {}",
                dir.display()
            );
            Ok(())
        }
        Command::Machines { command } => machines(command),
        Command::Health { dir, json } => health(&dir, json).map(drop),
        Command::Replay {
            dir,
            disk,
            output,
            passphrase_file,
            last_cut,
            cut,
        } => {
            let pass = read_passphrase(passphrase_file.as_deref())?;
            let until = match (last_cut, cut) {
                (true, _) => replay::Until::LastCut,
                (false, Some(id)) => replay::Until::Cut(id),
                (false, None) => replay::Until::End,
            };
            let r = replay::replay(
                &dir,
                disk.parse::<ripcord_proto::DiskId>()?,
                &output,
                &pass,
                until,
            )
            .context("replay failed")?;
            println!(
                "replayed epoch {} ({} batches, {} MiB data, {} MiB zero) into {}{}{}",
                r.epoch,
                r.batches,
                r.data_bytes >> 20,
                r.zero_bytes >> 20,
                output.display(),
                r.cut.map(|c| format!(" up to cut {c}")).unwrap_or_default(),
                r.store_seq
                    .map(|s| format!(" (through batch {s} from the target store)"))
                    .unwrap_or_default()
            );
            Ok(())
        }
    }
}

fn machines(command: MachinesCommand) -> anyhow::Result<()> {
    use ripcord_transport::{MachineId, MachineStore};
    match command {
        MachinesCommand::List { dir, json } => {
            deploy::open(&dir)?;
            let store = MachineStore::open(&deploy::machines_dir(&dir))?;
            let machines = store.list()?;
            let when = |secs: u64| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                    .to_string()
            };
            if machines.is_empty() && !json {
                println!("no machine registered");
            }
            for m in machines {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "machine": m.machine_id.to_string(),
                            "registered": when(m.registered_at),
                            "certificate_expires": when(m.expires_at),
                            "token": m.token_id,
                        })
                    );
                    continue;
                }
                println!(
                    "{:<24} registered {}  certificate expires {}  {}",
                    m.machine_id,
                    when(m.registered_at),
                    when(m.expires_at),
                    m.token_id
                        .map_or_else(|| "renewed by its key".to_owned(), |t| format!("token {t}"))
                );
            }
            Ok(())
        }
        MachinesCommand::Remove { dir, machine } => {
            deploy::open(&dir)?;
            let id = MachineId::new(&machine)
                .with_context(|| format!("invalid machine id {machine:?}"))?;
            let store = MachineStore::open(&deploy::machines_dir(&dir))?;
            anyhow::ensure!(store.remove(&id)?, "machine {machine} is not registered");
            println!(
                "removed machine {machine}: its certificate is refused from now on (a running \
                 server closes its connections within a second)"
            );
            Ok(())
        }
    }
}
