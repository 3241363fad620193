//! ripcord's process server: receives replication streams from agents over mutual-TLS
//! QUIC, journals them durably on the cache disk, and acknowledges only what is durable.

pub mod config;
pub mod deploy;
pub mod disk;
pub mod frames;
pub mod ingest;
pub mod metrics;
pub mod peers;
pub mod registry;
pub mod replay;
pub mod server;
mod session;
pub mod uploader;

/// Read the deployment passphrase from a file (first line) or `RIPCORD_PASSPHRASE`.
pub fn read_passphrase(file: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let pass = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading passphrase file {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => std::env::var("RIPCORD_PASSPHRASE").map_err(|_| {
            anyhow::anyhow!(
                "give the deployment passphrase with --passphrase-file or RIPCORD_PASSPHRASE"
            )
        })?,
    };
    anyhow::ensure!(
        pass.len() >= 8,
        "the deployment passphrase must be at least 8 characters"
    );
    Ok(pass.into_bytes())
}
