//! The inventory (`deploy.toml`): the hosts, their roles and devices, how to reach them
//! over SSH, and the deployment's settings. Unknown keys are refused, and [`Inventory::load`]
//! checks the whole file before anything is contacted, naming every problem at once.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// `deploy.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Inventory {
    pub deployment: Deployment,
    #[serde(rename = "host")]
    pub hosts: Vec<Host>,
}

/// Settings of the whole deployment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Deployment {
    /// Local file whose first line is the deployment passphrase (mode 0600). It reaches the
    /// process server on the SSH session's standard input, never on a command line.
    pub passphrase_file: PathBuf,
    /// Target store URL of the process server (`file:///...` on its host, or `s3://...`).
    pub target: String,
    /// The known_hosts file that verifies every host's key (never accepted blindly).
    pub known_hosts: PathBuf,
    /// SSH private key (default: the SSH client's own choice).
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// How services run: `systemd` (units enabled and started with systemctl) or `exec`
    /// (hosts without systemd as PID 1: the units' exact ExecStart lines, started
    /// detached, with a pid file in /run/ripcord). Default systemd.
    #[serde(default)]
    pub service_manager: ServiceManager,
    /// The process server's data port (QUIC). Default 9443.
    #[serde(default = "default_data_port")]
    pub data_port: u16,
    /// The process server's registration port (QUIC). Default 9442.
    #[serde(default = "default_register_port")]
    pub register_port: u16,
    /// Free space each host needs under /usr/local and /var/lib, MiB (besides the binaries).
    /// Default 1024.
    #[serde(default = "default_min_free_mib")]
    pub min_free_mib: u64,
    /// Largest clock offset from this machine a host may have, ms (certificates and
    /// recovery point times depend on clocks). Default 2000.
    #[serde(default = "default_max_clock_offset_ms")]
    pub max_clock_offset_ms: u64,
    /// Argon2id memory of the escrow key made at the first deployment, MiB. Default 64.
    #[serde(default = "default_kdf_memory_mib")]
    pub kdf_memory_mib: u32,
}

fn default_data_port() -> u16 {
    9443
}
fn default_register_port() -> u16 {
    9442
}
fn default_min_free_mib() -> u64 {
    1024
}
fn default_max_clock_offset_ms() -> u64 {
    2000
}
fn default_kdf_memory_mib() -> u32 {
    64
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceManager {
    #[default]
    Systemd,
    Exec,
}

/// A role a host plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The configuration role: the process server on this host also keeps the
    /// configuration database (`roles = ["config", "process"]` in its ps.toml; `ripcord
    /// status` reads it). It runs inside a process server, so `config` needs `process` on
    /// the same host.
    Config,
    Process,
    Agent,
}

/// One host.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Host {
    /// The machine id its agent registers as (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// SSH destination, `user@host` (the user must be root).
    pub ssh: String,
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
    pub roles: Vec<Role>,
    /// The address agents reach a process server at (default: the host part of `ssh`).
    #[serde(default)]
    pub address: Option<String>,
    /// Block devices the agent protects (agent hosts).
    #[serde(default)]
    pub devices: Vec<PathBuf>,
}

fn default_ssh_port() -> u16 {
    22
}

impl Host {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Where other hosts reach this one.
    pub fn address(&self) -> &str {
        self.address
            .as_deref()
            .unwrap_or_else(|| self.ssh.rsplit_once('@').map_or(&self.ssh, |(_, h)| h))
    }
}

impl Inventory {
    pub fn load(path: &Path) -> anyhow::Result<Inventory> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the inventory {}", path.display()))?;
        let inventory: Inventory =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let problems = inventory.problems();
        if !problems.is_empty() {
            bail!(
                "{} is not a usable inventory:\n  - {}",
                path.display(),
                problems.join("\n  - ")
            );
        }
        Ok(inventory)
    }

    /// Every problem of the inventory itself (not of the hosts).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let servers: Vec<_> = self.hosts.iter().filter(|h| h.has(Role::Process)).collect();
        if servers.len() != 1 {
            problems.push(format!(
                "exactly one host must have the process role (scale-out is issue 15); found {}",
                servers.len()
            ));
        }
        for h in &self.hosts {
            let valid = !h.name.is_empty()
                && h.name.len() <= 64
                && h.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !valid {
                problems.push(format!(
                    "host name {:?}: use 1-64 letters, digits, '.', '_' or '-' (it is the agent's machine id)",
                    h.name
                ));
            }
            if self.hosts.iter().filter(|o| o.name == h.name).count() > 1 {
                problems.push(format!("host name {} appears more than once", h.name));
            }
            if h.roles.is_empty() {
                problems.push(format!("host {}: no roles", h.name));
            }
            if h.has(Role::Config) && !h.has(Role::Process) {
                problems.push(format!(
                    "host {}: the config role runs with the process role on one host for now",
                    h.name
                ));
            }
            if h.has(Role::Agent) && h.devices.is_empty() {
                problems.push(format!("host {}: an agent host needs `devices`", h.name));
            }
            if !h.has(Role::Agent) && !h.devices.is_empty() {
                problems.push(format!("host {}: `devices` without the agent role", h.name));
            }
            if !h.ssh.contains('@') {
                problems.push(format!(
                    "host {}: ssh = {:?} is not user@host",
                    h.name, h.ssh
                ));
            }
            for d in &h.devices {
                if !d.is_absolute() {
                    problems.push(format!(
                        "host {}: device {} is not an absolute path",
                        h.name,
                        d.display()
                    ));
                }
            }
        }
        problems
    }

    pub fn process_host(&self) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.has(Role::Process))
            .expect("validated: one process host")
    }

    pub fn agent_hosts(&self) -> impl Iterator<Item = &Host> + Clone {
        self.hosts.iter().filter(|h| h.has(Role::Agent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy.example.toml");

    #[test]
    fn the_example_inventory_is_valid() {
        let inv: Inventory = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(inv.problems(), Vec::<String>::new());
        assert_eq!(inv.process_host().name, "ps1");
        assert_eq!(inv.agent_hosts().count(), 2);
        assert_eq!(inv.deployment.service_manager, ServiceManager::Systemd);
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let text = r#"
[deployment]
passphrase-file = "/root/pass"
target = "file:///var/lib/ripcord/target"
known-hosts = "/root/.ssh/known_hosts"

[[host]]
name = "a b"
ssh = "root@10.0.0.1"
roles = ["agent"]

[[host]]
name = "c"
ssh = "10.0.0.2"
roles = ["config"]
devices = ["dev/sdb"]
"#;
        let inv: Inventory = toml::from_str(text).unwrap();
        let p = inv.problems().join("\n");
        for expected in [
            "exactly one host must have the process role",
            "host name \"a b\"",
            "host a b: an agent host needs `devices`",
            "host c: the config role runs with the process role",
            "host c: `devices` without the agent role",
            "host c: ssh = \"10.0.0.2\" is not user@host",
            "host c: device dev/sdb is not an absolute path",
        ] {
            assert!(p.contains(expected), "{expected:?} missing from:\n{p}");
        }
        let unknown =
            toml::from_str::<Inventory>(&text.replace("roles = [\"agent\"]", "role = \"agent\""));
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("unknown field `role`")
        );
    }
}
