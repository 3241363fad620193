//! The inventory (`deploy.toml`): the hosts, their roles and devices, how to reach them
//! over SSH, and the deployment's settings. Unknown keys are refused, and [`Inventory::load`]
//! checks the whole file before anything is contacted, naming every problem at once.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// `deploy.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Inventory {
    pub deployment: Deployment,
    /// Replication policies by name (`[policy.<name>]`). An agent host follows the one it
    /// names (`policy = "..."`), else `default`; without a `[policy.default]`, the
    /// defaults of [`Policy`].
    #[serde(default)]
    pub policy: BTreeMap<String, Policy>,
    #[serde(rename = "host")]
    pub hosts: Vec<Host>,
}

/// A replication policy (the seeds' replication policy, for what a machine's agent
/// decides): how often points come, and how often they are application-consistent. How
/// long points are kept is the process servers' (`retention-hours` in `[deployment]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Policy {
    /// The longest gap between two recovery points, seconds (1..=3600): past it, the agent
    /// forces a point (agent.toml `max-point-gap-ms`). Default 15.
    #[serde(default = "default_max_point_gap_secs")]
    pub max_point_gap_secs: u64,
    /// Seconds between application-consistent points (hooks and file systems frozen
    /// around the cut); 0 turns them off (agent.toml `app-interval-secs`). Default 3600.
    #[serde(default = "default_app_consistent_every_secs")]
    pub app_consistent_every_secs: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            max_point_gap_secs: default_max_point_gap_secs(),
            app_consistent_every_secs: default_app_consistent_every_secs(),
        }
    }
}

fn default_max_point_gap_secs() -> u64 {
    15
}
fn default_app_consistent_every_secs() -> u64 {
    3600
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
    /// Hours every process server keeps recovery points (ps.toml `retention-secs`; the
    /// newest point is always kept). Default 72.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
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
/// Ten years.
const MAX_RETENTION_HOURS: u64 = 10 * 365 * 24;

fn default_retention_hours() -> u64 {
    72
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
    /// The replication policy its agent follows (agent hosts). Default `default`.
    #[serde(default)]
    pub policy: Option<String>,
    /// The process server's cache directory, where it journals what agents send (process
    /// hosts; best its own disk, as the seeds' cache disk). Placement sends new machines
    /// only to a server whose cache has more than 30% free. Default
    /// `/var/lib/ripcord/ps/cache`. Deploy refuses to change it once set: the journals
    /// would stay behind.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
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
        let servers = self.hosts.iter().filter(|h| h.has(Role::Process)).count();
        let configs = self.hosts.iter().filter(|h| h.has(Role::Config)).count();
        if servers == 0 {
            problems.push("no host has the process role".to_owned());
        }
        if configs > 1 {
            problems.push(format!(
                "{configs} hosts have the config role; a deployment has one"
            ));
        }
        if servers > 1 && configs != 1 {
            problems.push(format!(
                "{servers} hosts have the process role: one of them needs the config role too \
                 (the others join it)"
            ));
        }
        if !(1..=MAX_RETENTION_HOURS).contains(&self.deployment.retention_hours) {
            problems.push(format!(
                "retention-hours must be 1..={MAX_RETENTION_HOURS}, not {}",
                self.deployment.retention_hours
            ));
        }
        for (name, p) in &self.policy {
            if !(1..=3600).contains(&p.max_point_gap_secs) {
                problems.push(format!(
                    "policy {name}: max-point-gap-secs must be 1..=3600, not {}",
                    p.max_point_gap_secs
                ));
            }
        }
        for h in &self.hosts {
            match &h.policy {
                Some(_) if !h.has(Role::Agent) => {
                    problems.push(format!("host {}: `policy` without the agent role", h.name));
                }
                Some(p) if p != "default" && !self.policy.contains_key(p) => {
                    let known: Vec<_> = self.policy.keys().map(String::as_str).collect();
                    problems.push(format!(
                        "host {}: no [policy.{p}] in the inventory (it has {})",
                        h.name,
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ));
                }
                _ => {}
            }
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
                    "host {}: the config role runs inside a process server: give it the process role too",
                    h.name
                ));
            }
            if let Some(dir) = &h.cache_dir {
                if !h.has(Role::Process) {
                    problems.push(format!(
                        "host {}: `cache-dir` without the process role",
                        h.name
                    ));
                }
                if !dir.is_absolute() {
                    problems.push(format!(
                        "host {}: cache-dir {} is not an absolute path",
                        h.name,
                        dir.display()
                    ));
                }
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

    /// The process server that holds the deployment (`ripcord-ps init`): the one with the
    /// config role, else the only one.
    pub fn primary_host(&self) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.has(Role::Config))
            .or_else(|| self.hosts.iter().find(|h| h.has(Role::Process)))
            .expect("validated: a process host")
    }

    /// The other process servers, which join the primary's configuration role
    /// (`ripcord-ps join`), in inventory order.
    pub fn joining_hosts(&self) -> impl Iterator<Item = &Host> + Clone {
        let primary = self.primary_host().name.as_str();
        self.hosts
            .iter()
            .filter(move |h| h.has(Role::Process) && h.name != primary)
    }

    /// The policy `host`'s agent follows.
    pub fn policy_of(&self, host: &Host) -> Policy {
        self.policy
            .get(host.policy.as_deref().unwrap_or("default"))
            .cloned()
            .unwrap_or_default()
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
        assert_eq!(inv.primary_host().name, "ps1");
        assert_eq!(
            inv.joining_hosts()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>(),
            ["ps2"]
        );
        assert_eq!(inv.agent_hosts().count(), 2);
        assert_eq!(inv.deployment.service_manager, ServiceManager::Systemd);
        let by_host =
            |name: &str| inv.policy_of(inv.hosts.iter().find(|h| h.name == name).unwrap());
        assert_eq!(by_host("app1"), Policy::default());
        assert_eq!(
            by_host("db1"),
            Policy {
                max_point_gap_secs: 5,
                app_consistent_every_secs: 300
            }
        );
    }

    #[test]
    fn several_process_servers_need_exactly_one_config_role() {
        let with_roles = |roles: [&str; 2]| {
            let text = format!(
                "[deployment]\npassphrase-file = \"/p\"\ntarget = \"file:///t\"\n\
                 known-hosts = \"/k\"\n\n\
                 [[host]]\nname = \"a\"\nssh = \"root@a\"\nroles = {}\n\n\
                 [[host]]\nname = \"b\"\nssh = \"root@b\"\nroles = {}\n",
                roles[0], roles[1]
            );
            toml::from_str::<Inventory>(&text).unwrap()
        };
        let two_plain = with_roles([r#"["process"]"#, r#"["process"]"#]);
        assert!(
            two_plain
                .problems()
                .join("\n")
                .contains("2 hosts have the process role: one of them needs the config role too"),
            "{:?}",
            two_plain.problems()
        );
        let two_configs = with_roles([r#"["config", "process"]"#, r#"["config", "process"]"#]);
        assert!(
            two_configs
                .problems()
                .join("\n")
                .contains("2 hosts have the config role"),
            "{:?}",
            two_configs.problems()
        );
        // The config host is the primary wherever it stands; the other joins it.
        let scale_out = with_roles([r#"["process"]"#, r#"["config", "process"]"#]);
        assert_eq!(scale_out.problems(), Vec::<String>::new());
        assert_eq!(scale_out.primary_host().name, "b");
        assert_eq!(
            scale_out
                .joining_hosts()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        // A lone process server needs no config role.
        let lone = with_roles([r#"["process"]"#, r#"["agent"]"#]);
        assert!(
            lone.problems().iter().all(|p| !p.contains("role")),
            "{:?}",
            lone.problems()
        );
        assert_eq!(lone.joining_hosts().count(), 0);
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
policy = "gold"

[[host]]
name = "c"
ssh = "10.0.0.2"
roles = ["config"]
devices = ["dev/sdb"]
policy = "gold"
cache-dir = "cache"

[policy.fast]
max-point-gap-secs = 0
"#;
        let inv: Inventory = toml::from_str(text).unwrap();
        let p = inv.problems().join("\n");
        for expected in [
            "no host has the process role",
            "host name \"a b\"",
            "host a b: an agent host needs `devices`",
            "host c: the config role runs inside a process server",
            "host c: `devices` without the agent role",
            "host c: ssh = \"10.0.0.2\" is not user@host",
            "host c: device dev/sdb is not an absolute path",
            "host c: `policy` without the agent role",
            "host a b: no [policy.gold] in the inventory (it has fast)",
            "host c: `cache-dir` without the process role",
            "host c: cache-dir cache is not an absolute path",
            "policy fast: max-point-gap-secs must be 1..=3600, not 0",
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
