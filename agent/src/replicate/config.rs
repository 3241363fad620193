//! `/etc/ripcord/agent.toml`: the agent's configuration, with documented defaults,
//! validated once at load. Command-line flags override it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/ripcord/agent.toml";
/// Default state directory (identity, disk ids, epochs).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ripcord/agent";

/// Agent configuration. Every field is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentConfig {
    /// Process server data endpoint, HOST:PORT. Default: the one saved by `register`.
    pub server: Option<String>,
    /// State directory. Default `/var/lib/ripcord/agent`.
    pub state_dir: PathBuf,
    /// Devices to protect (whole disks or partitions), if none are given on the command line.
    pub devices: Vec<PathBuf>,
    /// Plaintext bytes per batch, in KiB (64..=8192). Default 4096.
    pub batch_kib: usize,
    /// Most changed bytes read back per round, in MiB (1..=1024): bounds how long a
    /// round's reads take (the window in which a write can race them) and the round
    /// buffer's memory, so clean rounds (and crash-consistent cuts) keep coming under
    /// load. Default 16.
    pub round_mib: u64,
    /// Initial-sync bytes read per round, in MiB (1..=1024). Default 32.
    pub sync_chunk_mib: u64,
    /// zstd level (-7..=19; negative is faster). Default 1.
    pub zstd_level: i32,
    /// Least time between two crash-consistent cuts, in ms (10..=60000). Default 200.
    pub cut_interval_ms: u64,
    /// Unacknowledged bytes the agent holds for the server (QUIC send window plus batch
    /// buffer), in MiB (8..=1024). Bounds the agent's memory. Default 32.
    pub window_mib: usize,
    /// Kernel ring buffer size in bytes (power of two). Default 8 MiB.
    pub ring_bytes: u32,
    /// Seconds between application-consistent points (hooks, file systems on the
    /// protected devices frozen around the cut); 0 turns them off. Default 3600.
    pub app_interval_secs: u64,
    /// Directory of hook scripts, run in name order with `pre-freeze`, `frozen` or
    /// `post-thaw` as their argument. Default `/etc/ripcord/hooks.d`.
    pub hooks_dir: PathBuf,
    /// Longest a freeze (and each hook) may last, in ms (100..=60000): the file systems
    /// are thawed when it passes, whatever happens. Default 10000.
    pub freeze_timeout_ms: u64,
    /// Bound on the time between two recovery points of a disk, in ms (1000..=3600000).
    /// When a disk has gone half of it without a clean round (a hot block rewritten faster
    /// than it can be read back), the agent forces a point: it freezes the file systems
    /// on the device (`FIFREEZE`, no hooks) for one clean round. A device without a
    /// mounted file system cannot be forced; its gap is reported (metric, status, log)
    /// once it passes this bound. Default 15000.
    pub max_point_gap_ms: u64,
    /// Whether forced points may freeze file systems (see `max-point-gap-ms`). Default
    /// true.
    pub forced_points: bool,
    /// Longest a forced point may hold the file systems frozen, in ms (50..=60000); the
    /// attempt is abandoned (and retried later) if no clean round comes within it.
    /// Default 2000.
    pub forced_freeze_ms: u64,
    /// Address of the Prometheus endpoint (`GET /metrics`); empty turns it off. Default
    /// `127.0.0.1:9445`.
    pub metrics_addr: String,
    /// Whether a discarded range reads as zeroes afterwards, so the agent may send it as
    /// zeroes without reading it (`yes`), or must read it back (`no`). Linux does not say
    /// (dm-crypt with `allow_discards`, discards below the granularity, and devices
    /// without deterministic read-after-trim return old or random data); `auto` trusts
    /// only drivers known to zero (loop devices on files punch holes; zram frees the
    /// page) and reads back on every other device. Write-zeroes is always zeroes; a
    /// secure erase is always read back. Default `auto`.
    pub discards_read_zero: DiscardsReadZero,
    /// After SIGINT/SIGTERM, longest wait for the process server to acknowledge what is
    /// pending, in seconds (1..=3600); then the agent exits non-zero saying what was not
    /// acknowledged. A second signal stops at once. Default 30.
    pub drain_timeout_secs: u64,
    /// QUIC congestion controller of the replication stream: `cubic` (backs off on every
    /// loss, as Linux TCP), `bbr` (paces by measured bandwidth and round-trip time, keeps
    /// its rate through random loss that is not congestion: lossy WAN links) or
    /// `new-reno`. `cargo xtask bench link` compares them. Default `cubic`.
    pub congestion: CongestionControl,
}

/// See [`AgentConfig::congestion`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CongestionControl {
    #[default]
    Cubic,
    Bbr,
    NewReno,
}

impl From<CongestionControl> for ripcord_transport::endpoint::Congestion {
    fn from(c: CongestionControl) -> Self {
        match c {
            CongestionControl::Cubic => ripcord_transport::endpoint::Congestion::Cubic,
            CongestionControl::Bbr => ripcord_transport::endpoint::Congestion::Bbr,
            CongestionControl::NewReno => ripcord_transport::endpoint::Congestion::NewReno,
        }
    }
}

/// See [`AgentConfig::discards_read_zero`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscardsReadZero {
    #[default]
    Auto,
    Yes,
    No,
}

impl DiscardsReadZero {
    /// Whether discards on `dev` may be sent as zeroes.
    pub fn for_device(self, dev: &crate::device::BlockDevice) -> bool {
        match self {
            DiscardsReadZero::Yes => true,
            DiscardsReadZero::No => false,
            DiscardsReadZero::Auto => dev.driver_zeroes_discards(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            server: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            devices: Vec::new(),
            batch_kib: 4096,
            round_mib: 16,
            sync_chunk_mib: 32,
            zstd_level: 1,
            cut_interval_ms: 200,
            window_mib: 32,
            ring_bytes: agent_common::DEFAULT_RING_BYTES,
            app_interval_secs: 3600,
            hooks_dir: PathBuf::from("/etc/ripcord/hooks.d"),
            freeze_timeout_ms: 10_000,
            max_point_gap_ms: 15_000,
            forced_points: true,
            forced_freeze_ms: 2_000,
            metrics_addr: "127.0.0.1:9445".to_owned(),
            discards_read_zero: DiscardsReadZero::Auto,
            drain_timeout_secs: 30,
            congestion: CongestionControl::Cubic,
        }
    }
}

impl AgentConfig {
    /// Load `path`; a missing file at the default location means defaults.
    pub fn load(path: &Path, must_exist: bool) -> anyhow::Result<AgentConfig> {
        let cfg = match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                AgentConfig::default()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        cfg.validate()
            .with_context(|| format!("invalid {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (64..=8192).contains(&self.batch_kib),
            "batch-kib must be 64..=8192"
        );
        ensure!(
            (1..=1024).contains(&self.round_mib),
            "round-mib must be 1..=1024"
        );
        ensure!(
            (1..=1024).contains(&self.sync_chunk_mib),
            "sync-chunk-mib must be 1..=1024"
        );
        ensure!(
            (-7..=19).contains(&self.zstd_level),
            "zstd-level must be -7..=19"
        );
        ensure!(
            (10..=60_000).contains(&self.cut_interval_ms),
            "cut-interval-ms must be 10..=60000"
        );
        ensure!(
            (8..=1024).contains(&self.window_mib),
            "window-mib must be 8..=1024"
        );
        ensure!(
            self.ring_bytes.is_power_of_two() && self.ring_bytes >= 4096,
            "ring-bytes must be a power of two >= 4096"
        );
        ensure!(
            (100..=60_000).contains(&self.freeze_timeout_ms),
            "freeze-timeout-ms must be 100..=60000"
        );
        ensure!(
            (1_000..=3_600_000).contains(&self.max_point_gap_ms),
            "max-point-gap-ms must be 1000..=3600000"
        );
        ensure!(
            (50..=60_000).contains(&self.forced_freeze_ms),
            "forced-freeze-ms must be 50..=60000"
        );
        ensure!(
            (1..=3600).contains(&self.drain_timeout_secs),
            "drain-timeout-secs must be 1..=3600"
        );
        if !self.metrics_addr.is_empty() {
            self.metrics_addr
                .parse::<std::net::SocketAddr>()
                .with_context(|| {
                    format!("metrics-addr {:?} is not HOST:PORT", self.metrics_addr)
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let cfg = AgentConfig::default();
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(toml::from_str::<AgentConfig>(&text).unwrap(), cfg);
    }

    #[test]
    fn bad_values_are_named() {
        let cfg: AgentConfig = toml::from_str("zstd-level = 40").unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("zstd-level")
        );
        assert!(toml::from_str::<AgentConfig>("bogus = 1").is_err());
        let bbr: AgentConfig = toml::from_str("congestion = \"bbr\"").unwrap();
        assert_eq!(bbr.congestion, CongestionControl::Bbr);
        let e = toml::from_str::<AgentConfig>("congestion = \"reno\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("congestion") && e.contains("bbr"), "{e}");
        let missing = AgentConfig::load(Path::new("/nonexistent/agent.toml"), false).unwrap();
        assert_eq!(missing, AgentConfig::default());
        assert!(AgentConfig::load(Path::new("/nonexistent/agent.toml"), true).is_err());
    }
}
