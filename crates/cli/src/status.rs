//! `ripcord status`: the deployment as the configuration role sees it (its database,
//! `<deployment>/control.db`, opened read-only): process servers with their health and
//! heartbeat, machines and the server each replicates to, every disk with its epoch,
//! acknowledged position, newest recovery point and lag (the age of that point: it keeps
//! growing while a server is silent), and the open alerts.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use ripcord_control::ControlDb;

/// Now, in Unix seconds.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn status(deployment: &Path, json: bool) -> anyhow::Result<()> {
    let path = deployment.join("control.db");
    let db = ControlDb::open_read_only(&path)?;
    let servers = db
        .process_servers()
        .context("reading the process servers")?;
    let machines = db.machines().context("reading the machines")?;
    let disks = db.disks().context("reading the disks")?;
    let alerts = db.open_alerts().context("reading the alerts")?;
    let now = unix_now();
    if json {
        let out = serde_json::json!({
            "servers": servers.iter().map(|s| serde_json::json!({
                "id": s.id,
                "address": s.address,
                "version": s.version,
                "config_role": s.config_role,
                "health": s.shown_health(now),
                "reported_health": s.health,
                "last_heartbeat": s.last_heartbeat,
            })).collect::<Vec<_>>(),
            "machines": machines.iter().map(|m| serde_json::json!({
                "id": m.id,
                "process_server": m.process_server,
                "policy": m.policy,
                "registered_at": m.registered_at,
            })).collect::<Vec<_>>(),
            "disks": disks.iter().map(|d| serde_json::json!({
                "id": d.id,
                "machine": d.machine,
                "device": d.device,
                "size_bytes": d.size_bytes,
                "epoch": d.epoch,
                "acked_seq": d.acked_seq,
                "last_point_at": d.last_point_at,
                "current_at": d.current_at,
                "lag_secs": d.lag_secs(now),
            })).collect::<Vec<_>>(),
            "alerts": alerts.iter().map(|a| serde_json::json!({
                "subject": a.subject,
                "kind": a.kind,
                "severity": a.severity,
                "message": a.message,
                "raised_at": a.raised_at,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let ago = |t: Option<i64>| match t {
        Some(t) => format!("{} s ago", (now - t).max(0)),
        None => "never".to_owned(),
    };
    println!("PROCESS SERVERS");
    println!(
        "{:<20} {:<28} {:<8} {:<7} {:<16}",
        "ID", "ADDRESS", "VERSION", "HEALTH", "HEARTBEAT"
    );
    for s in &servers {
        let shown = s.shown_health(now);
        println!(
            "{:<20} {:<28} {:<8} {:<7} {:<16}{}",
            s.id,
            s.address,
            s.version,
            shown.as_str(),
            ago(s.last_heartbeat),
            if s.config_role { "  (config role)" } else { "" }
        );
    }
    println!();
    println!("DISKS");
    println!(
        "{:<16} {:<18} {:<34} {:<20} {:>6} {:>10} {:>16} {:>10}",
        "MACHINE", "DEVICE", "DISK", "SERVER", "EPOCH", "ACKED", "LAST POINT", "LAG"
    );
    for d in &disks {
        let server = machines
            .iter()
            .find(|m| m.id == d.machine)
            .and_then(|m| m.process_server.as_deref())
            .unwrap_or("-");
        println!(
            "{:<16} {:<18} {:<34} {:<20} {:>6} {:>10} {:>16} {:>10}",
            d.machine,
            d.device,
            d.id,
            server,
            d.epoch,
            d.acked_seq,
            ago(d.last_point_at),
            d.lag_secs(now).map_or("-".to_owned(), |l| format!("{l} s")),
        );
    }
    for m in machines
        .iter()
        .filter(|m| !disks.iter().any(|d| d.machine == m.id))
    {
        println!("{:<16} (no disk reported yet)", m.id);
    }
    println!();
    if alerts.is_empty() {
        println!("ALERTS: none");
    } else {
        println!("ALERTS");
        for a in &alerts {
            println!(
                "{:<8} {:<20} {:<20} {} (since {})",
                a.severity,
                a.subject,
                a.kind,
                a.message,
                ago(Some(a.raised_at))
            );
        }
    }
    Ok(())
}
