//! `cargo xtask demo`: the main job end to end on the embedded defaults. A process server
//! and an agent on loopback replicate a loop device with ext4 under a file workload to a
//! local-directory target store; then the primary site is deleted and `ripcord failover`
//! rebuilds the disk from the store and the passphrase alone; it must equal the source.
//! Then the way home: the recovered machine runs from the failed-over disk and is
//! protected at the recovery site, and the master target fails it back onto the original
//! disk, which must end equal to the recovered machine's final state.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use testkit::{
    LoopDevice, Mount, Scratch,
    replication::{AgentIdentity, ProcessServer, Replicator, failover, wait_for_point},
};

const MIB: u64 = 1 << 20;

fn sha256(path: &std::path::Path) -> anyhow::Result<String> {
    let out = testkit::run_output("sha256sum", &[path.to_str().context("path")?])?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

pub fn run(size_mib: u64) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo needs root (BPF probes, loop devices, mounts)"
    );
    ensure!(size_mib >= 64, "--size-mib must be at least 64");
    crate::release_binaries()?;

    let dir = Scratch::new("demo");
    println!("\n== ripcord demo: protect, replicate, fail over, verify ==");
    let disk = LoopDevice::create(&dir.path.join("disk.img"), size_mib * MIB)?;
    testkit::run(
        "mkfs.ext4",
        &["-q", "-F", disk.path.to_str().context("path")?],
    )?;
    println!(
        "1. protected disk: {} ({size_mib} MiB loop device with ext4)",
        disk.path.display()
    );

    let target_dir = dir.path.join("target-store");
    let target = format!("file://{}", target_dir.display());
    let mut ps = ProcessServer::start_with_target(&dir.path, Some(&target))?;
    println!(
        "2. process server: deployment in {}, QUIC on 127.0.0.1:{} (mutual TLS), metrics on \
         http://127.0.0.1:{}/metrics, uploading to {target}",
        ps.dir.display(),
        ps.data_port,
        ps.metrics_port
    );
    let id = AgentIdentity::register(&ps, &dir.path, "demo-host")?;
    println!("3. agent registered as demo-host (bootstrap token + pinned CA hash)");
    let agent = Replicator::start(&id, &[&disk.path], &[])?;
    println!("4. ripcord-agent protect: BPF capture attached, initial sync running");

    let started = Instant::now();
    let mnt = Mount::new(&disk.path, &dir.path.join("mnt"), &["-t", "ext4"])?;
    let files = (size_mib / 8).clamp(16, 200) as usize;
    let bytes = testkit::file_workload(&mnt.dir, 2026, files, 4 << 20)?;
    mnt.unmount()?;
    println!(
        "5. workload while replicating: {files} files, {:.1} MiB written with fsync, some deleted \
         and renamed ({:.1} s)",
        bytes as f64 / MIB as f64,
        started.elapsed().as_secs_f64()
    );
    agent.wait_synced(Duration::from_secs(600))?;
    let stats_file = agent.stats_file.clone();
    let (ok, log) = agent.stop()?;
    // Written once more at exit, after the final flush.
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_file)?).context("reading agent stats")?;
    ensure!(ok, "the agent did not stop cleanly:\n{log}");
    let d = &stats["disks"][0];
    println!(
        "6. agent quiesced: {} batches, {:.1} MiB data sent, {:.1} MiB of zeroes skipped, {} \
         crash-consistent cuts; all acknowledged durable",
        d["batches"],
        d["data_bytes"].as_f64().unwrap_or(0.0) / MIB as f64,
        d["zero_bytes"].as_f64().unwrap_or(0.0) / MIB as f64,
        d["cuts"]
    );
    let disk_id = id.disk_id(&disk.path)?;
    let last = stats["disks"][0]["pushed_seq"].as_u64().unwrap_or(0);
    let point = wait_for_point(
        &target,
        &disk_id,
        &ps.passphrase_file,
        last,
        Duration::from_secs(120),
    )?;
    ps.stop()?;
    let points = testkit::replication::points(&target, &disk_id, &ps.passphrase_file)?;
    println!(
        "7. target store: {} crash-consistent recovery points; latest {} at {}",
        points.len(),
        point["id"].as_str().unwrap_or("?"),
        point["time"].as_str().unwrap_or("?")
    );

    // The disaster: the primary site is gone. Only the store and the passphrase remain.
    let pass = dir.path.join("passphrase.kept");
    std::fs::copy(&ps.passphrase_file, &pass)?;
    std::fs::remove_dir_all(&ps.dir)?;
    std::fs::remove_dir_all(&id.state_dir)?;
    let image = dir.path.join("failover.img");
    let (ok, out, err) = failover(&target, &disk_id, "latest", &image, &pass)?;
    ensure!(ok, "failover failed: {err}");
    println!(
        "8. process server and agent state deleted; `ripcord failover` from the store alone:\n   {}",
        out.trim()
    );
    let (a, b) = (sha256(&disk.path)?, sha256(&image)?);
    println!("   source  sha256 {a}\n   replica sha256 {b}");
    ensure!(
        a == b,
        "VERIFY FAILED: the failed-over image differs from the source"
    );
    testkit::run("e2fsck", &["-fn", image.to_str().context("path")?])?;
    println!(
        "9. VERIFIED: the failed-over disk equals the protected disk byte for byte, and e2fsck finds it clean"
    );
    failback(&dir.path, &disk, &image)?;
    println!("\ndemo passed; cleaning up {}", dir.path.display());
    Ok(())
}

/// Failback: the recovered machine (`image` as a disk) works and is protected by a
/// process server at the recovery site; `ripcord-mt failback` puts its final state on
/// the original disk.
fn failback(
    dir: &std::path::Path,
    original: &LoopDevice,
    image: &std::path::Path,
) -> anyhow::Result<()> {
    println!("\n== failback: the recovered machine goes home ==");
    let recovered = LoopDevice::attach(image)?;
    let site = dir.join("recovery-site");
    std::fs::create_dir_all(&site)?;
    let target = format!("file://{}", site.join("target-store").display());
    let mut ps = ProcessServer::start_with_target(&site, Some(&target))?;
    let id = AgentIdentity::register(&ps, &site, "recovered-host")?;
    let agent = Replicator::start(&id, &[&recovered.path], &[])?;
    println!(
        "10. reprotect: the recovered machine ({}) is protected by a process server at the \
         recovery site",
        recovered.path.display()
    );
    let mnt = Mount::new(&recovered.path, &dir.join("mnt"), &["-t", "ext4"])?;
    let bytes = testkit::file_workload(&mnt.dir, 2027, 16, 2 << 20)?;
    mnt.unmount()?;
    // Meanwhile the original disk was written too: the failback must undo it.
    let mnt = Mount::new(&original.path, &dir.join("mnt"), &["-t", "ext4"])?;
    testkit::file_workload(&mnt.dir, 2028, 8, 1 << 20)?;
    mnt.unmount()?;
    println!(
        "11. the recovered machine wrote {:.1} MiB; the original disk diverged too",
        bytes as f64 / MIB as f64
    );
    agent.wait_synced(Duration::from_secs(600))?;
    let stats_file = agent.stats_file.clone();
    let (ok, log) = agent.stop()?;
    ensure!(
        ok,
        "the recovered machine's agent did not stop cleanly:\n{log}"
    );
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats_file)?)?;
    let last = stats["disks"][0]["pushed_seq"].as_u64().unwrap_or(0);
    let disk_id = id.disk_id(&recovered.path)?;
    wait_for_point(
        &target,
        &disk_id,
        &ps.passphrase_file,
        last,
        Duration::from_secs(120),
    )?;
    ps.stop()?;
    let out = std::process::Command::new(testkit::binary("ripcord-mt"))
        .args([
            "failback", "--target", &target, "--disk", &disk_id, "--device",
        ])
        .arg(&original.path)
        .arg("--state-dir")
        .arg(dir.join("mt-state"))
        .arg("--passphrase-file")
        .arg(&ps.passphrase_file)
        .output()?;
    ensure!(
        out.status.success(),
        "ripcord-mt failback failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "12. the application and agent stopped; `ripcord-mt failback` onto {}:\n   {}",
        original.path.display(),
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .replace('\n', "\n   ")
    );
    let (a, b) = (sha256(&original.path)?, sha256(&recovered.path)?);
    println!("   original  sha256 {a}\n   recovered sha256 {b}");
    ensure!(
        a == b,
        "FAILBACK FAILED: the original disk differs from the recovered machine's"
    );
    testkit::run("e2fsck", &["-fn", original.path.to_str().context("path")?])?;
    println!(
        "13. VERIFIED: the original disk equals the recovered machine's final state, and e2fsck finds it clean"
    );
    Ok(())
}
