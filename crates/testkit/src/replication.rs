//! A process server and replicating agents as child processes, for tests and the demo.

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// The deployment passphrase used by tests.
pub const PASSPHRASE: &str = "ripcord test passphrase";

/// A free UDP port on 127.0.0.1 (bound and released).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding an ephemeral UDP port");
    s.local_addr().expect("local addr").port()
}

/// Polls `f` every 50 ms until it says done, or fails after `timeout` naming `what`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ripcord-ps` with a deployment in a directory; killed on drop.
pub struct ProcessServer {
    pub dir: PathBuf,
    pub passphrase_file: PathBuf,
    pub data_port: u16,
    pub register_port: u16,
    pub metrics_port: u16,
    pub token: String,
    pub ca_hash: String,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl ProcessServer {
    /// Create a deployment under `root` and start serving (journal only, no target store).
    pub fn start(root: &Path) -> anyhow::Result<ProcessServer> {
        Self::start_with_target(root, None)
    }

    /// Like [`ProcessServer::start`], uploading to the target store at `target`.
    pub fn start_with_target(root: &Path, target: Option<&str>) -> anyhow::Result<ProcessServer> {
        Self::start_with_config(root, target, "")
    }

    /// Like [`ProcessServer::start_with_target`], with extra `ps.toml` lines.
    pub fn start_with_config(
        root: &Path,
        target: Option<&str>,
        extra: &str,
    ) -> anyhow::Result<ProcessServer> {
        let dir = root.join("ps");
        let passphrase_file = root.join("passphrase");
        // Private from the start, as the tools require of a passphrase file.
        {
            use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
            let _ = std::fs::remove_file(&passphrase_file);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&passphrase_file)?
                .write_all(PASSPHRASE.as_bytes())?;
        }
        let out = Command::new(crate::binary("ripcord-ps"))
            .args(["init", "--kdf-memory-mib", "8", "--dir"])
            .arg(&dir)
            .arg("--passphrase-file")
            .arg(&passphrase_file)
            .output()
            .context("running ripcord-ps init")?;
        ensure!(
            out.status.success(),
            "ripcord-ps init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> anyhow::Result<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .with_context(|| format!("no {name} in init output:\n{text}"))
        };
        let (token, ca_hash) = (field("token:")?, field("ca-hash:")?);
        let (data_port, register_port, metrics_port) =
            (free_udp_port(), free_udp_port(), free_tcp_port());
        std::fs::write(
            dir.join("ps.toml"),
            format!(
                "listen = \"127.0.0.1:{data_port}\"\nregister-listen = \"127.0.0.1:{register_port}\"\n\
                 metrics-listen = \"127.0.0.1:{metrics_port}\"\nmin-free-mib = 16\nmin-free-percent = 1.0\n\
                 upload-interval-ms = 500\n{}{extra}\n",
                target
                    .map(|t| format!("target = \"{t}\"\n"))
                    .unwrap_or_default()
            ),
        )?;
        let mut ps = ProcessServer {
            log: root.join("ps.log"),
            dir,
            passphrase_file,
            data_port,
            register_port,
            metrics_port,
            token,
            ca_hash,
            child: None,
            starts: 0,
        };
        ps.spawn()?;
        Ok(ps)
    }

    /// The data endpoint agents replicate to (`127.0.0.1:<data_port>`).
    pub fn data_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.data_port))
    }

    /// A new single-use bootstrap token (`ripcord-ps token`).
    pub fn new_token(&self) -> anyhow::Result<String> {
        self.token_with(&["--uses", "1"])
    }

    /// A process-server join token from this (configuration role) server: `ripcord-ps
    /// token --for process-server`.
    pub fn new_server_token(&self) -> anyhow::Result<String> {
        self.token_with(&["--for", "process-server"])
    }

    /// The token `ripcord-ps token <args>` prints.
    fn token_with(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(crate::binary("ripcord-ps"))
            .arg("token")
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .context("running ripcord-ps token")?;
        ensure!(
            out.status.success(),
            "ripcord-ps token {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("token:"))
            .map(|t| t.trim().to_owned())
            .with_context(|| format!("no token: line in the output of ripcord-ps token:\n{text}"))
    }

    /// `ripcord-ps join` of a new server `server_id` into `root/<server_id>` with `token`,
    /// against this server's configuration role; returns its output (stdout, or the error
    /// with stderr).
    pub fn run_join(&self, root: &Path, server_id: &str, token: &str) -> anyhow::Result<String> {
        self.run_join_with(root, server_id, token, &[])
    }

    /// Like [`ProcessServer::run_join`], with more `ripcord-ps join` arguments.
    pub fn run_join_with(
        &self,
        root: &Path,
        server_id: &str,
        token: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let (data_port, metrics_port) = (free_udp_port(), free_tcp_port());
        let out = Command::new(crate::binary("ripcord-ps"))
            .args(["join", "--server-id", server_id, "--name", "127.0.0.1"])
            .arg("--config-role")
            .arg(format!("127.0.0.1:{}", self.register_port))
            .args(["--ca-hash", &self.ca_hash, "--token", token])
            .arg("--listen")
            .arg(format!("127.0.0.1:{data_port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--dir")
            .arg(root.join(server_id))
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .output()
            .context("running ripcord-ps join")?;
        ensure!(
            out.status.success(),
            "ripcord-ps join failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new process server `server_id` joined to this server's configuration role (with a
    /// fresh process-server token), in `root/<server_id>`, serving.
    pub fn join(&self, root: &Path, server_id: &str) -> anyhow::Result<ProcessServer> {
        self.join_with(root, server_id, &[])
    }

    /// Like [`ProcessServer::join`], with more `ripcord-ps join` arguments.
    pub fn join_with(
        &self,
        root: &Path,
        server_id: &str,
        extra: &[&str],
    ) -> anyhow::Result<ProcessServer> {
        self.run_join_with(root, server_id, &self.new_server_token()?, extra)?;
        let mut ps = ProcessServer::joined(root.join(server_id), &self.passphrase_file)?;
        ps.spawn()?;
        Ok(ps)
    }

    /// A joined server's deployment in `dir`, not started ([`ProcessServer::spawn`]).
    pub fn joined(dir: PathBuf, passphrase_file: &Path) -> anyhow::Result<ProcessServer> {
        let config = std::fs::read_to_string(dir.join("ps.toml"))
            .with_context(|| format!("reading {}/ps.toml", dir.display()))?;
        let port = |key: &str| -> anyhow::Result<u16> {
            config
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                .and_then(|v| v.trim_end_matches('"').rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok())
                .with_context(|| format!("no {key} in {}/ps.toml", dir.display()))
        };
        Ok(ProcessServer {
            log: dir.with_extension("log"),
            data_port: port("listen")?,
            register_port: 0,
            metrics_port: port("metrics-listen")?,
            passphrase_file: passphrase_file.to_owned(),
            token: String::new(),
            ca_hash: String::new(),
            dir,
            child: None,
            starts: 0,
        })
    }

    /// (Re)start `ripcord-ps serve`, waiting until it listens.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = self.log.with_extension(format!("{}.log", self.starts));
        let child = Command::new(crate::binary("ripcord-ps"))
            .arg("serve")
            .arg("--dir")
            .arg(&self.dir)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting ripcord-ps serve")?;
        self.child = Some(child);
        wait_for("ripcord-ps to listen", Duration::from_secs(30), || {
            if let Some(s) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "ripcord-ps exited ({s}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("ripcord-ps serving"))
        })
    }

    /// Process id of the running server (0 if stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("ripcord-ps did not stop within 30 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// All server logs so far.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.log.with_extension(format!("{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `ripcord-ps replay` (the server must be stopped).
    pub fn replay(&self, disk: &str, output: &Path, last_cut: bool) -> anyhow::Result<String> {
        let mut cmd = Command::new(crate::binary("ripcord-ps"));
        cmd.args(["replay", "--disk", disk, "--dir"])
            .arg(&self.dir)
            .arg("--output")
            .arg(output)
            .arg("--passphrase-file")
            .arg(&self.passphrase_file)
            .env("RUST_BACKTRACE", "0");
        if last_cut {
            cmd.arg("--last-cut");
        }
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "ripcord-ps replay failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for ProcessServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral TCP port");
    l.local_addr().expect("local addr").port()
}

/// A registered agent identity (state directory).
pub struct AgentIdentity {
    pub state_dir: PathBuf,
    pub machine: String,
}

impl AgentIdentity {
    /// `ripcord-agent register` against `ps`, with a fresh single-use token from
    /// `ripcord-ps token` (made while the server runs, as an operator would).
    pub fn register(
        ps: &ProcessServer,
        root: &Path,
        machine: &str,
    ) -> anyhow::Result<AgentIdentity> {
        let token = ps.new_token()?;
        let state_dir = root.join(format!("agent-{machine}"));
        let out = Command::new(crate::binary("ripcord-agent"))
            .args([
                "register",
                "--machine-id",
                machine,
                "--token",
                &token,
                "--ca-hash",
                &ps.ca_hash,
            ])
            .arg("--server")
            .arg(format!("127.0.0.1:{}", ps.register_port))
            .arg("--data-server")
            .arg(format!("127.0.0.1:{}", ps.data_port))
            .arg("--state-dir")
            .arg(&state_dir)
            .env("RUST_BACKTRACE", "0")
            .output()?;
        ensure!(
            out.status.success(),
            "register failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(AgentIdentity {
            state_dir,
            machine: machine.to_owned(),
        })
    }

    /// The disk id (hex) the agent uses for `device`.
    pub fn disk_id(&self, device: &Path) -> anyhow::Result<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.state_dir.join("state.json"))?)?;
        v["disks"][device.to_string_lossy().as_ref()]["disk_id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no disk id for {} in state.json", device.display()))
    }
}

/// A running `ripcord-agent protect`; killed on drop.
pub struct Replicator {
    child: Option<Child>,
    pub stats_file: PathBuf,
    log: PathBuf,
}

impl Replicator {
    /// Start protecting `devices`; returns once tracking is active.
    pub fn start(
        id: &AgentIdentity,
        devices: &[&Path],
        extra: &[&str],
    ) -> anyhow::Result<Replicator> {
        Self::start_with_env(id, devices, extra, &[])
    }

    /// Like [`Replicator::start`], with extra environment variables for the agent (fault
    /// injection).
    pub fn start_with_env(
        id: &AgentIdentity,
        devices: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Replicator> {
        Self::start_in(None, id, devices, extra, env)
    }

    /// Like [`Replicator::start_with_env`], inside the network namespace `netns` if given
    /// (`ip netns exec`, which execs the agent: the child is the agent itself).
    pub fn start_in(
        netns: Option<&crate::Netns>,
        id: &AgentIdentity,
        devices: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Replicator> {
        let n = std::fs::read_dir(&id.state_dir)
            .map(|d| d.count())
            .unwrap_or(0);
        let ready = id.state_dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let stats_file = id.state_dir.join("stats.json");
        let _ = std::fs::remove_file(&stats_file);
        let log = id
            .state_dir
            .join(format!("agent-{n}-{}.log", crate::nanos()));
        let config: &[&str] = if extra.contains(&"--config") {
            &[]
        } else {
            &["--config", "/dev/null"]
        };
        let mut command = match netns {
            Some(ns) => ns.exec(crate::binary("ripcord-agent")),
            None => Command::new(crate::binary("ripcord-agent")),
        };
        let child = command
            .arg("protect")
            .args(config)
            .arg("--state-dir")
            .arg(&id.state_dir)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--stats-file")
            .arg(&stats_file)
            .args(extra)
            .args(devices)
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut r = Replicator {
            child: Some(child),
            stats_file,
            log,
        };
        wait_for(
            "the agent to start tracking",
            Duration::from_secs(30),
            || {
                if let Some(s) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    bail!("ripcord-agent exited ({s}):\n{}", r.log());
                }
                Ok(ready.exists())
            },
        )?;
        Ok(r)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id of the running agent (0 if stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The latest stats JSON.
    pub fn stats(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(&self.stats_file).ok()?).ok()
    }

    /// Wait until the initial sync of every disk has been read.
    pub fn wait_synced(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for("the initial sync", timeout, || {
            Ok(self.stats().is_some_and(|s| {
                s["disks"]
                    .as_array()
                    .is_some_and(|d| d.iter().all(|d| d["syncing"] == false))
            }))
        })
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: the agent flushes and waits for everything to be durable. Returns whether
    /// it exited successfully, and its log.
    pub fn stop(mut self) -> anyhow::Result<(bool, String)> {
        let mut c = self.child.take().context("already stopped")?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            if let Some(s) = c.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("ripcord-agent did not stop within 180 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok((status.success(), self.log()))
    }

    /// Wait for the process to exit by itself (e.g. after a refusal).
    pub fn wait_exit(mut self, timeout: Duration) -> anyhow::Result<(bool, String)> {
        let mut c = self.child.take().context("already stopped")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok((s.success(), self.log()));
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!(
                    "ripcord-agent still running after {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run `ripcord` (the operator CLI) with the test passphrase; returns (success, stdout,
/// stderr).
pub fn ripcord(args: &[&str], passphrase_file: &Path) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(crate::binary("ripcord"))
        .args(args)
        .env(
            "RIPCORD_PASSPHRASE",
            std::fs::read_to_string(passphrase_file)?.trim(),
        )
        .env("RUST_BACKTRACE", "0")
        .output()
        .context("running ripcord")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `ripcord failover` of `disk` at `point` into `output`; returns (success, stdout, stderr).
pub fn failover(
    target: &str,
    disk: &str,
    point: &str,
    output: &Path,
    passphrase_file: &Path,
) -> anyhow::Result<(bool, String, String)> {
    // The tests fail over again and again into one image path, and `ripcord failover`
    // refuses to overwrite an image: remove the previous one (files only, never a device).
    if std::fs::symlink_metadata(output).is_ok_and(|m| m.is_file()) {
        std::fs::remove_file(output)
            .with_context(|| format!("removing the previous image {}", output.display()))?;
    }
    let output = output.to_str().context("non-UTF-8 path")?;
    ripcord(
        &[
            "failover", "--target", target, "--disk", disk, "--point", point, "--output", output,
        ],
        passphrase_file,
    )
}

/// Recovery points of `disk` in the store at `target`, as JSON values.
pub fn points(
    target: &str,
    disk: &str,
    passphrase_file: &Path,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let (ok, out, err) = ripcord(
        &[
            "points", "list", "--json", "--target", target, "--disk", disk,
        ],
        passphrase_file,
    )?;
    ensure!(ok, "ripcord points list failed: {err}");
    out.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Wait until the store holds a point of `disk` covering at least batch `min_seq` of the
/// newest epoch (e.g. the agent's last pushed batch: then the point is the final state).
pub fn wait_for_point(
    target: &str,
    disk: &str,
    passphrase_file: &Path,
    min_seq: u64,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(points) = points(target, disk, passphrase_file) {
            let newest_epoch = points.iter().filter_map(|p| p["epoch"].as_u64()).max();
            if let Some(p) = points.iter().rfind(|p| {
                p["epoch"].as_u64() == newest_epoch && p["seq"].as_u64().unwrap_or(0) >= min_seq
            }) {
                return Ok(p.clone());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no recovery point at batch {min_seq} or later within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Replicator {
    /// The last batch sequence the agent pushed of its first disk (from its stats file;
    /// complete after stop).
    pub fn pushed_seq(stats_file: &Path) -> u64 {
        Self::pushed_seq_of(stats_file, None)
    }

    /// Like [`Replicator::pushed_seq`], of the disk `disk` (its id), or the first disk.
    pub fn pushed_seq_of(stats_file: &Path, disk: Option<&str>) -> u64 {
        let Some(stats) = std::fs::read(stats_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            return 0;
        };
        stats["disks"]
            .as_array()
            .and_then(|disks| {
                disks
                    .iter()
                    .find(|d| disk.is_none_or(|id| d["disk_id"] == id))
            })
            .and_then(|d| d["pushed_seq"].as_u64())
            .unwrap_or(0)
    }
}

/// Unix time in ns.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Fails `point` (a JSON line of `ripcord points list`) over into `image` and checks it
/// with the oracle's write-order checker against the workload `log` at the point's instant.
/// `Err` holds what the checker said: the point is not a crash state of the source.
pub fn oracle_check_point(
    target: &str,
    disk: &str,
    point: &serde_json::Value,
    image: &Path,
    passphrase_file: &Path,
    log: &Path,
) -> Result<(), String> {
    let id = point["id"].as_str().expect("a point id");
    let (ok, _, err) = failover(target, disk, id, image, passphrase_file)
        .map_err(|e| format!("running ripcord failover: {e:#}"))?;
    if !ok {
        return Err(format!("failover to recovery point {id} failed: {err}"));
    }
    let t = point["mono_ns"].as_u64().expect("a point time").to_string();
    let out = std::process::Command::new(crate::binary("ripcord-oracle"))
        .args(["check", "--time", &t, "--image"])
        .arg(image)
        .arg("--log")
        .arg(log)
        .output()
        .expect("running ripcord-oracle");
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "recovery point {id} (T={t}) is not a crash state of the source:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
