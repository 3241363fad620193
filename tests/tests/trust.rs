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
    let (ok, out) = ps_cli(&site.ps.dir, &["token", "--uses", "5"]);
    assert!(ok, "{out}");
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .unwrap_or_else(|| panic!("no token in:\n{out}"));
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

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

fn acked_seq(agent: &Replicator) -> u64 {
    agent
        .stats()
        .and_then(|v| v["disks"][0]["acked_seq"].as_u64())
        .unwrap_or(0)
}

/// The hostile agent: connects with its own valid certificate, says hello, then opens 63
/// disk streams and sends on each a maximum-size batch frame short of its last byte, so
/// that nothing ever completes and everything would sit in the server's memory.
async fn hostile_agent(state_dir: &Path, server: std::net::SocketAddr, hold: Duration) {
    use ripcord_proto::{
        Batch, DiskId, Extent, ExtentKind, FLAG_SEALED, Hello, MAX_PAYLOAD_LEN, Message,
        PROTOCOL_VERSION, ProtectDisk,
    };
    let identity = ripcord_transport::Identity::load(state_dir).unwrap();
    let endpoint = ripcord_transport::client_endpoint(&identity).unwrap();
    let conn = ripcord_transport::connect(&endpoint, server, "127.0.0.1")
        .await
        .unwrap();
    let (mut control, mut control_recv) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        machine_id: identity.machine_id().as_str().to_owned(),
        agent_version: "hostile".to_owned(),
    });
    control.write_all(&hello.to_frame().unwrap()).await.unwrap();
    let mut ack = [0u8; 16];
    control_recv.read_exact(&mut ack).await.unwrap();
    let mut streams = Vec::new();
    for i in 0..63u8 {
        let conn = conn.clone();
        streams.push(tokio::spawn(async move {
            let Ok((mut send, _recv)) = conn.open_bi().await else {
                return;
            };
            let disk_id = DiskId([i + 1; 16]);
            let pd = Message::ProtectDisk(ProtectDisk {
                disk_id,
                size_bytes: 1 << 30,
                sector_size: 512,
                epoch: 1,
                wrapped_key: vec![1; 48],
            });
            let batch = Message::Batch(Batch {
                disk_id,
                epoch: 1,
                first_seq: 1,
                last_seq: 1,
                extents: vec![Extent {
                    sector: 0,
                    sectors: 8,
                    kind: ExtentKind::Data,
                }],
                flags: FLAG_SEALED,
                payload: vec![0x5a; MAX_PAYLOAD_LEN],
            })
            .to_frame()
            .unwrap();
            if send.write_all(&pd.to_frame().unwrap()).await.is_err() {
                return;
            }
            let _ = send.write_all(&batch[..batch.len() - 1]).await;
            // Hold the stream open with the frame unfinished.
            std::future::pending::<()>().await;
        }));
    }
    tokio::time::sleep(hold).await;
    for s in streams {
        s.abort();
    }
    conn.close(0u32.into(), b"done");
}

/// Attacker: a registered agent with a valid certificate of its own, opening 63 streams
/// of maximum-size frames it never finishes. The server holds at most its per-connection
/// budget and QUIC window for it: its peak RSS stays within the 256 MiB goal, and another
/// machine's disk keeps being acknowledged throughout.
#[test]
fn a_hostile_agent_cannot_exhaust_server_memory_or_starve_other_disks() {
    let Some(site) =
        Site::new("a_hostile_agent_cannot_exhaust_server_memory_or_starve_other_disks")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    let honest = site.replicator(&[&disk.path]);
    honest.wait_synced(Duration::from_secs(60)).unwrap();
    let hostile = site.register("hostile");
    let server: std::net::SocketAddr = format!("127.0.0.1:{}", site.ps.data_port).parse().unwrap();
    let attack = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(hostile_agent(
                &hostile.state_dir,
                server,
                Duration::from_secs(12),
            ))
    });
    // During the attack, the honest disk's new writes are acknowledged.
    std::thread::sleep(Duration::from_secs(4));
    let before = acked_seq(&honest);
    let mut acked_during_attack = false;
    for round in 0..10u64 {
        testkit::run(
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={}", disk.path.display()),
                "bs=64k",
                "count=16",
                &format!("seek={}", round * 16),
                "oflag=direct",
                "conv=notrunc",
            ],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        if acked_seq(&honest) > before {
            acked_during_attack = true;
            break;
        }
    }
    let peak_kib = vm_hwm_kib(site.ps.pid());
    attack.join().unwrap();
    eprintln!(
        "process server peak RSS under the attack: {} MiB",
        peak_kib / 1024
    );
    assert!(
        acked_during_attack,
        "the honest disk was not acknowledged during the attack (acked {before})"
    );
    assert!(
        peak_kib < 256 * 1024,
        "process server peak RSS {} MiB under the attack (goal 256 MiB)",
        peak_kib / 1024
    );
    let (ok, log) = honest.stop().unwrap();
    assert!(ok, "{log}");
}
