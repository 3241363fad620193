//! Process servers joining a deployment (issue 15, item 2): `ripcord-ps join` on the new
//! server, and the configuration role's decision on the request.
//!
//! # Invariants
//! - **The key never leaves the joining server**: it sends a CSR; the configuration role
//!   issues a certificate for the names it asks and the URI `ripcord://process-server/<id>`
//!   (see [`ripcord_transport::Ca::issue_process_server`]).
//! - **Only a process-server token joins**, from `<deployment>/ps-tokens` (`ripcord-ps
//!   token --for process-server`): an agent's bootstrap token is refused, so a host given
//!   a token to protect itself cannot add a server that machines would be sent to.
//! - **Nothing is told to a peer without a valid join token**: the token is checked first,
//!   so a request without one learns neither the configuration role's version nor which
//!   server ids are taken.
//! - **A token never takes over a registered id**: an id registered already is refused
//!   before the token is consumed; the operator removes the old server first.
//! - **Never newer than the configuration role** (the seeds' rule): a server whose version
//!   is greater is refused at join and at every report, with a message that says to
//!   upgrade the configuration role first.
//! - **A joined directory is complete exactly when `escrow.json` exists** (written last),
//!   as with `init`; a join into a directory that holds a deployment is refused.
//! - The fingerprint (where a server runs: the host's machine id and the deployment
//!   directory) is recorded at join; a copy of the directory on another host, or in another
//!   directory, reports another one and is refused as a clone (see `crate::reporting`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail, ensure};
use ripcord_control::{ControlDb, ControlError, Health, ProcessServer};
use ripcord_seal::escrow::EscrowFile;
use ripcord_transport::{
    Ca, MachineId, Token, TokenError, TokenStore,
    control::{JoinParams, JoinRequest, Refusal, Reply},
};
use serde::{Deserialize, Serialize};

use crate::config::{PsConfig, Role};

/// This server's version, compared with the configuration role's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the configuration role tells a joining server about the deployment.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeploymentFacts {
    /// The key-escrow public key and parameters (its `escrow.json`).
    pub escrow: EscrowFile,
    /// The target store every server uploads to.
    pub target: Option<String>,
}

/// Where this server runs: SHA-256 over the host's machine id (`/etc/machine-id`, else
/// the host name) and the canonical deployment directory, in hex.
pub fn fingerprint(dir: &Path) -> anyhow::Result<String> {
    let host = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(crate::config::hostname);
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let mut input = host.into_bytes();
    input.push(0);
    input.extend_from_slice(dir.as_os_str().as_encoded_bytes());
    Ok(hex::encode(ripcord_transport::pki::sha256(&input)))
}

/// Whether `version` is newer than this configuration role's.
pub fn newer_than_ours(version: &str) -> anyhow::Result<bool> {
    let theirs =
        semver::Version::parse(version).with_context(|| format!("{version:?} is not a version"))?;
    let ours = semver::Version::parse(VERSION).expect("the crate version is semver");
    Ok(theirs > ours)
}

/// The message of a server refused for its version.
pub fn newer_message(version: &str) -> String {
    format!(
        "this process server is version {version}, newer than the configuration role \
         ({VERSION}): a process server is never newer than its configuration role; upgrade \
         the configuration role first (`cargo xtask deploy --upgrade` upgrades it first)"
    )
}

/// `ripcord-ps join`'s options.
pub struct JoinOptions {
    pub dir: PathBuf,
    /// The configuration role's registration endpoint, `host:port`.
    pub config_role: String,
    pub ca_hash: String,
    pub token: Token,
    pub server_id: String,
    /// Names agents use to reach this server.
    pub names: Vec<String>,
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<Option<SocketAddr>>,
    /// The journals' directory (the cache disk); default `<dir>/cache`.
    pub cache_dir: Option<PathBuf>,
}

/// Joins the deployment whose configuration role is at `opts.config_role` and writes this
/// server's deployment directory; returns where it was written.
pub async fn join(opts: JoinOptions) -> anyhow::Result<PathBuf> {
    let dir = &opts.dir;
    if dir.join("escrow.json").exists() {
        bail!(
            "{} already holds a deployment (escrow.json exists)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("making {} private (mode 0700)", dir.display()))?;
    let host = crate::config::config_role_host(&opts.config_role)?.to_owned();
    let config_addr = tokio::net::lookup_host(&opts.config_role)
        .await
        .with_context(|| format!("resolving {}", opts.config_role))?
        .next()
        .with_context(|| format!("{} resolves to no address", opts.config_role))?;
    let server_id = MachineId::new(&opts.server_id)
        .with_context(|| format!("invalid server id {:?}", opts.server_id))?;
    ensure!(!opts.names.is_empty(), "give at least one --name");
    let mut config = PsConfig {
        roles: vec![Role::Process],
        config_role: Some(opts.config_role.clone()),
        server_id: opts.server_id.clone(),
        ..PsConfig::default()
    };
    if let Some(listen) = opts.listen {
        config.listen = listen;
    }
    if let Some(metrics) = opts.metrics_listen {
        config.metrics_listen = metrics;
    }
    config.cache_dir = opts.cache_dir.clone();
    let joined = ripcord_transport::control::join(
        &JoinParams {
            config_addr,
            config_name: &host,
            ca_hash: &opts.ca_hash,
            token: &opts.token,
            server_id: &server_id,
            names: &opts.names,
            version: VERSION,
            fingerprint: &fingerprint(dir)?,
            data_port: config.listen.port(),
        },
        &dir.join("server"),
    )
    .await
    .with_context(|| format!("joining the deployment at {}", opts.config_role))?;
    let facts: DeploymentFacts = serde_json::from_value(joined.deployment)
        .context("the configuration role sent deployment facts this server cannot read")?;
    ripcord_transport::pki::save_ca_cert(&dir.join("ca"), joined.identity.ca_cert())?;
    config.target = facts.target;
    crate::deploy::write_atomic(
        &dir.join("ps.toml"),
        format!(
            "# ripcord process server, joined to the configuration role at {}\n{}",
            opts.config_role,
            toml::to_string(&config)?
        )
        .as_bytes(),
    )?;
    crate::deploy::write_atomic(
        &dir.join("escrow.json"),
        &serde_json::to_vec_pretty(&facts.escrow)?,
    )?;
    Ok(dir.clone())
}

/// What the configuration role needs to decide a join.
pub(crate) struct JoinDesk<'a> {
    pub ca: &'a Ca,
    pub tokens: &'a TokenStore,
    pub db: &'a Path,
    pub facts: &'a DeploymentFacts,
    pub validity: Duration,
}

/// Decides a join request (see the module doc), recording the server and its audit entry
/// when it is admitted. Blocks on files and the database: call off the runtime's workers.
pub(crate) fn admit(desk: &JoinDesk<'_>, req: &JoinRequest) -> Reply {
    match try_admit(desk, req) {
        Ok(reply) => reply,
        Err((refusal, message)) => {
            tracing::warn!(
                server = req.server_id,
                ?refusal,
                "process server refused: {message}"
            );
            Reply::Refused { refusal, message }
        }
    }
}

fn try_admit(desk: &JoinDesk<'_>, req: &JoinRequest) -> Result<Reply, (Refusal, String)> {
    let invalid = |e: &dyn std::fmt::Display| (Refusal::InvalidRequest, e.to_string());
    let token_refused = |e: TokenError| {
        let refusal = match e {
            TokenError::Unknown
            | TokenError::Malformed
            | TokenError::Expired
            | TokenError::UsedUp
            | TokenError::DuplicateId { .. } => Refusal::Token,
            _ => Refusal::Internal,
        };
        (
            refusal,
            format!(
                "{e} (a process server joins with a token from `ripcord-ps token --for process-server`)"
            ),
        )
    };
    // Nothing about this deployment (its version, its servers) is told to a peer without
    // a valid join token.
    let token = Token::parse(&req.token).map_err(token_refused)?;
    let now = SystemTime::now();
    desk.tokens.verify(&token, now).map_err(token_refused)?;
    let server_id = MachineId::new(&req.server_id).map_err(|e| invalid(&e))?;
    if newer_than_ours(&req.version).map_err(|e| invalid(&e))? {
        return Err((Refusal::NewerThanConfigRole, newer_message(&req.version)));
    }
    ensure_fingerprint(&req.fingerprint).map_err(|e| invalid(&e))?;
    let names: Vec<&str> = req.names.iter().map(String::as_str).collect();
    let internal = |e: &dyn std::fmt::Display| (Refusal::Internal, e.to_string());
    let mut db = ControlDb::open(desk.db).map_err(|e| internal(&e))?;
    if db
        .process_server(server_id.as_str())
        .map_err(|e| internal(&e))?
        .is_some()
    {
        return Err((
            Refusal::AlreadyRegistered,
            ControlError::ProcessServerExists(server_id.to_string()).to_string(),
        ));
    }
    let cert = desk
        .ca
        .issue_process_server(&server_id, &names, &req.csr, desk.validity)
        .map_err(|e| match e {
            ripcord_transport::PkiError::InvalidServerName { .. }
            | ripcord_transport::PkiError::NoServerNames => invalid(&e),
            _ => (Refusal::InvalidCsr, e.to_string()),
        })?;
    desk.tokens.redeem(&token, now).map_err(token_refused)?;
    let row = ProcessServer {
        id: server_id.to_string(),
        address: format!("{}:{}", names[0], req.data_port),
        version: req.version.clone(),
        cert_sha256: hex::encode(ripcord_transport::pki::sha256(&cert)),
        config_role: false,
        registered_at: crate::control::unix_now(),
        last_heartbeat: None,
        health: Health::Red,
        fingerprint: req.fingerprint.clone(),
        load: None,
    };
    db.join_process_server(&row, &format!("token:{}", token.id()))
        .map_err(|e| match e {
            ControlError::ProcessServerExists(_) => (Refusal::AlreadyRegistered, e.to_string()),
            e => internal(&e),
        })?;
    tracing::info!(server = %server_id, address = row.address, version = req.version, "process server joined");
    let deployment = serde_json::to_value(desk.facts).map_err(|e| internal(&e))?;
    Ok(Reply::Joined {
        certificate: cert.to_vec(),
        ca: desk.ca.cert_der().to_vec(),
        deployment,
    })
}

/// A fingerprint is 64 hex digits.
fn ensure_fingerprint(fingerprint: &str) -> anyhow::Result<()> {
    ensure!(
        fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()),
        "the fingerprint is not 64 hex digits"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_semver() {
        assert!(!newer_than_ours(VERSION).unwrap());
        assert!(newer_than_ours("99.0.0").unwrap());
        assert!(!newer_than_ours("0.0.1").unwrap());
        assert!(newer_than_ours("1.2").is_err(), "not semver");
        assert!(newer_message("99.0.0").contains("upgrade the configuration role first"));
    }

    #[test]
    fn the_fingerprint_names_the_directory_and_the_host() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let fa = fingerprint(a.path()).unwrap();
        assert_eq!(fa, fingerprint(a.path()).unwrap());
        assert_ne!(
            fa,
            fingerprint(b.path()).unwrap(),
            "a copy elsewhere differs"
        );
        ensure_fingerprint(&fa).unwrap();
        assert!(ensure_fingerprint("abc").is_err());
    }
}
