//! `ripcord group create | set | add | remove | delete | list`: consistency groups in the
//! configuration role's database (`<deployment>/control.db`, on the server that runs the
//! config role). Every change is an operator action with its audit entry.
//!
//! A consistency group is a set of machines whose disks share **group recovery points**:
//! crash-consistent points of every member disk at one common instant, so an application
//! spread over several machines (a database and the servers that write to it) fails over
//! to one moment rather than to a point per disk.
//!
//! - **Interval**: every interval, the coordinator (the configuration role) schedules a
//!   group point at an instant that is a multiple of the interval on its own clock. Each
//!   member machine's agent cuts its disks at that instant of its own clock, corrected by
//!   the offset it measured against the coordinator's clock.
//! - **Max error**: each point carries a clock-error bound, how far apart in real time its
//!   members' cuts may lie (the offsets' measurement error plus how late each cut was
//!   taken). A point whose bound exceeds the group's max error is not offered.
//!
//! A change (timing or members) reaches the agents within a few seconds, without restarts.
//! A machine is in at most one group; a group holds at most
//! [`ripcord_control::MAX_GROUP_MACHINES`] machines and 256 disks.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use clap::Subcommand;
use ripcord_control::{
    ControlDb, ControlError, GROUP_INTERVAL_MS, GROUP_MAX_ERROR_US, MAX_GROUP_MACHINES,
};

use crate::{
    ps::{open_for_writing, operator},
    status::unix_now,
};

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a consistency group: its machines' disks get recovery points at common
    /// instants (group points). Add machines with `ripcord group add`.
    Create {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The group's name (letters, digits, `-`, `_`; up to 64).
        #[arg(long)]
        name: String,
        /// A group point every this many seconds, at instants that are multiples of it on
        /// the coordinator's clock (1 to 3600; decimals allowed).
        #[arg(long, default_value_t = 5.0)]
        interval_secs: f64,
        /// Offer a group point only if its members' cuts lie at most this many milliseconds
        /// apart in real time (its clock-error bound; 0.1 to 10000).
        #[arg(long, default_value_t = 50.0)]
        max_error_ms: f64,
    },
    /// Change a group's interval, max error or app-every (what is not given stays). The agents take
    /// the change within a few seconds, without restarts.
    Set {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The group's name.
        #[arg(long)]
        name: String,
        /// A group point every this many seconds (1 to 3600).
        #[arg(long)]
        interval_secs: Option<f64>,
        /// Offer a group point only within this clock-error bound, in milliseconds (0.1 to
        /// 10000).
        #[arg(long)]
        max_error_ms: Option<f64>,
        /// Make every N-th group point application-consistent (every member runs its
        /// hooks and freezes its file systems before the instant, and cuts at it while
        /// frozen); 0 for none.
        #[arg(long)]
        app_every: Option<u32>,
    },
    /// Add machines to a group. A machine is in at most one group: take it out of its
    /// group first (`ripcord group remove`). Machines are added in the order given; on a
    /// refusal the ones before it stay added.
    Add {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The group's name.
        #[arg(long)]
        name: String,
        /// A registered machine's id (`ripcord status` lists them); give it again for more.
        #[arg(long, required = true)]
        machine: Vec<String>,
    },
    /// Take a machine out of a group: its disks get points of their own only.
    Remove {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The group's name.
        #[arg(long)]
        name: String,
        /// The machine's id.
        #[arg(long)]
        machine: String,
    },
    /// Delete a group: its machines stay protected, in no group. Group points already
    /// taken stay until retention removes them.
    Delete {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The group's name.
        #[arg(long)]
        name: String,
    },
    /// The group's points in the target store: instants at which every member disk has a
    /// recovery point, with their clock-error bound (read from the store alone).
    Points(crate::group_points::PointsArgs),
    /// Every group: id, interval, max error, and its machines; then the machines in none.
    List {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::Points(_) => {
            anyhow::bail!("`group points` reads the store: it is run by `group_points::list`")
        }
        GroupCommand::Create {
            deployment,
            name,
            interval_secs,
            max_error_ms,
        } => {
            let interval_ms = interval_ms(interval_secs)?;
            let max_error_us = max_error_us(max_error_ms)?;
            let id = open_for_writing(&deployment)?.create_group(
                &name,
                interval_ms,
                max_error_us,
                &operator(),
                unix_now(),
            )?;
            println!(
                "group {name} ({id}): a point every {}, max error {}; add machines with \
                 `ripcord group add --name {name} --machine M`",
                secs(interval_ms),
                millis(max_error_us)
            );
            Ok(())
        }
        GroupCommand::Set {
            deployment,
            name,
            interval_secs,
            max_error_ms,
            app_every,
        } => {
            ensure!(
                interval_secs.is_some() || max_error_ms.is_some() || app_every.is_some(),
                "nothing to change: give --interval-secs, --max-error-ms, --app-every"
            );
            let new_interval = interval_secs.map(interval_ms).transpose()?;
            let new_error = max_error_ms.map(max_error_us).transpose()?;
            let mut db = open_for_writing(&deployment)?;
            let group = db
                .groups()
                .context("reading the groups")?
                .into_iter()
                .find(|g| g.name == name)
                .ok_or_else(|| ControlError::UnknownGroup(name.clone()))?;
            let interval_ms = new_interval.unwrap_or(group.interval_ms);
            let max_error_us = new_error.unwrap_or(group.max_error_us);
            // Checked before anything is written: a refusal changes nothing.
            let every = app_every.unwrap_or(group.app_every);
            ensure!(
                every == 0
                    || interval_ms.saturating_mul(u64::from(every))
                        >= ripcord_control::MIN_GROUP_APP_PERIOD_MS,
                "an application-consistent point every {every} points of {} is more often than \
                 every {}: each pauses replication on its members for 2 s",
                secs(interval_ms),
                secs(ripcord_control::MIN_GROUP_APP_PERIOD_MS)
            );
            if new_interval.is_some() || new_error.is_some() {
                db.set_group_timing(&name, interval_ms, max_error_us, &operator(), unix_now())?;
            }
            if let Some(n) = app_every {
                db.set_group_app_every(&name, n, &operator(), unix_now())?;
            }
            let app_every = app_every.unwrap_or(group.app_every);
            println!(
                "group {name}: a point every {}, max error {}, application-consistent {}",
                secs(interval_ms),
                millis(max_error_us),
                match app_every {
                    0 => "never".to_owned(),
                    n => format!("every {n} points"),
                }
            );
            Ok(())
        }
        GroupCommand::Add {
            deployment,
            name,
            machine,
        } => {
            let mut db = open_for_writing(&deployment)?;
            let mut added: Vec<&str> = Vec::new();
            for m in &machine {
                let new = db
                    .add_to_group(&name, m, &operator(), unix_now())
                    .with_context(|| {
                        format!(
                            "adding machine {m:?} to group {name:?} ({})",
                            if added.is_empty() {
                                "none added".to_owned()
                            } else {
                                format!("added before it: {}", added.join(", "))
                            }
                        )
                    })?;
                if new {
                    added.push(m);
                    println!("group {name}: added machine {m}");
                } else {
                    println!("group {name}: machine {m} is a member already");
                }
            }
            Ok(())
        }
        GroupCommand::Remove {
            deployment,
            name,
            machine,
        } => {
            open_for_writing(&deployment)?.remove_from_group(
                &name,
                &machine,
                &operator(),
                unix_now(),
            )?;
            println!("group {name}: removed machine {machine}");
            Ok(())
        }
        GroupCommand::Delete { deployment, name } => {
            open_for_writing(&deployment)?.delete_group(&name, &operator(), unix_now())?;
            println!("deleted group {name}: its machines are in no group now");
            Ok(())
        }
        GroupCommand::List { deployment, json } => list(&deployment, json),
    }
}

/// `--interval-secs` in milliseconds, refused outside the database's bounds.
fn interval_ms(secs: f64) -> anyhow::Result<u64> {
    // `as` saturates: a negative or NaN value becomes 0, an infinite one u64::MAX.
    let ms = (secs * 1000.0).round() as u64;
    ensure!(
        GROUP_INTERVAL_MS.contains(&ms),
        "--interval-secs {secs} is outside {}..={} s",
        GROUP_INTERVAL_MS.start() / 1000,
        GROUP_INTERVAL_MS.end() / 1000
    );
    Ok(ms)
}

/// `--max-error-ms` in microseconds, refused outside the database's bounds.
fn max_error_us(ms: f64) -> anyhow::Result<u64> {
    let us = (ms * 1000.0).round() as u64;
    ensure!(
        GROUP_MAX_ERROR_US.contains(&us),
        "--max-error-ms {ms} is outside {}..={} ms",
        millis_value(*GROUP_MAX_ERROR_US.start()),
        millis_value(*GROUP_MAX_ERROR_US.end())
    );
    Ok(us)
}

/// Milliseconds as seconds, for people: "5 s", "2.5 s".
fn secs(ms: u64) -> String {
    format!("{} s", ms as f64 / 1000.0)
}

/// Microseconds as milliseconds, for people: "50 ms", "0.1 ms".
fn millis(us: u64) -> String {
    format!("{} ms", millis_value(us))
}

fn millis_value(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn list(deployment: &Path, json: bool) -> anyhow::Result<()> {
    let db = ControlDb::open_read_only(&deployment.join("control.db"))?;
    let groups = db.groups().context("reading the groups")?;
    let machines = db.machines().context("reading the machines")?;
    if json {
        let out: Vec<_> = groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "name": g.name,
                    "id": g.id.to_string(),
                    "interval_ms": g.interval_ms,
                    "max_error_us": g.max_error_us,
                    "machines": g.machines,
                    "created_at": g.created_at,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<32} {:>9} {:>10} MACHINES",
        "GROUP", "ID", "INTERVAL", "MAX-ERROR"
    );
    for g in &groups {
        println!(
            "{:<20} {:<32} {:>9} {:>10} {}",
            g.name,
            g.id,
            secs(g.interval_ms),
            millis(g.max_error_us),
            if g.machines.is_empty() {
                "(none)".to_owned()
            } else {
                format!(
                    "{} ({}/{MAX_GROUP_MACHINES})",
                    g.machines.join(", "),
                    g.machines.len()
                )
            }
        );
    }
    let grouped = |id: &str| groups.iter().any(|g| g.machines.iter().any(|m| m == id));
    let without: Vec<&str> = machines
        .iter()
        .map(|m| m.id.as_str())
        .filter(|id| !grouped(id))
        .collect();
    if !without.is_empty() {
        println!("(in no group) {}", without.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ripcord_control::{Health, ProcessServer};

    use super::*;

    #[test]
    fn the_flags_units_become_the_databases_and_bounds_name_the_flag() {
        assert_eq!(interval_ms(5.0).unwrap(), 5_000);
        assert_eq!(interval_ms(2.5).unwrap(), 2_500);
        assert_eq!(max_error_us(50.0).unwrap(), 50_000);
        assert_eq!(max_error_us(0.1).unwrap(), 100);
        for bad in [0.5, 3600.5, -1.0, f64::NAN, f64::INFINITY] {
            let err = interval_ms(bad).unwrap_err().to_string();
            assert!(
                err.contains("--interval-secs") && err.contains("1..=3600 s"),
                "{err}"
            );
        }
        for bad in [0.05, 10_000.5, -3.0] {
            let err = max_error_us(bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("--max-error-ms {bad} ")) && err.contains("0.1..=10000 ms"),
                "{err}"
            );
        }
        assert_eq!(
            (secs(5_000), millis(50_000)),
            ("5 s".into(), "50 ms".into())
        );
    }

    #[test]
    fn the_commands_change_the_configuration_database() {
        let tmp = tempfile::tempdir().unwrap();
        let deployment = tmp.path().to_path_buf();
        {
            let mut db = ControlDb::open(&deployment.join("control.db")).unwrap();
            db.upsert_process_server(&ProcessServer {
                id: "ps1".into(),
                address: "ps1:4433".into(),
                version: "0.1.0".into(),
                cert_sha256: "c".into(),
                config_role: true,
                registered_at: 1,
                last_heartbeat: None,
                health: Health::Red,
                fingerprint: String::new(),
                load: None,
            })
            .unwrap();
            for m in ["db01", "web01", "web02"] {
                db.register_machine(m, "c", 1, "ps1").unwrap();
            }
        }
        let name = || "shop".to_owned();
        run(GroupCommand::Create {
            deployment: deployment.clone(),
            name: name(),
            interval_secs: 5.0,
            max_error_ms: 50.0,
        })
        .unwrap();
        run(GroupCommand::Set {
            deployment: deployment.clone(),
            name: name(),
            interval_secs: None,
            max_error_ms: Some(20.0),
            app_every: Some(60),
        })
        .unwrap();
        run(GroupCommand::Add {
            deployment: deployment.clone(),
            name: name(),
            machine: vec!["web01".into(), "db01".into(), "web02".into()],
        })
        .unwrap();
        run(GroupCommand::Remove {
            deployment: deployment.clone(),
            name: name(),
            machine: "web02".into(),
        })
        .unwrap();
        let err = run(GroupCommand::Add {
            deployment: deployment.clone(),
            name: name(),
            machine: vec!["web02".into(), "ghost".into()],
        })
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("\"ghost\"") && text.contains("added before it: web02"),
            "{text}"
        );
        let err = run(GroupCommand::Set {
            deployment: deployment.clone(),
            name: "nope".into(),
            interval_secs: Some(10.0),
            max_error_ms: None,
            app_every: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("no group \"nope\""), "{err}");

        let db = ControlDb::open_read_only(&deployment.join("control.db")).unwrap();
        let groups = db.groups().unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(
            (groups[0].interval_ms, groups[0].max_error_us),
            (5_000, 20_000),
            "set kept the interval it was not given"
        );
        assert_eq!(groups[0].app_every, 60);
        assert_eq!(groups[0].machines, ["db01", "web01", "web02"]);
        list(&deployment, false).unwrap();
        list(&deployment, true).unwrap();
        drop(db);

        run(GroupCommand::Delete {
            deployment: deployment.clone(),
            name: name(),
        })
        .unwrap();
        let db = ControlDb::open_read_only(&deployment.join("control.db")).unwrap();
        assert!(db.groups().unwrap().is_empty());
        let actions: Vec<_> = db
            .audit_log(20)
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(
            actions,
            [
                "create-group",
                "set-group-timing",
                "set-group-app-every",
                "add-to-group",
                "add-to-group",
                "add-to-group",
                "remove-from-group",
                "add-to-group",
                "delete-group"
            ]
        );
    }
}
