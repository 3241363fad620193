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
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
