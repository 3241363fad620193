//! `cargo xtask`: setup, tests, fuzzing, chaos, demo and benchmarks for ripcord.
//!
//! Every task first runs `setup` for what it needs (idempotent, fast when done; Garage only
//! for `test` and `setup`, so the demo does not wait for its build), so a fresh machine needs
//! nothing but this command.

mod bench;
mod chaos;
mod demo;
mod deploy;
mod fuzz;
mod saturation;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// ripcord's developer and operator tasks.
#[derive(Parser)]
#[command(about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need: nightly rust-src, bpf-linker (against the
    /// nightly compiler's LLVM), clippy, rustfmt, apt packages (fio, e2fsprogs, xfsprogs,
    /// util-linux, fdisk, iproute2, nftables, openssh-server), Garage (`cargo install garage`, for the S3 test). Idempotent.
    /// `demo` and `bench` install all but Garage; `test` installs everything.
    Setup,
    /// Run everything CI runs: setup, rustfmt and clippy checks, the build, unit tests, and
    /// the privileged integration tests (real BPF, loop devices, file systems; needs root).
    Test {
        /// Skip the rustfmt and clippy checks.
        #[arg(long)]
        no_lint: bool,
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// End-to-end demo on the embedded defaults: a process server and an agent on loopback
    /// replicate a loop device with ext4 under a file workload to a local target store; the
    /// primary site is deleted and `ripcord failover` must rebuild the disk from the store
    /// and the passphrase alone (sha256 and e2fsck checked). Needs root.
    Demo {
        /// Size of the demo disk in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
    /// Chaos for long runs outside CI: an agent replicates a loop device under the oracle
    /// workload, and a master target follows it onto a second device, while kills of the
    /// agent, the server and the master target, lossy networks, partitions, flapping links
    /// and address changes hit them at random moments. At the end every invariant is
    /// checked (acknowledged batches durable, recovery points crash-consistent by the
    /// oracle, the final point and the master target's device equal to the source) and a
    /// table of faults, recovery times and checks is printed. A failed run writes every log
    /// to /var/tmp/ripcord-chaos-<seed>.log. Needs root; uses the release binaries.
    Chaos {
        /// How long to inject faults.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Seed of the schedule (default: random; printed, to replay a run).
        #[arg(long)]
        seed: Option<u64>,
        /// Only these faults (repeat): kill-agent, kill-server, kill-mt, lossy-network,
        /// partition, flap, rebind. Default: all.
        #[arg(long = "fault")]
        faults: Vec<String>,
        /// Recovery points to check with the oracle, spread evenly (0: every one).
        #[arg(long, default_value_t = 200)]
        check_points: usize,
    },
    /// Fuzz every decoder and file format (targets in fuzz/targets.txt, bodies in
    /// crates/fuzz-targets) with cargo-fuzz on the nightly toolchain, installing
    /// cargo-fuzz if missing. The time is split evenly among the targets; new inputs go to
    /// fuzz/corpus/<target>/ (git ignores them: rename one to regress-<what> to keep it),
    /// crashing ones to fuzz/artifacts/<target>/, and the run fails if any target failed.
    /// `cargo xtask test` replays the corpus (crates/fuzz-targets/tests/corpus.rs).
    Fuzz {
        /// Minutes in all, split among the targets.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Only this target (a name from fuzz/targets.txt), for all the minutes.
        #[arg(long)]
        target: Option<String>,
    },
    /// Install ripcord on the hosts of an inventory over SSH (see deploy.example.toml):
    /// checks every host first (SSH with verified host keys, root, kernel and BTF, free
    /// space, clock offset, devices) and changes nothing if any has a problem; then the
    /// process server's host (binaries, hardened systemd unit, deployment, ps.toml), then
    /// each agent host (binaries, unit, agent.toml, registration with a fresh single-use
    /// token), and waits until every disk finished its initial sync and has a recovery
    /// point. Running it again changes nothing and says so. Secrets (the passphrase,
    /// tokens) travel on SSH standard input, never on command lines or in logs.
    Deploy {
        /// The inventory (TOML).
        #[arg(long)]
        inventory: PathBuf,
        /// Install the binaries in this directory instead of building release ones.
        #[arg(long)]
        binaries: Option<PathBuf>,
        /// Roll out binaries that differ from the installed ones (process server first,
        /// then agents one host at a time, each healthy before the next). An agent restart
        /// is a full resync of its disks until issue 14's restart without resync.
        #[arg(long, conflicts_with = "uninstall")]
        upgrade: bool,
        /// Stop and remove everything deploy installed (agents first, each once what it
        /// sent is durable). Protected disks and the target store stay.
        #[arg(long)]
        uninstall: bool,
        /// Only check the inventory and every host; change nothing.
        #[arg(long, conflicts_with = "uninstall")]
        check: bool,
        /// Seconds to wait for the process server to be healthy and disks to sync.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Benchmarks; results are printed as a table and written under target/bench/.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let needs = match cli.task {
        Task::Setup | Task::Test { .. } => setup::Needs::Everything,
        Task::Demo { .. } | Task::Bench { .. } | Task::Chaos { .. } | Task::Fuzz { .. } => {
            setup::Needs::Base
        }
        // Installs nothing here: the hosts are elsewhere, and --binaries needs no build.
        Task::Deploy { .. } => setup::Needs::Nothing,
    };
    setup::run(needs).context("setup")?;
    match cli.task {
        Task::Setup => {
            eprintln!("xtask setup: everything is in place");
            Ok(())
        }
        Task::Test { no_lint, filter } => test(no_lint, filter.as_deref()),
        Task::Demo { size_mib } => demo::run(size_mib),
        Task::Bench { which } => bench::run(which),
        Task::Chaos {
            minutes,
            seed,
            faults,
            check_points,
        } => chaos::run(minutes, seed, &faults, check_points),
        Task::Fuzz { minutes, target } => fuzz::run(minutes, target.as_deref()),
        Task::Deploy {
            inventory,
            binaries,
            upgrade,
            uninstall,
            check,
            timeout_secs,
        } => deploy::run(&deploy::Options {
            inventory,
            binaries,
            upgrade,
            uninstall,
            check,
            timeout: std::time::Duration::from_secs(timeout_secs),
        }),
    }
}

fn test(no_lint: bool, filter: Option<&str>) -> anyhow::Result<()> {
    if !no_lint {
        cargo(&["fmt", "--all", "--", "--check"]).context("rustfmt: run `cargo fmt --all`")?;
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    cargo(&["build", "--workspace", "--all-targets"])?;
    let filter: Vec<&str> = filter.into_iter().collect();
    let mut unit = vec!["test", "--workspace", "--exclude", "ripcord-tests", "--"];
    unit.extend(&filter);
    let mut totals = cargo_test(&unit)?;
    // Privileged tests one at a time: they share the kernel's block layer and CPU, and
    // the overflow test wants a quiet machine.
    let mut privileged = vec![
        "test",
        "-p",
        "ripcord-tests",
        "--tests",
        "--",
        "--test-threads=1",
    ];
    privileged.extend(&filter);
    let t = cargo_test(&privileged)?;
    totals.0 += t.0;
    totals.1 += t.1;
    totals.2 += t.2;
    // One plain closing line for the whole run.
    println!(
        "\nxtask test: {} passed, {} failed, {} ignored",
        totals.0, totals.1, totals.2
    );
    if totals.1 > 0 {
        bail!("{} tests failed", totals.1);
    }
    Ok(())
}

/// Run `cargo test ...`, echoing its output, and add up its "test result:" lines into
/// (passed, failed, ignored). Fails if cargo fails.
fn cargo_test(args: &[&str]) -> anyhow::Result<(u64, u64, u64)> {
    use std::io::{BufRead as _, Write as _};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut totals = (0, 0, 0);
    let mut out = std::io::stdout().lock();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            totals.0 += count(" passed");
            totals.1 += count(" failed");
            totals.2 += count(" ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(totals)
}

/// Builds the release binaries of the agent, the process server, `ripcord`, the master
/// target and the oracle, and point the testkit helpers at them; returns their directory.
fn release_binaries() -> anyhow::Result<std::path::PathBuf> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "ripcord-agent",
        "-p",
        "ripcord-process-server",
        "-p",
        "ripcord-cli",
        "-p",
        "ripcord-master-target",
        "-p",
        "ripcord-oracle",
    ])?;
    let dir = workspace_root().join("target/release");
    // SAFETY: called while the xtask is single-threaded; the helpers read it when spawning.
    unsafe { std::env::set_var("RIPCORD_BIN_DIR", &dir) };
    Ok(dir)
}

/// Run `cargo` with `args` from the workspace root.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Run a command, failing with its stderr.
fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    testkit::run(program, args)
}

/// Run a command and return its stdout.
fn cmd_output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    testkit::run_output(program, args)
}
