//! `ripcord-oracle` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ripcord_oracle::check::{CheckOptions, Initial, check_file};
use ripcord_oracle::selftest::{SelfTestOptions, is_root, run_all};
use ripcord_oracle::workload::{WorkloadConfig, run, sigint_flag};
use ripcord_oracle::{Log, Region, monotonic_ns};

#[derive(Parser)]
#[command(
    name = "ripcord-oracle",
    version,
    about = "Crash-consistency oracle: stamping workload and recovery-point checker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write stamped blocks to DEV and log every op to LOG.
    Workload {
        /// Block device to write (everything in the region is overwritten).
        #[arg(long)]
        device: PathBuf,
        /// Log file (must not live on the device).
        #[arg(long)]
        log: PathBuf,
        /// Run time in seconds (SIGINT stops early).
        #[arg(long)]
        seconds: f64,
        /// Ops in flight.
        #[arg(long, default_value_t = 16)]
        qd: u32,
        /// PRNG seed for offsets and sizes (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// Max 4 KiB blocks per write (1..=16).
        #[arg(long, default_value_t = 8)]
        blocks_per_write: u32,
        /// fdatasync every K writes (0: never).
        #[arg(long, default_value_t = 64)]
        flush_every: u64,
        /// Percent of ops that are BLKDISCARDs.
        #[arg(long, default_value_t = 2)]
        discard_percent: u8,
        /// START:LEN in 4 KiB blocks (or bytes with a K/M/G/T suffix); default whole device.
        #[arg(long)]
        region: Option<Region>,
        /// At most this many ops per second (default: as fast as the queue depth allows).
        #[arg(long)]
        iops: Option<u32>,
        /// Size of a hot set at the start of the region, in 4 KiB blocks (0: none).
        #[arg(long, default_value_t = 0)]
        hot_blocks: u64,
        /// Percent of the writes that go to the hot set.
        #[arg(long, default_value_t = 0)]
        hot_percent: u8,
    },
    /// Check that IMG is the device's state at instant T; exit 0 pass, 1 fail, 2 error.
    Check {
        /// Image of the device (block b at byte b*4096).
        #[arg(long)]
        image: PathBuf,
        /// Workload log.
        #[arg(long)]
        log: PathBuf,
        /// The recovery point's instant, CLOCK_MONOTONIC ns (see `now`).
        #[arg(long = "time")]
        time: u64,
        /// Blocks to check (default: the log's region).
        #[arg(long)]
        region: Option<Region>,
        /// Initial content of the region: zero or any.
        #[arg(long, default_value = "zero")]
        initial: Initial,
        /// How many bad blocks to describe.
        #[arg(long, default_value_t = 20)]
        max_report: usize,
    },
    /// Print CLOCK_MONOTONIC in ns (the time base of logs and --time).
    Now,
    /// Run the self-test (synthetic fault injection; loop-device run when root).
    SelfTest {
        /// Workload run time on the loop device.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Directory for scratch files (default: temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return Ok(ExitCode::from(if e.use_stderr() { 2 } else { 0 }));
        }
    };
    match cli.cmd {
        Cmd::Workload {
            device,
            log,
            seconds,
            qd,
            seed,
            blocks_per_write,
            flush_every,
            discard_percent,
            region,
            iops,
            hot_blocks,
            hot_percent,
        } => {
            let cfg = WorkloadConfig {
                device: device.clone(),
                log,
                seconds,
                qd,
                seed,
                blocks_per_write,
                flush_every,
                discard_percent,
                region,
                iops,
                hot_blocks,
                hot_percent,
            };
            let sum = run(&cfg, sigint_flag())
                .with_context(|| format!("workload on {}", device.display()))?;
            println!("{sum}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check {
            image,
            log,
            time,
            region,
            initial,
            max_report,
        } => {
            let log = Log::open(&log).context("loading log")?;
            let opts = CheckOptions {
                initial,
                region,
                max_report,
            };
            let rep = check_file(&image, &log, time, &opts)
                .with_context(|| format!("checking {}", image.display()))?;
            print!("{rep}");
            Ok(if rep.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Now => {
            println!("{}", monotonic_ns());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SelfTest { seconds, dir } => {
            let root = is_root();
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            let opts = SelfTestOptions {
                seconds,
                dir,
                ..Default::default()
            };
            for line in run_all(&opts, root).context("self-test")? {
                println!("ok: {line}");
            }
            if !root {
                eprintln!(
                    "!!!!! SKIP: loop-device self-test needs root; only the synthetic part ran !!!!!"
                );
                if ci {
                    eprintln!("CI=true: failing because the device part was skipped");
                    return Ok(ExitCode::from(1));
                }
            }
            println!("self-test PASS");
            Ok(ExitCode::SUCCESS)
        }
    }
}
