//! `cargo xtask deploy` (issue 18) against four hosts simulated on this machine. Each host
//! is a network namespace with its own sshd, running in its own mount namespace where
//! /usr/local, /etc/ripcord, /etc/systemd/system, /var/lib and /run/ripcord are directories
//! of that host alone: the primary process server (with the configuration role) that also
//! protects a disk of its own, a second process server that joins it (scale-out), and two
//! agent hosts, each protecting a loop device. Each process server keeps its target store
//! on its own host.
//! systemd is not PID 1 here, so the inventory asks for `service-manager = "exec"`: deploy
//! starts the exact ExecStart lines of the units it installed (which `systemd-analyze
//! verify` checked on each host).
//!
//! Needs root (namespaces, mounts, loop devices, BPF) and sshd (`cargo xtask setup`
//! installs openssh-server). Skips loudly without root, and fails under `CI=true`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ripcord_tests::write_random_at;
use testkit::{LoopDevice, Netns, Scratch};

const MIB: u64 = 1 << 20;
const PASSPHRASE: &str = "a deployment passphrase for the deploy test";

/// The host directories each simulated host has of its own (its root's name for them).
/// The process servers' cache directory (under each host's own /var/lib).
const CACHE_DIR: &str = "/var/lib/ripcord-cache";

const OWN_DIRS: &[(&str, &str)] = &[
    ("usr-local", "/usr/local"),
    ("etc-ripcord", "/etc/ripcord"),
    ("units", "/etc/systemd/system"),
    ("var-lib", "/var/lib"),
    ("run-ripcord", "/run/ripcord"),
];

/// A simulated host: namespace, own directories, sshd. Everything in its namespace is
/// killed on drop, then the namespace is deleted.
struct SimHost {
    name: String,
    root: PathBuf,
    netns: Netns,
    _sshd: Child,
}

impl SimHost {
    fn start(scratch: &Path, name: &str, net: u8, client_key: &Path) -> SimHost {
        let netns = Netns::new(name, net).expect("network namespace");
        netns
            .ip(&[
                "route",
                "add",
                "default",
                "via",
                &netns.host_addr.to_string(),
            ])
            .expect("default route");
        let root = scratch.join(name);
        for (dir, _) in OWN_DIRS {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::create_dir_all("/run/sshd").unwrap();
        let ssh = root.join("ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        let host_key = ssh.join("host_key");
        keygen(&host_key);
        std::fs::copy(
            client_key.with_extension("pub"),
            ssh.join("authorized_keys"),
        )
        .unwrap();
        let config = ssh.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin \
                 prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nPidFile none\n",
                netns.addr,
                host_key.display(),
                ssh.join("authorized_keys").display()
            ),
        )
        .unwrap();
        let binds: String = OWN_DIRS
            .iter()
            .map(|(dir, at)| format!("mount --rbind {} {at} && ", root.join(dir).display()))
            .collect();
        let sshd = netns
            .exec("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "{binds}exec /usr/sbin/sshd -D -e -f {}",
                config.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("sshd.log")).unwrap())
            .spawn()
            .expect("starting sshd");
        let host = SimHost {
            name: name.to_owned(),
            root,
            netns,
            _sshd: sshd,
        };
        testkit::replication::wait_for("sshd to listen", Duration::from_secs(10), || {
            Ok(std::net::TcpStream::connect((host.netns.addr, 22)).is_ok())
        })
        .unwrap_or_else(|e| panic!("{e:#}: {}", host.log()));
        host
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("sshd.log")).unwrap_or_default()
    }

    /// `<addr> <host key>` for known_hosts.
    fn known_hosts_line(&self) -> String {
        let key = std::fs::read_to_string(self.root.join("ssh/host_key.pub")).unwrap();
        format!("{} {}", self.netns.addr, key.trim())
    }

    /// Files under the host's own directories (relative), but its ssh setup.
    fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (dir, _) in OWN_DIRS {
            walk(&self.root.join(dir), &self.root, &mut out);
        }
        out
    }

    /// Processes in its namespace other than sshd: `<pid> <command line>`.
    fn processes(&self) -> Vec<String> {
        let pids = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&pids.stdout)
            .lines()
            .filter_map(|pid| {
                let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
                Some(format!("{pid} {}", cmdline.replace('\0', " ")))
            })
            .filter(|c| !c.contains("sshd"))
            .collect()
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        // Everything the test started there (sshd, services), even when it failed.
        for _ in 0..3 {
            let _ = Command::new("sh")
                .args([
                    "-c",
                    &format!("ip netns pids {} | xargs -r kill -9", self.name),
                ])
                .status();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, base, out);
        } else {
            out.push(p.strip_prefix(base).unwrap().display().to_string());
        }
    }
}

/// A new ed25519 key pair at `path` (and `path`.pub), without a passphrase.
fn keygen(path: &Path) {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            path.to_str().unwrap(),
        ],
    );
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mount points of [`OWN_DIRS`] this machine lacked (/etc/ripcord, say), made for the
/// test and removed after it (if still empty).
/// IPv4 forwarding on for the test (the namespaces talk through the host), restored after.
struct Forwarding(String);

impl Forwarding {
    fn on() -> Forwarding {
        let path = "/proc/sys/net/ipv4/ip_forward";
        let old = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, "1").unwrap();
        Forwarding(old)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", self.0.trim());
    }
}

/// The directory of the binaries this build made.
fn built_binaries() -> PathBuf {
    testkit::binary("ripcord-agent")
        .parent()
        .unwrap()
        .to_owned()
}

/// A "new version" in `dir`: this build's binaries with `trailer` appended (a different
/// file that still runs), and `ripcord-agent` replaced by `agent` if given.
fn version(dir: &Path, trailer: &[u8], agent: Option<&str>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).unwrap();
    for name in ["ripcord-ps", "ripcord", "ripcord-agent"] {
        let mut bytes = std::fs::read(built_binaries().join(name)).unwrap();
        bytes.extend_from_slice(trailer);
        if let (Some(script), "ripcord-agent") = (agent, name) {
            bytes = script.as_bytes().to_vec();
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.to_owned()
}

/// `xtask deploy --inventory <inventory> <extra>` with this build's binaries.
fn deploy(inventory: &Path, extra: &[&str]) -> (bool, String) {
    deploy_from(inventory, &built_binaries(), extra)
}

/// `xtask deploy --inventory <inventory> --binaries <bins> <extra>`: (success, stdout +
/// stderr).
fn deploy_from(inventory: &Path, bins: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(testkit::binary("xtask"))
        .args(["deploy", "--timeout-secs", "240", "--inventory"])
        .arg(inventory)
        .arg("--binaries")
        .arg(bins)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running xtask deploy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What `host`'s agent recorded about `disk` in its state file (disk id, epoch).
fn disk_state(host: &SimHost, disk: &LoopDevice) -> serde_json::Value {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(host.root.join("var-lib/ripcord/agent/state.json")).unwrap(),
    )
    .unwrap();
    let entry = state["disks"][disk.path.to_str().unwrap()].clone();
    assert!(
        entry.is_object(),
        "{}: no {} in {state}",
        host.name,
        disk.path.display()
    );
    entry
}

/// Each disk's epoch (`hosts[n]` protects `disks[n]`): a new epoch is a full resync.
fn epochs(hosts: &[SimHost], disks: &[LoopDevice]) -> Vec<u64> {
    hosts
        .iter()
        .zip(disks)
        .map(|(host, disk)| disk_state(host, disk)["epoch"].as_u64().unwrap())
        .collect()
}

/// After new writes on `disks` (from `seed`), a recovery point of each equals its device;
/// `hosts[n]` protects `disks[n]`. Each process server (`servers`) has its own target store
/// (a directory on its host): a disk's points are in the store of the server it was placed
/// on. Returns, per disk, the index in `servers` of the one holding it.
fn replicas_follow(
    hosts: &[SimHost],
    servers: &[&SimHost],
    disks: &[LoopDevice],
    scratch: &Path,
    passphrase: &Path,
    seed: u64,
) -> Vec<usize> {
    for (n, d) in disks.iter().enumerate() {
        write_random_at(&d.path, 12, 4, seed + n as u64);
    }
    let mut placed = Vec::new();
    for (host, disk) in hosts.iter().zip(disks) {
        let disk_id = disk_state(host, disk)["disk_id"]
            .as_str()
            .expect("a disk id")
            .to_owned();
        let stores: Vec<_> = servers
            .iter()
            .map(|s| s.root.join("var-lib/ripcord-target"))
            .collect();
        let holding: Vec<usize> = (0..servers.len())
            .filter(|&i| stores[i].join("disks").join(&disk_id).is_dir())
            .collect();
        assert_eq!(
            holding.len(),
            1,
            "{}: disk {disk_id} is in the stores of servers {holding:?}",
            host.name
        );
        let target = format!("file://{}", stores[holding[0]].display());
        placed.push(holding[0]);
        let image = scratch.join(format!("{}.img", host.name));
        testkit::replication::wait_for(
            "a recovery point equal to the device",
            Duration::from_secs(90),
            || {
                let points = testkit::replication::points(&target, &disk_id, passphrase)?;
                let Some(id) = points.last().and_then(|p| p["id"].as_str()) else {
                    return Ok(false);
                };
                let (ok, _, err) =
                    testkit::replication::failover(&target, &disk_id, id, &image, passphrase)?;
                anyhow::ensure!(ok, "failover to {id} failed: {err}");
                Ok(testkit::sys::diff_sectors(&image, &disk.path)?.is_empty())
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e:#}", host.name));
    }
    placed
}

#[test]
fn deploy_installs_two_servers_and_their_agents_changes_nothing_twice_upgrades_without_resync_and_uninstalls()
 {
    let test = "deploy_installs_two_servers_and_their_agents_changes_nothing_twice_upgrades_without_resync_and_uninstalls";
    if !testkit::require_root(test) {
        return;
    }
    let scratch = Scratch::new("deploy");
    let client_key = scratch.path.join("id_ed25519");
    keygen(&client_key);
    let _forwarding = Forwarding::on();
    let _mount_points =
        testkit::sys::MountPoints::make(OWN_DIRS.iter().map(|(_, at)| *at)).unwrap();
    // Each process server's cache is a disk of its own (a tmpfs), as placement needs more
    // than 30% free, which this machine's root file system may not have. Mounted before
    // the hosts start (their /var/lib binds take it along), unmounted after they stop.
    let _caches = ["rc-ps", "rc-ps2"].map(|name| {
        testkit::Mount::new(
            Path::new("tmpfs"),
            &scratch
                .path
                .join(name)
                .join("var-lib")
                .join(CACHE_DIR.trim_start_matches("/var/lib/")),
            &["-t", "tmpfs", "-o", "size=512m,mode=0700"],
        )
        .expect("mounting a cache tmpfs")
    });
    // hosts[n] protects disks[n]; rc-ps2 is a process server only, and joins rc-ps.
    let hosts = [("rc-ps", 41), ("rc-db", 42), ("rc-app", 43), ("rc-ps2", 44)]
        .map(|(name, net)| SimHost::start(&scratch.path, name, net, &client_key));
    let servers = [&hosts[0], &hosts[3]];
    let known_hosts = scratch.path.join("known_hosts");
    std::fs::write(
        &known_hosts,
        hosts
            .iter()
            .map(|h| h.known_hosts_line() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let passphrase = scratch.path.join("passphrase");
    {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&passphrase)
            .unwrap()
            .write_all(PASSPHRASE.as_bytes())
            .unwrap();
    }
    let disks = ["ps", "db", "app"].map(|name| {
        LoopDevice::create(&scratch.path.join(format!("{name}.img")), 32 * MIB).unwrap()
    });
    for (n, d) in disks.iter().enumerate() {
        write_random_at(&d.path, 0, 8, n as u64);
    }
    let inventory = |devices: [&str; 3], min_free_mib: u64| {
        format!(
            "[deployment]\npassphrase-file = \"{}\"\ntarget = \"file:///var/lib/ripcord-target\"\n\
             known-hosts = \"{}\"\nidentity = \"{}\"\nservice-manager = \"exec\"\n\
             min-free-mib = {min_free_mib}\nkdf-memory-mib = 8\nretention-hours = 48\n\n\
             [policy.databases]\nmax-point-gap-secs = 5\napp-consistent-every-secs = 0\n\n\
             [[host]]\nname = \"rc-ps\"\nssh = \"root@{}\"\nroles = [\"config\", \"process\", \"agent\"]\n\
             devices = [\"{}\"]\ncache-dir = \"{CACHE_DIR}\"\n\n\
             [[host]]\nname = \"rc-db\"\nssh = \"root@{}\"\nroles = [\"agent\"]\ndevices = [\"{}\"]\n\
             policy = \"databases\"\n\n\
             [[host]]\nname = \"rc-app\"\nssh = \"root@{}\"\nroles = [\"agent\"]\ndevices = [\"{}\"]\n\n\
             [[host]]\nname = \"rc-ps2\"\nssh = \"root@{}\"\nroles = [\"process\"]\n\
             cache-dir = \"{CACHE_DIR}\"\n",
            passphrase.display(),
            known_hosts.display(),
            client_key.display(),
            hosts[0].netns.addr,
            devices[0],
            hosts[1].netns.addr,
            devices[1],
            hosts[2].netns.addr,
            devices[2],
            hosts[3].netns.addr,
        )
    };
    let devices = disks.each_ref().map(|d| d.path.to_str().unwrap());
    let inv = scratch.path.join("deploy.toml");

    // A host with a missing device and hosts short of space: every problem is named, and
    // no host is changed.
    std::fs::write(
        &inv,
        inventory(
            [devices[0], devices[1], "/dev/ripcord-no-such-disk"],
            1 << 30,
        ),
    )
    .unwrap();
    let (ok, out) = deploy(&inv, &[]);
    assert!(
        !ok,
        "deploy went ahead despite missing prerequisites:\n{out}"
    );
    for expected in [
        "rc-app: /dev/ripcord-no-such-disk is not a block device",
        "rc-ps: not enough space under /usr/local",
        "rc-db: not enough space under /var/lib",
        "no host was changed",
    ] {
        assert!(out.contains(expected), "{expected:?} not reported:\n{out}");
    }
    for h in &hosts {
        assert_eq!(
            h.files(),
            Vec::<String>::new(),
            "{} was changed:\n{out}",
            h.name
        );
    }

    // --check on a good inventory: every host ready, still nothing changed.
    std::fs::write(&inv, inventory(devices, 256)).unwrap();
    let (ok, out) = deploy(&inv, &["--check"]);
    assert!(ok && out.contains("preflight: 4 host(s) ready"), "{out}");
    for h in &hosts {
        assert_eq!(
            h.files(),
            Vec::<String>::new(),
            "{} was changed by --check",
            h.name
        );
    }

    // The real deployment: every disk synced with a recovery point.
    let started = Instant::now();
    let (ok, out) = deploy(&inv, &[]);
    assert!(ok, "deploy failed:\n{out}");
    eprintln!(
        "deployed in {:.1} s:\n{out}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        out.matches("synced, recovery point acknowledged").count(),
        3,
        "{out}"
    );
    assert!(
        !out.contains(PASSPHRASE),
        "the passphrase is in the output:\n{out}"
    );
    let running = |h: &SimHost, binary: &str| h.processes().iter().any(|p| p.contains(binary));
    assert!(
        running(&hosts[0], "ripcord-ps") && running(&hosts[0], "ripcord-agent"),
        "rc-ps does not run both its services: {:?}",
        hosts[0].processes()
    );
    assert!(
        running(&hosts[3], "ripcord-ps") && !running(&hosts[3], "ripcord-agent"),
        "rc-ps2 does not run exactly its process server: {:?}",
        hosts[3].processes()
    );
    for h in &hosts {
        assert!(
            running(h, "ripcord-agent") || h.name == "rc-ps2",
            "{}: no agent runs",
            h.name
        );
        for p in h.processes() {
            assert!(
                !p.contains("--token "),
                "{}: a token on a command line: {p}",
                h.name
            );
        }
    }

    // The policies and the retention reached the hosts' configurations.
    let config = |h: &SimHost, file: &str| std::fs::read_to_string(h.root.join(file)).unwrap();
    for (h, gap_ms, app_secs) in [(&hosts[1], 5000, 0), (&hosts[2], 15_000, 3600)] {
        let agent = config(h, "etc-ripcord/agent.toml");
        assert!(
            agent.contains(&format!("max-point-gap-ms = {gap_ms}\n"))
                && agent.contains(&format!("app-interval-secs = {app_secs}\n")),
            "{}: not its policy:\n{agent}",
            h.name
        );
    }
    for h in servers {
        let ps = config(h, "var-lib/ripcord/ps/ps.toml");
        assert!(
            ps.contains("retention-secs = 172800\n"),
            "{}: not 48 h:\n{ps}",
            h.name
        );
    }

    // The configuration role shows both servers green, and placed machines on each.
    let status = ripcord_tests::ripcord_status(&hosts[0].root.join("var-lib/ripcord/ps"));
    let shown: Vec<_> = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_owned(), s["health"].clone()))
        .collect();
    assert_eq!(shown.len(), 2, "{status}");
    assert!(shown.iter().all(|(_, h)| h == "green"), "{status}");
    assert!(shown.iter().any(|(id, _)| id == "rc-ps2"), "{status}");

    // Changes after the deployment reach the target stores: a failover equals the device.
    let placed = replicas_follow(&hosts, &servers, &disks, &scratch.path, &passphrase, 10);
    assert!(
        placed.contains(&0) && placed.contains(&1),
        "every disk is on one server (index in [rc-ps, rc-ps2] per disk: {placed:?}):\n{status}"
    );
    for h in servers {
        let mut journals = Vec::new();
        walk(
            &h.root.join("var-lib/ripcord-cache"),
            &h.root,
            &mut journals,
        );
        assert!(
            !journals.is_empty(),
            "{}: its cache-dir is not used",
            h.name
        );
    }

    // A second run changes nothing, and says so; the services keep running.
    let pids: Vec<_> = hosts.iter().map(SimHost::processes).collect();
    let (ok, out) = deploy(&inv, &[]);
    assert!(ok, "the second deploy failed:\n{out}");
    assert!(out.contains("nothing to change"), "{out}");
    assert!(
        !out.contains("installed") && !out.contains("start"),
        "{out}"
    );
    assert_eq!(
        pids,
        hosts.iter().map(SimHost::processes).collect::<Vec<_>>()
    );

    // A new version is refused without --upgrade, and nothing changes.
    let v2 = version(&scratch.path.join("v2"), b"ripcord v2", None);
    let (ok, out) = deploy_from(&inv, &v2, &[]);
    assert!(
        !ok && out.contains("rc-ps: /usr/local/bin/ripcord-ps is another version")
            && out.contains("--upgrade"),
        "{out}"
    );
    assert_eq!(
        pids,
        hosts.iter().map(SimHost::processes).collect::<Vec<_>>()
    );
    // --upgrade: the process servers (the primary first), then each agent host, each
    // running again before the
    // next is touched; every agent continues its epoch (no full resync).
    let epochs_before = epochs(&hosts, &disks);
    let (ok, out) = deploy_from(&inv, &v2, &["--upgrade"]);
    assert!(ok, "the upgrade failed:\n{out}");
    let at = |what: &str| {
        out.find(what)
            .unwrap_or_else(|| panic!("{what:?} not in:\n{out}"))
    };
    assert!(
        at("rc-ps: restarting ripcord-ps") < at("rc-ps2: restarting ripcord-ps")
            && at("rc-ps2: restarting ripcord-ps") < at("rc-ps: restarting ripcord-agent")
            && at("rc-ps: restarting ripcord-agent") < at("rc-db: restarting")
            && at("rc-db: restarting") < at("rc-app: restarting"),
        "not in the seeds' order:\n{out}"
    );
    for (h, before) in hosts.iter().zip(&pids) {
        assert_ne!(
            &h.processes(),
            before,
            "{}: its service was not restarted",
            h.name
        );
        for name in ["ripcord-ps", "ripcord-agent"] {
            let installed = h.root.join("usr-local/bin").join(name);
            if installed.exists() {
                assert_eq!(
                    std::fs::read(&installed).unwrap(),
                    std::fs::read(v2.join(name)).unwrap(),
                    "{}: {name} is not the new version",
                    h.name
                );
            }
        }
    }
    assert_eq!(
        replicas_follow(&hosts, &servers, &disks, &scratch.path, &passphrase, 20),
        placed,
        "the upgrade moved disks between servers"
    );
    assert_eq!(
        epochs(&hosts, &disks),
        epochs_before,
        "the upgrade started new epochs (a full resync)"
    );
    // A broken agent build stops the upgrade at the first agent host (the process server's);
    // the next keeps the version it runs, and the process server keeps serving.
    let broken = version(
        &scratch.path.join("v3"),
        b"ripcord v2",
        Some("#!/bin/sh\necho 'this agent build is broken' >&2\nexit 1\n"),
    );
    let (ok, out) = deploy_from(&inv, &broken, &["--upgrade"]);
    assert!(!ok, "a broken agent was rolled out:\n{out}");
    // Whichever check meets it first (the service gone, or its status command failing),
    // the cause is the broken build's own message.
    for expected in ["upgrade stopped at rc-ps", "this agent build is broken"] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
    assert_eq!(
        std::fs::read(hosts[1].root.join("usr-local/bin/ripcord-agent")).unwrap(),
        std::fs::read(v2.join("ripcord-agent")).unwrap(),
        "rc-db was upgraded after rc-ps's agent failed"
    );
    assert!(
        running(&hosts[0], "ripcord-ps"),
        "the broken agent took the process server down"
    );
    let (ok, out) = deploy_from(&inv, &v2, &["--upgrade"]);
    assert!(ok, "rolling back to v2 failed:\n{out}");
    replicas_follow(&hosts, &servers, &disks, &scratch.path, &passphrase, 30);
    assert_eq!(
        epochs(&hosts, &disks),
        epochs_before,
        "rolling back started new epochs (a full resync)"
    );

    // Uninstall: no service, no file left but the target store, on the host with both roles
    // too.
    let (ok, out) = deploy(&inv, &["--uninstall"]);
    assert!(ok, "uninstall failed:\n{out}");
    for h in &hosts {
        assert_eq!(
            h.processes(),
            Vec::<String>::new(),
            "{}: still running",
            h.name
        );
        let left: Vec<_> = h
            .files()
            .into_iter()
            .filter(|f| !f.starts_with("var-lib/ripcord-target/"))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "{}: files left:\n{out}", h.name);
    }
    for h in servers {
        assert!(
            h.root.join("var-lib/ripcord-target").is_dir(),
            "{}: uninstall removed the target store",
            h.name
        );
    }
}
