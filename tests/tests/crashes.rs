//! Random crashes under a replicated workload (issue 17, item 3): the agent and the process
//! server are killed with SIGKILL at random moments, many times in one run, while the oracle
//! workload stamps every block it writes, and every invariant is checked:
//!
//! - **nothing acknowledged is lost**: just before every kill, the agent's acknowledged
//!   batch (epoch, seq) is recorded; at the end, the target store holds every such epoch
//!   durable at least through that batch. A restarted server that resumed behind an
//!   acknowledgement is also refused by the agent, which says so (checked in its logs);
//! - **every recovery point is a crash state of the source**: each point in the store is
//!   failed over and checked against the workload's log by the write-order checker;
//! - **the replica equals the device at quiesce**: once the workload ends and the agent has
//!   stopped cleanly, the newest point is byte for byte the device.
//!
//! The schedule (which process, when, how long it stays down) comes from a seeded RNG; the
//! seed is printed, and `RIPCORD_CRASH_SEED` replays a run.
//!
//! Needs root. Skips loudly without it, and fails under `CI=true`.

use std::{
    process::{Child, Command},
    time::{Duration, Instant},
};

use rand::{RngExt as _, SeedableRng as _};
use ripcord_tests::oracle_check_point;
use testkit::{
    Site,
    replication::{Replicator, failover, points, wait_for},
};

const MIB: u64 = 1 << 20;
/// Kills per run (agent and server together).
const KILLS: usize = 10;

/// The agent's (epoch, acknowledged seq) of its first disk, from its stats file.
fn acked(agent: &Replicator) -> Option<(u64, u64)> {
    let s = agent.stats()?;
    let d = &s["disks"][0];
    Some((d["epoch"].as_u64()?, d["acked_seq"].as_u64()?))
}

/// Wait until the agent streams again after a restart of either side: its initial sync
/// done, a point of this epoch acknowledged, and a batch acknowledged past `after` (the
/// position at the previous kill). Every kill then lands on a replicating agent.
fn wait_streaming(agent: &Replicator, after: Option<(u64, u64)>) {
    wait_for(
        "the agent to stream again",
        Duration::from_secs(120),
        || {
            Ok(agent.stats().is_some_and(|s| {
                let d = &s["disks"][0];
                let at = d["epoch"].as_u64().zip(d["acked_seq"].as_u64());
                d["syncing"] == false && d["acked_cuts"].as_u64().unwrap_or(0) > 0 && at > after
            }))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
}

fn oracle_workload(device: &std::path::Path, log: &std::path::Path, seconds: u64) -> Child {
    Command::new(testkit::binary("ripcord-oracle"))
        .args(["workload", "--seconds", &seconds.to_string()])
        .args(["--qd", "4", "--iops", "800", "--flush-every", "32"])
        .args(["--discard-percent", "3", "--seed", "11"])
        .arg("--device")
        .arg(device)
        .arg("--log")
        .arg(log)
        .spawn()
        .expect("starting the oracle workload")
}

#[test]
fn random_kills_of_agent_and_server_lose_nothing_and_every_point_is_a_crash_state() {
    let Some(mut site) = Site::builder(
        "random_kills_of_agent_and_server_lose_nothing_and_every_point_is_a_crash_state",
    )
    .file_target()
    .start() else {
        return;
    };
    let seed = std::env::var("RIPCORD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("crash schedule seed: {seed} (replay with RIPCORD_CRASH_SEED={seed})");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    let target = site.target().to_owned();
    let disk = site.loop_device("disk.img", 64 * MIB);
    let config = site.path().join("agent.toml");
    std::fs::write(&config, "cut-interval-ms = 500\n").unwrap();
    let extra = ["--config", config.to_str().unwrap()];
    let mut agent = site.replicator_with(&[&disk.path], &extra, &[]);
    agent.wait_synced(Duration::from_secs(60)).unwrap();

    let log = site.path().join("oracle.log");
    let mut workload = oracle_workload(&disk.path, &log, 600);
    let mut acked_at_kill = Vec::new();
    let mut schedule = Vec::new();
    let mut agent_logs = String::new();
    for i in 0..KILLS {
        wait_streaming(&agent, acked_at_kill.last().copied());
        std::thread::sleep(Duration::from_millis(rng.random_range(200..2500)));
        let Some(a) = acked(&agent) else {
            panic!("kill {i}: the agent has no stats:\n{}", agent.log())
        };
        acked_at_kill.push(a);
        let down = Duration::from_millis(rng.random_range(50..1500));
        if rng.random_bool(0.5) {
            schedule.push(format!("server at {a:?}, down {down:?}"));
            site.ps.kill9();
            std::thread::sleep(down);
            site.ps
                .spawn()
                .unwrap_or_else(|e| panic!("restarting the server after kill {i}: {e:#}"));
        } else {
            schedule.push(format!("agent at {a:?}, down {down:?}"));
            agent.kill9();
            agent_logs.push_str(&agent.log());
            std::thread::sleep(down);
            agent = site.replicator_with(&[&disk.path], &extra, &[]);
        }
        assert!(
            workload.try_wait().unwrap().is_none(),
            "the oracle workload ended early"
        );
    }
    wait_streaming(&agent, acked_at_kill.last().copied());
    // Quiesce: stop the workload (SIGINT: it finishes its log), let the agent make and
    // push its final point, and stop it cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workload.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(workload.wait().unwrap().success(), "oracle workload failed");
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let stats_file = agent.stats_file.clone();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    let (last_log, final_point) = site.final_point(agent, &disk_id);
    let final_stats = agent_stats(&stats_file);
    agent_logs.push_str(&last_log);
    assert!(
        !agent_logs.contains("refused"),
        "a restarted server resumed behind an acknowledgement:\n{agent_logs}"
    );
    let pass = site.ps.passphrase_file.clone();
    site.ps.stop().unwrap();

    // Nothing acknowledged was lost: every epoch is durable through its acks.
    let durable = durable_seqs(&target, &disk_id);
    for (i, &(epoch, seq)) in acked_at_kill.iter().enumerate() {
        let have = durable.iter().find(|(e, _)| *e == epoch).map(|&(_, s)| s);
        assert!(
            have.is_some_and(|d| d >= seq),
            "kill {i} ({}): batch {seq} of epoch {epoch} was acknowledged, but the store \
             holds that epoch durable only through {have:?}; schedule: {schedule:#?}",
            schedule[i]
        );
    }

    // Every point is a crash state of the source, and the last one is the device.
    let all = points(&target, &disk_id, &pass).unwrap();
    let image = site.path().join("point.img");
    let started = Instant::now();
    for p in &all {
        if let Err(e) = oracle_check_point(&target, &disk_id, p, &image, &pass, &log) {
            panic!("{e}\n(seed {seed}, schedule {schedule:#?})");
        }
    }
    let id = final_point["id"].as_str().unwrap();
    let (ok, _, err) = failover(&target, &disk_id, id, &image, &pass).unwrap();
    assert!(ok, "failover to the final point {id} failed: {err}");
    let diff = testkit::sys::diff_sectors(&image, &disk.path).expect("compare");
    assert!(
        diff.is_empty(),
        "the final point {id} differs from the device in {} sectors, first {:?}",
        testkit::ranges::total(&diff),
        &diff[..diff.len().min(5)]
    );
    let epochs: std::collections::BTreeSet<u64> =
        all.iter().filter_map(|p| p["epoch"].as_u64()).collect();
    eprintln!(
        "{KILLS} kills (seed {seed}): {schedule:#?}\nchecked {} points in {} epochs ({:?}), \
         durable {durable:?}; the last agent's stats: {final_stats}",
        all.len(),
        epochs.len(),
        started.elapsed()
    );
}

fn agent_stats(stats_file: &std::path::Path) -> serde_json::Value {
    std::fs::read(stats_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map_or(serde_json::Value::Null, |s| s["disks"][0].clone())
}

/// (epoch, highest seq whose batches are all committed) of every epoch of `disk` in the
/// store at `target`.
fn durable_seqs(target: &str, disk: &str) -> Vec<(u64, u64)> {
    let disk: ripcord_store::DiskId = disk.parse().expect("disk id");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let store = ripcord_store::Store::open_existing(target)
                .await
                .expect("opening the target store");
            let mut out = Vec::new();
            for info in store.epochs(&disk).await.expect("listing epochs") {
                let durable = store.durable_seq(&disk, info.epoch).await;
                out.push((info.epoch, durable.expect("durable seq")));
            }
            out
        })
}
