//! The configuration role's state (issue 15): one SQLite database, `control.db` in the
//! deployment directory of the server that runs the `config` role. It holds the process
//! servers, the machines and which process server each is assigned to, their disks,
//! policies, consistency groups ([`Group`]), alerts, and the audit log of operator actions.
//!
//! # Invariants
//! - **Durable when a call returns.** WAL journal with `synchronous = FULL`: a change
//!   acknowledged to a caller survives a crash or power cut.
//! - **An operator action and its audit entry commit together**: every method that takes
//!   an `actor` writes both in one transaction, or neither. The audit log is append-only
//!   (triggers refuse UPDATE and DELETE).
//! - **References hold**: foreign keys are on, so a machine names an existing process
//!   server and policy, a disk an existing machine, and a group member an existing
//!   machine and group. A process server with machines cannot be removed (they must be
//!   moved first).
//! - **A machine is in at most one consistency group**, a group holds at most
//!   [`MAX_GROUP_MACHINES`] machines, and its timing stays within [`GROUP_INTERVAL_MS`] and
//!   [`GROUP_MAX_ERROR_US`]; a group's id is random and never reused (see `groups.rs`).
//! - **One open alert per subject and kind**: raising it again is a no-op until cleared.
//! - **Never newer than the code**: a database migrated by a newer release is refused at
//!   open rather than misread (migrations: [`schema`]).
//! - The data path never waits for this database: replication goes on while the config
//!   role is down (callers keep it off their hot paths).

mod error;
mod groups;
mod records;
pub mod schema;
mod servers;

use std::{path::Path, time::Duration};

pub use error::{ControlError, Result};
pub use groups::{
    GROUP_INTERVAL_MS, GROUP_MAX_ERROR_US, MAX_GROUP_APP_EVERY, MAX_GROUP_MACHINES,
    MIN_GROUP_APP_PERIOD_MS, is_valid_name,
};
pub use records::{
    Alert, AuditEntry, DEFAULT_RPO_THRESHOLD_SECS, Disk, DiskReport, Group, HEARTBEAT_WINDOW_SECS,
    Health, Machine, POLICY_APP_INTERVAL_SECS, POLICY_RETENTION_SECS, Policy, ProcessServer,
    ServerLoad, Severity,
};
use rusqlite::{Connection, OptionalExtension as _, params};

/// The open configuration database.
pub struct ControlDb {
    conn: Connection,
}

impl ControlDb {
    /// Opens (creating if missing) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<ControlDb> {
        let name = path.display().to_string();
        let open_err = |source| ControlError::Open {
            path: name.clone(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        schema::MIGRATIONS
            .to_latest(&mut conn)
            .map_err(|source| ControlError::Migrate {
                path: name.clone(),
                source,
            })?;
        Ok(ControlDb { conn })
    }

    /// Opens an existing database for reading only (`ripcord status`): never creates or
    /// migrates it (its server owns that), and refuses a schema other than this code's.
    pub fn open_read_only(path: &Path) -> Result<ControlDb> {
        let name = path.display().to_string();
        if !path.exists() {
            return Err(ControlError::Missing { path: name });
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| ControlError::Open {
            path: name.clone(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let db = ControlDb { conn };
        let found = db.schema_version().map_err(|e| match e {
            ControlError::Sql(source) => ControlError::Open {
                path: name.clone(),
                source,
            },
            other => other,
        })?;
        let expected = schema::version();
        if found != expected {
            return Err(ControlError::SchemaMismatch {
                path: name,
                found,
                expected,
            });
        }
        Ok(db)
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Registers machine `id` (or records its new certificate) on `process_server`.
    pub fn register_machine(
        &mut self,
        id: &str,
        cert_sha256: &str,
        at: i64,
        process_server: &str,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        require_server(&tx, process_server)?;
        tx.execute(
            "INSERT INTO machines (id, cert_sha256, registered_at, process_server)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET cert_sha256 = excluded.cert_sha256",
            params![id, cert_sha256, at, process_server],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every machine, by id.
    pub fn machines(&self) -> Result<Vec<Machine>> {
        self.rows(
            "SELECT id, cert_sha256, registered_at, process_server, policy
             FROM machines ORDER BY id",
            [],
            |r| {
                Ok(Machine {
                    id: r.get(0)?,
                    cert_sha256: r.get(1)?,
                    registered_at: r.get(2)?,
                    process_server: r.get(3)?,
                    policy: r.get(4)?,
                })
            },
        )
    }

    /// Assigns `machine` to process server `to` (an operator action).
    pub fn move_machine(&mut self, machine: &str, to: &str, actor: &str, at: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        require_server(&tx, to)?;
        let from: Option<Option<String>> = tx
            .query_row(
                "SELECT process_server FROM machines WHERE id = ?1",
                [machine],
                |r| r.get(0),
            )
            .optional()?;
        let Some(from) = from else {
            return Err(ControlError::UnknownMachine(machine.to_owned()));
        };
        tx.execute(
            "UPDATE machines SET process_server = ?2 WHERE id = ?1",
            params![machine, to],
        )?;
        let detail = format!("{machine}: {} -> {to}", from.as_deref().unwrap_or("none"));
        audit(&tx, at, actor, "move-machine", &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Records `disks` (their process server's latest report; see [`DiskReport`] for what
    /// `None` means), in one transaction: all of them or none.
    pub fn record_disks(&mut self, disks: &[DiskReport]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for disk in disks {
            require_machine(&tx, &disk.machine)?;
            tx.execute(
                "INSERT INTO disks (id, machine, device, size_bytes, epoch, acked_seq,
                                    last_point_at, current_at)
                 VALUES (?1, ?2, ?3, ?4, coalesce(?5, 0), coalesce(?6, 0), ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET machine = excluded.machine,
                     device = excluded.device, size_bytes = excluded.size_bytes,
                     epoch = coalesce(?5, disks.epoch),
                     acked_seq = coalesce(?6, disks.acked_seq),
                     last_point_at = coalesce(?7, disks.last_point_at),
                     current_at = max(coalesce(?8, disks.current_at),
                                      coalesce(disks.current_at, ?8))",
                params![
                    disk.id,
                    disk.machine,
                    disk.device,
                    disk.size_bytes,
                    disk.epoch,
                    disk.acked_seq,
                    disk.last_point_at,
                    disk.current_at
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every disk, by machine and id.
    pub fn disks(&self) -> Result<Vec<Disk>> {
        self.rows(
            "SELECT id, machine, device, size_bytes, epoch, acked_seq, last_point_at,
                    current_at
             FROM disks ORDER BY machine, id",
            [],
            disk_row,
        )
    }

    /// Every disk with the RPO threshold that applies to it, and the policy it comes from:
    /// its machine's policy's, else [`DEFAULT_RPO_THRESHOLD_SECS`] (policy `None`).
    pub fn disks_with_rpo_threshold(&self) -> Result<Vec<(Disk, u64, Option<String>)>> {
        self.rows(
            "SELECT d.id, d.machine, d.device, d.size_bytes, d.epoch, d.acked_seq,
                    d.last_point_at, d.current_at, p.rpo_threshold_secs, p.name
             FROM disks d JOIN machines m ON m.id = d.machine
             LEFT JOIN policies p ON p.name = m.policy
             ORDER BY d.machine, d.id",
            [],
            |r| {
                Ok((
                    disk_row(r)?,
                    r.get::<_, Option<u64>>(8)?
                        .unwrap_or(DEFAULT_RPO_THRESHOLD_SECS),
                    r.get(9)?,
                ))
            },
        )
    }

    /// Samples the lag ([`Disk::lag_secs`]) of every disk with a recovery point at `now`
    /// (Unix seconds): at
    /// most one sample per disk every `every` seconds, and samples older than `keep`
    /// seconds are deleted.
    pub fn sample_lag(&mut self, now: i64, every: i64, keep: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO lag_samples (disk, at, lag_secs)
             SELECT id, ?1, max(0, ?1 - max(last_point_at, coalesce(current_at, last_point_at)))
             FROM disks
             WHERE last_point_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM lag_samples s
                               WHERE s.disk = disks.id AND s.at > ?1 - ?2)",
            params![now, every],
        )?;
        tx.execute("DELETE FROM lag_samples WHERE at < ?1", params![now - keep])?;
        tx.commit()?;
        Ok(())
    }

    /// The lag samples of every disk since `since`: (disk, at, lag seconds), by disk and
    /// time.
    pub fn lag_history(&self, since: i64) -> Result<Vec<(String, i64, i64)>> {
        self.rows(
            "SELECT disk, at, lag_secs FROM lag_samples WHERE at >= ?1 ORDER BY disk, at",
            [since],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    /// Creates or changes a policy (an operator action).
    pub fn set_policy(&mut self, policy: &Policy, actor: &str, at: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO policies (name, rpo_threshold_secs, retention_secs, app_interval_secs)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET rpo_threshold_secs = excluded.rpo_threshold_secs,
                 retention_secs = excluded.retention_secs,
                 app_interval_secs = excluded.app_interval_secs",
            params![
                policy.name,
                policy.rpo_threshold_secs,
                policy.retention_secs,
                policy.app_interval_secs
            ],
        )?;
        let detail = format!(
            "{}: rpo-threshold {} s, retention {} s, app points every {} s",
            policy.name, policy.rpo_threshold_secs, policy.retention_secs, policy.app_interval_secs
        );
        audit(&tx, at, actor, "set-policy", &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Every policy, by name.
    pub fn policies(&self) -> Result<Vec<Policy>> {
        self.rows(
            "SELECT name, rpo_threshold_secs, retention_secs, app_interval_secs
             FROM policies ORDER BY name",
            [],
            |r| {
                Ok(Policy {
                    name: r.get(0)?,
                    rpo_threshold_secs: r.get(1)?,
                    retention_secs: r.get(2)?,
                    app_interval_secs: r.get(3)?,
                })
            },
        )
    }

    /// Every machine that has a policy, with that policy, by machine id.
    pub fn machine_policies(&self) -> Result<Vec<(String, Policy)>> {
        self.rows(
            "SELECT m.id, p.name, p.rpo_threshold_secs, p.retention_secs, p.app_interval_secs
             FROM machines m JOIN policies p ON p.name = m.policy ORDER BY m.id",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    Policy {
                        name: r.get(1)?,
                        rpo_threshold_secs: r.get(2)?,
                        retention_secs: r.get(3)?,
                        app_interval_secs: r.get(4)?,
                    },
                ))
            },
        )
    }

    /// Gives `machine` policy `policy` (an operator action).
    pub fn assign_policy(
        &mut self,
        machine: &str,
        policy: &str,
        actor: &str,
        at: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        let known: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM policies WHERE name = ?1)",
            [policy],
            |r| r.get(0),
        )?;
        if !known {
            return Err(ControlError::UnknownPolicy(policy.to_owned()));
        }
        if tx.execute(
            "UPDATE machines SET policy = ?2 WHERE id = ?1",
            params![machine, policy],
        )? == 0
        {
            return Err(ControlError::UnknownMachine(machine.to_owned()));
        }
        audit(
            &tx,
            at,
            actor,
            "assign-policy",
            &format!("{machine}: {policy}"),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Raises alert `kind` on `subject`; returns false if it was already open (nothing
    /// changes then, not even its message).
    pub fn raise_alert(
        &mut self,
        subject: &str,
        kind: &str,
        severity: Severity,
        message: &str,
        at: i64,
    ) -> Result<bool> {
        let n = self.conn.execute(
            "INSERT INTO alerts (subject, kind, severity, message, raised_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO NOTHING",
            params![subject, kind, severity.as_str(), message, at],
        )?;
        Ok(n == 1)
    }

    /// Clears the open alert `kind` on `subject`, if any; returns whether one was open.
    pub fn clear_alert(&mut self, subject: &str, kind: &str, at: i64) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE alerts SET cleared_at = ?3
             WHERE subject = ?1 AND kind = ?2 AND cleared_at IS NULL",
            params![subject, kind, at],
        )?;
        Ok(n == 1)
    }

    /// The open alerts, oldest first.
    pub fn open_alerts(&self) -> Result<Vec<Alert>> {
        self.alerts_where("cleared_at IS NULL")
    }

    /// Every alert, open or cleared, oldest first.
    pub fn all_alerts(&self) -> Result<Vec<Alert>> {
        self.alerts_where("1")
    }

    fn alerts_where(&self, condition: &str) -> Result<Vec<Alert>> {
        self.rows(
            &format!(
                "SELECT subject, kind, severity, message, raised_at, cleared_at
             FROM alerts WHERE {condition} ORDER BY raised_at, id"
            ),
            [],
            |r| {
                Ok(Alert {
                    subject: r.get(0)?,
                    kind: r.get(1)?,
                    severity: r.get(2)?,
                    message: r.get(3)?,
                    raised_at: r.get(4)?,
                    cleared_at: r.get(5)?,
                })
            },
        )
    }

    /// Records an operator action that changes nothing in this database (a token
    /// created, a failover started).
    pub fn audit(&mut self, actor: &str, action: &str, detail: &str, at: i64) -> Result<()> {
        audit(&self.conn, at, actor, action, detail)
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        self.rows(
            "SELECT at, actor, action, detail FROM
                 (SELECT id, at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?1)
             ORDER BY id",
            [limit],
            |r| {
                Ok(AuditEntry {
                    at: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                })
            },
        )
    }
}

impl ControlDb {
    /// Every row `sql` selects with `params`, each mapped by `row`.
    fn rows<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let mut st = self.conn.prepare(sql)?;
        let rows = st.query_map(params, row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A [`Disk`] from the first eight columns of a row (`id, machine, device, size_bytes,
/// epoch, acked_seq, last_point_at, current_at`).
fn disk_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Disk> {
    Ok(Disk {
        id: r.get(0)?,
        machine: r.get(1)?,
        device: r.get(2)?,
        size_bytes: r.get(3)?,
        epoch: r.get(4)?,
        acked_seq: r.get(5)?,
        last_point_at: r.get(6)?,
        current_at: r.get(7)?,
    })
}

fn audit(conn: &Connection, at: i64, actor: &str, action: &str, detail: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO audit (at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
        params![at, actor, action, detail],
    )?;
    Ok(())
}

fn require_server(conn: &Connection, id: &str) -> Result<()> {
    let known: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM process_servers WHERE id = ?1)",
        [id],
        |r| r.get(0),
    )?;
    if known {
        Ok(())
    } else {
        Err(ControlError::UnknownProcessServer(id.to_owned()))
    }
}

fn require_machine(conn: &Connection, id: &str) -> Result<()> {
    let known: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM machines WHERE id = ?1)",
        [id],
        |r| r.get(0),
    )?;
    if known {
        Ok(())
    } else {
        Err(ControlError::UnknownMachine(id.to_owned()))
    }
}
