//! Consistency groups (issue 16): sets of machines whose disks share group recovery points,
//! crash-consistent cuts at common instants. Part of [`ControlDb`]; the crate's invariants
//! hold (each change and its audit entry commit together), and these:
//!
//! - **A name and an id.** The name is 1 to 64 letters, digits, `-` or `_`
//!   ([`is_valid_name`]); the id is 16 random bytes drawn when the group is created, so a
//!   group deleted and made again under its old name has another id, and points of the old
//!   one are never taken for the new one's.
//! - **Bounded timing.** The interval is within [`GROUP_INTERVAL_MS`], the max error within
//!   [`GROUP_MAX_ERROR_US`]; values outside are refused, naming the value.
//! - **One group per machine**, and only a registered machine: adding a machine that is in
//!   another group is refused naming that group; the database's keys hold it too.
//! - **Bounded size.** At most [`MAX_GROUP_MACHINES`] machines, and adding a machine is
//!   refused when the group's machines would then have more than
//!   [`ripcord_types::MAX_GROUP_MEMBERS`] disks as reported so far. A disk reported after
//!   its machine joined is not checked here (the report is not an operator action to
//!   refuse); the coordinator must not schedule a point past that bound.
//! - **Deleting a group** removes its memberships, never its machines.

use std::ops::RangeInclusive;

use ripcord_types::{GroupId, MAX_GROUP_MEMBERS};
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::{ControlDb, ControlError, Group, Result, audit, require_machine};

/// The most machines one consistency group holds.
pub const MAX_GROUP_MACHINES: usize = 64;

// Every member machine has a disk to cut, so the machine bound never exceeds the disk bound.
const _: () = assert!(MAX_GROUP_MACHINES <= MAX_GROUP_MEMBERS as usize);

/// Largest `app_every` of a group (an application-consistent point at most every this
/// many instants; a day of 1 s instants).
pub const MAX_GROUP_APP_EVERY: u32 = 86_400;

/// Shortest time between two application-consistent group points (interval × app-every),
/// ms: each one pauses a member's rounds for its 2 s lead, so they must leave at least as
/// long again for replication.
pub const MIN_GROUP_APP_PERIOD_MS: u64 = 5_000;

/// A group's interval between points, in milliseconds: 1 s to 1 hour.
pub const GROUP_INTERVAL_MS: RangeInclusive<u64> = 1_000..=3_600_000;

/// A group's max clock error, in microseconds: 0.1 ms to 10 s.
pub const GROUP_MAX_ERROR_US: RangeInclusive<u64> = 100..=10_000_000;

/// Whether `name` is a valid group (or policy) name: 1 to 64 ASCII letters, digits, `-` or
/// `_`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl ControlDb {
    /// Creates group `name` with its timing (an operator action), and returns its new
    /// random id. Refused if the name is taken or a bound is broken.
    pub fn create_group(
        &mut self,
        name: &str,
        interval_ms: u64,
        max_error_us: u64,
        actor: &str,
        at: i64,
    ) -> Result<GroupId> {
        if !is_valid_name(name) {
            return Err(ControlError::BadGroupName(name.to_owned()));
        }
        check_timing(interval_ms, max_error_us)?;
        let tx = self.conn.transaction()?;
        if group_timing(&tx, name)?.is_some() {
            return Err(ControlError::GroupExists(name.to_owned()));
        }
        let id = GroupId(rand::random());
        tx.execute(
            "INSERT INTO groups (name, id, interval_ms, max_error_us, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, id.0, interval_ms, max_error_us, at],
        )?;
        let detail = format!("{name} ({id}): every {interval_ms} ms, max error {max_error_us} us");
        audit(&tx, at, actor, "create-group", &detail)?;
        tx.commit()?;
        Ok(id)
    }

    /// Changes group `name`'s interval and max error (an operator action).
    pub fn set_group_timing(
        &mut self,
        name: &str,
        interval_ms: u64,
        max_error_us: u64,
        actor: &str,
        at: i64,
    ) -> Result<()> {
        check_timing(interval_ms, max_error_us)?;
        let tx = self.conn.transaction()?;
        let Some((old_interval, old_error)) = group_timing(&tx, name)? else {
            return Err(ControlError::UnknownGroup(name.to_owned()));
        };
        tx.execute(
            "UPDATE groups SET interval_ms = ?2, max_error_us = ?3 WHERE name = ?1",
            params![name, interval_ms, max_error_us],
        )?;
        let detail = format!(
            "{name}: every {old_interval} -> {interval_ms} ms, \
             max error {old_error} -> {max_error_us} us"
        );
        audit(&tx, at, actor, "set-group-timing", &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Makes every `app_every`-th instant of group `name` an application-consistent group
    /// point (0: none; at most [`MAX_GROUP_APP_EVERY`]), an operator action.
    pub fn set_group_app_every(
        &mut self,
        name: &str,
        app_every: u32,
        actor: &str,
        at: i64,
    ) -> Result<()> {
        if app_every > MAX_GROUP_APP_EVERY {
            return Err(ControlError::GroupAppEveryOutOfRange { app_every });
        }
        let tx = self.conn.transaction()?;
        let changed = tx.execute(
            "UPDATE groups SET app_every = ?2 WHERE name = ?1",
            params![name, app_every],
        )?;
        if changed == 0 {
            return Err(ControlError::UnknownGroup(name.to_owned()));
        }
        audit(
            &tx,
            at,
            actor,
            "set-group-app-every",
            &format!("{name}: every {app_every} instants"),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Adds registered `machine` to group `name` (an operator action). Returns false, and
    /// changes nothing, if it is a member already. Refused if it is in another group, if the
    /// group has [`MAX_GROUP_MACHINES`], or if the group's disks would then pass
    /// [`MAX_GROUP_MEMBERS`].
    pub fn add_to_group(
        &mut self,
        name: &str,
        machine: &str,
        actor: &str,
        at: i64,
    ) -> Result<bool> {
        let tx = self.conn.transaction()?;
        if group_timing(&tx, name)?.is_none() {
            return Err(ControlError::UnknownGroup(name.to_owned()));
        }
        require_machine(&tx, machine)?;
        match membership(&tx, machine)? {
            Some(group) if group == name => return Ok(false),
            Some(group) => {
                return Err(ControlError::MachineInOtherGroup {
                    machine: machine.to_owned(),
                    group,
                });
            }
            None => {}
        }
        let members: u64 = tx.query_row(
            "SELECT count(*) FROM group_members WHERE group_name = ?1",
            [name],
            |r| r.get(0),
        )?;
        if members >= MAX_GROUP_MACHINES as u64 {
            return Err(ControlError::GroupFull {
                group: name.to_owned(),
                machine: machine.to_owned(),
                max: MAX_GROUP_MACHINES,
            });
        }
        let disks: u64 = tx.query_row(
            "SELECT count(*) FROM disks
             WHERE machine = ?2
                OR machine IN (SELECT machine FROM group_members WHERE group_name = ?1)",
            [name, machine],
            |r| r.get(0),
        )?;
        if disks > u64::from(MAX_GROUP_MEMBERS) {
            return Err(ControlError::GroupTooManyDisks {
                group: name.to_owned(),
                machine: machine.to_owned(),
                disks,
                max: MAX_GROUP_MEMBERS,
            });
        }
        tx.execute(
            "INSERT INTO group_members (machine, group_name, added_at) VALUES (?1, ?2, ?3)",
            params![machine, name, at],
        )?;
        audit(
            &tx,
            at,
            actor,
            "add-to-group",
            &format!("{name}: {machine}"),
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Takes `machine` out of group `name` (an operator action). Refused if it is not a
    /// member of that group.
    pub fn remove_from_group(
        &mut self,
        name: &str,
        machine: &str,
        actor: &str,
        at: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        if group_timing(&tx, name)?.is_none() {
            return Err(ControlError::UnknownGroup(name.to_owned()));
        }
        require_machine(&tx, machine)?;
        if tx.execute(
            "DELETE FROM group_members WHERE machine = ?1 AND group_name = ?2",
            [machine, name],
        )? == 0
        {
            return Err(ControlError::NotInGroup {
                machine: machine.to_owned(),
                group: name.to_owned(),
            });
        }
        audit(
            &tx,
            at,
            actor,
            "remove-from-group",
            &format!("{name}: {machine}"),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes group `name` and its memberships (an operator action); its machines stay
    /// registered, in no group.
    pub fn delete_group(&mut self, name: &str, actor: &str, at: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        let machines: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT machine FROM group_members WHERE group_name = ?1 ORDER BY machine",
            )?;
            st.query_map([name], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        if tx.execute("DELETE FROM groups WHERE name = ?1", [name])? == 0 {
            return Err(ControlError::UnknownGroup(name.to_owned()));
        }
        let detail = format!("{name} (machines: {})", machines.join(", "));
        audit(&tx, at, actor, "delete-group", &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Every group with its machines, by name.
    pub fn groups(&self) -> Result<Vec<Group>> {
        self.groups_where("", [])
    }

    /// The group `machine` is in, if any (`None` too for a machine not registered).
    pub fn group_of(&self, machine: &str) -> Result<Option<Group>> {
        Ok(self
            .groups_where(
                "WHERE g.name = (SELECT group_name FROM group_members WHERE machine = ?1)",
                [machine],
            )?
            .into_iter()
            .next())
    }

    /// The groups `condition` selects (on `groups g`), with their machines: one statement,
    /// so one snapshot of the database.
    fn groups_where(&self, condition: &str, params: impl rusqlite::Params) -> Result<Vec<Group>> {
        let rows = self.rows(
            &format!(
                "SELECT g.name, g.id, g.interval_ms, g.max_error_us, g.created_at, m.machine,
                        g.app_every
                 FROM groups g LEFT JOIN group_members m ON m.group_name = g.name
                 {condition} ORDER BY g.name, m.machine"
            ),
            params,
            |r| {
                let group = Group {
                    name: r.get(0)?,
                    id: GroupId(r.get(1)?),
                    interval_ms: r.get(2)?,
                    max_error_us: r.get(3)?,
                    machines: Vec::new(),
                    created_at: r.get(4)?,
                    app_every: r.get(6)?,
                };
                Ok((group, r.get::<_, Option<String>>(5)?))
            },
        )?;
        let mut groups: Vec<Group> = Vec::new();
        for (group, machine) in rows {
            if groups.last().is_none_or(|g| g.name != group.name) {
                groups.push(group);
            }
            if let (Some(machine), Some(last)) = (machine, groups.last_mut()) {
                last.machines.push(machine);
            }
        }
        Ok(groups)
    }
}

/// Refuses timing outside [`GROUP_INTERVAL_MS`] or [`GROUP_MAX_ERROR_US`], naming the value.
fn check_timing(interval_ms: u64, max_error_us: u64) -> Result<()> {
    if !GROUP_INTERVAL_MS.contains(&interval_ms) {
        return Err(ControlError::GroupIntervalOutOfRange { interval_ms });
    }
    if !GROUP_MAX_ERROR_US.contains(&max_error_us) {
        return Err(ControlError::GroupMaxErrorOutOfRange { max_error_us });
    }
    Ok(())
}

/// Group `name`'s (interval ms, max error us), if it exists.
fn group_timing(conn: &Connection, name: &str) -> Result<Option<(u64, u64)>> {
    Ok(conn
        .query_row(
            "SELECT interval_ms, max_error_us FROM groups WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// The group `machine` is in, if any.
fn membership(conn: &Connection, machine: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT group_name FROM group_members WHERE machine = ?1",
            [machine],
            |r| r.get(0),
        )
        .optional()?)
}
