//! Checks of every host before anything changes: reachable over SSH with a known host key,
//! root, a kernel and BTF the agent can use, free space, clock offset, and the protected
//! devices. Every problem of every host is reported together.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    inventory::{Deployment, Host, Role},
    ssh::{Ssh, quote},
};

/// The oldest kernel the agent supports (raw tracepoints with BTF, ring buffers).
const MIN_KERNEL: (u32, u32) = (5, 15);

/// The problems of `host` (empty: ready). `binaries_mib` is what will be installed.
pub fn check(deployment: &Deployment, host: &Host, ssh: &Ssh, binaries_mib: u64) -> Vec<String> {
    let sent = now_secs();
    match ssh.run(&probe_script(host)) {
        Ok(out) => evaluate(
            deployment,
            host,
            &out,
            (sent + now_secs()) / 2.0,
            binaries_mib,
        ),
        Err(e) => vec![format!("{e:#}")],
    }
}

/// One round trip that prints everything [`evaluate`] needs.
fn probe_script(host: &Host) -> String {
    let mut script = String::from(
        "echo uid=$(id -u); echo kernel=$(uname -r); \
         test -e /sys/kernel/btf/vmlinux && echo btf=yes || echo btf=no; \
         for d in /usr/local /var/lib; do echo free $d $(df -Pk $d | awk 'NR==2 {print $4}'); done; \
         echo clock=$(date +%s.%N); ",
    );
    for d in &host.devices {
        let d = quote(&d.to_string_lossy());
        script += &format!("test -b {d} && echo device ok {d} || echo device missing {d}; ");
    }
    script
}

/// The problems in the output `out` of [`probe_script`], which ran at `midpoint` (this
/// machine's clock, seconds) give or take half the round trip.
fn evaluate(
    deployment: &Deployment,
    host: &Host,
    out: &str,
    midpoint: f64,
    binaries_mib: u64,
) -> Vec<String> {
    let mut problems = Vec::new();
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let name = &host.name;
    if field("uid") != "0" {
        problems.push(format!(
            "{name}: the SSH user is not root (uid {})",
            field("uid")
        ));
    }
    if host.has(Role::Agent) {
        let kernel = field("kernel");
        let version = kernel
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok())
            .take(2)
            .collect::<Vec<_>>();
        if version.len() < 2 || (version[0], version[1]) < MIN_KERNEL {
            problems.push(format!(
                "{name}: kernel {kernel} is older than {}.{} (the agent needs raw tracepoints \
                 with BTF)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ));
        }
        if field("btf") != "yes" {
            problems.push(format!(
                "{name}: no BTF (/sys/kernel/btf/vmlinux): the agent's BPF programs cannot \
                 load; use a kernel built with CONFIG_DEBUG_INFO_BTF"
            ));
        }
    }
    let need_mib = deployment.min_free_mib + binaries_mib;
    for line in out.lines().filter_map(|l| l.strip_prefix("free ")) {
        let mut parts = line.split_whitespace();
        let (Some(dir), Some(kib)) = (parts.next(), parts.next()) else {
            continue;
        };
        let free_mib = kib.parse::<u64>().unwrap_or(0) / 1024;
        if free_mib < need_mib {
            problems.push(format!(
                "{name}: not enough space under {dir}: {free_mib} MiB free, {need_mib} MiB \
                 needed (min-free-mib + binaries)"
            ));
        }
    }
    match field("clock").parse::<f64>() {
        Ok(remote) => {
            let offset_ms = ((remote - midpoint) * 1000.0).abs();
            if offset_ms > deployment.max_clock_offset_ms as f64 {
                problems.push(format!(
                    "{name}: clock {offset_ms:.0} ms off this machine's (limit \
                     max-clock-offset-ms = {}); synchronise it (chrony, systemd-timesyncd)",
                    deployment.max_clock_offset_ms
                ));
            }
        }
        Err(_) => problems.push(format!("{name}: could not read its clock")),
    }
    for line in out
        .lines()
        .filter_map(|l| l.strip_prefix("device missing "))
    {
        problems.push(format!("{name}: {line} is not a block device"));
    }
    problems
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> crate::deploy::inventory::Inventory {
        toml::from_str(include_str!("../../../deploy.example.toml")).unwrap()
    }

    fn host<'i>(inv: &'i crate::deploy::inventory::Inventory, name: &str) -> &'i Host {
        inv.hosts.iter().find(|h| h.name == name).unwrap()
    }

    const READY: &str = "uid=0\nkernel=6.18.44-fc-v1272\nbtf=yes\nfree /usr/local 4194304\n\
                         free /var/lib 4194304\nclock=1000.0\ndevice ok /dev/sdb\n";

    #[test]
    fn a_ready_host_has_no_problem() {
        let inv = inventory();
        let db1 = host(&inv, "db1");
        assert_eq!(
            evaluate(&inv.deployment, db1, READY, 1000.2, 100),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_missing_prerequisite_is_named() {
        let inv = inventory();
        let db1 = host(&inv, "db1");
        let out = "uid=1000\nkernel=5.4.0-150-generic\nbtf=no\nfree /usr/local 10240\n\
                   free /var/lib 4194304\nclock=1003.5\ndevice missing /dev/sdb\n";
        let p = evaluate(&inv.deployment, db1, out, 1000.0, 100).join("\n");
        for expected in [
            "db1: the SSH user is not root (uid 1000)",
            "db1: kernel 5.4.0-150-generic is older than 5.15",
            "db1: no BTF",
            "db1: not enough space under /usr/local: 10 MiB free, 1124 MiB needed",
            "db1: clock 3500 ms off",
            "db1: /dev/sdb is not a block device",
        ] {
            assert!(p.contains(expected), "{expected:?} missing from:\n{p}");
        }
        assert!(!p.contains("/var/lib"), "{p}");
        // A process-only host needs no BTF and no particular kernel.
        let ps1 = host(&inv, "ps1");
        let p = evaluate(
            &inv.deployment,
            ps1,
            &READY.replace("btf=yes", "btf=no"),
            1000.0,
            100,
        );
        assert_eq!(p, Vec::<String>::new());
    }
}
