//! `ripcord-mt`'s Prometheus metrics (`GET /metrics` on `--metrics-listen`, default
//! 127.0.0.1:9446), every series labelled with the disk and the device:
//! - `ripcord_mt_consistent`: 1 while the device is exactly at a recovery point, 0 while
//!   a step is under way or after one failed;
//! - `ripcord_mt_point_age_seconds`: how old the point the device is at (or leaving) is,
//!   by the agent's clock: the failback lag;
//! - `ripcord_mt_bytes_written_total`, `ripcord_mt_steps_total`,
//!   `ripcord_mt_step_errors_total`.
//!
//! Values are read from the state the loop keeps, at each scrape.

use std::sync::{Arc, Mutex, atomic::AtomicU64};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::state::{ApplyState, now_ns};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Label {
    disk: String,
    device: String,
}

/// What the follow loop reports, shared with the scrape thread.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub state: Option<ApplyState>,
    pub steps: u64,
    pub errors: u64,
}

/// The metrics and the report they are read from.
pub struct Metrics {
    registry: Registry,
    consistent: Family<Label, Gauge>,
    point_age: Family<Label, Gauge<f64, AtomicU64>>,
    bytes: Family<Label, Counter>,
    steps: Family<Label, Counter>,
    errors: Family<Label, Counter>,
    pub report: Arc<Mutex<Report>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ripcord_mt");
        let m = Metrics {
            registry: Registry::default(),
            consistent: Family::default(),
            point_age: Family::default(),
            bytes: Family::default(),
            steps: Family::default(),
            errors: Family::default(),
            report: Arc::default(),
        };
        registry.register(
            "consistent",
            "1 while the device is exactly at a recovery point",
            m.consistent.clone(),
        );
        registry.register(
            "point_age_seconds",
            "Age of the recovery point the device is at or leaving (the failback lag)",
            m.point_age.clone(),
        );
        registry.register(
            "bytes_written",
            "Bytes written to the device by all steps (data and zeros)",
            m.bytes.clone(),
        );
        registry.register("steps", "Steps finished", m.steps.clone());
        registry.register("step_errors", "Steps that failed", m.errors.clone());
        Metrics { registry, ..m }
    }

    /// The text a scrape returns.
    pub fn render(&self) -> String {
        let r = self.report.lock().expect("metrics lock").clone();
        if let Some(s) = &r.state {
            let label = Label {
                disk: s.disk.clone(),
                device: s.device.display().to_string(),
            };
            self.consistent.get_or_create(&label).set(i64::from(
                s.consistent().is_some() && s.last_error.is_none(),
            ));
            if let Some(a) = &s.applied {
                let age = now_ns().saturating_sub(a.time_ns) as f64 / 1e9;
                self.point_age.get_or_create(&label).set(age);
            }
            for (family, value) in [
                (&self.bytes, s.bytes_written),
                (&self.steps, r.steps),
                (&self.errors, r.errors),
            ] {
                let c = family.get_or_create(&label);
                c.inc_by(value.saturating_sub(c.get()));
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PointRef;
    use ripcord_store::DiskId;

    #[test]
    fn the_device_state_is_rendered_per_disk_and_device() {
        let m = Metrics::new();
        assert!(
            !m.render().contains("ripcord_mt_consistent{"),
            "no series before a state"
        );
        let mut s = ApplyState::new(
            &DiskId([1; 16]),
            "/dev/loop9".as_ref(),
            "block 7:9 1".into(),
        );
        s.applied = Some(PointRef {
            id: "1-2".into(),
            epoch: 1,
            cut_id: 2,
            seq: 9,
            time_ns: now_ns() - 3_000_000_000,
            app_consistent: false,
        });
        s.bytes_written = 4096;
        *m.report.lock().unwrap() = Report {
            state: Some(s.clone()),
            steps: 2,
            errors: 1,
        };
        let text = m.render();
        let label = format!("disk=\"{}\",device=\"/dev/loop9\"", DiskId([1; 16]));
        assert!(
            text.contains(&format!("ripcord_mt_consistent{{{label}}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("ripcord_mt_bytes_written_total{{{label}}} 4096")),
            "{text}"
        );
        assert!(
            text.contains(&format!("ripcord_mt_steps_total{{{label}}} 2")),
            "{text}"
        );
        assert!(
            text.contains(&format!("ripcord_mt_step_errors_total{{{label}}} 1")),
            "{text}"
        );
        let age: f64 = text
            .lines()
            .find(|l| l.starts_with("ripcord_mt_point_age_seconds{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .expect("a point age");
        assert!((2.5..60.0).contains(&age), "{age}");
        s.moving_to = s.applied.clone();
        m.report.lock().unwrap().state = Some(s);
        assert!(
            m.render()
                .contains(&format!("ripcord_mt_consistent{{{label}}} 0"))
        );
    }
}
