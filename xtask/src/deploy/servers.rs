//! The process servers of a deployment: the primary (it holds the deployment made by
//! `ripcord-ps init`, and the configuration role when the inventory has one), then each
//! other server, which joins the primary's configuration role (`ripcord-ps join`) with a
//! fresh single-use process-server token.
//!
//! Invariants:
//! - A server is converged only after the one before it is healthy; a joining server is
//!   healthy once it says so itself *and* the configuration role shows it green (it has
//!   reported), so the agents registered next can be placed on it.
//! - Secrets (the passphrase, tokens) reach a host on the SSH session's standard input,
//!   never on a command line.
//! - A host holds a complete deployment directory exactly when its `escrow.json` exists
//!   (init and join both write it last): that, and nothing else, decides "fresh".

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use super::{
    File, Options, PS_BINARIES, converge_service, ensure_running, fresh_token, install,
    inventory::{self, Host, Inventory, Role},
    layout, role_files, say,
    ssh::{Ssh, quote},
    toml_string,
    units::Service,
};

/// The first line of every ps.toml deploy writes.
const DEPLOY_HEADER: &str =
    "# Written by `cargo xtask deploy` from the inventory; changes are overwritten.";

/// Whether the host holds a complete deployment directory.
fn holds_deployment(ssh: &Ssh) -> anyhow::Result<bool> {
    ssh.holds(&format!("test -f {}/escrow.json", layout::PS_DIR))
}

/// Installs and starts the primary process server, creating the deployment on a fresh
/// host; returns once it is healthy.
pub(super) fn converge_primary(
    inv: &Inventory,
    ps: &Ssh,
    binaries: &std::collections::BTreeMap<&'static str, Vec<u8>>,
    passphrase: &[u8],
    opts: &Options,
    changed: &mut usize,
) -> anyhow::Result<()> {
    let host = inv.primary_host();
    let mut files = role_files(binaries, PS_BINARIES, Service::ProcessServer)?;
    if !holds_deployment(ps)? {
        install(ps, &files, opts.upgrade, changed)?;
        say(&format!("{}: creating the deployment", host.name));
        // The passphrase arrives on standard input into a private file on /run (memory,
        // never the disk), which init reads (it refuses files others can read) and which
        // goes right after, whatever init did.
        ps.run_with_input(
            &format!(
                "umask 077; f=$(mktemp /run/ripcord-passphrase.XXXXXX) || exit 1; cat > \"$f\"; \
                 {}/ripcord-ps init --dir {} --name {} --kdf-memory-mib {} --passphrase-file \
                 \"$f\"; rc=$?; rm -f \"$f\"; exit $rc",
                layout::BIN_DIR,
                layout::PS_DIR,
                quote(host.address()),
                inv.deployment.kdf_memory_mib
            ),
            passphrase,
        )
        .context("ripcord-ps init")?;
        *changed += 1;
    }
    let ps_toml = ps_toml(inv);
    keeps_cache_dir(ps, &ps_toml)?;
    files.push(File {
        path: format!("{}/ps.toml", layout::PS_DIR),
        content: ps_toml.into_bytes(),
        mode: 0o600,
    });
    let manager = inv.deployment.service_manager;
    let touched = install(ps, &files, opts.upgrade, changed)?;
    converge_service(ps, Service::ProcessServer, manager, touched, changed)?;
    wait_healthy(ps, None, manager, opts.timeout)
        .context("nothing after it was touched (the primary process server comes first)")
}

/// Installs a process server that joins the primary's configuration role (on a fresh
/// host: `ripcord-ps join`), its ps.toml (what join wrote, with the inventory's settings),
/// starts it, and waits until it is healthy and the configuration role shows it green.
pub(super) fn converge_joining(
    inv: &Inventory,
    primary: &Ssh,
    ps: &Ssh,
    host: &Host,
    binaries: &std::collections::BTreeMap<&'static str, Vec<u8>>,
    opts: &Options,
    changed: &mut usize,
) -> anyhow::Result<()> {
    let mut files = role_files(binaries, PS_BINARIES, Service::ProcessServer)?;
    if !holds_deployment(ps)? {
        install(ps, &files, opts.upgrade, changed)?;
        let (token, ca_hash) = fresh_token(primary, "process-server")?;
        say(&format!(
            "{}: joining the deployment of {}",
            host.name, primary.host
        ));
        ps.run_with_input(
            &format!(
                "{}/ripcord-ps join --dir {} --config-role {}:{} --ca-hash {} --token-file - \
                 --server-id {} --name {} --listen 0.0.0.0:{}",
                layout::BIN_DIR,
                layout::PS_DIR,
                quote(inv.primary_host().address()),
                inv.deployment.register_port,
                quote(&ca_hash),
                quote(&host.name),
                quote(host.address()),
                inv.deployment.data_port,
            ),
            token.as_bytes(),
        )
        .context("ripcord-ps join")?;
        *changed += 1;
    }
    let ps_toml = joined_ps_toml(inv, host);
    keeps_cache_dir(ps, &ps_toml)?;
    files.push(File {
        path: format!("{}/ps.toml", layout::PS_DIR),
        content: ps_toml.into_bytes(),
        mode: 0o600,
    });
    let touched = install(ps, &files, opts.upgrade, changed)?;
    let manager = inv.deployment.service_manager;
    converge_service(ps, Service::ProcessServer, manager, touched, changed)?;
    wait_healthy(ps, Some((primary, &host.name)), manager, opts.timeout)
        .with_context(|| format!("nothing after {} was touched", host.name))
}

/// The primary's ps.toml, from the inventory.
fn ps_toml(inv: &Inventory) -> String {
    let d = &inv.deployment;
    let roles = if inv.primary_host().has(Role::Config) {
        "[\"config\", \"process\"]"
    } else {
        "[\"process\"]"
    };
    format!(
        "{DEPLOY_HEADER}\n\
         roles = {roles}\nlisten = \"0.0.0.0:{}\"\nregister-listen = \"0.0.0.0:{}\"\n\
         target = {}\nretention-secs = {}\n{}",
        d.data_port,
        d.register_port,
        toml_string(&d.target),
        d.retention_hours * 3600,
        cache_dir_line(inv.primary_host()),
    )
}

fn cache_dir_line(host: &Host) -> String {
    host.cache_dir.as_ref().map_or(String::new(), |dir| {
        format!("cache-dir = {}\n", toml_string(&dir.to_string_lossy()))
    })
}

/// The ps.toml's `cache-dir`, if it sets one.
fn cache_dir_of(ps_toml: &str) -> anyhow::Result<Option<String>> {
    let v: toml::Value = toml::from_str(ps_toml)?;
    Ok(v.get("cache-dir")
        .and_then(|d| d.as_str())
        .map(str::to_owned))
}

/// Refuses to move a server's cache: the journals in the old one (what agents sent and the
/// store may not hold yet) would be left behind. A ps.toml deploy never wrote (init's or
/// join's, on a server deploy has not started yet) may be replaced.
fn keeps_cache_dir(ps: &Ssh, new: &str) -> anyhow::Result<()> {
    let current = ps.run(&format!("cat {}/ps.toml 2>/dev/null; true", layout::PS_DIR))?;
    if !current.starts_with(DEPLOY_HEADER) {
        return Ok(());
    }
    let (was, will) = (cache_dir_of(&current)?, cache_dir_of(new)?);
    ensure!(
        was == will,
        "{}: the inventory moves the process server's cache from {} to {}; deploy does not \
         move journals: stop the server, move the directory, then deploy",
        ps.host,
        was.as_deref().unwrap_or("the default"),
        will.as_deref().unwrap_or("the default"),
    );
    Ok(())
}

/// A joined server's ps.toml: what `ripcord-ps join` writes (its id, the configuration
/// role it reports to, the deployment's target store), with the inventory's settings.
fn joined_ps_toml(inv: &Inventory, host: &Host) -> String {
    let d = &inv.deployment;
    format!(
        "{DEPLOY_HEADER}\n\
         roles = [\"process\"]\nserver-id = {}\nconfig-role = {}\n\
         listen = \"0.0.0.0:{}\"\ntarget = {}\nretention-secs = {}\n{}",
        toml_string(&host.name),
        toml_string(&format!(
            "{}:{}",
            inv.primary_host().address(),
            d.register_port
        )),
        d.data_port,
        toml_string(&d.target),
        d.retention_hours * 3600,
        cache_dir_line(host),
    )
}

/// Until `ripcord-ps health` says green on the host and, for a server that joined
/// (`config_role`: the primary and this server's id), until the configuration role's
/// `ripcord status` shows it green; fails at once if the service stopped running.
fn wait_healthy(
    ps: &Ssh,
    config_role: Option<(&Ssh, &str)>,
    manager: inventory::ServiceManager,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        ensure_running(ps, Service::ProcessServer, manager)?;
        let out = ps.run(&format!(
            "{}/ripcord-ps health --dir {}; echo exit=$?",
            layout::BIN_DIR,
            layout::PS_DIR
        ))?;
        let seen = match (out.contains("exit=0"), config_role) {
            (false, _) => Err(out.trim().to_owned()),
            (true, None) => Ok(()),
            (true, Some((primary, id))) => shown_green(primary, id),
        };
        match seen {
            Ok(()) => {
                say(&format!("{}: process server healthy", ps.host));
                return Ok(());
            }
            Err(why) => ensure!(
                Instant::now() < deadline,
                "{}: the process server is not healthy after {timeout:?}:\n{why}",
                ps.host,
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether the configuration role on `primary` shows server `id` green; the reason if not.
fn shown_green(primary: &Ssh, id: &str) -> Result<(), String> {
    let out = primary
        .run(&format!(
            "{}/ripcord status --json --deployment {}",
            layout::BIN_DIR,
            layout::PS_DIR
        ))
        .map_err(|e| format!("{e:#}"))?;
    let status: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("ripcord status: {e}: {out}"))?;
    let health = status["servers"]
        .as_array()
        .and_then(|servers| servers.iter().find(|s| s["id"] == id))
        .map(|s| s["health"].clone());
    match health {
        Some(h) if h == "green" => Ok(()),
        Some(h) => Err(format!("the configuration role shows it {h}")),
        None => Err("the configuration role does not list it yet".to_owned()),
    }
}
