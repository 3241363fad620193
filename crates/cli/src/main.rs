//! `ripcord`: the operator's tool. Lists recovery points and fails disks over (or
//! test-fails them over) from the target store alone, with the deployment passphrase: no
//! process server, configuration or agent is needed. `ripcord status` shows the running
//! deployment from the configuration role's database.
//!
//! Modules: [`points`] (listing), [`verify`], [`run_failover`] (failover and test
//! failover), [`failover`] (materialising a point), [`ripcord_restore::output_guard`]
//! (what failover may overwrite), [`plan`] (recovery plans: ordered groups of machines
//! failed over, started and checked together), [`status`] (the configuration role's view
//! of the deployment). The passphrase is read by
//! [`ripcord_seal::read_passphrase`].

mod failover;
mod group;
mod group_points;
mod plan;
mod points;
mod policy;
mod ps;
mod run_failover;
mod status;
mod verify;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use ripcord_store::{DiskId, Store};

/// ripcord: recover protected Linux disks from the target store.
///
/// Everything needs only the target store's URL (file:///path or s3://bucket/prefix with
/// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) and, to read
/// data, the deployment passphrase (--passphrase-file, RIPCORD_PASSPHRASE, or a prompt on a
/// terminal).
#[derive(Parser)]
#[command(name = "ripcord", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const TARGET_HELP: &str =
    "Target store URL: file:///abs/path, or s3://bucket/prefix (with the AWS_* environment)";
const PASSPHRASE_HELP: &str = "File holding the deployment passphrase on its first line, mode 0600 (else RIPCORD_PASSPHRASE, else a prompt)";

#[derive(Subcommand)]
enum Command {
    /// Recovery points.
    Points {
        #[command(subcommand)]
        command: PointsCommand,
    },
    /// Write the disk as it was at a recovery point, to an image file or a block device.
    ///
    /// Refuses to overwrite an existing image file, or a block device that is mounted, held
    /// (device mapper, LVM, RAID), open exclusively, or protected by a running agent,
    /// unless --force is given.
    Failover(FailoverArgs),
    /// The same into a scratch location, while replication goes on undisturbed.
    #[command(args_conflicts_with_subcommands = true)]
    TestFailover {
        #[command(subcommand)]
        command: Option<TestCommand>,
        #[command(flatten)]
        args: TestArgs,
    },
    /// Recovery plans: fail over (or test-fail over) whole groups of machines in order,
    /// with scripts before and after each group, manual pauses, and start commands with
    /// readiness checks. See `ripcord plan check --help` for the file format.
    Plan {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// Check every object of the store (checksums, structure, references) and, with the
    /// passphrase, authenticate every recovery point (the agent's MAC), every batch a
    /// point reads, and where the index places each batch. Names anything damaged or
    /// altered. Without the passphrase only accidental damage can be found: someone who
    /// can write the store can also fix checksums.
    Verify {
        #[arg(long, help = TARGET_HELP)]
        target: String,
        /// Only this disk (32 hex digits; `ripcord points list` shows them).
        #[arg(long)]
        disk: Option<String>,
        /// File holding the deployment passphrase (mode 0600); without it only checksums
        /// and structure are checked.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// One JSON object (counts, damaged objects) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The deployment as the configuration role sees it: process servers (health,
    /// heartbeat), machines and the server each replicates to, every disk (epoch,
    /// acknowledged batch, newest recovery point, lag), and the open alerts. Reads the
    /// configuration database of the server that runs the config role; a server whose
    /// heartbeat is older than a minute shows red.
    Status {
        /// That server's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// The deployment's process servers: list them, or remove one (run on the server that
    /// runs the config role). More servers join with `ripcord-ps join`.
    Ps {
        #[command(subcommand)]
        command: PsCommand,
    },
    /// Replication policies (RPO alert threshold, retention, app-consistent interval) and
    /// the machines given each, in the configuration role's database. A machine without
    /// one is alerted on past 15 minutes of lag.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Consistency groups: machines whose disks get recovery points at common instants
    /// (group points), every interval, offered only within the group's max clock error.
    /// A machine is in at most one group.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
}

#[derive(Subcommand)]
enum PsCommand {
    /// Every process server: address, version, health (red when its heartbeat is older
    /// than a minute), machines assigned, last heartbeat, roles.
    List {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a process server: refused while machines are assigned to it (move them
    /// first) and for the config role's own server. Its reports are refused afterwards.
    Remove {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The server's id.
        #[arg(long)]
        server: String,
    },
}

/// Where plan runs keep their state and reports.
const PLAN_STATE_HELP: &str =
    "Directory for the run's state and its JSON reports (reports/), created if missing";
const PLAN_STATE_DEFAULT: &str = "/var/lib/ripcord/plans";

#[derive(clap::Args)]
struct PlanRunArgs {
    /// The plan file (TOML; `ripcord plan check --help` describes it).
    #[arg(long)]
    plan: PathBuf,
    /// Which point of each disk: latest, latest-app, or an RFC 3339 time (the newest point
    /// of each disk at or before it). Chosen once, when the run begins.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Go on after a failed step: run it again, then the rest.
    #[arg(long = "continue")]
    resume_failed: bool,
    #[arg(long, help = PLAN_STATE_HELP, default_value = PLAN_STATE_DEFAULT)]
    state_dir: PathBuf,
    #[arg(long, help = PASSPHRASE_HELP)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Validate a plan file, and (unless --offline) that every disk has a recovery point.
    ///
    /// A plan is TOML: `name`, `target` (the store URL), then `[[group]]` tables in the
    /// order they fail over, each with a `name`, optional `pre` and `post` lists of actions
    /// (`{ run = "command", timeout-secs = 300 }` or `{ manual = "message" }`, which pauses
    /// the plan until `ripcord plan resume`), and `[[group.machine]]` tables: `name`,
    /// `disks = [{ disk = "<32 hex>", output = "/abs/path.img" }]`, an optional `start`
    /// command (disks in $RIPCORD_DISK_0, ...) and an optional `ready = { tcp = "HOST:PORT" }`
    /// or `{ command = "..." }` with `timeout-secs`. The file must not be writable by others.
    Check {
        /// The plan file.
        plan: PathBuf,
        /// Only the file: do not read the target store.
        #[arg(long)]
        offline: bool,
    },
    /// Fail the plan's machines over to their outputs, group by group.
    Failover {
        #[command(flatten)]
        run: PlanRunArgs,
        /// Overwrite outputs the safety checks refuse (existing images, mounted or held
        /// devices).
        #[arg(long)]
        force: bool,
    },
    /// The same into a scratch directory, while replication goes on undisturbed.
    TestFailover {
        #[command(flatten)]
        run: PlanRunArgs,
        /// Scratch directory; images go to <scratch>/<plan>/<machine>-<n>.img.
        #[arg(long, default_value = "/var/lib/ripcord/test-failover")]
        scratch: PathBuf,
    },
    /// Go on with a run paused by a manual step.
    Resume {
        /// The plan file.
        #[arg(long)]
        plan: PathBuf,
        #[arg(long, help = PLAN_STATE_HELP, default_value = PLAN_STATE_DEFAULT)]
        state_dir: PathBuf,
        #[arg(long, help = PASSPHRASE_HELP)]
        passphrase_file: Option<PathBuf>,
    },
    /// Undo a test failover: stop the machines it started and remove its images.
    Cleanup {
        /// The plan file.
        #[arg(long)]
        plan: PathBuf,
        #[arg(long, help = PLAN_STATE_HELP, default_value = PLAN_STATE_DEFAULT)]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PointsCommand {
    /// List the retained recovery points of a disk (or of every disk).
    List {
        #[arg(long, help = TARGET_HELP)]
        target: String,
        /// Only this disk (32 hex digits).
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
    #[arg(long, help = TARGET_HELP)]
    target: String,
    /// Disk id (32 hex digits; `ripcord points list` shows them).
    #[arg(long)]
    disk: String,
    /// latest, latest-app, an RFC 3339 time (the newest point at or before it), or a point
    /// id <epoch>-<cut> such as 3-17.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Image file (created sparse, mode 0600; must not exist) or block device (must not
    /// be mounted, held, or protected by an agent).
    #[arg(long)]
    output: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Overwrite anyway: an existing image file, or a block device that is mounted, held
    /// or protected (everything on it is lost).
    #[arg(long)]
    force: bool,
    #[arg(long, help = PASSPHRASE_HELP)]
    passphrase_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TestArgs {
    /// Target store URL: file:///abs/path, or s3://bucket/prefix (required).
    #[arg(long)]
    target: Option<String>,
    /// Disk id (32 hex digits; required).
    #[arg(long)]
    disk: Option<String>,
    /// latest, latest-app, an RFC 3339 time, or a point id <epoch>-<cut>.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Scratch directory for test images (created mode 0700 if missing).
    #[arg(long, default_value = "/var/lib/ripcord/test-failover")]
    scratch: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    #[arg(long, help = PASSPHRASE_HELP)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TestCommand {
    /// Remove the images test failovers made.
    Cleanup {
        /// Scratch directory of the test images.
        #[arg(long, default_value = "/var/lib/ripcord/test-failover")]
        scratch: PathBuf,
    },
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
        .to_string()
}

fn is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Opens the store at `target` for reading: it must exist (see
/// [`Store::open_existing`]).
async fn open_store(target: &str) -> anyhow::Result<Store> {
    Ok(Store::open_existing(target).await?)
}

/// Parses `disk` and checks the store has it.
async fn known_disk(store: &Store, target: &str, disk: &str) -> anyhow::Result<DiskId> {
    let id = failover::parse_disk(disk)?;
    let disks = store
        .list_disks()
        .await
        .with_context(|| format!("listing the disks of {target}"))?;
    anyhow::ensure!(
        disks.contains(&id),
        "no disk {id} in {target}; `ripcord points list --target {target}` lists them"
    );
    Ok(id)
}

/// An error and its causes on one line, each cause once: a cause whose text the message
/// already holds (an error that prints its source, under a context) is left out.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(is_tty())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIPCORD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Points {
            command: PointsCommand::List { target, disk, json },
        } => points::list(&target, disk.as_deref(), json).await,
        Command::Failover(a) => run_failover::failover(a).await,
        Command::TestFailover {
            command: Some(TestCommand::Cleanup { scratch }),
            ..
        } => run_failover::cleanup(&scratch),
        Command::TestFailover {
            command: None,
            args,
        } => run_failover::test_failover(args).await,
        Command::Verify {
            target,
            disk,
            passphrase_file,
            json,
        } => verify::verify(&target, disk.as_deref(), passphrase_file.as_deref(), json).await,
        Command::Plan { command } => run_plan(command).await,
        Command::Status { deployment, json } => status::status(&deployment, json),
        Command::Ps {
            command: PsCommand::List { deployment, json },
        } => ps::list(&deployment, json),
        Command::Ps {
            command: PsCommand::Remove { deployment, server },
        } => ps::remove(&deployment, &server),
        Command::Policy { command } => policy::run(command),
        Command::Group {
            command: group::GroupCommand::Points(args),
        } => group_points::list(args).await,
        Command::Group { command } => group::run(command),
    }
}

async fn run_plan(command: PlanCommand) -> anyhow::Result<()> {
    use plan::{
        run::{Begin, RunOptions, execute},
        state::Mode,
    };
    let begin = |resume_failed: bool| {
        if resume_failed {
            Begin::Continue
        } else {
            Begin::New
        }
    };
    match command {
        PlanCommand::Check { plan, offline } => plan::check(&plan, offline).await,
        PlanCommand::Failover { run, force } => {
            let options = RunOptions {
                mode: Mode::Failover,
                point: run.point,
                begin: begin(run.resume_failed),
                state_dir: run.state_dir,
                scratch: PathBuf::new(),
                passphrase_file: run.passphrase_file,
                force,
            };
            execute(&run.plan, options).await
        }
        PlanCommand::TestFailover { run, scratch } => {
            let options = RunOptions {
                mode: Mode::TestFailover,
                point: run.point,
                begin: begin(run.resume_failed),
                state_dir: run.state_dir,
                scratch,
                passphrase_file: run.passphrase_file,
                force: false,
            };
            execute(&run.plan, options).await
        }
        PlanCommand::Resume {
            plan,
            state_dir,
            passphrase_file,
        } => {
            // The mode, the points and the outputs come from the paused run's state.
            let options = RunOptions {
                mode: Mode::Failover,
                point: String::new(),
                begin: Begin::Resume,
                state_dir,
                scratch: PathBuf::new(),
                passphrase_file,
                force: false,
            };
            execute(&plan, options).await
        }
        PlanCommand::Cleanup { plan, state_dir } => plan::run::cleanup(&plan, &state_dir),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn undocumented(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let builtin = matches!(a.get_id().as_str(), "help" | "version");
            if !builtin && a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} --{}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_name() != "help" {
                missing.push(format!("{path} {} (no about)", sub.get_name()));
            }
            undocumented(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn every_option_of_every_subcommand_has_help_text() {
        let mut missing = Vec::new();
        undocumented(&Cli::command(), "ripcord", &mut missing);
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }

    #[test]
    fn the_command_is_called_ripcord() {
        Cli::command().debug_assert();
        assert_eq!(Cli::command().get_name(), "ripcord");
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let inner = anyhow::anyhow!("disk full");
        let e = inner
            .context("writing x: disk full")
            .context("failing over");
        assert_eq!(error_text(&e), "failing over: writing x: disk full");
    }
}
