//! Scale-out (issue 15, item 2): process servers join a deployment with a process-server
//! token from its configuration role, report their heartbeat and health to it, and are
//! refused when they should be. The attackers and accidents named here:
//! - a host holding an agent's bootstrap token tries to join as a process server;
//! - a second server tries to take over a registered server id with a new token;
//! - a process server newer than the configuration role;
//! - a copy of a joined server's directory started elsewhere (a cloned server);
//! - a server removed by the operator that keeps running.
//!
//! Real processes (`ripcord-ps init | serve | join | token`, `ripcord ps | status`) on
//! loopback QUIC, and a replicated loop device that keeps replicating throughout.
//! Needs root (loop devices, BPF). Skips loudly without it, and fails under `CI=true`.

use std::time::Duration;

use ripcord_tests::ripcord_status as status;
use testkit::{
    Mount, Scratch, Site,
    replication::{AgentIdentity, ProcessServer, Replicator, ripcord, wait_for},
};

const MIB: u64 = 1 << 20;

fn tmpfs(dir: &std::path::Path, mib: u64) -> Mount {
    Mount::new(
        std::path::Path::new("tmpfs"),
        dir,
        &["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700")],
    )
    .expect("mounting a tmpfs")
}

/// The row of server `id` in `ripcord status --json`.
fn server(deployment: &std::path::Path, id: &str) -> Option<serde_json::Value> {
    status(deployment)["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
}

#[test]
fn process_servers_join_report_and_are_refused_when_they_should_be() {
    let Some(site) =
        Site::builder("process_servers_join_report_and_are_refused_when_they_should_be")
            .file_target()
            .ps_config("[health]\nsample-ms = 200\nheartbeat-window-secs = 3\n")
            .machine("db01")
            .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 16 * MIB);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let deployment = site.ps.dir.clone();
    let root = site.subdir("servers");
    let pass = site.ps.passphrase_file.clone();
    let ps = |args: &[&str]| {
        let mut all = vec!["ps"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--deployment", deployment.to_str().unwrap()]);
        ripcord(&all, &pass).unwrap()
    };

    // An agent's bootstrap token does not join a process server.
    let agent_token = site.ps.new_token().unwrap();
    let err = site
        .ps
        .run_join(&root, "intruder", &agent_token)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--for process-server"), "{err}");
    assert!(server(&deployment, "intruder").is_none());

    // A process server joins with its token, and reports: green, with a heartbeat.
    let mut ps2 = site.ps.join(&root, "ps2").unwrap();
    wait_for("ps2 to report green", Duration::from_secs(30), || {
        Ok(server(&deployment, "ps2").is_some_and(|s| s["health"] == "green"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{:#}\n{}", status(&deployment), ps2.logs()));
    let row = server(&deployment, "ps2").unwrap();
    assert_eq!(row["config_role"], false);
    assert_eq!(row["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(row["address"], format!("127.0.0.1:{}", ps2.data_port));
    let (ok, text, err) = ps(&["list"]);
    assert!(ok, "{err}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ps2 ") && l.contains("green") && l.ends_with("process")),
        "{text}"
    );
    // It holds no CA key, registers no agents, and its directory is complete.
    assert!(!ps2.dir.join("ca/ca.key").exists());
    assert!(ps2.dir.join("escrow.json").exists());
    assert!(!ps2.logs().contains("register="), "{}", ps2.logs());

    // A second server cannot take over the id; the token it brought is not consumed.
    let token = site.ps.new_server_token().unwrap();
    let err = site
        .ps
        .run_join(&site.subdir("other"), "ps2", &token)
        .unwrap_err()
        .to_string();
    assert!(err.contains("registered already"), "{err}");
    site.ps.run_join(&root, "ps3", &token).unwrap();

    // A server newer than the configuration role is refused, saying what to do; a peer
    // without a valid join token learns not even that (nor which ids are taken).
    let attempt = |token: &ripcord_transport::Token, id: &str, version: &str| {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(ripcord_transport::control::join(
                &ripcord_transport::control::JoinParams {
                    config_addr: ([127, 0, 0, 1], site.ps.register_port).into(),
                    config_name: "127.0.0.1",
                    ca_hash: &site.ps.ca_hash,
                    token,
                    server_id: &ripcord_transport::MachineId::new(id).unwrap(),
                    names: &["127.0.0.1".to_owned()],
                    version,
                    fingerprint: &"ab".repeat(32),
                    data_port: 9443,
                },
                &site.subdir(id),
            ))
    };
    let refusal = |r: Result<_, ripcord_transport::control::ControlError>| match r {
        Err(ripcord_transport::control::ControlError::Refused { refusal, message }) => {
            (refusal, message)
        }
        other => panic!("not refused: {other:?}"),
    };
    let forged: ripcord_transport::Token = "abcdef.0123456789abcdef".parse().unwrap();
    for (id, version) in [("ps-next", "99.0.0"), ("ps2", env!("CARGO_PKG_VERSION"))] {
        let (why, message) = refusal(attempt(&forged, id, version));
        assert_eq!(why, ripcord_transport::control::Refusal::Token, "{message}");
    }
    let token: ripcord_transport::Token = site.ps.new_server_token().unwrap().parse().unwrap();
    let (why, message) = refusal(attempt(&token, "ps-next", "99.0.0"));
    assert_eq!(
        why,
        ripcord_transport::control::Refusal::NewerThanConfigRole
    );
    assert!(
        message.contains("upgrade the configuration role first"),
        "{message}"
    );
    assert!(server(&deployment, "ps-next").is_none());

    // A stopped server is disconnected once the heartbeat window has passed: red, with a
    // critical alert (placement passes such a server by: its unit tests).
    ps2.stop().unwrap();
    let heartbeat_alert = |deployment: &std::path::Path| {
        status(deployment)["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["subject"] == "ps2" && a["kind"] == "health-heartbeat")
            .cloned()
    };
    wait_for(
        "the stopped ps2 to turn red",
        Duration::from_secs(30),
        || Ok(heartbeat_alert(&deployment).is_some()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{:#}", status(&deployment)));
    let alert = heartbeat_alert(&deployment).unwrap();
    assert_eq!(alert["severity"], "critical", "{alert:#}");
    assert!(
        alert["message"].as_str().unwrap().contains("disconnected"),
        "{alert:#}"
    );
    assert_eq!(server(&deployment, "ps2").unwrap()["health"], "red");
    assert_eq!(
        server(&deployment, "ps2").unwrap()["reported_health"],
        "red"
    );
    let (ok, text, err) = ps(&["list"]);
    assert!(ok, "{err}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ps2 ") && l.contains("red")),
        "{text}"
    );

    // A copy of ps2's directory started elsewhere is a clone: refused at start, with a
    // critical alert; ps2 itself goes on reporting.
    let clone_dir = site.subdir("clone").join("ps2");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&ps2.dir)
        .arg(&clone_dir)
        .status()
        .unwrap();
    assert!(copied.success());
    let mut clone = ProcessServer::joined(clone_dir, &pass).unwrap();
    let err = clone.spawn().unwrap_err().to_string();
    assert!(err.contains("a cloned server?"), "{err}");
    let alerts = status(&deployment)["alerts"].clone();
    assert!(
        alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["subject"] == "ps2" && a["kind"] == "cloned" && a["severity"] == "critical"),
        "{alerts:#}"
    );
    let before = server(&deployment, "ps2").unwrap()["last_heartbeat"].as_i64();
    ps2.spawn().unwrap();
    wait_for(
        "ps2 to report again after the clone was refused",
        Duration::from_secs(30),
        || Ok(server(&deployment, "ps2").unwrap()["last_heartbeat"].as_i64() > before),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ps2.logs()));
    // Reporting again clears the disconnection.
    wait_for("ps2 to be green again", Duration::from_secs(30), || {
        Ok(server(&deployment, "ps2").unwrap()["health"] == "green"
            && heartbeat_alert(&deployment).is_none())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{:#}", status(&deployment)));

    // Removal: the configuration role's own server never; ps2 yes. Its reports are refused
    // from then on, and a restart of it is refused.
    let own = status(&deployment)["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["config_role"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, _, err) = ps(&["remove", "--server", &own]);
    assert!(!ok && err.contains("runs the configuration role"), "{err}");
    let (ok, _, err) = ps(&["remove", "--server", "ps2"]);
    assert!(ok, "{err}");
    assert!(server(&deployment, "ps2").is_none());
    wait_for(
        "ps2 to log that its reports are refused",
        Duration::from_secs(30),
        || Ok(ps2.logs().contains("refuses this server's reports")),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ps2.logs()));
    ps2.stop().unwrap();
    let err = ps2.spawn().unwrap_err().to_string();
    assert!(err.contains("not registered"), "{err}");

    // Replication never depended on any of it: new writes are acknowledged.
    let acked = |s: serde_json::Value| s["disks"][0]["acked_seq"].as_u64().unwrap_or(0);
    let before = acked(status(&deployment));
    ripcord_tests::write_random_at(&disk.path, 0, 2, 9);
    wait_for(
        "the writes after all this to be acknowledged",
        Duration::from_secs(60),
        || Ok(acked(status(&deployment)) > before),
    )
    .unwrap();
    let (ok, _) = agent.stop().unwrap();
    assert!(ok);
}

/// Placement (issue 15, item 4): new machines go to green servers with headroom, the
/// fewest machines first, and a machine placed on a joined server replicates through it:
/// the agent is told that server at registration, the server accepts the machine's
/// certificate because the configuration role told it so, its disk reports reach the
/// configuration role, and a failover from the shared target store equals the device.
#[test]
fn new_machines_are_placed_on_green_servers_and_replicate_through_them() {
    let test = "new_machines_are_placed_on_green_servers_and_replicate_through_them";
    if !testkit::require_root(test) {
        return;
    }
    // Each server's cache on a file system of its own, so its free space is its own (the
    // host's disk may be fuller than a green server's cache is allowed to be).
    let caches = Scratch::new("placement-caches");
    let (cache1, cache2) = (caches.path.join("ps1"), caches.path.join("ps2"));
    let _mounts = [tmpfs(&cache1, 512), tmpfs(&cache2, 512)];
    let Some(site) = Site::builder(test)
        .file_target()
        .ps_config(&format!(
            "cache-dir = \"{}\"\n[health]\nsample-ms = 200\n",
            cache1.display()
        ))
        .machine("db01")
        .start()
    else {
        return;
    };
    let deployment = site.ps.dir.clone();
    let ps2 = site
        .ps
        .join_with(
            &site.subdir("servers"),
            "ps2",
            &["--cache-dir", cache2.to_str().unwrap()],
        )
        .unwrap();
    // Both servers green with a measured load: placement has a choice.
    let listed = || -> serde_json::Value {
        let (ok, out, err) = ripcord(
            &[
                "ps",
                "list",
                "--json",
                "--deployment",
                deployment.to_str().unwrap(),
            ],
            &site.ps.passphrase_file,
        )
        .unwrap();
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    // (Both run on this host, so both see its CPU: wait until it has room.)
    wait_for(
        "both servers green with room for 30% more load",
        Duration::from_secs(60),
        || {
            let servers = listed();
            let servers = servers.as_array().unwrap();
            Ok(servers.len() == 2
                && servers.iter().all(|s| {
                    s["health"] == "green"
                        && s["load"]["cpu_percent"].as_f64().is_some_and(|c| c < 50.0)
                }))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{:#}\n{}", listed(), ps2.logs()));

    // db01 registered at the start, on the config role's server; three more spread. A
    // registration refused because this busy host left neither server room is retried.
    let register = |machine: &str| {
        let mut identity = None;
        wait_for(
            &format!("{machine} to be placed"),
            Duration::from_secs(60),
            || match AgentIdentity::register(&site.ps, site.path(), machine) {
                Ok(id) => {
                    identity = Some(id);
                    Ok(true)
                }
                Err(e) if format!("{e:#}").contains("no process server can take") => Ok(false),
                Err(e) => Err(e),
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{:#}", listed()));
        identity.unwrap()
    };
    let new: Vec<_> = ["m1", "m2", "m3"].iter().map(|m| register(m)).collect();
    let placed = |machine: &str| -> String {
        status(&deployment)["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == machine)
            .unwrap_or_else(|| panic!("{machine} not recorded"))["process_server"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let on_ps2: Vec<&str> = ["m1", "m2", "m3"]
        .into_iter()
        .filter(|m| placed(m) == "ps2")
        .collect();
    let counts: Vec<u64> = listed()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["machines"].as_u64().unwrap())
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 4, "{:#}", listed());
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1 && !on_ps2.is_empty(),
        "machines not spread: {:#}",
        listed()
    );

    // A machine placed on ps2 replicates through it.
    let machine = on_ps2[0];
    let identity = &new[["m1", "m2", "m3"]
        .iter()
        .position(|m| *m == machine)
        .unwrap()];
    let disk = site.loop_device("placed.img", 16 * MIB);
    ripcord_tests::write_random_at(&disk.path, 0, 4, 11);
    let agent = Replicator::start(identity, &[&disk.path], &[]).unwrap();
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    ripcord_tests::write_random_at(&disk.path, 6, 3, 12);
    let disk_id = identity.disk_id(&disk.path).unwrap();
    wait_for(
        "ps2 to report the disk to the configuration role",
        Duration::from_secs(60),
        || {
            Ok(status(&deployment)["disks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["id"] == disk_id.as_str() && d["acked_seq"].as_u64() > Some(0)))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{:#}\n{}", status(&deployment), ps2.logs()));
    let served = |logs: String| {
        logs.lines()
            .any(|l| l.contains("disk stream open") && l.contains(&disk_id))
    };
    assert!(
        served(ps2.logs()),
        "ps2 did not serve {machine}:\n{}",
        ps2.logs()
    );
    assert!(
        !served(site.ps.logs()),
        "the config role's server served the disk placed on ps2:\n{}",
        site.ps.logs()
    );
    site.final_point(agent, &disk_id);
    let image = site.path().join("placed-failover.img");
    let (ok, _, err) = testkit::replication::failover(
        site.target(),
        &disk_id,
        "latest",
        &image,
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(ok, "{err}");
    ripcord_tests::assert_same(
        &image,
        &disk.path,
        "failover of a disk replicated through ps2",
    );

    // The operator removes the machine on the configuration role: ps2 stops admitting it
    // with its next report.
    let listed_on = |dir: &std::path::Path| -> String {
        let out = std::process::Command::new(testkit::binary("ripcord-ps"))
            .args(["machines", "list", "--dir"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        listed_on(&ps2.dir).contains(machine),
        "{}",
        listed_on(&ps2.dir)
    );
    let removed = std::process::Command::new(testkit::binary("ripcord-ps"))
        .args(["machines", "remove", "--dir"])
        .arg(&site.ps.dir)
        .arg(machine)
        .status()
        .unwrap();
    assert!(removed.success());
    wait_for(
        "ps2 to drop the removed machine",
        Duration::from_secs(30),
        || Ok(!listed_on(&ps2.dir).contains(machine)),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ps2.logs()));
}
