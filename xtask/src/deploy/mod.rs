//! `cargo xtask deploy`: push installation, upgrades and removal of ripcord over SSH, from
//! an inventory (`deploy.example.toml`), modelled on the seeds' unified setup and push
//! installation of the mobility service.
//!
//! Order of work, each step only once the one before succeeded everywhere:
//! 1. the inventory is checked as a whole ([`inventory`]); the binaries are built once
//!    (release) or taken from `--binaries`;
//! 2. every host is checked ([`preflight`]) and every problem reported before any host is
//!    changed;
//! 3. the primary process server's host: binaries, unit, deployment (`ripcord-ps init`,
//!    the passphrase on standard input) and `ps.toml`; the service started and healthy;
//!    then each other process server, joined to the primary's configuration role
//!    ([`servers`]);
//! 4. each agent host in turn: binaries, unit, `agent.toml`; registered at the primary
//!    (whose configuration role places it on a server) with a fresh single-use token (on
//!    standard input, never a command line); started;
//! 5. wait until every disk finished its initial sync and has a recovery point, with a
//!    progress line per disk.
//!
//! Idempotent: a file is written only when its SHA-256 differs, a service restarted only
//! when one of its files changed, and a run that changes nothing says so. A host already
//! running another version is refused unless `--upgrade`, which goes in the seeds' order
//! (the primary process server, the others, then agents, one host at a time, each healthy
//! before the next).
//! `--uninstall` stops and removes everything deploy installed (agents first, each waiting
//! until what it sent is durable); protected disks and the target store stay. The choices
//! behind this (the system's ssh client, secrets on standard input, convergence by hash)
//! are in docs/decisions/0018.

mod inventory;
mod preflight;
mod progress;
mod servers;
mod ssh;
mod uninstall;
mod units;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use inventory::{Host, Inventory};
use ssh::{Ssh, quote};
use units::Service;

/// Where deploy puts things on a host.
pub mod layout {
    pub const BIN_DIR: &str = "/usr/local/bin";
    pub const UNIT_DIR: &str = "/etc/systemd/system";
    pub const CONF_DIR: &str = "/etc/ripcord";
    pub const AGENT_CONFIG: &str = "/etc/ripcord/agent.toml";
    /// Every role's state; the only directory the services may write besides RUN_DIR.
    pub const STATE_ROOT: &str = "/var/lib/ripcord";
    pub const PS_DIR: &str = "/var/lib/ripcord/ps";
    pub const AGENT_DIR: &str = "/var/lib/ripcord/agent";
    pub const LOG_DIR: &str = "/var/lib/ripcord/log";
    pub const RUN_DIR: &str = "/run/ripcord";
}

/// The binaries deploy installs, by role.
const PS_BINARIES: &[&str] = &["ripcord-ps", "ripcord"];
const AGENT_BINARIES: &[&str] = &["ripcord-agent"];

/// What to do.
pub struct Options {
    pub inventory: PathBuf,
    /// Install these binaries instead of building release ones.
    pub binaries: Option<PathBuf>,
    pub upgrade: bool,
    pub uninstall: bool,
    /// Only check the inventory and the hosts.
    pub check: bool,
    /// How long to wait for services to be healthy and disks to sync.
    pub timeout: Duration,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let inv = Inventory::load(&opts.inventory)?;
    let ssh: BTreeMap<&str, Ssh> = inv
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), Ssh::new(&inv.deployment, h)))
        .collect();
    if opts.uninstall {
        return uninstall::uninstall(&inv, &ssh);
    }
    let passphrase = read_passphrase(&inv.deployment.passphrase_file)?;
    let binaries = binaries(opts.binaries.as_deref())?;
    let binaries_mib = binaries.values().map(|b| b.len() as u64).sum::<u64>() >> 20;

    // Every host first; nothing changes anywhere if any has a problem.
    let problems: Vec<String> = std::thread::scope(|s| {
        let checks: Vec<_> = inv
            .hosts
            .iter()
            .map(|h| {
                let ssh = &ssh[h.name.as_str()];
                let dep = &inv.deployment;
                s.spawn(move || preflight::check(dep, h, ssh, binaries_mib))
            })
            .collect();
        checks
            .into_iter()
            .flat_map(|c| c.join().expect("preflight thread"))
            .collect()
    });
    if !problems.is_empty() {
        bail!(
            "{} problem(s) found; no host was changed:\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    say(&format!("preflight: {} host(s) ready", inv.hosts.len()));
    if opts.check {
        return Ok(());
    }

    let manager = inv.deployment.service_manager;
    let mut changed = 0;
    // The process servers first: the one holding the deployment (and the configuration
    // role), then each that joins it.
    let primary = &ssh[inv.primary_host().name.as_str()];
    servers::converge_primary(&inv, primary, &binaries, &passphrase, opts, &mut changed)?;
    for host in inv.joining_hosts() {
        let joining = &ssh[host.name.as_str()];
        servers::converge_joining(&inv, primary, joining, host, &binaries, opts, &mut changed)?;
    }

    // Then each agent host, one at a time.
    for host in inv.agent_hosts() {
        let agent = &ssh[host.name.as_str()];
        let mut files = role_files(&binaries, AGENT_BINARIES, Service::Agent)?;
        files.push(File {
            path: layout::AGENT_CONFIG.to_owned(),
            content: agent_toml(&inv, host).into_bytes(),
            mode: 0o600,
        });
        let touched = install(agent, &files, opts.upgrade, &mut changed)?;
        let registered = agent.holds(&format!("test -f {}/state.json", layout::AGENT_DIR))?;
        if !registered {
            register(primary, agent, host, &inv)?;
            changed += 1;
        }
        converge_service(agent, Service::Agent, manager, touched, &mut changed)?;
        if touched && opts.upgrade {
            // One host at a time: this one streams again before the next is touched.
            wait_synced([host], &ssh, manager, opts.timeout).with_context(|| {
                format!("upgrade stopped at {}; later hosts untouched", host.name)
            })?;
        }
    }
    wait_synced(inv.agent_hosts(), &ssh, manager, opts.timeout)?;
    if changed == 0 {
        say("nothing to change: every host already runs this deployment");
    } else {
        say(&format!("done: {changed} change(s)"));
    }
    Ok(())
}

fn say(msg: &str) {
    println!("deploy: {msg}");
}

/// The passphrase file's bytes, refusing one others can read.
fn read_passphrase(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("the passphrase file {}", path.display()))?;
    ensure!(
        meta.permissions().mode() & 0o077 == 0,
        "the passphrase file {} can be read by others (mode {:o}): chmod 600 it",
        path.display(),
        meta.permissions().mode() & 0o777
    );
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        !text.is_empty(),
        "the passphrase file {} is empty",
        path.display()
    );
    Ok(text)
}

/// The binaries by name: from `dir`, or built once in release mode.
fn binaries(dir: Option<&Path>) -> anyhow::Result<BTreeMap<&'static str, Vec<u8>>> {
    let dir = match dir {
        Some(d) => d.to_owned(),
        None => {
            say("building release binaries (the agent with its BPF programs)");
            crate::release_binaries()?
        }
    };
    PS_BINARIES
        .iter()
        .chain(AGENT_BINARIES)
        .map(|name| {
            let path = dir.join(name);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("reading the binary {}", path.display()))?;
            Ok((*name, bytes))
        })
        .collect()
}

/// A file deploy installs.
struct File {
    path: String,
    content: Vec<u8>,
    mode: u32,
}

fn role_files(
    binaries: &BTreeMap<&'static str, Vec<u8>>,
    names: &[&str],
    service: Service,
) -> anyhow::Result<Vec<File>> {
    let mut files: Vec<File> = names
        .iter()
        .map(|n| File {
            path: format!("{}/{n}", layout::BIN_DIR),
            content: binaries[n].clone(),
            mode: 0o755,
        })
        .collect();
    files.push(File {
        path: service.unit_path(),
        content: service.unit().into_bytes(),
        mode: 0o644,
    });
    Ok(files)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Installs the files of `files` whose content differs on the host; returns whether any
/// did. A binary that differs from an installed one is an upgrade: without `upgrade` the
/// host is refused before any of its files is written.
fn install(ssh: &Ssh, files: &[File], upgrade: bool, changed: &mut usize) -> anyhow::Result<bool> {
    let paths: Vec<String> = files.iter().map(|f| quote(&f.path)).collect();
    let listing = ssh.run(&format!("sha256sum {} 2>/dev/null; true", paths.join(" ")))?;
    let remote: BTreeMap<&str, &str> = listing
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(h, p)| (p, h)))
        .collect();
    let differing: Vec<&File> = files
        .iter()
        .filter(|f| remote.get(f.path.as_str()) != Some(&sha256_hex(&f.content).as_str()))
        .collect();
    if !upgrade
        && let Some(f) = differing
            .iter()
            .find(|f| f.path.starts_with(layout::BIN_DIR) && remote.contains_key(f.path.as_str()))
    {
        bail!(
            "{}: {} is another version than this deploy's; run with --upgrade to roll the \
             new version out (process server first, then agents one by one)",
            ssh.host,
            f.path
        );
    }
    for f in &differing {
        ssh.put(&f.content, &f.path, f.mode)?;
        say(&format!("{}: installed {}", ssh.host, f.path));
        *changed += 1;
    }
    Ok(!differing.is_empty())
}

/// Starts the service if it is not running, restarts it if its files changed.
fn converge_service(
    ssh: &Ssh,
    service: Service,
    manager: inventory::ServiceManager,
    files_changed: bool,
    changed: &mut usize,
) -> anyhow::Result<()> {
    units::verify(ssh, service)?;
    let running = service.running(ssh, manager)?;
    if running && !files_changed {
        return Ok(());
    }
    if running {
        say(&format!("{}: restarting {}", ssh.host, service.unit_name()));
        service.stop(ssh, manager, 150)?;
    } else {
        say(&format!("{}: starting {}", ssh.host, service.unit_name()));
    }
    service.start(ssh, manager)?;
    *changed += 1;
    Ok(())
}

/// `s` as a TOML string (quoted and escaped).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The agent's configuration: its devices, and its policy (named in the comment).
fn agent_toml(inv: &Inventory, host: &Host) -> String {
    let devices: Vec<String> = host
        .devices
        .iter()
        .map(|d| toml_string(&d.to_string_lossy()))
        .collect();
    let policy = inv.policy_of(host);
    format!(
        "# Written by `cargo xtask deploy` from the inventory; changes are overwritten.\n\
         devices = [{}]\n# policy {}\nmax-point-gap-ms = {}\napp-interval-secs = {}\n",
        devices.join(", "),
        toml_string(host.policy.as_deref().unwrap_or("default")),
        policy.max_point_gap_secs * 1000,
        policy.app_consistent_every_secs,
    )
}

/// A fresh single-use token from the primary process server, and the CA hash: `kind` is
/// `agent` or `process-server` (`ripcord-ps token --for`).
fn fresh_token(primary: &Ssh, kind: &str) -> anyhow::Result<(String, String)> {
    let out = primary.run(&format!(
        "{}/ripcord-ps token --uses 1 --for {kind} --dir {}",
        layout::BIN_DIR,
        layout::PS_DIR
    ))?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("{}: no {name} line from ripcord-ps token", primary.host))
    };
    Ok((field("token:")?, field("ca-hash:")?))
}

/// How long a registration waits for a process server that can take the machine. A server
/// that just started measures its load over its first samples, which deploy's own work
/// (copying binaries, starting services) dominates; idle samples bring it down within a
/// minute or two.
const PLACEMENT_WAIT: Duration = Duration::from_secs(180);

/// What the configuration role answers when no process server can take a machine now.
const NO_SERVER_NOW: &str = "no process server can take a new machine now";

/// Registers the agent of `host` with a fresh single-use token, at the primary process
/// server (with a configuration role, it places the machine on a server). While no server
/// can take the machine now, it asks again (a new token each time) for up to
/// [`PLACEMENT_WAIT`], saying so; any other refusal ends it at once.
fn register(primary: &Ssh, agent: &Ssh, host: &Host, inv: &Inventory) -> anyhow::Result<()> {
    let deadline = Instant::now() + PLACEMENT_WAIT;
    say(&format!("{}: registering with {}", host.name, primary.host));
    loop {
        let (token, ca_hash) = fresh_token(primary, "agent")?;
        let result = agent.run_with_input(
            &format!(
                "{}/ripcord-agent register --server {}:{} --token-file - --ca-hash {} \
                 --machine-id {} --state-dir {}",
                layout::BIN_DIR,
                quote(inv.primary_host().address()),
                inv.deployment.register_port,
                quote(&ca_hash),
                quote(&host.name),
                layout::AGENT_DIR
            ),
            token.as_bytes(),
        );
        let Err(e) = result else {
            return Ok(());
        };
        // The machine is told only that no server can take it; the operator running
        // deploy may see why.
        let servers = primary
            .run(&format!(
                "{}/ripcord ps list --json --deployment {} 2>&1; true",
                layout::BIN_DIR,
                layout::PS_DIR
            ))
            .unwrap_or_default();
        if format!("{e:#}").contains(NO_SERVER_NOW) && Instant::now() < deadline {
            say(&format!(
                "{}: no process server can take it yet (servers and their load: {}); \
                 asking again in 10 s",
                host.name,
                servers.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
            std::thread::sleep(Duration::from_secs(10));
            continue;
        }
        return Err(e).with_context(|| {
            format!(
                "ripcord-agent register (the process servers, as {} sees them:\n{})",
                primary.host,
                servers.trim_end()
            )
        });
    }
}

/// Until every disk of every agent finished its initial sync and has a recovery point
/// acknowledged; prints each disk's progress when it changes.
fn wait_synced<'h>(
    hosts: impl IntoIterator<Item = &'h Host> + Clone,
    ssh: &BTreeMap<&str, Ssh>,
    manager: inventory::ServiceManager,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut view = progress::SyncView::new();
    loop {
        let mut pending = Vec::new();
        for host in hosts.clone() {
            ensure_running(&ssh[host.name.as_str()], Service::Agent, manager)?;
            let out = ssh[host.name.as_str()].run(&format!(
                "{}/ripcord-agent status --json --state-dir {}",
                layout::BIN_DIR,
                layout::AGENT_DIR
            ))?;
            let v: serde_json::Value = serde_json::from_str(&out)
                .with_context(|| format!("{}: agent status: {out}", host.name))?;
            let disks = v["status"]["disks"].as_array().cloned().unwrap_or_default();
            if !v["running"].as_bool().unwrap_or(false) || disks.len() != host.devices.len() {
                pending.push(format!("{}: agent starting", host.name));
                continue;
            }
            for d in disks {
                let device = d["device"].as_str().unwrap_or("?").to_owned();
                let size = d["size_bytes"].as_u64().unwrap_or(0).max(1);
                let synced = d["synced_bytes"].as_u64().unwrap_or(0);
                let done = d["syncing"] == false && d["acked_cuts"].as_u64().unwrap_or(0) > 0;
                let key = format!("{} {device}", host.name);
                view.show(&key, synced * 100 / size, done);
                if !done {
                    pending.push(key);
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "not synced after {timeout:?}: {}",
            pending.join(", ")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Fails, with the end of its log, if `service` does not run on the host.
fn ensure_running(
    ssh: &Ssh,
    service: Service,
    manager: inventory::ServiceManager,
) -> anyhow::Result<()> {
    if service.running(ssh, manager)? {
        return Ok(());
    }
    let log = service.log_tail(ssh, manager).unwrap_or_default();
    bail!(
        "{}: {} is not running; its log ends with:\n{}",
        ssh.host,
        service.unit_name(),
        log.trim()
    );
}
