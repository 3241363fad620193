//! Faults injected by the UDP proxy between agent and server.

use super::*;

/// A minute of writes through a bad link (issue 17): 5% loss, 1% duplication, 5%
/// reordering and 1% corruption both ways with jitter, and the link down for 200 ms of
/// every 1.2 s. Every recovery point made meanwhile passes the oracle's write-order
/// checker, the latest equals the device, and the agent never started a new epoch.
#[test]
fn replication_survives_a_lossy_flapping_network_for_a_minute() {
    // A clean link for the initial sync, then the bad one under the workload. A point
    // every 0.5 s: about 120 to check.
    let Some(Replicating {
        mut site,
        disk,
        proxy,
        agent,
        disk_id,
        before,
        epoch,
        ..
    }) = replicating(Setup {
        test: "replication_survives_a_lossy_flapping_network_for_a_minute",
        disk_mib: 32,
        seed: 17,
        agent_toml: "cut-interval-ms = 500\n",
        ..Setup::default()
    })
    else {
        return;
    };

    let start = monotonic_ns();
    proxy.set(FaultConfig {
        flap: Some(Flap {
            up: Duration::from_secs(1),
            down: Duration::from_millis(200),
        }),
        ..FaultConfig::both(Faults {
            drop: 0.05,
            duplicate: 0.01,
            reorder: 0.05,
            corrupt: 0.01,
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(4),
        })
    });
    // The oracle's workload (stamped blocks, flushes, discards), so that the points made
    // under faults can be checked as crash states of the source.
    let oracle_log = site.path().join("oracle.log");
    // About 1.2 MB/s of stamped blocks, what the bad link carries.
    let (seconds, iops, blocks) = (60, 150, 2);
    let mut workload = Oracle(
        Command::new(testkit::binary("ripcord-oracle"))
            .args([
                "workload",
                "--qd",
                "4",
                "--flush-every",
                "32",
                "--seed",
                "7",
            ])
            .args(["--discard-percent", "3", "--seconds", &seconds.to_string()])
            .args(["--iops", &iops.to_string()])
            .args(["--blocks-per-write", &blocks.to_string()])
            .arg("--device")
            .arg(&disk.path)
            .arg("--log")
            .arg(&oracle_log)
            .spawn()
            .unwrap(),
    );
    assert!(
        workload.0.wait().unwrap().success(),
        "the oracle workload failed"
    );
    let during = disk_stats(&agent);
    // The link heals when the writes stop; the agent drains and stops. (Under 5% random
    // loss and flaps, QUIC's loss-based congestion control moves about 1 MB/s here: a
    // backlog drains through the bad link too, only too slowly for the stop's 30 s.)
    let counts = proxy.counts();
    proxy.set(FaultConfig::default());
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    eprintln!(
        "proxy: {counts:?}\nagent before {before}\nat the end {}",
        done.stats
    );
    for (what, n) in [
        ("dropped", counts.dropped),
        ("duplicated", counts.duplicated),
        ("reordered", counts.reordered),
        ("corrupted", counts.corrupted),
        ("delayed", counts.delayed),
        ("lost to a flap", counts.partitioned),
    ] {
        assert!(n > 0, "the proxy never {what} a datagram: {counts:?}");
    }
    // Batches went through the bad link while the workload ran.
    assert!(
        num(&during, "acked_seq") > num(&before, "acked_seq"),
        "nothing was acknowledged through the bad link: before {before}, during {during}"
    );
    let under: Vec<_> = done
        .points
        .iter()
        .filter(|p| p["mono_ns"].as_u64().is_some_and(|m| m > start))
        .collect();
    // A minute at a point every 0.5 s, the link down a sixth of the time: at least one
    // point every 3 s on average.
    assert!(
        under.len() >= 20,
        "only {} recovery points in a minute under the bad link ({} in all)",
        under.len(),
        done.points.len()
    );
    // No byte bound here: the agent reads discarded ranges back too (the oracle discards
    // about twice what it writes), so what it reads is not bounded by `written`; the
    // epoch checks in `quiesce` are what rule a resync out.
    // Every point made under faults is a crash state of the source (the write-order
    // checker), as the latest equals the device.
    let image = site.path().join("point.img");
    for p in &under {
        oracle_check_point(
            site.target(),
            &disk_id,
            p,
            &image,
            &site.ps.passphrase_file,
            &oracle_log,
        )
        .unwrap_or_else(|e| panic!("a point made under faults: {e}"));
    }
    eprintln!(
        "{} recovery points, {} made under faults and every one checked; agent log has {} \
         reconnects",
        done.points.len(),
        under.len(),
        done.log.matches("disk stream accepted").count() - 1
    );
}

/// A 30 s partition mid-stream: nothing is acknowledged while it lasts, the agent shows
/// what waits, and after it heals replication continues in the same epoch, sending what
/// changed and not a second copy.
#[test]
fn a_thirty_second_partition_heals_without_a_resync() {
    let Some(Replicating {
        mut site,
        disk,
        proxy,
        agent,
        disk_id,
        before,
        epoch,
        ..
    }) = replicating(Setup {
        test: "a_thirty_second_partition_heals_without_a_resync",
        disk_mib: 128,
        prefill_mib: 64,
        seed: 18,
        ..Setup::default()
    })
    else {
        return;
    };
    let synced_in = bytes_in(&site, &disk_id);
    assert!(
        synced_in > 60 * MIB,
        "the initial sync sent only {synced_in} B of 64 MiB of data"
    );

    let w = Writer::start(&disk.path, 4);
    std::thread::sleep(Duration::from_secs(3));
    // Longer than the idle timeout (6 s) many times over: the connection dies, and the
    // agent keeps trying until the link is back.
    let partition = Duration::from_secs(30);
    let cut_at = Instant::now();
    proxy.partition_for(partition);
    // Once what was in flight has settled (and the status file, rewritten every second,
    // shows it), nothing is acknowledged until the link heals, and the agent shows what
    // waits.
    std::thread::sleep(Duration::from_secs(2));
    let acked_in = num(&disk_stats(&agent), "acked_seq");
    let mut waiting = 0u64;
    let mut last = serde_json::Value::Null;
    while cut_at.elapsed() < partition - Duration::from_millis(500) {
        last = disk_stats(&agent);
        let unacked = num(&last, "pushed_seq") - num(&last, "acked_seq");
        waiting = waiting.max(unacked.max(num(&last, "unacked_bytes")));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        num(&last, "acked_seq"),
        acked_in,
        "batches were acknowledged through a partition: {last}"
    );
    assert!(
        waiting > 0,
        "the agent's status never showed unacknowledged data during the partition: {last}"
    );
    while cut_at.elapsed() < partition {
        std::thread::sleep(Duration::from_millis(50));
    }
    let healed = monotonic_ns();
    // After healing, replication continues: what was pushed during the partition is
    // acknowledged.
    let pushed = num(&disk_stats(&agent), "pushed_seq");
    wait_for(
        "acknowledgements after the partition",
        Duration::from_secs(60),
        || Ok(num(&disk_stats(&agent), "acked_seq") >= pushed),
    )
    .unwrap_or_else(|e| panic!("{e:#}; stats {}\n{}", disk_stats(&agent), agent.log()));
    std::thread::sleep(Duration::from_secs(3));
    let written = w.finish();
    let sent = bytes_in(&site, &disk_id) - synced_in;
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    let counts = proxy.counts();
    eprintln!(
        "proxy: {counts:?}\nwritten {written} B, journaled {sent} B after the initial sync \
         ({synced_in} B); agent before {before}\nat the end {}",
        done.stats
    );
    assert!(
        counts.partitioned > 0,
        "the partition dropped nothing: {counts:?}"
    );
    assert!(
        num(&done.stats, "reconnects") > 0,
        "the agent never reconnected across a 30 s partition: {}",
        done.stats
    );
    // Not a second full copy: after the initial sync (64 MiB of data), about what the
    // workload changed went over the link and was read from the device.
    assert!(
        sent < synced_in / 2 && sent < written + 8 * MIB,
        "{sent} B journaled after the initial sync ({synced_in} B) for {written} B written"
    );
    assert_no_second_copy(&before, &done.stats, written);
    let made = points_after(&done.points, healed);
    assert!(
        made >= 2,
        "only {made} recovery points after the partition healed"
    );
}

#[test]
fn a_flapping_link_loses_nothing() {
    let Some(Replicating {
        mut site,
        disk,
        proxy,
        agent,
        disk_id,
        before,
        epoch,
        ..
    }) = replicating(Setup {
        test: "a_flapping_link_loses_nothing",
        disk_mib: 128,
        prefill_mib: 16,
        seed: 19,
        ..Setup::default()
    })
    else {
        return;
    };

    let w = Writer::start(&disk.path, 6);
    proxy.set(FaultConfig {
        flap: Some(Flap {
            up: Duration::from_secs(1),
            down: Duration::from_millis(500),
        }),
        ..FaultConfig::default()
    });
    std::thread::sleep(Duration::from_secs(10));
    proxy.set(FaultConfig::default());
    let healed = monotonic_ns();
    let flapped = proxy.counts();
    std::thread::sleep(Duration::from_secs(4));
    let written = w.finish();
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    eprintln!(
        "proxy after flapping: {flapped:?}\nwritten {written} B; agent before {before}\nat the \
         end {}",
        done.stats
    );
    assert!(
        flapped.partitioned > 0,
        "the flapping dropped nothing: {flapped:?}"
    );
    let made = points_after(&done.points, healed);
    assert!(made >= 2, "only {made} recovery points after the flapping");
    assert_no_second_copy(&before, &done.stats, written);
}

/// Connection migration (issue 17, item 2): the agent's address changes three times as the
/// server sees it (a new source port each time, as after a NAT rebinding or a new address)
/// while it replicates. The QUIC connection follows the agent to each new address: no
/// reconnect, no new epoch, no second copy, and the replica equals the device.
#[test]
fn an_agent_whose_address_changes_keeps_replicating_on_its_connection() {
    let Some(Replicating {
        mut site,
        disk,
        proxy,
        agent,
        disk_id,
        before,
        epoch,
        ..
    }) = replicating(Setup {
        test: "an_agent_whose_address_changes_keeps_replicating_on_its_connection",
        disk_mib: 64,
        prefill_mib: 8,
        seed: 23,
        ..Setup::default()
    })
    else {
        return;
    };

    let w = Writer::start(&disk.path, 12);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        let acked = num(&disk_stats(&agent), "acked_seq");
        proxy.rebind();
        // Data keeps flowing on the new path.
        wait_for(
            "batches acknowledged after the move",
            Duration::from_secs(30),
            || Ok(num(&disk_stats(&agent), "acked_seq") > acked),
        )
        .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
    }
    let written = w.finish();
    let counts = proxy.counts();
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    eprintln!("proxy: {counts:?}\nat the end {}", done.stats);
    assert_eq!(
        counts.rebound, 3,
        "the agent did not move three times: {counts:?}"
    );
    assert_eq!(
        num(&done.stats, "reconnects"),
        0,
        "the agent reconnected instead of migrating:\n{}",
        done.log
    );
    // What was sent after the initial sync is what the writer changed, not a second copy.
    let sent = num(&done.stats, "data_bytes") - num(&before, "data_bytes");
    assert!(
        sent < written + 8 * MIB,
        "the agent sent {sent} B of data after its initial sync for {written} B written"
    );
}
