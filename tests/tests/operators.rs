//! What an operator meets: one agent per device, signals that always stop the agent, a
//! warning that names a server that does not answer, exit messages and `status` that say
//! what really happened, hooks that cannot run named, and private state files. Real
//! binaries, real QUIC on loopback, real loop devices.
//!
//! Needs root (loop devices, BPF). Skips loudly without it, and fails under `CI=true`.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use rand::{RngExt as _, SeedableRng as _};
use testkit::{
    LoopDevice, Site,
    replication::{Replicator, free_udp_port},
};

const MIB: u64 = 1 << 20;

/// Write `len` bytes of seeded random data at `offset` of `dev`, durably.
/// Writes `len` bytes of random data at `offset` of `dev` with O_DIRECT, 1 MiB per write:
/// a few large bios, not thousands of page-cache ones (a burst of thousands of 4 KiB bios
/// can overflow the capture's in-flight table, which resynchronises the whole device and
/// would change what these tests see).
fn fill_random(dev: &LoopDevice, offset: u64, len: u64, seed: u64) {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev.path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", dev.path.display()));
    // O_DIRECT wants an aligned buffer: take the 4 KiB-aligned MiB inside a larger one.
    let mut backing = vec![0u8; (MIB + 4096) as usize];
    let skew = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skew..skew + MIB as usize];
    for i in 0..len / MIB {
        rng.fill(&mut buf[..]);
        f.write_all_at(buf, offset + i * MIB).unwrap();
    }
    f.sync_all().unwrap();
}

fn signal(pid: u32, sig: Signal) {
    assert!(pid != 0, "no process to signal");
    kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("kill {pid} {sig}: {e}"));
}

/// Wait until the agent's log contains `needle`; panics with the log otherwise.
fn wait_log(agent: &Replicator, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the agent's log within {timeout:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ripcord-agent status --state-dir D [--json]`: (exit code, stdout + stderr).
fn status(state_dir: &Path, json: bool) -> (i32, String) {
    let mut cmd = Command::new(testkit::binary("ripcord-agent"));
    cmd.arg("status").arg("--state-dir").arg(state_dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("running ripcord-agent status");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn device_lock(dev: &Path) -> PathBuf {
    let rdev = std::fs::metadata(dev).unwrap().rdev();
    PathBuf::from(format!(
        "/run/ripcord/lock/{}:{}.lock",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Before: the second agent started a new epoch and the two evicted each other
/// (`StaleEpoch`). Now the second is refused at once, naming the first one's pid and the
/// lock, whether it comes with another state directory or the same one.
#[test]
fn a_second_agent_on_a_protected_device_or_state_directory_is_refused() {
    let Some(site) =
        Site::new("a_second_agent_on_a_protected_device_or_state_directory_is_refused")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    let other_disk = site.loop_device("other.img", 32 * MIB);
    let first = site.replicator(&[&disk.path]);
    first.wait_synced(Duration::from_secs(60)).unwrap();
    let lock = device_lock(&disk.path);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        first.pid().to_string(),
        "the lock file names its holder"
    );
    assert_eq!(mode(Path::new("/run/ripcord/lock")), 0o700);

    let other = site.register("other");
    let refused = match Replicator::start(&other, &[&disk.path], &[]) {
        Ok(a) => a
            .wait_exit(Duration::from_secs(10))
            .map_or_else(|e| format!("{e:#}"), |r| r.1),
        Err(e) => format!("{e:#}"),
    };
    let want = format!(
        "{} is already protected by another ripcord-agent (pid {}, lock {})",
        disk.path.display(),
        first.pid(),
        lock.display()
    );
    assert!(refused.contains(&want), "want {want:?} in:\n{refused}");

    let refused = match Replicator::start(&site.id, &[&other_disk.path], &[]) {
        Ok(a) => a
            .wait_exit(Duration::from_secs(10))
            .map_or_else(|e| format!("{e:#}"), |r| r.1),
        Err(e) => format!("{e:#}"),
    };
    let want = format!(
        "the state directory {} is already in use by another ripcord-agent (pid {}",
        site.id.state_dir.display(),
        first.pid()
    );
    assert!(refused.contains(&want), "want {want:?} in:\n{refused}");

    // The first agent was never disturbed.
    let (ok, log) = first.stop().unwrap();
    assert!(ok, "{log}");
    assert!(!log.contains("StaleEpoch"), "{log}");
    // Its locks went with it: the other machine may protect the device now.
    let second = Replicator::start(&other, &[&disk.path], &[]).unwrap();
    second.wait_synced(Duration::from_secs(60)).unwrap();
    let (ok, log) = second.stop().unwrap();
    assert!(ok, "{log}");
}

/// Before: with its data server silent, the agent blocked on a full channel and ignored
/// SIGINT, a second SIGINT and SIGTERM; its only complaint was a bare handshake error,
/// and its status file went stale. Now it names the address it gets no answer from, its
/// status stays current, and SIGINT during the initial sync stops it at once, saying that
/// no recovery point exists.
#[test]
fn an_agent_whose_server_does_not_answer_says_so_and_stops_on_sigint_during_the_sync() {
    let Some(site) = Site::new(
        "an_agent_whose_server_does_not_answer_says_so_and_stops_on_sigint_during_the_sync",
    ) else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);
    fill_random(&disk, 0, 48 * MIB, 1);
    let silent = format!("127.0.0.1:{}", free_udp_port());
    let agent = site.replicator_with(&[&disk.path], &["--server", &silent], &[]);
    wait_log(
        &agent,
        &format!(
            "no answer from the process server at {silent} (data endpoint); check that \
             `ripcord-ps serve` runs there and the port is open"
        ),
        Duration::from_secs(30),
    );
    let stats = agent.stats().expect("status file");
    assert_eq!(stats["disks"][0]["syncing"], true, "{stats}");
    // The round waits for the network side, yet the status file stays current.
    std::thread::sleep(Duration::from_millis(2500));
    let later = agent.stats().expect("status file");
    let updated = |v: &serde_json::Value| v["updated_unix_ms"].as_u64().unwrap_or(0);
    assert!(
        updated(&later) >= updated(&stats) + 1000,
        "the status file was not refreshed while a round waited:\n{stats}\n{later}"
    );
    signal(agent.pid(), Signal::SIGINT);
    let started = Instant::now();
    let (ok, log) = agent
        .wait_exit(Duration::from_secs(20))
        .expect("the agent ignored SIGINT");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(ok, "a stop during the sync is what was asked for:\n{log}");
    let want = format!(
        "stopped during the initial sync of {} at ",
        disk.path.display()
    );
    assert!(log.contains(&want), "want {want:?} in:\n{log}");
    assert!(
        log.contains("no recovery point of this epoch exists yet"),
        "{log}"
    );
    assert!(!log.contains("durable on the process server"), "{log}");
}

/// Start an agent on a synced disk, stop the process server (SIGSTOP), write `mib` MiB and
/// wait until the agent has read them; returns the agent and the server's address.
fn agent_with_a_frozen_server(
    site: &Site,
    disk: &LoopDevice,
    extra: &[&str],
) -> (Replicator, String) {
    let agent = site.replicator_with(&[&disk.path], extra, &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    signal(site.ps.pid(), Signal::SIGSTOP);
    fill_random(disk, 0, 8 * MIB, 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent
        .stats()
        .is_none_or(|s| s["disks"][0]["unacked_bytes"].as_u64().unwrap_or(0) == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the agent read nothing:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (agent, format!("127.0.0.1:{}", site.ps.data_port))
}

/// Before: SIGINT while the server did not acknowledge waited up to 120 s, and a second
/// signal changed nothing. Now the agent says what it waits for, and a second SIGINT stops
/// it at once, non-zero, naming what was not acknowledged; the next start replicates.
#[test]
fn a_second_sigint_stops_an_agent_waiting_for_acknowledgements_at_once() {
    let Some(site) =
        Site::new("a_second_sigint_stops_an_agent_waiting_for_acknowledgements_at_once")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    let (agent, server) = agent_with_a_frozen_server(&site, &disk, &[]);
    signal(agent.pid(), Signal::SIGINT);
    wait_log(
        &agent,
        &format!("to be acknowledged by {server}"),
        Duration::from_secs(15),
    );
    signal(agent.pid(), Signal::SIGINT);
    let started = Instant::now();
    let result = agent.wait_exit(Duration::from_secs(15));
    signal(site.ps.pid(), Signal::SIGCONT);
    let (ok, log) = result.expect("the agent ignored the second SIGINT");
    assert!(started.elapsed() < Duration::from_secs(5), "{log}");
    assert!(!ok, "an abandoned drain must fail:\n{log}");
    assert!(
        log.contains(&format!(
            "stopped before the process server at {server} acknowledged everything (a second \
             signal asked to stop at once)"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("{}: ", disk.path.display())) && log.contains("not acknowledged"),
        "{log}"
    );
    // Nothing durable was lost: the next start continues the epoch and replicates.
    let epoch = |s: &Site| -> u64 {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.id.state_dir.join("state.json")).unwrap())
                .unwrap();
        v["disks"][disk.path.to_str().unwrap()]["epoch"]
            .as_u64()
            .unwrap()
    };
    let before = epoch(&site);
    let again = site.replicator(&[&disk.path]);
    again.wait_synced(Duration::from_secs(60)).unwrap();
    let (ok, log) = again.stop().unwrap();
    assert!(ok, "{log}");
    assert_eq!(
        epoch(&site),
        before,
        "the next start did not continue the epoch"
    );
    assert!(log.contains("continuing the epoch"), "{log}");
}

/// The drain timeout bounds the wait after one signal: the agent exits non-zero saying
/// the timeout passed and what was not acknowledged.
#[test]
fn the_drain_timeout_bounds_the_wait_after_sigterm() {
    let Some(site) = Site::new("the_drain_timeout_bounds_the_wait_after_sigterm") else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    let (agent, server) = agent_with_a_frozen_server(&site, &disk, &["--drain-timeout-secs", "3"]);
    signal(agent.pid(), Signal::SIGTERM);
    let started = Instant::now();
    let result = agent.wait_exit(Duration::from_secs(20));
    signal(site.ps.pid(), Signal::SIGCONT);
    let (ok, log) = result.expect("the agent did not stop within 20 s of SIGTERM");
    assert!(started.elapsed() < Duration::from_secs(15), "{log}");
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!(
            "stopped before the process server at {server} acknowledged everything (the \
             drain timeout (3 s) passed)"
        )),
        "{log}"
    );
}

/// Before: no `status` command; the status file only with `--stats-file`, world-readable;
/// the stop message claimed durability whatever happened; no progress without a terminal.
#[test]
fn status_tells_a_running_agent_from_a_stopped_one_and_files_are_private() {
    let Some(site) =
        Site::new("status_tells_a_running_agent_from_a_stopped_one_and_files_are_private")
    else {
        return;
    };
    let dir = &site.id.state_dir;
    let (code, out) = status(dir, false);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("no ripcord-agent is running"), "{out}");

    let disk = site.loop_device("disk.img", 64 * MIB);
    fill_random(&disk, 0, 16 * MIB, 3);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (code, out) = status(dir, false);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("ripcord-agent running (pid {})", agent.pid())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{}  disk {disk_id}  epoch 1  streaming",
            disk.path.display()
        )),
        "{out}"
    );
    let (code, out) = status(dir, true);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["running"], true, "{v}");
    assert_eq!(v["status"]["disks"][0]["disk_id"], disk_id.as_str(), "{v}");
    assert_eq!(v["status"]["disks"][0]["epoch"], 1, "{v}");

    for (file, want) in [
        (dir.clone(), 0o700),
        (dir.join("status.json"), 0o600),
        (dir.join("state.json"), 0o600),
        (dir.join("agent.key"), 0o600),
        (dir.join("agent.crt"), 0o600),
    ] {
        assert_eq!(mode(&file), want, "mode of {}", file.display());
    }

    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "{log}");
    let want = format!("initial sync {}: ", disk.path.display());
    assert!(log.contains(&want), "no progress line {want:?}:\n{log}");
    let want = format!(
        "stopped: everything read from {} is durable on the process server at 127.0.0.1:{} \
         (up to seq ",
        disk.path.display(),
        site.ps.data_port
    );
    assert!(log.contains(&want), "want {want:?} in:\n{log}");
    assert!(log.contains("latest recovery point: cut "), "{log}");

    let (code, out) = status(dir, false);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("no ripcord-agent is running") && out.contains("last known state"),
        "{out}"
    );
    let (_, out) = status(dir, true);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["running"], false, "{v}");
    assert!(
        v["status"].is_null() && v["last_known"]["disks"].is_array(),
        "{v}"
    );
}

/// Before: a hook that was not executable was skipped silently and the point still
/// reported application-consistent; hook output went unlabelled to the agent's stderr.
#[test]
fn a_hook_that_cannot_run_is_named_and_hook_output_is_labelled() {
    let Some(site) = Site::new("a_hook_that_cannot_run_is_named_and_hook_output_is_labelled")
    else {
        return;
    };
    let hooks = site.subdir("hooks");
    let hook = |name: &str, body: &str, mode: u32| {
        let p = hooks.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    hook("10-echo", "echo quiescing for $1", 0o755);
    hook("20-off", "echo off $1", 0o644);
    let config = site.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "app-interval-secs = 1\nmetrics-addr = \"\"\nhooks-dir = \"{}\"\n",
            hooks.display()
        ),
    )
    .unwrap();
    let disk = site.loop_device("disk.img", 32 * MIB);
    let agent = site.replicator_with(&[&disk.path], &["--config", config.to_str().unwrap()], &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let log = wait_log(
        &agent,
        &format!(
            "no application-consistent point this time: hook {} is not an executable file",
            hooks.join("20-off").display()
        ),
        Duration::from_secs(20),
    );
    assert!(!log.contains("application-consistent point taken"), "{log}");

    std::fs::set_permissions(hooks.join("20-off"), std::fs::Permissions::from_mode(0o755)).unwrap();
    wait_log(
        &agent,
        "application-consistent point taken (hooks run: 10-echo, 20-off; file systems frozen: \
         none)",
        Duration::from_secs(20),
    );
    let log = wait_log(
        &agent,
        "[hook 10-echo] quiescing for frozen",
        Duration::from_secs(5),
    );
    assert!(log.contains("[hook 20-off] off post-thaw"), "{log}");

    std::fs::remove_dir_all(&hooks).unwrap();
    wait_log(
        &agent,
        &format!(
            "hooks directory {} does not exist: no application is asked to quiesce",
            hooks.display()
        ),
        Duration::from_secs(20),
    );
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "{log}");
}

/// `ripcord-agent register` of a new machine at `server`, pinning `ca_hash`, with a fresh
/// token of the site's server: (success, stderr, how long it took).
fn register_at(site: &Site, server: &str, ca_hash: &str) -> (bool, String, Duration) {
    let token = site.ps.new_token().expect("a bootstrap token");
    let started = Instant::now();
    let out = Command::new(testkit::binary("ripcord-agent"))
        .args(["register", "--machine-id", "newhost", "--token", &token])
        .args(["--ca-hash", ca_hash, "--server", server])
        .arg("--state-dir")
        .arg(site.subdir("newhost"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running ripcord-agent register");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Before: a registration sent to a port where nothing listens ended in a bare QUIC
/// handshake timeout, which reads like a TLS problem. Now it names the address and what to
/// check, within a bound; a real TLS failure (a wrong CA hash) keeps its own message.
#[test]
fn a_registration_at_a_port_where_nothing_listens_says_so() {
    let Some(site) = Site::new("a_registration_at_a_port_where_nothing_listens_says_so") else {
        return;
    };
    let silent = format!("127.0.0.1:{}", free_udp_port());
    let (ok, err, took) = register_at(&site, &silent, &site.ps.ca_hash);
    assert!(!ok, "registration at a silent port succeeded:\n{err}");
    let want = format!(
        "no ripcord process server answered at {silent} within 10s; check the address and port"
    );
    assert!(err.contains(&want), "want {want:?} in:\n{err}");
    assert!(
        !err.contains("TimedOut") && !err.contains("timed out"),
        "{err}"
    );
    assert!(took < Duration::from_secs(25), "register took {took:?}");

    // The real server with another CA's hash: a trust failure, named as such.
    let wrong_hash = format!("sha256:{}", "ab".repeat(32));
    let server = format!("127.0.0.1:{}", site.ps.register_port);
    let (ok, err, _) = register_at(&site, &server, &wrong_hash);
    assert!(!ok, "registration with a wrong CA hash succeeded:\n{err}");
    assert!(
        err.contains("not signed by the pinned CA") && !err.contains("no ripcord process server"),
        "{err}"
    );
}
