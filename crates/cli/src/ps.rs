//! `ripcord ps list | remove`: the process servers of a deployment, from the
//! configuration role's database (`<deployment>/control.db`, on the server that runs the
//! config role). Removing a server is an operator action with its audit entry; a server
//! that still has machines is refused until they are moved; the configuration role's own
//! server is never removed. A removed server's reports are refused from then on.

use std::path::Path;

use anyhow::{Context as _, ensure};
use ripcord_control::ControlDb;

use crate::status::unix_now;

pub fn list(deployment: &Path, json: bool) -> anyhow::Result<()> {
    let db = ControlDb::open_read_only(&deployment.join("control.db"))?;
    let servers = db
        .process_servers()
        .context("reading the process servers")?;
    let machines = db.machines().context("reading the machines")?;
    let now = unix_now();
    let count = |id: &str| {
        machines
            .iter()
            .filter(|m| m.process_server.as_deref() == Some(id))
            .count()
    };
    if json {
        let out: Vec<_> = servers
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "address": s.address,
                    "version": s.version,
                    "config_role": s.config_role,
                    "health": s.shown_health(now),
                    "last_heartbeat": s.last_heartbeat,
                    "registered_at": s.registered_at,
                    "machines": count(&s.id),
                    "load": s.load,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<28} {:<8} {:<7} {:>8} {:<14} ROLES",
        "ID", "ADDRESS", "VERSION", "HEALTH", "MACHINES", "HEARTBEAT"
    );
    for s in &servers {
        println!(
            "{:<20} {:<28} {:<8} {:<7} {:>8} {:<14} {}",
            s.id,
            s.address,
            s.version,
            s.shown_health(now).as_str(),
            count(&s.id),
            s.last_heartbeat.map_or("never".to_owned(), |t| format!(
                "{} s ago",
                (now - t).max(0)
            )),
            if s.config_role {
                "config, process"
            } else {
                "process"
            }
        );
    }
    Ok(())
}

pub fn remove(deployment: &Path, server: &str) -> anyhow::Result<()> {
    let mut db = open_for_writing(deployment)?;
    if let Some(row) = db.process_server(server)? {
        ensure!(
            !row.config_role,
            "{server} runs the configuration role itself and cannot be removed"
        );
    }
    db.remove_process_server(server, &operator(), unix_now())?;
    println!(
        "removed process server {server}: its reports are refused from now on; stop it and \
         clear its directory (`cargo xtask deploy --uninstall` for deployed hosts)"
    );
    Ok(())
}

/// The configuration database of `deployment`, for an operator action (never created
/// here: a wrong directory is named).
pub(crate) fn open_for_writing(deployment: &Path) -> anyhow::Result<ControlDb> {
    let path = deployment.join("control.db");
    ensure!(
        path.exists(),
        "no configuration database at {}: give the deployment directory of the server that \
         runs the config role",
        path.display()
    );
    Ok(ControlDb::open(&path)?)
}

/// Who runs this command, for the audit log.
pub(crate) fn operator() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".to_owned())
}
