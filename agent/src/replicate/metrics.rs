//! The agent's Prometheus endpoint (`GET /metrics`, prometheus-client text format):
//! recovery points per disk (rate, newest point age, largest gap, forced and app points,
//! the gap and churn alerts), capture and readback counters, read errors and their alert,
//! passthrough writes, and forced-freeze stalls.
//!
//! The protect loop calls [`AgentMetrics::update`] with the producers' counters every
//! stats interval; the HTTP thread only renders.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{pipeline::DiskCounters, points::FreezeStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    pub device: String,
}

type Counters = Family<DeviceLabel, Counter>;
type Gauges = Family<DeviceLabel, Gauge<f64, AtomicU64>>;

/// How long `read_error_alert` holds after a read failed every attempt.
pub const READ_ERROR_ALERT_HOLD: Duration = Duration::from_secs(300);

/// What one disk reports each interval.
pub struct DiskSample<'a> {
    pub device: &'a str,
    pub counters: DiskCounters,
    pub dirty_bytes: u64,
    /// How long changes have waited for a point (`None` while the initial sync runs).
    pub point_gap: Option<Duration>,
    /// Age of the newest point (`None` while the initial sync runs).
    pub point_age: Option<Duration>,
    pub largest_gap: Duration,
    pub gap_alert: bool,
    pub churn_alert: bool,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    points: Counters,
    forced_points: Counters,
    app_points: Counters,
    group_points: Counters,
    group_misses: Counters,
    rounds: Counters,
    clean_rounds: Counters,
    raced_reads: Counters,
    lost_completions: Counters,
    dropped_events: Counters,
    read_errors: Counters,
    passthrough_writes: Counters,
    read_error_alert: Gauges,
    points_per_minute: Gauges,
    newest_point_age: Gauges,
    point_gap: Gauges,
    largest_gap: Gauges,
    gap_alert: Gauges,
    churn_alert: Gauges,
    dirty_bytes: Gauges,
    stalls: Histogram,
    state: std::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Last counters seen per device (counters only go up by the difference).
    seen: std::collections::HashMap<String, DiskCounters>,
    /// Times of recent points per device, for the per-minute rate.
    recent: std::collections::HashMap<String, VecDeque<Instant>>,
    /// When a read last failed every attempt, per device.
    last_read_error: std::collections::HashMap<String, Instant>,
    stalls_seen: usize,
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("ripcord_agent");
        let m = AgentMetrics {
            registry: Registry::default(),
            points: Counters::default(),
            forced_points: Counters::default(),
            app_points: Counters::default(),
            group_points: Counters::default(),
            group_misses: Counters::default(),
            rounds: Counters::default(),
            clean_rounds: Counters::default(),
            raced_reads: Counters::default(),
            lost_completions: Counters::default(),
            dropped_events: Counters::default(),
            read_errors: Counters::default(),
            passthrough_writes: Counters::default(),
            read_error_alert: Gauges::default(),
            points_per_minute: Gauges::default(),
            newest_point_age: Gauges::default(),
            point_gap: Gauges::default(),
            largest_gap: Gauges::default(),
            gap_alert: Gauges::default(),
            churn_alert: Gauges::default(),
            dirty_bytes: Gauges::default(),
            stalls: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            state: std::sync::Mutex::new(State::default()),
        };
        registry.register("points", "Recovery points (cuts) sent", m.points.clone());
        registry.register(
            "forced_points",
            "Crash-consistent points taken with the file systems frozen because no clean \
             round came within half of max-point-gap",
            m.forced_points.clone(),
        );
        registry.register(
            "group_points",
            "Cuts stamped as members of a consistency group's point",
            m.group_points.clone(),
        );
        registry.register(
            "group_misses",
            "Group instants with no stamped cut (the round at the instant was not clean, \
             or its clock error passed half the group's max-error)",
            m.group_misses.clone(),
        );
        registry.register(
            "app_points",
            "Application-consistent points sent",
            m.app_points.clone(),
        );
        registry.register("rounds", "Readback rounds", m.rounds.clone());
        registry.register(
            "clean_rounds",
            "Rounds no write raced that took the dirty set whole",
            m.clean_rounds.clone(),
        );
        registry.register(
            "raced_reads",
            "Readback pieces a newer write raced (re-read in a later round)",
            m.raced_reads.clone(),
        );
        registry.register(
            "lost_completions",
            "Queued writes whose completion the probe never saw (re-read)",
            m.lost_completions.clone(),
        );
        registry.register(
            "dropped_events",
            "Change events the ring could not take (their regions were resynchronised)",
            m.dropped_events.clone(),
        );
        registry.register(
            "read_errors",
            "Reads of the protected device that failed every attempt (the range stays \
             dirty and no point is taken until it reads)",
            m.read_errors.clone(),
        );
        registry.register(
            "read_error_alert",
            "1 while a read of the device failed within the last 5 minutes: the disk or its \
             path is failing, and points wait for the range to read",
            m.read_error_alert.clone(),
        );
        registry.register(
            "passthrough_writes",
            "Passthrough requests with data out (SG_IO, NVMe or io_uring passthrough) seen \
             on the disk; each made the agent read the whole device again",
            m.passthrough_writes.clone(),
        );
        registry.register(
            "points_per_minute",
            "Recovery points sent in the last 60 seconds",
            m.points_per_minute.clone(),
        );
        registry.register(
            "newest_point_age_seconds",
            "Time since the newest recovery point (0 while the initial sync runs)",
            m.newest_point_age.clone(),
        );
        registry.register(
            "point_gap_seconds",
            "How long the oldest change no recovery point holds has waited for one \
             (0 when the newest point holds everything): the data a disaster now loses",
            m.point_gap.clone(),
        );
        registry.register(
            "largest_point_gap_seconds",
            "Longest time changes waited for a recovery point since the agent started",
            m.largest_gap.clone(),
        );
        registry.register(
            "point_gap_alert",
            "1 while changes have waited for a point longer than max-point-gap",
            m.gap_alert.clone(),
        );
        registry.register(
            "churn_alert",
            "1 while no round could read all waiting changes for longer than \
             max-point-gap (churn above what replication sustains)",
            m.churn_alert.clone(),
        );
        registry.register(
            "dirty_bytes",
            "Changed bytes waiting to be read back",
            m.dirty_bytes.clone(),
        );
        registry.register(
            "forced_freeze_stall_seconds",
            "How long each forced point held the file systems frozen",
            m.stalls.clone(),
        );
        AgentMetrics { registry, ..m }
    }

    /// Fold in the disks' state and the new freeze stalls.
    pub fn update(&self, disks: &[DiskSample<'_>], freezes: &FreezeStats) {
        let mut st = self.state.lock().expect("metrics lock");
        for d in disks {
            let label = DeviceLabel {
                device: d.device.to_owned(),
            };
            let c = d.counters;
            let prev = st.seen.insert(d.device.to_owned(), c).unwrap_or_default();
            let inc = |f: &Counters, now: u64, before: u64| {
                f.get_or_create(&label).inc_by(now.saturating_sub(before));
            };
            inc(&self.points, c.cuts, prev.cuts);
            inc(&self.forced_points, c.forced_cuts, prev.forced_cuts);
            inc(&self.app_points, c.app_cuts, prev.app_cuts);
            inc(&self.group_points, c.group_cuts, prev.group_cuts);
            inc(&self.group_misses, c.group_misses, prev.group_misses);
            inc(&self.rounds, c.rounds, prev.rounds);
            inc(&self.clean_rounds, c.clean_rounds, prev.clean_rounds);
            inc(&self.raced_reads, c.raced_reads, prev.raced_reads);
            inc(
                &self.lost_completions,
                c.lost_completions,
                prev.lost_completions,
            );
            inc(&self.dropped_events, c.dropped, prev.dropped);
            inc(&self.read_errors, c.read_errors, prev.read_errors);
            inc(
                &self.passthrough_writes,
                c.passthrough_writes,
                prev.passthrough_writes,
            );
            let now = Instant::now();
            if c.read_errors > prev.read_errors {
                st.last_read_error.insert(d.device.to_owned(), now);
            }
            let failing = st
                .last_read_error
                .get(d.device)
                .is_some_and(|t| now.duration_since(*t) < READ_ERROR_ALERT_HOLD);
            self.read_error_alert
                .get_or_create(&label)
                .set(f64::from(u8::from(failing)));
            let recent = st.recent.entry(d.device.to_owned()).or_default();
            for _ in prev.cuts..c.cuts {
                recent.push_back(now);
            }
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
            {
                recent.pop_front();
            }
            self.points_per_minute
                .get_or_create(&label)
                .set(recent.len() as f64);
            self.newest_point_age
                .get_or_create(&label)
                .set(d.point_age.unwrap_or_default().as_secs_f64());
            self.point_gap
                .get_or_create(&label)
                .set(d.point_gap.unwrap_or_default().as_secs_f64());
            self.largest_gap
                .get_or_create(&label)
                .set(d.largest_gap.as_secs_f64());
            self.gap_alert
                .get_or_create(&label)
                .set(f64::from(u8::from(d.gap_alert)));
            self.churn_alert
                .get_or_create(&label)
                .set(f64::from(u8::from(d.churn_alert)));
            self.dirty_bytes
                .get_or_create(&label)
                .set(d.dirty_bytes as f64);
        }
        for &us in &freezes.stalls_us[st.stalls_seen.min(freezes.stalls_us.len())..] {
            self.stalls.observe(us as f64 / 1e6);
        }
        st.stalls_seen = freezes.stalls_us.len();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serve `GET /metrics` on `addr` from a thread.
pub fn spawn_http(addr: SocketAddr, metrics: Arc<AgentMetrics>) -> anyhow::Result<()> {
    ripcord_metrics_http::serve(addr, move || metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_alerts_are_rendered_per_device() {
        let m = AgentMetrics::new();
        let mut c = DiskCounters {
            cuts: 3,
            forced_cuts: 1,
            ..DiskCounters::default()
        };
        let sample = |c: DiskCounters, alert: bool| DiskSample {
            device: "/dev/loop7",
            counters: c,
            dirty_bytes: 4096,
            point_gap: Some(Duration::from_millis(2500)),
            point_age: Some(Duration::from_millis(3500)),
            largest_gap: Duration::from_secs(4),
            gap_alert: alert,
            churn_alert: false,
        };
        let stalls = FreezeStats {
            stalls_us: vec![12_000],
            ..FreezeStats::default()
        };
        m.update(&[sample(c, false)], &stalls);
        c.cuts = 5;
        m.update(&[sample(c, true)], &stalls);
        let text = m.render();
        for want in [
            "ripcord_agent_points_total{device=\"/dev/loop7\"} 5",
            "ripcord_agent_forced_points_total{device=\"/dev/loop7\"} 1",
            "ripcord_agent_points_per_minute{device=\"/dev/loop7\"} 5.0",
            "ripcord_agent_newest_point_age_seconds{device=\"/dev/loop7\"} 3.5",
            "ripcord_agent_point_gap_seconds{device=\"/dev/loop7\"} 2.5",
            "ripcord_agent_point_gap_alert{device=\"/dev/loop7\"} 1.0",
            "ripcord_agent_forced_freeze_stall_seconds_count 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_failed_read_raises_the_read_error_alert_and_passthrough_writes_are_counted() {
        let m = AgentMetrics::new();
        let sample = |c: DiskCounters| DiskSample {
            device: "/dev/loop3",
            counters: c,
            dirty_bytes: 0,
            point_gap: None,
            point_age: None,
            largest_gap: Duration::ZERO,
            gap_alert: false,
            churn_alert: false,
        };
        let stalls = FreezeStats::default();
        let mut c = DiskCounters::default();
        m.update(&[sample(c)], &stalls);
        assert!(
            m.render()
                .contains("ripcord_agent_read_error_alert{device=\"/dev/loop3\"} 0.0"),
            "an alert before any error:\n{}",
            m.render()
        );
        c.read_errors = 2;
        c.passthrough_writes = 1;
        m.update(&[sample(c)], &stalls);
        // Later samples without new errors keep the alert within the hold time.
        m.update(&[sample(c)], &stalls);
        let text = m.render();
        for want in [
            "ripcord_agent_read_errors_total{device=\"/dev/loop3\"} 2",
            "ripcord_agent_read_error_alert{device=\"/dev/loop3\"} 1.0",
            "ripcord_agent_passthrough_writes_total{device=\"/dev/loop3\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Past the hold time, the alert clears by itself.
        m.state
            .lock()
            .unwrap()
            .last_read_error
            .insert("/dev/loop3".into(), Instant::now() - READ_ERROR_ALERT_HOLD);
        m.update(&[sample(c)], &stalls);
        assert!(
            m.render()
                .contains("ripcord_agent_read_error_alert{device=\"/dev/loop3\"} 0.0"),
            "the alert outlived its hold:\n{}",
            m.render()
        );
    }
}
