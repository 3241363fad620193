//! The configuration database's schema, as an ordered list of migrations. A migration is
//! never edited once released: a change is a new migration at the end. The version lives
//! in SQLite's `user_version`; a database newer than this list is refused at open.

use rusqlite_migration::{M, Migrations};

/// Every migration, oldest first.
const ALL: &[M<'static>] = &[
    M::up(V1),
    M::up(V2),
    M::up(V3),
    M::up(V4),
    M::up(V5),
    M::up(V6),
    M::up(V7),
];

/// The migrations, for `rusqlite_migration`.
pub const MIGRATIONS: Migrations<'static> = Migrations::from_slice(ALL);

/// The schema version this code writes and reads (the number of migrations).
pub fn version() -> u32 {
    ALL.len() as u32
}

/// Version 1: process servers, machines (each assigned to one process server), disks,
/// policies, alerts, and the append-only audit log of operator actions. Times are Unix
/// seconds. Names are checked where the database can check them (health colours,
/// severities, non-empty identifiers).
const V1: &str = "
CREATE TABLE process_servers (
    id             TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    address        TEXT NOT NULL,
    version        TEXT NOT NULL,
    cert_sha256    TEXT NOT NULL,
    config_role    INTEGER NOT NULL DEFAULT 0 CHECK (config_role IN (0, 1)),
    registered_at  INTEGER NOT NULL,
    last_heartbeat INTEGER,
    health         TEXT NOT NULL DEFAULT 'red' CHECK (health IN ('green', 'orange', 'red'))
);

CREATE TABLE policies (
    name                TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 255),
    rpo_threshold_secs  INTEGER NOT NULL CHECK (rpo_threshold_secs > 0),
    retention_secs      INTEGER NOT NULL CHECK (retention_secs > 0),
    app_interval_secs   INTEGER NOT NULL CHECK (app_interval_secs >= 0)
);

CREATE TABLE machines (
    id             TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    cert_sha256    TEXT NOT NULL,
    registered_at  INTEGER NOT NULL,
    process_server TEXT REFERENCES process_servers(id),
    policy         TEXT REFERENCES policies(name)
);
CREATE INDEX machines_by_server ON machines(process_server);

CREATE TABLE disks (
    id             TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    machine        TEXT NOT NULL REFERENCES machines(id),
    device         TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL CHECK (size_bytes >= 0),
    epoch          INTEGER NOT NULL DEFAULT 0,
    acked_seq      INTEGER NOT NULL DEFAULT 0,
    last_point_at  INTEGER
);
CREATE INDEX disks_by_machine ON disks(machine);

CREATE TABLE alerts (
    id         INTEGER PRIMARY KEY,
    subject    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    severity   TEXT NOT NULL CHECK (severity IN ('warning', 'critical')),
    message    TEXT NOT NULL,
    raised_at  INTEGER NOT NULL,
    cleared_at INTEGER
);
-- At most one open alert per subject and kind: raising it again updates nothing.
CREATE UNIQUE INDEX one_open_alert ON alerts(subject, kind) WHERE cleared_at IS NULL;

CREATE TABLE audit (
    id     INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,
    actor  TEXT NOT NULL CHECK (length(actor) >= 1),
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER audit_is_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_is_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// Version 2: where each process server runs (its fingerprint, see
/// [`crate::ProcessServer::fingerprint`]), so a cloned server is told apart.
const V2: &str = "
ALTER TABLE process_servers ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
";

/// Version 3: each disk's lag (the age of its newest recovery point) sampled over time,
/// for the status page's charts. Samples go with their disk.
const V3: &str = "
CREATE TABLE lag_samples (
    disk     TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
    at       INTEGER NOT NULL,
    lag_secs INTEGER NOT NULL CHECK (lag_secs >= 0),
    PRIMARY KEY (disk, at)
) WITHOUT ROWID;
";

/// Version 4: each process server's load as last reported, for placement.
const V4: &str = "
ALTER TABLE process_servers ADD COLUMN cpu_percent REAL;
ALTER TABLE process_servers ADD COLUMN memory_percent REAL;
ALTER TABLE process_servers ADD COLUMN cache_free_percent REAL;
";

/// Version 5: up to when each disk's newest point held every write (an idle disk's point
/// stays current, so its lag does not grow; see `Disk::current_at`).
const V5: &str = "
ALTER TABLE disks ADD COLUMN current_at INTEGER;
";

/// Version 6: consistency groups (issue 16) and their member machines. A group's id is 16
/// random bytes, never reused; its name is checked here as the library checks it. A machine
/// is in at most one group (the members' key is the machine); its membership goes with the
/// machine or the group. The timing bounds are the library's (`GROUP_INTERVAL_MS`,
/// `GROUP_MAX_ERROR_US`): here only their sign, so a later release may widen them without
/// rebuilding the table.
const V6: &str = "
CREATE TABLE groups (
    name         TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64
                                         AND name NOT GLOB '*[^A-Za-z0-9_-]*'),
    id           BLOB NOT NULL UNIQUE CHECK (typeof(id) = 'blob' AND length(id) = 16),
    interval_ms  INTEGER NOT NULL CHECK (interval_ms > 0),
    max_error_us INTEGER NOT NULL CHECK (max_error_us > 0),
    created_at   INTEGER NOT NULL
);

CREATE TABLE group_members (
    machine    TEXT PRIMARY KEY REFERENCES machines(id) ON DELETE CASCADE,
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    added_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX group_members_by_group ON group_members(group_name);
";

/// Application-consistent group points: every `app_every`-th instant of a group (0: none).
const V7: &str = "
ALTER TABLE groups ADD COLUMN app_every INTEGER NOT NULL DEFAULT 0 CHECK (app_every >= 0);
";

#[cfg(test)]
mod tests {
    #[test]
    fn the_migrations_are_valid() {
        super::MIGRATIONS.validate().unwrap();
    }
}
