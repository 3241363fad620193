//! The processes a plan runs: scripts (`sh -c`, in their own process group, killed as a
//! group at their timeout), start commands left running (output to a log file), and
//! readiness checks (a TCP connection, or a command that exits 0).

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::Machine;

pub fn spawn_start(
    cmd: &str,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<std::process::Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .context("running sh")
}

/// Waits until `m` passes its readiness check (if it has one), failing early if its start
/// command exits with an error first.
pub fn wait_ready(
    m: &Machine,
    mut child: Option<(std::process::Child, PathBuf)>,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let Some(ready) = &m.ready else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(ready.timeout_secs);
    loop {
        if let Some((c, log)) = &mut child
            && let Some(status) = c.try_wait()?
        {
            ensure!(
                status.success(),
                "the start command exited with {status} before the machine was ready (log: \
                 {})",
                log.display()
            );
            child = None;
        }
        let passed = match (&ready.tcp, &ready.command) {
            (Some(addr), _) => tcp_accepts(addr),
            (None, Some(cmd)) => run_script(cmd, 30, env).is_ok(),
            (None, None) => true,
        };
        if passed {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "not ready after {} s ({})",
            ready.timeout_secs,
            match (&ready.tcp, &ready.command) {
                (Some(addr), _) => format!("nothing accepts TCP connections on {addr}"),
                (_, Some(cmd)) => format!("`{cmd}` did not succeed"),
                _ => String::new(),
            }
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tcp_accepts(addr: &str) -> bool {
    use std::net::ToSocketAddrs as _;
    addr.to_socket_addrs().is_ok_and(|mut addrs| {
        addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
    })
}

/// A script that failed: its exit status, if it exited.
#[derive(Debug)]
pub struct ScriptFailed {
    pub code: Option<i32>,
    message: String,
}

impl std::fmt::Display for ScriptFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ScriptFailed {}

/// Runs `sh -c cmd` in its own process group; kills the group after `timeout_secs`.
/// Returns its exit status (0); any other outcome is an error.
pub fn run_script(cmd: &str, timeout_secs: u64, env: &[(String, String)]) -> anyhow::Result<i32> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .context("running sh")?;
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        if let Some(status) = child.try_wait()? {
            return match status.code() {
                Some(0) => Ok(0),
                code => Err(ScriptFailed {
                    code,
                    message: format!("`{cmd}` failed ({status})"),
                }
                .into()),
            };
        }
        if Instant::now() >= deadline {
            kill_group(child.id() as i32, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            return Err(ScriptFailed {
                code: None,
                message: format!("`{cmd}` did not finish within {timeout_secs} s (killed)"),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn kill_group(pgid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
}
