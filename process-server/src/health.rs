//! Process-server health, as the seeds' table (`../shared/DESIGN.md` section 3) defines it:
//!
//! | status | CPU and memory | cache free space | upload |
//! | --- | --- | --- | --- |
//! | green | < 80% | > 30% | uploaded within 30 min |
//! | orange | 80–95% | 25–30% | nothing uploaded for 30 min |
//! | red | > 95% | < 25% | nothing uploaded for 45 min, or disconnected |
//!
//! # How each signal is measured
//! - **CPU**: the host's busy share of all CPUs between two samples (`/proc/stat`: every
//!   state but idle and iowait). **Memory**: `1 - MemAvailable / MemTotal`
//!   (`/proc/meminfo`). Both count only when **sustained**: a level holds when every sample
//!   of the last `window-secs` (default 900, the seeds' 15 minutes) reaches it, so a spike
//!   never turns a server orange, and a server that has not run a whole window yet is green
//!   on these two.
//! - **Cache free space**: free share of the cache file system (`statvfs`, blocks
//!   available to the server), sustained over `cache-window-secs` (default 60): the cache
//!   fills fast, and below `min-free-mib` the server already holds acknowledgements.
//! - **Upload**: how long uploads to the target store have been failing (for the disk that
//!   has failed longest). Idle is not stalled: a server with nothing to upload is green.
//!   Without a target store the signal is green and says so.
//!
//! The server's level is the worst signal's. It is sampled every `sample-ms` (default
//! 5000), published as `ripcord_ps_health` (0 green, 1 orange, 2 red) and
//! `ripcord_ps_health_signal{signal}`, written to `<deployment>/health.json` for
//! `ripcord-ps health`, and every change of level is logged with its reasons.
//!
//! Not measured here: the config role's heartbeat (issue 15; there is no config role yet).

use std::{
    collections::VecDeque,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// `[health]` in `ps.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthConfig {
    /// How often the signals are sampled, in milliseconds (100..=60000). Default 5000.
    pub sample_ms: u64,
    /// How long CPU and memory must stay above a threshold to count, in seconds
    /// (1..=86400). Default 900 (the seeds' 15 minutes).
    pub window_secs: u64,
    /// How long cache free space must stay below a threshold to count, in seconds
    /// (1..=86400). Default 60.
    pub cache_window_secs: u64,
    /// Uploads failing this long turn the server orange, in seconds. Default 1800.
    pub upload_warn_secs: u64,
    /// Uploads failing this long turn it red, in seconds (more than
    /// `upload-warn-secs`). Default 2700.
    pub upload_critical_secs: u64,
    /// On the configuration role: a process server whose newest heartbeat is older than
    /// this is disconnected, marked red with a critical alert, and takes no new machines,
    /// in seconds (2..=3600, at least two sample intervals). Default 60.
    pub heartbeat_window_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            sample_ms: 5000,
            window_secs: 900,
            cache_window_secs: 60,
            upload_warn_secs: 1800,
            upload_critical_secs: 2700,
            heartbeat_window_secs: ripcord_control::HEARTBEAT_WINDOW_SECS as u64,
        }
    }
}

impl HealthConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (100..=60_000).contains(&self.sample_ms),
            "health.sample-ms must be 100..=60000"
        );
        for (name, v) in [
            ("window-secs", self.window_secs),
            ("cache-window-secs", self.cache_window_secs),
        ] {
            anyhow::ensure!((1..=86_400).contains(&v), "health.{name} must be 1..=86400");
        }
        anyhow::ensure!(
            self.upload_warn_secs >= 1 && self.upload_critical_secs > self.upload_warn_secs,
            "health.upload-critical-secs must be more than health.upload-warn-secs (>= 1)"
        );
        anyhow::ensure!(
            (2..=3600).contains(&self.heartbeat_window_secs)
                && self.heartbeat_window_secs * 1000 >= 2 * self.sample_ms,
            "health.heartbeat-window-secs must be 2..=3600 and cover two sample intervals \
             (health.sample-ms)"
        );
        Ok(())
    }
}

/// A health level; the order is the severity (one type with the configuration role's).
pub use ripcord_control::Health as Level;

/// One sample of the raw signals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Busy share of all CPUs since the previous sample, percent.
    pub cpu_percent: f64,
    /// Used memory, percent.
    pub memory_percent: f64,
    /// Free space of the cache file system, percent.
    pub cache_free_percent: f64,
    /// How long uploads have been failing (`None`: they work, or there is no target).
    pub upload_failing_for: Option<Duration>,
}

/// One signal's level and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalReport {
    pub signal: String,
    pub level: Level,
    pub detail: String,
}

/// What `health.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub level: Level,
    pub signals: Vec<SignalReport>,
    /// Unix milliseconds of the sample.
    pub updated_unix_ms: u64,
    /// The sampling interval, so a reader can tell a stale report (the server stopped).
    pub sample_ms: u64,
    /// The load measured over the window: what placement compares servers by.
    #[serde(default)]
    pub load: Option<Load>,
}

/// A server's load, each figure averaged over the health window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub cache_free_percent: f64,
}

/// The signal names, in report order.
pub const SIGNALS: [&str; 4] = ["cpu", "memory", "cache", "upload"];

fn level_above(value: f64, orange: f64, red: f64) -> Level {
    if value > red {
        Level::Red
    } else if value >= orange {
        Level::Orange
    } else {
        Level::Green
    }
}

fn cache_level(free: f64) -> Level {
    if free < 25.0 {
        Level::Red
    } else if free <= 30.0 {
        Level::Orange
    } else {
        Level::Green
    }
}

/// Keeps the samples of the longest window and turns them into a report.
pub struct Monitor {
    cfg: HealthConfig,
    has_target: bool,
    samples: VecDeque<(Instant, Sample)>,
}

impl Monitor {
    pub fn new(cfg: HealthConfig, has_target: bool) -> Monitor {
        Monitor {
            cfg,
            has_target,
            samples: VecDeque::new(),
        }
    }

    /// The level every sample of the last `window` reaches (green until the samples span
    /// the whole window), and the least value behind it.
    fn sustained(
        &self,
        now: Instant,
        window: Duration,
        level_of: impl Fn(&Sample) -> Level,
    ) -> Level {
        let Some(&(oldest, _)) = self.samples.front() else {
            return Level::Green;
        };
        if now.duration_since(oldest) < window {
            return Level::Green;
        }
        self.samples
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= window)
            .map(|(_, s)| level_of(s))
            .min()
            .unwrap_or(Level::Green)
    }

    /// The mean of the samples of the last `window`.
    fn load(&self, now: Instant, window: Duration) -> Load {
        let recent: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= window)
            .map(|(_, s)| s)
            .collect();
        let n = recent.len().max(1) as f64;
        let mean = |f: fn(&Sample) -> f64| recent.iter().map(|s| f(s)).sum::<f64>() / n;
        Load {
            cpu_percent: mean(|s| s.cpu_percent),
            memory_percent: mean(|s| s.memory_percent),
            cache_free_percent: mean(|s| s.cache_free_percent),
        }
    }

    /// Adds a sample taken at `now` and reports.
    pub fn push(&mut self, now: Instant, sample: Sample) -> HealthReport {
        self.samples.push_back((now, sample));
        let keep = Duration::from_secs(self.cfg.window_secs.max(self.cfg.cache_window_secs))
            + Duration::from_millis(2 * self.cfg.sample_ms);
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
        let window = Duration::from_secs(self.cfg.window_secs);
        let cache_window = Duration::from_secs(self.cfg.cache_window_secs);
        let cpu = self.sustained(now, window, |s| level_above(s.cpu_percent, 80.0, 95.0));
        let memory = self.sustained(now, window, |s| level_above(s.memory_percent, 80.0, 95.0));
        let cache = self.sustained(now, cache_window, |s| cache_level(s.cache_free_percent));
        let minutes = |secs: u64| format!("{} min", secs / 60);
        let window_text = minutes(self.cfg.window_secs.max(60));
        let upload = match sample.upload_failing_for {
            Some(d) if d.as_secs() >= self.cfg.upload_critical_secs => Level::Red,
            Some(d) if d.as_secs() >= self.cfg.upload_warn_secs => Level::Orange,
            _ => Level::Green,
        };
        let signals = vec![
            SignalReport {
                signal: "cpu".into(),
                level: cpu,
                detail: format!(
                    "{:.0}% busy (orange at 80%, red above 95%, sustained over {window_text})",
                    sample.cpu_percent
                ),
            },
            SignalReport {
                signal: "memory".into(),
                level: memory,
                detail: format!(
                    "{:.0}% used (orange at 80%, red above 95%, sustained over {window_text})",
                    sample.memory_percent
                ),
            },
            SignalReport {
                signal: "cache".into(),
                level: cache,
                detail: format!(
                    "{:.1}% of the cache file system free (orange at 30%, red below 25%)",
                    sample.cache_free_percent
                ),
            },
            SignalReport {
                signal: "upload".into(),
                level: upload,
                detail: match (self.has_target, sample.upload_failing_for) {
                    (false, _) => "no target store configured".into(),
                    (true, None) => "uploads work".into(),
                    (true, Some(d)) => format!(
                        "uploads failing for {} s (orange after {} s, red after {} s)",
                        d.as_secs(),
                        self.cfg.upload_warn_secs,
                        self.cfg.upload_critical_secs
                    ),
                },
            },
        ];
        HealthReport {
            level: signals
                .iter()
                .map(|s| s.level)
                .max()
                .unwrap_or(Level::Green),
            signals,
            updated_unix_ms: unix_ms(),
            sample_ms: self.cfg.sample_ms,
            load: Some(self.load(now, window)),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// CPU time counters of `/proc/stat` (busy, total), in clock ticks.
pub fn cpu_ticks() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_cpu_ticks(&text).context("/proc/stat has no aggregate `cpu` line")
}

fn parse_cpu_ticks(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Used memory, percent (`1 - MemAvailable / MemTotal`).
pub fn memory_percent() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_memory_percent(&text).context("/proc/meminfo lacks MemTotal or MemAvailable")
}

fn parse_memory_percent(text: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let (total, available) = (field("MemTotal:")?, field("MemAvailable:")?);
    (total > 0.0).then(|| 100.0 * (1.0 - available / total))
}

/// Free share of the file system holding `dir`, percent (blocks available to the server).
pub fn free_percent(dir: &Path) -> anyhow::Result<f64> {
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("statvfs of the cache {}", dir.display()))?;
    let total = st.blocks() as f64;
    Ok(if total > 0.0 {
        100.0 * st.blocks_available() as f64 / total
    } else {
        0.0
    })
}

/// Takes samples: CPU needs the previous counters.
pub struct Sampler {
    cache: std::path::PathBuf,
    previous_cpu: Option<(u64, u64)>,
}

impl Sampler {
    pub fn new(cache: std::path::PathBuf) -> Sampler {
        Sampler {
            cache,
            previous_cpu: cpu_ticks().ok(),
        }
    }

    /// A sample now; `upload_failing_for` comes from the uploaders.
    pub fn sample(&mut self, upload_failing_for: Option<Duration>) -> anyhow::Result<Sample> {
        let now = cpu_ticks()?;
        let cpu_percent = match self.previous_cpu.replace(now) {
            Some((busy, total)) if now.1 > total => {
                100.0 * now.0.saturating_sub(busy) as f64 / (now.1 - total) as f64
            }
            _ => 0.0,
        };
        Ok(Sample {
            cpu_percent,
            memory_percent: memory_percent()?,
            cache_free_percent: free_percent(&self.cache)?,
            upload_failing_for,
        })
    }
}

/// Logs a change of level: what is wrong now, or that all is well again.
pub fn log_change(previous: Option<Level>, report: &HealthReport) {
    if previous == Some(report.level) {
        return;
    }
    let reasons: Vec<String> = report
        .signals
        .iter()
        .filter(|s| s.level == report.level && s.level != Level::Green)
        .map(|s| format!("{}: {}", s.signal, s.detail))
        .collect();
    match report.level {
        Level::Green if previous.is_some() => tracing::info!("health is green again"),
        Level::Green => {}
        Level::Orange => tracing::warn!("health is orange: {}", reasons.join("; ")),
        Level::Red => tracing::error!("health is red: {}", reasons.join("; ")),
    }
}

/// Writes the report where `ripcord-ps health` reads it (replaced atomically, not synced:
/// it is rewritten every sample).
pub fn write_report(deployment: &Path, report: &HealthReport) -> anyhow::Result<()> {
    let path = report_path(deployment);
    let bytes = serde_json::to_vec_pretty(report).expect("a report serializes");
    ripcord_crashsafe::replace_atomic(&path, &bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads the report `serve` writes. `None` when the server never wrote one.
pub fn read_report(deployment: &Path) -> anyhow::Result<Option<HealthReport>> {
    let path = report_path(deployment);
    match std::fs::read(&path) {
        Ok(b) if b.len() > 1 << 20 => anyhow::bail!("{} is over 1 MiB", path.display()),
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Where `ripcord-ps health` reads the report.
pub fn report_path(deployment: &Path) -> std::path::PathBuf {
    deployment.join("health.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu: f64, free: f64) -> Sample {
        Sample {
            cpu_percent: cpu,
            memory_percent: 10.0,
            cache_free_percent: free,
            upload_failing_for: None,
        }
    }

    fn cfg() -> HealthConfig {
        HealthConfig {
            sample_ms: 1000,
            window_secs: 10,
            cache_window_secs: 3,
            upload_warn_secs: 60,
            upload_critical_secs: 90,
            heartbeat_window_secs: 5,
        }
    }

    fn level(r: &HealthReport, signal: &str) -> Level {
        r.signals.iter().find(|s| s.signal == signal).unwrap().level
    }

    #[test]
    fn a_spike_is_not_sustained_and_a_whole_window_is() {
        let t0 = Instant::now();
        let mut m = Monitor::new(cfg(), true);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Busy from the start, but the window is not covered yet: green.
        for s in 0..10 {
            assert_eq!(
                level(&m.push(at(s), sample(99.0, 50.0)), "cpu"),
                Level::Green
            );
        }
        // Ten seconds of samples above 95%: red.
        let r = m.push(at(10), sample(99.0, 50.0));
        assert_eq!((level(&r, "cpu"), r.level), (Level::Red, Level::Red));
        // One quieter sample inside the window: only what every sample reaches.
        let r = m.push(at(11), sample(85.0, 50.0));
        assert_eq!(level(&r, "cpu"), Level::Orange);
        let r = m.push(at(12), sample(10.0, 50.0));
        assert_eq!(level(&r, "cpu"), Level::Green);
        // The load placement reads is the window's mean, not the last sample.
        let load = r.load.unwrap();
        assert!(
            (load.cpu_percent - (9.0 * 99.0 + 85.0 + 10.0) / 11.0).abs() < 1e-9,
            "{load:?}"
        );
        assert!((load.memory_percent - 10.0).abs() < 1e-9);
        assert!((load.cache_free_percent - 50.0).abs() < 1e-9);
    }

    #[test]
    fn cache_free_space_and_uploads_follow_the_table() {
        let t0 = Instant::now();
        let mut m = Monitor::new(cfg(), true);
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in 0..=3 {
            m.push(at(s), sample(1.0, 28.0));
        }
        let r = m.push(at(4), sample(1.0, 28.0));
        assert_eq!(
            (level(&r, "cache"), r.level),
            (Level::Orange, Level::Orange)
        );
        for s in 5..=8 {
            m.push(at(s), sample(1.0, 20.0));
        }
        assert_eq!(
            level(&m.push(at(9), sample(1.0, 20.0)), "cache"),
            Level::Red
        );
        assert_eq!(
            level(&m.push(at(10), sample(1.0, 31.0)), "cache"),
            Level::Green
        );
        let failing = |secs| Sample {
            upload_failing_for: Some(Duration::from_secs(secs)),
            ..sample(1.0, 50.0)
        };
        assert_eq!(level(&m.push(at(11), failing(59)), "upload"), Level::Green);
        assert_eq!(level(&m.push(at(12), failing(60)), "upload"), Level::Orange);
        let r = m.push(at(13), failing(95));
        assert_eq!((level(&r, "upload"), r.level), (Level::Red, Level::Red));
        assert!(r.signals[3].detail.contains("failing for 95 s"), "{r:?}");
    }

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_cpu_ticks(stat), Some((150, 1000)));
        assert_eq!(parse_cpu_ticks("intr 1 2\n"), None);
        let mem = "MemTotal:       1000 kB\nMemFree: 10 kB\nMemAvailable:    250 kB\n";
        assert_eq!(parse_memory_percent(mem), Some(75.0));
        assert_eq!(
            parse_memory_percent("MemTotal: 0 kB\nMemAvailable: 0 kB\n"),
            None
        );
        assert!(cpu_ticks().is_ok() && memory_percent().is_ok());
    }
}
