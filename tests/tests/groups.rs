//! Consistency groups (issue 16): two machines, each with its own agent, identity and loop
//! device, share group points; a workload with cross-machine causality (a record completes
//! on A, then a record on B refers to it) must never show B's reference without A's
//! record at any group point, also while one agent's clock is off by a simulated skew.
//! Real binaries, real BPF, real QUIC on loopback, failover through the CLI.
//!
//! Needs root (loop devices, BPF). Skips loudly without it, and fails under `CI=true`.

use std::time::Duration;

use ripcord_tests::{
    causal::{self, CausalWriter},
    groups::{self, member_point},
};
use testkit::{
    Site,
    replication::{Replicator, failover},
};

const MIB: u64 = 1 << 20;
/// The group's limit on a point's clock-error bound.
const MAX_ERROR_MS: u64 = 10;
/// Between a record's completion on A and B's reference to it: longer than any offered
/// point's bound, the orders decision 0027 guarantees.
const GAP: Duration = Duration::from_millis(12);
/// The simulated skew of the second agent's clock: 350 ms behind the coordinator, so an
/// agent that did not correct for it would cut B 350 ms after A, and B would refer to
/// records A's cut lacks.
const SKEW_NS: i64 = -350_000_000;
/// Group points checked in each phase.
const POINTS: usize = 50;

fn wait_for_group_points(
    site: &Site,
    group: &str,
    since_ns: u64,
    want: usize,
    logs: &dyn Fn() -> String,
) -> Vec<serde_json::Value> {
    groups::wait_for_group_points(
        site,
        group,
        since_ns,
        want,
        Duration::from_secs(240),
        &|_| true,
        logs,
    )
}

/// Fails both disks over at each point and checks the images; returns the references seen.
fn check_points(site: &Site, points: &[serde_json::Value], disks: [&str; 2]) -> u64 {
    let (ia, ib) = (
        site.subdir("img").join("a.img"),
        site.subdir("img").join("b.img"),
    );
    let mut references = 0;
    let mut with_references = 0;
    for p in points {
        let bound_ns = p["bound_ns"].as_u64().unwrap();
        assert!(
            bound_ns < GAP.as_nanos() as u64 && bound_ns <= MAX_ERROR_MS * 1_000_000,
            "a point offered with a bound of {bound_ns} ns: {p}"
        );
        let members = p["disks"].as_array().unwrap();
        assert_eq!(members.len(), 2, "{p}");
        for (disk, image) in disks.iter().zip([&ia, &ib]) {
            let point = member_point(p, disk);
            let (ok, out, err) =
                failover(site.target(), disk, point, image, &site.ps.passphrase_file).unwrap();
            assert!(
                ok,
                "failover of {disk} at point {point} failed:\n{out}{err}"
            );
        }
        match causal::check(&ia, &ib) {
            Ok(c) => {
                references += c.references;
                with_references += usize::from(c.references > 0);
            }
            Err(broken) => panic!(
                "group point at {} shows B's reference without A's record: {broken}\n{p}",
                p["instant_ns"]
            ),
        }
    }
    // The check is not vacuous: the workload's records are in the points.
    assert!(
        with_references * 10 >= points.len() * 9,
        "only {with_references} of {} points hold a reference",
        points.len()
    );
    references
}

#[test]
fn group_points_never_show_a_reference_without_its_record_even_with_a_skewed_clock() {
    let Some(site) = Site::builder(
        "group_points_never_show_a_reference_without_its_record_even_with_a_skewed_clock",
    )
    .file_target()
    .machine("app")
    .start() else {
        return;
    };
    let db = site.register("db");
    let (a, b) = (
        site.loop_device("a.img", 16 * MIB),
        site.loop_device("b.img", 16 * MIB),
    );
    groups::create_group(&site, "shop", MAX_ERROR_MS, &["app", "db"], &[]);
    let agent_a = site.replicator(&[&a.path]);
    let mut agent_b = Replicator::start(&db, &[&b.path], &[]).unwrap();
    agent_a.wait_synced(Duration::from_secs(60)).unwrap();
    agent_b.wait_synced(Duration::from_secs(60)).unwrap();
    let disk_a = site.id.disk_id(&a.path).unwrap();
    let disk_b = db.disk_id(&b.path).unwrap();

    // Phase 1: clocks agree.
    let writer = CausalWriter::start(&a.path, &b.path, GAP).unwrap();
    let since = testkit::replication::now_ns();
    let logs = |agent_b: &Replicator| {
        format!(
            "agent A:\n{}\nagent B:\n{}\nserver:\n{}",
            agent_a.log(),
            agent_b.log(),
            site.ps.logs()
        )
    };
    let phase1 = wait_for_group_points(&site, "shop", since, POINTS, &|| logs(&agent_b));

    // Phase 2: B's agent restarts with its clock 350 ms behind; the coordinator's instants
    // are still met, because the agent measures the offset and cuts at the instant of the
    // coordinator's clock.
    let (stopped, log) = agent_b.stop().unwrap();
    assert!(stopped, "{log}");
    agent_b = Replicator::start_with_env(
        &db,
        &[&b.path],
        &[],
        &[("RIPCORD_TEST_CLOCK_SKEW_NS", &SKEW_NS.to_string())],
    )
    .unwrap();
    let since2 = testkit::replication::now_ns() + 2_000_000_000;
    let phase2 = wait_for_group_points(&site, "shop", since2, POINTS, &|| logs(&agent_b));
    let written = writer.stop().unwrap();
    assert!(written > 0);
    let refs1 = check_points(&site, &phase1[..POINTS], [&disk_a, &disk_b]);
    let refs2 = check_points(&site, &phase2[..POINTS], [&disk_a, &disk_b]);
    for p in &phase2 {
        let m = p["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["disk"] == *disk_b)
            .unwrap();
        let offset = m["offset_ns"].as_i64().unwrap();
        assert!(
            (offset - SKEW_NS).abs() < 5_000_000,
            "the skewed agent measured an offset of {offset} ns, not about {SKEW_NS}: {p}"
        );
    }
    // `--point latest-group` takes both disks to the newest group point (one instant).
    let (ia, ib) = (
        site.subdir("img").join("a.img"),
        site.subdir("img").join("b.img"),
    );
    for (disk, image) in [(&disk_a, &ia), (&disk_b, &ib)] {
        let (ok, out, err) = failover(
            site.target(),
            disk,
            "latest-group",
            image,
            &site.ps.passphrase_file,
        )
        .unwrap();
        assert!(ok, "failover --point latest-group of {disk}:\n{out}{err}");
    }
    let newest = causal::check(&ia, &ib).unwrap_or_else(|broken| {
        panic!("the latest group point shows B's reference without A's record: {broken}")
    });
    assert!(newest.references > 0, "{newest:?}");
    eprintln!(
        "checked {} group points ({refs1} + {refs2} references), {written} pairs written",
        2 * POINTS
    );
    drop(agent_a);
    drop(agent_b);
}
