//! Helpers shared by ripcord's privileged tests, `cargo xtask demo` and the benchmarks:
//! loop devices over sparse files, mounts, seeded block workloads, agent processes, and a
//! single-node Garage server as an S3 target, and a UDP proxy that injects network faults
//! ([`netfault`]).
//!
//! Everything that creates system state (loop devices, mounts) undoes it in `Drop`, so a
//! failing test does not leave the machine dirty for the next run. The integration tests
//! start from [`fixture`]: the root check, a scratch directory, a process server and a
//! registered agent, dropped in a safe order.

pub mod agent;
pub mod chaos;
pub mod fixture;
pub mod garage;
pub mod master_target;
pub mod netfault;
pub mod netns;
pub mod ranges;
pub mod replication;
pub mod sys;
pub mod workload;

pub use agent::{AgentEvent, AgentProcess, AgentRun, AgentStats};
pub use fixture::{Lab, Site};
pub use garage::Garage;
pub use netfault::{FaultConfig, FaultCounts, FaultProxy, Faults, Flap};
pub use netns::Netns;
pub use sys::{LoopDevice, Mount, Zram, run, run_output};
pub use workload::{Workload, WorkloadReport, file_workload};

use std::path::PathBuf;

/// Whether privileged tests may run. Not root: skip loudly, except under `CI=true`, where a
/// skipped privileged test is a failure.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg = format!("{test}: SKIPPED: needs root (BPF, loop devices, mounts)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}, and CI=true forbids skipping privileged tests");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    false
}

/// The workspace root (for locating built binaries).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of a binary built from this workspace: `$RIPCORD_BIN_DIR/<name>` if set, else
/// `target/{debug,release}/<name>` (newest). Panics with instructions if missing.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("RIPCORD_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        assert!(
            p.exists(),
            "{} does not exist (RIPCORD_BIN_DIR)",
            p.display()
        );
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let candidates = [
        target.join("debug").join(name),
        target.join("release").join(name),
    ];
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built (looked for {candidates:?}); run `cargo build --workspace` \
                 first (`cargo xtask test` does)"
            )
        })
}

/// A scratch directory removed on drop, on the root file system (not tmpfs) unless
/// `RIPCORD_SCRATCH` points elsewhere.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(label: &str) -> Scratch {
        let base = std::env::var_os("RIPCORD_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let path = base.join(format!(
            "ripcord-{label}-{}-{}",
            std::process::id(),
            nanos()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating scratch dir {}: {e}", path.display()));
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("RIPCORD_KEEP_SCRATCH").is_some() {
            eprintln!("keeping {} (RIPCORD_KEEP_SCRATCH)", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// "major:minor" of a block device.
pub fn dev_id(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let rdev = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .rdev();
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}
