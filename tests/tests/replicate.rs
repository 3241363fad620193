//! Replication end to end: real agent (BPF capture), real process server, real QUIC on
//! loopback, real loop devices. The journal alone must rebuild the disk byte for byte.
//!
//! Needs root. Skips loudly without it, and fails under `CI=true`.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rand::{RngExt as _, SeedableRng as _};
use ripcord_tests::{http_get, metric};
use testkit::{
    Mount, Site, Workload,
    replication::{AgentIdentity, ProcessServer, Replicator},
};

const MIB: u64 = 1 << 20;

/// Replay the journal and compare with the device; panics with the first differences.
fn assert_replica_equals(
    ps: &ProcessServer,
    disk: &str,
    device: &Path,
    dir: &Path,
    last_cut: bool,
) {
    let image = dir.join("replica.img");
    let out = ps.replay(disk, &image, last_cut).expect("replay");
    let diff = testkit::sys::diff_sectors(&image, device).expect("compare");
    assert!(
        diff.is_empty(),
        "replica differs from the device in {} sectors, first {:?} ({out})",
        testkit::ranges::total(&diff),
        &diff[..diff.len().min(5)]
    );
    std::fs::remove_file(&image).unwrap();
}

#[test]
fn ext4_and_raw_writes_replicate_byte_for_byte() {
    let Some(mut site) = Site::new("ext4_and_raw_writes_replicate_byte_for_byte") else {
        return;
    };
    let disk = site.loop_device("disk.img", 1024 * MIB);
    // ext4 on the first 768 MiB; raw writes go to the rest.
    testkit::run(
        "mkfs.ext4",
        &["-q", "-F", disk.path.to_str().unwrap(), "786432"],
    )
    .unwrap();
    let agent = site.replicator(&[&disk.path]);

    // The workload runs while the initial sync is still copying.
    let mnt = Mount::new(&disk.path, &site.path().join("mnt"), &["-t", "ext4"]).unwrap();
    testkit::file_workload(&mnt.dir, 1, 60, 4 << 20).unwrap();
    let mut raw = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let tail = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.path)
        .unwrap();
    for _ in 0..200 {
        use std::os::unix::fs::FileExt as _;
        let off = 768 * MIB + raw.random_range(0..(256 * MIB - 65536) / 4096) * 4096;
        let len = raw.random_range(1..16) * 4096;
        let buf: Vec<u8> = (0..len).map(|_| raw.random()).collect();
        tail.write_all_at(&buf, off).unwrap();
    }
    tail.sync_all().unwrap();
    testkit::file_workload(&mnt.dir.join("second"), 3, 40, 2 << 20).unwrap();
    mnt.unmount().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();

    // Prometheus metrics while replicating.
    let metrics = http_get(site.ps.metrics_port, "/metrics");
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let batches = metric(&metrics, "ripcord_ps_batches_total", &disk_id);
    assert!(
        batches > 10.0,
        "batches metric {batches} for {disk_id}:\n{metrics}"
    );
    assert!(
        metric(&metrics, "ripcord_ps_bytes_in_total", &disk_id) > 1e6,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "ripcord_ps_connections", ""),
        1.0,
        "{metrics}"
    );

    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "agent did not stop cleanly:\n{log}");
    site.ps.stop().unwrap();
    assert_replica_equals(&site.ps, &disk_id, &disk.path, site.path(), false);
    // The last consistency cut is the quiesced state too.
    assert_replica_equals(&site.ps, &disk_id, &disk.path, site.path(), true);
}

/// Writes random 4-64 KiB blocks until stopped.
fn background_writer(dev: &Path, seed: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let dev = dev.to_owned();
    std::thread::spawn(move || {
        let mut w = Workload::new(&dev, seed).unwrap();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            w.direct_writes(4).unwrap();
            w.discards(1).unwrap();
            n += 5;
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    })
}

#[test]
fn process_server_kill9_loses_nothing_acknowledged() {
    let Some(mut site) = Site::new("process_server_kill9_loses_nothing_acknowledged") else {
        return;
    };
    let disk = site.loop_device("disk.img", 256 * MIB);
    let agent = site.replicator(&[&disk.path]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = background_writer(&disk.path, 7, Arc::clone(&stop));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut acked_before_kill = Vec::new();
    for i in 0..6 {
        // Kill while the agent streams: wait for its (re)connection, then a random moment.
        let streams = i + 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while site.ps.logs().matches("disk stream open").count() < streams {
            assert!(
                std::time::Instant::now() < deadline,
                "agent did not reconnect:\n{}",
                site.ps.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1200)));
        let acked = agent
            .stats()
            .map(|s| s["disks"][0]["acked_seq"].as_u64().unwrap_or(0))
            .unwrap_or(0);
        acked_before_kill.push(acked);
        site.ps.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..800)));
        site.ps
            .spawn()
            .unwrap_or_else(|e| panic!("restart {i}: {e:#}"));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 50, "background writer made only {writes} writes");
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "agent did not stop cleanly:\n{log}");
    site.ps.stop().unwrap();
    // Nothing acknowledged was lost: the restarted server resumed at or after every ack.
    assert!(
        site.ps.logs().matches("disk stream open").count() >= 6,
        "the server did not reopen its journal after each kill:\n{}",
        site.ps.logs()
    );
    assert!(
        log.matches("disk stream accepted").count() >= 6,
        "agent did not reconnect 6 times:\n{log}"
    );
    // A server that lost acknowledged data would resume behind the agent's ack: the
    // agent refuses that resume point and says so.
    assert!(
        !log.contains("refused"),
        "a restarted server resumed behind an acknowledgement:\n{log}"
    );
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    assert_replica_equals(&site.ps, &disk_id, &disk.path, site.path(), false);
    eprintln!("acked sequence at each kill: {acked_before_kill:?}");
}

/// Issue 14, item 4: an agent killed with `kill -9` in the middle of writes, and one
/// stopped cleanly, come back in the same epoch (a key rotation) and send only what the
/// process server may lack: the blocks written while no agent ran, and those in flight at
/// the kill. The disk holds 128 MiB of data, so a full resync would send all of it again.
#[test]
fn a_restarted_agent_continues_its_epoch_and_sends_only_what_changed() {
    let Some(mut site) =
        Site::builder("a_restarted_agent_continues_its_epoch_and_sends_only_what_changed")
            .file_target()
            .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 256 * MIB);
    ripcord_tests::write_random_at(&disk.path, 0, 128, 1);
    let mut first = site.replicator(&[&disk.path]);
    first.wait_synced(Duration::from_secs(120)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let stat = |agent: &Replicator, key: &str| -> u64 {
        agent.stats().unwrap()["disks"][0][key]
            .as_u64()
            .unwrap_or(0)
    };
    let epoch = stat(&first, "epoch");
    // The sync acknowledged, and its digests checkpointed (at most a second later).
    testkit::replication::wait_for(
        "the initial sync's acknowledgements",
        Duration::from_secs(60),
        || {
            Ok(stat(&first, "acked_seq") > 0
                && stat(&first, "acked_seq") == stat(&first, "pushed_seq"))
        },
    )
    .unwrap();
    std::thread::sleep(ripcord_agent::replicate::acked_map::CHECKPOINT_EVERY * 2);

    // kill -9 while 20 MiB are being written at random places (some of them in flight),
    // then 4 MiB more while no agent runs.
    let churn_mib = 20;
    let writer = {
        let dev = disk.path.clone();
        std::thread::spawn(move || {
            for i in 0..churn_mib {
                ripcord_tests::write_random_at(&dev, (i * 37) % 250, 1, 100 + i);
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    first.kill9();
    writer.join().unwrap();
    let down_mib = 4;
    ripcord_tests::write_random_at(&disk.path, 200, down_mib, 7);

    let second = site.replicator(&[&disk.path]);
    second.wait_synced(Duration::from_secs(120)).unwrap();
    let sent = stat(&second, "data_bytes");
    let skipped = stat(&second, "delta_skipped_bytes");
    eprintln!("after the kill: sent {sent} B, skipped {skipped} B");
    assert_eq!(
        stat(&second, "epoch"),
        epoch,
        "the restart began a new epoch"
    );
    assert!(
        sent <= (churn_mib + down_mib + 2) * MIB,
        "after a kill the agent sent {sent} B for {churn_mib} MiB written around the kill \
         and {down_mib} MiB while down"
    );
    assert!(
        skipped >= 100 * MIB,
        "the continued sync skipped only {skipped} B of the 128 MiB the server held"
    );

    // A clean stop, 4 MiB written, a start: about those 4 MiB go.
    let (ok, log) = second.stop().unwrap();
    assert!(ok, "{log}");
    ripcord_tests::write_random_at(&disk.path, 100, down_mib, 8);
    let third = site.replicator(&[&disk.path]);
    third.wait_synced(Duration::from_secs(120)).unwrap();
    let sent = stat(&third, "data_bytes");
    eprintln!(
        "after the clean stop: sent {sent} B, skipped {} B",
        stat(&third, "delta_skipped_bytes")
    );
    assert_eq!(stat(&third, "epoch"), epoch);
    assert!(
        sent <= (down_mib + 1) * MIB,
        "after a clean stop the agent sent {sent} B for {down_mib} MiB written while down"
    );
    let (log, point) = site.final_point(third, &disk_id);
    assert!(
        log.contains("continuing the epoch"),
        "the agent did not say it continues its epoch:\n{log}"
    );
    assert_eq!(point["epoch"].as_u64(), Some(epoch), "{point}");
    // The point is the device, through every key rotation.
    ripcord_tests::assert_point_equals(
        &site,
        &disk_id,
        &point,
        &disk.path,
        "the newest point after two restarts",
    );
    site.ps.stop().unwrap();
    assert_eq!(
        site.ps
            .logs()
            .matches("continues its epoch with a new data key")
            .count(),
        2,
        "{}",
        site.ps.logs()
    );
    assert_replica_equals(&site.ps, &disk_id, &disk.path, site.path(), false);
}

/// A process server that lost a disk's journal (its cache was wiped) cannot continue the
/// epoch: the restarted agent is told so (`CannotContinue`) and starts a new epoch with a
/// full sync, and its points equal the device.
#[test]
fn a_server_that_lost_the_epoch_makes_a_restarted_agent_start_a_new_one() {
    let Some(mut site) =
        Site::builder("a_server_that_lost_the_epoch_makes_a_restarted_agent_start_a_new_one")
            .file_target()
            .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 32 * MIB);
    ripcord_tests::write_random_at(&disk.path, 0, 8, 3);
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "{log}");
    site.ps.stop().unwrap();
    let journal = site.ps.dir.join("cache").join(&disk_id);
    assert!(journal.is_dir(), "no journal at {}", journal.display());
    std::fs::remove_dir_all(&journal).unwrap();
    site.ps.spawn().unwrap();
    ripcord_tests::write_random_at(&disk.path, 16, 2, 4);

    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let epoch = agent.stats().unwrap()["disks"][0]["epoch"].as_u64();
    let (log, point) = site.final_point(agent, &disk_id);
    assert!(
        log.contains("cannot continue the epoch"),
        "the agent did not say why it began a new epoch:\n{log}"
    );
    assert_eq!(epoch, Some(2), "{log}");
    assert_eq!(point["epoch"].as_u64(), Some(2), "{point}");
    ripcord_tests::assert_point_equals(
        &site,
        &disk_id,
        &point,
        &disk.path,
        "the new epoch's point",
    );
}

#[test]
fn foreign_peers_and_foreign_disks_are_refused() {
    // The site's agent is the disk's owner; it runs only in the second part.
    let Some(mut site) = Site::builder("foreign_peers_and_foreign_disks_are_refused")
        .machine("owner")
        .start()
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);

    // A peer whose certificate comes from another deployment: the handshake fails and
    // nothing reaches the journal or the registry.
    let other_root = site.path().join("other");
    std::fs::create_dir_all(&other_root).unwrap();
    let mut other = ProcessServer::start(&other_root).unwrap();
    let stranger = AgentIdentity::register(&other, &other_root, "stranger").unwrap();
    other.stop().unwrap();
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stranger.state_dir.join("state.json")).unwrap())
            .unwrap();
    state["server"] = format!("127.0.0.1:{}", site.ps.data_port).into();
    // Edited on purpose, so without its checksum (a CRC finds damage; it is no defence
    // against the machine's own root, which the server's checks are).
    state.as_object_mut().unwrap().remove("crc32c");
    std::fs::write(stranger.state_dir.join("state.json"), state.to_string()).unwrap();
    let mut intruder = Replicator::start(&stranger, &[&disk.path], &[]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    intruder.kill9();
    assert!(
        !site.ps.dir.join("disks.json").exists(),
        "a foreign peer got a disk registered"
    );
    let cache = site.ps.dir.join("cache");
    assert!(
        !cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none(),
        "a foreign peer got a journal created"
    );
    assert!(
        intruder.log().contains("connecting to"),
        "intruder log:\n{}",
        intruder.log()
    );

    // An agent of this deployment writing a disk another machine owns: refused.
    let a = site.replicator(&[&disk.path]);
    a.wait_synced(Duration::from_secs(60)).unwrap();
    let (ok, log) = a.stop().unwrap();
    assert!(ok, "{log}");
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let journal = site.ps.dir.join("cache").join(&disk_id);
    let size_before = dir_size(&journal);
    let thief = site.register("thief");
    let thief_state_path = thief.state_dir.join("state.json");
    let mut thief_state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&thief_state_path).unwrap()).unwrap();
    thief_state["disks"] =
        serde_json::json!({ disk.path.to_string_lossy(): { "disk_id": disk_id, "epoch": 5 } });
    // Edited on purpose, so without its checksum: the server refuses it, not the CRC.
    thief_state.as_object_mut().unwrap().remove("crc32c");
    std::fs::write(&thief_state_path, thief_state.to_string()).unwrap();
    // The refusal may come before or after the agent reports that it is tracking.
    let log = match Replicator::start(&thief, &[&disk.path], &[]) {
        Ok(t) => {
            let (ok, log) = t.wait_exit(Duration::from_secs(30)).unwrap();
            assert!(!ok, "the thief's agent should fail");
            log
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(
        log.contains("not the disk's owner") && log.contains("belongs to machine"),
        "refusal not named:\n{log}"
    );
    assert_eq!(
        dir_size(&journal),
        size_before,
        "the foreign disk's journal changed"
    );
    site.ps.stop().unwrap();
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Stop the agent cleanly (it flushes everything and waits for the server's
/// acknowledgements), stop the process server, and check that the journal alone rebuilds
/// `device` byte for byte. Returns the agent's last stats and its log.
fn stop_and_check_replica(
    site: &mut Site,
    agent: Replicator,
    device: &Path,
) -> (serde_json::Value, String) {
    let disk_id = site.id.disk_id(device).unwrap();
    let stats_file = agent.stats_file.clone();
    let (ok, log) = agent.stop().unwrap();
    assert!(ok, "agent did not stop cleanly:\n{log}");
    site.ps.stop().unwrap();
    assert_replica_equals(&site.ps, &disk_id, device, site.path(), false);
    let stats = serde_json::from_slice(&std::fs::read(stats_file).unwrap()).unwrap();
    (stats, log)
}

/// Write `len` random bytes at `offset` of `dev` and sync them.
fn write_random_at(dev: &Path, offset: u64, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt as _;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let buf: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().unwrap();
}

/// A protected device grown while the agent runs (`truncate` and `losetup -c`, as a cloud
/// disk resize or `growpart` does): a write in the new range must reach the replica, and
/// the replica takes the new size. Before, the agent kept the old size and silently
/// dropped every write past it.
#[test]
fn a_grown_device_is_protected_to_its_new_end() {
    let Some(mut site) = Site::new("a_grown_device_is_protected_to_its_new_end") else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);
    let backing = site.path().join("disk.img");
    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();

    write_random_at(&disk.path, 10 * MIB, 64 << 10, 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    testkit::run("losetup", &["-c", disk.path.to_str().unwrap()]).unwrap();
    write_random_at(&disk.path, 100 * MIB, 64 << 10, 2);

    // The agent notices within a second and protects the new size in a new epoch.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let grown = agent.stats().is_some_and(|s| {
            s["disks"].as_array().is_some_and(|d| {
                d.iter()
                    .all(|d| d["size_bytes"] == 128 * MIB && d["syncing"] == false)
            })
        });
        if grown {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not protect the grown device within 60 s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.log().contains("changed size"), "{}", agent.log());
    write_random_at(&disk.path, 120 * MIB, 64 << 10, 3);
    stop_and_check_replica(&mut site, agent, &disk.path);
}

/// `discards-read-zero = "no"` (a device that may return old data after a discard, as
/// dm-crypt or a thin LUN can): a discarded range is read back, never assumed zero, and
/// the replica still equals the device.
#[test]
fn discards_are_read_back_where_the_device_may_not_zero_them() {
    let Some(mut site) = Site::new("discards_are_read_back_where_the_device_may_not_zero_them")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);
    let config = site.path().join("agent.toml");
    std::fs::write(&config, "discards-read-zero = \"no\"\n").unwrap();
    // Data first, so the discards change something.
    for i in 0..8 {
        write_random_at(&disk.path, i * 4 * MIB, (2 * MIB) as usize, i);
    }
    let agent = site.replicator_with(&[&disk.path], &["--config", config.to_str().unwrap()], &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let stats = agent.stats().unwrap();
    assert_eq!(stats["disks"][0]["discards"], "read back", "{stats}");
    let read_before = stats["disks"][0]["bytes_read"].as_u64().unwrap();

    for i in 0..8u64 {
        let (off, len) = ((i * 4 * MIB).to_string(), MIB.to_string());
        testkit::run(
            "blkdiscard",
            &["-o", &off, "-l", &len, disk.path.to_str().unwrap()],
        )
        .unwrap();
    }
    let (stats, _) = stop_and_check_replica(&mut site, agent, &disk.path);
    let read = stats["disks"][0]["bytes_read"].as_u64().unwrap() - read_before;
    assert!(
        read >= 8 * MIB,
        "only {read} bytes read back after discarding 8 MiB: discards taken as zeroes"
    );
}

/// A bio-based device (zram: its bios complete without a request, through
/// `block_bio_complete`, whose probe knows a bio's range only from its queue-time entry),
/// protected while writes run: a write in flight when the probes attach has no entry, and
/// its completion must still be accounted for (the disk is resynchronised). The replica
/// equals the device.
#[test]
fn a_bio_based_device_replicates_with_writes_running_at_attach() {
    let Some(mut site) = Site::new("a_bio_based_device_replicates_with_writes_running_at_attach")
    else {
        return;
    };
    let zram = testkit::Zram::create(64 * MIB).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (zram.path.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut w = Workload::new(&dev, 11).unwrap();
            let mut n = 0u64;
            // 4 KiB-aligned (zram's logical block size), 16 at a time.
            while !stop.load(Ordering::Relaxed) {
                w.uring_writes(1, 16).unwrap();
                n += 16;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let agent = site.replicator(&[&zram.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 100, "only {writes} writes ran");
    stop_and_check_replica(&mut site, agent, &zram.path);
}

/// A read that fails (every attempt) does not end the agent: the range stays dirty, no
/// point claims it, and it is read again in a later round. With every 7th read failing
/// (fault injection), the replica still equals the device, the failures are counted, and
/// the agent's Prometheus endpoint raises the read-error alert.
#[test]
fn failed_reads_are_retried_in_later_rounds_and_replication_goes_on() {
    let Some(mut site) =
        Site::new("failed_reads_are_retried_in_later_rounds_and_replication_goes_on")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);
    let env = [(ripcord_agent::replicate::readback::FAULT_READ_ENV, "7")];
    let metrics_port = testkit::replication::free_tcp_port();
    let config = site.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("metrics-addr = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let agent = site.replicator_with(&[&disk.path], &["--config", config.to_str().unwrap()], &env);
    let mut w = Workload::new(&disk.path, 21).unwrap();
    w.direct_writes(100).unwrap();
    w.uring_writes(4, 16).unwrap();
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    // The metrics follow the stats interval: wait until they show the failures.
    let device = disk.path.to_str().unwrap();
    testkit::replication::wait_for("the read-error alert", Duration::from_secs(30), || {
        let m = http_get(metrics_port, "/metrics");
        Ok(m.contains("ripcord_agent_read_error_alert{")
            && metric(&m, "ripcord_agent_read_errors_total", device) > 0.0
            && metric(&m, "ripcord_agent_read_error_alert", device) == 1.0)
    })
    .unwrap();

    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let (stats, log) = stop_and_check_replica(&mut site, agent, &disk.path);
    let errors = stats["disks"][0]["read_errors"].as_u64().unwrap();
    assert!(
        errors > 0,
        "no read failed: the fault injection did not run"
    );
    assert!(log.contains("read failed after"), "{log}");
    // The last cut is the quiesced state too.
    assert_replica_equals(&site.ps, &disk_id, &disk.path, site.path(), true);
}

/// The block device's own dirty page cache (buffered writes to the device node; ext4 keeps
/// its metadata buffers there until checkpoint) is written back before a round's instant,
/// so the agent's O_DIRECT reads, which flush those pages first, do not start writes
/// themselves and race them (issue 10, "Cost"). 8 MiB written through the page cache and
/// left dirty when the agent starts: before, each initial-sync read over them raced the
/// writeback it had caused and was read again.
#[test]
fn the_devices_dirty_page_cache_is_written_back_before_the_agent_reads_it() {
    use std::os::unix::fs::FileExt as _;
    let Some(mut site) =
        Site::new("the_devices_dirty_page_cache_is_written_back_before_the_agent_reads_it")
    else {
        return;
    };
    let disk = site.loop_device("disk.img", 64 * MIB);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(31);
    let buf: Vec<u8> = (0..8 * MIB as usize).map(|_| rng.random()).collect();
    // Buffered and not synced: the pages stay dirty (the flusher leaves them for 30 s).
    // Kept open: the last close of a block device writes its page cache back.
    let node = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.path)
        .unwrap();
    node.write_all_at(&buf, 16 * MIB).unwrap();
    let dirty_kib = |meminfo: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("Dirty:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let before = dirty_kib(&std::fs::read_to_string("/proc/meminfo").unwrap());
    assert!(
        before >= 4 * 1024,
        "the buffered write left only {before} KiB dirty: the test would show nothing"
    );

    let agent = site.replicator(&[&disk.path]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let (stats, log) = stop_and_check_replica(&mut site, agent, &disk.path);
    drop(node);
    let raced = stats["disks"][0]["raced_reads"].as_u64().unwrap();
    assert_eq!(
        raced, 0,
        "the agent's reads raced writes it started itself; stats: {stats}\n{log}"
    );
}
