//! Trust end to end: only a machine's own key writes its disks, and a compromised process
//! server or a foreign store gets nothing. Real binaries, real QUIC on loopback, real loop
//! devices; the attacker is named in each test.
//!
//! Needs root (loop devices, BPF). Skips loudly without it, and fails under `CI=true`.

use std::{path::Path, process::Command, time::Duration};

use testkit::{
    Site,
    replication::{AgentIdentity, ProcessServer, Replicator},
};

const MIB: u64 = 1 << 20;

fn ps_cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(testkit::binary("ripcord-ps"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("running ripcord-ps");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Attacker: a second host holding a bootstrap token (made for it, with uses to spare),
/// registering under the id of a machine that already replicates. Before the fix it got a
/// certificate, pushed its own bytes under the victim's disk and failover restored them.
#[test]
fn a_second_host_with_a_token_cannot_register_as_an_existing_machine() {
    let Some(site) =
        Site::builder("a_second_host_with_a_token_cannot_register_as_an_existing_machine")
            .machine("db1")
            .start()
    else {
        return;
    };
    let (ok, token) = ps_cli(&site.ps.dir, &["token", "--uses", "5"]);
    assert!(ok, "{token}");
    let attacker_dir = site.subdir("attacker");
    let out = Command::new(testkit::binary("ripcord-agent"))
        .args(["register", "--machine-id", "db1", "--token", token.trim()])
        .args(["--ca-hash", &site.ps.ca_hash])
        .arg("--server")
        .arg(format!("127.0.0.1:{}", site.ps.register_port))
        .arg("--state-dir")
        .arg(&attacker_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the impostor registered:\n{stderr}");
    assert!(
        stderr.contains("already registered"),
        "refusal not named:\n{stderr}"
    );
    assert!(!attacker_dir.join("agent.crt").exists());
    // The machine list still shows only the real db1, registered by its own token.
    let (ok, list) = ps_cli(&site.ps.dir, &["machines", "list"]);
    assert!(ok, "{list}");
    assert_eq!(
        list.lines().filter(|l| l.starts_with("db1 ")).count(),
        1,
        "{list}"
    );
    // The real machine re-registers from its own state directory: its certificate proves
    // it, and no token is needed.
    let out = Command::new(testkit::binary("ripcord-agent"))
        .args([
            "register",
            "--machine-id",
            "db1",
            "--ca-hash",
            &site.ps.ca_hash,
        ])
        .arg("--server")
        .arg(format!("127.0.0.1:{}", site.ps.register_port))
        .arg("--state-dir")
        .arg(&site.id.state_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the owner could not renew: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, list) = ps_cli(&site.ps.dir, &["machines", "list"]);
    assert!(list.contains("renewed by its key"), "{list}");
}

/// The operator removes a machine while its agent replicates (the attacker stole that
/// machine's key, say): the open connection is closed within seconds, the agent stops
/// and says why, and the certificate is refused on the next handshake too.
#[test]
fn a_removed_machine_loses_its_open_connection_and_its_agent_says_why() {
    let Some(site) =
        Site::new("a_removed_machine_loses_its_open_connection_and_its_agent_says_why")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let (ok, out) = ps_cli(&site.ps.dir, &["machines", "remove", "host"]);
    assert!(ok, "{out}");
    let (ok, log) = agent.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!ok, "the removed machine's agent kept running:\n{log}");
    assert!(
        log.contains("refused this machine's certificate") && log.contains("not registered"),
        "the agent did not say why:\n{log}"
    );
    // The next handshake is refused as well.
    let again = Replicator::start(&site.id, &[&disk.path], &[]);
    let log = match again {
        Ok(a) => a.wait_exit(Duration::from_secs(30)).unwrap().1,
        Err(e) => format!("{e:#}"),
    };
    assert!(log.contains("refused this machine's certificate"), "{log}");
    // An operator lets it back in with a new token: it replicates again.
    let back = AgentIdentity::register(&site.ps, site.path(), "host").unwrap();
    let agent = Replicator::start(&back, &[&disk.path], &[]).unwrap();
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "{log}");
}

/// Attacker: a compromised process server (it controls `escrow.json` and answers the
/// agent's hello with its own escrow key). The agent pinned the deployment's key at
/// registration: it refuses to wrap any data key to the new one and stops.
#[test]
fn a_process_server_with_another_escrow_key_gets_no_data_key() {
    let Some(mut site) = Site::new("a_process_server_with_another_escrow_key_gets_no_data_key")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    site.ps.stop().unwrap();
    let escrow_path = site.ps.dir.join("escrow.json");
    let mut escrow: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&escrow_path).unwrap()).unwrap();
    escrow["public_key"] = serde_json::json!(vec![7u8; 32]);
    std::fs::write(&escrow_path, escrow.to_string()).unwrap();
    site.ps.spawn().unwrap();
    let log = match Replicator::start(&site.id, &[&disk.path], &[]) {
        Ok(a) => a.wait_exit(Duration::from_secs(30)).unwrap().1,
        Err(e) => format!("{e:#}"),
    };
    assert!(
        log.contains("escrow key") && log.contains("refusing to hand it any data key"),
        "the agent did not refuse the foreign escrow key:\n{log}"
    );
    assert!(
        !site.ps.dir.join("disks.json").exists(),
        "a wrapped data key reached the compromised server"
    );
}

/// Attacker (or mistake): a second deployment pointed at a store that already belongs to
/// another (a reused bucket or prefix). It is refused when the server starts, not at
/// failover, and the store's escrow metadata is untouched.
#[test]
fn a_store_of_another_deployment_is_refused_when_the_server_starts() {
    let Some(site) =
        Site::builder("a_store_of_another_deployment_is_refused_when_the_server_starts")
            .file_target()
            .start()
    else {
        return;
    };
    let escrow_object = site
        .path()
        .join(testkit::fixture::FILE_TARGET_DIR)
        .join("escrow.json");
    let before = std::fs::read(&escrow_object).expect("the first deployment wrote its escrow");
    let other_root = site.subdir("other");
    let err = ProcessServer::start_with_target(&other_root, Some(site.target()))
        .err()
        .expect("a second deployment started on a store that is not its own");
    let err = format!("{err:#}");
    assert!(
        err.contains("belongs to another deployment"),
        "refusal not named:\n{err}"
    );
    assert_eq!(std::fs::read(&escrow_object).unwrap(), before);
}

/// Certificates renew by themselves with the machine's key, before they expire, while the
/// agent replicates: the server issues 60-second certificates here, so the agent renews
/// about every 35 s, reconnects with the new certificate, and loses nothing.
#[test]
fn certificates_renew_by_themselves_and_replication_goes_on() {
    let Some(mut site) = Site::builder("certificates_renew_by_themselves_and_replication_goes_on")
        .ps_config("client-cert-secs = 60")
        .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !agent.log().contains("certificate renewed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no renewal within 90 s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Writes after the renewal reach the server with the new certificate.
    testkit::run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", disk.path.display()),
            "bs=1M",
            "count=4",
            "seek=8",
            "oflag=direct",
            "conv=notrunc",
        ],
    )
    .unwrap();
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "{log}");
    assert!(!log.contains("refused this machine's certificate"), "{log}");
    let (_, list) = ps_cli(&site.ps.dir, &["machines", "list"]);
    assert!(list.contains("renewed by its key"), "{list}");
    site.ps.stop().unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let image = site.path().join("replica.img");
    site.ps.replay(&disk_id, &image, false).unwrap();
    let diff = testkit::sys::diff_sectors(&image, &disk.path).unwrap();
    assert!(diff.is_empty(), "replica differs in {} ranges", diff.len());
}
