//! A single-node [Garage](https://garagehq.deuxfleurs.fr) server, a real S3-compatible
//! object store, for tests that put the target store on S3.
//!
//! `cargo xtask setup` installs the `garage` binary (`cargo install garage`). [`Garage::start`]
//! writes a one-node configuration under a directory, starts `garage server`, applies a
//! cluster layout, and creates a bucket and an access key allowed to read and write it. The
//! server is killed on drop.
//!
//! Garage answers path-style requests and signs with the region [`Garage::REGION`]; the
//! ripcord binaries reach it through object_store's `AWS_*` environment variables, which
//! [`Garage::env`] lists and [`Garage::export_env`] sets for the processes a test spawns.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// How long the server may take to listen and answer its CLI.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of the server log printed when a failing test drops the server.
const LOG_TAIL_LINES: usize = 40;

/// A running single-node Garage server with one bucket and one read/write key; killed on
/// drop.
pub struct Garage {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    s3_port: u16,
    bucket: String,
    key_id: String,
    secret_key: String,
}

impl Garage {
    /// The S3 region Garage is configured with (requests must be signed for it).
    pub const REGION: &str = "garage";
    /// The bucket [`Garage::start`] creates.
    pub const BUCKET: &str = "ripcord";

    /// The `garage` binary: on `PATH`, else in `~/.cargo/bin` (where `cargo install` puts
    /// it); `None` if neither has it.
    pub fn binary() -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|d| d.join("bin"));
        std::env::split_paths(&path)
            .chain(cargo_bin)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    }

    /// Start a single-node server with its configuration, metadata, data and log under
    /// `dir` (created if missing): replication factor 1, S3 and admin APIs on free
    /// 127.0.0.1 ports, a random RPC secret. Returns once the layout is applied and the
    /// bucket [`Garage::BUCKET`] and its key exist.
    pub fn start(dir: &Path) -> anyhow::Result<Garage> {
        let bin = Self::binary()
            .context("garage is not installed (`cargo xtask setup` runs `cargo install garage`)")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (rpc_port, s3_port, admin_port) =
            (free_tcp_port()?, free_tcp_port()?, free_tcp_port()?);
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = {meta}\n\
                 data_dir = {data}\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{rpc_secret}\"\n\
                 \n\
                 [s3_api]\n\
                 s3_region = \"{region}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                 \n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin_port}\"\n\
                 admin_token = \"{admin_token}\"\n",
                meta = toml_string(&dir.join("meta"))?,
                data = toml_string(&dir.join("data"))?,
                rpc_secret = random_hex::<32>(),
                region = Self::REGION,
                admin_token = random_hex::<16>(),
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;

        let log = dir.join("garage.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .context("duplicating the log file handle")?,
            )
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} server", bin.display()))?;
        let mut garage = Garage {
            bin,
            config,
            log,
            child: Some(child),
            s3_port,
            bucket: Self::BUCKET.to_owned(),
            key_id: String::new(),
            secret_key: String::new(),
        };
        if let Err(e) = garage
            .wait_ready(&[s3_port, admin_port])
            .and_then(|()| garage.configure())
        {
            bail!(
                "setting up Garage: {e:#}\nGarage log ({}):\n{}",
                garage.log.display(),
                garage.log()
            );
        }
        Ok(garage)
    }

    /// Wait until the server listens on the HTTP `ports` and its CLI reaches it over RPC.
    /// (The RPC port itself is not probed with a bare connection: Garage logs every
    /// aborted handshake as an error.)
    fn wait_ready(&mut self, ports: &[u16]) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut pending = ports.to_vec();
        loop {
            if let Some(s) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("garage server exited ({s})");
            }
            pending.retain(|&p| {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, p));
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
            });
            // `garage status` is only tried once everything listens: before that it would
            // spend its own connection timeout on every attempt.
            if pending.is_empty() && self.cli(&["status"]).is_ok() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "garage server not ready within {BOOT_TIMEOUT:?} (ports not listening: \
                 {pending:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Give the node a role (one zone, 1 GB), apply the layout, create the key and the
    /// bucket, and allow the key to read, write and own the bucket.
    fn configure(&mut self) -> anyhow::Result<()> {
        let node = self.cli(&["node", "id", "--quiet"])?;
        let node = node
            .trim()
            .split('@')
            .next()
            .filter(|id| !id.is_empty())
            .with_context(|| format!("no node id in `garage node id` output {node:?}"))?
            .to_owned();
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
        self.cli(&["layout", "apply", "--version", "1"])?;

        let key = self.cli(&["json-api", "CreateKey", r#"{"name":"ripcord-test"}"#])?;
        let key: serde_json::Value = serde_json::from_str(&key)
            .with_context(|| format!("parsing the CreateKey answer {key:?}"))?;
        let field = |name: &str| {
            key[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("no {name} in the CreateKey answer {key}"))
        };
        self.key_id = field("accessKeyId")?;
        self.secret_key = field("secretAccessKey")?;

        self.cli(&["bucket", "create", &self.bucket])?;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &self.bucket,
            "--key",
            &self.key_id,
        ])?;
        Ok(())
    }

    /// Run `garage -c <config> <args>` against the running server; its stdout.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "garage=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running garage {}", args.join(" ")))?;
        ensure!(
            out.status.success(),
            "garage {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8(out.stdout)
            .with_context(|| format!("garage {} printed non-UTF-8", args.join(" ")))
    }

    /// The target store URL of the bucket: `s3://ripcord`.
    pub fn url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// The S3 endpoint, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The `AWS_*` variables with which object_store (and so `Store::open` in every ripcord
    /// binary) reaches the bucket: endpoint over plain HTTP, path-style requests, region
    /// [`Garage::REGION`], and the key's credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".to_owned()),
            ("AWS_REGION", Self::REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Make this process's environment exactly [`Garage::env`] as far as `AWS_*` goes (any
    /// other `AWS_*` variable, such as a developer's own session token or profile, is
    /// removed), so every process spawned from now on reaches this server.
    ///
    /// # Safety
    ///
    /// Modifies the process environment: no other thread may read or write the environment
    /// while this runs (see [`std::env::set_var`]). Call it from a test binary's only test
    /// before that test starts any thread.
    pub unsafe fn export_env(&self) {
        let ours = self.env();
        let stale: Vec<_> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with("AWS_") && !ours.iter().any(|(o, _)| o == k))
            .collect();
        for k in stale {
            // SAFETY: the caller guarantees no other thread uses the environment.
            unsafe { std::env::remove_var(k) };
        }
        for (k, v) in ours {
            // SAFETY: as above.
            unsafe { std::env::set_var(k, v) };
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Garage {
    /// Kills the server and waits for it; when dropped by a failing test, prints the end of
    /// its log first.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
            eprintln!(
                "--- last {} lines of the Garage log {} ---",
                tail.len(),
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Whether a test that needs Garage may run: `true` if `garage` is installed. Otherwise
/// skip loudly, except under `CI=true`, where a skipped test is a failure.
pub fn require_garage(test: &str) -> bool {
    if Garage::binary().is_some() {
        return true;
    }
    let msg = format!(
        "{test}: SKIPPED: garage is not installed (`cargo xtask setup` installs it with \
         `cargo install garage`)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}, and CI=true forbids skipping it");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    false
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_tcp_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding an ephemeral TCP port")?;
    Ok(l.local_addr()
        .context("local address of an ephemeral port")?
        .port())
}

/// `N` random bytes as lowercase hex.
fn random_hex<const N: usize>() -> String {
    rand::random::<[u8; N]>()
        .iter()
        .fold(String::with_capacity(2 * N), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `path` as a TOML basic string.
fn toml_string(path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    ensure!(
        !s.chars().any(char::is_control),
        "{} has control characters",
        path.display()
    );
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_has_two_digits_per_byte() {
        let h = random_hex::<32>();
        assert_eq!(h.len(), 64);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn toml_string_escapes_quotes_and_backslashes() {
        assert_eq!(
            toml_string(Path::new(r#"/a "b"\c"#)).unwrap(),
            r#""/a \"b\"\\c""#
        );
        assert!(toml_string(Path::new("/a\nb")).is_err());
    }
}
