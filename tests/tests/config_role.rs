//! The configuration role (issue 15, first part): a process server running `roles =
//! ["config", "process"]` (the default) keeps `control.db`, and `ripcord status` shows the
//! deployment from it: the server with its health and heartbeat, the machine that
//! registered and the server it replicates to, its disk with the acknowledged batch and
//! the newest recovery point, and the health alerts, raised and cleared with the signal.
//! State survives a restart of the server, and a process-only server keeps no database.
//!
//! Needs root (loop devices, BPF). Skips loudly without it, and fails under `CI=true`.

use std::time::Duration;

use ripcord_tests::ripcord_status as status;
use testkit::{Site, replication::wait_for};

const MIB: u64 = 1 << 20;

#[test]
fn the_config_role_records_the_deployment_and_ripcord_status_shows_it() {
    let Some(mut site) =
        Site::builder("the_config_role_records_the_deployment_and_ripcord_status_shows_it")
            .file_target()
            .ps_config("[health]\nsample-ms = 200\n")
            .machine("db01")
            .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    ripcord_tests::write_random_at(&disk.path, 0, 4, 5);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let device = disk.path.to_str().unwrap().to_owned();
    let deployment = site.ps.dir.clone();

    // The machine, its disk with a durable batch and a recovery point, a green server.
    wait_for(
        "the configuration database to show the disk with a point",
        Duration::from_secs(60),
        || {
            let s = status(&deployment);
            let disk = s["disks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["id"] == disk_id.as_str())
                .cloned();
            Ok(disk
                .is_some_and(|d| d["acked_seq"].as_u64() > Some(0) && d["last_point_at"].is_i64())
                && s["servers"][0]["health"] == "green")
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:#}\n{}", status(&deployment), site.ps.logs()));
    let s = status(&deployment);
    let servers = s["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{s:#}");
    assert_eq!(servers[0]["config_role"], true);
    let server_id = servers[0]["id"].as_str().unwrap().to_owned();
    let machines = s["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 1, "{s:#}");
    assert_eq!(machines[0]["id"], "db01");
    assert_eq!(machines[0]["process_server"], server_id.as_str());
    let d = &s["disks"][0];
    assert_eq!(
        (
            d["machine"].as_str(),
            d["device"].as_str(),
            d["size_bytes"].as_u64()
        ),
        (Some("db01"), Some(device.as_str()), Some(32 * MIB)),
        "{s:#}"
    );
    assert!(d["epoch"].as_u64() >= Some(1), "{s:#}");

    // An idle disk whose agent is connected: its newest point holds every write, so its
    // lag stays near zero while the point itself ages (the lag used to be the point's age).
    let idle_secs = 8;
    std::thread::sleep(Duration::from_secs(idle_secs));
    let s = status(&deployment);
    let d = &s["disks"][0];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now - d["last_point_at"].as_i64().unwrap() >= idle_secs as i64,
        "the disk was not idle: {s:#}"
    );
    assert!(
        d["lag_secs"].as_i64().is_some_and(|l| l <= 2),
        "an idle disk with its agent connected lags: {s:#}"
    );
    let metrics = ripcord_tests::http_get(site.ps.metrics_port, "/metrics");
    let label = format!("disk=\"{disk_id}\"");
    assert_eq!(
        ripcord_tests::metric(&metrics, "ripcord_ps_lag_seconds", &label),
        0.0,
        "{metrics}"
    );
    assert!(ripcord_tests::metric(&metrics, "ripcord_ps_newest_point_age_seconds", &label) >= 8.0);

    // The tables an operator reads.
    let (ok, text, err) = testkit::replication::ripcord(
        &["status", "--deployment", deployment.to_str().unwrap()],
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(ok, "{err}");
    for shown in [
        "PROCESS SERVERS",
        "green",
        "(config role)",
        "db01",
        &device,
        &disk_id,
        "ALERTS: none",
    ] {
        assert!(text.contains(shown), "{shown:?} not in:\n{text}");
    }

    // A restart of the server: the state is still there, and the heartbeat comes back.
    let before = s["servers"][0]["last_heartbeat"].as_i64().unwrap();
    site.ps.stop().unwrap();
    let s = status(&deployment);
    assert_eq!(
        s["machines"][0]["id"], "db01",
        "the machine was lost: {s:#}"
    );
    assert_eq!(s["disks"][0]["id"], disk_id.as_str());
    site.ps.spawn().unwrap();
    wait_for(
        "a heartbeat after the restart",
        Duration::from_secs(30),
        || Ok(status(&deployment)["servers"][0]["last_heartbeat"].as_i64() > Some(before)),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", site.ps.logs()));
    // The restarted server has not seen a group commit or a new point yet: what it
    // reported before stays (it used to be overwritten with zeroes and "never"). A later
    // heartbeat (a second on) comes after several of its disk reports.
    let first = status(&deployment)["servers"][0]["last_heartbeat"].as_i64();
    wait_for(
        "a second heartbeat after the restart",
        Duration::from_secs(30),
        || Ok(status(&deployment)["servers"][0]["last_heartbeat"].as_i64() > first),
    )
    .unwrap();
    let d = &status(&deployment)["disks"][0];
    assert!(
        d["acked_seq"].as_u64() > Some(0)
            && d["last_point_at"].is_i64()
            && d["epoch"].as_u64() >= Some(1),
        "the restart erased the disk's state: {d:#}"
    );
    // A policy with a 10 s RPO threshold, given to the machine while it replicates: no
    // alert while its idle disk's point is current.
    let dep = deployment.to_str().unwrap();
    let policy = |args: &[&str]| {
        testkit::replication::ripcord(
            &[&["policy"], args, &["--deployment", dep]].concat(),
            &site.ps.passphrase_file,
        )
        .unwrap()
    };
    let (ok, _, err) = policy(&["assign", "--machine", "db01", "--policy", "gold"]);
    assert!(!ok && err.contains("none yet"), "{err}");
    let (ok, _, err) = policy(&["set", "--name", "gold", "--rpo-threshold-secs", "10"]);
    assert!(ok, "{err}");
    let (ok, _, err) = policy(&["set", "--name", "x", "--rpo-threshold-secs", "1"]);
    assert!(!ok && err.contains("outside 10 s"), "{err}");
    let (ok, _, err) = policy(&["assign", "--machine", "db01", "--policy", "gold"]);
    assert!(ok, "{err}");
    let (ok, text, err) = policy(&["list"]);
    assert!(
        ok && text.contains("gold") && text.contains("db01"),
        "{text}{err}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let rpo_alerts = || -> Vec<serde_json::Value> {
        status(&deployment)["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "rpo")
            .cloned()
            .collect()
    };
    assert!(rpo_alerts().is_empty(), "{:#}", status(&deployment));

    let (ok, _) = agent.stop().unwrap();
    assert!(ok);
    // Its agent gone, the disk's writes are unknown here: the lag grows again, and passes
    // the policy's threshold.
    wait_for(
        "the lag to grow once the agent stopped",
        Duration::from_secs(30),
        || Ok(status(&deployment)["disks"][0]["lag_secs"].as_i64() >= Some(3)),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:#}", status(&deployment)));
    wait_for(
        "an RPO alert past the policy's threshold",
        Duration::from_secs(30),
        || Ok(!rpo_alerts().is_empty()),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:#}", status(&deployment)));
    let alert = &rpo_alerts()[0];
    assert_eq!(alert["subject"], disk_id.as_str());
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains("policy gold") && message.contains("10 s"),
        "{message}"
    );
}

/// A process-only server keeps no configuration database, and `ripcord status` says where
/// to look instead of showing an empty deployment.
#[test]
fn a_process_only_server_keeps_no_configuration_database() {
    let Some(site) = Site::builder("a_process_only_server_keeps_no_configuration_database")
        .ps_config("roles = [\"process\"]\n")
        .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 16 * MIB);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    assert!(
        !site.ps.dir.join("control.db").exists(),
        "a process-only server made control.db"
    );
    let (ok, _, err) = testkit::replication::ripcord(
        &["status", "--deployment", site.ps.dir.to_str().unwrap()],
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(
        !ok && err.contains("no configuration database") && err.contains("config role"),
        "{err}"
    );
    let (ok, _) = agent.stop().unwrap();
    assert!(ok);
}

/// A policy given to a machine reaches its process server (the disk's retention, shown in
/// its metrics) and its agent (application-consistent points, none configured in its own
/// file) within seconds, with neither restarted (issue 15, item 3).
#[test]
fn a_policy_reaches_the_process_server_and_the_agent_without_restarts() {
    let Some(site) =
        Site::builder("a_policy_reaches_the_process_server_and_the_agent_without_restarts")
            .file_target()
            .machine("db01")
            .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", disk.path.to_str().unwrap()]).unwrap();
    let mnt = testkit::Mount::new(&disk.path, &site.path().join("mnt"), &["-t", "ext4"]).unwrap();
    let hooks = site.subdir("hooks");
    let config = site.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "app-interval-secs = 0\nhooks-dir = {:?}\nmetrics-addr = \"\"\n",
            hooks.display().to_string()
        ),
    )
    .unwrap();
    // Before the agent starts: its application-consistent interval counts from its start.
    let started = std::time::Instant::now();
    let agent = site.replicator_with(&[&disk.path], &["--config", config.to_str().unwrap()], &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let label = format!("disk=\"{disk_id}\"");
    let retention = || {
        let m = ripcord_tests::http_get(site.ps.metrics_port, "/metrics");
        m.lines()
            .any(|l| l.starts_with("ripcord_ps_retention_seconds{") && l.contains(&label))
            .then(|| ripcord_tests::metric(&m, "ripcord_ps_retention_seconds", &label))
    };
    wait_for(
        "the disk's retention metric",
        Duration::from_secs(30),
        || Ok(retention().is_some()),
    )
    .unwrap();
    assert_eq!(retention(), Some(72.0 * 3600.0), "the server's default");

    let dep = site.ps.dir.to_str().unwrap();
    for args in [
        &[
            "set",
            "--name",
            "gold",
            "--retention-hours",
            "2",
            "--app-consistent-every-secs",
            "60",
        ][..],
        &["assign", "--machine", "db01", "--policy", "gold"],
    ] {
        let (ok, out, err) = testkit::replication::ripcord(
            &[&["policy"], args, &["--deployment", dep]].concat(),
            &site.ps.passphrase_file,
        )
        .unwrap();
        assert!(ok, "policy {args:?}: {out}{err}");
    }
    wait_for(
        "the policy's retention on the process server",
        Duration::from_secs(20),
        || Ok(retention() == Some(7200.0)),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", retention(), site.ps.logs()));
    wait_for(
        "the agent to take the policy's interval",
        Duration::from_secs(20),
        || {
            Ok(agent
                .log()
                .contains("sets application-consistent points every 60 s"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    // The agent's file asks for none; the policy's first one is due 60 s after the agent
    // started.
    let app_points = || {
        testkit::replication::points(site.target(), &disk_id, &site.ps.passphrase_file)
            .unwrap()
            .into_iter()
            .filter(|p| p["kind"] == "app")
            .count()
    };
    assert_eq!(app_points(), 0);
    wait_for(
        "an application-consistent point by the policy",
        Duration::from_secs(120),
        || Ok(app_points() > 0),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    assert!(
        started.elapsed() >= Duration::from_secs(55),
        "an application-consistent point came before the policy's interval had passed"
    );
    assert!(
        agent.log().contains("application-consistent point taken"),
        "{}",
        agent.log()
    );
    drop(agent);
    drop(mnt);
}
