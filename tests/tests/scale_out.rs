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
    Site,
    replication::{ProcessServer, ripcord, wait_for},
};

const MIB: u64 = 1 << 20;

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
            .ps_config("[health]\nsample-ms = 200\n")
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

    // A server newer than the configuration role is refused, saying what to do.
    let token: ripcord_transport::Token = site.ps.new_server_token().unwrap().parse().unwrap();
    let newer = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(ripcord_transport::control::join(
            &ripcord_transport::control::JoinParams {
                config_addr: ([127, 0, 0, 1], site.ps.register_port).into(),
                config_name: "127.0.0.1",
                ca_hash: &site.ps.ca_hash,
                token: &token,
                server_id: &ripcord_transport::MachineId::new("ps-next").unwrap(),
                names: &["127.0.0.1".to_owned()],
                version: "99.0.0",
                fingerprint: &"ab".repeat(32),
                data_port: 9443,
            },
            &site.subdir("ps-next"),
        ));
    match newer {
        Err(ripcord_transport::control::ControlError::Refused { refusal, message }) => {
            assert_eq!(
                refusal,
                ripcord_transport::control::Refusal::NewerThanConfigRole
            );
            assert!(
                message.contains("upgrade the configuration role first"),
                "{message}"
            );
        }
        other => panic!("a newer server was not refused: {other:?}"),
    }
    assert!(server(&deployment, "ps-next").is_none());

    // A copy of ps2's directory started elsewhere is a clone: refused at start, with a
    // critical alert; ps2 itself goes on reporting.
    ps2.stop().unwrap();
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
