//! `cargo xtask deploy --uninstall`: stops and removes what deploy installed, in the
//! reverse of the install order: every agent first (each stops only once what it sent is
//! durable), then the process servers that joined, then the primary (the configuration
//! role last), then each host's configuration and state (a process server's own
//! `cache-dir` is emptied, not removed: it may be a mounted disk). A host with several
//! roles loses them all. The target store and the protected disks stay.

use std::collections::BTreeMap;

use super::{
    AGENT_BINARIES, PS_BINARIES,
    inventory::{self, Inventory, Role},
    layout, say,
    ssh::{Ssh, quote},
    units::Service,
};

pub(super) fn uninstall(inv: &Inventory, ssh: &BTreeMap<&str, Ssh>) -> anyhow::Result<()> {
    let manager = inv.deployment.service_manager;
    let services = inv
        .agent_hosts()
        .map(|h| (h, Service::Agent, AGENT_BINARIES))
        .chain(
            inv.joining_hosts()
                .chain([inv.primary_host()])
                .map(|h| (h, Service::ProcessServer, PS_BINARIES)),
        );
    for (host, service, bins) in services {
        let s = &ssh[host.name.as_str()];
        service.stop(s, manager, 150)?;
        let mut paths: Vec<String> = bins
            .iter()
            .map(|b| quote(&format!("{}/{b}", layout::BIN_DIR)))
            .collect();
        paths.push(quote(&service.unit_path()));
        s.run(&format!("rm -f {}", paths.join(" ")))?;
        if manager == inventory::ServiceManager::Systemd {
            s.run("systemctl daemon-reload")?;
        }
        say(&format!("{}: removed {}", host.name, service.unit_name()));
    }
    // A file:// target store under the state directory is data, not installed: kept.
    let kept_store = inv
        .deployment
        .target
        .strip_prefix(&format!("file://{}/", layout::STATE_ROOT))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or(".");
    for host in &inv.hosts {
        let keep = if host.has(Role::Process) {
            kept_store
        } else {
            "."
        };
        ssh[host.name.as_str()].run(&format!(
            "rm -rf {} {}; test -d {root} && find {root} -mindepth 1 -maxdepth 1 ! -name {} \
             -exec rm -rf {{}} + ; rmdir {root} 2>/dev/null; true",
            layout::CONF_DIR,
            layout::RUN_DIR,
            quote(keep),
            root = layout::STATE_ROOT,
        ))?;
        // A cache directory of its own: emptied (it may be a mounted disk, so it stays).
        if let Some(cache) = host.cache_dir.as_ref().filter(|_| host.has(Role::Process)) {
            ssh[host.name.as_str()].run(&format!(
                "test -d {dir} && find {dir} -mindepth 1 -delete; true",
                dir = quote(&cache.to_string_lossy()),
            ))?;
        }
    }
    say(&format!(
        "uninstalled; the target store ({}) and the protected disks were left as they are",
        inv.deployment.target
    ));
    Ok(())
}
