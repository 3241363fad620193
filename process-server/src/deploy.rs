//! A deployment directory: the CA, the server identity, bootstrap tokens, the key-escrow
//! public key, the disk registry, the configuration, and (by default) the cache.
//!
//! ```text
//! <dir>/ps.toml        configuration (optional; defaults documented in config.rs)
//! <dir>/ca/            deployment CA (ca.crt, ca.key 0600; a joined server has ca.crt only)
//! <dir>/server/        this server's certificate chain and key
//! <dir>/tokens/        agents' bootstrap tokens (hashed secrets; single use unless created with more)
//! <dir>/ps-tokens/     process servers' join tokens (config role)
//! <dir>/machines/      registered machines and their current certificates (by hash)
//! <dir>/escrow.json    key-escrow public key and the KDF salt/parameters
//! <dir>/disks.json     disk registry: owner machine, size, wrapped data key
//! <dir>/cache/<disk>/  per-disk journals
//! ```

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail, ensure};
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
    /// The CA with its key: `None` on a server that joined a deployment (`config-role` in
    /// ps.toml), which registers no agents.
    pub ca: Option<Ca>,
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
///
/// `escrow.json` is written last: a deployment is complete exactly when it exists. An init
/// cut off before it (a kill, a power cut, a full disk) left pieces no agent can have used
/// (the server does not open without `escrow.json`), so the next init clears them and
/// starts over instead of refusing forever. Pieces next to a disk registry or a registered
/// machine are not an interrupted init, and are refused.
pub fn init(
    dir: &Path,
    names: &[&str],
    passphrase: &[u8],
    params: EscrowParams,
    token_ttl: Duration,
) -> anyhow::Result<InitOutput> {
    if dir.join("escrow.json").exists() {
        bail!(
            "{} already holds a deployment (escrow.json exists)",
            dir.display()
        );
    }
    clear_interrupted_init(dir)?;
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
    let ca = Ca::create(&dir.join("ca"), "ripcord deployment CA")?;
    let identity = ca.issue_server(names)?;
    identity.save(&dir.join("server"))?;
    MachineStore::open(&machines_dir(dir))?;
    let token =
        TokenStore::open_or_create(&tokens_dir(dir))?.add(token_ttl, 1, SystemTime::now())?;
    let escrow = EscrowFile {
        public_key: secret.public_key(),
        params,
    };
    write_atomic(
        &dir.join("escrow.json"),
        &serde_json::to_vec_pretty(&escrow)?,
    )?;
    Ok(InitOutput {
        token,
        ca_hash: ca.hash(),
    })
}

/// The pieces an init writes before `escrow.json`, cleared when an earlier init was cut off.
const INIT_PIECES: [&str; 4] = ["ca", "server", "tokens", "machines"];

/// Removes what an interrupted init left in `dir` (no `escrow.json`); refuses when the
/// directory also holds what only a running deployment writes.
fn clear_interrupted_init(dir: &Path) -> anyhow::Result<()> {
    let present: Vec<&str> = INIT_PIECES
        .into_iter()
        .filter(|p| dir.join(p).exists())
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let registered = machines_dir(dir).exists()
        && !MachineStore::open(&machines_dir(dir))
            .and_then(|store| store.list())
            .with_context(|| format!("reading the machines of {}", dir.display()))?
            .is_empty();
    if dir.join("disks.json").exists() || registered {
        bail!(
            "{} holds a deployment's disks or machines but no escrow.json: it was damaged, \
             not left by an interrupted init. Restore escrow.json from a backup (the target \
             store holds a copy) rather than creating a new deployment over it",
            dir.display()
        );
    }
    for piece in present {
        let path = dir.join(piece);
        std::fs::remove_dir_all(&path)
            .with_context(|| format!("clearing {} left by an interrupted init", path.display()))?;
    }
    ripcord_crashsafe::sync_dir(dir).with_context(|| format!("syncing {}", dir.display()))
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
    let ca = match config.config_role {
        Some(_) => None,
        None => Some(
            Ca::load(&dir.join("ca"))
                .with_context(|| format!("loading the deployment CA from {}/ca", dir.display()))?,
        ),
    };
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
    ensure!(
        open(dir)?.ca.is_some(),
        "{} joined a deployment and registers no agents: create their tokens on the \
         configuration role's server",
        dir.display()
    );
    Ok(TokenStore::open_or_create(&tokens_dir(dir))?.add(ttl, uses, SystemTime::now())?)
}

/// Where the agents' bootstrap tokens live.
pub fn tokens_dir(dir: &Path) -> PathBuf {
    dir.join("tokens")
}

/// Where the process servers' join tokens live (a separate store: an agent's token never
/// joins a server, nor a server's token registers a machine).
pub fn server_tokens_dir(dir: &Path) -> PathBuf {
    dir.join("ps-tokens")
}

/// Add a join token for a process server (on the configuration role's deployment).
pub fn new_server_token(dir: &Path, ttl: Duration) -> anyhow::Result<Token> {
    let dep = open(dir)?;
    ensure!(
        dep.config.runs(crate::config::Role::Config),
        "{} does not run the config role: create join tokens on the configuration role's \
         server",
        dir.display()
    );
    Ok(TokenStore::open_or_create(&server_tokens_dir(dir))?.add(ttl, 1, SystemTime::now())?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_seal::KdfParams;

    fn init_in(dir: &Path) -> anyhow::Result<InitOutput> {
        let kdf = KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        init(
            dir,
            &["localhost"],
            b"a passphrase",
            EscrowParams::generate(kdf)?,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn an_init_cut_off_before_escrow_json_is_redone_by_the_next_init() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ps");
        let first = init_in(&dir).unwrap();
        // What a kill between the CA and the last write leaves: every piece but escrow.json.
        std::fs::remove_file(dir.join("escrow.json")).unwrap();
        let err = open(&dir)
            .err()
            .expect("a deployment without escrow.json opened");
        assert!(format!("{err:#}").contains("escrow.json"), "{err:#}");

        let second = init_in(&dir).expect("the next init after an interrupted one");
        assert_ne!(first.ca_hash, second.ca_hash, "the old CA was kept");
        let deployment = open(&dir).expect("the redone deployment opens");
        assert_eq!(deployment.ca.unwrap().hash(), second.ca_hash);
        let tokens = std::fs::read_dir(tokens_dir(&dir)).unwrap().count();
        assert!(tokens >= 1, "no token store");
    }

    #[test]
    fn a_complete_deployment_is_never_initialised_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ps");
        let first = init_in(&dir).unwrap();
        let err = init_in(&dir).err().expect("a second init went ahead");
        assert!(
            format!("{err:#}").contains("already holds a deployment"),
            "{err:#}"
        );
        assert_eq!(open(&dir).unwrap().ca.unwrap().hash(), first.ca_hash);
    }

    #[test]
    fn a_damaged_deployment_with_disks_is_not_taken_for_an_interrupted_init() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ps");
        let first = init_in(&dir).unwrap();
        std::fs::write(dir.join("disks.json"), b"{}").unwrap();
        std::fs::remove_file(dir.join("escrow.json")).unwrap();
        let err = init_in(&dir)
            .err()
            .expect("init replaced a damaged deployment");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("no escrow.json") && msg.contains("damaged"),
            "{msg}"
        );
        // Nothing was cleared: the CA is the one the agents trust.
        assert_eq!(
            Ca::load(&dir.join("ca")).unwrap().hash(),
            first.ca_hash,
            "the CA was replaced"
        );
    }
}
