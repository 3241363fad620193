//! Running `ripcord-agent watch --json` as a child process and reading what it captured.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// One line of `ripcord-agent watch --json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct AgentEvent {
    pub dev: String,
    #[serde(default)]
    pub sector: u64,
    #[serde(default)]
    pub sectors: u64,
    pub op: String,
    #[serde(default)]
    pub seq: Option<u64>,
    /// Completion time (CLOCK_MONOTONIC ns); the write's queue time on `lost` lines; 0 on
    /// overflow and stats lines.
    #[serde(default)]
    pub time_ns: u64,
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub dropped: u64,
    #[serde(default)]
    pub overflow_all: u64,
    #[serde(default)]
    pub completion_misses: u64,
}

/// Final counters of one device (`"op":"stats"` lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStats {
    pub dev: String,
    pub events: u64,
    pub dropped: u64,
    pub overflow_all: u64,
    /// Runs of the completion probes the kernel skipped or that failed: each may leave an
    /// in-flight entry to be reported lost.
    pub completion_misses: u64,
}

/// Everything one agent run printed.
#[derive(Debug, Default)]
pub struct AgentRun {
    /// Change lines (write, discard, write-zeroes, flush).
    pub changes: Vec<AgentEvent>,
    /// Overflow lines (regions to resynchronise).
    pub overflow: Vec<AgentEvent>,
    pub stats: Vec<AgentStats>,
    pub stderr: String,
}

impl AgentRun {
    /// (sector, sectors) of data-changing events (and overflow regions if asked) on `dev`.
    pub fn ranges(&self, dev: &str, with_overflow: bool) -> Vec<(u64, u64)> {
        let data = self
            .changes
            .iter()
            .filter(|e| e.dev == dev && e.op != "flush")
            .map(|e| (e.sector, e.sectors));
        let over = self
            .overflow
            .iter()
            .filter(|e| with_overflow && e.dev == dev)
            .map(|e| (e.sector, e.sectors));
        data.chain(over).collect()
    }

    pub fn stats_for(&self, dev: &str) -> &AgentStats {
        self.stats
            .iter()
            .find(|s| s.dev == dev)
            .unwrap_or_else(|| panic!("no stats line for {dev}; stderr:\n{}", self.stderr))
    }
}

/// A running `ripcord-agent watch --json`; killed on drop if not stopped.
pub struct AgentProcess {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl AgentProcess {
    /// Start watching `devices` and wait until the probes are attached.
    pub fn watch(
        bin: &Path,
        devices: &[&Path],
        extra: &[&str],
        dir: &Path,
    ) -> anyhow::Result<AgentProcess> {
        Self::watch_with_env(bin, devices, extra, &[], dir)
    }

    /// Like [`AgentProcess::watch`], with extra environment variables (fault injection).
    pub fn watch_with_env(
        bin: &Path,
        devices: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<AgentProcess> {
        let ready = dir.join(format!("agent-ready-{}", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        let stdout = dir.join("agent.jsonl");
        let stderr = dir.join("agent.stderr");
        let child = Command::new(bin)
            .arg("watch")
            .arg("--json")
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .args(devices)
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = AgentProcess {
            child: Some(child),
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(status) = agent.child.as_mut().context("child")?.try_wait()? {
                bail!(
                    "ripcord-agent exited ({status}) before attaching:\n{}",
                    std::fs::read_to_string(&agent.stderr).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("ripcord-agent did not attach within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&ready);
        Ok(agent)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Send a signal (e.g. SIGSTOP / SIGCONT).
    pub fn signal(&self, sig: i32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::try_from(sig).ok(),
        );
    }

    /// Stop with SIGINT (the agent drains and reports), and parse its output.
    pub fn stop(mut self) -> anyhow::Result<AgentRun> {
        let mut child = self.child.take().context("already stopped")?;
        self.signal_child(&child, libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("ripcord-agent did not stop within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if !status.success() {
            bail!("ripcord-agent failed ({status}):\n{stderr}");
        }
        let text = std::fs::read_to_string(&self.stdout)?;
        let mut run = AgentRun {
            stderr,
            ..AgentRun::default()
        };
        for (i, line) in text.lines().enumerate() {
            let e: AgentEvent = serde_json::from_str(line)
                .with_context(|| format!("agent output line {}: {line:?}", i + 1))?;
            match e.op.as_str() {
                "write" | "discard" | "write-zeroes" | "flush" => run.changes.push(e),
                // Ranges to resynchronise: dropped events, and writes whose completion
                // was never reported.
                "overflow" | "lost" => run.overflow.push(e),
                "stats" => run.stats.push(AgentStats {
                    dev: e.dev,
                    events: e.events,
                    dropped: e.dropped,
                    overflow_all: e.overflow_all,
                    completion_misses: e.completion_misses,
                }),
                other => bail!("unknown op {other:?} in agent output line {}", i + 1),
            }
        }
        Ok(run)
    }

    fn signal_child(&self, child: &Child, sig: i32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::try_from(sig).ok(),
        );
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
