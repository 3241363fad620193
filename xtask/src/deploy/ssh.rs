//! Commands on a host through the system's `ssh` client: batch mode (no prompts), host keys
//! checked against the inventory's known_hosts only (an unknown or changed key fails;
//! nothing is added), and secrets passed on standard input, never in the command.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::inventory::{Deployment, Host};

/// How to reach one host.
#[derive(Clone, Debug)]
pub struct Ssh {
    pub host: String,
    dest: String,
    port: u16,
    known_hosts: PathBuf,
    identity: Option<PathBuf>,
}

/// `s` quoted for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Ssh {
    pub fn new(deployment: &Deployment, host: &Host) -> Ssh {
        Ssh {
            host: host.name.clone(),
            dest: host.ssh.clone(),
            port: host.ssh_port,
            known_hosts: deployment.known_hosts.clone(),
            identity: deployment.identity.clone(),
        }
    }

    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
            ])
            .args(["-o", "LogLevel=ERROR", "-p"])
            .arg(self.port.to_string());
        if let Some(id) = &self.identity {
            c.arg("-i").arg(id).args(["-o", "IdentitiesOnly=yes"]);
        }
        c.arg(&self.dest).arg("--").arg(script);
        c
    }

    /// Runs `script` (a shell command line) on the host; returns its standard output.
    pub fn run(&self, script: &str) -> anyhow::Result<String> {
        self.run_with_input(script, &[])
    }

    /// Whether the shell condition `test` (e.g. `test -f /path`) holds on the host.
    pub fn holds(&self, test: &str) -> anyhow::Result<bool> {
        Ok(self.run(&format!("{test} && echo yes || echo no"))?.trim() == "yes")
    }

    /// Like [`Ssh::run`], with `input` on the command's standard input (secrets).
    pub fn run_with_input(&self, script: &str, input: &[u8]) -> anyhow::Result<String> {
        let mut child = self
            .command(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh (install openssh-client)")?;
        let mut stdin = child.stdin.take().expect("piped");
        // A command that does not read its input closes the pipe early: not an error.
        let _ = stdin.write_all(input);
        drop(stdin);
        let out = child.wait_with_output().context("waiting for ssh")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.code() == Some(255) {
                bail!(
                    "{}: ssh {} failed: {} (is the host up, its key in {}, and our key \
                     authorized?)",
                    self.host,
                    self.dest,
                    err.trim(),
                    self.known_hosts.display()
                );
            }
            bail!(
                "{}: `{}` failed: {}",
                self.host,
                first_line(script),
                err.trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `content` to `path` on the host with `mode`, atomically (a temporary name,
    /// then rename), creating its directory.
    pub fn put(&self, content: &[u8], path: &str, mode: u32) -> anyhow::Result<()> {
        let dir = path.rsplit_once('/').map_or("/", |(d, _)| d);
        let tmp = format!("{path}.ripcord-deploy");
        self.run_with_input(
            &format!(
                "umask 077 && mkdir -p {d} && cat > {t} && chmod {mode:o} {t} && mv -f {t} {p}",
                d = quote(dir),
                t = quote(&tmp),
                p = quote(path),
            ),
            content,
        )
        .with_context(|| format!("{}: installing {path}", self.host))?;
        Ok(())
    }
}

fn first_line(script: &str) -> &str {
    let line = script.lines().next().unwrap_or_default();
    &line[..line.len().min(80)]
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting_survives_a_shell() {
        for s in ["plain", "with space", "it's", "$(rm -rf /)", "a'b'c\"d"] {
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("printf %s {}", quote(s))])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), s);
        }
    }
}
