//! systemd units of the roles, hardened as far as each role allows, and the two ways to
//! run them: systemd itself, or (hosts without systemd as PID 1) the unit's exact
//! `ExecStart` line started detached as root with an empty environment, a pid file in
//! /run/ripcord and its output in /var/log/ripcord.

use anyhow::bail;

use super::{inventory::ServiceManager, layout, ssh::Ssh};

/// A service deploy installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    ProcessServer,
    Agent,
}

impl Service {
    pub fn unit_name(self) -> &'static str {
        match self {
            Service::ProcessServer => "ripcord-ps.service",
            Service::Agent => "ripcord-agent.service",
        }
    }

    pub fn unit_path(self) -> String {
        format!("{}/{}", layout::UNIT_DIR, self.unit_name())
    }

    fn exec_start(self) -> String {
        match self {
            Service::ProcessServer => {
                format!(
                    "{}/ripcord-ps serve --dir {}",
                    layout::BIN_DIR,
                    layout::PS_DIR
                )
            }
            Service::Agent => format!(
                "{}/ripcord-agent protect --config {} --state-dir {}",
                layout::BIN_DIR,
                layout::AGENT_CONFIG,
                layout::AGENT_DIR
            ),
        }
    }

    /// The unit file.
    pub fn unit(self) -> String {
        // Both: no privilege gain, private /tmp, a read-only system but for their state,
        // no home directories, no kernel tunables or modules, no SUID files.
        let common = format!(
            "NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=strict\nProtectHome=yes\n\
             ProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictSUIDSGID=yes\n\
             LockPersonality=yes\nUMask=0077\nReadWritePaths={}\n",
            layout::STATE_ROOT
        );
        let (description, specific) = match self {
            Service::ProcessServer => (
                "ripcord process server (journals agents' streams, uploads recovery points)",
                // Needs no capability: ports above 1024, files it owns.
                "CapabilityBoundingSet=\nProtectKernelTunables=yes\nPrivateDevices=yes\n\
                 RestrictNamespaces=yes\nTimeoutStopSec=30\nLimitNOFILE=65536\n"
                    .to_owned(),
            ),
            Service::Agent => (
                "ripcord agent (captures block writes with BPF, replicates them)",
                // BPF programs and maps (CAP_BPF, CAP_PERFMON), FIFREEZE for app-consistent
                // points (CAP_SYS_ADMIN), raw reads of protected devices, locked memory for
                // maps; /run/ripcord holds its device locks. It stops by waiting until what
                // it sent is durable: give it time.
                format!(
                    "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_ADMIN CAP_SYS_RESOURCE \
                     CAP_IPC_LOCK CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH\nLimitMEMLOCK=infinity\n\
                     ReadWritePaths={}\nTimeoutStopSec=150\n",
                    layout::RUN_DIR
                ),
            ),
        };
        format!(
            "# Installed by `cargo xtask deploy`; changes are overwritten by the next deploy.\n\
             [Unit]\nDescription={description}\nAfter=network-online.target\n\
             Wants=network-online.target\n\n[Service]\nType=simple\nExecStart={}\n\
             Restart=on-failure\nRestartSec=2\nKillSignal=SIGTERM\n{common}{specific}\n\
             [Install]\nWantedBy=multi-user.target\n",
            self.exec_start()
        )
    }

    fn pid_file(self) -> String {
        format!("{}/{}.pid", layout::RUN_DIR, self.unit_name())
    }

    /// Starts the installed unit (enabled at boot under systemd).
    pub fn start(self, ssh: &Ssh, manager: ServiceManager) -> anyhow::Result<()> {
        let unit = self.unit_name();
        match manager {
            ServiceManager::Systemd => {
                ssh.run(&format!(
                    "systemctl daemon-reload && systemctl enable --now {unit}"
                ))?;
            }
            ServiceManager::Exec => {
                // The unit's own ExecStart, so what runs is what systemd would run.
                let log = format!("{}/{unit}.log", layout::LOG_DIR);
                ssh.run(&format!(
                    "set -e; mkdir -p {run} {logs}; cmd=$(sed -n 's/^ExecStart=//p' {path}); \
                     test -n \"$cmd\"; cd /; setsid env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
                     sh -c 'echo $$ > {pid}; exec '\"$cmd\" < /dev/null >> {log} 2>&1 &",
                    run = layout::RUN_DIR,
                    logs = layout::LOG_DIR,
                    path = self.unit_path(),
                    pid = self.pid_file(),
                ))?;
            }
        }
        Ok(())
    }

    /// The last lines of the service's log.
    pub fn log_tail(self, ssh: &Ssh, manager: ServiceManager) -> anyhow::Result<String> {
        match manager {
            ServiceManager::Systemd => ssh.run(&format!(
                "journalctl -u {} -n 20 --no-pager",
                self.unit_name()
            )),
            ServiceManager::Exec => ssh.run(&format!(
                "tail -n 20 {}/{}.log 2>/dev/null; true",
                layout::LOG_DIR,
                self.unit_name()
            )),
        }
    }

    /// Whether the service runs.
    pub fn running(self, ssh: &Ssh, manager: ServiceManager) -> anyhow::Result<bool> {
        match manager {
            ServiceManager::Systemd => {
                ssh.holds(&format!("systemctl is-active --quiet {}", self.unit_name()))
            }
            ServiceManager::Exec => ssh.holds(&format!(
                "test -f {p} && kill -0 $(cat {p}) 2>/dev/null",
                p = self.pid_file()
            )),
        }
    }

    /// Stops the service (SIGTERM; it finishes what it must) and waits up to `secs`.
    pub fn stop(self, ssh: &Ssh, manager: ServiceManager, secs: u32) -> anyhow::Result<()> {
        match manager {
            ServiceManager::Systemd => {
                ssh.run(&format!(
                    "systemctl disable --now {} 2>/dev/null || true",
                    self.unit_name()
                ))?;
            }
            ServiceManager::Exec => {
                let out = ssh.run(&format!(
                    "p={pid}; test -f $p || exit 0; pid=$(cat $p); kill -TERM $pid 2>/dev/null \
                     || {{ rm -f $p; exit 0; }}; i=0; while kill -0 $pid 2>/dev/null; do \
                     i=$((i+1)); if [ $i -gt {n} ]; then echo stuck; exit 0; fi; sleep 0.1; \
                     done; rm -f $p",
                    pid = self.pid_file(),
                    n = secs * 10,
                ))?;
                if out.trim() == "stuck" {
                    bail!(
                        "{}: {} did not stop within {secs} s",
                        ssh.host,
                        self.unit_name()
                    );
                }
            }
        }
        Ok(())
    }
}

/// `systemd-analyze verify` of the installed unit on the host (it checks that the
/// ExecStart binary exists there too); fails with what it printed. A host without
/// systemd-analyze is skipped.
pub fn verify(ssh: &Ssh, service: Service) -> anyhow::Result<()> {
    let out = ssh.run(&format!(
        "command -v systemd-analyze >/dev/null || {{ echo rc=0; exit 0; }}; \
         out=$(systemd-analyze verify {} 2>&1); rc=$?; echo \"$out\"; echo \"rc=$rc\"",
        service.unit_path()
    ))?;
    if !out.trim_end().ends_with("rc=0") {
        bail!(
            "{}: systemd-analyze verify {}:\n{}",
            ssh.host,
            service.unit_path(),
            out.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_hardened_as_far_as_each_role_allows() {
        let ps = Service::ProcessServer.unit();
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
            "PrivateDevices=yes",
            "ExecStart=/usr/local/bin/ripcord-ps serve --dir /var/lib/ripcord/ps",
        ] {
            assert!(ps.contains(line), "{line:?} missing:\n{ps}");
        }
        let agent = Service::Agent.unit();
        assert!(agent.contains("CAP_BPF") && agent.contains("NoNewPrivileges=yes"));
        // The agent reads raw devices: no PrivateDevices.
        assert!(!agent.contains("PrivateDevices"), "{agent}");
    }
}
