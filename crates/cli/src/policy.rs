//! `ripcord policy set | list | assign`: replication policies in the configuration role's
//! database (`<deployment>/control.db`, on the server that runs the config role). Setting
//! and assigning are operator actions with their audit entries.
//!
//! What a policy does today: its RPO threshold drives the disk's `rpo` alert, raised by
//! the configuration role within a second of the lag crossing it (a warning, critical at
//! twice the threshold) and cleared below it; a change applies at the next check, with no
//! restart. A machine without a policy gets
//! [`ripcord_control::DEFAULT_RPO_THRESHOLD_SECS`]. The retention and app-consistent
//! interval reach the machine's process server and agent within seconds, without
//! restarts, and override their `retention-secs` (ps.toml) and `app-interval-secs`
//! (agent.toml) while the machine has the policy (process-server `policies` module).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use clap::Subcommand;
use ripcord_control::{ControlDb, DEFAULT_RPO_THRESHOLD_SECS, Policy};

use crate::{
    ps::{open_for_writing, operator},
    status::unix_now,
};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Create or change a policy. A change reaches the alerts of every machine given it
    /// within a second, and their process servers and agents within seconds, without
    /// restarts.
    Set {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The policy's name (letters, digits, `-`, `_`; up to 64).
        #[arg(long)]
        name: String,
        /// Alert when a disk's lag (what a failover to its newest point could lose) passes
        /// this many seconds; critical at twice it.
        #[arg(long, default_value_t = DEFAULT_RPO_THRESHOLD_SECS)]
        rpo_threshold_secs: u64,
        /// Keep recovery points this many hours (the machines' process servers apply it
        /// at their next retention run).
        #[arg(long, default_value_t = 72)]
        retention_hours: u64,
        /// Take an app-consistent point this often (the machines' agents take it within
        /// seconds, overriding their app-interval-secs).
        #[arg(long, default_value_t = 3600)]
        app_consistent_every_secs: u64,
    },
    /// Every policy, and the machines given each.
    List {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give a machine a policy.
    Assign {
        /// The config role's deployment directory (holding control.db).
        #[arg(long, default_value = "/var/lib/ripcord/ps")]
        deployment: PathBuf,
        /// The machine's id (`ripcord status` lists them).
        #[arg(long)]
        machine: String,
        /// The policy's name.
        #[arg(long)]
        policy: String,
    },
}

pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Set {
            deployment,
            name,
            rpo_threshold_secs,
            retention_hours,
            app_consistent_every_secs,
        } => {
            let policy = Policy {
                name,
                rpo_threshold_secs,
                retention_secs: retention_hours.saturating_mul(3600),
                app_interval_secs: app_consistent_every_secs,
            };
            check(&policy)?;
            open_for_writing(&deployment)?.set_policy(&policy, &operator(), unix_now())?;
            println!(
                "policy {}: RPO threshold {} s, retention {} h, app-consistent points every {} s",
                policy.name, rpo_threshold_secs, retention_hours, app_consistent_every_secs
            );
            Ok(())
        }
        PolicyCommand::List { deployment, json } => list(&deployment, json),
        PolicyCommand::Assign {
            deployment,
            machine,
            policy,
        } => {
            let mut db = open_for_writing(&deployment)?;
            db.assign_policy(&machine, &policy, &operator(), unix_now())
                .with_context(|| {
                    let known: Vec<String> = db
                        .policies()
                        .map(|ps| ps.into_iter().map(|p| p.name).collect())
                        .unwrap_or_default();
                    format!(
                        "giving machine {machine:?} policy {policy:?} (policies: {})",
                        if known.is_empty() {
                            "none yet, `ripcord policy set` makes one".to_owned()
                        } else {
                            known.join(", ")
                        }
                    )
                })?;
            println!("machine {machine}: policy {policy}");
            Ok(())
        }
    }
}

/// The bounds a policy must keep (refused before the database is touched).
fn check(p: &Policy) -> anyhow::Result<()> {
    ensure!(
        !p.name.is_empty()
            && p.name.len() <= 64
            && p.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "policy name {:?}: use 1 to 64 letters, digits, '-' or '_'",
        p.name
    );
    ensure!(
        (10..=7 * 24 * 3600).contains(&p.rpo_threshold_secs),
        "--rpo-threshold-secs {} is outside 10 s..7 days",
        p.rpo_threshold_secs
    );
    ensure!(
        ripcord_control::POLICY_RETENTION_SECS.contains(&p.retention_secs),
        "--retention-hours {} is outside 1..87600 (10 years)",
        p.retention_secs / 3600
    );
    ensure!(
        ripcord_control::POLICY_APP_INTERVAL_SECS.contains(&p.app_interval_secs),
        "--app-consistent-every-secs {} is outside 60 s..7 days",
        p.app_interval_secs
    );
    Ok(())
}

fn list(deployment: &Path, json: bool) -> anyhow::Result<()> {
    let db = ControlDb::open_read_only(&deployment.join("control.db"))?;
    let policies = db.policies().context("reading the policies")?;
    let machines = db.machines().context("reading the machines")?;
    let given = |name: &str| -> Vec<&str> {
        machines
            .iter()
            .filter(|m| m.policy.as_deref() == Some(name))
            .map(|m| m.id.as_str())
            .collect()
    };
    if json {
        let out: Vec<_> = policies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "rpo_threshold_secs": p.rpo_threshold_secs,
                    "retention_secs": p.retention_secs,
                    "app_consistent_every_secs": p.app_interval_secs,
                    "machines": given(&p.name),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>10} {:>10} {:>10} MACHINES",
        "POLICY", "RPO-ALERT", "RETENTION", "APP-EVERY"
    );
    for p in &policies {
        println!(
            "{:<20} {:>8} s {:>8} h {:>8} s {}",
            p.name,
            p.rpo_threshold_secs,
            p.retention_secs / 3600,
            p.app_interval_secs,
            given(&p.name).join(", ")
        );
    }
    let without: Vec<&str> = machines
        .iter()
        .filter(|m| m.policy.is_none())
        .map(|m| m.id.as_str())
        .collect();
    if !without.is_empty() {
        println!(
            "(no policy: RPO alert at {DEFAULT_RPO_THRESHOLD_SECS} s) {}",
            without.join(", ")
        );
    }
    Ok(())
}
