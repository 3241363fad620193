//! A plan run's state file (`<state-dir>/<plan>.json`) and reports: what [`super::run`]
//! records after every step. Written durably (temp file, fsync, rename), mode 0600; each
//! write also replaces `<state-dir>/reports/<plan>-<run id>.json`, the run's report.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Real failover, or a test failover into scratch space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Failover,
    TestFailover,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Failover => "failover",
            Mode::TestFailover => "test-failover",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Running,
    Paused,
    Failed,
    Done,
}

/// The recovery point a disk is failed over to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChosenPoint {
    pub machine: String,
    pub point: String,
    pub time: String,
    pub app_consistent: bool,
    pub output: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    pub status: Status,
    pub started: String,
    pub secs: f64,
    /// A script's exit status.
    pub exit_code: Option<i32>,
    pub detail: String,
}

/// A process a start command left running.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Started {
    pub machine: String,
    pub pid: i32,
    pub log: PathBuf,
}

/// `<state-dir>/<plan>.json`, and each report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub plan: String,
    pub run_id: String,
    pub mode: Mode,
    /// The `--point` given.
    pub point: String,
    /// SHA-256 of the plan file when the run began (`None` in states written before it was
    /// recorded).
    #[serde(default)]
    pub plan_sha256: Option<String>,
    pub status: Status,
    /// By disk id.
    pub points: BTreeMap<String, ChosenPoint>,
    pub steps: Vec<StepRecord>,
    /// Index of the next step to run.
    pub next: usize,
    pub started: Vec<Started>,
    /// Why it paused or failed.
    pub message: Option<String>,
}

pub fn state_path(dir: &Path, plan: &str) -> PathBuf {
    dir.join(format!("{plan}.json"))
}

pub fn load_state(dir: &Path, plan: &str) -> anyhow::Result<Option<RunState>> {
    let path = state_path(dir, plan);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn save_state(dir: &Path, s: &RunState) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(s).expect("a run state serializes");
    let path = state_path(dir, &s.plan);
    ripcord_crashsafe::write_atomic(&path, &bytes, ripcord_crashsafe::MODE_SECRET)
        .with_context(|| format!("writing {}", path.display()))?;
    let reports = dir.join("reports");
    std::fs::create_dir_all(&reports).with_context(|| format!("creating {}", reports.display()))?;
    let report = reports.join(format!("{}-{}.json", s.plan, s.run_id));
    ripcord_crashsafe::write_atomic(&report, &bytes, ripcord_crashsafe::MODE_SECRET)
        .with_context(|| format!("writing {}", report.display()))
}
