//! ripcord's privileged integration tests live in `tests/`; run them with `cargo xtask test`.
//!
//! This library holds the scenario pieces that more than one test file runs, so that e.g.
//! the disaster drill on a local directory (`failover.rs`) and on S3 (`s3.rs`) are the same
//! drill.

pub mod causal;
pub mod groups;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use testkit::{
    LoopDevice, Mount, Site,
    replication::{failover, ripcord},
};

const MIB: u64 = 1 << 20;

/// Writes `mib` MiB of incompressible data (from `seed`) at `offset_mib` MiB of `device`,
/// synced.
pub fn write_random_at(device: &Path, offset_mib: u64, mib: u64, seed: u64) {
    use rand::{RngExt as _, SeedableRng as _};
    use std::io::{Seek as _, SeekFrom, Write as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .unwrap();
    f.seek(SeekFrom::Start(offset_mib * MIB)).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..mib {
        rng.fill(&mut buf[..]);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// Fails recovery point `point` (a `points list --json` row) of `disk` over into a scratch
/// image and panics unless it equals `device`.
pub fn assert_point_equals(
    site: &Site,
    disk: &str,
    point: &serde_json::Value,
    device: &Path,
    what: &str,
) {
    let image = site.path().join("point.img");
    let id = point["id"].as_str().expect("a point id");
    let (ok, _, err) =
        testkit::replication::failover(site.target(), disk, id, &image, &site.ps.passphrase_file)
            .expect("running failover");
    assert!(ok, "failover to {id} failed: {err}");
    assert_same(&image, device, what);
    std::fs::remove_file(&image).expect("removing the image");
}

/// Panic unless the files or devices `a` and `b` are equal, naming the differing sectors.
pub fn assert_same(a: &Path, b: &Path, what: &str) {
    let diff = testkit::sys::diff_sectors(a, b).expect("compare");
    assert!(
        diff.is_empty(),
        "{what}: {} sectors differ, first {:?}",
        testkit::ranges::total(&diff),
        &diff[..diff.len().min(5)]
    );
}

/// Replicate an ext4 disk under a file workload to the site's target store (outside the
/// process server's directory), stop the agent cleanly, wait until the store holds a point
/// with everything it pushed, and stop the process server. Returns the source disk and the
/// disk id.
pub fn replicated_ext4(site: &mut Site) -> (LoopDevice, String) {
    let disk = site.loop_device("disk.img", 256 * MIB);
    testkit::run("mkfs.ext4", &["-q", "-F", disk.path.to_str().unwrap()]).unwrap();
    let agent = site.replicator(&[&disk.path]);
    let mnt = Mount::new(&disk.path, &site.path().join("mnt"), &["-t", "ext4"]).unwrap();
    testkit::file_workload(&mnt.dir, 5, 40, 2 << 20).unwrap();
    mnt.unmount().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let disk_id = site.id.disk_id(&disk.path).unwrap();
    site.final_point(agent, &disk_id);
    site.ps.stop().unwrap();
    (disk, disk_id)
}

/// The disaster drill: replicate an ext4 disk to the site's target store
/// ([`replicated_ext4`]), lose the whole primary site (process server directory and agent
/// state) but keep the passphrase, and fail over from the store and the passphrase alone:
/// the image must equal the source disk and check clean. A wrong passphrase must be named as
/// such and write nothing. Returns the kept passphrase file.
pub fn disaster_drill(site: &mut Site) -> PathBuf {
    let (disk, disk_id) = replicated_ext4(site);
    let target = site.target();
    let dir = site.path();
    // Keep the passphrase; lose the whole primary site.
    let pass = dir.join("kept-passphrase");
    std::fs::copy(&site.ps.passphrase_file, &pass).unwrap();
    std::fs::remove_dir_all(&site.ps.dir).unwrap();
    std::fs::remove_dir_all(&site.id.state_dir).unwrap();

    let image = dir.join("recovered.img");
    let (ok, out, err) = failover(target, &disk_id, "latest", &image, &pass).unwrap();
    assert!(ok, "failover failed: {err}");
    assert!(out.contains("crash-consistent"), "{out}");
    assert_same(&image, &disk.path, "recovered image");
    // The recovered file system is clean.
    testkit::run("e2fsck", &["-fn", image.to_str().unwrap()]).unwrap();

    // A wrong passphrase is named as such and writes nothing.
    let wrong = dir.join("wrong-passphrase");
    std::fs::write(&wrong, "not the passphrase").unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let bad = dir.join("bad.img");
    let (ok, _, err) = failover(target, &disk_id, "latest", &bad, &wrong).unwrap();
    assert!(
        !ok && err.contains("passphrase"),
        "wrong passphrase not reported: {err}"
    );
    assert!(!bad.exists());
    pass
}

/// `ripcord verify` with the passphrase (so batches are authenticated too); returns
/// (success, stdout, stderr).
pub fn verify_store(target: &str, passphrase_file: &Path) -> (bool, String, String) {
    let pass = passphrase_file.to_str().unwrap();
    ripcord(
        &["verify", "--target", target, "--passphrase-file", pass],
        passphrase_file,
    )
    .unwrap()
}

/// `GET path` from a local HTTP endpoint (the metrics servers); the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Value of a metric line `name{...label...} value` (or `name value` without a label).
/// `name` is the whole metric name: `x_total` never matches `x_total_seconds`.
pub fn metric(text: &str, name: &str, label: &str) -> f64 {
    let named = |l: &str| {
        l.strip_prefix(name)
            .is_some_and(|rest| name.ends_with([' ', '{']) || rest.starts_with([' ', '{']))
    };
    text.lines()
        .filter(|l| named(l) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or_else(|| panic!("no metric {name} {label} in:\n{text}"))
}

/// `ripcord status --json --deployment <deployment>` (the configuration role's view),
/// parsed; panics with its error if it fails.
pub fn ripcord_status(deployment: &Path) -> serde_json::Value {
    let out = std::process::Command::new(testkit::binary("ripcord"))
        .args(["status", "--json", "--deployment"])
        .arg(deployment)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ripcord status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}
