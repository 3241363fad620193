//! Policies on the process server (issue 15, item 3): what the policy the configuration
//! role gives each machine (`ripcord policy set | assign`) sets for its process server
//! (how long the store keeps its recovery points) and for its agent (how often it takes an
//! application-consistent point). A change reaches both within seconds, without restarts.
//!
//! On the server that runs the role, [`watch_control_db`] reads the policies every
//! `db_watch::REFRESH`; a server that joined the role gets its machines' policies in the
//! reply to each report ([`Relay`]). Sessions push a machine's settings to its agent on the
//! control stream (`PolicyUpdate`, protocol 6) at once and on every change; uploaders look
//! up their machine's retention each time retention runs.
//!
//! # Invariants
//! - A machine without a policy gets `PolicyUpdate { assigned: false }`: its agent's own
//!   configuration applies again, and the server's `retention-secs` applies to its disks.
//! - **Retention waits until the policies are known** (read from the database, or relayed
//!   once): deleting by the server's default while a machine's longer policy is merely
//!   unknown (a joined server started while the role is unreachable) cannot be undone.
//! - A relay that fails (the role unreachable) keeps the last policies it had: data never
//!   depends on the configuration role being up.
//! - Values are bounded again where they are used ([`ripcord_control::POLICY_RETENTION_SECS`],
//!   [`ripcord_control::POLICY_APP_INTERVAL_SECS`]): a relayed value is not trusted.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use ripcord_proto::{MAX_POLICY_APP_INTERVAL_SECS, PolicyUpdate};
use ripcord_transport::control::{
    AssignedMachine, MachinePolicy, MachinePolicySettings, ReportAccepted,
};
use tokio::sync::watch;

/// Each machine's policy settings (machines without a policy are absent), once known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyMap {
    /// Whether the policies were read or relayed at least once (see the module doc).
    pub known: bool,
    /// Each machine's settings.
    pub by_machine: HashMap<String, MachinePolicySettings>,
}

/// The shared, latest [`PolicyMap`].
pub type Policies = Arc<PolicyMap>;

fn known(by_machine: HashMap<String, MachinePolicySettings>) -> Policies {
    Arc::new(PolicyMap {
        known: true,
        by_machine,
    })
}

/// The policy settings of every machine of the configuration database that has a policy.
pub fn read_policies(db: &ripcord_control::ControlDb) -> anyhow::Result<Policies> {
    Ok(known(
        db.machine_policies()?
            .into_iter()
            .map(|(machine, p)| {
                let settings = MachinePolicySettings {
                    retention_secs: p.retention_secs,
                    app_interval_secs: p.app_interval_secs,
                };
                (machine, settings)
            })
            .collect(),
    ))
}

/// Reads the policies of the configuration database at `path` every
/// `db_watch::REFRESH` (see `crate::db_watch`).
pub fn watch_control_db(path: &Path) -> watch::Receiver<Policies> {
    crate::db_watch::watch(path, "policies", read_policies)
}

/// No policies ever: a server with no source of them (its own settings apply).
pub fn none() -> watch::Receiver<Policies> {
    watch::channel(known(HashMap::new())).1
}

/// What `machine`'s agent is told.
pub fn update_for(policies: &Policies, machine: &str) -> PolicyUpdate {
    match policies.by_machine.get(machine) {
        Some(p) => PolicyUpdate {
            assigned: true,
            app_interval_secs: match p.app_interval_secs {
                0 => 0,
                secs => u32::try_from(clamp(secs, &ripcord_control::POLICY_APP_INTERVAL_SECS))
                    .unwrap_or(MAX_POLICY_APP_INTERVAL_SECS)
                    .min(MAX_POLICY_APP_INTERVAL_SECS),
            },
        },
        None => PolicyUpdate {
            assigned: false,
            app_interval_secs: 0,
        },
    }
}

/// How long `machine`'s recovery points are kept: its policy's retention, else
/// `configured` (the server's `retention-secs`); `None` while the policies are unknown.
pub fn retention_for(policies: &Policies, machine: &str, configured: Duration) -> Option<Duration> {
    if !policies.known {
        return None;
    }
    Some(policies.by_machine.get(machine).map_or(configured, |p| {
        Duration::from_secs(clamp(
            p.retention_secs,
            &ripcord_control::POLICY_RETENTION_SECS,
        ))
    }))
}

fn clamp(v: u64, range: &std::ops::RangeInclusive<u64>) -> u64 {
    v.clamp(*range.start(), *range.end())
}

/// The policies of `machines` (those assigned to a joined server), as the configuration
/// role relays them in its reply to the server's report.
pub fn relayed(policies: &Policies, machines: &[AssignedMachine]) -> Vec<MachinePolicy> {
    machines
        .iter()
        .filter_map(|m| {
            Some(MachinePolicy {
                machine: m.id.clone(),
                settings: *policies.by_machine.get(&m.id)?,
            })
        })
        .collect()
}

/// A joined server's side of the relay: its machines' policies from each accepted report.
pub struct Relay {
    tx: watch::Sender<Policies>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            tx: watch::channel(Policies::default()).0,
        }
    }
}

impl Relay {
    /// A receiver of the relayed policies.
    pub fn subscribe(&self) -> watch::Receiver<Policies> {
        self.tx.subscribe()
    }

    /// Takes an accepted report's policies.
    pub fn update(&mut self, accepted: &ReportAccepted) {
        let map = accepted
            .policies
            .iter()
            .map(|p| (p.machine.clone(), p.settings))
            .collect();
        crate::db_watch::send_if_changed(&self.tx, known(map));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> Policies {
        known(HashMap::from([(
            "db1".to_owned(),
            MachinePolicySettings {
                retention_secs: 7200,
                app_interval_secs: u64::MAX,
            },
        )]))
    }

    #[test]
    fn a_machine_with_a_policy_gets_its_settings_and_one_without_gets_the_defaults() {
        let p = policies();
        let u = update_for(&p, "db1");
        assert!(u.assigned);
        assert_eq!(u.app_interval_secs, MAX_POLICY_APP_INTERVAL_SECS, "clamped");
        assert!(
            ripcord_proto::Message::PolicyUpdate(u).validate().is_ok(),
            "what a session sends is valid on the wire"
        );
        let none = update_for(&p, "web1");
        assert!(!none.assigned && none.app_interval_secs == 0);
        let configured = Duration::from_secs(72 * 3600);
        assert_eq!(
            retention_for(&p, "db1", configured),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(retention_for(&p, "web1", configured), Some(configured));
        // Unknown policies: no retention by the server's default meanwhile.
        assert_eq!(retention_for(&Policies::default(), "db1", configured), None);
        // A relayed value outside the bounds is brought back inside them.
        let hostile = known(HashMap::from([(
            "db1".to_owned(),
            MachinePolicySettings {
                retention_secs: 1,
                app_interval_secs: 1,
            },
        )]));
        assert_eq!(
            retention_for(&hostile, "db1", configured),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(update_for(&hostile, "db1").app_interval_secs, 60);
    }

    #[test]
    fn a_joined_server_relays_only_its_machines_policies() {
        let machine = |id: &str| AssignedMachine {
            id: id.to_owned(),
            cert_sha256: String::new(),
        };
        let relayed = relayed(&policies(), &[machine("db1"), machine("web1")]);
        assert_eq!(relayed.len(), 1);
        let mut relay = Relay::default();
        let rx = relay.subscribe();
        assert!(!rx.borrow().known, "nothing relayed yet");
        relay.update(&ReportAccepted {
            machines: Vec::new(),
            groups: Vec::new(),
            policies: relayed,
            clock: None,
        });
        assert!(rx.borrow().known);
        assert_eq!(rx.borrow().by_machine["db1"].retention_secs, 7200);
    }
}
