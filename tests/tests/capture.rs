//! Block-change capture on real loop devices with the real BPF programs.
//!
//! Needs root. Skips loudly without it, and fails under `CI=true`.

use std::time::Duration;

use ripcord_agent::{
    capture::{Capture, CaptureConfig},
    device::BlockDevice,
    extents::ExtentSet,
};
use testkit::{AgentProcess, Lab, LoopDevice, Mount, Workload, binary, dev_id};

const MIB: u64 = 1 << 20;

fn union(ranges: &[(u64, u64)]) -> ExtentSet {
    ranges.iter().copied().collect()
}

/// Sectors in `a` but not in `b`, as a short printable list.
fn missing(a: &ExtentSet, b: &ExtentSet) -> Vec<(u64, u64)> {
    let mut d = a.clone();
    for (s, l) in b.iter() {
        d.remove(s, l);
    }
    d.iter().take(10).collect()
}

fn assert_same(captured: &ExtentSet, written: &ExtentSet) {
    let lost = missing(written, captured);
    let extra = missing(captured, written);
    assert!(
        lost.is_empty() && extra.is_empty(),
        "captured set differs from the written set: written but not captured {lost:?}, \
         captured but not written {extra:?} ({} captured vs {} written sectors)",
        captured.sectors(),
        written.sectors()
    );
}

fn agent() -> std::path::PathBuf {
    binary("ripcord-agent")
}

#[test]
fn raw_device_every_written_sector_exactly() {
    let Some(lab) = Lab::new("raw_device_every_written_sector_exactly") else {
        return;
    };
    let lo = lab.loop_device("disk.img", 256 * MIB);
    let watcher = AgentProcess::watch(&agent(), &[&lo.path], &[], lab.path()).unwrap();
    let mut w = Workload::new(&lo.path, 0x5eed_0001).unwrap();
    w.mixed(3).unwrap();
    let run = watcher.stop().unwrap();

    let dev = dev_id(&lo.path);
    let stats = run.stats_for(&dev);
    assert_eq!(stats.dropped, 0, "drops with the default ring");
    // Without drops, the only resync lines are writes whose completion the kernel never
    // showed the probe (decision 0005): reported with their exact range for re-read, so
    // they count as captured, and they must not reach beyond what was written.
    assert!(
        run.overflow.iter().all(|e| e.op == "lost"),
        "overflow regions without drops: {:?}",
        run.overflow
    );
    assert_same(&union(&run.ranges(&dev, true)), &union(&w.report.changed));
    if !run.overflow.is_empty() {
        eprintln!("{} writes reported lost (re-read)", run.overflow.len());
    }
    // Every op kind showed up.
    for op in ["write", "discard", "write-zeroes", "flush"] {
        assert!(
            run.changes.iter().any(|e| e.op == op),
            "no {op} event captured"
        );
    }
    // Without drops, sequence numbers are exactly 0..events: every record the probes
    // emitted, including the writes they reported lost (a bio address reused before its
    // completion was seen: a "lost" line with a seq; the agent's own "lost" lines for
    // stalled writes carry none).
    let mut seqs: Vec<u64> = run
        .changes
        .iter()
        .chain(&run.overflow)
        .filter_map(|e| e.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..stats.events).collect::<Vec<_>>(),
        "sequence numbers not dense"
    );
    assert!(w.report.uring_writes >= 96 && w.report.zeroouts > 0 && w.report.discards > 0);
}

#[test]
fn partition_sectors_are_relative_and_the_sibling_is_ignored() {
    let Some(lab) = Lab::new("partition_sectors_are_relative_and_the_sibling_is_ignored") else {
        return;
    };
    let mut lo = lab.loop_device("disk.img", 160 * MIB);
    let parts = lo.partition(&[Some(64), None]).unwrap();
    let (p1, p2) = (&parts[0], &parts[1]);
    let dev = BlockDevice::resolve(p1).unwrap();
    assert!(
        dev.start > 0 && dev.disk != dev.dev,
        "{dev:?} is not a partition"
    );

    let watcher = AgentProcess::watch(&agent(), &[p1], &[], lab.path()).unwrap();
    let mut w1 = Workload::new(p1, 11).unwrap();
    let mut w2 = Workload::new(p2, 12).unwrap();
    for _ in 0..2 {
        w1.mixed(1).unwrap();
        w2.mixed(1).unwrap();
    }
    let run = watcher.stop().unwrap();

    let p1_id = dev_id(p1);
    assert!(
        run.changes.iter().all(|e| e.dev == p1_id),
        "events for devices other than {p1_id}"
    );
    // As in `raw_device_every_written_sector_exactly`: lost completions, reported with
    // their exact range, count as captured; nothing else may need a resync.
    assert!(
        run.overflow.iter().all(|e| e.op == "lost"),
        "overflow regions without drops: {:?}",
        run.overflow
    );
    let captured = union(&run.ranges(&p1_id, true));
    assert_same(&captured, &union(&w1.report.changed));
    let p1_sectors = w1.size() / 512;
    assert!(
        captured.iter().all(|(s, l)| s + l <= p1_sectors),
        "sectors beyond the partition: not partition-relative?"
    );
}

#[test]
fn unprotected_devices_produce_no_events() {
    let Some(lab) = Lab::new("unprotected_devices_produce_no_events") else {
        return;
    };
    let protected = lab.loop_device("a.img", 64 * MIB);
    let other = lab.loop_device("b.img", 64 * MIB);
    let watcher = AgentProcess::watch(&agent(), &[&protected.path], &[], lab.path()).unwrap();
    let mut w = Workload::new(&other.path, 3).unwrap();
    w.mixed(2).unwrap();
    let run = watcher.stop().unwrap();
    assert!(
        run.changes.is_empty(),
        "events from an unprotected device: {:?}",
        &run.changes[..3.min(run.changes.len())]
    );
    assert_eq!(run.stats_for(&dev_id(&protected.path)).events, 0);
}

#[test]
fn overflow_is_counted_and_covers_every_dropped_write() {
    let Some(lab) = Lab::new("overflow_is_counted_and_covers_every_dropped_write") else {
        return;
    };
    let lo = lab.loop_device("disk.img", 512 * MIB);
    // One page of ring holds about 85 events; a stalled agent cannot drain it.
    let watcher =
        AgentProcess::watch(&agent(), &[&lo.path], &["--ring-bytes", "4096"], lab.path()).unwrap();
    watcher.signal(libc::SIGSTOP);
    let mut w = Workload::new(&lo.path, 99).unwrap();
    let burst = w.burst(3000);
    watcher.signal(libc::SIGCONT);
    burst.unwrap();
    w.direct_writes(20).unwrap();
    let run = watcher.stop().unwrap();

    let dev = dev_id(&lo.path);
    let stats = run.stats_for(&dev);
    assert!(
        stats.dropped > 0,
        "no drops with a one-page ring and a stalled agent"
    );
    assert!(
        !run.overflow.is_empty(),
        "drops but no overflow regions reported"
    );
    let covered = union(&run.ranges(&dev, true));
    let lost = missing(&union(&w.report.changed), &covered);
    assert!(
        lost.is_empty(),
        "written sectors neither captured nor in overflow: {lost:?}"
    );
    // Overflow regions are coarse but bounded: 8 KiB per bit on this 512 MiB device, and a
    // 4 KiB write sets at most two bits.
    let overflow_sectors: u64 = run.overflow.iter().map(|e| e.sectors).sum();
    assert_eq!(
        stats.overflow_all, 0,
        "a 4 KiB write marked the whole device"
    );
    assert!(
        overflow_sectors <= stats.dropped * 2 * 16,
        "{overflow_sectors} overflow sectors for {} drops",
        stats.dropped
    );
}

#[test]
fn ext4_every_changed_sector_is_captured() {
    let Some(lab) = Lab::new("ext4_every_changed_sector_is_captured") else {
        return;
    };
    let lo = lab.loop_device("disk.img", 256 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", lo.path.to_str().unwrap()]).unwrap();
    let before = lab.path().join("before.img");
    testkit::run(
        "cp",
        &[
            "--sparse=always",
            lo.path.to_str().unwrap(),
            before.to_str().unwrap(),
        ],
    )
    .unwrap();

    let watcher = AgentProcess::watch(&agent(), &[&lo.path], &[], lab.path()).unwrap();
    let mnt = Mount::new(&lo.path, &lab.path().join("mnt"), &["-t", "ext4"]).unwrap();
    testkit::file_workload(&mnt.dir, 7, 120, 2 << 20).unwrap();
    mnt.unmount().unwrap();
    let run = watcher.stop().unwrap();

    let dev = dev_id(&lo.path);
    assert_eq!(run.stats_for(&dev).dropped, 0);
    let changed = union(&testkit::sys::diff_sectors(&before, &lo.path).unwrap());
    assert!(
        changed.sectors() > 10_000,
        "workload changed only {} sectors",
        changed.sectors()
    );
    // Change events, plus ranges the agent reported for resync (writes whose completion
    // the kernel did not show the probe: docs/decisions/0005).
    let captured = union(&run.ranges(&dev, true));
    let lost = missing(&changed, &captured);
    assert!(
        lost.is_empty(),
        "sectors changed on ext4 but not captured: {lost:?}; resync lines: {:?}",
        run.overflow
    );
    if !run.overflow.is_empty() {
        eprintln!("resync lines: {:?}", run.overflow);
    }
}

#[test]
fn write_generation_moves_when_a_write_is_queued() {
    let Some(lab) = Lab::new("write_generation_moves_when_a_write_is_queued") else {
        return;
    };
    let lo = lab.loop_device("disk.img", 64 * MIB);
    let dev = BlockDevice::resolve(&lo.path).unwrap();
    let mut capture = Capture::start(std::slice::from_ref(&dev), CaptureConfig::default()).unwrap();
    let region = (8 * MIB / 512, 16); // 8 KiB at 8 MiB
    let far = (48 * MIB / 512, 16);
    let g0 = capture.write_generation(0, region.0, region.1);
    let f0 = capture.write_generation(0, far.0, far.1);
    let buf = testkit::workload::AlignedBuf::new(8192);
    {
        use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&lo.path)
            .unwrap();
        f.write_all_at(buf.as_slice(), 8 * MIB).unwrap();
    }
    let g1 = capture.write_generation(0, region.0, region.1);
    assert!(
        g1 > g0,
        "generation did not move after a write: {g0} -> {g1}"
    );
    assert_eq!(
        capture.write_generation(0, far.0, far.1),
        f0,
        "unrelated region moved"
    );
    // The completion was captured too.
    capture.wait(Duration::from_millis(50)).unwrap();
    let mut seen = Vec::new();
    capture.drain_events(|e| seen.push(e)).unwrap();
    assert!(
        seen.iter().any(|e| e.sector == region.0 && e.sectors == 16),
        "write not captured: {seen:?}"
    );
    capture.detach().unwrap();
}

/// Run an oracle workload (queue depth 16 through io_uring, flushes, discards) under
/// `ripcord-agent watch` `runs` times and check that every completed write and discard
/// shows up as a change event covering it, with a completion time between the op's
/// submission and its reaping, or is covered by a resync line ("overflow", or "lost": a
/// write whose completion was never reported). Returns the number of "lost" lines. Each run
/// has its own directory in `lab`.
fn oracle_ops_are_covered(lab: &Lab, runs: u64, env: &[(&str, &str)]) -> usize {
    use ripcord_oracle::log::{Log, OpKind};
    let mut lost_total = 0;
    for run in 0..runs {
        let dir = lab.subdir(&format!("run-{run}"));
        let lo = LoopDevice::create(&dir.join("disk.img"), 256 * MIB).unwrap();
        let watcher = AgentProcess::watch_with_env(&agent(), &[&lo.path], &[], env, &dir).unwrap();
        let log_path = dir.join("oracle.log");
        let status = std::process::Command::new(binary("ripcord-oracle"))
            .args(["workload", "--seconds", "3", "--qd", "16", "--iops", "3000"])
            .args(["--flush-every", "32", "--discard-percent", "3", "--seed"])
            .arg((100 + run).to_string())
            .arg("--device")
            .arg(&lo.path)
            .arg("--log")
            .arg(&log_path)
            .status()
            .unwrap();
        assert!(status.success(), "oracle workload failed");
        let captured = watcher.stop().unwrap();
        let dev = dev_id(&lo.path);
        let resync: Vec<_> = captured.overflow.iter().filter(|o| o.dev == dev).collect();
        let lost_lines = resync.iter().filter(|o| o.op == "lost").count();
        lost_total += lost_lines;
        eprintln!(
            "run {run}: {} ranges to resynchronise, {lost_lines} of them writes whose \
             completion was never reported",
            resync.len()
        );
        let mut events: Vec<_> = captured
            .changes
            .iter()
            .filter(|e| e.dev == dev && e.op != "flush")
            .map(|e| (e.time_ns, e.sector, e.sectors))
            .collect();
        events.sort_unstable();
        let log = Log::open(&log_path).unwrap();
        let mut lost = Vec::new();
        for op in log.ops.iter().filter(|o| o.kind != OpKind::Flush && o.ok()) {
            let complete = op.complete_ns.expect("ok ops completed");
            let first = op.first_block * 8;
            let end = first + u64::from(op.block_count) * 8;
            let lo_i = events.partition_point(|e| e.0 < op.submit_ns);
            let hi_i = events.partition_point(|e| e.0 <= complete);
            let mut seen: ExtentSet = events[lo_i..hi_i].iter().map(|&(_, s, n)| (s, n)).collect();
            for o in &resync {
                seen.insert(o.sector, o.sectors);
            }
            if (first..end).any(|x| !seen.contains(x)) {
                lost.push(*op);
            }
        }
        assert!(
            lost.is_empty(),
            "run {run}: {} of {} completed ops have no change event between their submission \
             and completion and no resync line, e.g. {:?}; stats {:?}",
            lost.len(),
            log.ops.len(),
            &lost[..lost.len().min(5)],
            captured.stats_for(&dev)
        );
    }
    lost_total
}

/// The kernel sometimes does not run the completion probe for a completion (seen on this
/// machine under load; docs/decisions/0005). Every op is still covered: by its event, or
/// by a "lost" line once the write's in-flight entry outlives its completion.
#[test]
fn every_oracle_op_completion_is_captured() {
    let Some(lab) = Lab::new("every_oracle_op_completion_is_captured") else {
        return;
    };
    oracle_ops_are_covered(&lab, 2, &[]);
}

/// With every 40th data completion hidden from the probe (fault injection, as the kernel
/// sometimes does), each hidden write is reported "lost" for resync: nothing is missed.
#[test]
fn hidden_completions_are_reported_for_resync() {
    let Some(lab) = Lab::new("hidden_completions_are_reported_for_resync") else {
        return;
    };
    let env = [(ripcord_agent::capture::FAULT_SKIP_ENV, "40")];
    let lost = oracle_ops_are_covered(&lab, 1, &env);
    assert!(
        lost > 100,
        "only {lost} hidden completions were reported (expected ~1 in 40)"
    );
}

/// No write was reported lost while its completion was reported: that would be an
/// in-flight entry the completion probe failed to free (read back after `LOST_AFTER`, or
/// at address reuse). Two causes of lost reports are expected and allowed:
/// - the kernel skipped runs of the completion probes (a run nested in itself on one CPU
///   is skipped, and counted): the entries a skipped run would have freed are reported
///   lost and read back, as designed;
/// - the kernel completed the write without firing `block_rq_complete` or
///   `block_bio_complete` at all (seen on 6.18 with `perf record` beside the agent: split
///   O_DIRECT writes, some io_uring writes retried from io-wq after `EAGAIN`, whose pieces
///   never appear in either tracepoint although the write succeeded; decision 0024). No
///   completion was reported for its range after it was queued: only its in-flight entry
///   knew of it, and the lost report is what reads it back.
///
/// The second kind stays rare (at most a few writes of a batch of 32 io_uring writes in
/// any run seen): more than a quarter of the `issued` writes lost would be the probes
/// missing a whole class of completions, and fails.
///
/// Returns the ranges reported lost (the test's captured set must include them).
fn assert_none_lost(run: &testkit::AgentRun, what: &str, issued: u64) -> Vec<(u64, u64)> {
    let lost: Vec<_> = run.overflow.iter().filter(|e| e.op == "lost").collect();
    let misses: u64 = run
        .stats
        .iter()
        .map(|s| s.completion_misses)
        .max()
        .unwrap_or(0);
    // A lost report carries its bio's queue time. A completion reported for its range
    // after that (and before the report, where its seq tells: the agent's own reports of
    // writes in flight too long have none) means the probe saw it and still left the
    // entry.
    let seen_completing = |l: &testkit::AgentEvent| {
        run.changes.iter().any(|e| {
            e.dev == l.dev
                && e.sector < l.sector + l.sectors
                && l.sector < e.sector + e.sectors
                && e.time_ns >= l.time_ns
                && l.seq.is_none_or(|ls| e.seq.is_some_and(|es| es < ls))
        })
    };
    let unfreed: Vec<_> = lost.iter().filter(|l| seen_completing(l)).collect();
    assert!(
        unfreed.is_empty() || misses > 0,
        "{} {what} reported lost although their completion was reported (in-flight entries \
         not freed) while the kernel skipped no completion probe run, first {:?}",
        unfreed.len(),
        &unfreed[..unfreed.len().min(3)]
    );
    let untraced = (lost.len() - unfreed.len()) as u64;
    assert!(
        untraced * 4 <= issued,
        "{untraced} of {issued} {what} reported lost with no completion reported: the probes \
         miss a whole class of completions, first {:?}",
        &lost[..lost.len().min(3)]
    );
    if !lost.is_empty() {
        eprintln!(
            "{what}: {} lost report(s) ({} of writes whose completion was never reported), \
             {misses} completion probe run(s) skipped",
            lost.len(),
            lost.len() - unfreed.len()
        );
    }
    lost.iter().map(|e| (e.sector, e.sectors)).collect()
}

/// Write merges (field 7 of `/sys/block/NAME/stat`) of a loop device so far.
fn write_merges(dev: &std::path::Path) -> u64 {
    let name = dev.file_name().unwrap().to_string_lossy();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    stat.split_whitespace().nth(5).unwrap().parse().unwrap()
}

/// A request merged from more bios than the completion probe walks must still free every
/// bio's in-flight entry: a leaked entry is reported "lost" after 3 s (its range re-read,
/// and the crash-consistent cuts waiting on it dropped). Loop devices allow 128 segments
/// per request, so 128 contiguous 4 KiB O_DIRECT writes submitted at once merge into
/// requests of up to 128 bios (the probe walked 64 before).
#[test]
fn requests_merged_from_many_bios_free_every_entry() {
    let Some(lab) = Lab::new("requests_merged_from_many_bios_free_every_entry") else {
        return;
    };
    let lo = lab.loop_device("disk.img", 256 * MIB);
    let watcher = AgentProcess::watch(&agent(), &[&lo.path], &[], lab.path()).unwrap();
    let merges_before = write_merges(&lo.path);
    let fio = std::process::Command::new("fio")
        .args([
            "--name=merge",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=write",
            "--bs=4k",
            "--iodepth=128",
            "--iodepth_batch_submit=128",
            "--iodepth_batch_complete_min=128",
            "--size=64M",
        ])
        .arg(format!("--filename={}", lo.path.display()))
        .output()
        .expect("running fio (`cargo xtask setup` installs it)");
    assert!(
        fio.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&fio.stderr)
    );
    let merges = write_merges(&lo.path) - merges_before;
    // Let any leaked entry age past the lost-completion limit, so the agent reports it.
    std::thread::sleep(ripcord_agent::capture::LOST_AFTER + Duration::from_secs(2));
    let run = watcher.stop().unwrap();

    let dev = dev_id(&lo.path);
    assert_eq!(
        run.stats_for(&dev).dropped,
        0,
        "drops with the default ring"
    );
    let bios = 64 * MIB / 4096;
    let requests = bios - merges.min(bios - 1);
    assert!(
        bios / requests > 64,
        "{bios} bios made {requests} requests: the workload did not build large ones"
    );
    assert_none_lost(&run, "writes of merged requests", bios);
    let written: ExtentSet = [(0, 64 * MIB / 512)].into_iter().collect();
    assert_same(&union(&run.ranges(&dev, true)), &written);
}

/// The BPF programs' diagnostics reach the agent's log through aya-log, at the level
/// chosen at load time: with `RIPCORD_BPF_LOG=debug`, every completion the fault injection
/// hides is logged by the probe itself; at the default level (warn) none is.
#[test]
fn bpf_diagnostics_reach_the_agent_log_at_the_chosen_level() {
    let Some(lab) = Lab::new("bpf_diagnostics_reach_the_agent_log_at_the_chosen_level") else {
        return;
    };
    let lo = lab.loop_device("disk.img", 64 * MIB);
    let message = "fault injection: completion of";
    for (level, expect) in [("debug", true), ("warn", false)] {
        let env = [
            (ripcord_agent::capture::FAULT_SKIP_ENV, "4"),
            (ripcord_agent::capture::BPF_LOG_ENV, level),
            ("RIPCORD_LOG", "debug"),
        ];
        let watcher =
            AgentProcess::watch_with_env(&agent(), &[&lo.path], &[], &env, lab.path()).unwrap();
        let mut w = Workload::new(&lo.path, 7).unwrap();
        w.direct_writes(64).unwrap();
        let run = watcher.stop().unwrap();
        assert_eq!(
            run.stderr.contains(message),
            expect,
            "RIPCORD_BPF_LOG={level}: agent log:\n{}",
            run.stderr
        );
    }
}

/// Splitting writes: with `max_sectors_kb` at its floor (4 KiB), every larger write is split
/// into pieces whose clones never pass the queue tracepoint and complete in requests of
/// their own. Every written sector must still be captured exactly, and every bio's
/// in-flight entry freed (a leaked one is reported "lost" after 3 s).
#[test]
fn split_writes_are_captured_exactly() {
    let Some(lab) = Lab::new("split_writes_are_captured_exactly") else {
        return;
    };
    let lo = lab.loop_device("disk.img", 256 * MIB);
    let _limit = testkit::sys::QueueLimit::set(&lo.path, "max_sectors_kb", "4").unwrap();
    let watcher = AgentProcess::watch(&agent(), &[&lo.path], &[], lab.path()).unwrap();
    let mut w = Workload::new(&lo.path, 0x5eed_0003).unwrap();
    w.direct_writes(200).unwrap();
    w.uring_writes(4, 32).unwrap();
    std::thread::sleep(ripcord_agent::capture::LOST_AFTER + Duration::from_secs(2));
    let run = watcher.stop().unwrap();

    let dev = dev_id(&lo.path);
    assert_eq!(
        run.stats_for(&dev).dropped,
        0,
        "drops with the default ring"
    );
    let issued = w.report.direct_writes + w.report.uring_writes;
    let lost = assert_none_lost(&run, "split writes", issued);
    let resync: Vec<_> = run.overflow.iter().filter(|e| e.op != "lost").collect();
    assert!(resync.is_empty(), "resync lines: {resync:?}");
    // Captured: every completion reported, and every write the in-flight entries caught.
    let mut captured = run.ranges(&dev, false);
    captured.extend(lost);
    assert_same(&union(&captured), &union(&w.report.changed));
    // The writes were split: more write events than writes issued.
    let writes = run.changes.iter().filter(|e| e.op == "write").count() as u64;
    assert!(
        writes > issued,
        "{writes} write events for {issued} writes: nothing was split"
    );
}
