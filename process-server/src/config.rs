//! `ps.toml`: the process server's configuration, with documented defaults, validated once
//! at load.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};

/// Process-server configuration (`<deployment>/ps.toml`). Every field is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PsConfig {
    /// The roles this server runs: `process` (receive, journal and upload replication
    /// streams) and `config` (keep the deployment's configuration database,
    /// `<deployment>/control.db`: process servers, machines, disks, health, alerts and the
    /// operators' audit log; `ripcord status` reads it). Default `["config", "process"]`:
    /// the first server runs both. Every server runs `process` today. A server that joined
    /// with `ripcord-ps join` runs `["process"]` and reports to `config-role`.
    pub roles: Vec<Role>,
    /// Where a process-only server reports its heartbeat, health and disks: the
    /// configuration role's registration endpoint, `host:port` (a DNS name or IP address
    /// in its certificate). Written by `ripcord-ps join`; unset on the configuration
    /// role's own server. Replication never waits for it.
    pub config_role: Option<String>,
    /// QUIC endpoint for replication traffic (mutual TLS): the IP address and port to bind
    /// (`[::]:9443` for IPv6), not a host name. Default `0.0.0.0:9443`.
    #[serde(deserialize_with = "bind_address::required")]
    pub listen: SocketAddr,
    /// QUIC endpoint where agents register with a bootstrap token (IP address and port).
    /// Default `0.0.0.0:9442`.
    #[serde(deserialize_with = "bind_address::required")]
    pub register_listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`), IP address and port. Default `127.0.0.1:9444`;
    /// the empty string `""` turns the endpoint off.
    #[serde(with = "bind_address::optional")]
    pub metrics_listen: Option<SocketAddr>,
    /// Identifier reported to agents. Default: the host name.
    pub server_id: String,
    /// Target store the journals are uploaded to (`file:///path` or `s3://bucket/prefix`;
    /// S3 credentials from AWS_* variables). Unset: journal only, nothing uploaded.
    /// `ripcord-ps init` sets `file://<deployment>/target`.
    pub target: Option<String>,
    /// Upload at least this often while data is pending, in ms (100..=600000). Default 2000.
    pub upload_interval_ms: u64,
    /// Recovery points older than this many seconds are deleted, with the data only they
    /// needed (the newest point is always kept). Default 259200 (72 hours).
    pub retention_secs: u64,
    /// How often retention runs, in seconds (1..=86400). Default 300.
    pub gc_interval_secs: u64,
    /// Validity of the client certificates issued to machines, in seconds (60..=3 years).
    /// Default 7776000 (90 days). Agents renew with their current key when a third of
    /// the validity is left.
    pub client_cert_secs: u64,
    /// Memory for frames received and not yet journaled, all connections together, in
    /// MiB (40..=65536). Default 160. Each connection may hold at most 40 MiB of it
    /// (plus its QUIC receive window, 24 MiB), so one peer cannot take it all.
    pub max_inflight_mib: u64,
    /// Directory for the journals (the cache disk). Default `<deployment>/cache`.
    pub cache_dir: Option<PathBuf>,
    /// Journal segment size in MiB (1..=1024). Default 64.
    pub segment_mib: u64,
    /// Stop acknowledging (back-pressure) when the cache file system has less than this
    /// percentage free (0..50). Default 5.
    pub min_free_percent: f64,
    /// ... or less than this many MiB free. Default 256.
    pub min_free_mib: u64,
    /// Most bytes of frames journaled before one fdatasync (group commit), in MiB (1..=256).
    /// Default 16.
    pub group_commit_mib: u64,
    /// Warn when a disk's journal holds data and its newest recovery point is older than
    /// this many seconds (10..=604800). Default 900. The age is also the metric
    /// `ripcord_ps_newest_point_age_seconds`.
    pub point_age_warn_secs: u64,
    /// `[health]`: how the green/orange/red status is sampled (see `crate::health`).
    pub health: crate::health::HealthConfig,
}

impl Default for PsConfig {
    fn default() -> Self {
        PsConfig {
            roles: vec![Role::Config, Role::Process],
            config_role: None,
            listen: "0.0.0.0:9443".parse().expect("literal"),
            register_listen: "0.0.0.0:9442".parse().expect("literal"),
            metrics_listen: Some("127.0.0.1:9444".parse().expect("literal")),
            server_id: hostname(),
            target: None,
            upload_interval_ms: 2000,
            retention_secs: 72 * 3600,
            gc_interval_secs: 300,
            client_cert_secs: 90 * 24 * 3600,
            max_inflight_mib: 160,
            cache_dir: None,
            segment_mib: 64,
            min_free_percent: 5.0,
            min_free_mib: 256,
            group_commit_mib: 16,
            point_age_warn_secs: 900,
            health: crate::health::HealthConfig::default(),
        }
    }
}

/// The host name, or "ripcord-ps".
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ripcord-ps".into())
}

impl PsConfig {
    /// Load and validate; a missing file means all defaults.
    pub fn load(path: &Path) -> anyhow::Result<PsConfig> {
        let cfg = match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PsConfig::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        cfg.validate()
            .with_context(|| format!("invalid {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.roles.contains(&Role::Process),
            "roles must include \"process\" (a server running only the config role is not \
             supported yet)"
        );
        ensure!(
            (1..=1024).contains(&self.segment_mib),
            "segment-mib must be 1..=1024"
        );
        ensure!(
            (0.0..50.0).contains(&self.min_free_percent),
            "min-free-percent must be in [0, 50)"
        );
        ensure!(
            (1..=256).contains(&self.group_commit_mib),
            "group-commit-mib must be 1..=256"
        );
        ensure!(
            !self.server_id.is_empty() && self.server_id.len() <= 256,
            "server-id must be 1..=256 bytes"
        );
        ensure!(
            (40..=65536).contains(&self.max_inflight_mib),
            "max-inflight-mib must be 40..=65536"
        );
        ensure!(
            (10..=7 * 24 * 3600).contains(&self.point_age_warn_secs),
            "point-age-warn-secs must be 10..=604800"
        );
        ensure!(
            (60..=3 * 366 * 24 * 3600).contains(&self.client_cert_secs),
            "client-cert-secs must be 60..=94867200 (3 years)"
        );
        if let Some(addr) = &self.config_role {
            ensure!(
                !self.runs(Role::Config),
                "config-role is for process-only servers: this one runs the config role itself"
            );
            config_role_host(addr)?;
        }
        self.health.validate()?;
        Ok(())
    }

    pub fn runs(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn cache_dir(&self, deployment: &Path) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| deployment.join("cache"))
    }
}

/// The host of a `config-role` address (`host:port`, `[v6]:port`): the name its
/// certificate is checked for.
pub fn config_role_host(addr: &str) -> anyhow::Result<&str> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("config-role {addr:?} is not host:port"))?;
    ensure!(
        port.parse::<u16>().is_ok_and(|p| p != 0) && !host.is_empty(),
        "config-role {addr:?} is not host:port"
    );
    Ok(host.trim_start_matches('[').trim_end_matches(']'))
}

/// A role of a process server (see [`PsConfig::roles`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Config,
    Process,
}

/// Bind addresses in `ps.toml`: an IP address and a port, with an error that says so.
mod bind_address {
    use std::net::SocketAddr;

    use serde::{Deserialize as _, Deserializer, Serializer};

    fn parse<E: serde::de::Error>(text: &str) -> Result<SocketAddr, E> {
        text.parse().map_err(|_| {
            E::custom(format!(
                "{text:?} is not an IP address and port such as 0.0.0.0:9443 or [::]:9443 \
                 (this is the local address to bind; host names are not accepted here)"
            ))
        })
    }

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        parse(&String::deserialize(d)?)
    }

    pub mod optional {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SocketAddr>, D::Error> {
            let text = String::deserialize(d)?;
            if text.trim().is_empty() {
                return Ok(None);
            }
            super::parse::<D::Error>(&text).map(Some)
        }

        pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(a) => s.collect_str(a),
                None => s.serialize_str(""),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() {
        let cfg = PsConfig::default();
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(toml::from_str::<PsConfig>(&text).unwrap(), cfg);
    }

    #[test]
    fn partial_files_take_defaults_and_bad_values_are_named() {
        let cfg: PsConfig = toml::from_str("listen = \"127.0.0.1:7000\"").unwrap();
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.segment_mib, 64);
        let bad: PsConfig = toml::from_str("segment-mib = 0").unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("segment-mib")
        );
        assert!(toml::from_str::<PsConfig>("no-such-key = 1").is_err());
    }

    #[test]
    fn metrics_off_is_the_empty_string_as_documented() {
        let cfg: PsConfig = toml::from_str("metrics-listen = \"\"").unwrap();
        assert_eq!(cfg.metrics_listen, None);
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(
            toml::from_str::<PsConfig>(&text).unwrap().metrics_listen,
            None
        );
    }

    #[test]
    fn a_host_name_in_listen_says_what_is_expected() {
        let err = toml::from_str::<PsConfig>("listen = \"ps.example.com:9443\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not an IP address and port such as 0.0.0.0:9443")
                && err.contains("host names are not accepted"),
            "{err}"
        );
    }

    #[test]
    fn roles_default_to_both_and_a_config_only_server_is_refused() {
        assert!(PsConfig::default().runs(Role::Config) && PsConfig::default().runs(Role::Process));
        let process_only: PsConfig = toml::from_str("roles = [\"process\"]").unwrap();
        process_only.validate().unwrap();
        assert!(!process_only.runs(Role::Config));
        let config_only: PsConfig = toml::from_str("roles = [\"config\"]").unwrap();
        let err = config_only.validate().unwrap_err().to_string();
        assert!(err.contains("must include \"process\""), "{err}");
        assert!(toml::from_str::<PsConfig>("roles = [\"web\"]").is_err());
    }

    #[test]
    fn config_role_addresses_are_host_and_port_on_process_only_servers() {
        let joined: PsConfig =
            toml::from_str("roles = [\"process\"]\nconfig-role = \"ps1.example:9442\"").unwrap();
        joined.validate().unwrap();
        assert_eq!(config_role_host("ps1.example:9442").unwrap(), "ps1.example");
        assert_eq!(config_role_host("[::1]:9442").unwrap(), "::1");
        for bad in ["ps1.example", "ps1:0", ":9442", "ps1:port"] {
            assert!(config_role_host(bad).is_err(), "{bad}");
        }
        let both: PsConfig = toml::from_str("config-role = \"ps1:9442\"").unwrap();
        let err = both.validate().unwrap_err().to_string();
        assert!(err.contains("process-only"), "{err}");
    }
}
