//! Consistency groups on the process server: the coordinator's schedule for each machine,
//! handed to its agent on the control stream, and the server's clock for the agent's
//! probes (issue 16, decision 0027).
//!
//! The coordinator is the configuration role: its clock is the group's clock, and its
//! database (`ripcord group ...`) says which machines are in which group. On the server
//! that runs the role, [`watch_control_db`] reads the groups every [`REFRESH`]; a server
//! that joined the role gets its machines' schedules in the reply to each report
//! ([`Relay`]) and tells its agents how far its own clock is from the coordinator's.
//!
//! # Invariants
//! - **No schedule until every member's disks are known.** A group point must hold every
//!   member's disks; the count stamped in each cut (`members`) is the sum over the member
//!   machines of the disks the configuration database knows. A member with no disk known
//!   yet (registered, not yet reported) would make a smaller group look complete, so the
//!   whole group is left unscheduled until it has reported.
//! - A machine in no group gets a schedule with `members = 0`: an agent that was in a
//!   group stops stamping within [`REFRESH`] of its removal.
//! - Reading the database never blocks the data path: a thread of its own reads it, and
//!   the sessions only look at the last map ([`tokio::sync::watch`]).

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use ripcord_proto::{GroupSchedule, MAX_GROUP_MEMBERS};
use tokio::sync::watch;

pub use crate::db_watch::REFRESH;

/// Each machine's schedule (machines in no group are absent).
pub type Schedules = Arc<HashMap<String, GroupSchedule>>;

/// The schedule a machine's agent gets: its group's, or "no group".
pub fn schedule_for(schedules: &Schedules, machine: &str) -> GroupSchedule {
    schedules.get(machine).copied().unwrap_or(GroupSchedule {
        group: ripcord_proto::GroupId([0; 16]),
        interval_ms: 0,
        members: 0,
        max_error_ns: 0,
        coordinator_offset_ns: 0,
        coordinator_error_ns: 0,
        app_every: 0,
    })
}

/// The schedules of every group in the configuration database at `db`, with this
/// server's clock as the coordinator's.
pub fn read_schedules(db: &ripcord_control::ControlDb) -> anyhow::Result<Schedules> {
    let mut disks: HashMap<String, usize> = HashMap::new();
    for d in db.disks()? {
        *disks.entry(d.machine).or_default() += 1;
    }
    let mut out = HashMap::new();
    for g in db.groups()? {
        let counts: Vec<usize> = g
            .machines
            .iter()
            .map(|m| disks.get(m).copied().unwrap_or(0))
            .collect();
        if counts.is_empty() || counts.contains(&0) {
            continue; // see the module invariants
        }
        let total: usize = counts.iter().sum();
        let Ok(members) = u16::try_from(total) else {
            continue;
        };
        if members > MAX_GROUP_MEMBERS {
            tracing::warn!(
                group = g.name,
                disks = total,
                "consistency group spans more disks than a group point may hold \
                 ({MAX_GROUP_MEMBERS}): not scheduled"
            );
            continue;
        }
        let schedule = GroupSchedule {
            group: g.id,
            interval_ms: g.interval_ms,
            members,
            max_error_ns: g.max_error_us.saturating_mul(1000),
            coordinator_offset_ns: 0,
            coordinator_error_ns: 0,
            app_every: g.app_every,
        };
        for m in &g.machines {
            out.insert(m.clone(), schedule);
        }
    }
    Ok(Arc::new(out))
}

/// Reads the groups of the configuration database at `path` every [`REFRESH`] (see
/// `crate::db_watch`).
pub fn watch_control_db(path: &Path) -> watch::Receiver<Schedules> {
    crate::db_watch::watch(path, "consistency-groups", read_schedules)
}

/// The schedules of `machines` (those assigned to a joined server), as the configuration
/// role relays them in its reply to the server's report.
pub fn relayed(
    schedules: &Schedules,
    machines: &[ripcord_transport::control::AssignedMachine],
) -> Vec<ripcord_transport::control::MachineGroup> {
    machines
        .iter()
        .filter_map(|m| {
            let s = schedules.get(&m.id)?;
            Some(ripcord_transport::control::MachineGroup {
                machine: m.id.clone(),
                group: s.group.to_string(),
                interval_ms: s.interval_ms,
                members: s.members,
                max_error_ns: s.max_error_ns,
                app_every: s.app_every,
            })
        })
        .collect()
}

/// Most time between two reports of a joined server (its health tick is 5 s by default):
/// the clock offset measured by one report is used until the next, and its error grows
/// by the drift over this long.
pub const RELAY_AGE_ALLOWANCE: Duration = Duration::from_secs(10);

/// Drift of two clocks, parts per million (as the agent assumes).
const DRIFT_PPM: u64 = 200;

/// A joined server's side of the relay: the schedules of its machines from each accepted
/// report, with this server's clock minus the coordinator's measured on that report's
/// round trip (error: half the round trip less the role's hold time, plus
/// [`RELAY_AGE_ALLOWANCE`] of drift). Without a clock reading (an older role) nothing is
/// scheduled: an offset without a bound would void the guarantee.
pub struct Relay {
    tx: watch::Sender<Schedules>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            tx: watch::channel(Schedules::default()).0,
        }
    }
}

impl Relay {
    /// A receiver of the relayed schedules.
    pub fn subscribe(&self) -> watch::Receiver<Schedules> {
        self.tx.subscribe()
    }

    /// Takes an accepted report's groups and clock.
    pub fn update(&mut self, accepted: &ripcord_transport::control::ReportAccepted) {
        crate::db_watch::send_if_changed(&self.tx, relay_schedules(accepted));
    }
}

fn relay_schedules(accepted: &ripcord_transport::control::ReportAccepted) -> Schedules {
    let Some((sent, reading, received)) = accepted.clock else {
        return Schedules::default();
    };
    let Some((offset, error)) =
        ripcord_proto::clock_offset(sent, reading.received_ns, reading.sent_ns, received)
    else {
        return Schedules::default();
    };
    let error = error + RELAY_AGE_ALLOWANCE.as_nanos() as u64 / 1_000_000 * DRIFT_PPM;
    let mut out = HashMap::new();
    for g in &accepted.groups {
        let Ok(group) = g.group.parse::<ripcord_proto::GroupId>() else {
            tracing::warn!(
                group = g.group,
                "the configuration role relayed a malformed group id"
            );
            continue;
        };
        let schedule = GroupSchedule {
            group,
            interval_ms: g.interval_ms,
            members: g.members,
            max_error_ns: g.max_error_ns,
            coordinator_offset_ns: offset,
            coordinator_error_ns: error,
            app_every: g.app_every,
        };
        // Checked as the wire will check it: a bad one is dropped here, not at the agent.
        if ripcord_proto::Message::GroupSchedule(schedule)
            .validate()
            .is_ok()
            && g.members > 0
        {
            out.insert(g.machine.clone(), schedule);
        }
    }
    Arc::new(out)
}

/// No groups ever: a server with no source of schedules.
pub fn unscheduled() -> watch::Receiver<Schedules> {
    watch::channel(Schedules::default()).1
}

/// This server's wall clock, unix ns (the clock of `TimeReply` and of the reports' replies).
pub use ripcord_transport::control::unix_now_ns as now_wall_ns;

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_transport::control::{ClockReading, MachineGroup, ReportAccepted};

    fn accepted(clock: Option<(u64, ClockReading, u64)>) -> ReportAccepted {
        ReportAccepted {
            machines: Vec::new(),
            groups: vec![MachineGroup {
                machine: "db1".into(),
                group: "11".repeat(16),
                interval_ms: 5000,
                members: 3,
                max_error_ns: 50_000_000,
                app_every: 0,
            }],
            policies: Vec::new(),
            clock,
        }
    }

    #[test]
    fn a_relayed_schedule_carries_this_servers_offset_within_its_bound() {
        // This server is 40 ms ahead of the coordinator; 2 ms out, 6 ms back, 1 ms held.
        let sent = 10_000_000_000;
        let reading = ClockReading {
            received_ns: sent + 2_000_000 - 40_000_000,
            sent_ns: sent + 3_000_000 - 40_000_000,
        };
        let received = sent + 9_000_000;
        let map = relay_schedules(&accepted(Some((sent, reading, received))));
        let s = map["db1"];
        assert_eq!(s.members, 3);
        let drift = RELAY_AGE_ALLOWANCE.as_nanos() as u64 / 1_000_000 * DRIFT_PPM;
        assert_eq!(s.coordinator_error_ns, 4_000_000 + drift);
        assert!((s.coordinator_offset_ns - 40_000_000).unsigned_abs() <= 4_000_000);
        // Without the role's clock there is no bound, so nothing is scheduled.
        assert!(relay_schedules(&accepted(None)).is_empty());
    }

    #[test]
    fn a_machine_outside_every_group_is_told_so() {
        let s = schedule_for(&Schedules::default(), "web1");
        assert_eq!(s.members, 0);
    }
}
