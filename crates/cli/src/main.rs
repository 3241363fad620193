//! `ripcord`: the operator's tool. Lists recovery points and fails disks over (or
//! test-fails them over) from the target store alone, with the deployment passphrase: no
//! process server, configuration or agent is needed.

mod failover;

use std::{
    path::{Path, PathBuf},
    process::Command as Process,
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use failover::{PointSpec, materialize, parse_disk, select};
use ripcord_store::{CutKind, Store};

/// ripcord: recover protected Linux disks from the target store.
///
/// Everything needs only the target store's URL (file:///path or s3://bucket/prefix with
/// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) and, to read
/// data, the deployment passphrase (--passphrase-file, RIPCORD_PASSPHRASE, or a prompt on a
/// terminal).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recovery points.
    Points {
        #[command(subcommand)]
        command: PointsCommand,
    },
    /// Write the disk as it was at a recovery point, to an image file or a block device.
    Failover(FailoverArgs),
    /// The same into a scratch location, while replication goes on undisturbed.
    #[command(args_conflicts_with_subcommands = true)]
    TestFailover {
        #[command(subcommand)]
        command: Option<TestCommand>,
        #[command(flatten)]
        args: TestArgs,
    },
    /// Check every object of the store (checksums, structure, references) and, with the
    /// passphrase, authenticate every recovery point (the agent's MAC), every batch a
    /// point reads, and where the index places each batch. Names anything damaged or
    /// altered. Without the passphrase only accidental damage can be found: someone who
    /// can write the store can also fix checksums.
    Verify {
        #[arg(long)]
        target: String,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PointsCommand {
    /// List the retained recovery points of a disk (or of every disk).
    List {
        #[arg(long)]
        target: String,
        #[arg(long)]
        disk: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// Raw disk image (sparse where the disk is zero), or a block device.
    Raw,
    /// qcow2 (through qemu-img).
    Qcow2,
}

#[derive(clap::Args)]
struct FailoverArgs {
    /// Target store URL.
    #[arg(long)]
    target: String,
    /// Disk id (32 hex digits; `ripcord points list` shows them).
    #[arg(long)]
    disk: String,
    /// latest, latest-app, an RFC 3339 time (the newest point at or before it), or a point id.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Image file (created sparse) or block device.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TestArgs {
    #[arg(long)]
    target: Option<String>,
    #[arg(long)]
    disk: Option<String>,
    #[arg(long, default_value = "latest")]
    point: String,
    /// Scratch directory for test images.
    #[arg(long, default_value = "/var/lib/ripcord/test-failover")]
    scratch: PathBuf,
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TestCommand {
    /// Remove the images test failovers made.
    Cleanup {
        #[arg(long, default_value = "/var/lib/ripcord/test-failover")]
        scratch: PathBuf,
    },
}

fn read_passphrase(file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let pass = match file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => match std::env::var("RIPCORD_PASSPHRASE") {
            Ok(p) => p,
            Err(_) if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
                rpassword::prompt_password("deployment passphrase: ")
                    .context("reading the passphrase from the terminal")?
            }
            Err(_) => anyhow::bail!(
                "give the deployment passphrase with --passphrase-file, RIPCORD_PASSPHRASE, \
                 or at the prompt (run from a terminal)"
            ),
        },
    };
    Ok(pass.into_bytes())
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
        .to_string()
}

fn is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(is_tty())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIPCORD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Points {
            command: PointsCommand::List { target, disk, json },
        } => {
            let store = Store::open(&target)
                .await
                .with_context(|| format!("opening {target}"))?;
            let disks = match disk {
                Some(d) => vec![parse_disk(&d)?],
                None => store.list_disks().await?,
            };
            if !json {
                println!(
                    "{:<34} {:<14} {:<26} {:<5}",
                    "disk", "point", "time (UTC)", "kind"
                );
            }
            for d in disks {
                for p in store.points(&d).await? {
                    let kind = if p.kind == CutKind::App {
                        "app"
                    } else {
                        "crash"
                    };
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "disk": d.to_string(), "id": p.id, "epoch": p.epoch, "cut": p.cut_id, "seq": p.seq,
                                "time": rfc3339(p.time_ns), "time_ns": p.time_ns, "mono_ns": p.mono_ns,
                                "kind": kind,
                            })
                        );
                    } else {
                        println!(
                            "{:<34} {:<14} {:<26} {:<5}",
                            d.to_string(),
                            p.id,
                            rfc3339(p.time_ns),
                            kind
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Failover(a) => {
            let pass = read_passphrase(a.passphrase_file.as_deref())?;
            failover_to(&a.target, &a.disk, &a.point, &a.output, a.format, &pass).await
        }
        Command::TestFailover {
            command: Some(TestCommand::Cleanup { scratch }),
            ..
        } => {
            let mut n = 0;
            if scratch.exists() {
                for e in std::fs::read_dir(&scratch)? {
                    let p = e?.path();
                    if p.extension()
                        .is_some_and(|x| x == "img" || x == "qcow2" || x == "partial")
                    {
                        std::fs::remove_file(&p)?;
                        n += 1;
                    }
                }
            }
            println!(
                "removed {n} test-failover image(s) from {}",
                scratch.display()
            );
            Ok(())
        }
        Command::TestFailover {
            command: None,
            args: a,
        } => {
            let (target, disk) = (
                a.target.context("--target is required")?,
                a.disk.context("--disk is required")?,
            );
            std::fs::create_dir_all(&a.scratch)?;
            let ext = match a.format {
                Format::Raw => "img",
                Format::Qcow2 => "qcow2",
            };
            let out = a
                .scratch
                .join(format!("{disk}-{}.{ext}", a.point.replace([':', '/'], "_")));
            let pass = read_passphrase(a.passphrase_file.as_deref())?;
            failover_to(&target, &disk, &a.point, &out, a.format, &pass).await?;
            println!(
                "test image: {} (remove with `ripcord test-failover cleanup`)",
                out.display()
            );
            Ok(())
        }
        Command::Verify {
            target,
            disk,
            passphrase_file,
        } => {
            let store = Store::open(&target)
                .await
                .with_context(|| format!("opening {target}"))?;
            let disk = disk.as_deref().map(parse_disk).transpose()?;
            let report = store.verify(disk.as_ref()).await?;
            let mut damaged: Vec<String> = report.damaged_objects();
            if let Some(pf) = passphrase_file {
                let pass = read_passphrase(Some(&pf))?;
                damaged.extend(authenticate_all(&store, disk.as_ref(), &pass).await?);
            }
            damaged.sort();
            damaged.dedup();
            if damaged.is_empty() {
                println!("verify: OK ({report:?})");
                Ok(())
            } else {
                for d in &damaged {
                    println!("DAMAGED: {d}");
                }
                bail!("{} damaged object(s) in {target}", damaged.len())
            }
        }
    }
}

async fn failover_to(
    target: &str,
    disk: &str,
    point: &str,
    output: &Path,
    format: Format,
    pass: &[u8],
) -> anyhow::Result<()> {
    let store = Store::open(target)
        .await
        .with_context(|| format!("opening {target}"))?;
    let disk = parse_disk(disk)?;
    let spec: PointSpec = point.parse()?;
    let points = store.points(&disk).await?;
    let point = select(&points, &spec)?;
    let raw_out = match format {
        Format::Raw => output.to_owned(),
        Format::Qcow2 => output.with_extension("raw.partial"),
    };
    let m = materialize(&store, &disk, &point, pass, &raw_out, is_tty()).await?;
    if let Format::Qcow2 = format {
        let status = Process::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw_out)
            .arg(output)
            .status()
            .context("running qemu-img (install qemu-utils)")?;
        let _ = std::fs::remove_file(&raw_out);
        ensure!(status.success(), "qemu-img convert failed ({status})");
    }
    println!(
        "failed over disk {} to point {} ({}, {}) into {}: {} MiB of data from {} batches in {:.1} s",
        disk,
        m.point.id,
        rfc3339(m.point.time_ns),
        if m.point.kind == CutKind::App {
            "app-consistent"
        } else {
            "crash-consistent"
        },
        output.display(),
        m.data_bytes >> 20,
        m.batches,
        m.secs
    );
    Ok(())
}

/// Authenticate every retained point (its MAC), every batch it reads, and the placement
/// of each batch, with the epoch's data key; returns the damaged or altered objects, each
/// with what is wrong (also logged).
async fn authenticate_all(
    store: &Store,
    disk: Option<&ripcord_store::DiskId>,
    pass: &[u8],
) -> anyhow::Result<Vec<String>> {
    let disks = match disk {
        Some(d) => vec![*d],
        None => store.list_disks().await?,
    };
    let mut damaged = Vec::new();
    for d in disks {
        for p in store.points(&d).await? {
            let catalog = ripcord_store::format::cut_name(&d, p.epoch, p.cut_id);
            let (key, plan) = match failover::resolve_authentic(store, &d, &p, pass).await {
                Ok(kp) => kp,
                Err(e) => {
                    let object = e
                        .downcast_ref::<ripcord_store::Error>()
                        .and_then(|s| s.object())
                        .unwrap_or(catalog.as_str())
                        .to_string();
                    damaged.push(format!("{object}: {e:#}"));
                    continue;
                }
            };
            let placement = plan.placement();
            let mut sealer = ripcord_seal::Sealer::new();
            let mut out = Vec::new();
            for loc in plan.batches() {
                let checked = match store.fetch_batch(&loc).await {
                    Ok(b) => failover::open_batch(
                        &mut sealer,
                        &key,
                        &plan.epoch.machine_id,
                        &d,
                        &b,
                        &loc.pack,
                        &mut out,
                    )
                    .map(|()| b),
                    Err(e) => Err(e.into()),
                };
                match checked {
                    Ok(b) => {
                        if let Err(e) = placement.check(loc.seq, &b.extents) {
                            let object = e.object().unwrap_or(catalog.as_str()).to_string();
                            damaged.push(format!("{object}: {e}"));
                        }
                    }
                    Err(e) => damaged.push(format!(
                        "{} (batch {} of epoch {}): {e:#}",
                        loc.pack, loc.seq, loc.epoch
                    )),
                }
            }
        }
    }
    Ok(damaged)
}
