//! `cargo xtask bench`: measured as ratios within one run (these machines are noisy).
//!
//! One file per bench: `capture.rs` (fio with and without the capture agent attached),
//! `churn.rs` (replication under load, then the saturation runs of
//! [`crate::saturation`]), `digest.rs` (block digests vs a plain read), `failover.rs`
//! (failover speed and store size), `failback.rs` (the master target's full and delta
//! steps vs fio), `link.rs` (Cubic vs BBR on a lossy link), `plan.rs` (a recovery plan's
//! parallel failover vs one machine at a time), `group.rs` (consistency-group points per
//! minute and their clock-error bounds with 2, 16 and 64 members); `common.rs` holds what they share (fio with half-compressible data, medians, a process's CPU time
//! and peak RSS). Every bench writes its JSON under `target/bench/`.

use clap::Subcommand;

mod capture;
mod churn;
mod common;
mod digest;
mod failback;
mod failover;
mod group;
mod link;
mod plan;

pub(crate) use common::fio_churn;

#[derive(Subcommand)]
pub enum Which {
    /// The recovery-point catalog at scale: 1,000,000 points written by the real writer
    /// with compaction into a local store, then `points` (all of them), the latest point
    /// and a point by id are timed (each must stay under 2 s).
    Catalog,
    /// Capture overhead: fio on a loop device (over a file in /dev/shm, and over a file on
    /// the root disk with direct I/O) with and without `ripcord-agent watch` attached,
    /// alternating runs. 4k random write at QD32 and QD1, 1 MiB sequential write.
    /// Writes target/bench/capture.json.
    Capture {
        /// Repetitions of each with/without pair (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds per fio run.
        #[arg(long, default_value_t = 5)]
        runtime: u64,
        /// Size of each test device in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
    /// Replication churn: fio at full speed (sequential 1 MiB, random 64 KiB,
    /// half-compressible) on a protected RAM-backed loop device with the agent and a
    /// process server on this machine, plus a 100 MB/s paced phase for RPO lag; then
    /// saturation runs (ext4, 4 KiB and 64 KiB random writes at QD32 paced at 50, 80 and
    /// 150 % of the measured replication throughput): points per minute, largest gap,
    /// forced points and their stalls, RPO. Writes target/bench/churn.json.
    Churn {
        /// Seconds per fio phase.
        #[arg(long, default_value_t = 10)]
        runtime: u64,
        /// Seconds per saturation run (0 skips them).
        #[arg(long, default_value_t = 60)]
        saturation_secs: u64,
        /// Size of the protected device in MiB.
        #[arg(long, default_value_t = 2048)]
        size_mib: u64,
    },
    /// Delta-sync digests: `DigestMap::compute` (crates/digest, release build) over a loop
    /// device (direct-io, over a file on the root disk) full of random data, vs `dd bs=4M
    /// iflag=direct` of the same device; page cache dropped before each run, alternating
    /// runs, medians. Writes target/bench/digest.json.
    Digest {
        /// Size of the device in MiB (a multiple of 4).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Repetitions of each read/digest pair (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Failback: `ripcord-mt` brings a device to a replicated disk's point (three
    /// quarters filled with half-compressible data) in a full step, vs fio writing the same
    /// data sequentially on the same device (alternating, medians); then one delta step
    /// after 5 % of the 4 KiB blocks changed. Writes target/bench/failback.json.
    Failback {
        /// Disk size in MiB.
        #[arg(long, default_value_t = 4096)]
        size_mib: u64,
    },
    /// Replication over a lossy link: the agent's initial sync of random data through the
    /// test kit's fault proxy (round-trip delay, random loss both ways) until every batch
    /// is acknowledged, with the agent's `congestion = "cubic"` and `"bbr"` alternating;
    /// medians and the ratio per loss rate. Writes target/bench/link.json.
    Link {
        /// Data to sync per run, MiB.
        #[arg(long, default_value_t = 16)]
        mib: u64,
        /// Loss rates to measure (fractions, comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.05")]
        loss: Vec<f64>,
        /// Round-trip delay the proxy adds, ms.
        #[arg(long, default_value_t = 20)]
        rtt_ms: u64,
        /// Repetitions per loss rate (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Consistency groups: 2, 16 and 64 member machines on this host (real agents, own
    /// identities and loop devices, a light write load), one group with a 1 s interval:
    /// complete group points per minute in the target store and their clock-error bounds
    /// (median, p99, max); then `bench plan` (four 1 GiB machines by one plan vs one by
    /// one) unless --skip-plan. Writes target/bench/group.json (and plan.json).
    Group {
        /// Member counts to measure (comma-separated; at most 64).
        #[arg(long, value_delimiter = ',', default_value = "2,16,64")]
        members: Vec<usize>,
        /// Seconds each size is measured.
        #[arg(long, default_value_t = 60)]
        window_secs: u64,
        /// Leave out the plan failover half.
        #[arg(long)]
        skip_plan: bool,
    },
    /// Recovery plan failover: four replicated machines (one disk each, three quarters
    /// filled with half-compressible data) failed over by one `ripcord plan failover`
    /// (one group: machines in parallel) vs four `ripcord failover` one after another;
    /// page cache dropped before each, alternating, medians; every image checked against
    /// its source. Writes target/bench/plan.json.
    Plan {
        /// Disk size of each machine, MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Repetitions of each way (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Failover speed: materialise the latest point of a replicated disk (three quarters
    /// filled with half-compressible data) from a local target store, vs `cp
    /// --sparse=always` of the source image; and the store's size after a paced churn vs
    /// the bytes written. Writes target/bench/failover.json.
    Failover {
        /// Image size in MiB.
        #[arg(long, default_value_t = 4096)]
        size_mib: u64,
        /// Seconds of paced (20 MB/s) random overwrites after the fill.
        #[arg(long, default_value_t = 30)]
        churn_secs: u64,
    },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Catalog => crate::cargo(&[
            "test",
            "-p",
            "ripcord-store",
            "--release",
            "--test",
            "catalog_scale",
            "--",
            "--ignored",
            "--nocapture",
        ]),
        Which::Capture {
            reps,
            runtime,
            size_mib,
        } => capture::capture(reps, runtime, size_mib),
        Which::Churn {
            runtime,
            size_mib,
            saturation_secs,
        } => churn::churn(runtime, size_mib, saturation_secs),
        Which::Digest { size_mib, reps } => digest::digest(size_mib, reps),
        Which::Failback { size_mib } => failback::failback(size_mib),
        Which::Plan { size_mib, reps } => plan::plan(size_mib, reps),
        Which::Group {
            members,
            window_secs,
            skip_plan,
        } => {
            anyhow::ensure!(
                members.iter().all(|&n| (1..=64).contains(&n)),
                "--members: a group holds 1 to 64 machines"
            );
            group::group(&members, window_secs)?;
            if skip_plan {
                return Ok(());
            }
            plan::plan(1024, 3)
        }
        Which::Link {
            mib,
            loss,
            rtt_ms,
            reps,
        } => link::link(mib, &loss, rtt_ms, reps),
        Which::Failover {
            size_mib,
            churn_secs,
        } => failover::failover(size_mib, churn_secs),
    }
}
