//! The process servers' rows: joining, heartbeats and load, removal (an operator
//! action with its audit entry). Part of [`ControlDb`]; the invariants are the crate's.

use rusqlite::{Connection, OptionalExtension as _, params};

use crate::{ControlDb, ControlError, Health, ProcessServer, Result, ServerLoad, audit};

impl ControlDb {
    /// Adds a process server, or updates the one with its id (address, version,
    /// certificate, role, fingerprint) keeping its registration time and machines.
    pub fn upsert_process_server(&mut self, ps: &ProcessServer) -> Result<()> {
        insert_process_server(
            &self.conn,
            ps,
            "ON CONFLICT(id) DO UPDATE SET address = excluded.address,
                 version = excluded.version, cert_sha256 = excluded.cert_sha256,
                 config_role = excluded.config_role, fingerprint = excluded.fingerprint",
        )
    }

    /// Records a process server that joined with a token (`actor` names the token), with
    /// its audit entry; refused if one with its id is registered already (a token never
    /// takes over an existing server: it must be removed first).
    pub fn join_process_server(&mut self, ps: &ProcessServer, actor: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM process_servers WHERE id = ?1",
                [&ps.id],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(ControlError::ProcessServerExists(ps.id.clone()));
        }
        insert_process_server(&tx, ps, "")?;
        let detail = format!("{} at {} (version {})", ps.id, ps.address, ps.version);
        audit(&tx, ps.registered_at, actor, "join-process-server", &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Process server `id`, if registered.
    pub fn process_server(&self, id: &str) -> Result<Option<ProcessServer>> {
        Ok(self
            .process_servers_where("WHERE id = ?1", [id])?
            .into_iter()
            .next())
    }

    /// Records the version a process server reports (it may have been upgraded).
    pub fn set_process_server_version(&mut self, id: &str, version: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE process_servers SET version = ?2 WHERE id = ?1 AND version != ?2",
            params![id, version],
        )?;
        Ok(())
    }

    /// Records a heartbeat of process server `id` at `at` with its health colour.
    pub fn heartbeat(&mut self, id: &str, at: i64, health: Health) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE process_servers SET last_heartbeat = ?2, health = ?3 WHERE id = ?1",
            params![id, at, health.as_str()],
        )?;
        if n == 0 {
            return Err(ControlError::UnknownProcessServer(id.to_owned()));
        }
        Ok(())
    }

    /// Marks process server `id` red without a heartbeat: the configuration role found it
    /// silent (its next report sets the colour it reports again).
    pub fn mark_red(&mut self, id: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE process_servers SET health = ?2 WHERE id = ?1",
            params![id, Health::Red.as_str()],
        )?;
        Ok(())
    }

    /// Records the load process server `id` reported.
    pub fn record_load(&mut self, id: &str, load: &ServerLoad) -> Result<()> {
        self.conn.execute(
            "UPDATE process_servers SET cpu_percent = ?2, memory_percent = ?3,
                 cache_free_percent = ?4 WHERE id = ?1",
            params![
                id,
                load.cpu_percent,
                load.memory_percent,
                load.cache_free_percent
            ],
        )?;
        Ok(())
    }

    /// Every process server, by id.
    pub fn process_servers(&self) -> Result<Vec<ProcessServer>> {
        self.process_servers_where("", [])
    }

    fn process_servers_where(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<ProcessServer>> {
        let rows = self.rows(
            &format!(
                "SELECT id, address, version, cert_sha256, config_role, registered_at,
                        last_heartbeat, health, fingerprint, cpu_percent, memory_percent,
                        cache_free_percent
                 FROM process_servers {filter} ORDER BY id"
            ),
            args,
            |r| {
                Ok((
                    ProcessServer {
                        id: r.get(0)?,
                        address: r.get(1)?,
                        version: r.get(2)?,
                        cert_sha256: r.get(3)?,
                        config_role: r.get(4)?,
                        registered_at: r.get(5)?,
                        last_heartbeat: r.get(6)?,
                        health: Health::Red,
                        fingerprint: r.get(8)?,
                        load: match (r.get(9)?, r.get(10)?, r.get(11)?) {
                            (Some(cpu_percent), Some(memory_percent), Some(cache_free_percent)) => {
                                Some(ServerLoad {
                                    cpu_percent,
                                    memory_percent,
                                    cache_free_percent,
                                })
                            }
                            _ => None,
                        },
                    },
                    r.get::<_, String>(7)?,
                ))
            },
        )?;
        rows.into_iter()
            .map(|(mut ps, health)| {
                ps.health = Health::parse(&health)?;
                Ok(ps)
            })
            .collect()
    }

    /// Removes process server `id` (an operator action), refused while machines are
    /// assigned to it.
    pub fn remove_process_server(&mut self, id: &str, actor: &str, at: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        let machines: u64 = tx.query_row(
            "SELECT count(*) FROM machines WHERE process_server = ?1",
            [id],
            |r| r.get(0),
        )?;
        if machines > 0 {
            return Err(ControlError::ServerHasMachines {
                server: id.to_owned(),
                machines,
            });
        }
        if tx.execute("DELETE FROM process_servers WHERE id = ?1", [id])? == 0 {
            return Err(ControlError::UnknownProcessServer(id.to_owned()));
        }
        audit(&tx, at, actor, "remove-process-server", id)?;
        tx.commit()?;
        Ok(())
    }
}

/// Inserts `ps` (its load is recorded with heartbeats), with `on_conflict` appended.
fn insert_process_server(conn: &Connection, ps: &ProcessServer, on_conflict: &str) -> Result<()> {
    conn.execute(
        &format!(
            "INSERT INTO process_servers
                 (id, address, version, cert_sha256, config_role, registered_at,
                  last_heartbeat, health, fingerprint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) {on_conflict}"
        ),
        params![
            ps.id,
            ps.address,
            ps.version,
            ps.cert_sha256,
            ps.config_role,
            ps.registered_at,
            ps.last_heartbeat,
            ps.health.as_str(),
            ps.fingerprint
        ],
    )?;
    Ok(())
}
