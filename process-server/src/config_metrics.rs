//! The configuration role's Prometheus metrics: every figure of its status page and of
//! `ripcord status`, for the whole deployment, read from the configuration database at
//! each scrape (on the metrics thread, read-only) and appended to this server's own
//! metrics on `GET /metrics`.
//!
//! - `ripcord_config_server_health{server}`: 0 green, 1 orange, 2 red (red when silent
//!   for a minute, as shown);
//! - `ripcord_config_server_heartbeat_age_seconds{server}`;
//! - `ripcord_config_server_machines{server}`: machines assigned;
//! - `ripcord_config_disk_lag_seconds{disk,machine}`: the age of the newest recovery
//!   point; `ripcord_config_disk_acked_seq{disk,machine}`;
//! - `ripcord_config_open_alerts{severity}`.
//!
//! Series of servers and disks that are gone disappear (the families are rebuilt at each
//! scrape).

use std::path::Path;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use ripcord_control::{ControlDb, Health};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabel {
    disk: String,
    machine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabel {
    severity: String,
}

/// The metrics text of the deployment in the database at `db`, OpenMetrics without the
/// final `# EOF` (the caller appends it to its own). An unreadable database yields
/// `ripcord_config_up 0`.
pub fn render(db: &Path) -> String {
    let mut registry = Registry::with_prefix("ripcord_config");
    let up = Gauge::<i64>::default();
    registry.register(
        "up",
        "Whether the configuration database could be read",
        up.clone(),
    );
    if let Err(e) = fill(&mut registry, db) {
        tracing::debug!("configuration metrics: {e:#}");
    } else {
        up.set(1);
    }
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        return String::new();
    }
    text.strip_suffix("# EOF\n").unwrap_or(&text).to_owned()
}

fn fill(registry: &mut Registry, db: &Path) -> anyhow::Result<()> {
    let db = ControlDb::open_read_only(db)?;
    let now = crate::control::unix_now();
    let health = Family::<ServerLabel, Gauge>::default();
    let heartbeat = Family::<ServerLabel, Gauge>::default();
    let machines = Family::<ServerLabel, Gauge>::default();
    let lag = Family::<DiskLabel, Gauge>::default();
    let acked = Family::<DiskLabel, Gauge>::default();
    let alerts = Family::<SeverityLabel, Gauge>::default();
    let assigned = db.machines()?;
    for s in db.process_servers()? {
        let label = ServerLabel {
            server: s.id.clone(),
        };
        let shown = match s.last_heartbeat {
            Some(t) if now - t <= 60 => s.health,
            _ => Health::Red,
        };
        health.get_or_create(&label).set(match shown {
            Health::Green => 0,
            Health::Orange => 1,
            Health::Red => 2,
        });
        if let Some(t) = s.last_heartbeat {
            heartbeat.get_or_create(&label).set((now - t).max(0));
        }
        let count = assigned
            .iter()
            .filter(|m| m.process_server.as_deref() == Some(s.id.as_str()))
            .count();
        machines.get_or_create(&label).set(count as i64);
    }
    for d in db.disks()? {
        let label = DiskLabel {
            disk: d.id.clone(),
            machine: d.machine.clone(),
        };
        if let Some(l) = d.lag_secs(now) {
            lag.get_or_create(&label).set(l);
        }
        acked
            .get_or_create(&label)
            .set(i64::try_from(d.acked_seq).unwrap_or(i64::MAX));
    }
    for severity in ["warning", "critical"] {
        alerts
            .get_or_create(&SeverityLabel {
                severity: severity.to_owned(),
            })
            .set(0);
    }
    for a in db.open_alerts()? {
        alerts
            .get_or_create(&SeverityLabel {
                severity: a.severity.clone(),
            })
            .inc();
    }
    registry.register(
        "server_health",
        "Each process server's health: 0 green, 1 orange, 2 red (red when silent for a minute)",
        health,
    );
    registry.register(
        "server_heartbeat_age_seconds",
        "Seconds since each process server's last heartbeat",
        heartbeat,
    );
    registry.register(
        "server_machines",
        "Machines assigned to each process server",
        machines,
    );
    registry.register(
        "disk_lag_seconds",
        "Age of each disk's newest recovery point",
        lag,
    );
    registry.register(
        "disk_acked_seq",
        "Each disk's last acknowledged batch",
        acked,
    );
    registry.register("open_alerts", "Open alerts by severity", alerts);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_control::{DiskReport, ProcessServer};

    #[test]
    fn every_figure_of_the_deployment_is_a_series() {
        let tmp = tempfile::tempdir().unwrap();
        let path = crate::control::db_path(tmp.path());
        let now = crate::control::unix_now();
        {
            let mut db = ControlDb::open(&path).unwrap();
            for (id, beat) in [("ps1", Some(now)), ("ps2", None)] {
                db.upsert_process_server(&ProcessServer {
                    id: id.into(),
                    address: format!("{id}:9443"),
                    version: "0.1.0".into(),
                    cert_sha256: "00".into(),
                    config_role: id == "ps1",
                    registered_at: 0,
                    last_heartbeat: None,
                    health: Health::Red,
                    fingerprint: String::new(),
                    load: None,
                })
                .unwrap();
                if let Some(at) = beat {
                    db.heartbeat(id, at, Health::Orange).unwrap();
                }
            }
            db.register_machine("db01", "aa", 0, "ps1").unwrap();
            db.record_disks(&[DiskReport {
                id: "d1".into(),
                machine: "db01".into(),
                device: "/dev/sdb".into(),
                size_bytes: 1,
                epoch: Some(1),
                acked_seq: Some(7),
                last_point_at: Some(now - 12),
                current_at: None,
            }])
            .unwrap();
            db.raise_alert(
                "ps1",
                "health-cpu",
                ripcord_control::Severity::Warning,
                "hot",
                now,
            )
            .unwrap();
        }
        let text = render(&path);
        for line in [
            "ripcord_config_up 1",
            "ripcord_config_server_health{server=\"ps1\"} 1",
            "ripcord_config_server_health{server=\"ps2\"} 2",
            "ripcord_config_server_machines{server=\"ps1\"} 1",
            "ripcord_config_disk_acked_seq{disk=\"d1\",machine=\"db01\"} 7",
            "ripcord_config_open_alerts{severity=\"warning\"} 1",
            "ripcord_config_open_alerts{severity=\"critical\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(
            text.lines().any(|l| l
                .strip_prefix("ripcord_config_disk_lag_seconds{disk=\"d1\",machine=\"db01\"} ")
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| (12..15).contains(&v))),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "the caller ends the text");
        assert!(render(&tmp.path().join("missing.db")).contains("ripcord_config_up 0"));
    }
}
