//! A deployment directory: the CA, the server identity, bootstrap tokens, the key-escrow
//! public key, the disk registry, the configuration, and (by default) the cache.
//!
//! ```text
//! <dir>/ps.toml        configuration (optional; defaults documented in config.rs)
//! <dir>/ca/            deployment CA (ca.crt, ca.key 0600)
//! <dir>/server/        this server's certificate chain and key
//! <dir>/tokens/        bootstrap tokens (hashed secrets; single use unless created with more)
//! <dir>/machines/      registered machines and their current certificates (by hash)
//! <dir>/escrow.json    key-escrow public key and the KDF salt/parameters
//! <dir>/disks.json     disk registry: owner machine, size, wrapped data key
//! <dir>/cache/<disk>/  per-disk journals
//! ```

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use ripcord_seal::escrow::{EscrowFile, EscrowParams, EscrowSecret};
use ripcord_transport::{Ca, MachineStore, ServerIdentity, Token, TokenStore};

use crate::config::PsConfig;

/// What `init` prints for the operator.
pub struct InitOutput {
    pub token: Token,
    pub ca_hash: String,
}

/// An opened deployment.
pub struct Deployment {
    pub dir: PathBuf,
    pub config: PsConfig,
    pub ca: Ca,
    pub identity: ServerIdentity,
    pub escrow: EscrowFile,
}

/// Durably replace `path` with `bytes` (see `ripcord_crashsafe::write_atomic`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    ripcord_crashsafe::write_atomic(path, bytes, ripcord_crashsafe::MODE_PUBLIC)
        .with_context(|| format!("writing {}", path.display()))
}

/// Create a deployment in `dir`: CA, server certificate for `names` (DNS names or IPs the
/// agents use to reach this server), a first bootstrap token valid for `token_ttl`, and the
/// escrow key derived from `passphrase`.
pub fn init(
    dir: &Path,
    names: &[&str],
    passphrase: &[u8],
    params: EscrowParams,
    token_ttl: Duration,
) -> anyhow::Result<InitOutput> {
    if dir.join("ca").exists() {
        bail!("{} already holds a deployment (ca/ exists)", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The deployment holds the CA key and the tokens: root's (or its owner's) alone.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("making {} private (mode 0700)", dir.display()))?;
    let config_path = dir.join("ps.toml");
    if !config_path.exists() {
        let target = dir
            .canonicalize()
            .map(|d| format!("file://{}", d.join("target").display()))
            .context("resolving the deployment directory")?;
        let cfg = PsConfig {
            target: Some(target),
            ..PsConfig::default()
        };
        let text = toml::to_string(&cfg)?;
        write_atomic(
            &config_path,
            format!("# ripcord process server\n{text}").as_bytes(),
        )?;
    }
    let secret = EscrowSecret::derive(passphrase, &params)?;
    let escrow = EscrowFile {
        public_key: secret.public_key(),
        params,
    };
    write_atomic(
        &dir.join("escrow.json"),
        &serde_json::to_vec_pretty(&escrow)?,
    )?;

    let ca = Ca::create(&dir.join("ca"), "ripcord deployment CA")?;
    let identity = ca.issue_server(names)?;
    identity.save(&dir.join("server"))?;
    MachineStore::open(&machines_dir(dir))?;
    let token =
        TokenStore::open_or_create(&tokens_dir(dir))?.add(token_ttl, 1, SystemTime::now())?;
    Ok(InitOutput {
        token,
        ca_hash: ca.hash(),
    })
}

/// Open an existing deployment.
pub fn open(dir: &Path) -> anyhow::Result<Deployment> {
    match std::fs::metadata(dir.join("ca")) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied reading the deployment in {}: run as root or as the \
             deployment's owner",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} is not a deployment (it has no ca/ directory): create one with `ripcord-ps \
             init --dir {}`",
            dir.display(),
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    let config = PsConfig::load(&dir.join("ps.toml"))?;
    let ca = Ca::load(&dir.join("ca"))
        .with_context(|| format!("loading the deployment CA from {}/ca", dir.display()))?;
    let identity = ServerIdentity::load(&dir.join("server"))?;
    let escrow: EscrowFile = serde_json::from_slice(
        &std::fs::read(dir.join("escrow.json")).context("reading escrow.json")?,
    )
    .context("parsing escrow.json")?;
    Ok(Deployment {
        dir: dir.to_owned(),
        config,
        ca,
        identity,
        escrow,
    })
}

/// Add a bootstrap token allowing `uses` registrations (safe while the server runs).
pub fn new_token(dir: &Path, ttl: Duration, uses: u32) -> anyhow::Result<Token> {
    open(dir)?;
    Ok(TokenStore::open_or_create(&tokens_dir(dir))?.add(ttl, uses, SystemTime::now())?)
}

/// Where the bootstrap tokens live.
pub fn tokens_dir(dir: &Path) -> PathBuf {
    dir.join("tokens")
}

/// Where the registered machines live.
pub fn machines_dir(dir: &Path) -> PathBuf {
    dir.join("machines")
}

/// Makes sure the target store belongs to this deployment: an empty store gets this
/// deployment's escrow metadata (failover needs only the store and the passphrase); a
/// store holding another deployment's escrow key (a reused bucket or prefix) is refused
/// now, not discovered at failover.
pub async fn claim_store_escrow(
    store: &ripcord_store::Store,
    url: &str,
    escrow: &EscrowFile,
) -> anyhow::Result<()> {
    match store.put_escrow(&serde_json::to_vec_pretty(escrow)?).await {
        Ok(()) => Ok(()),
        Err(ripcord_store::Error::EscrowConflict { .. }) => {
            let bytes = store.get_escrow().await?;
            let theirs: EscrowFile = serde_json::from_slice(&bytes).with_context(|| {
                format!("the escrow metadata in the target store {url} is corrupt")
            })?;
            if theirs.public_key == escrow.public_key {
                return Ok(());
            }
            bail!(
                "the target store {url} belongs to another deployment: its escrow key is {}, \
                 this deployment's is {}. A reused bucket or prefix? Point `target` in ps.toml \
                 at an empty location (or at this deployment's own store)",
                hex::encode(theirs.public_key),
                hex::encode(escrow.public_key)
            )
        }
        Err(e) => Err(e).with_context(|| format!("writing escrow metadata to {url}")),
    }
}
