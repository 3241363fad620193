//! The configuration database's errors, each naming what it concerns.

/// Errors of the configuration database, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("opening the configuration database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("migrating the configuration database {path}: {source}")]
    Migrate {
        path: String,
        source: rusqlite_migration::Error,
    },
    #[error(
        "no configuration database at {path}: give the deployment directory of the process \
         server that runs the config role (`roles` in its ps.toml)"
    )]
    Missing { path: String },
    #[error(
        "the configuration database {path} is at schema version {found}, this program reads \
         version {expected}: use the `ripcord` of the same release as the server"
    )]
    SchemaMismatch {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("configuration database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("no process server {0:?} is registered")]
    UnknownProcessServer(String),
    #[error(
        "a process server {0:?} is registered already: remove it first (`ripcord ps remove \
         --server {0}`) or join with another id"
    )]
    ProcessServerExists(String),
    #[error("no machine {0:?} is registered")]
    UnknownMachine(String),
    #[error("no policy {0:?} exists")]
    UnknownPolicy(String),
    #[error(
        "process server {server:?} still serves {machines} machine(s); move them first \
         (`ripcord move-machine --machine M --to <server>`)"
    )]
    ServerHasMachines { server: String, machines: u64 },
    #[error("{value:?} is not a health colour (green, orange or red)")]
    BadHealth { value: String },
    #[error("group name {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    BadGroupName(String),
    #[error(
        "group interval {interval_ms} ms is outside {}..={} ms (1 s to 1 hour)",
        crate::GROUP_INTERVAL_MS.start(),
        crate::GROUP_INTERVAL_MS.end()
    )]
    GroupIntervalOutOfRange { interval_ms: u64 },
    #[error(
        "group max error {max_error_us} us is outside {}..={} us (0.1 ms to 10 s)",
        crate::GROUP_MAX_ERROR_US.start(),
        crate::GROUP_MAX_ERROR_US.end()
    )]
    GroupMaxErrorOutOfRange { max_error_us: u64 },
    #[error(
        "an application-consistent group point every {app_every} instants is more than \
         {} (a day of 1 s instants)",
        crate::MAX_GROUP_APP_EVERY
    )]
    GroupAppEveryOutOfRange { app_every: u32 },
    #[error(
        "a group {0:?} exists already: change its timing with `ripcord group set --name {0}`, \
         or delete it first"
    )]
    GroupExists(String),
    #[error("no group {0:?} exists (`ripcord group list` lists them)")]
    UnknownGroup(String),
    #[error(
        "machine {machine:?} is in group {group:?} already, and a machine is in at most one \
         group: `ripcord group remove --name {group} --machine {machine}` first"
    )]
    MachineInOtherGroup { machine: String, group: String },
    #[error("machine {machine:?} is not in group {group:?} (`ripcord group list` shows them)")]
    NotInGroup { machine: String, group: String },
    #[error(
        "group {group:?} has {max} machines, the most a group may have: machine {machine:?} \
         was not added"
    )]
    GroupFull {
        group: String,
        machine: String,
        max: usize,
    },
    #[error(
        "group {group:?} with machine {machine:?} would span {disks} disks, more than the {max} \
         a group point may hold: it was not added"
    )]
    GroupTooManyDisks {
        group: String,
        machine: String,
        disks: u64,
        max: u16,
    },
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
