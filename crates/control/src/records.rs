//! The rows of the configuration database, as the library hands them out.

use ripcord_types::GroupId;

use crate::{ControlError, Result};

/// A process server's health colour (DESIGN.md section 3); the order is the severity, and
/// the discriminant is the value of the `ripcord_ps_health` metric.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Green = 0,
    Orange = 1,
    Red = 2,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Green => "green",
            Health::Orange => "orange",
            Health::Red => "red",
        }
    }

    pub fn parse(value: &str) -> Result<Health> {
        match value {
            "green" => Ok(Health::Green),
            "orange" => Ok(Health::Orange),
            "red" => Ok(Health::Red),
            _ => Err(ControlError::BadHealth {
                value: value.to_owned(),
            }),
        }
    }
}

/// A registered process server.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessServer {
    pub id: String,
    /// Where agents reach it (host:port of its data endpoint).
    pub address: String,
    pub version: String,
    /// SHA-256 of its certificate (hex): a second server with the same id and another
    /// certificate is a clone.
    pub cert_sha256: String,
    /// Whether it also runs the configuration role.
    pub config_role: bool,
    pub registered_at: i64,
    pub last_heartbeat: Option<i64>,
    pub health: Health,
    /// Where it runs: a hash of its host's machine id and its deployment directory,
    /// recorded when it joined (empty for the configuration role's own server). A copy of
    /// the server elsewhere reports another one and is refused as a clone.
    pub fingerprint: String,
    /// Its load as last reported (placement compares servers by it).
    pub load: Option<ServerLoad>,
}

/// A process server whose newest heartbeat is older than this many seconds is
/// disconnected: red whatever it said last (the seeds' "disconnected" row). The
/// configuration role's default `health.heartbeat-window-secs`; readers that do not know
/// the configured window (`ripcord status`, the status page) apply this one.
pub const HEARTBEAT_WINDOW_SECS: i64 = 60;

impl ProcessServer {
    /// Whether its newest heartbeat is older than `window` seconds at `now` (one that
    /// never reported is not silent: it may have just joined).
    pub fn silent(&self, now: i64, window: i64) -> bool {
        self.last_heartbeat.is_some_and(|t| now - t > window)
    }

    /// The colour to show at `now`: what it reported, red once silent for
    /// [`HEARTBEAT_WINDOW_SECS`], and red if it never reported.
    pub fn shown_health(&self, now: i64) -> Health {
        if self.last_heartbeat.is_none() || self.silent(now, HEARTBEAT_WINDOW_SECS) {
            Health::Red
        } else {
            self.health
        }
    }
}

/// A process server's load, each figure averaged over its health window.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServerLoad {
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub cache_free_percent: f64,
}

/// A registered machine and where it replicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub id: String,
    pub cert_sha256: String,
    pub registered_at: i64,
    pub process_server: Option<String>,
    pub policy: Option<String>,
}

/// A protected disk, as its process server last reported it. A reader computes the lag
/// with [`Disk::lag_secs`] (it keeps growing when the server goes silent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub id: String,
    pub machine: String,
    pub device: String,
    pub size_bytes: u64,
    pub epoch: u64,
    /// Newest batch durable on its process server.
    pub acked_seq: u64,
    /// When its newest recovery point was committed in the store (Unix seconds).
    pub last_point_at: Option<i64>,
    /// Up to when that point held every write of the disk (Unix seconds): its process
    /// server saw it hold every durable batch while the machine's stream was open. An
    /// idle disk's point stays current; `None` from servers that do not report it.
    pub current_at: Option<i64>,
}

impl Disk {
    /// Seconds of writes a failover to the newest point could lose, at `now` (Unix
    /// seconds): since the later of its commit and the last time it was current. `None`
    /// while the disk has no point.
    pub fn lag_secs(&self, now: i64) -> Option<i64> {
        let since = self.last_point_at?.max(self.current_at.unwrap_or(i64::MIN));
        Some((now - since).max(0))
    }
}

/// What a process server reports about a disk. `None` leaves the recorded value as it
/// is: a server that just started has not seen a group commit or a new point yet, and
/// must not erase what it reported before. Process servers that joined send it to the
/// configuration role as JSON.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskReport {
    pub id: String,
    pub machine: String,
    pub device: String,
    pub size_bytes: u64,
    pub epoch: Option<u64>,
    pub acked_seq: Option<u64>,
    pub last_point_at: Option<i64>,
    /// See [`Disk::current_at`]; absent from servers older than it.
    #[serde(default)]
    pub current_at: Option<i64>,
}

/// The RPO threshold of a machine without a policy (the seeds' default: 15 minutes). A
/// disk lagging more is warned about; twice as much is critical.
pub const DEFAULT_RPO_THRESHOLD_SECS: u64 = 900;

/// Bounds of a policy's retention (1 hour to 10 years), seconds: checked where policies
/// are set, and applied again where they are used (a relayed value is not trusted).
pub const POLICY_RETENTION_SECS: std::ops::RangeInclusive<u64> = 3600..=87_600 * 3600;

/// Bounds of a policy's application-consistent interval (a minute to a week), seconds.
pub const POLICY_APP_INTERVAL_SECS: std::ops::RangeInclusive<u64> = 60..=7 * 24 * 3600;

/// A replication policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Alert when a disk's lag exceeds this.
    pub rpo_threshold_secs: u64,
    pub retention_secs: u64,
    /// Application-consistent points this often (0: none).
    pub app_interval_secs: u64,
}

/// A consistency group (issue 16): machines whose disks share group recovery points, cut
/// at common instants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// 1 to 64 letters, digits, `-` or `_`.
    pub name: String,
    /// Chosen at random when the group was created; a group made again under the same name
    /// gets another.
    pub id: GroupId,
    /// A group point is scheduled at every instant of the coordinator's clock that is a
    /// multiple of this many milliseconds ([`crate::GROUP_INTERVAL_MS`]).
    pub interval_ms: u64,
    /// A group point whose clock-error bound exceeds this many microseconds is not offered
    /// ([`crate::GROUP_MAX_ERROR_US`]).
    pub max_error_us: u64,
    /// Its member machines' ids, sorted (at most [`crate::MAX_GROUP_MACHINES`]).
    pub machines: Vec<String>,
    /// When it was created (Unix seconds).
    pub created_at: i64,
    /// Every `app_every`-th instant is an application-consistent group point (0: none).
    pub app_every: u32,
}

/// How bad an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// An open or cleared alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub subject: String,
    pub kind: String,
    pub severity: String,
    pub message: String,
    pub raised_at: i64,
    pub cleared_at: Option<i64>,
}

/// One entry of the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}
